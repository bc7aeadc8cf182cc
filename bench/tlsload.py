"""Handshake load: a new mutual-TLS connection per request, as fast as the target takes them.

`handshakes()` is the load function of `mtls-handshakes`. It starts `--loadgen-procs` generator
processes (``python -m bench.tlsload``), pinned to the load core like wrk, which keep
`--connections` connections in flight in all (closed loop). Each connection, start to end:

1. a TCP connect to the target's TLS listener;
2. a full TLS handshake presenting a client certificate (the server's certificate is verified
   against the target's trust roots; no host name check, peers are named by certificate as in
   the mesh). Nothing is resumed: every connection starts from a fresh handshake (the client
   never offers a session, and `resumed` counts any the server resumed anyway);
3. `GET /hello` with `Connection: close`, and its whole response;
4. the server's close (EOF), then the client's close; then the next connection starts.

The target registers the client certificate for its port with `register()` when it starts
(targets differ in their CA), and the load looks it up by port.

Each process is one epoll loop over non-blocking sockets and `ssl` objects; no HTTP library.
Per connection it records the time from the connect to the last byte of the response; the
processes send their samples to the coordinator, which computes the percentiles exactly.
Every run is bounded: a connection that takes longer than CONN_TIMEOUT is dropped and counted
as a timeout, in-flight connections get GRACE seconds after the window, and a process that
does not finish in time is killed.
"""

from __future__ import annotations

import argparse
import base64
import errno
import json
import os
import resource
import select
import socket
import ssl
import subprocess
import sys
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

from . import BenchError, proc
from .load import UNMEASURED, LoadResult, Settings, Window

CONN_TIMEOUT = 5.0  # seconds a connection may take from connect to the end of its response
CLOSE_WAIT = 1.0  # seconds to wait for the server's close after the response
GRACE = 3.0  # seconds in-flight connections may still finish after the window
_START_DELAY = 1.5  # seconds between spawning the processes and their first connect
_MARK_AHEAD = 0.2  # window.begin() is called this long before the first connect (~0.1 s)
_RECV_SIZE = 16384
_MAX_HEAD = 16384
_PERCENTILES = (("p50_ms", 50.0), ("p90_ms", 90.0), ("p99_ms", 99.0), ("p99.9_ms", 99.9))


@dataclass(frozen=True)
class ClientCert:
    """What a client needs to pass a target's client-certificate check."""

    chain: Path  # the client's certificate, then its intermediate (PEM)
    key: Path
    trust: Path  # the roots the server's certificate must chain to (PEM)


_CLIENTS: dict[int, ClientCert] = {}


def register(port: int, client: ClientCert) -> None:
    """The client certificate for load against `port` (called by the target when it starts)."""
    _CLIENTS[port] = client


def unregister(port: int) -> None:
    _CLIENTS.pop(port, None)


# -- one generator process ---------------------------------------------------------------------

_CONNECTING, _HANDSHAKE, _SENDING, _READING, _CLOSING = range(5)
_ERRORS = ("connect_errors", "handshake_errors", "read_errors", "timeouts", "unfinished")


class _Conn:
    __slots__ = ("closing_since", "got", "need", "out", "sock", "started", "state", "status")

    def __init__(self, sock: socket.socket, now: float) -> None:
        self.sock: socket.socket | ssl.SSLSocket = sock
        self.started = now
        self.state = _CONNECTING
        self.out = b""
        self.got = bytearray()
        self.need = -1  # bytes of head + body once the head is in; -1: unknown yet, 0: to EOF
        self.status = 0
        self.closing_since = 0.0


class Generator:
    """One process's closed loop: `connections` connections in flight from `start` to
    `start + duration`, each a new mTLS connection carrying one request."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext, path: str,
                 connections: int, start: float, duration: float) -> None:
        self.address = (host, port)
        self.context = context
        self.request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                        "Connection: close\r\n\r\n").encode("ascii")
        self.connections = connections
        self.start, self.end = start, start + duration
        self.ep = select.epoll()
        self.conns: dict[int, _Conn] = {}
        self.counts = dict.fromkeys(("completed", "completed_in_window", "non_2xx", "resumed",
                                     "no_close", *_ERRORS), 0)
        self.latency_us = array("q")  # connect to the last response byte, completed in window
        self.handshake_us = array("q")  # connect to the end of the client's handshake
        self.negotiated = ""  # the TLS version and cipher of the first handshake

    def _open(self, now: float) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(self.address)
        if err not in (0, errno.EINPROGRESS):
            self.counts["connect_errors"] += 1
            sock.close()
            return
        self.conns[sock.fileno()] = _Conn(sock, now)
        self.ep.register(sock.fileno(), select.EPOLLOUT)

    def _drop(self, fd: int, conn: _Conn, count: str | None) -> None:
        if count:
            self.counts[count] += 1
        del self.conns[fd]
        self.ep.unregister(fd)
        conn.sock.close()

    def _wait(self, fd: int, events: int) -> None:
        self.ep.modify(fd, events)

    def _connected(self, fd: int, conn: _Conn) -> None:
        if conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            self._drop(fd, conn, "connect_errors")
            return
        # wrap_socket takes the fd over: same number, still registered with epoll.
        conn.sock = self.context.wrap_socket(conn.sock, do_handshake_on_connect=False)
        conn.state = _HANDSHAKE
        self._handshake(fd, conn)

    def _handshake(self, fd: int, conn: _Conn) -> None:
        tls = conn.sock
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            self._wait(fd, select.EPOLLIN)
            return
        except ssl.SSLWantWriteError:
            self._wait(fd, select.EPOLLOUT)
            return
        except (ssl.SSLError, OSError):
            self._drop(fd, conn, "handshake_errors")
            return
        self.handshake_us.append(int((time.monotonic() - conn.started) * 1e6))
        if not self.negotiated:
            self.negotiated = f"{tls.version()} {tls.cipher()[0]}"
        if tls.session_reused:
            self.counts["resumed"] += 1
        conn.state, conn.out = _SENDING, self.request
        self._send(fd, conn)

    def _send(self, fd: int, conn: _Conn) -> None:
        try:
            while conn.out:
                conn.out = conn.out[conn.sock.send(conn.out):]
        except (ssl.SSLWantWriteError, BlockingIOError):
            self._wait(fd, select.EPOLLOUT)
            return
        except ssl.SSLWantReadError:
            self._wait(fd, select.EPOLLIN)
            return
        except (ssl.SSLError, OSError):
            self._drop(fd, conn, "read_errors")
            return
        conn.state = _READING
        self._wait(fd, select.EPOLLIN)

    def _readable(self, fd: int, conn: _Conn, now: float) -> None:
        while True:
            try:
                data = conn.sock.recv(_RECV_SIZE)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLWantWriteError:
                self._wait(fd, select.EPOLLIN | select.EPOLLOUT)
                return
            except ssl.SSLZeroReturnError:
                data = b""
            except (ssl.SSLError, OSError):
                if conn.state == _CLOSING:  # the response is in; how the server closed is moot
                    self._finish(fd, conn, now)
                else:
                    self._drop(fd, conn, "read_errors")
                return
            if not data:  # the server closed
                if conn.state == _READING and conn.need == 0:  # a body delimited by the close
                    self._complete(conn, now)
                if conn.state == _CLOSING:
                    self._finish(fd, conn, now)
                else:
                    self._drop(fd, conn, "read_errors")
                return
            if conn.state == _CLOSING:
                continue  # nothing more is expected; read on to the EOF
            conn.got += data
            if conn.need < 0 and not self._parse_head(conn):
                if len(conn.got) > _MAX_HEAD:
                    self._drop(fd, conn, "read_errors")
                    return
                continue
            if conn.need > 0 and len(conn.got) >= conn.need:
                self._complete(conn, now)

    @staticmethod
    def _parse_head(conn: _Conn) -> bool:
        """Set `status` and `need` once the response head is in; False while it is not."""
        end = conn.got.find(b"\r\n\r\n")
        if end < 0:
            return False
        head = bytes(conn.got[:end]).decode("latin-1").split("\r\n")
        conn.status = int(head[0].split(" ", 2)[1])
        conn.need = 0
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                conn.need = end + 4 + int(value)
        if conn.need == 0 and (conn.status in (204, 304) or 100 <= conn.status < 200):
            conn.need = end + 4
        return True

    def _complete(self, conn: _Conn, now: float) -> None:
        conn.state, conn.closing_since = _CLOSING, now
        self.counts["completed"] += 1
        if self.start <= now <= self.end:
            self.counts["completed_in_window"] += 1
            self.latency_us.append(int((now - conn.started) * 1e6))
        if not 200 <= conn.status < 400:
            self.counts["non_2xx"] += 1

    def _finish(self, fd: int, conn: _Conn, now: float) -> None:
        self._drop(fd, conn, None)
        if now < self.end:
            self._open(now)

    def _expire(self, now: float) -> None:
        for fd, conn in list(self.conns.items()):
            if conn.state == _CLOSING:
                if now - conn.closing_since > CLOSE_WAIT:
                    self._drop(fd, conn, "no_close")
                    if now < self.end:
                        self._open(now)
            elif now - conn.started > CONN_TIMEOUT:
                self._drop(fd, conn, "timeouts")
                if now < self.end:
                    self._open(now)

    def run(self) -> None:
        time.sleep(max(0.0, self.start - time.monotonic()))
        now = time.monotonic()
        for _ in range(self.connections):
            self._open(now)
        next_expiry = now + 0.1
        while True:
            now = time.monotonic()
            if now >= self.end and (not self.conns or now >= self.end + GRACE):
                break
            if now < self.end and len(self.conns) < self.connections:  # failed connects
                self._open(now)
            for fd, mask in self.ep.poll(0.05):
                conn = self.conns.get(fd)
                if conn is None:
                    continue
                if conn.state == _CONNECTING:
                    self._connected(fd, conn)
                elif conn.state == _HANDSHAKE:
                    self._handshake(fd, conn)
                elif conn.state == _SENDING:
                    self._send(fd, conn)
                else:
                    if mask & select.EPOLLOUT:  # a write the TLS layer wanted is possible now
                        self._wait(fd, select.EPOLLIN)
                    self._readable(fd, conn, time.monotonic())
            if now >= next_expiry:
                self._expire(now)
                next_expiry = now + 0.1
        for fd, conn in list(self.conns.items()):
            self._drop(fd, conn, None if conn.state == _CLOSING else "unfinished")


def client_context(client: ClientCert) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # peers are named by their certificate, as in the mesh
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(client.trust))
    context.load_cert_chain(str(client.chain), str(client.key))
    return context


def _generator_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tlsload")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chain", type=Path, required=True)
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--trust", type=Path, required=True)
    parser.add_argument("--start", type=float, required=True, help="time.monotonic() to begin")
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--path", default="/hello")
    args = parser.parse_args(argv)
    context = client_context(ClientCert(args.chain, args.key, args.trust))
    gen = Generator(args.host, args.port, context, args.path, args.connections, args.start,
                    args.duration)
    time.sleep(max(0.0, args.start - 0.05 - time.monotonic()))
    before = resource.getrusage(resource.RUSAGE_SELF)
    gen.run()
    after = resource.getrusage(resource.RUSAGE_SELF)
    json.dump({
        "counts": gen.counts,
        "negotiated": gen.negotiated,
        "user_s": after.ru_utime - before.ru_utime,
        "sys_s": after.ru_stime - before.ru_stime,
        "latency_us": base64.b64encode(gen.latency_us.tobytes()).decode("ascii"),
        "handshake_us": base64.b64encode(gen.handshake_us.tobytes()).decode("ascii"),
    }, sys.stdout)


# -- the coordinator ---------------------------------------------------------------------------


def _samples(reports: list[dict], key: str) -> list[int]:
    values = array("q")
    for report in reports:
        values.frombytes(base64.b64decode(report[key]))
    return sorted(values)


def _percentile(ordered: list[int], pct: float) -> float:
    """The value at `pct` percent of `ordered` (µs), in ms; nearest rank."""
    if not ordered:
        return 0.0
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1] / 1000


def handshakes(port: int, seconds: int, settings: Settings,
               window: Window = UNMEASURED) -> LoadResult:
    """Closed-loop mTLS connections against `port` for `seconds` (see the module docstring):
    handshakes/s, the connection time percentiles, errors, and the generators' CPU."""
    client = _CLIENTS.get(port)
    if client is None:
        raise BenchError(f"no client certificate registered for port {port}")
    procs, connections = settings.procs, settings.connections
    start = time.monotonic() + _START_DELAY
    children, argvs = [], []
    for index in range(procs):
        share = connections // procs + (index < connections % procs)
        argv = proc.pinned([
            sys.executable, "-m", "bench.tlsload", "--host", proc.HOST, "--port", str(port),
            "--chain", str(client.chain), "--key", str(client.key), "--trust", str(client.trust),
            "--start", repr(start), "--duration", repr(seconds), "--connections", str(share),
        ], settings.cpu)
        argvs.append(argv)
        children.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         cwd=_package_root()))
    limit = _START_DELAY + seconds + GRACE + 30
    try:
        time.sleep(max(0.0, start - _MARK_AHEAD - time.monotonic()))
        window.begin()
        time.sleep(max(0.0, start + seconds - time.monotonic()))
        window.end()
    finally:
        reports = proc.gather_json(children, limit)
    counts = {key: sum(r["counts"][key] for r in reports) for key in reports[0]["counts"]}
    completed = counts["completed_in_window"]
    if completed == 0:
        raise BenchError(f"the handshake generator completed no connection: {counts}")
    latency, handshake = _samples(reports, "latency_us"), _samples(reports, "handshake_us")
    cpu_s = sum(r["user_s"] + r["sys_s"] for r in reports)
    metrics: dict[str, float] = {
        "hps": completed / seconds,
        **{key: _percentile(latency, pct) for key, pct in _PERCENTILES},
        "max_ms": latency[-1] / 1000,
        "handshake_p50_ms": _percentile(handshake, 50),
        "handshake_p99_ms": _percentile(handshake, 99),
        "errors": sum(counts[key] for key in _ERRORS),
        "non_2xx": counts["non_2xx"],
        "resumed": counts["resumed"],
        "loadgen_cores": cpu_s / seconds,
        "loadgen_us": cpu_s * 1e6 / completed,
    }
    raw = json.dumps({"counts": counts, "metrics": metrics, "argv": argvs[0],
                      "negotiated": sorted({r["negotiated"] for r in reports} - {""}),
                      "per_process": [{k: r[k] for k in ("counts", "user_s", "sys_s")}
                                      for r in reports]}, indent=2)
    shown = [a if not a.startswith("/") or a == sys.executable else Path(a).name
             for a in argvs[0]]
    return LoadResult(shown, metrics, completed, raw, "json")


def _package_root() -> str:
    """The directory holding the `bench` package, so the processes find it from anywhere."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


if __name__ == "__main__":
    _generator_main(sys.argv[1:])
