"""HTTP/2 ⇄ HTTP/1.1 translation and the inbound frame watch, sans-IO.

The `h2` library does the HTTP/2 framing, HPACK and stream states; this module holds
what meshproxy adds around it, all pure (bytes and values in, values out):

- `is_h2_preface`: tells a prior-knowledge HTTP/2 client from an HTTP/1 one by the
  connection preface, deciding as soon as the bytes allow (HTTP/1 requests never start
  with "PRI *", so an HTTP/1 client is told apart on its first bytes and never stalls).
- `parse_request`: an HTTP/2 request's header list checked per RFC 9113 §8 (pseudo-header
  rules, lowercase names, connection-specific fields, `te`, CR/LF/NUL and edge
  whitespace, `host` vs `:authority`, content-length) and bounded (header count, cookie
  crumbs included, and list size), into an `H2Request`; `MalformedRequest` says how to
  refuse it (a stream reset, or a 431).
- `h1_request_head` / `h2_request_headers`: that request as sent upstream.
- `h2_response_headers` / `h2_trailers`: an HTTP/1.1 response head (or a chunked body's
  trailer section) as HTTP/2 fields, hop-by-hop fields removed.
- `TrailerDecoder`: the data and the trailer fields out of a chunked body whose framing
  `ChunkedScanner` checked.
- gRPC: `parse_grpc_timeout`, `grpc_status_for`, `grpc_error_headers` (a trailers-only
  response carrying a proxy-made error).
- `InboundFrames`: watches the client's frames as bytes go by, before the h2 state
  machine sees them: header block size and CONTINUATION count, SETTINGS, PING, PRIORITY,
  WINDOW_UPDATE and empty-frame floods, rapid reset; and takes GOAWAY frames out of the
  byte stream so that a peer's graceful GOAWAY does not stop the streams still open
  (h2 closes its whole state machine on one).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .._core.h2conn import check_field, check_value
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


class MalformedRequest(Exception):
    """A request refused before routing: reset the stream with `error_code`, or, when
    `status` is set, answer it with that status (431 for headers over the limits)."""

    def __init__(self, reason: str, *, status: int | None = None, code: str = "h2_malformed",
                 error_code: int = PROTOCOL_ERROR) -> None:
        super().__init__(reason)
        self.status = status
        self.code = code
        self.error_code = error_code


# Fields that exist only per connection in HTTP/1 and are malformed in HTTP/2 (RFC 9113 §8.2.2).
CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                                 b"upgrade"})
# Fields the proxy sets itself on the way upstream.
REPLACED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"expect", b"host", b"te", b"content-length",
                      b"cookie", b"x-forwarded-client-cert"})
_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
# Each field costs its name, its value and this much (RFC 9113 §6.5.2).
FIELD_OVERHEAD = 32


class H2Request:
    """A checked HTTP/2 request head: its pseudo-header fields and the regular fields in
    order (cookie crumbs joined into one field, `host` folded into `authority`)."""

    __slots__ = ("authority", "content_length", "fields", "grpc", "method", "path", "scheme")

    def __init__(self, method: bytes, scheme: bytes, authority: bytes | None, path: bytes,
                 fields: list[tuple[bytes, bytes]], content_length: int, grpc: bool) -> None:
        self.method = method
        self.scheme = scheme
        self.authority = authority
        self.path = path
        self.fields = fields
        self.content_length = content_length  # -1: not given
        self.grpc = grpc  # content-type application/grpc[+proto|...]

    @property
    def route_path(self) -> bytes:
        """The path without its query, as routes match it."""
        q = self.path.find(b"?")
        return self.path if q < 0 else self.path[:q]

    def get(self, name: bytes) -> bytes | None:
        """The first value of field `name` (lowercase), or None."""
        for n, v in self.fields:
            if n == name:
                return v
        return None

    def get_all(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.fields if n == name]


def _check_field(name: bytes, value: bytes) -> None:
    reason = check_field(name, value)
    if reason is not None:
        raise MalformedRequest(reason)


def _check_value(name: bytes, value: bytes) -> None:
    reason = check_value(name, value)
    if reason is not None:
        raise MalformedRequest(reason)


def parse_request(headers: list[tuple[bytes, bytes]], max_list_size: int = 61440,
                  max_fields: int = 100) -> H2Request:
    """Check a request's header list (as HPACK decoded it: names and values bytes) and
    return it as an `H2Request`; MalformedRequest when it must be refused."""
    size = 0
    count = len(headers)
    method = scheme = authority = path = None
    host = None
    regular = False
    fields: list[tuple[bytes, bytes]] = []
    cookies: list[bytes] = []
    content_length = -1
    grpc = False
    for name, value in headers:
        size += len(name) + len(value) + FIELD_OVERHEAD
        if name[:1] == b":":
            if regular:
                raise MalformedRequest(f"pseudo-header {name[:64]!r} after a regular field")
            if name not in _PSEUDO:
                raise MalformedRequest(f"unknown pseudo-header {name[:64]!r}")
            _check_value(name, value)
            if name == b":method":
                if method is not None:
                    raise MalformedRequest("duplicate :method")
                if not value or not _TOKEN.issuperset(value):
                    raise MalformedRequest("invalid :method")
                method = value
            elif name == b":scheme":
                if scheme is not None:
                    raise MalformedRequest("duplicate :scheme")
                scheme = value
            elif name == b":authority":
                if authority is not None:
                    raise MalformedRequest("duplicate :authority")
                authority = value
            else:
                if path is not None:
                    raise MalformedRequest("duplicate :path")
                path = value
            continue
        regular = True
        _check_field(name, value)
        if name in CONNECTION_SPECIFIC:
            raise MalformedRequest(f"connection-specific field {name.decode()!r}")
        if name == b"te":
            if value.lower() != b"trailers":
                raise MalformedRequest("te other than trailers")
            continue
        if name == b"cookie":
            cookies.append(value)
            continue
        if name == b"host":
            if host is not None:
                raise MalformedRequest("duplicate host")
            host = value
            continue
        if name == b"content-length":
            if not value.isdigit() or len(value) > 18:
                raise MalformedRequest("invalid content-length")
            length = int(value)
            if content_length >= 0 and length != content_length:
                raise MalformedRequest("conflicting content-length")
            content_length = length
            continue
        if name == b"content-type" and value.startswith(b"application/grpc"):
            grpc = True
        fields.append((name, value))
    if count > max_fields:
        raise MalformedRequest(f"{count} header fields, over the limit of {max_fields}",
                               status=431, code="headers_too_large")
    if size > max_list_size:
        raise MalformedRequest(f"header list of {size} bytes, over the limit of {max_list_size}",
                               status=431, code="headers_too_large")
    if method is None:
        raise MalformedRequest("missing :method")
    if method == b"CONNECT":
        # Tunnels over HTTP/2 streams are not proxied (yet): answered, not reset.
        raise MalformedRequest("CONNECT over HTTP/2 is not supported", status=501, code="h2_connect_unsupported")
    if scheme is None or not scheme:
        raise MalformedRequest("missing :scheme")
    if path is None or not path:
        raise MalformedRequest("missing :path")
    if path[:1] != b"/" and not (path == b"*" and method == b"OPTIONS"):
        raise MalformedRequest("invalid :path")
    if host is not None:
        if authority is None:
            authority = host
        elif host != authority:
            raise MalformedRequest("host differs from :authority")
    if authority is not None and not authority:
        authority = None
    if cookies:
        # Crumbs are joined for the HTTP/1 side (RFC 9113 §8.2.3).
        fields.append((b"cookie", b"; ".join(cookies)))
    return H2Request(method, scheme, authority, path, fields, content_length, grpc)


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


def h1_request_head(request: H2Request, extra: bytes, framing: bytes) -> bytes:
    """The HTTP/1.1 request head for `request`: request line, Host, its fields except the
    ones the proxy replaces, `framing` ("content-length: N\\r\\n", "transfer-encoding:
    chunked\\r\\n" or nothing), `extra` (ready field lines), the empty line."""
    out = [request.method, b" ", request.path, b" HTTP/1.1\r\nhost: ", request.authority or b"", b"\r\n"]
    for name, value in request.fields:
        if name in REPLACED and name != b"cookie":
            continue
        out += (name, b": ", value, b"\r\n")
    out += (framing, extra, b"\r\n")
    return b"".join(out)


def h2_request_headers(request: H2Request, extra: list[tuple[bytes, bytes]],
                       scheme: bytes = b"http") -> list[tuple[bytes, bytes]]:
    """`request` as the header list of an upstream HTTP/2 request."""
    out = [(b":method", request.method), (b":scheme", scheme), (b":path", request.path)]
    if request.authority is not None:
        out.append((b":authority", request.authority))
    if request.content_length >= 0:
        out.append((b"content-length", b"%d" % request.content_length))
    for field in request.fields:
        name = field[0]
        if name in REPLACED and name != b"cookie":
            continue
        out.append(field)
    if request.grpc:
        out.append((b"te", b"trailers"))
    out += extra
    return out


# Response fields that do not cross into HTTP/2 (RFC 9113 §8.2.2).
_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                         b"transfer-encoding", b"upgrade"})


def _without_hop_by_hop(fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    drop = set(_HOP_BY_HOP)
    for name, value in fields:
        if name.lower() == b"connection":
            drop.update(option.strip().lower() for option in value.split(b","))
    out = []
    for name, value in fields:
        lower = name.lower()
        if lower not in drop and lower[:1] != b":":
            out.append((lower, value))
    return out


def h2_response_headers(status: int, fields: list[tuple[bytes, bytes]],
                        extra: list[tuple[bytes, bytes]] = ()) -> list[tuple[bytes, bytes]]:
    """An HTTP/1.1 response's status and fields as an HTTP/2 header list."""
    return [(b":status", b"%d" % status), *_without_hop_by_hop(fields), *extra]


def h2_trailers(fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """A chunked body's trailer fields as HTTP/2 trailers (framing fields dropped)."""
    return [(n, v) for n, v in _without_hop_by_hop(fields) if n != b"content-length"]


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


# -- the inbound frame watch -------------------------------------------------------------------

_DATA, _HEADERS, _PRIORITY, _RST_STREAM, _SETTINGS, _PUSH_PROMISE, _PING, _GOAWAY, _WINDOW_UPDATE, \
    _CONTINUATION = range(10)
_END_STREAM = 0x1
_ACK = 0x1
_END_HEADERS = 0x4
_FRAME_HEADER = struct.Struct(">HBBBL")  # length as 16 + 8 bits, type, flags, stream id
_GOAWAY_KEEP = 1024  # of a GOAWAY's payload: ids, code and the start of its debug data


class InboundFrames:
    """Follows a peer's frames through the byte stream, before h2 parses them.

    `feed(data, now)` returns the bytes h2 should see: `data` itself, unless GOAWAY frames
    were in it, which are taken out and reported in `goaways` as (last stream id, error
    code, debug data). After a feed, `violation` names the first limit the peer broke
    (an error code for logs and metrics), and the connection should end with GOAWAY
    ENHANCE_YOUR_CALM. `note_reset` counts a stream the proxy reset because of the peer
    (a malformed request) like one the peer reset.

    With `limits` None nothing is limited (an upstream connection: only GOAWAY is watched).
    """

    def __init__(self, limits: H2Limits | None, preface: int = 0) -> None:
        self.limits = limits
        self._skip = preface  # bytes to pass without looking (the client preface)
        self._partial = b""  # the start of a frame header cut off by the end of a feed
        self._left = 0  # payload bytes of the current frame still to come
        self._capture: bytearray | None = None  # the payload of a GOAWAY being taken out
        self._capture_left = 0
        self.goaways: list[tuple[int, int, bytes]] = []
        self.violation: str | None = None
        self._in_block = False  # inside a HEADERS block without END_HEADERS yet
        self._block_bytes = 0
        self._block_frames = 0
        self.block_started = 0.0  # when the open header block began
        self._highest = 0  # highest stream id a HEADERS frame opened
        self._empty = 0  # consecutive frames with nothing in them
        self._window_start = -1.0
        self._settings = self._pings = self._priority = self._window_updates = 0
        self._reset_start = -1.0
        self.opened = 0  # streams opened in the current reset window
        self.resets = 0  # ... and reset early (by the peer, or by us because of the peer)

    @property
    def in_header_block(self) -> bool:
        return self._in_block

    def note_reset(self, now: float) -> None:
        self._count_reset(now)

    def feed(self, data: bytes, now: float) -> bytes:
        if self._partial:
            # A frame header was cut off by the end of the last feed: it was held back.
            data = self._partial + data
            self._partial = b""
        n = len(data)
        i = 0
        out: list[bytes] | None = None  # set once something is taken out or held back
        keep_from = 0  # start of the bytes not yet copied to `out`
        limits = self.limits
        if limits is not None and now - self._window_start >= limits.flood_window:
            self._window_start = now
            self._settings = self._pings = self._priority = self._window_updates = 0
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
            high, low, kind, flags, stream = _FRAME_HEADER.unpack_from(data, i)
            i += 9
            length = (high << 8) | low
            stream &= 0x7FFFFFFF
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
            if limits is not None and self.violation is None:
                self._watch(kind, flags, stream, length, now, limits)
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

    def _watch(self, kind: int, flags: int, stream: int, length: int, now: float, limits: H2Limits) -> None:
        if kind == _HEADERS or kind == _CONTINUATION:
            if kind == _HEADERS:
                if stream > self._highest and stream & 1:
                    self._highest = stream
                    self._count_open(now)
                if not self._in_block:
                    self._in_block = True
                    self._block_bytes = 0
                    self._block_frames = 0
                    self.block_started = now
            else:
                self._block_frames += 1
                if self._block_frames > limits.max_continuations:
                    self.violation = "continuation_flood"
                    return
            self._block_bytes += length
            if self._block_bytes > limits.max_header_block:
                self.violation = "header_block_too_large"
                return
            if flags & _END_HEADERS:
                self._in_block = False
            self._empty_frame(length == 0 and not flags & _END_STREAM and kind == _CONTINUATION, limits)
        elif kind == _DATA:
            self._empty_frame(length == 0 and not flags & _END_STREAM, limits)
        elif kind == _SETTINGS:
            if not flags & _ACK:
                self._settings += 1
                if self._settings > limits.max_settings:
                    self.violation = "settings_flood"
        elif kind == _PING:
            if not flags & _ACK:
                self._pings += 1
                if self._pings > limits.max_pings:
                    self.violation = "ping_flood"
        elif kind == _RST_STREAM:
            self._count_reset(now)
        elif kind == _PRIORITY:
            self._priority += 1
            if self._priority > limits.max_priority:
                self.violation = "priority_flood"
        elif kind == _WINDOW_UPDATE:
            self._window_updates += 1
            if self._window_updates > limits.max_window_updates:
                self.violation = "window_update_flood"

    def _empty_frame(self, empty: bool, limits: H2Limits) -> None:
        if not empty:
            self._empty = 0
            return
        self._empty += 1
        if self._empty > limits.max_empty_frames:
            self.violation = "empty_frame_flood"

    def _reset_window(self, now: float) -> None:
        limits = self.limits
        if limits is not None and now - self._reset_start >= limits.reset_window:
            self._reset_start = now
            self.opened = self.resets = 0

    def _count_open(self, now: float) -> None:
        self._reset_window(now)
        self.opened += 1

    def _count_reset(self, now: float) -> None:
        limits = self.limits
        if limits is None:
            return
        self._reset_window(now)
        self.resets += 1
        if (self.resets >= limits.reset_min_streams and self.resets >= limits.reset_ratio * self.opened
                and self.violation is None):
            self.violation = "rapid_reset"
