"""Load generators, pinned to the load core, with their output parsed: wrk (closed loop),
the built-in open-loop generator (fixed rate, HDR latency; see openloop.py), h2load (HTTP/2,
closed loop) and iperf3. The gRPC load is in grpcload.py.

Every run has a time limit; only 127.0.0.1 is ever targeted.
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from . import BenchError, hdr, proc
from . import openloop as generator

_GRACE = 30  # seconds a tool may take beyond its run time before it is killed
_MIB = 1 << 20
_WRK_REPORT = Path(__file__).with_name("wrk_report.lua")


@dataclass(frozen=True)
class Settings:
    """How load is applied, the same for every target of a run (but `http1`, set per target)."""

    pin: bool = True  # run the load tools with taskset on proc.LOAD_CPU
    rate: float | None = None  # open loop at this many req/s; None: closed loop (wrk)
    procs: int = 2  # open-loop generator processes
    connections: int = 50  # connections (wrk -c, h2load -c; in all, over the open-loop processes)
    # The target's listener speaks HTTP/1.1 only: `direct` (the origin) in an HTTP/2 scenario,
    # which then gets the same load over HTTP/1.1 (h2load --h1: its streams become pipelining).
    http1: bool = False

    @property
    def cpu(self) -> int | None:
        return proc.LOAD_CPU if self.pin else None


@dataclass(frozen=True)
class HttpRequest:
    """What an HTTP scenario sends, and what counts as its payload."""

    method: str = "GET"
    path: str = "/hello"
    body_size: int = 0  # request body bytes (POST)
    close: bool = False  # `Connection: close`: a new connection per request
    payload: int = 0  # body bytes moved per request, for MiB/s (0: not reported)


class Window(Protocol):
    """Marks the measured window (CPU accounting) from inside a load function."""

    def begin(self) -> None: ...

    def end(self) -> None: ...


class _Unmeasured:
    def begin(self) -> None:
        pass

    def end(self) -> None:
        pass


UNMEASURED: Window = _Unmeasured()  # for warm-ups


@dataclass(frozen=True)
class LoadResult:
    argv: list[str]
    metrics: dict[str, float]  # what the tool measured: rps, p50_ms, ... or gbps, ...
    work: float  # units of work done (requests, MiB): proxy CPU is divided by this
    raw: str  # the tool's own output, kept with the results
    raw_suffix: str
    latency: hdr.Histogram | None = field(default=None, repr=False)  # µs per request


def _run(argv: list[str], seconds: float, cpu: int | None,
         window: Window) -> tuple[subprocess.CompletedProcess, float]:
    """Run a load tool inside the measured window; return its result and its CPU seconds."""
    window.begin()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        done = subprocess.run(proc.pinned(argv, cpu), capture_output=True, text=True,
                              timeout=seconds + _GRACE, check=False)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{argv[0]} did not finish within {seconds + _GRACE:.0f}s") from e
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    window.end()
    cpu_s = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return done, cpu_s


# -- wrk ---------------------------------------------------------------------------------------

_TIME_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise BenchError(f"unexpected wrk time {text!r}")
    return float(match[1]) * _TIME_UNIT_MS[match[2]]


def parse_wrk(out: str) -> tuple[dict[str, float], int]:
    """Figures from `wrk --latency` output, and the number of completed requests."""
    requests = re.search(r"^\s*(\d+) requests in ", out, re.MULTILINE)
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.MULTILINE)
    if requests is None or rps is None:
        raise BenchError(f"unexpected wrk output:\n{out}")
    metrics = {"rps": float(rps[1])}
    for pct, value in re.findall(r"^\s+(50|90|99)%\s+(\S+)\s*$", out, re.MULTILINE):
        metrics[f"p{pct}_ms"] = _ms(value)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    metrics["errors"] = sum(map(int, socket_errors.groups())) if socket_errors else 0
    metrics["non_2xx"] = int(non_2xx[1]) if non_2xx else 0
    return metrics, int(requests[1])


def parse_wrk_report(out: str) -> tuple[dict[str, int], hdr.Histogram | None]:
    """The `@@bench` lines of wrk_report.lua: exact counters, and the latency histogram (µs)
    when the hdrhistogram package is there."""
    line = re.search(r"^@@bench (.*)$", out, re.MULTILINE)
    if line is None:
        raise BenchError(f"wrk printed no @@bench report:\n{out[-2000:]}")
    counters = {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", line[1])}
    if hdr.missing():
        return counters, None
    buckets = re.findall(r"^@@v (\d+) (\d+)$", out, re.MULTILINE)
    if buckets:
        return counters, hdr.of_counts((int(v), int(c)) for v, c in buckets)
    # Percentile points only (a very wide histogram): each point stands for the share of
    # requests between it and the previous point.
    points = sorted({(float(p), int(v)) for p, v in re.findall(r"^@@p (\S+) (\d+)$", out,
                                                             re.MULTILINE)})
    pairs, previous = [], 0.0
    for percentile, value in points:
        pairs.append((value, round((percentile - previous) / 100 * counters["requests"])))
        previous = percentile
    return counters, hdr.of_counts(pairs)


def _wrk_script(request: HttpRequest) -> str:
    lines = [f'wrk.method = "{request.method}"']
    if request.body_size:
        lines.append(f'wrk.body = string.rep("x", {request.body_size})')
        lines.append('wrk.headers["Content-Type"] = "application/octet-stream"')
    return "\n".join(lines) + "\n" + _WRK_REPORT.read_text()


def wrk(port: int, request: HttpRequest, seconds: int, settings: Settings,
        window: Window = UNMEASURED) -> LoadResult:
    """Closed-loop HTTP load: `wrk -t1 -cN -dD --timeout 5s --latency -s SCRIPT URL`; the script
    sets the method and body and prints exact counters and the latency histogram at the end."""
    argv = ["wrk", "-t1", f"-c{settings.connections}", f"-d{seconds}s", "--timeout", "5s",
            "--latency"]
    if request.close:
        argv += ["-H", "Connection: close"]
    with tempfile.NamedTemporaryFile("w", prefix="bench-wrk-", suffix=".lua") as script:
        script.write(_wrk_script(request))
        script.flush()
        argv_run = [*argv, "-s", script.name, f"http://{proc.HOST}:{port}{request.path}"]
        done, cpu_s = _run(argv_run, seconds, settings.cpu, window)
    shown = [*argv, "-s", "SCRIPT", f"http://{proc.HOST}:{port}{request.path}"]
    if done.returncode != 0:
        raise BenchError(f"wrk exited with {done.returncode}: {done.stderr.strip()}")
    metrics, requests = parse_wrk(done.stdout)
    if requests == 0:
        raise BenchError(f"wrk completed no request:\n{done.stdout}")
    counters, latency = parse_wrk_report(done.stdout)
    duration = counters["duration_us"] / 1e6
    metrics["loadgen_cores"] = cpu_s / duration
    if request.payload:
        metrics["mibps"] = counters["requests"] * request.payload / duration / _MIB
    if latency is not None:  # the same figures as wrk's, plus p99.9, p99.99 and max
        metrics.update(hdr.summary(latency))
        del metrics["count"]
    # The histogram lines go into the .hgrm files; the raw output keeps wrk's own report.
    raw = "".join(line for line in done.stdout.splitlines(keepends=True)
                  if not line.startswith(("@@v ", "@@p ")))
    return LoadResult(shown, metrics, requests, raw, "txt", latency)


# -- open loop ---------------------------------------------------------------------------------


def openloop(port: int, request: HttpRequest, seconds: int, settings: Settings,
             window: Window = UNMEASURED) -> LoadResult:
    """Fixed-rate HTTP load from `settings.procs` processes (openloop.py), latency from each
    request's intended send time into an HDR histogram."""
    try:
        result = generator.run(
            proc.HOST, port,
            generator.Request(request.method, request.path, request.body_size, request.close),
            rate=settings.rate, duration=seconds, procs=settings.procs,
            connections=settings.connections, cpu=settings.cpu,
            on_start=window.begin, on_end=window.end,
        )
    except (RuntimeError, BenchError) as e:
        raise BenchError(f"open-loop generator: {e}") from e
    counts = result.counts
    # Achieved rate and cost count the responses that came in while the schedule ran: a target
    # (or load side) that falls behind and catches up in the drain does not reach the rate.
    completed = counts.get("completed_in_schedule", 0)
    if completed == 0:
        raise BenchError(f"the open-loop generator completed no request: {counts}")
    metrics: dict[str, float] = {
        "rate": settings.rate,
        "rps": completed / seconds,
        **hdr.summary(result.latency),
        "lag_p99_ms": result.lag.get_value_at_percentile(99) / 1000,
        "lag_max_ms": result.lag.get_max_value() / 1000,
        "loadgen_cores": (result.user_s + result.sys_s) / seconds,
        "loadgen_us": (result.user_s + result.sys_s) * 1e6 / completed,
        "queued": counts.get("queued", 0) / max(counts.get("sent", 0) + counts.get("unsent", 0), 1),
        "errors": sum(counts.get(k, 0) for k in ("connect_errors", "read_errors", "write_errors",
                                                   "protocol_errors", "timeouts")),
        "non_2xx": counts.get("non_2xx_3xx", 0),
        "unsent": counts.get("unsent", 0),
    }
    del metrics["count"]
    if request.payload:
        metrics["mibps"] = completed * request.payload / seconds / _MIB
    raw = json.dumps({"counts": counts, "user_s": result.user_s, "sys_s": result.sys_s,
                      "latency_us": hdr.summary(result.latency),
                      "lag_hgrm": hdr.hgrm(result.lag), "argv": result.argv}, indent=2)
    return LoadResult(result.argv, metrics, completed, raw, "json", result.latency)


def http(request: HttpRequest):
    """The load function of an HTTP scenario: wrk, or the open-loop generator at --rate."""

    def run(port: int, seconds: int, settings: Settings,
            window: Window = UNMEASURED) -> LoadResult:
        if settings.rate:
            return openloop(port, request, seconds, settings, window)
        return wrk(port, request, seconds, settings, window)

    return run


# -- h2load ------------------------------------------------------------------------------------

_H2LOAD_COUNTS = ("total", "started", "done", "succeeded", "failed", "errored", "timeout")


def parse_h2load(out: str) -> tuple[dict[str, float], int]:
    """Figures from h2load's output, and the number of requests that succeeded (2xx/3xx).

    req/s is h2load's: the succeeded requests over its measured duration (which it prints
    rounded to 10 ms). `failed` is its own count: requests that ended in an error (`errored`),
    timed out, or got a status other than 2xx/3xx. Latency is its "time for request" line
    (min, max, mean, sd over the requests it sampled: all of them up to a million)."""
    finished = re.search(r"^finished in [\d.]+m?s, ([\d.]+) req/s", out, re.MULTILINE)
    counts = re.search(r"^requests: " + ", ".join(rf"(\d+) {name}" for name in _H2LOAD_COUNTS),
                       out, re.MULTILINE)
    times = re.search(r"^time for request:\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", out, re.MULTILINE)
    if finished is None or counts is None:
        raise BenchError(f"unexpected h2load output:\n{out[-2000:]}")
    n = dict(zip(_H2LOAD_COUNTS, map(int, counts.groups()), strict=True))
    metrics = {
        "rps": float(finished[1]),
        "failed": n["failed"],
        "errored": n["errored"],
        "timeout": n["timeout"],
    }
    if times is not None and n["succeeded"]:
        for key, value in zip(("min_ms", "max_ms", "mean_ms", "sd_ms"), times.groups(),
                              strict=True):
            metrics[key] = _ms(value)
    return metrics, n["succeeded"]


def h2load(port: int, request: HttpRequest, streams: int, seconds: int, settings: Settings,
           window: Window = UNMEASURED) -> LoadResult:
    """Closed-loop HTTP/2 cleartext load (prior knowledge), one thread:
    `h2load -t1 -cN -mSTREAMS -DSECONDS URL` (`--h1` when the listener speaks HTTP/1.1 only).
    h2load times its run itself (-D); the measured window is around the process, which adds
    the connects and closes of its N connections."""
    if request.method != "GET" or request.body_size or request.close:
        raise BenchError("the h2load load sends plain GETs only")
    if shutil.which("h2load") is None:
        raise BenchError("h2load is not installed (apt-get install -y nghttp2-client)")
    argv = ["h2load", "-t1", f"-c{settings.connections}", f"-m{streams}", f"-D{seconds}"]
    if settings.http1:
        argv.append("--h1")
    argv.append(f"http://{proc.HOST}:{port}{request.path}")
    done, cpu_s = _run(argv, seconds, settings.cpu, window)
    if done.returncode != 0:
        raise BenchError(f"h2load exited with {done.returncode}: "
                         f"{(done.stderr or done.stdout).strip()[-800:]}")
    metrics, succeeded = parse_h2load(done.stdout)
    if succeeded == 0:
        raise BenchError(f"h2load completed no request:\n{done.stdout[-2000:]}")
    metrics["loadgen_cores"] = cpu_s / seconds
    if request.payload:
        metrics["mibps"] = metrics["rps"] * request.payload / _MIB
    return LoadResult(argv, metrics, succeeded, done.stdout + done.stderr, "txt")


def h2(request: HttpRequest, streams: int):
    """The load function of an HTTP/2 scenario: h2load with `streams` streams per connection."""

    def run(port: int, seconds: int, settings: Settings,
            window: Window = UNMEASURED) -> LoadResult:
        return h2load(port, request, streams, seconds, settings, window)

    return run


# -- iperf3 ------------------------------------------------------------------------------------


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


def iperf3(port: int, seconds: int, settings: Settings,
           window: Window = UNMEASURED) -> LoadResult:
    """One TCP stream of bulk data from client to server: `iperf3 -c HOST -p PORT -t D -J`."""
    argv = ["iperf3", "-c", proc.HOST, "-p", str(port), "-t", str(seconds), "-J"]
    done, cpu_s = _run(argv, seconds, settings.cpu, window)
    metrics, mib = parse_iperf3(done.stdout)
    if done.returncode != 0:
        raise BenchError(f"iperf3 exited with {done.returncode}: {done.stderr.strip()}")
    metrics["loadgen_cores"] = cpu_s / seconds
    return LoadResult(argv, metrics, mib, done.stdout, "json")
