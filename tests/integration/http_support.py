"""HTTP test helpers: a scriptable HTTP/1.1 origin, raw-socket clients, curl, configs.

The origin (`Origin`) is a threaded server on raw sockets, one thread per connection. It
records every byte it receives on every connection (so a test can say "the upstream got
nothing"), parses each request the way a strict origin would, and answers according to a
behaviour chosen per path (`origin.on("/path", behaviour)`); the default behaviour echoes
the request back as JSON. Behaviours are small functions built by the factories below
(`respond`, `chunked`, `until_close`, `slow_body`, `delay`, `close_before_response`,
`break_mid_body`, `upgrade_echo`, `connect_echo`, `stream`, `raw`, ...).

The client side (`RawClient`, `read_response`) speaks HTTP/1.1 by hand so tests can send
malformed bytes, pipeline, and see exactly how a response was framed and whether the
connection was closed afterwards.

Everything binds 127.0.0.1 and every blocking call has a timeout.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from .support import HOST, free_port

# Request bodies up to this size are kept whole (larger ones are only counted and hashed).
KEEP_BODY = 1 << 20
# Raw bytes kept per origin connection (all of them are counted).
KEEP_RAW = 1 << 20
BLOCK = 1 << 20

Headers = Sequence[tuple[str, str]]


# -- payloads --------------------------------------------------------------------------------


def blocks(size: int, seed: int) -> Iterator[bytes]:
    """`size` bytes in 1 MiB blocks that never repeat: each block is a per-seed random
    block with its own index written over its first 8 bytes (cheap even for 1 GiB)."""
    base = bytearray(random.Random(seed).randbytes(BLOCK))
    sent = 0
    index = 0
    while sent < size:
        base[:8] = index.to_bytes(8, "little")
        n = min(BLOCK, size - sent)
        yield bytes(base[:n])
        sent += n
        index += 1


def blocks_sha256(size: int, seed: int) -> str:
    digest = hashlib.sha256()
    for block in blocks(size, seed):
        digest.update(block)
    return digest.hexdigest()


# -- what the origin saw ---------------------------------------------------------------------


@dataclass
class OriginRequest:
    """One request as the origin parsed it."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    head: bytes  # the raw request head, CRLFs included
    body_length: int = 0
    body_sha256: str = hashlib.sha256(b"").hexdigest()
    body: bytes | None = b""  # None when longer than KEEP_BODY
    chunked: bool = False
    chunk_lines: list[str] = field(default_factory=list)  # chunk-size lines as sent (ext incl.)
    trailers: list[tuple[str, str]] = field(default_factory=list)
    connection: int = 0  # which origin connection (accept order)
    index: int = 0  # the n-th request on that connection

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for n, v in self.headers if n.lower() == name]

    def as_json(self, origin: str) -> dict[str, Any]:
        body = self.body.decode("latin-1") if self.body is not None and len(self.body) <= 65536 else None
        return {
            "origin": origin, "method": self.method, "target": self.target, "version": self.version,
            "headers": self.headers, "head": self.head.decode("latin-1"),
            "body_length": self.body_length, "body_sha256": self.body_sha256, "body": body,
            "chunked": self.chunked, "chunk_lines": self.chunk_lines, "trailers": self.trailers,
            "connection": self.connection, "index": self.index,
        }


class OriginConnection:
    """One connection the origin accepted: every byte it received, its requests."""

    def __init__(self, index: int, sock: socket.socket) -> None:
        self.index = index
        self.sock = sock
        self.peer = sock.getpeername()
        self.received = 0
        self.raw = bytearray()
        self.requests: list[OriginRequest] = []
        self.closed = threading.Event()
        self.closed_idle = False  # closed by the origin's idle timer

    def note(self, data: bytes | memoryview) -> None:
        self.received += len(data)
        room = KEEP_RAW - len(self.raw)
        if room > 0:
            self.raw += data[:room]


class _BadRequest(Exception):
    pass


class _Closed(Exception):
    pass


class Responder:
    """What a behaviour gets: the request, and the connection to answer on."""

    def __init__(self, origin: Origin, conn: OriginConnection, sock: socket.socket,
                 request: OriginRequest, pending: bytearray) -> None:
        self.origin = origin
        self.conn = conn
        self.sock = sock
        self.request = request
        self.pending = pending  # bytes received after this request (a tunnel's first bytes)
        self.close = False  # close the connection once the behaviour returns

    def send(self, data: bytes | memoryview) -> None:
        self.sock.sendall(data)

    def head(self, status: int, headers: Headers = (), reason: str | None = None) -> None:
        self.send(response_head(status, headers, reason))

    def tunnel_echo(self) -> None:
        """Echo raw bytes until the peer's EOF, then close (a tunnel's far end)."""
        if self.pending:
            self.send(bytes(self.pending))
            self.pending.clear()
        buffer = bytearray(262144)
        while True:
            n = self.sock.recv_into(buffer)
            if not n:
                break
            self.conn.note(memoryview(buffer)[:n])
            self.send(memoryview(buffer)[:n])
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        self.close = True


Behaviour = Callable[[Responder], None]


def response_head(status: int, headers: Headers = (), reason: str | None = None) -> bytes:
    if reason is None:
        reason = _REASONS.get(status, "Whatever")
    lines = [f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1")]
    lines += [f"{name}: {value}\r\n".encode("latin-1") for name, value in headers]
    lines.append(b"\r\n")
    return b"".join(lines)


_REASONS = {100: "Continue", 101: "Switching Protocols", 200: "OK", 201: "Created", 204: "No Content",
            304: "Not Modified", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error"}


# -- behaviours ------------------------------------------------------------------------------


def echo(status: int = 200, headers: Headers = ()) -> Behaviour:
    """Answer with the request as JSON (see `OriginRequest.as_json`)."""

    def behave(r: Responder) -> None:
        body = json.dumps(r.request.as_json(r.origin.name)).encode()
        r.send(response_head(status, [("Content-Type", "application/json"),
                                      ("Content-Length", str(len(body))), *headers]) + body)

    return behave


def respond(status: int = 200, body: bytes = b"", headers: Headers = (), *,
            reason: str | None = None, length: bool = True) -> Behaviour:
    """A fixed response; Content-Length added unless `length` is False."""

    def behave(r: Responder) -> None:
        extra = [("Content-Length", str(len(body)))] if length else []
        r.send(response_head(status, [*headers, *extra], reason) + body)

    return behave


def chunked(chunks: Sequence[bytes], trailers: Headers = (), headers: Headers = (),
            extensions: Sequence[str] = ()) -> Behaviour:
    """A chunked response, one chunk per item (each sent separately), then trailers."""

    def behave(r: Responder) -> None:
        r.head(200, [*headers, ("Transfer-Encoding", "chunked")])
        for i, chunk in enumerate(chunks):
            ext = extensions[i] if i < len(extensions) else ""
            r.send(b"%x%s\r\n" % (len(chunk), ext.encode()) + chunk + b"\r\n")
        r.send(b"0\r\n" + b"".join(f"{n}: {v}\r\n".encode() for n, v in trailers) + b"\r\n")

    return behave


def until_close(body: bytes, headers: Headers = ()) -> Behaviour:
    """A response without Content-Length or chunking: the body ends when the origin closes."""

    def behave(r: Responder) -> None:
        r.send(response_head(200, headers) + body)
        with contextlib.suppress(OSError):
            r.sock.shutdown(socket.SHUT_WR)
        r.close = True

    return behave


def raw(data: bytes, *, close: bool = True) -> Behaviour:
    """Send `data` verbatim (malformed responses), then close unless told not to."""

    def behave(r: Responder) -> None:
        r.send(data)
        r.close = close

    return behave


def slow_body(body: bytes, pieces: int, interval: float, headers: Headers = ()) -> Behaviour:
    """Send the head at once, then the body in `pieces` parts `interval` seconds apart."""

    def behave(r: Responder) -> None:
        r.head(200, [*headers, ("Content-Length", str(len(body)))])
        step = -(-len(body) // pieces)
        for offset in range(0, len(body), step):
            time.sleep(interval)
            r.send(body[offset:offset + step])

    return behave


def delay(seconds: float, then: Behaviour | None = None) -> Behaviour:
    """Say nothing for `seconds` (e.g. past a route timeout), then behave like `then`."""
    then = then or echo()

    def behave(r: Responder) -> None:
        # Sleep in slices so a test's origin.close() ends it promptly.
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not r.origin.closing:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
        if r.origin.closing:
            r.close = True
            return
        then(r)

    return behave


def close_before_response(reset: bool = False) -> Behaviour:
    """Read the request, then close without a byte of response (FIN, or RST with `reset`)."""

    def behave(r: Responder) -> None:
        if reset:
            r.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        r.close = True

    return behave


def break_mid_body(total: int, sent: int, *, chunked_body: bool = False, reset: bool = False) -> Behaviour:
    """Promise `total` body bytes (Content-Length, or chunked), send `sent`, close."""

    def behave(r: Responder) -> None:
        payload = b"x" * sent
        if chunked_body:
            r.head(200, [("Transfer-Encoding", "chunked")])
            r.send(b"%x\r\n" % total + payload)  # one chunk, cut short
        else:
            r.head(200, [("Content-Length", str(total))])
            r.send(payload)
        time.sleep(0.05)
        if reset:
            r.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        r.close = True

    return behave


def upgrade_echo(protocol: str = "websocket") -> Behaviour:
    """Answer an Upgrade with 101, then echo raw bytes until EOF."""

    def behave(r: Responder) -> None:
        r.head(101, [("Upgrade", protocol), ("Connection", "Upgrade")])
        r.tunnel_echo()

    return behave


def connect_echo(status: int = 200) -> Behaviour:
    """Answer a CONNECT with `status`; on 2xx, echo raw bytes until EOF."""

    def behave(r: Responder) -> None:
        if 200 <= status < 300:
            r.head(status)
            r.tunnel_echo()
        else:
            r.head(status, [("Content-Length", "0")])

    return behave


def stream(size: int, seed: int, *, chunked_body: bool = False) -> Behaviour:
    """A `size`-byte body generated by `blocks(size, seed)`, never held whole in memory."""

    def behave(r: Responder) -> None:
        if chunked_body:
            r.head(200, [("Transfer-Encoding", "chunked")])
            for block in blocks(size, seed):
                r.send(b"%x\r\n" % len(block) + block + b"\r\n")
            r.send(b"0\r\n\r\n")
        else:
            r.head(200, [("Content-Length", str(size))])
            for block in blocks(size, seed):
                r.send(block)

    return behave


def no_body(status: int, headers: Headers = ()) -> Behaviour:
    """A head only (for HEAD, 204, 304), with whatever framing headers it is given."""

    def behave(r: Responder) -> None:
        r.head(status, headers)

    return behave


# -- the origin ------------------------------------------------------------------------------


class Origin:
    """A scriptable HTTP/1.1 origin on 127.0.0.1 (see the module docstring).

    `idle_close`: close a keep-alive connection after it sat that many seconds without
    a new request (like a server's keep-alive timeout).
    """

    def __init__(self, name: str = "origin", *, idle_close: float | None = None,
                 timeout: float = 30.0) -> None:
        self.name = name
        self.idle_close = idle_close
        self.timeout = timeout
        self.listener = socket.create_server((HOST, 0), backlog=1024)
        self.address: tuple[str, int] = self.listener.getsockname()
        self.default: Behaviour = echo()
        self._routes: dict[str, Behaviour] = {}
        self._lock = threading.Lock()
        self.connections: list[OriginConnection] = []
        self.errors: list[str] = []  # requests the origin itself found malformed
        self.closing = False
        self._threads: list[threading.Thread] = []
        self._request_seen = threading.Condition(self._lock)
        self._requests = 0
        accept = threading.Thread(target=self._accept, name=f"origin-{name}", daemon=True)
        accept.start()
        self._threads.append(accept)

    @property
    def endpoint(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def on(self, key: str, behaviour: Behaviour) -> Origin:
        """Answer requests whose path (the target for CONNECT) is `key` with `behaviour`."""
        self._routes[key] = behaviour
        return self

    # -- what it saw
    @property
    def requests(self) -> list[OriginRequest]:
        with self._lock:
            return [r for c in self.connections for r in c.requests]

    @property
    def request_count(self) -> int:
        with self._lock:
            return self._requests

    @property
    def bytes_received(self) -> int:
        with self._lock:
            return sum(c.received for c in self.connections)

    @property
    def accepted(self) -> int:
        with self._lock:
            return len(self.connections)

    def wait_requests(self, n: int, timeout: float = 10.0) -> list[OriginRequest]:
        with self._request_seen:
            if not self._request_seen.wait_for(lambda: self._requests >= n, timeout):
                raise AssertionError(f"{self.name}: {self._requests} requests after {timeout:g}s, wanted {n}")
        return self.requests

    def reset(self) -> None:
        """Forget what was seen so far (open connections keep counting from zero)."""
        with self._lock:
            for conn in self.connections:
                conn.received = 0
                conn.raw.clear()
                conn.requests.clear()
            self._requests = 0
            self.errors.clear()

    # -- serving
    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self.closing:
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            # Small writes (a head, then a body) must not wait on delayed ACKs.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                conn = OriginConnection(len(self.connections), sock)
                self.connections.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True,
                                      name=f"origin-{self.name}-{conn.index}")
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: OriginConnection) -> None:
        sock = conn.sock
        pending = bytearray()
        try:
            while not self.closing:
                try:
                    request = self._read_request(conn, sock, pending)
                except (_Closed, OSError):
                    return
                except _BadRequest as exc:
                    self.errors.append(str(exc))
                    with contextlib.suppress(OSError):
                        sock.sendall(response_head(400, [("Content-Length", "0"), ("Connection", "close")]))
                    return
                with self._request_seen:
                    conn.requests.append(request)
                    self._requests += 1
                    self._request_seen.notify_all()
                key = request.target if request.method == "CONNECT" else request.path
                behaviour = self._routes.get(key, self.default)
                responder = Responder(self, conn, sock, request, pending)
                try:
                    behaviour(responder)
                except OSError:
                    return
                if responder.close or (request.header("connection") or "").lower() == "close":
                    return
        finally:
            with contextlib.suppress(OSError):
                sock.close()
            conn.closed.set()

    def _recv(self, conn: OriginConnection, sock: socket.socket, pending: bytearray,
              idle: bool = False) -> None:
        """Append what the socket has to `pending`; _Closed at EOF."""
        sock.settimeout(self.idle_close if idle and self.idle_close is not None else self.timeout)
        try:
            data = sock.recv(262144)
        except TimeoutError:
            if idle and self.idle_close is not None:
                conn.closed_idle = True
                raise _Closed() from None
            raise
        if not data:
            raise _Closed()
        conn.note(data)
        pending += data

    def _read_request(self, conn: OriginConnection, sock: socket.socket, pending: bytearray) -> OriginRequest:
        while True:
            end = pending.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(pending) > 1 << 20:
                raise _BadRequest("head larger than 1 MiB")
            self._recv(conn, sock, pending, idle=not pending)
        head = bytes(pending[:end + 4])
        del pending[:end + 4]
        lines = head[:-4].split(b"\r\n")
        parts = lines[0].split(b" ")
        if len(parts) != 3:
            raise _BadRequest(f"bad request line {lines[0]!r}")
        headers = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                raise _BadRequest(f"bad header line {line!r}")
            headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
        request = OriginRequest(method=parts[0].decode("latin-1"), target=parts[1].decode("latin-1"),
                                version=parts[2].decode("latin-1"), headers=headers, head=head,
                                connection=conn.index, index=len(conn.requests))
        te = request.header_all("transfer-encoding")
        cl = request.header_all("content-length")
        if te and cl:
            raise _BadRequest("both Transfer-Encoding and Content-Length")
        if te:
            if te[-1].lower().replace(" ", "").split(",")[-1] != "chunked":
                raise _BadRequest(f"bad Transfer-Encoding {te!r}")
            request.chunked = True
            self._read_chunked(conn, sock, pending, request)
        elif cl:
            if len(cl) > 1 or not cl[0].isdigit():
                raise _BadRequest(f"bad Content-Length {cl!r}")
            self._read_length(conn, sock, pending, request, int(cl[0]))
        return request

    def _body_sink(self, request: OriginRequest) -> tuple[Callable[[bytes | memoryview], None], Callable[[], None]]:
        digest = hashlib.sha256()
        kept = bytearray()
        state = {"n": 0, "keep": True}

        def add(data: bytes | memoryview) -> None:
            digest.update(data)
            state["n"] += len(data)
            if state["keep"]:
                if state["n"] > KEEP_BODY:
                    state["keep"] = False
                    kept.clear()
                else:
                    kept.extend(data)

        def done() -> None:
            request.body_length = state["n"]
            request.body_sha256 = digest.hexdigest()
            request.body = bytes(kept) if state["keep"] else None

        return add, done

    def _read_length(self, conn: OriginConnection, sock: socket.socket, pending: bytearray,
                     request: OriginRequest, length: int) -> None:
        add, done = self._body_sink(request)
        take = min(len(pending), length)
        add(bytes(pending[:take]))
        del pending[:take]
        left = length - take
        buffer = bytearray(BLOCK)
        view = memoryview(buffer)
        sock.settimeout(self.timeout)
        while left:
            n = sock.recv_into(view[:min(left, BLOCK)])
            if not n:
                raise _Closed()
            conn.note(view[:n])
            add(view[:n])
            left -= n
        done()

    def _line(self, conn: OriginConnection, sock: socket.socket, pending: bytearray) -> bytes:
        while True:
            end = pending.find(b"\r\n")
            if end >= 0:
                line = bytes(pending[:end])
                del pending[:end + 2]
                return line
            if len(pending) > 65536:
                raise _BadRequest("line too long in chunked body")
            self._recv(conn, sock, pending)

    def _read_chunked(self, conn: OriginConnection, sock: socket.socket, pending: bytearray,
                      request: OriginRequest) -> None:
        add, done = self._body_sink(request)
        buffer = bytearray(BLOCK)
        view = memoryview(buffer)
        while True:
            line = self._line(conn, sock, pending)
            request.chunk_lines.append(line.decode("latin-1"))
            size_text = line.split(b";", 1)[0].strip(b" \t")
            try:
                size = int(size_text, 16)
            except ValueError:
                raise _BadRequest(f"bad chunk size line {line!r}") from None
            if size == 0:
                break
            take = min(len(pending), size)
            add(bytes(pending[:take]))
            del pending[:take]
            left = size - take
            sock.settimeout(self.timeout)
            while left:
                n = sock.recv_into(view[:min(left, BLOCK)])
                if not n:
                    raise _Closed()
                conn.note(view[:n])
                add(view[:n])
                left -= n
            if self._line(conn, sock, pending) != b"":
                raise _BadRequest("chunk data not followed by CRLF")
        while True:
            line = self._line(conn, sock, pending)
            if not line:
                break
            name, _, value = line.partition(b":")
            request.trailers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
        done()

    def close(self) -> None:
        self.closing = True
        with contextlib.suppress(OSError):
            self.listener.close()
        with self._lock:
            conns = list(self.connections)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                conn.sock.close()
        for thread in self._threads:
            thread.join(2)


class Origins:
    """Factory for the origins of one test (the `origins` fixture); all closed at teardown."""

    def __init__(self) -> None:
        self._origins: list[Origin] = []

    def __call__(self, name: str = "origin", **options: Any) -> Origin:
        origin = Origin(name, **options)
        self._origins.append(origin)
        return origin

    def close(self) -> None:
        for origin in self._origins:
            origin.close()


# -- the client side -------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    reason: str
    version: str
    headers: list[tuple[str, str]]
    head: bytes
    body: bytes = b""
    trailers: list[tuple[str, str]] = field(default_factory=list)
    complete: bool = True  # False when the connection ended before the framing said so
    chunk_lines: list[bytes] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for n, v in self.headers if n.lower() == name]

    def json(self) -> dict[str, Any]:
        return json.loads(self.body)

    @property
    def error_code(self) -> str | None:
        return self.header("x-meshproxy-error")

    @property
    def closes(self) -> bool:
        return any(o.strip().lower() == "close" for v in self.header_all("connection") for o in v.split(","))


class ConnectionEnded(AssertionError):
    """The server closed (or reset) the connection before a complete response head."""

    def __init__(self, how: str, received: bytes) -> None:
        super().__init__(f"connection ended ({how}) after {len(received)} bytes of a response: {received[:200]!r}")
        self.how = how
        self.received = received


class RawClient:
    """One client connection driven by hand: send bytes, read responses one by one."""

    def __init__(self, address: tuple[str, int], timeout: float = 10.0, *, source: str | None = None) -> None:
        self.address = address
        # `source`: another loopback address (127.0.0.0/8) to connect from.
        self.sock = socket.create_connection(address, timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.timeout = timeout
        self.buffer = bytearray()
        self.eof: str | None = None  # "eof" or "reset" once the server closed

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, method: str = "GET", target: str = "/", headers: Headers = (),
                body: bytes | None = None, host: str | None = "example.com",
                version: str = "HTTP/1.1") -> None:
        self.send(build_request(method, target, headers, body, host=host, version=version))

    def _fill(self) -> bool:
        """Read more into the buffer; False at EOF/reset."""
        if self.eof:
            return False
        try:
            data = self.sock.recv(1 << 20)
        except ConnectionResetError:
            self.eof = "reset"
            return False
        if not data:
            self.eof = "eof"
            return False
        self.buffer += data
        return True

    def read_head(self) -> Response:
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end >= 0:
                break
            if not self._fill():
                raise ConnectionEnded(self.eof or "?", bytes(self.buffer))
        head = bytes(self.buffer[:end + 4])
        del self.buffer[:end + 4]
        lines = head[:-4].split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        code, _, reason = rest.partition(b" ")
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
        return Response(status=int(code), reason=reason.decode("latin-1"), version=version.decode(),
                        headers=headers, head=head)

    def take(self, n: int) -> tuple[bytes, bool]:
        """The next `n` bytes, and whether all of them came (False: the connection ended)."""
        while len(self.buffer) < n:
            if not self._fill():
                data = bytes(self.buffer)
                self.buffer.clear()
                return data, False
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data, True

    def _line(self) -> bytes | None:
        while True:
            end = self.buffer.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buffer[:end])
                del self.buffer[:end + 2]
                return line
            if not self._fill():
                return None

    def read_response(self, method: str = "GET", *, interim: bool = False) -> Response:
        """The next response (1xx skipped unless `interim`); body framed per RFC 9112 6.3."""
        while True:
            response = self.read_head()
            if 100 <= response.status < 200 and response.status != 101 and not interim:
                continue
            break
        if (method == "HEAD" or response.status < 200 or response.status in (204, 304)
                or (method == "CONNECT" and 200 <= response.status < 300)):
            return response
        te = response.header("transfer-encoding")
        cl = response.header("content-length")
        if te is not None and "chunked" in te.lower():
            self._read_chunked(response)
        elif cl is not None:
            response.body, response.complete = self.take(int(cl))
        else:
            while self._fill():
                pass
            response.body = bytes(self.buffer)
            self.buffer.clear()
        return response

    def _read_chunked(self, response: Response) -> None:
        body = bytearray()
        while True:
            line = self._line()
            if line is None:
                response.body, response.complete = bytes(body + self.buffer), False
                self.buffer.clear()
                return
            response.chunk_lines.append(line)
            size = int(line.split(b";", 1)[0], 16)
            if size == 0:
                break
            data, ok = self.take(size)
            body += data
            if not ok or self.take(2)[0] != b"\r\n":
                response.body, response.complete = bytes(body), False
                return
        while True:
            line = self._line()
            if line is None:
                response.body, response.complete = bytes(body), False
                return
            if not line:
                break
            name, _, value = line.partition(b":")
            response.trailers.append((name.decode("latin-1"), value.strip(b" \t").decode("latin-1")))
        response.body = bytes(body)

    def wait_closed(self, timeout: float = 5.0) -> str:
        """Wait for the server to close: "eof" or "reset"; bytes that arrive meanwhile are
        kept in the buffer. Fails if the connection is still open after `timeout`."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"connection still open after {timeout:g}s")
            self.sock.settimeout(left)
            try:
                self._fill()
            except TimeoutError:
                continue
            finally:
                self.sock.settimeout(self.timeout)
        return self.eof

    def is_open(self, wait: float = 0.05) -> bool:
        """True when, after `wait` seconds, the server has neither closed nor sent anything."""
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(65536, socket.MSG_PEEK)
        except TimeoutError:
            return True
        except ConnectionResetError:
            return False
        finally:
            self.sock.settimeout(self.timeout)
        return bool(data)  # b"" is the server's EOF; bytes waiting mean it is still there

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_request(method: str = "GET", target: str = "/", headers: Headers = (), body: bytes | None = None,
                  *, host: str | None = "example.com", version: str = "HTTP/1.1") -> bytes:
    """A well-formed request; Content-Length is added for a body unless a framing header is given."""
    lines = [f"{method} {target} {version}\r\n".encode("latin-1")]
    if host is not None:
        lines.append(f"Host: {host}\r\n".encode("latin-1"))
    names = {n.lower() for n, _ in headers}
    lines += [f"{n}: {v}\r\n".encode("latin-1") for n, v in headers]
    if body is not None and not names & {"content-length", "transfer-encoding"}:
        lines.append(b"Content-Length: %d\r\n" % len(body))
    lines.append(b"\r\n")
    return b"".join(lines) + (body or b"")


def request(address: tuple[str, int], method: str = "GET", target: str = "/", headers: Headers = (),
            body: bytes | None = None, *, host: str | None = "example.com", timeout: float = 10.0,
            source: str | None = None) -> Response:
    """One request on a fresh connection."""
    with RawClient(address, timeout, source=source) as client:
        client.request(method, target, headers, body, host=host)
        return client.read_response(method)


# -- curl ------------------------------------------------------------------------------------


def curl(*args: str, timeout: float = 60.0, stdin: Any = subprocess.DEVNULL) -> subprocess.CompletedProcess[bytes]:
    """Run curl (never using a proxy from the environment) and return the completed process."""
    return subprocess.run(
        ["curl", "--silent", "--show-error", "--noproxy", "*", "--max-time", str(int(timeout)), *args],
        capture_output=True, timeout=timeout + 10, stdin=stdin, check=False,
    )


def curl_sha256(*args: str, timeout: float = 120.0) -> tuple[int, str, bytes]:
    """Run curl with the body on stdout, hashing it as it streams: (bytes, sha256, stderr)."""
    process = subprocess.Popen(
        ["curl", "--silent", "--show-error", "--noproxy", "*", "--max-time", str(int(timeout)),
         "--output", "-", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
    )
    digest = hashlib.sha256()
    total = 0
    try:
        assert process.stdout is not None
        while True:
            chunk = process.stdout.read(BLOCK)
            if not chunk:
                break
            digest.update(chunk)
            total += len(chunk)
        process.wait(timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
    stderr = process.stderr.read() if process.stderr else b""
    if process.returncode != 0:
        raise AssertionError(f"curl exited {process.returncode}: {stderr.decode(errors='replace')}")
    return total, digest.hexdigest(), stderr


# -- configs ---------------------------------------------------------------------------------


def route(name: str, cluster: str | None = None, *, split: Sequence[tuple[str, int]] = (),
          timeout: str | None = None, **match: Any) -> dict[str, Any]:
    """A route entry: `route("api", "v1", prefix="/api")`, or with split=[("v2", 10), ("v1", 90)]."""
    entry: dict[str, Any] = {"name": name, "match": match or {"prefix": "/"}}
    if split:
        entry["split"] = [{"cluster": c, "weight": w} for c, w in split]
    else:
        entry["cluster"] = cluster
    if timeout is not None:
        entry["timeout"] = timeout
    return entry


def cluster(name: str, endpoints: Iterable[Any], **fields: Any) -> dict[str, Any]:
    """A cluster entry; endpoints are Origins, "host:port" strings or {address, weight} dicts."""
    out = []
    for e in endpoints:
        if isinstance(e, Origin):
            out.append(e.endpoint)
        elif isinstance(e, tuple):
            out.append(f"{e[0]}:{e[1]}")
        else:
            out.append(e)
    return {"name": name, "endpoints": out, **fields}


def http_config(routes: Sequence[dict[str, Any]], clusters: Sequence[dict[str, Any]], *,
                workers: int = 1, **listener: Any) -> dict[str, Any]:
    """A config with one http listener named `in`."""
    return {
        "node": {"id": "test"},
        "workers": workers,
        "listeners": [{"name": "in", "address": f"{HOST}:{free_port()}", "protocol": "http",
                       "routes": list(routes), **listener}],
        "clusters": list(clusters),
    }


def simple_config(origin: Origin, *, workers: int = 1, **listener: Any) -> dict[str, Any]:
    """Everything to one origin."""
    return http_config([route("all", "up")], [cluster("up", [origin])], workers=workers, **listener)


def start_shared_proxy(config: dict[str, Any], directory: Path) -> Any:
    """A meshproxy for a whole module (the `meshproxy` fixture is per test). The caller
    kills it (`.kill()`) at teardown."""
    import yaml
    from conftest import (
        MeshProxy,  # tests/conftest.py, importable as the rootdir conftest
    )

    config = dict(config)
    config.setdefault("admin", {"address": f"{HOST}:{free_port()}"})
    path = directory / "meshproxy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    proxy = MeshProxy(config, path, directory / "meshproxy.log")
    try:
        proxy.wait_ready(workers=config.get("workers", 1))
    except BaseException:
        proxy.kill()
        raise
    return proxy


# -- /proc -----------------------------------------------------------------------------------


def vm_rss(pid: int) -> int:
    """Resident set size of a process in bytes (VmRSS in /proc/PID/status)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as file:
        for line in file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class RssWatch:
    """Samples a process's RSS in a thread; `peak` is the highest seen."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.start = vm_rss(pid)
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            with contextlib.suppress(OSError, AssertionError):
                self.peak = max(self.peak, vm_rss(self.pid))

    def stop(self) -> int:
        """Stop sampling; returns the growth (peak - start) in bytes."""
        self._stop.set()
        self._thread.join(2)
        return self.peak - self.start
