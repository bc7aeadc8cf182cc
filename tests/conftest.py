"""Shared fixtures: meshproxy as real processes, upstream servers on real loopback sockets.

Everything binds 127.0.0.1. Upstreams are plain threads with blocking (or selector-driven)
sockets started by the test; every process and socket a fixture creates is closed or
killed at teardown, whatever the test did.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import resource
import selectors
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from integration.support import HOST, child_pids, free_port, meshproxy_command

READY_TIMEOUT = 15.0
STOP_TIMEOUT = 15.0


def _raise_nofile_limit() -> None:
    """Many-connection tests hold thousands of sockets in this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


_raise_nofile_limit()


# -- meshproxy processes ---------------------------------------------------------------------


class MeshProxy:
    """One running `meshproxy --config FILE` (the supervisor) and its workers."""

    def __init__(self, config: dict[str, Any], config_path: Path, log_path: Path) -> None:
        self.config = config
        self.config_path = config_path
        self.log_path = log_path
        host, _, port = config["admin"]["address"].rpartition(":")
        self.admin = (host, int(port))
        self._log_file = open(log_path, "wb")  # noqa: SIM115 - closed in kill()
        self.process = subprocess.Popen(
            [*meshproxy_command(), "--config", str(config_path)],
            stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: teardown kills the workers too
        )
        self.pid = self.process.pid

    # -- what it is
    def address(self, listener: str = "in") -> tuple[str, int]:
        for entry in self.config["listeners"]:
            if entry["name"] == listener:
                host, _, port = entry["address"].rpartition(":")
                return host, int(port)
        raise KeyError(listener)

    def worker_pids(self) -> list[int]:
        return child_pids(self.pid)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    # -- the admin plane
    def get(self, path: str, timeout: float = 2.0) -> tuple[int, str]:
        """GET an admin path; raises OSError when the admin plane does not answer."""
        conn = http.client.HTTPConnection(*self.admin, timeout=timeout)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read().decode(errors="replace")
        finally:
            conn.close()

    def ready_status(self) -> int | None:
        """The status of GET /ready, or None when nothing answers."""
        try:
            return self.get("/ready", timeout=1.0)[0]
        except (OSError, http.client.HTTPException):
            return None

    def wait_ready(self, timeout: float = READY_TIMEOUT, workers: int | None = None) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"meshproxy exited with {self.process.returncode} before it was ready; log:\n{self.log()}"
                )
            if self.ready_status() == 200 and (workers is None or len(self.worker_pids()) == workers):
                return
            if time.monotonic() >= deadline:
                raise AssertionError(f"meshproxy not ready after {timeout:g}s; log:\n{self.log()}")
            time.sleep(0.02)

    # -- stopping
    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"meshproxy still running {timeout:g}s later; log:\n{self.log()}") from None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send `sig` to the supervisor and return its exit code."""
        if self.process.poll() is None:
            self.send_signal(sig)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL the supervisor and everything in its process group (workers included)."""
        workers = self.worker_pids()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
        self._log_file.close()


@pytest.fixture
def meshproxy(tmp_path: Path) -> Iterator[Callable[..., MeshProxy]]:
    """Start meshproxy with a config dict (written as YAML); waits for /ready unless told not to.

    `admin` gets a free loopback port when the config has none. Every started process
    group is SIGKILLed at teardown.
    """
    started: list[MeshProxy] = []

    def start(config: dict[str, Any], *, wait_ready: bool = True) -> MeshProxy:
        config = dict(config)
        config.setdefault("admin", {"address": f"{HOST}:{free_port()}"})
        n = len(started)
        config_path = tmp_path / f"meshproxy-{n}.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        proxy = MeshProxy(config, config_path, tmp_path / f"meshproxy-{n}.log")
        started.append(proxy)
        if wait_ready:
            workers = config.get("workers", 1)
            proxy.wait_ready(workers=workers if isinstance(workers, int) else None)
        return proxy

    yield start
    for proxy in started:
        proxy.kill()


# -- upstream servers ------------------------------------------------------------------------


class EchoServer:
    """Echoes every byte back, on any number of connections, from one selector thread.

    Half-close aware: on EOF from a client it sends what is still buffered, then its own
    FIN, and closes the connection.
    """

    def __init__(self) -> None:
        self.listener = socket.create_server((HOST, 0), backlog=4096)
        self.listener.setblocking(False)
        self.address = self.listener.getsockname()
        self.accepted = 0
        self.open = 0
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.listener, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="echo-upstream", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pending: dict[socket.socket, bytearray] = {}
        eof: set[socket.socket] = set()

        def drop(conn: socket.socket) -> None:
            self._selector.unregister(conn)
            pending.pop(conn, None)
            eof.discard(conn)
            conn.close()
            self.open -= 1

        while not self._stopping:
            for key, _ in self._selector.select(0.5):
                if key.data == "wake":
                    continue
                if key.fileobj is self.listener:
                    while True:
                        try:
                            conn, _ = self.listener.accept()
                        except BlockingIOError:
                            break
                        except OSError as exc:
                            if exc.errno in (errno.EMFILE, errno.ENFILE):
                                break
                            raise
                        conn.setblocking(False)
                        self.accepted += 1
                        self.open += 1
                        pending[conn] = bytearray()
                        self._selector.register(conn, selectors.EVENT_READ, "conn")
                    continue
                conn = key.fileobj
                assert isinstance(conn, socket.socket)
                buffer = pending[conn]
                try:
                    if conn not in eof and not buffer:
                        data = conn.recv(262144)
                        if data:
                            buffer += data
                        else:
                            eof.add(conn)
                    if buffer:
                        sent = conn.send(buffer)
                        del buffer[:sent]
                except BlockingIOError:
                    pass
                except OSError:
                    drop(conn)
                    continue
                if conn in eof and not buffer:
                    with contextlib.suppress(OSError):
                        conn.shutdown(socket.SHUT_WR)
                    drop(conn)
                    continue
                events = selectors.EVENT_WRITE if buffer else selectors.EVENT_READ
                self._selector.modify(conn, events, "conn")
        for key in list(self._selector.get_map().values()):
            if isinstance(key.fileobj, socket.socket):
                key.fileobj.close()
        self._selector.close()

    def close(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        self._thread.join(5)
        self._wake_w.close()


class Acceptor:
    """A listening socket whose connections the test takes one by one and drives itself."""

    def __init__(self, timeout: float = 10.0) -> None:
        self.listener = socket.create_server((HOST, 0), backlog=1024)
        self.address = self.listener.getsockname()
        self.timeout = timeout
        self.connections: list[socket.socket] = []

    def accept(self, timeout: float | None = None) -> socket.socket:
        """The next connection (blocking, with the acceptor's timeout on every call)."""
        self.listener.settimeout(self.timeout if timeout is None else timeout)
        conn, _ = self.listener.accept()
        conn.settimeout(self.timeout)
        self.connections.append(conn)
        return conn

    def close(self) -> None:
        for conn in self.connections:
            conn.close()
        self.listener.close()


class RefusedPort:
    """A port bound but never listening: connects to it are refused, and nobody else gets it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((HOST, 0))
        self.address = self.sock.getsockname()
        probe = socket.socket()
        try:
            probe.settimeout(2)
            with pytest.raises(ConnectionRefusedError):
                probe.connect(self.address)
        finally:
            probe.close()

    def close(self) -> None:
        self.sock.close()


class Blackhole:
    """A loopback address whose connects never complete.

    A listener with backlog 0 whose accept queue is full and never accepted: Linux
    drops further SYNs, so a connect stays in SYN-SENT. The set-up is checked before
    any test relies on it.
    """

    def __init__(self) -> None:
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind((HOST, 0))
        self.listener.listen(0)
        self.address = self.listener.getsockname()
        self.fillers: list[socket.socket] = []
        for _ in range(16):
            if not self._connects(timeout=0.2, keep=True):
                break
        assert not self._connects(timeout=0.5, keep=False), "could not make connects hang on loopback"

    def _connects(self, timeout: float, keep: bool) -> bool:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect_ex(self.address)
        if keep:
            self.fillers.append(sock)
        done = selectors.DefaultSelector()
        try:
            done.register(sock, selectors.EVENT_WRITE)
            completed = bool(done.select(timeout))
        finally:
            done.close()
        if not keep:
            sock.close()
        return completed

    def close(self) -> None:
        for sock in self.fillers:
            sock.close()
        self.listener.close()


class Upstreams:
    """Factory for the upstream servers of one test; closes them all at teardown."""

    def __init__(self) -> None:
        self._servers: list[Any] = []

    def _keep(self, server: Any) -> Any:
        self._servers.append(server)
        return server

    def echo(self) -> EchoServer:
        return self._keep(EchoServer())

    def acceptor(self, timeout: float = 10.0) -> Acceptor:
        return self._keep(Acceptor(timeout))

    def refused(self) -> RefusedPort:
        return self._keep(RefusedPort())

    def blackhole(self) -> Blackhole:
        return self._keep(Blackhole())

    def close(self) -> None:
        for server in reversed(self._servers):
            server.close()


@pytest.fixture
def upstreams() -> Iterator[Upstreams]:
    servers = Upstreams()
    yield servers
    servers.close()


@pytest.fixture(name="free_port")
def free_port_fixture() -> Callable[[], int]:
    """A function returning a TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    return free_port
