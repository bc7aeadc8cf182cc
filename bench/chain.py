"""Run a chain of proxies as one process tree: `python -S bench/chain.py SPEC.json`.

A two-proxy hop (client -> A -> B -> origin) is measured as one target, so its processes must
share one root for the CPU accounting of procstat.py: this small supervisor is that root. It
starts the stages of SPEC in order, each once the one before it is ready (listening on its port
and, if it has one, its ready URL answering 200), so the last stage (the one the load reaches)
starts only when everything behind it serves. Then it waits:

- when a stage exits on its own, it stops the others and exits 1 (the harness then sees the
  target gone);
- on SIGTERM or SIGINT (the harness stopping the target), it gives the stages SELF_STOP seconds
  to stop on the signal the harness sent their whole group, then sends SIGTERM to each one left
  by PID, SIGKILL to what is left GRACE seconds after the signal, reaps everything and exits 0.

The stages stay in the supervisor's process group, so the harness's own group-wide SIGKILL also
reaches them should the supervisor itself be killed. The stages inherit the supervisor's CPU
affinity and its stdout/stderr (the target's log). Standard library only, no package imports:
it runs as a script with `-S`, which keeps it small (its memory counts in the tree's peak RSS).

SPEC: {"timeout": seconds for all stages to get ready,
       "stages": [{"name": "b", "argv": [...], "port": 20001, "ready_url": "http://..." | null},
                  ...]}
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from types import FrameType

GRACE = 4.0  # below bench.proc's 5 s, so the supervisor reaps its stages before it is killed
SELF_STOP = 1.5  # when signalled: how long the stages may take to stop on the group's signal
_POLL = 0.05


class _Stop(Exception):
    """SIGTERM or SIGINT arrived."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signum)


def _say(message: str) -> None:
    print(f"[chain] {message}", flush=True)


def _listening(port: int) -> bool:
    """Whether a TCP socket is in LISTEN state on `port` (from /proc/net/tcp; sends nothing)."""
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


def _answers_200(url: str) -> bool:
    """Whether GET `url` (http://HOST:PORT/PATH) answers 200; a raw socket keeps urllib out."""
    host_port, _, path = url.removeprefix("http://").partition("/")
    host, _, port = host_port.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0) as sock:
            sock.sendall(f"GET /{path} HTTP/1.1\r\nHost: {host_port}\r\n"
                         "Connection: close\r\n\r\n".encode())
            status = sock.recv(64)
    except OSError:
        return False
    return status.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200"))


def _start(stage: dict, deadline: float, processes: list[subprocess.Popen]) -> subprocess.Popen:
    """Start one stage (added to `processes` at once, so it is stopped whatever happens next)
    and wait until it is ready; raise RuntimeError if it exits or is late."""
    started = time.monotonic()
    process = subprocess.Popen(stage["argv"], stdin=subprocess.DEVNULL)
    processes.append(process)
    _say(f"{stage['name']}: started, pid {process.pid}")
    ready_url = stage.get("ready_url")
    while not (_listening(stage["port"]) and (not ready_url or _answers_200(ready_url))):
        if process.poll() is not None:
            raise RuntimeError(f"{stage['name']} exited with {process.returncode} at start-up")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{stage['name']} not ready on port {stage['port']} in time")
        time.sleep(_POLL)
    _say(f"{stage['name']}: ready on port {stage['port']} after "
         f"{time.monotonic() - started:.2f}s")
    return process


def _stop_all(processes: list[subprocess.Popen], signalled: bool) -> None:
    """SIGTERM to each live stage by PID, a grace period, then SIGKILL; reap them all.

    When the supervisor was signalled, the harness usually signalled the whole process group
    (bench.proc.stop), so the stages are stopping already; a second SIGTERM would make a
    meshproxy skip its drain. They get SELF_STOP seconds to exit on their own first."""
    deadline = time.monotonic() + GRACE
    if signalled:
        until = time.monotonic() + SELF_STOP
        while time.monotonic() < until and any(p.poll() is None for p in processes):
            time.sleep(_POLL)
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def main(spec_path: str) -> int:
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    with open(spec_path) as f:
        spec = json.load(f)
    processes: list[subprocess.Popen] = []
    by_pid: dict[int, tuple[str, subprocess.Popen]] = {}
    code, signalled = 0, False
    try:
        deadline = time.monotonic() + float(spec["timeout"])
        for stage in spec["stages"]:
            process = _start(stage, deadline, processes)
            by_pid[process.pid] = (stage["name"], process)
        _say("all stages ready")
        while True:  # blocks until a stage exits (or a signal interrupts)
            pid, status = os.waitpid(-1, 0)
            if pid in by_pid:
                name, process = by_pid[pid]
                process.returncode = os.waitstatus_to_exitcode(status)
                _say(f"{name} exited with {process.returncode}; stopping the chain")
                code = 1
                break
    except _Stop:
        _say("stopping the chain")
        signalled = True
    except (RuntimeError, OSError, KeyError, ValueError) as e:
        _say(f"error: {e}")
        code = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the reaping
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _stop_all(processes, signalled)
    return code


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -S bench/chain.py SPEC.json")
    sys.exit(main(sys.argv[1]))
