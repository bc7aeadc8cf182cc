"""HTTP/1.1 clients to `protocol: http2` clusters: one request as one upstream HTTP/2 stream.

The request head becomes an HTTP/2 header list (RFC 9113 §8.2.2: hop-by-hop fields dropped,
names lowercased, Host as `:authority`). A body streams as DATA under the upstream's flow
control; a chunked body's trailer section becomes trailing HEADERS. The response comes back
as HTTP/1.1: with its content-length when the upstream gave one, chunked otherwise, with the
upstream's trailers in the chunked trailer section. Errors before the response head went out
are the caller's to answer (`UpstreamFailed`); after it, the client connection is closed.

Picking the endpoint, connect failover and the endpoint accounting are the caller's
(`Http1Proxy`), as for HTTP/1 upstreams.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

import trio

from .._core.h2msg import check_field
from .._core.http1 import ChunkedScanner, ProtocolError, RequestHead
from .._core.iobuf import RecvBuffer
from ..upstream.h2pool import H2StreamError
from .h2codec import CONNECTION_SPECIFIC, TrailerDecoder, h2_trailers
from .local_reply import reason_phrase

if TYPE_CHECKING:
    from ..upstream.h2pool import H2ClientStream

# What a proxy sets itself, or what has no meaning in HTTP/2 (RFC 9113 §8.2.2).
_DROPPED = CONNECTION_SPECIFIC | {b"host", b"te", b"expect", b"content-length", b"x-forwarded-for",
                                  b"x-forwarded-proto", b"x-forwarded-client-cert", b"trailer"}
_PIECE = 65536  # request body bytes read from the client at a time
# Fields a trailer section may not carry (RFC 9110 §6.5.1).
_NOT_TRAILERS = CONNECTION_SPECIFIC | {b"content-length", b"host", b"te", b"trailer"}


class ClientGone(Exception):
    """The client closed or broke its connection mid-request."""


def h2_headers_of(head: RequestHead, extra: list[tuple[bytes, bytes]],
                  drop: Iterable[bytes] = ()) -> list[tuple[bytes, bytes]]:
    """An HTTP/1.1 request head as an HTTP/2 request header list without the fields
    named in `drop` (lowercase), `extra` appended."""
    out = [(b":method", head.method), (b":scheme", b"http"), (b":path", _path_of(head.target))]
    if head.host:
        out.append((b":authority", head.host))
    if head.content_length >= 0 and not head.chunked:
        out.append((b"content-length", b"%d" % head.content_length))
    drop = _DROPPED.union(drop)
    connection = head.get(b"connection")
    if connection is not None:
        drop = drop | {option.strip().lower() for option in connection.split(b",")}
    for name, value in head.headers:
        lower = name.lower()
        if lower not in drop:
            out.append((lower, value))
    if (head.get(b"te") or b"").lower() == b"trailers":
        out.append((b"te", b"trailers"))
    out += extra
    return out


def _path_of(target: bytes) -> bytes:
    """`:path` for a request target: the target itself in origin form (and `*`), the part
    from the path on in absolute form."""
    if target[:1] == b"/" or target == b"*":
        return target
    start = target.find(b"://")
    slash = target.find(b"/", start + 3) if start >= 0 else -1
    return target[slash:] if slash >= 0 else b"/"


def response_head(status: int, fields: list[tuple[bytes, bytes]], chunked: bool, close: bool) -> bytes:
    """An HTTP/2 response's status and fields as an HTTP/1.1 response head."""
    out = [b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status))]
    for name, value in fields:
        out += (name, b": ", value, b"\r\n")
    if chunked:
        out.append(b"transfer-encoding: chunked\r\n")
    if close:
        out.append(b"connection: close\r\n")
    out.append(b"\r\n")
    return b"".join(out)


async def send_request_body(stream: H2ClientStream, fd: int, buf: RecvBuffer, first: bytes,
                            scanner: ChunkedScanner | None, remaining: int, idle: float) -> None:
    """Send the request body on `stream`, ending the stream: `first`, the body bytes that
    came with the head (raw chunked framing, already checked by `scanner`, for a chunked
    body), then the rest as the client sends it (`remaining` bytes of a body with a
    length). ProtocolError for bad chunked framing, ClientGone when the client stops."""
    if scanner is not None:
        decoder = TrailerDecoder()
        data = decoder.feed(first)
        while not scanner.done:
            if data:
                await stream.send_data(data, False, idle)
            await _recv_more(fd, buf, idle)
            count = scanner.scan(buf.data, buf.start, buf.end)
            data = decoder.feed(buf.take(count)) if count else b""
        trailers = h2_trailers(decoder.trailers)
        if trailers:
            if data:
                await stream.send_data(data, False, idle)
            stream.send_trailers(trailers)
        else:
            await stream.send_data(data, True, idle)
        return
    piece = first
    while True:
        if piece or not remaining:
            await stream.send_data(piece, not remaining, idle)
        if not remaining:
            return
        if not len(buf):
            await _recv_more(fd, buf, idle)
        piece = buf.take(min(len(buf), remaining, _PIECE))
        remaining -= len(piece)


async def send_response_body(stream: H2ClientStream, write: Callable[[bytes], Awaitable[object]], chunked: bool,
                             idle: float) -> None:
    """Pass the response body (and, chunked, the trailers) on to the client with `write`."""
    while True:
        piece = None
        with trio.move_on_after(idle) as wait:
            piece = await stream.receive()
        if wait.cancelled_caught:
            raise TimeoutError(f"upstream sent nothing for {idle:g}s")
        if piece is None:
            break
        if piece:
            await write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        stream.ack(len(piece))
    if chunked:
        trailers = stream.trailers or ()
        for name, value in trailers:
            if check_field(name, value) is not None or name in _NOT_TRAILERS:
                # Never written into the client's connection as it came (no field may
                # smuggle a line break): the response ends here, unfinished.
                raise H2StreamError(f"upstream sent a bad trailer field {name[:64]!r}")
        trailer = b"".join(b"%s: %s\r\n" % field for field in trailers)
        await write(b"0\r\n" + trailer + b"\r\n")


async def _recv_more(fd: int, buf: RecvBuffer, idle: float) -> None:
    while True:
        try:
            n = buf.recv(fd)
        except OSError as exc:
            raise ClientGone(str(exc)) from exc
        if n > 0:
            return
        if n == 0:
            raise ClientGone("client closed mid-body")
        if n == -2:
            raise ProtocolError("request body framing over the buffer", 400, "bad_request")
        with trio.move_on_after(idle) as wait:
            await trio.lowlevel.wait_readable(fd)
        if wait.cancelled_caught:
            raise ClientGone(f"client sent nothing for {idle:g}s")
