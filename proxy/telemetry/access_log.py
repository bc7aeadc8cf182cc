"""Access log lines: one record per request (or per TCP connection), rendered as one line.

    line_format = compile_format(telemetry.access_log.format)   # once per config version
    keep = AccessLogFilter(sample_rate=0.1, only="errors")      # idem
    ...                                                         # per request, when it ends:
    if keep.wants(status, error, random.random()):              # status None: a TCP connection
        sink.write(line_format(AccessRecord(started_at, "http-in", "api", ...)))

`format` is `json` (the default: one compact JSON object per line, keys always the same and in
the same order, ASCII with every non-ASCII and control character escaped, so valid UTF-8) or a
template naming fields in braces: `{time} {method} {path} {status} {duration_ms}ms`. `{{` and
`}}` are literal braces; an absent value renders as `-`; control characters are escaped so a
line stays one line. `validate_format` lists a template's mistakes for `meshproxy check`.

The record's fields are the JSON keys. Text fields the request path holds as bytes (method,
authority, path, ids, peer) may be passed as bytes: they are decoded only for a line that is
written. A TCP connection's record has `protocol="tcp"` and its JSON line only the keys that
apply to a connection (`TCP_FIELDS`).

Pure: no trio, no sockets.
"""

from __future__ import annotations

import functools
import string
import time
from collections.abc import Callable
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import NamedTuple

Text = str | bytes | None


class AccessRecord(NamedTuple):
    """What one request (or TCP connection) did. A NamedTuple: built positionally it costs
    about as much as a tuple (~0.4 µs; by keyword ~1 µs)."""

    time: float  # wall clock (unix seconds) when the request started
    listener: str
    route: str | None = None
    cluster: str | None = None
    endpoint: str | None = None  # the upstream address the request (last) went to
    method: Text = None
    authority: Text = None
    path: Text = None
    protocol: str = "HTTP/1.1"  # "HTTP/1.0" | "HTTP/1.1" | "HTTP/2" | "tcp"
    status: int = 0  # what the client got; 0: no response at all
    error: str | None = None  # the x-meshproxy-error code
    bytes_in: int = 0  # from the client
    bytes_out: int = 0  # to the client
    duration_ms: float = 0.0  # first byte in to last byte out
    upstream_ms: float | None = None  # request sent to response head
    attempts: int = 0  # upstream sends (retries included); 0 when none was tried
    request_id: Text = None
    trace_id: Text = None
    peer: Text = None  # the client's address
    peer_identity: str | None = None  # the client's SPIFFE id under mTLS


FIELDS: tuple[str, ...] = AccessRecord._fields
TCP_FIELDS = ("time", "listener", "cluster", "endpoint", "protocol", "error", "bytes_in",
              "bytes_out", "duration_ms", "peer", "peer_identity")

LineFormat = Callable[[AccessRecord], str]


def compile_format(spec: str) -> LineFormat:
    """`json` or a template, as a function from a record to its line (no newline).
    Raises ValueError listing the template's mistakes."""
    if spec == "json":
        return json_line
    errors = validate_format(spec)
    if errors:
        raise ValueError("; ".join(errors))
    return _Template(spec)


def validate_format(spec: str) -> list[str]:
    """What is wrong with an access log format (`json` or a template); empty when nothing is."""
    if spec == "json":
        return []
    try:
        parts = list(string.Formatter().parse(spec))
    except ValueError as exc:  # a lone "{" or "}"
        return [f"{exc} (write {{{{ and }}}} for literal braces)"]
    errors = []
    if any(c in "\r\n" for literal, _, _, _ in parts for c in literal):
        errors.append("a line break in the template: each request is one line")
    for _, name, format_spec, conversion in parts:
        if name is None:
            continue
        if name not in FIELDS:
            errors.append(f"unknown field {{{name}}}; fields: {', '.join(FIELDS)}")
        elif format_spec or conversion:
            errors.append(f"{{{name}}}: only plain {{name}} fields are supported")
    if all(name is None for _, name, _, _ in parts):
        errors.append("names no field; write fields in braces, e.g. {status} {path}")
    return errors


# -- values ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _second(unix: int) -> str:
    # Most lines of a second share it: strftime runs about once a second.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(unix))


def rfc3339_ms(unix: float) -> str:
    """`2024-05-01T12:00:00.123Z`: UTC, millisecond precision."""
    seconds, ms = divmod(round(unix * 1000), 1000)
    return f"{_second(seconds)}.{ms:03d}Z"


def _text(value: str | bytes) -> str:
    # Peers may send any byte; an undecodable one shows as \xNN rather than vanishing.
    return value.decode("utf-8", "backslashreplace") if type(value) is bytes else value  # type: ignore[return-value]


def json_text(value: Text) -> str:
    """One text value as JSON (ASCII, escaped), or null."""
    if value is None:
        return "null"
    if type(value) is bytes:
        value = value.decode("utf-8", "backslashreplace")
    return encode_basestring_ascii(value)


def _json_int(value: int | None) -> str:
    return "null" if value is None else str(value)


def _json_ms(value: float | None) -> str:
    return "null" if value is None else f"{value:.3f}"


# -- JSON -----------------------------------------------------------------------------------

_HTTP_JSON = ('{"time":"%s","listener":%s,"route":%s,"cluster":%s,"endpoint":%s,"method":%s,'
              '"authority":%s,"path":%s,"protocol":%s,"status":%s,"error":%s,"bytes_in":%s,'
              '"bytes_out":%s,"duration_ms":%s,"upstream_ms":%s,"attempts":%s,"request_id":%s,'
              '"trace_id":%s,"peer":%s,"peer_identity":%s}')
_TCP_JSON = ('{"time":"%s","listener":%s,"cluster":%s,"endpoint":%s,"protocol":"tcp","error":%s,'
             '"bytes_in":%s,"bytes_out":%s,"duration_ms":%s,"peer":%s,"peer_identity":%s}')


def json_line(r: AccessRecord) -> str:
    """The record as one compact JSON object. Written out field by field: a generic
    `json.dumps` of a dict costs twice as much, and this runs once per request."""
    (start, listener, route, cluster, endpoint, method, authority, path, protocol, status, error,
     bytes_in, bytes_out, duration_ms, upstream_ms, attempts, request_id, trace_id, peer,
     peer_identity) = r
    if protocol == "tcp":
        return _TCP_JSON % (
            rfc3339_ms(start), json_text(listener), json_text(cluster), json_text(endpoint),
            json_text(error), _json_int(bytes_in), _json_int(bytes_out), _json_ms(duration_ms),
            json_text(peer), json_text(peer_identity))
    return _HTTP_JSON % (
        rfc3339_ms(start), json_text(listener), json_text(route), json_text(cluster),
        json_text(endpoint), json_text(method), json_text(authority), json_text(path),
        json_text(protocol), _json_int(status), json_text(error), _json_int(bytes_in),
        _json_int(bytes_out), _json_ms(duration_ms), _json_ms(upstream_ms), _json_int(attempts),
        json_text(request_id), json_text(trace_id), json_text(peer), json_text(peer_identity))


# -- templates ------------------------------------------------------------------------------

# C0 controls and DEL as \xNN: a newline in a header must not start a forged line.
_ESCAPE_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}


def _plain(value: object) -> str:
    if value is None:
        return "-"
    if type(value) is float:
        return f"{value:.3f}"
    return _text(value).translate(_ESCAPE_CONTROLS) if isinstance(value, str | bytes) else str(value)


class _Template:
    """A validated template compiled to a %-format and, per field, its index and renderer."""

    __slots__ = ("_fields", "_format")

    def __init__(self, spec: str) -> None:
        pieces = []
        fields = []
        for literal, name, _, _ in string.Formatter().parse(spec):
            pieces.append(literal.replace("%", "%%"))
            if name is not None:
                pieces.append("%s")
                fields.append((FIELDS.index(name), rfc3339_ms if name == "time" else _plain))
        self._format = "".join(pieces)
        self._fields = tuple(fields)

    def __call__(self, r: AccessRecord) -> str:
        return self._format % tuple([render(r[i]) for i, render in self._fields])


# -- which requests are logged --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccessLogFilter:
    """Which requests get a line: those the filter keeps, then a `sample_rate` share of them.

    `only="errors"` keeps requests answered with a 5xx, with an x-meshproxy-error code, or
    with no response at all (status 0); `min_status` keeps status >= it, and no response.
    A TCP connection has no status: either filter keeps it when it ended with an error.
    """

    sample_rate: float = 1.0
    only: str | None = None  # None | "errors"
    min_status: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be within 0..1, not {self.sample_rate}")
        if self.only not in (None, "errors"):
            raise ValueError(f"only must be 'errors', not {self.only!r}")

    def wants(self, status: int | None, error: str | None, u: float) -> bool:
        """Whether to log a request that ended with `status` (None for a TCP connection) and
        `error`; `u` is a uniform random value in [0, 1) (the caller's `random.random()`)."""
        return self._kept(status, error) and u < self.sample_rate

    def _kept(self, status: int | None, error: str | None) -> bool:
        if status is None:
            return error is not None or (self.only is None and not self.min_status)
        if self.only is not None and not (status >= 500 or status == 0 or error is not None):
            return False
        return not status or status >= self.min_status
