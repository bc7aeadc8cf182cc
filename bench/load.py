"""Load generators (wrk, iperf3), pinned to the load core, with their output parsed.

Every run has a time limit; only 127.0.0.1 is ever targeted.
"""

import json
import re
import subprocess
from dataclasses import dataclass

from . import BenchError, proc

_GRACE = 30  # seconds a tool may take beyond its run time before it is killed
_MIB = 1 << 20


@dataclass(frozen=True)
class LoadResult:
    argv: list[str]
    metrics: dict[str, float]  # what the tool measured: rps, p50_ms, ... or gbps, ...
    work: float  # units of work done (requests, MiB): proxy CPU is divided by this
    raw: str  # the tool's own output, kept with the results
    raw_suffix: str


def _run(argv: list[str], seconds: int) -> subprocess.CompletedProcess:
    pinned = ["taskset", "-c", str(proc.LOAD_CPU), *argv]
    try:
        return subprocess.run(pinned, capture_output=True, text=True, timeout=seconds + _GRACE)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{argv[0]} did not finish within {seconds + _GRACE}s") from e


_TIME_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise BenchError(f"unexpected wrk time {text!r}")
    return float(match[1]) * _TIME_UNIT_MS[match[2]]


def parse_wrk(out: str) -> tuple[dict[str, float], int]:
    """Figures from `wrk --latency` output, and the number of completed requests."""
    requests = re.search(r"^\s*(\d+) requests in ", out, re.M)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    if requests is None or rps is None:
        raise BenchError(f"unexpected wrk output:\n{out}")
    metrics = {"rps": float(rps[1])}
    for pct, value in re.findall(r"^\s+(50|90|99)%\s+(\S+)\s*$", out, re.M):
        metrics[f"p{pct}_ms"] = _ms(value)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    metrics["errors"] = sum(map(int, socket_errors.groups())) if socket_errors else 0
    metrics["errors"] += int(non_2xx[1]) if non_2xx else 0
    return metrics, int(requests[1])


def wrk(
    port: int, path: str, seconds: int, *, connections: int = 50, headers: tuple[str, ...] = ()
) -> LoadResult:
    """Closed-loop HTTP load: `wrk -t1 -cN -dD --timeout 5s --latency`."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s", "--latency"]
    for header in headers:
        argv += ["-H", header]
    argv.append(f"http://{proc.HOST}:{port}{path}")
    done = _run(argv, seconds)
    if done.returncode != 0:
        raise BenchError(f"wrk exited with {done.returncode}: {done.stderr.strip()}")
    metrics, requests = parse_wrk(done.stdout)
    if requests == 0:
        raise BenchError(f"wrk completed no request:\n{done.stdout}")
    return LoadResult(argv, metrics, requests, done.stdout, "txt")


def parse_iperf3(out: str) -> tuple[dict[str, float], float]:
    """Figures from `iperf3 -J` output, and the MiB the receiver got."""
    try:
        report = json.loads(out)
    except json.JSONDecodeError as e:
        raise BenchError(f"unexpected iperf3 output:\n{out[:2000]}") from e
    if "error" in report:
        raise BenchError(f"iperf3: {report['error']}")
    received, sent = report["end"]["sum_received"], report["end"]["sum_sent"]
    metrics = {"gbps": received["bits_per_second"] / 1e9, "retransmits": sent.get("retransmits", 0)}
    return metrics, received["bytes"] / _MIB


def iperf3(port: int, seconds: int) -> LoadResult:
    """One TCP stream of bulk data from client to server: `iperf3 -c HOST -p PORT -t D -J`."""
    argv = ["iperf3", "-c", proc.HOST, "-p", str(port), "-t", str(seconds), "-J"]
    done = _run(argv, seconds)
    metrics, mib = parse_iperf3(done.stdout)
    if done.returncode != 0:
        raise BenchError(f"iperf3 exited with {done.returncode}: {done.stderr.strip()}")
    return LoadResult(argv, metrics, mib, done.stdout, "json")
