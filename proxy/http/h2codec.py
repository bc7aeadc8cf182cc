"""HTTP/2 ⇄ HTTP/1.1 translation and the inbound frame watch, sans-IO.

The server's frames, HPACK and stream states are `_core.h2conn`; its request checks
(RFC 9113 §8) and the HTTP/1.1 request head are `_core.h2msg`. This module holds the
rest of what meshproxy does around them, all pure (bytes and values in, values out):

- `is_h2_preface`: tells a prior-knowledge HTTP/2 client from an HTTP/1 one by the
  connection preface, deciding as soon as the bytes allow (HTTP/1 requests never start
  with "PRI *", so an HTTP/1 client is told apart on its first bytes and never stalls).
- `parse_trailers`: a request's trailer section checked like its fields.
- `h2_request_headers`: a request as sent to an HTTP/2 upstream.
- `h2_trailers`: a chunked body's trailer section as HTTP/2 trailers (the head's
  counterpart, `h2_response_headers`, is in `_core.h2msg`).
- `TrailerDecoder`: the data and the trailer fields out of a chunked body whose framing
  `ChunkedScanner` checked.
- gRPC: `parse_grpc_timeout`, `grpc_status_for`, `grpc_error_headers` (a trailers-only
  response carrying a proxy-made error).
- `GoawayTap`: takes GOAWAY frames out of an upstream's byte stream before h2's state
  machine (the upstream side's) sees them, so that a peer's graceful GOAWAY does not stop
  the streams still open (h2 closes its whole state machine on one).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .._core.h2msg import (
    CONNECTION_SPECIFIC,
    FIELD_OVERHEAD,
    REPLACED,
    H2Request,
    MalformedRequest,
    check_field,
    h2_response_headers,
)
from .._core.http1 import Limits, parse_response
from .local_reply import local_reply

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# RFC 9113 error codes (what RST_STREAM and GOAWAY carry).
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
STREAM_CLOSED = 0x5
REFUSED_STREAM = 0x7
CANCEL = 0x8
ENHANCE_YOUR_CALM = 0xB


def is_h2_preface(data: bytes | bytearray | memoryview) -> bool | None:
    """True when `data` starts with the HTTP/2 connection preface, False when it cannot,
    None while it is a proper prefix of it (read more; only a client that speaks HTTP/2
    gets here: no HTTP/1 method starts with "PRI")."""
    n = min(len(data), len(PREFACE))
    if bytes(data[:n]) != PREFACE[:n]:
        return False
    return True if n == len(PREFACE) else None


@dataclass(frozen=True)
class H2Limits:
    """Bounds on one HTTP/2 connection (Envoy's protections as the reference)."""

    max_concurrent_streams: int = 100  # advertised; one more is refused (REFUSED_STREAM)
    max_header_list_size: int = 65536  # advertised; HPACK fails the connection past it
    stream_window: int = 256 * 1024  # request body bytes a stream may have in flight
    connection_window: int = 1024 * 1024  # ... and all streams of a connection together
    max_header_block: int = 81920  # compressed bytes of one HEADERS+CONTINUATION block
    max_continuations: int = 32  # CONTINUATION frames in one header block
    flood_window: float = 1.0  # seconds over which the frame counts below hold
    max_settings: int = 100  # SETTINGS frames per window
    max_pings: int = 100  # PING frames per window
    max_priority: int = 1000  # PRIORITY frames per window
    max_window_updates: int = 10000  # WINDOW_UPDATE frames per window
    max_empty_frames: int = 16  # consecutive DATA/HEADERS/CONTINUATION frames with nothing in them
    reset_window: float = 10.0  # seconds over which rapid reset is judged
    reset_min_streams: int = 100  # resets in a window before the ratio is looked at
    reset_ratio: float = 0.5  # resets per stream opened over which the client is cut off
    outbound_cap: int = 1024 * 1024  # bytes queued for the peer before reading and sending pause
    write_stall_timeout: float = 30.0  # the peer reads nothing for this long: close
    header_timeout: float = 10.0  # a header block started and not finished
    idle_timeout: float = 300.0  # no stream open and no frame
    stream_idle_timeout: float = 300.0  # a stream that makes no progress
    drain_timeout: float = 5.0  # after a final GOAWAY, how long streams may still finish


# -- requests ---------------------------------------------------------------------------------


def _check_field(name: bytes, value: bytes) -> None:
    reason = check_field(name, value)
    if reason is not None:
        raise MalformedRequest(reason)


def parse_trailers(headers: list[tuple[bytes, bytes]], max_list_size: int = 61440,
                   max_fields: int = 100) -> list[tuple[bytes, bytes]]:
    """Check a request's trailer fields (no pseudo-headers, the same rules as fields);
    MalformedRequest when they must be refused."""
    size = 0
    for name, value in headers:
        size += len(name) + len(value) + FIELD_OVERHEAD
        if name[:1] == b":":
            raise MalformedRequest("pseudo-header in trailers")
        _check_field(name, value)
        if name in CONNECTION_SPECIFIC or name in (b"te", b"content-length", b"host"):
            raise MalformedRequest(f"{name.decode()!r} in trailers")
    if len(headers) > max_fields or size > max_list_size:
        raise MalformedRequest("trailers over the header limits")
    return headers


def h2_request_headers(request: H2Request, extra: list[tuple[bytes, bytes]],
                       scheme: bytes = b"http", drop: tuple[bytes, ...] = ()) -> list[tuple[bytes, bytes]]:
    """`request` as the header list of an upstream HTTP/2 request, without the fields
    named in `drop` (the client's trace context, when ours replaces it)."""
    out = [(b":method", request.method), (b":scheme", scheme), (b":path", request.path)]
    if request.authority is not None:
        out.append((b":authority", request.authority))
    if request.content_length >= 0:
        out.append((b"content-length", b"%d" % request.content_length))
    for field in request.fields:
        name = field[0]
        if name in REPLACED and name != b"cookie" or name in drop:
            continue
        out.append(field)
    if request.grpc:
        out.append((b"te", b"trailers"))
    out += extra
    return out


def h2_trailers(fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """A chunked body's trailer fields as HTTP/2 trailers (hop-by-hop and framing fields
    dropped, as `h2_response_headers` drops them from a head)."""
    return [(n, v) for n, v in h2_response_headers(200, fields)[1:] if n != b"content-length"]


def h2_response_from_upstream(headers: list[tuple[bytes, bytes]]) -> tuple[int, list[tuple[bytes, bytes]]]:
    """An upstream HTTP/2 response's status and its regular fields, checked the way a
    request's are; ValueError when it is malformed."""
    status = -1
    out = []
    regular = False
    for name, value in headers:
        if name == b":status":
            if regular or status >= 0 or len(value) != 3 or not value.isdigit():
                raise ValueError("invalid :status")
            status = int(value)
            continue
        if name[:1] == b":":
            raise ValueError(f"unexpected pseudo-header {name[:64]!r}")
        regular = True
        try:
            _check_field(name, value)
        except MalformedRequest as exc:
            raise ValueError(str(exc)) from None
        if name in CONNECTION_SPECIFIC:
            raise ValueError(f"connection-specific field {name.decode()!r}")
        out.append((name, value))
    if status < 100:
        raise ValueError("missing :status")
    return status, out


def h2_local_reply(status: int, code: str, detail: str = "",
                   request_id: bytes | None = None) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """A proxy-made reply as HTTP/2 headers and body: the same fields and text as the
    HTTP/1 one (`local_reply`), so both protocols say the same thing."""
    raw = local_reply(status, code, detail, request_id=request_id)
    head = parse_response(raw, 0, len(raw), _REPLY_LIMITS, b"GET")
    assert head is not None  # we made it
    return h2_response_headers(head.status, head.headers), raw[head.size:]


_REPLY_LIMITS = Limits()


class TrailerDecoder:
    """The data of a chunked body and its trailer fields. The input is framing that
    `ChunkedScanner` already checked, so this only finds the boundaries."""

    __slots__ = ("_left", "_line", "_state", "trailers")

    _SIZE, _DATA, _DATA_END, _TRAILER, _DONE = range(5)

    def __init__(self) -> None:
        self._state = self._SIZE
        self._line = bytearray()
        self._left = 0
        self.trailers: list[tuple[bytes, bytes]] = []

    @property
    def done(self) -> bool:
        return self._state == self._DONE

    def feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        i, end = 0, len(data)
        while i < end and self._state != self._DONE:
            state = self._state
            if state == self._DATA:
                take = min(self._left, end - i)
                out.append(data[i:i + take])
                i += take
                self._left -= take
                if not self._left:
                    self._state, self._left = self._DATA_END, 2
            elif state == self._DATA_END:
                skip = min(self._left, end - i)
                i += skip
                self._left -= skip
                if not self._left:
                    self._state = self._SIZE
            else:
                newline = data.find(b"\n", i)
                if newline < 0:
                    self._line += data[i:]
                    break
                self._line += data[i:newline + 1]
                i = newline + 1
                line = bytes(self._line).rstrip(b"\r\n")
                self._line.clear()
                if state == self._TRAILER:
                    if not line:
                        self._state = self._DONE
                    else:
                        name, _, value = line.partition(b":")
                        self.trailers.append((name.strip().lower(), value.strip(b" \t")))
                    continue
                size = int(line.split(b";", 1)[0].strip(b" \t"), 16)
                if size:
                    self._state, self._left = self._DATA, size
                else:
                    self._state = self._TRAILER
        return out[0] if len(out) == 1 else b"".join(out)


# -- gRPC ------------------------------------------------------------------------------------

GRPC_OK = 0
GRPC_CANCELLED = 1
GRPC_UNKNOWN = 2
GRPC_INVALID_ARGUMENT = 3
GRPC_DEADLINE_EXCEEDED = 4
GRPC_PERMISSION_DENIED = 7
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_UNIMPLEMENTED = 12
GRPC_INTERNAL = 13
GRPC_UNAVAILABLE = 14
GRPC_UNAUTHENTICATED = 16

_GRPC_BY_CODE = {
    "no_route": GRPC_UNIMPLEMENTED,
    "upstream_timeout": GRPC_DEADLINE_EXCEEDED,
    "connect_timeout": GRPC_UNAVAILABLE,
    "rate_limited": GRPC_UNAVAILABLE,
    "h2_connect_unsupported": GRPC_UNIMPLEMENTED,
    "headers_too_large": GRPC_INTERNAL,
}
# gRPC's HTTP-to-status mapping (doc/http-grpc-status-mapping.md).
_GRPC_BY_STATUS = {400: GRPC_INTERNAL, 401: GRPC_UNAUTHENTICATED, 403: GRPC_PERMISSION_DENIED,
                   404: GRPC_UNIMPLEMENTED, 429: GRPC_UNAVAILABLE, 502: GRPC_UNAVAILABLE,
                   503: GRPC_UNAVAILABLE, 504: GRPC_DEADLINE_EXCEEDED}

_GRPC_UNITS = {0x48: 3600.0, 0x4D: 60.0, 0x53: 1.0, 0x6D: 1e-3, 0x75: 1e-6, 0x6E: 1e-9}  # H M S m u n


def parse_grpc_timeout(value: bytes | None) -> float | None:
    """`grpc-timeout` ("100m", "5S": 1 to 8 digits and a unit) in seconds; None when absent
    or not in that form."""
    if not value or len(value) < 2 or len(value) > 9:
        return None
    digits, unit = value[:-1], value[-1]
    scale = _GRPC_UNITS.get(unit)
    if scale is None or not digits.isdigit():
        return None
    return int(digits) * scale


def grpc_status_for(status: int, code: str) -> int:
    """The gRPC status of a proxy-made error with this HTTP status and error code."""
    by_code = _GRPC_BY_CODE.get(code)
    if by_code is not None:
        return by_code
    if 500 <= status < 600:
        return _GRPC_BY_STATUS.get(status, GRPC_UNAVAILABLE)
    return _GRPC_BY_STATUS.get(status, GRPC_UNKNOWN)


def _percent_encode(text: str) -> bytes:
    """grpc-message encoding: printable ASCII except '%' as is, the rest %XX (of UTF-8)."""
    out = bytearray()
    for byte in text.encode():
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def grpc_error_headers(status: int, code: str, detail: str = "",
                       request_id: bytes | None = None) -> list[tuple[bytes, bytes]]:
    """A trailers-only gRPC response (one HEADERS frame, END_STREAM) for a proxy-made
    error: HTTP 200, `grpc-status` and `grpc-message`, and the `x-meshproxy-error` code."""
    message = detail or f"meshproxy: {code.replace('_', ' ')} ({status})"
    out = [(b":status", b"200"), (b"content-type", b"application/grpc"),
           (b"grpc-status", b"%d" % grpc_status_for(status, code)),
           (b"grpc-message", _percent_encode(message)), (b"x-meshproxy-error", code.encode())]
    if request_id:
        out.append((b"x-request-id", request_id))
    return out


# -- GOAWAY out of an upstream's byte stream --------------------------------------------------

_GOAWAY = 7
_FRAME_HEADER = struct.Struct(">HBBBL")  # length as 16 + 8 bits, type, flags, stream id
_GOAWAY_KEEP = 1024  # of a GOAWAY's payload: ids, code and the start of its debug data


class GoawayTap:
    """Follows a peer's frames through the byte stream, before h2 parses them.

    `feed(data)` returns the bytes h2 should see: `data` itself, unless GOAWAY frames were
    in it, which are taken out and reported in `goaways` as (last stream id, error code,
    debug data).
    """

    def __init__(self, preface: int = 0) -> None:
        self._skip = preface  # bytes to pass without looking (a client preface)
        self._partial = b""  # the start of a frame header cut off by the end of a feed
        self._left = 0  # payload bytes of the current frame still to come
        self._capture: bytearray | None = None  # the payload of a GOAWAY being taken out
        self._capture_left = 0
        self.goaways: list[tuple[int, int, bytes]] = []

    def feed(self, data: bytes) -> bytes:
        if self._partial:
            # A frame header was cut off by the end of the last feed: it was held back.
            data = self._partial + data
            self._partial = b""
        n = len(data)
        i = 0
        out: list[bytes] | None = None  # set once something is taken out or held back
        keep_from = 0  # start of the bytes not yet copied to `out`
        while i < n:
            if self._skip:
                step = min(self._skip, n - i)
                self._skip -= step
                i += step
                continue
            if self._capture is not None:
                step = min(self._capture_left, n - i)
                room = _GOAWAY_KEEP - len(self._capture)
                if room > 0:
                    self._capture += data[i:i + min(step, room)]
                self._capture_left -= step
                i += step
                if out is None:
                    out = []
                keep_from = i
                if not self._capture_left:
                    self._goaway_done()
                continue
            if self._left:
                step = min(self._left, n - i)
                self._left -= step
                i += step
                continue
            if n - i < 9:
                self._partial = bytes(data[i:])
                if out is None:
                    out = []
                out.append(data[keep_from:i])
                return b"".join(out)
            start = i
            high, low, kind, _, _ = _FRAME_HEADER.unpack_from(data, i)
            i += 9
            length = (high << 8) | low
            if kind == _GOAWAY:
                # Taken out of the stream; what came before it goes on as is.
                if out is None:
                    out = []
                out.append(data[keep_from:start])
                keep_from = i
                self._capture = bytearray()
                self._capture_left = length
                if not length:
                    self._goaway_done()
                continue
            self._left = length
        if out is None:
            return data
        out.append(data[keep_from:])
        return b"".join(out)

    def _goaway_done(self) -> None:
        payload = bytes(self._capture or b"")
        self._capture = None
        if len(payload) >= 8:
            last, code = struct.unpack(">LL", payload[:8])
            self.goaways.append((last & 0x7FFFFFFF, code, payload[8:]))
        else:
            self.goaways.append((0, PROTOCOL_ERROR, b"short GOAWAY"))
