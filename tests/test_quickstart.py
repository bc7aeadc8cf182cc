"""The README's quickstart command: it starts, answers through its listener, and stops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status, response.read()


@pytest.mark.slow
def test_quickstart_serves_through_its_listener_and_stops(tmp_path):
    venv = Path(sys.executable).parent.parent
    env = dict(os.environ, QUICKSTART_NO_INSTALL="1", QUICKSTART_VENV=str(venv))
    log = (tmp_path / "quickstart.log").open("wb")
    process = subprocess.Popen(
        ["bash", str(ROOT / "quickstart.sh")], env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:  # the sidecar is ready and the demo upstream answers through it
            try:
                if _get("http://127.0.0.1:15000/ready")[0] == 200:
                    status, body = _get("http://127.0.0.1:8080/hello")
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "quickstart.log").read_text()
            time.sleep(0.2)
        assert body.startswith(b"hello from quickstart-upstream: GET /hello"), (
            (tmp_path / "quickstart.log").read_text()
        )
        # The same upstream through the L4 listener.
        status, body = _get("http://127.0.0.1:8081/tcp")
        assert body.startswith(b"hello from quickstart-upstream: GET /tcp")
        # Ctrl-C in a terminal: SIGINT to the whole process group.
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    with pytest.raises(OSError):
        _get("http://127.0.0.1:8080/hello")
