"""gRPC unary load: as many calls as the target takes, from a grpcio client on the load core.

`unary()` is the load function of `grpc-unary`. It starts one generator process
(``python -m bench.grpcload``), pinned to the load core like wrk, which keeps `--connections`
calls in flight in all (closed loop) over CHANNELS channels, each its own HTTP/2 connection
(a local subchannel pool, so grpcio does not fold them into one). The client is `grpc.aio`:
one asyncio loop, one task per call slot, each calling `/bench.Echo/Unary` of
bench/grpcorigin.py with a 5-byte message, raw bytes, no protobuf.

A call counts as **completed** when its status is OK, the answer is the request reversed and
the trailing metadata has the origin's `x-bench: kept`: status (`grpc-status`, a trailer) and
trailing metadata came through intact. Any other ending is **failed**, counted by status code
(a wrong answer or missing trailer counts as `BAD_RESPONSE`). Both count only for calls that end
inside the window; latency is from the call's start to its end (status in), recorded for the
completed calls into an HDR histogram after the window. Every call has a deadline
(CALL_TIMEOUT); in-flight calls get GRACE seconds after the window, then are cancelled.

grpcio in Python is not cheap: the client costs about 130-160 µs of CPU per call and the
grpcio origin about as much, so with both on the load core the calls/s figure is bound by that
core (see the CPU 0 note of the report) well before a proxy on CPU 1 is; the proxy's CPU per
call is the figure to compare.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import resource
import subprocess
import sys
import time
from array import array
from pathlib import Path

from . import BenchError, hdr, proc
from .grpcorigin import PATH, TRAILER
from .load import UNMEASURED, LoadResult, Settings, Window

CHANNELS = 4  # HTTP/2 connections the calls are spread over
CALL_TIMEOUT = 5.0  # seconds: each call's deadline
GRACE = 3.0  # seconds in-flight calls may still finish after the window
_START_DELAY = 2.0  # seconds between spawning the process and its first call (imports, connect)
_MARK_AHEAD = 0.2  # window.begin() is called this long before the first call (it takes ~0.1 s)
_REQUEST = b"hello"
_ANSWER = _REQUEST[::-1]
_BAD_RESPONSE = "BAD_RESPONSE"


async def _generate(host: str, port: int, start: float, duration: float,
                    in_flight: int) -> dict:
    import grpc  # here, so that the harness imports this module without needing grpcio

    counts: collections.Counter[str] = collections.Counter()
    latency_us = array("q")
    end = start + duration
    channels = [grpc.aio.insecure_channel(f"{host}:{port}",
                                          options=(("grpc.use_local_subchannel_pool", 1),))
                for _ in range(CHANNELS)]
    try:
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)),
                               max(start - time.monotonic(), 0.1))
    except TimeoutError:
        counts["connect_timeouts"] += 1
    methods = [c.unary_unary(PATH) for c in channels]  # no serializers: bytes in, bytes out

    async def slot(method) -> None:
        record, monotonic = latency_us.append, time.monotonic
        while (began := monotonic()) < end:
            call = method(_REQUEST, timeout=CALL_TIMEOUT)
            try:
                answer = await call
                trailers = await call.trailing_metadata()
                outcome = "OK" if answer == _ANSWER and TRAILER in tuple(trailers) \
                    else _BAD_RESPONSE
            except grpc.aio.AioRpcError as e:
                outcome = e.code().name
            done = monotonic()
            if start <= done <= end:
                if outcome == "OK":
                    record(int((done - began) * 1e6))
                else:
                    counts[outcome] += 1

    await asyncio.sleep(max(0.0, start - time.monotonic()))
    late = time.monotonic() - start
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    slots = [asyncio.ensure_future(slot(methods[i % CHANNELS])) for i in range(in_flight)]
    await asyncio.sleep(max(0.0, end - time.monotonic()))
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    _, pending = await asyncio.wait(slots, timeout=GRACE)
    for task in pending:
        task.cancel()
    counts["unfinished"] += len(pending)
    await asyncio.gather(*(c.close() for c in channels), return_exceptions=True)
    return {
        "latency_us": latency_us, "counts": counts, "late_start_ms": late * 1000,
        # the window's CPU, all threads of the process (grpcio's own included)
        "user_s": cpu_after.ru_utime - cpu_before.ru_utime,
        "sys_s": cpu_after.ru_stime - cpu_before.ru_stime,
    }


def _generator_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.grpcload")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--start", type=float, required=True,
                        help="time.monotonic() of the first call")
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--in-flight", type=int, required=True, help="calls in flight in all")
    args = parser.parse_args(argv)
    result = asyncio.run(_generate(args.host, args.port, args.start, args.duration,
                                   args.in_flight))
    latency = result["latency_us"]
    json.dump({
        "completed": len(latency),
        "counts": result["counts"],
        "late_start_ms": result["late_start_ms"],
        "latency": hdr.encode(hdr.of_values(latency)) if not hdr.missing() and latency else "",
        "user_s": result["user_s"],
        "sys_s": result["sys_s"],
    }, sys.stdout)


def unary(port: int, seconds: int, settings: Settings,
          window: Window = UNMEASURED) -> LoadResult:
    """Closed-loop gRPC unary calls against `port` for `seconds` (see the module docstring):
    calls/s, latency percentiles, failed calls by status, and the generator's CPU."""
    start = time.monotonic() + _START_DELAY
    argv = proc.pinned([
        sys.executable, "-m", "bench.grpcload", "--host", proc.HOST, "--port", str(port),
        "--start", repr(start), "--duration", repr(seconds),
        "--in-flight", str(settings.connections),
    ], settings.cpu)
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             cwd=Path(__file__).resolve().parent.parent)
    try:
        time.sleep(max(0.0, start - _MARK_AHEAD - time.monotonic()))
        window.begin()
        time.sleep(max(0.0, start + seconds - time.monotonic()))
        window.end()
    finally:
        (report,) = proc.gather_json([child], _START_DELAY + seconds + GRACE + 30)
    completed, failures = report["completed"], report["counts"]
    if completed == 0:
        raise BenchError(f"the gRPC generator completed no call: {failures}")
    cpu_s = report["user_s"] + report["sys_s"]
    metrics: dict[str, float] = {
        "cps": completed / seconds,
        "failed": sum(n for code, n in failures.items()
                      if code not in ("unfinished", "connect_timeouts")),
        "unfinished": failures.get("unfinished", 0),
        "loadgen_cores": cpu_s / seconds,
        "loadgen_us": cpu_s * 1e6 / completed,
    }
    latency = hdr.decode(report["latency"]) if report["latency"] else None
    if latency is not None:
        metrics.update(hdr.summary(latency))
        del metrics["count"]
    raw = json.dumps({"completed": completed, "failures": failures,
                      "late_start_ms": report["late_start_ms"], "metrics": metrics,
                      "argv": argv}, indent=2)
    return LoadResult(argv, metrics, completed, raw, "json", latency)


if __name__ == "__main__":
    _generator_main(sys.argv[1:])
