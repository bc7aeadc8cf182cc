"""`meshproxy demo --duration`: the whole mesh in a box, unattended, as CI runs it.

One run of 20 s (about 27 s with start and stop): it exits 0, the split observed before the
scripted break of backend v2 is within a few points of 90/10, every hop between sidecars was
mTLS, the calls the policy forbids were refused, the report files exist, and no process it
started is left. The same with `--netns` where network namespaces can be made (root).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .support import meshproxy_command

DEMO_TIMEOUT = 90


def _run_demo(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    report = tmp_path / "report"
    done = subprocess.run([*meshproxy_command(), "demo", *args, "--report-dir", str(report)],
                          capture_output=True, text=True, timeout=DEMO_TIMEOUT, stdin=subprocess.DEVNULL,
                          cwd=tmp_path, check=False)
    summary_file = report / "summary.json"
    assert summary_file.exists(), done.stdout + done.stderr
    return done, json.loads(summary_file.read_text())


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as file:
            state = file.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _check_report(report: Path, summary: dict) -> None:
    assert (report / "latency.hgrm").read_text().startswith("       Value     Percentile")
    assert (report / "latency-v1.hgrm").exists() and (report / "latency-v2.hgrm").exists()
    assert {p.name for p in (report / "mesh").glob("*.yaml")} == {"frontend.yaml", "backend-v1.yaml",
                                                                  "backend-v2.yaml"}
    assert (report / "mesh" / "frontend.log").exists()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib" in summary["png"]
    else:
        assert (report / "latency.png").read_bytes()[:4] == b"\x89PNG"
    # Every process it started was stopped (and the CA's keys were not copied anywhere).
    assert summary["processes"] and not [name for name, pid in summary["processes"].items() if _alive(pid)]
    assert not list(report.rglob("*.key")) and not list(report.rglob("*.token"))


def test_demo_duration(tmp_path):
    done, summary = _run_demo(tmp_path, "--duration", "20")
    assert done.returncode == 0, done.stdout + done.stderr
    assert summary["passed"] and summary["success_rate"] >= 0.99

    # The split: 90/10 before v2 breaks (v2's share then goes to v1, and comes back after).
    steady = summary["phases"][0]
    assert steady["name"] == "canary 90/10" and steady["requests"] > 1000
    assert abs(steady["split"]["v2"] - 0.10) <= 0.04, steady
    broken = summary["phases"][1]
    assert broken["name"].startswith("v2 broken") and broken["success_rate"] >= 0.99
    assert broken["split"]["v2"] < steady["split"]["v2"]  # ejected: v1 answered for it
    assert summary["frontend"]["v2_ejections"] >= 1

    # Every hop between sidecars was mTLS: the backends saw every call come from the
    # frontend's verified identity, over handshakes their strict listeners counted.
    mtls = summary["mtls"]
    assert mtls["every_hop"], mtls
    assert mtls["caller_verified_as_frontend"] == mtls["backend_answers"] == summary["ok"]
    assert all(n > 0 for n in mtls["tls_handshakes_ok"].values())

    # The calls the policy forbids were refused: plaintext, and a valid SVID of another workload.
    calls = summary["forbidden_calls"]
    assert len(calls) == 4 and all(call["refused"] for call in calls), calls
    assert {call["outcome"] for call in calls if "intruder" in call["caller"]} == {"403 forbidden"}

    assert summary["checks_passed"]
    assert "PASSED" in done.stdout and f"summary: {tmp_path / 'report' / 'summary.json'}" in done.stdout
    _check_report(tmp_path / "report", summary)


def _can_make_namespaces() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    name = f"mpdtest{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, timeout=10, check=False)
    if made.returncode != 0:
        return False
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10, check=False)
    return True


def test_demo_netns(tmp_path):
    if not _can_make_namespaces():
        pytest.skip("needs root and network namespaces")
    done, summary = _run_demo(tmp_path, "--netns", "--duration", "4", "--rate", "100")
    assert done.returncode == 0, done.stdout + done.stderr
    assert summary["mode"] == "netns" and "bridge mpd" in summary["network"]
    assert summary["success_rate"] >= 0.99 and summary["mtls"]["every_hop"]
    assert all(call["refused"] for call in summary["forbidden_calls"])
    # The namespaces and links it made are gone.
    prefix = summary["network"].split()[1].removesuffix("br")
    namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10,
                                check=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, timeout=10, check=True).stdout
    assert prefix not in namespaces and prefix not in links
    _check_report(tmp_path / "report", summary)


def test_demo_usage_errors():
    for args in (["--rate", "0"], ["--duration", "soon"], ["--bogus"]):
        done = subprocess.run([*meshproxy_command(), "demo", *args], capture_output=True, text=True,
                              timeout=30, stdin=subprocess.DEVNULL, check=False)
        assert done.returncode == 2, (args, done.stderr)
    helped = subprocess.run([*meshproxy_command(), "demo", "--help"], capture_output=True, text=True,
                            timeout=30, check=False)
    assert helped.returncode == 0 and "--duration" in helped.stdout and "--netns" in helped.stdout
