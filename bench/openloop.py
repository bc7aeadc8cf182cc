"""Open-loop HTTP/1.1 load at a fixed rate, with latency measured from each request's
*intended* send time (coordinated omission corrected), recorded into an HDR histogram.

`run()` starts `procs` generator processes (``python -m bench.openloop``), each pinned like wrk,
each sending its share of the rate on a fixed schedule; the schedules are staggered so that
together they send one request every 1/rate seconds. A request that falls due while every
connection of its process is busy waits in a queue, and its wait counts in its latency: a target
that stalls shows the stall in every request scheduled during it, as a user would see it, instead
of slowing the generator down (which is what a closed-loop tool like wrk does).

Each process is a single-threaded epoll loop over raw non-blocking sockets with a minimal
HTTP/1.1 client (Content-Length, chunked and close-delimited bodies; no pipelining): no
library on the per-request path. Latencies go into a flat array during the run and into the
histogram afterwards, so recording costs no CPU in the measured window. Besides the latency,
each process records its own *lag*: how late its loop noticed that a request was due. Lag grows
when the generator itself cannot keep up (CPU or scheduling), independently of the target.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import errno
import json
import os
import resource
import select
import socket
import subprocess
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass

from . import hdr, proc

_START_DELAY = 1.0  # seconds between spawning the processes and their first request
_MARK_AHEAD = 0.2  # on_start() is called this long before the first request (it takes ~0.1 s)
_GRACE = 2.0  # seconds in-flight requests may still finish after the schedule ends
_CONNECT_RETRY = 0.02  # seconds between reconnect attempts after a failed connect
_MAX_HEAD = 64 * 1024
_RECV_SIZE = 256 * 1024
_PR_SET_TIMERSLACK = 29


@dataclass(frozen=True)
class Request:
    """One HTTP/1.1 request, sent over and over."""

    method: str = "GET"
    path: str = "/hello"
    body_size: int = 0  # bytes of body (b"x" * n), sent with Content-Length
    close: bool = False  # `Connection: close`: a new connection per request

    def wire(self, host: str, port: int) -> bytes:
        head = f"{self.method} {self.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        if self.body_size or self.method in ("POST", "PUT"):
            head += f"Content-Length: {self.body_size}\r\n"
        if self.close:
            head += "Connection: close\r\n"
        return (head + "\r\n").encode("ascii") + b"x" * self.body_size


# -- one generator process ---------------------------------------------------------------------

_CONNECTING, _IDLE, _BUSY = 0, 1, 2


class _Conn:
    __slots__ = (
        "body_left",
        "chunked",
        "close_after",
        "fd",
        "got_bytes",
        "head",
        "intended",
        "out",
        "sock",
        "state",
        "status",
        "until_eof",
    )

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.state = _CONNECTING
        self.intended = 0.0  # intended send time of the request in flight
        self.out: memoryview | None = None  # unsent rest of the request
        self.reset_response()

    def reset_response(self) -> None:
        self.head = b""
        self.body_left = -1  # -1: still reading the head
        self.chunked: bytearray | None = None  # buffered chunked body, when chunked
        self.until_eof = False
        self.status = 0
        self.close_after = False
        self.got_bytes = False


class _ProtocolError(Exception):
    pass


def _chunked_done(buf: bytearray) -> int:
    """If `buf` holds a complete chunked body, how many bytes it spans, else -1.
    (Slow path: none of the bench origins sends chunked bodies.)"""
    pos = 0
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            return -1
        size_text = bytes(buf[pos:eol]).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise _ProtocolError(f"bad chunk size {size_text!r}") from None
        pos = eol + 2
        if size == 0:
            while True:  # trailers, then an empty line
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    return -1
                if eol == pos:
                    return eol + 2
                pos = eol + 2
        if len(buf) < pos + size + 2:
            return -1
        pos += size + 2


class Generator:
    """The schedule, the connections and the counters of one generator process."""

    def __init__(self, host: str, port: int, request: Request, rate: float, first_due: float,
                 duration: float, connections: int) -> None:
        self.addr = (host, port)
        self.wire = request.wire(host, port)
        self.close_mode = request.close
        self.interval = 1.0 / rate
        self.first_due = first_due
        self.end = first_due + duration
        self.max_conns = connections
        self.ep = select.epoll()
        self.conns: dict[int, _Conn] = {}
        # Idle connections in the order they became idle: each request takes the one idle
        # longest, so all connections carry load, as with wrk -c.
        self.idle: collections.deque[_Conn] = collections.deque()
        self.backlog: collections.deque[float] = collections.deque()
        self.connecting = 0
        self.connect_after = 0.0  # no new connect before this time (after a refused one)
        self.buf = bytearray(_RECV_SIZE)
        self.view = memoryview(self.buf)
        self.latency_us = array("q")
        self.lag_us = array("q")
        self.counts = collections.Counter()

    # connections

    def _open(self, now: float) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(sock)
        self.conns[conn.fd] = conn
        self.connecting += 1
        self.counts["connects"] += 1
        code = sock.connect_ex(self.addr)
        if code in (0, errno.EINPROGRESS):
            self.ep.register(conn.fd, select.EPOLLOUT)
        else:
            self._drop(conn, now, "connect_errors")

    def _refill(self, now: float) -> None:
        """Open connections up to what the schedule needs: all of them when kept alive, one per
        waiting request with `Connection: close`."""
        while (len(self.conns) < self.max_conns and now >= self.connect_after
               and (not self.close_mode or self.connecting < len(self.backlog))):
            self._open(now)

    def _drop(self, conn: _Conn, now: float, error: str | None) -> None:
        """Close `conn`; count `error` and lose its request if one was in flight."""
        if error:
            self.counts[error] += 1
            if error == "connect_errors":
                self.connect_after = now + _CONNECT_RETRY
        if conn.state == _CONNECTING:
            self.connecting -= 1
        elif conn.state == _IDLE:
            self.idle.remove(conn)
        del self.conns[conn.fd]
        try:
            self.ep.unregister(conn.fd)
        except (OSError, ValueError):
            pass
        conn.sock.close()

    def _connected(self, conn: _Conn, now: float) -> None:
        code = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if code:
            self._drop(conn, now, "connect_errors")
            return
        self.connecting -= 1
        conn.state = _IDLE
        self.ep.modify(conn.fd, select.EPOLLIN)
        self._next(conn)

    def _next(self, conn: _Conn) -> None:
        """`conn` is free: give it the oldest waiting request, or make it idle."""
        if self.backlog:
            self._send(conn, self.backlog.popleft())
        else:
            conn.state = _IDLE
            self.idle.append(conn)

    # requests

    def _send(self, conn: _Conn, intended: float) -> None:
        conn.state = _BUSY
        conn.intended = intended
        conn.reset_response()
        self.counts["sent"] += 1
        try:
            n = conn.sock.send(self.wire)
        except BlockingIOError:
            n = 0
        except OSError:
            self._fail(conn, "write_errors")
            return
        if n < len(self.wire):
            conn.out = memoryview(self.wire)[n:]
            self.ep.modify(conn.fd, select.EPOLLIN | select.EPOLLOUT)

    def _writable(self, conn: _Conn) -> None:
        try:
            n = conn.sock.send(conn.out)
        except BlockingIOError:
            return
        except OSError:
            self._fail(conn, "write_errors")
            return
        conn.out = conn.out[n:] if n < len(conn.out) else None
        if conn.out is None:
            self.ep.modify(conn.fd, select.EPOLLIN)

    def _fail(self, conn: _Conn, error: str) -> None:
        now = time.monotonic()
        self._drop(conn, now, error)
        self._refill(now)

    def _readable(self, conn: _Conn) -> None:
        try:
            n = conn.sock.recv_into(self.buf)
        except BlockingIOError:
            return
        except OSError:
            self._fail(conn, "read_errors" if conn.state == _BUSY else "")
            return
        if n == 0:
            if conn.state != _BUSY:  # the server closed an idle kept-alive connection
                self._fail(conn, "")
            elif conn.until_eof:
                self._complete(conn)
            else:
                self._fail(conn, "read_errors")
            return
        if conn.state != _BUSY:
            self._fail(conn, "protocol_errors")  # bytes nobody asked for
            return
        conn.got_bytes = True
        left = conn.body_left
        if left > 0 and conn.chunked is None:  # the common case in bulk bodies
            if n < left:
                conn.body_left = left - n
            elif n == left:
                self._complete(conn)
            else:
                self._fail(conn, "protocol_errors")
            return
        try:
            self._parse(conn, self.view[:n])
        except _ProtocolError:
            self._fail(conn, "protocol_errors")

    def _parse(self, conn: _Conn, data: memoryview) -> None:
        if conn.until_eof:
            return
        if conn.chunked is not None:
            conn.chunked += data
            self._chunk_progress(conn)
            return
        head = conn.head + data if conn.head else bytes(data)
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > _MAX_HEAD:
                raise _ProtocolError("response head too long")
            conn.head = head
            return
        if head[:5] != b"HTTP/" or len(head) < 12:
            raise _ProtocolError("not an HTTP response")
        status = int(head[9:12])
        lower = head[:end + 2].lower()
        rest = len(head) - end - 4
        if 100 <= status < 200:  # interim response: the final one follows
            conn.head = b""
            if rest:
                self._parse(conn, memoryview(head)[end + 4:])
            return
        conn.status = status
        conn.close_after = b"\r\nconnection: close\r\n" in lower
        cl = lower.find(b"\r\ncontent-length:")
        if cl >= 0:
            length = int(lower[cl + 17:lower.index(b"\r\n", cl + 2)])
            if rest > length:
                raise _ProtocolError("more bytes than Content-Length")
            if rest == length:
                self._complete(conn)
            else:
                conn.body_left = length - rest
        elif b"\r\ntransfer-encoding:" in lower and b"chunked" in lower:
            conn.chunked = bytearray(memoryview(head)[end + 4:])
            self._chunk_progress(conn)
        elif status in (204, 304):
            self._complete(conn)
        else:
            conn.until_eof = True
            conn.close_after = True

    def _chunk_progress(self, conn: _Conn) -> None:
        span = _chunked_done(conn.chunked)
        if span < 0:
            return
        if span != len(conn.chunked):
            raise _ProtocolError("bytes after the chunked body")
        self._complete(conn)

    def _complete(self, conn: _Conn) -> None:
        now = time.monotonic()
        self.latency_us.append(int((now - conn.intended) * 1e6))
        self.counts["completed"] += 1
        if now <= self.end:
            self.counts["completed_in_schedule"] += 1
        if not 200 <= conn.status < 400:
            self.counts["non_2xx_3xx"] += 1
        if conn.close_after or self.close_mode:
            self._drop(conn, now, None)
            self._refill(now)
        else:
            self._next(conn)

    # the schedule

    def run(self) -> None:
        now = time.monotonic()
        if not self.close_mode:
            self._refill(now)
        ep_fd = self.ep.fileno()
        poll, wait = self.ep.poll, select.select
        conns, backlog, idle = self.conns, self.backlog, self.idle
        lag_append = self.lag_us.append
        interval, first, end = self.interval, self.first_due, self.end
        k = 0
        due = first
        deadline = end + _GRACE
        while True:
            now = time.monotonic()
            while due <= now and due < end:  # everything due by now, in order
                lag_append(int((now - due) * 1e6))
                if idle:
                    self._send(idle.popleft(), due)
                else:
                    backlog.append(due)
                    if self.close_mode and len(conns) < self.max_conns:
                        self._refill(now)  # its own connection
                    else:
                        self.counts["queued"] += 1  # waits for a busy connection
                k += 1
                due = first + k * interval
            if due >= end and (
                now >= deadline or (not backlog and len(idle) + self.connecting == len(conns))
            ):
                break  # schedule done, nothing waiting or in flight (or the grace time is over)
            if len(conns) < self.max_conns:
                self._refill(now)
            # Wait for readiness or the next due time, whichever is first. epoll_wait's timeout
            # has 1 ms steps, so the wait is a select() on the epoll fd (µs steps, and it
            # returns at once if events are pending); the events are then taken without
            # blocking.
            timeout = (due if due < end else deadline) - now
            if len(conns) < self.max_conns and self.connect_after > now:
                timeout = min(timeout, self.connect_after - now)
            if timeout <= 0 or wait((ep_fd,), (), (), timeout)[0]:
                events = poll(0)
            else:
                continue
            for fd, mask in events:
                conn = conns.get(fd)
                if conn is None:
                    continue
                if conn.state == _CONNECTING:
                    self._connected(conn, now)
                    continue
                if mask & select.EPOLLOUT and conn.out is not None:
                    self._writable(conn)
                    if fd not in conns:
                        continue
                if mask & (select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP):
                    self._readable(conn)
        self.counts["unsent"] = len(backlog)
        self.counts["timeouts"] = sum(1 for c in conns.values() if c.state == _BUSY)
        for conn in list(conns.values()):
            conn.sock.close()


def _generator_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.openloop")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True, help="this process's req/s")
    parser.add_argument("--first-due", type=float, required=True,
                        help="time.monotonic() of the first request")
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--method", default="GET")
    parser.add_argument("--path", default="/hello")
    parser.add_argument("--body-size", type=int, default=0)
    parser.add_argument("--close", action="store_true")
    args = parser.parse_args(argv)
    try:  # wake-ups on time: the default timer slack (50 µs) would show up as lag
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_TIMERSLACK, 1000, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    request = Request(args.method, args.path, args.body_size, args.close)
    gen = Generator(args.host, args.port, request, args.rate, args.first_due, args.duration,
                    args.connections)
    before = resource.getrusage(resource.RUSAGE_SELF)
    gen.run()
    after = resource.getrusage(resource.RUSAGE_SELF)
    report = {
        "counts": dict(gen.counts),
        "user_s": after.ru_utime - before.ru_utime,
        "sys_s": after.ru_stime - before.ru_stime,
        "latency": hdr.encode(hdr.of_values(gen.latency_us)),
        "lag": hdr.encode(hdr.of_values(gen.lag_us)),
    }
    json.dump(report, sys.stdout)


# -- the coordinator ---------------------------------------------------------------------------


@dataclass
class Result:
    latency: hdr.Histogram  # µs from intended send to the last response byte, all processes
    lag: hdr.Histogram  # µs the generators' loops were late noticing a due request
    counts: dict[str, int]
    user_s: float  # the generator processes' CPU seconds in user space, over the schedule
    sys_s: float  # ... and in the kernel
    argv: list[str]  # one process's command line (the first)


def run(host: str, port: int, request: Request, *, rate: float, duration: float, procs: int,
        connections: int, cpu: int | None, on_start: Callable[[], None] = lambda: None,
        on_end: Callable[[], None] = lambda: None, grace_timeout: float = 30.0) -> Result:
    """Send `rate` req/s for `duration` seconds from `procs` processes over `connections`
    connections in all (kept alive unless `request.close`), each process pinned to `cpu`.
    `on_start` is called just before the first request is due, `on_end` when the schedule
    ends (before the last responses are in)."""
    if procs < 1 or connections < procs or rate <= 0:
        raise ValueError("need procs >= 1, connections >= procs and rate > 0")
    start = time.monotonic() + _START_DELAY
    children, argvs = [], []
    for index in range(procs):
        share = connections // procs + (index < connections % procs)
        argv = [
            sys.executable, "-m", "bench.openloop", "--host", host, "--port", str(port),
            "--rate", repr(rate / procs), "--first-due", repr(start + index / rate),
            "--duration", repr(duration), "--connections", str(share),
            "--method", request.method, "--path", request.path,
            "--body-size", str(request.body_size),
        ]
        if request.close:
            argv.append("--close")
        argv = proc.pinned(argv, cpu)
        argvs.append(argv)
        children.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         cwd=_package_root()))
    limit = _START_DELAY + duration + _GRACE + grace_timeout
    try:
        _sleep_until(start - _MARK_AHEAD)
        on_start()
        _sleep_until(start + duration)
        on_end()
    finally:
        reports = proc.gather_json(children, limit)
    latency = hdr.merged(r["latency"] for r in reports)
    lag = hdr.merged(r["lag"] for r in reports)
    counts: collections.Counter[str] = collections.Counter()
    for report in reports:
        counts.update(report["counts"])
    user_s = sum(r["user_s"] for r in reports)
    return Result(latency, lag, dict(counts), user_s, sum(r["sys_s"] for r in reports), argvs[0])


def _sleep_until(moment: float) -> None:
    time.sleep(max(0.0, moment - time.monotonic()))


def _package_root() -> str:
    """The directory holding the `bench` package, so the processes find it from anywhere."""
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


if __name__ == "__main__":
    _generator_main(sys.argv[1:])
