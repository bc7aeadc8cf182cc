"""Processes under test: start them pinned to a core, wait until they listen, stop them by PID.

The machine has two cores: the proxy under test gets PROXY_CPU to itself; the load generator,
the origin and this harness share LOAD_CPU.
"""

import json
import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from . import BenchError

PROXY_CPU = 1
LOAD_CPU = 0
HOST = "127.0.0.1"
_PORTS = range(20000, 32000)  # below the ephemeral range, so outgoing connections never take them
_START_TIMEOUT = 15.0
_STOP_GRACE = 5.0


def pinned(argv: list[str], cpu: int | None) -> list[str]:
    """`argv` run with `taskset -c CPU`, or as it is when `cpu` is None (--no-pin)."""
    return argv if cpu is None else ["taskset", "-c", str(cpu), *argv]


def gather_json(children: list[subprocess.Popen], limit: float) -> list:
    """The JSON report each load generator process prints, waiting up to `limit` seconds for
    each; BenchError naming what went wrong when one fails or hangs (it is killed)."""
    reports, problems = [], []
    try:
        for child in children:
            out, err = child.communicate(timeout=limit)
            if child.returncode != 0:
                problems.append(f"exit {child.returncode}: {err.decode(errors='replace')[-800:]}")
            else:
                reports.append(json.loads(out))
    except subprocess.TimeoutExpired:
        problems.append(f"a generator process did not finish within {limit:.0f}s")
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    if problems:
        raise BenchError("; ".join(problems))
    return reports


def free_port() -> int:
    """A loopback TCP port nothing is bound to right now."""
    for _ in range(100):
        port = random.choice(_PORTS)
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
            return port
    raise BenchError(f"no free port in {_PORTS}")


def _listening(port: int) -> bool:
    """Whether a TCP socket is in LISTEN state on `port` (from /proc/net/tcp and tcp6; sends
    nothing). grpcio listens on 127.0.0.1 with an IPv6 socket (::ffff:127.0.0.1), in tcp6."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with suppress(FileNotFoundError), open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignore *_proxy env


def _answers_200(url: str) -> bool:
    try:
        with _DIRECT.open(url, timeout=1.0) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _tail(log: Path, lines: int = 3) -> str:
    return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])


def stop(process: subprocess.Popen) -> None:
    """End the process group we created for `process`: SIGTERM, a grace period, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):  # SIGKILL also ends leftover group members
        with suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with suppress(subprocess.TimeoutExpired):
            process.wait(_STOP_GRACE)


@contextmanager
def started(
    argv: list[str], cpu: int | None, log: Path, port: int, ready_url: str | None = None,
    env: dict[str, str] | None = None,
) -> Iterator[subprocess.Popen]:
    """Run `argv` pinned to `cpu` (None: unpinned) in its own process group, output to `log`,
    with `env` added to the environment; yield once it listens on `port` (and `ready_url`
    answers 200); stop it on exit."""
    with open(log, "wb") as out:
        process = subprocess.Popen(
            pinned(argv, cpu),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **env} if env else None,
        )
    try:
        deadline = time.monotonic() + _START_TIMEOUT
        while not (_listening(port) and (ready_url is None or _answers_200(ready_url))):
            if process.poll() is not None:
                raise BenchError(
                    f"{Path(argv[0]).name} exited with {process.returncode} at start-up; "
                    f"its output ends: {_tail(log)}"
                )
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{Path(argv[0]).name} not ready on port {port} after {_START_TIMEOUT}s"
                )
            time.sleep(0.05)
        yield process
    finally:
        stop(process)
