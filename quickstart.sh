#!/usr/bin/env bash
# Install meshproxy into .venv, start a demo upstream on 127.0.0.1:9001 and run
# a sidecar on configs/quickstart.yaml in front of it. Ctrl-C stops both.
# QUICKSTART_NO_INSTALL=1 skips the install step (the tests use an existing .venv).
set -euo pipefail
cd "$(dirname "$0")"
venv=${QUICKSTART_VENV:-.venv}

if [ "${QUICKSTART_NO_INSTALL:-0}" != 1 ]; then
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
    echo "installing meshproxy into $venv ..."
    "$venv/bin/pip" install --quiet --disable-pip-version-check .
fi

"$venv/bin/meshproxy" demo-upstream --address 127.0.0.1:9001 --name quickstart-upstream &
upstream=$!
trap 'kill "$upstream" 2>/dev/null; wait "$upstream" 2>/dev/null || true' EXIT

cat <<MSG

meshproxy is starting. In another terminal:
  curl http://127.0.0.1:8080/hello          # through the sidecar to the demo upstream
  curl http://127.0.0.1:15000/ready         # the admin plane
Press Ctrl-C to drain and stop.

MSG
"$venv/bin/meshproxy" --config configs/quickstart.yaml
