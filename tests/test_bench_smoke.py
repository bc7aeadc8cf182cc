"""Smoke tests of the benchmark suite (bench/): every scenario runs end to end in a very short
run, and the open-loop generator measures a known origin delay correctly.

The suite runs as `python -m bench` with the repository root as working directory (so the
`bench` package is found there) and the installed meshproxy (its command beside
`sys.executable`, put first on PATH). Tools a scenario needs and the machine lacks are a skip,
not a failure; CI installs them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from integration.support import TinyOrigin

REPO = Path(__file__).resolve().parent.parent
TARGETS = ["direct", "meshproxy"]
RUN_TIMEOUT = 120.0  # seconds one scenario may take (about 5-13 s here)

# Per scenario: the tools (and Python modules) it needs, extra options, its targets (when not
# TARGETS), the throughput figure that must be positive, and whether it records latency (.hgrm).
SCENARIOS: dict[str, dict] = {
    "tcp-throughput": {"tools": ["iperf3"], "rate_key": "gbps", "latency": False},
    "tcp-rps": {"tools": ["nginx", "wrk"]},
    "tcp-new-conn": {"tools": ["nginx", "wrk"]},
    "http1-keepalive": {"tools": ["nginx", "wrk"]},
    "http1-new-conn": {"tools": ["nginx", "wrk"]},
    "http1-1mib": {"tools": ["nginx", "wrk"]},
    "http1-post": {"tools": ["nginx", "wrk"]},
    # Open loop (--rate required), with its own default targets.
    "reload-under-load": {
        "tools": ["nginx"],
        "args": ["--rate", "500"],
        "targets": ["direct", "meshproxy", "meshproxy+reload"],
    },
    # Two-proxy hops and TLS handshakes, with their own targets.
    "mtls-hop-keepalive": {"tools": ["nginx", "wrk", "haproxy"],
                           "targets": ["meshproxy-plain", "meshproxy-mtls", "nginx-tls", "haproxy-tls"]},
    "mtls-handshakes": {"tools": ["nginx", "haproxy"],
                        "targets": ["meshproxy-mtls", "nginx-tls", "haproxy-tls"],
                        "rate_key": "hps", "latency": False},
    # HTTP/2: h2load (direct gets --h1), and gRPC calls from a grpcio client to a grpcio origin.
    "h2-small": {"tools": ["nginx", "h2load"], "latency": False},
    "grpc-unary": {"tools": [], "modules": ["grpc"], "rate_key": "cps"},
}


def _env() -> dict[str, str]:
    """The environment of the bench: this interpreter's bin directory first on PATH, so the
    `meshproxy` it finds is the one installed with the package under test."""
    bindir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}


def _bench(*args: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run `python -m bench ARGS` from the repository root to completion.

    On a timeout the bench gets SIGTERM, which makes it stop what it started (its targets and
    origin run in their own process groups); then its own group is killed."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bench", *args], cwd=REPO, env=_env(),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGTERM)
        try:
            out, err = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            out, err = process.communicate()
        pytest.fail(f"python -m bench {' '.join(args)} still running after {timeout:g}s; "
                    f"stderr:\n{err[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def _parse_hgrm(text: str) -> list[tuple[float, float, int]]:
    """(value ms, percentile, total count) of each percentile line of an `.hgrm` text."""
    rows = []
    for line in text.splitlines():
        fields = line.split()
        if not fields or line.startswith("#") or fields[0] == "Value":
            continue
        assert len(fields) in (3, 4), f"unexpected .hgrm line {line!r}"
        rows.append((float(fields[0]), float(fields[1]), int(fields[2])))
    return rows


def _check_hgrm(path: Path, samples: float) -> None:
    rows = _parse_hgrm(path.read_text())
    assert rows, f"{path.name} has no percentile lines"
    values = [value for value, _, _ in rows]
    percentiles = [pct for _, pct, _ in rows]
    counts = [count for _, _, count in rows]
    assert values == sorted(values) and values[0] > 0, f"{path.name}: values not ascending"
    assert percentiles == sorted(percentiles), f"{path.name}: percentiles not ascending"
    assert 0.0 <= percentiles[0] and percentiles[-1] == 1.0, path.name
    assert counts == sorted(counts) and counts[-1] == samples, (
        f"{path.name}: total count {counts[-1]}, summary.json says {samples}"
    )


def test_scenario_list_is_covered() -> None:
    """The smoke runs below cover exactly the scenarios `python -m bench --help` lists."""
    done = _bench("--help", timeout=60)
    assert done.returncode == 0, done.stderr
    epilog = re.search(r"^scenarios:$(.*)", done.stdout, re.MULTILINE | re.DOTALL)
    assert epilog, done.stdout
    names = [line.split()[0] for line in epilog[1].splitlines() if line.strip()]
    assert names == list(SCENARIOS), "update SCENARIOS in this file to match `bench --help`"


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_scenario_smoke(scenario: str, tmp_path: Path) -> None:
    spec = SCENARIOS[scenario]
    missing = [tool for tool in spec["tools"] if shutil.which(tool) is None]
    missing += [m for m in spec.get("modules", ()) if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{scenario} needs {', '.join(missing)} (not on PATH)")
    if importlib.util.find_spec("hdrh") is None:
        pytest.skip("the hdrhistogram package is not installed")
    if not {0, 1} <= os.sched_getaffinity(0):
        pytest.skip("the bench pins to CPUs 0 and 1, which this process may not use")
    targets = spec.get("targets", TARGETS)
    out = tmp_path / "out"
    args = [scenario, "--duration", "1", "--warmup", "0", "--rounds", "1", "--out", str(out),
            *spec.get("args", ())]
    if "targets" not in spec:
        args += ["--targets", ",".join(targets)]

    done = _bench(*args)
    assert done.returncode == 0, f"exit {done.returncode}; stderr:\n{done.stderr[-3000:]}"

    report = (out / "report.md").read_text()
    for target in targets:  # a measured row shows its headline figure in bold
        assert re.search(rf"^\| {re.escape(target)} \| \*\*[\d.,]+\*\* \|", report, re.MULTILINE), (
            f"no measured row for {target} in report.md:\n{report}"
        )

    summary = json.loads((out / "summary.json").read_text())
    assert summary["targets"] == targets
    assert summary["skipped"] == {}
    rate_key = spec.get("rate_key", "rps")
    for target in targets:
        figure = summary["aggregate"][target][rate_key]
        assert figure["n"] == 1 and figure["median"] > 0, (target, figure)

    hgrms = sorted(out.glob("*.hgrm"))
    if not spec.get("latency", True):
        return
    assert [p.name for p in hgrms] == sorted(f"{t}.hgrm" for t in targets)
    for target in targets:
        _check_hgrm(out / f"{target}.hgrm", summary["latency_pooled"][target]["count"])


def test_openloop_measures_origin_delay() -> None:
    """The open-loop generator (`python -m bench.openloop`, one process, as the bench runs it)
    against an origin that answers /slow after 20 ms: p50 is 20 ms, and it sends exactly the
    schedule rate x duration."""
    hdrh = pytest.importorskip("hdrh.histogram")
    rate, duration, delay = 100, 2.0, 0.02
    origin = TinyOrigin(delay=delay)
    try:
        first_due = time.monotonic() + 1.0  # CLOCK_MONOTONIC: the same clock in the child
        argv = [
            sys.executable, "-m", "bench.openloop", "--host", origin.address[0],
            "--port", str(origin.address[1]), "--rate", str(rate),
            "--first-due", repr(first_due), "--duration", str(duration),
            "--connections", "10", "--method", "GET", "--path", "/slow",
        ]
        # What the generator measured: one JSON object on stdout (bench.openloop.run reads it
        # the same way).
        done = subprocess.run(argv, check=False, cwd=REPO, env=_env(), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=60)
    finally:
        origin.close()
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    counts = result["counts"]
    expected = rate * duration
    assert abs(counts.get("completed", 0) - expected) <= 2, counts
    assert counts.get("sent") == counts["completed"], counts
    for problem in ("connect_errors", "read_errors", "write_errors", "protocol_errors",
                    "timeouts", "unsent", "non_2xx_3xx"):
        assert counts.get(problem, 0) == 0, counts

    latency = hdrh.HdrHistogram.decode(result["latency"].encode("ascii"))
    assert latency.get_total_count() == counts["completed"]
    p50_ms = latency.get_value_at_percentile(50) / 1000
    assert abs(p50_ms - delay * 1000) <= 5, f"p50 {p50_ms:.3f} ms, origin delay {delay * 1000} ms"
