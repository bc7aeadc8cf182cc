"""The CA's keys stay out of proxies: nothing a sidecar runs loads the `proxy.ca` package."""

from __future__ import annotations

import subprocess
import sys


def test_sidecar_modules_never_load_the_ca():
    code = (
        "import sys, proxy.cli, proxy.supervisor, proxy.worker, proxy.identity; "
        "print(sorted(m for m in sys.modules if m == 'proxy.ca' or m.startswith('proxy.ca.')))"
    )
    result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
