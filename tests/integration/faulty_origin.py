"""A real HTTP/1.1 upstream on 127.0.0.1 that fails on command, for resilience tests.

    origin = FaultyOrigin("a")                     # listening on a free port, all answers 200
    origin.endpoint                                # "127.0.0.1:PORT", for a cluster's endpoints
    origin.set_mode(Fault.ANSWER_503)              # every request from now on
    origin.fail("/pay", Fault.RESET_BEFORE_HEADERS, times=2)   # the next 2 requests to /pay
    origin.set_mode(Fault.SLOW, delay=0.2)         # answer 200 after 200 ms
    origin.set_mode(Fault.REFUSE)                  # stop listening: connects are refused
    origin.heal()                                  # listen again, forget every fault
    origin.count("POST", "/pay")                   # requests that reached it
    origin.requests[0].header("x-foo")             # what one of them carried
    origin.close()

A request is counted once its head and body have been read, before any fault acts on it: a
count is what reached the upstream, which is what "a POST is never replayed" is about. The
answer to a request that is not failed is 200 with `x-origin: NAME` and a JSON body naming
the origin, the method, the path and the request's number at this origin.

Requests are parsed by h11 (a strict server), one thread per connection, keep-alive; faults
that break the connection close it. Every blocking call has a timeout and `close()` ends
every thread.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import struct
import threading
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Self

import h11

HOST = "127.0.0.1"
IO_TIMEOUT = 10.0
POLL = 0.05


class Fault(StrEnum):
    OK = "ok"  # 200 with a JSON body
    REFUSE = "refuse"  # the port stops listening (the whole origin, not one path)
    RESET_BEFORE_HEADERS = "reset-before-headers"  # read the request, then RST
    RESET_AFTER_HEADERS = "reset-after-headers"  # 200 head, part of the body, then RST
    HANG = "hang"  # read the request, answer nothing until the client goes
    ANSWER_503 = "503"  # 503 with a short body, connection kept
    GARBAGE = "garbage"  # bytes that are not HTTP, then close
    SLOW = "slow"  # 200, after `delay` seconds


GARBAGE = b"SSH-2.0-OpenSSH_9.6\r\nthis is not an HTTP response\r\n\r\n"
PROMISED_BODY = 1000  # Content-Length sent by RESET_AFTER_HEADERS, which sends 10 bytes of it


@dataclass
class _Rule:
    fault: Fault
    delay: float = 0.0
    times: int | None = None  # requests left to fail; None: until changed


@dataclass(frozen=True)
class SeenRequest:
    method: str
    path: str
    body_length: int
    headers: tuple[tuple[str, str], ...] = field(default=(), compare=False)  # names lowercased

    def header(self, name: str) -> str | None:
        """The first value of header `name`, or None."""
        name = name.lower()
        return next((v for n, v in self.headers if n == name), None)


class FaultyOrigin:
    def __init__(self, name: str = "origin") -> None:
        self.name = name
        self._lock = threading.Lock()
        self._seen_changed = threading.Condition(self._lock)
        self._seen: list[SeenRequest] = []
        self._mode = _Rule(Fault.OK)
        self._paths: dict[str, _Rule] = {}
        self._closing = threading.Event()
        self._threads: list[threading.Thread] = []
        self._socks: set[socket.socket] = set()
        self.accepted = 0
        # A bound, never-listening socket holds the port while the origin refuses, so that
        # nothing else takes it (both sockets set SO_REUSEPORT).
        self._reserve = _reuseport_socket(0)
        self.address: tuple[str, int] = self._reserve.getsockname()
        self._listener: socket.socket | None = None
        self._listen()

    @property
    def endpoint(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    # -- commands

    def set_mode(self, fault: Fault | str, *, delay: float = 0.0) -> FaultyOrigin:
        """Fail every request (not caught by a path rule) with `fault` from now on."""
        fault = Fault(fault)
        with self._lock:
            self._mode = _Rule(fault, delay)
        if fault is Fault.REFUSE:
            self._stop_listening()
            self._drop_connections()  # as if the server process went away
        else:
            self._listen()
        return self

    def fail(self, path: str, fault: Fault | str, *, times: int | None = None,
             delay: float = 0.0) -> FaultyOrigin:
        """Fail requests to `path` with `fault`: the next `times` of them, or all (None)."""
        fault = Fault(fault)
        if fault is Fault.REFUSE:
            raise ValueError("refusing is for the whole origin: set_mode(Fault.REFUSE)")
        with self._lock:
            self._paths[path] = _Rule(fault, delay, times)
        return self

    def heal(self) -> FaultyOrigin:
        """Listen again and answer every request with 200."""
        with self._lock:
            self._paths.clear()
        return self.set_mode(Fault.OK)

    # -- what it saw

    @property
    def requests(self) -> list[SeenRequest]:
        with self._lock:
            return list(self._seen)

    def count(self, method: str | None = None, path: str | None = None) -> int:
        """Requests received, optionally only those with `method` and/or `path`."""
        return sum(1 for r in self.requests
                   if (method is None or r.method == method) and (path is None or r.path == path))

    @property
    def counts(self) -> Counter[str]:
        """Requests received per method."""
        return Counter(r.method for r in self.requests)

    def wait_requests(self, n: int, timeout: float = 10.0) -> list[SeenRequest]:
        with self._seen_changed:
            if not self._seen_changed.wait_for(lambda: len(self._seen) >= n, timeout):
                raise AssertionError(f"{self.name}: {len(self._seen)} requests after {timeout:g}s, wanted {n}")
            return list(self._seen)

    def forget(self) -> None:
        """Start counting from zero."""
        with self._lock:
            self._seen.clear()

    # -- listening

    def _listen(self) -> None:
        with self._lock:
            if self._listener is not None or self._closing.is_set():
                return
            listener = _reuseport_socket(self.address[1])
            listener.listen(1024)
            listener.settimeout(POLL)
            self._listener = listener
        thread = threading.Thread(target=self._accept, args=(listener,), daemon=True,
                                  name=f"faulty-origin-{self.name}")
        thread.start()
        self._threads.append(thread)

    def _stop_listening(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()

    def _drop_connections(self) -> None:
        with self._lock:
            socks = list(self._socks)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _accept(self, listener: socket.socket) -> None:
        while not self._closing.is_set():
            try:
                sock, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # stopped listening
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(IO_TIMEOUT)
            with self._lock:
                self.accepted += 1
                self._socks.add(sock)
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True,
                                      name=f"faulty-origin-{self.name}-conn")
            thread.start()
            self._threads.append(thread)

    # -- serving

    def _serve(self, sock: socket.socket) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while not self._closing.is_set():
                request = self._read_request(sock, conn)
                if request is None:
                    return
                if not self._answer(sock, conn, request):
                    return
                if conn.our_state is h11.MUST_CLOSE:
                    return
                conn.start_next_cycle()
        except (OSError, h11.ProtocolError):
            return
        finally:
            with self._lock:
                self._socks.discard(sock)
            sock.close()

    def _read_request(self, sock: socket.socket, conn: h11.Connection) -> SeenRequest | None:
        head: h11.Request | None = None
        body = 0
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                response = b"HTTP/1.1 %d Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                sock.sendall(response % exc.error_status_hint)
                return None
            if event is h11.NEED_DATA:
                conn.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += len(event.data)
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                path = head.target.decode("latin-1").split("?", 1)[0]
                headers = tuple((n.decode("latin-1"), v.decode("latin-1")) for n, v in head.headers)
                seen = SeenRequest(head.method.decode("latin-1"), path, body, headers)
                with self._seen_changed:
                    self._seen.append(seen)
                    self._seen_changed.notify_all()
                return seen
            else:  # ConnectionClosed
                return None

    def _rule_for(self, path: str) -> _Rule:
        with self._lock:
            rule = self._paths.get(path)
            if rule is not None and rule.times is not None:
                rule.times -= 1
                if rule.times <= 0:
                    del self._paths[path]
            return rule or self._mode

    def _answer(self, sock: socket.socket, conn: h11.Connection, request: SeenRequest) -> bool:
        """Answer (or fail) one request; False when the connection must end."""
        rule = self._rule_for(request.path)
        fault = rule.fault
        if fault in (Fault.OK, Fault.REFUSE):  # REFUSE: a request that was on its way
            return self._respond(sock, conn, request, 200, self._json(request))
        if fault is Fault.SLOW:
            if not self._sleep(rule.delay):
                return False
            return self._respond(sock, conn, request, 200, self._json(request))
        if fault is Fault.ANSWER_503:
            return self._respond(sock, conn, request, 503, b"unavailable\n")
        if fault is Fault.RESET_BEFORE_HEADERS:
            _reset(sock)
        elif fault is Fault.RESET_AFTER_HEADERS:
            head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % PROMISED_BODY
            sock.sendall(head + b"x" * 10)
            self._sleep(POLL)  # let the head be read before the reset discards it
            _reset(sock)
        elif fault is Fault.GARBAGE:
            sock.sendall(GARBAGE)
        elif fault is Fault.HANG:
            self._wait_for_client_to_leave(sock)
        return False

    def _respond(self, sock: socket.socket, conn: h11.Connection, request: SeenRequest,
                 status: int, body: bytes) -> bool:
        headers = [("content-length", str(len(body))), ("x-origin", self.name)]
        if status == 200:
            headers.append(("content-type", "application/json"))
        events = [h11.Response(status_code=status, headers=headers), h11.EndOfMessage()]
        if request.method != "HEAD":
            events.insert(1, h11.Data(data=body))
        sock.sendall(b"".join(conn.send(event) or b"" for event in events))
        return True

    def _json(self, request: SeenRequest) -> bytes:
        with self._lock:
            number = len(self._seen)
        return json.dumps({"origin": self.name, "method": request.method, "path": request.path,
                           "n": number}).encode()

    def _sleep(self, seconds: float) -> bool:
        """Wait `seconds`; False when the origin is closing meanwhile."""
        return not self._closing.wait(seconds)

    def _wait_for_client_to_leave(self, sock: socket.socket) -> None:
        while not self._closing.is_set():
            readable, _, _ = select.select([sock], [], [], POLL)
            if readable and not sock.recv(65536):
                return

    # -- the end

    def close(self) -> None:
        self._closing.set()
        self._stop_listening()
        self._drop_connections()
        for thread in self._threads:
            thread.join(5)
        self._reserve.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _reuseport_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((HOST, port))
    return sock


def _reset(sock: socket.socket) -> None:
    """Close with an RST: SO_LINGER with a zero timeout. The caller's close() sends it."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

