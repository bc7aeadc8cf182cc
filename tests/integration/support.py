"""Helpers for the integration tests: ports, polling, /proc, and client-side socket work.

Plain functions with blocking sockets and explicit timeouts; nothing here starts a
process or a server (the fixtures in tests/conftest.py do, and clean up after).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"


def free_port() -> int:
    """A loopback port nothing uses now, for a listener the test configures.

    Picked below the kernel's ephemeral range (net.ipv4.ip_local_port_range starts at
    32768), so an outgoing connection of a running test cannot take it before the
    proxy binds it, as a port the kernel handed out for `bind(0)` could be.
    """
    for _ in range(200):
        port = random.randrange(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def child_pids(pid: int) -> list[int]:
    """Live, non-zombie children of `pid` (found through /proc, sorted)."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as file:
                stat = file.read()
        except OSError:
            continue
        # The command name is in parentheses and may contain spaces: split after it.
        fields = stat[stat.rfind(")") + 2:].split()
        state, ppid = fields[0], int(fields[1])
        if ppid == pid and state not in ("Z", "X"):
            children.append(int(entry))
    return sorted(children)


def fd_kinds(pid: int) -> Counter[str]:
    """Open fds of a process by kind: 'socket', 'pipe', 'file', 'anon_inode', ..."""
    kinds: Counter[str] = Counter()
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            target = os.readlink(f"{base}/{name}")
        except OSError:
            continue  # closed while we looked
        if target.startswith(("socket:", "pipe:")):
            kinds[target.split(":", 1)[0]] += 1
        elif target.startswith("anon_inode:"):
            kinds["anon_inode"] += 1
        else:
            kinds["file"] += 1
    return kinds


def meshproxy_command() -> list[str]:
    """The installed `meshproxy` of the interpreter running the tests, else `python -m proxy`."""
    beside = Path(sys.executable).with_name("meshproxy")
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("meshproxy")
    if found:
        return [found]
    return [sys.executable, "-m", "proxy"]


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run `meshproxy ARGS` to completion, capturing both streams."""
    return subprocess.run(
        [*meshproxy_command(), *args], capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def tcp_config(
    endpoints: list[Any],
    *,
    workers: int = 1,
    drain_timeout: str | None = None,
    connect_timeout: str | None = None,
    **listener: Any,
) -> dict[str, Any]:
    """A config with one tcp listener `in` forwarding to one cluster `up`."""
    cluster: dict[str, Any] = {"name": "up", "endpoints": list(endpoints)}
    if connect_timeout is not None:
        cluster["connect_timeout"] = connect_timeout
    config: dict[str, Any] = {
        "node": {"id": "test"},
        "workers": workers,
        "listeners": [{"name": "in", "address": f"{HOST}:{free_port()}", "protocol": "tcp",
                       "cluster": "up", **listener}],
        "clusters": [cluster],
    }
    if drain_timeout is not None:
        config["drain_timeout"] = drain_timeout
    return config


def endpoint(address: tuple[str, int]) -> str:
    """An address as config wants it: "host:port"."""
    return f"{address[0]}:{address[1]}"


# -- client-side socket work -----------------------------------------------------------------


def connect(address: tuple[str, int], timeout: float = 10.0) -> socket.socket:
    """A blocking TCP connection whose every call times out after `timeout` seconds."""
    return socket.create_connection(address, timeout=timeout)


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    buffer = bytearray()
    while len(buffer) < size:
        chunk = sock.recv(min(size - len(buffer), 1 << 20))
        if not chunk:
            raise AssertionError(f"EOF after {len(buffer)} of {size} bytes")
        buffer += chunk
    return bytes(buffer)


def roundtrip(sock: socket.socket, payload: bytes) -> None:
    """Send `payload` through an echo path and check the same bytes come back."""
    sock.sendall(payload)
    assert recv_exactly(sock, len(payload)) == payload


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything until the peer's FIN (a reset raises ConnectionResetError)."""
    buffer = bytearray()
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return bytes(buffer)
        buffer += chunk


def wait_closed(sock: socket.socket, timeout: float) -> str:
    """Discard incoming bytes until the peer closes; returns "eof" or "reset".

    Fails if the connection is still open after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"connection still open after {timeout:g}s")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return "reset"
        except TimeoutError:
            continue
        if not chunk:
            return "eof"


def is_open(sock: socket.socket) -> bool:
    """True when the peer has neither closed nor reset and nothing is waiting to be read."""
    readable, _, _ = select.select([sock], [], [], 0)
    return not readable


def close_with_reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0) instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def pattern(size: int, seed: int) -> bytes:
    """`size` pseudo-random bytes that differ per seed (no repeating block to hide reordering)."""
    return random.Random(seed).randbytes(size)


class Exchange:
    """Send `payload` on one socket while hashing what it receives, both at once.

    Sending runs in one thread, receiving in another; the receiver stops after
    `expect` bytes, or at EOF when `expect` is None. With `fin`, the sender shuts
    down its write side after the payload. `result()` gives (bytes received,
    sha256 hex) or re-raises what went wrong.
    """

    def __init__(self, sock: socket.socket, payload: bytes, *, expect: int | None = None,
                 fin: bool = False, chunk: int = 1 << 20) -> None:
        self.sock = sock
        self.payload = payload
        self.expect = expect
        self.fin = fin
        self.chunk = chunk
        self.received = 0
        self.digest = hashlib.sha256()
        self.errors: list[BaseException] = []
        self._threads = [threading.Thread(target=self._send, daemon=True),
                         threading.Thread(target=self._receive, daemon=True)]

    def _send(self) -> None:
        try:
            view = memoryview(self.payload)
            for offset in range(0, len(view), self.chunk):
                self.sock.sendall(view[offset:offset + self.chunk])
            if self.fin:
                self.sock.shutdown(socket.SHUT_WR)
        except BaseException as exc:  # reported by result()
            self.errors.append(exc)

    def _receive(self) -> None:
        try:
            buffer = bytearray(1 << 20)
            view = memoryview(buffer)
            while self.expect is None or self.received < self.expect:
                want = len(buffer) if self.expect is None else min(len(buffer), self.expect - self.received)
                n = self.sock.recv_into(view[:want])
                if not n:
                    return
                self.received += n
                self.digest.update(view[:n])
        except BaseException as exc:
            self.errors.append(exc)

    def start(self) -> Exchange:
        for thread in self._threads:
            thread.start()
        return self

    def result(self, timeout: float) -> tuple[int, str]:
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                raise AssertionError(
                    f"exchange still running after {timeout:g}s ({self.received} bytes received)"
                )
        if self.errors:
            raise self.errors[0]
        return self.received, self.digest.hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def process_state(pid: int) -> str:
    """The one-letter state of a process from /proc (R, S, T, Z, ...), or "" if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as file:
            stat = file.read()
    except OSError:
        return ""
    return stat[stat.rfind(")") + 2:].split()[0]


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """Hold a process in SIGSTOP for the block, so work queues up for its next wake-up."""
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: process_state(pid) in ("T", "t"), 5, f"pid {pid} to stop")
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


class TinyOrigin:
    """A keep-alive HTTP/1.1 origin on a thread per connection: every request (bodies are
    not expected) gets 200 with `body`; a path starting with /slow waits `delay` first."""

    def __init__(self, body: bytes = b"ok", delay: float = 0.0) -> None:
        self.body = body
        self.delay = delay
        self.server = socket.create_server((HOST, 0), backlog=256)
        self.address = self.server.getsockname()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        response = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(self.body), self.body)
        with conn:
            data = b""
            while True:
                while b"\r\n\r\n" not in data:
                    try:
                        chunk = conn.recv(65536)
                    except OSError:
                        return
                    if not chunk:
                        return
                    data += chunk
                head, _, data = data.partition(b"\r\n\r\n")
                if self.delay and b" /slow" in head.split(b"\r\n", 1)[0]:
                    time.sleep(self.delay)
                try:
                    conn.sendall(response)
                except OSError:
                    return

    def close(self) -> None:
        self.server.close()
