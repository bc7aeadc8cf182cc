# cython: language_level=3
"""HTTP/2 request heads, at C speed: a decoded header list checked per RFC 9113 §8 into
an `H2Request`, and that request as an HTTP/1.1 request head.

`parse_request` checks the pseudo-header rules, lowercase token names, connection-specific
fields, `te`, CR/LF/NUL and edge whitespace in values, `host` against `:authority`, and
content-length, and bounds the list (field count, cookie crumbs included, and RFC 9113
list size); `MalformedRequest` says how to refuse a request (a stream reset, or a 431).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_SIZE
from libc.string cimport memcmp, memcpy

PROTOCOL_ERROR = 0x1
# Each field costs its name, its value and this much (RFC 9113 §6.5.2).
FIELD_OVERHEAD = 32
# Fields that exist only per connection in HTTP/1 and are malformed in HTTP/2 (RFC 9113 §8.2.2).
CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                                 b"upgrade"})
# Fields the proxy sets itself on the way upstream.
REPLACED = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"expect", b"host", b"te", b"content-length",
                      b"cookie", b"x-forwarded-client-cert"})


class MalformedRequest(Exception):
    """A request refused before routing: reset the stream with `error_code`, or, when
    `status` is set, answer it with that status (431 for headers over the limits)."""

    def __init__(self, reason, *, status=None, code="h2_malformed", error_code=PROTOCOL_ERROR):
        super().__init__(reason)
        self.status = status
        self.code = code
        self.error_code = error_code


cdef class H2Request:
    """A checked HTTP/2 request head: its pseudo-header fields and the regular fields in
    order (cookie crumbs joined into one field, `host` folded into `authority`)."""

    cdef public bytes method
    cdef public bytes scheme
    cdef public object authority  # bytes or None
    cdef public bytes path
    cdef public list fields
    cdef public long long content_length  # -1: not given
    cdef public bint grpc  # content-type application/grpc[+proto|...]

    def __init__(self, bytes method, bytes scheme, authority, bytes path, list fields,
                 long long content_length, bint grpc):
        self.method = method
        self.scheme = scheme
        self.authority = authority
        self.path = path
        self.fields = fields
        self.content_length = content_length
        self.grpc = grpc

    @property
    def route_path(self):
        """The path without its query, as routes match it."""
        cdef Py_ssize_t q = self.path.find(b"?")
        return self.path if q < 0 else self.path[:q]

    cpdef object get(self, bytes name):
        """The first value of field `name` (lowercase), or None."""
        for field in self.fields:
            if (<tuple>field)[0] == name:
                return (<tuple>field)[1]
        return None

    def get_all(self, bytes name):
        return [v for n, v in self.fields if n == name]


# Bytes allowed in a field name: lowercase token characters (RFC 9110 §5.6.2, RFC 9113 §8.2.1).
cdef bint _NAME_OK[256]
cdef bint _UPPER[256]
for _c in list(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"):
    _NAME_OK[_c] = True
for _c in list(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"):
    _UPPER[_c] = True


def check_field(bytes name, bytes value):
    """Why a regular field is malformed in HTTP/2 (RFC 9113 §8.2.1), or None: an empty or
    non-token name, an uppercase name, or a bad value (`check_value`)."""
    cdef const unsigned char* n = <const unsigned char*>PyBytes_AS_STRING(name)
    cdef Py_ssize_t nl = PyBytes_GET_SIZE(name), i
    cdef bint upper = False
    if nl == 0:
        return "empty field name"
    for i in range(nl):
        if not _NAME_OK[n[i]]:
            if not _UPPER[n[i]]:
                return f"invalid field name {name[:64]!r}"
            upper = True
    if upper:
        return f"uppercase field name {name[:64]!r}"
    return check_value(name, value)


def check_value(bytes name, bytes value):
    """Why a field value is malformed (CR, LF or NUL in it, whitespace at either end), or
    None; `name` is for the message."""
    cdef const unsigned char* v = <const unsigned char*>PyBytes_AS_STRING(value)
    cdef Py_ssize_t vl = PyBytes_GET_SIZE(value), i
    if vl:
        for i in range(vl):
            if v[i] == 0 or v[i] == 13 or v[i] == 10:
                return f"CR, LF or NUL in field {name[:64]!r}"
        if v[0] == 0x20 or v[0] == 0x09 or v[vl - 1] == 0x20 or v[vl - 1] == 0x09:
            return f"whitespace around the value of {name[:64]!r}"
    return None


cdef inline bint _is(bytes a, const char* b, Py_ssize_t n):
    return PyBytes_GET_SIZE(a) == n and memcmp(PyBytes_AS_STRING(a), b, n) == 0


cdef bint _is_token(bytes value):
    cdef const unsigned char* v = <const unsigned char*>PyBytes_AS_STRING(value)
    cdef Py_ssize_t i
    for i in range(PyBytes_GET_SIZE(value)):
        if not _NAME_OK[v[i]] and not _UPPER[v[i]]:
            return False
    return PyBytes_GET_SIZE(value) > 0


def parse_request(list headers, Py_ssize_t max_list_size=61440, Py_ssize_t max_fields=100):
    """Check a request's header list (as HPACK decoded it: names and values bytes) and
    return it as an `H2Request`; MalformedRequest when it must be refused."""
    cdef Py_ssize_t size = 0, count = PyList_GET_SIZE(headers), i
    cdef bytes name, value
    cdef object method = None, scheme = None, authority = None, path = None, host = None
    cdef bint regular = False, grpc = False
    cdef list fields = []
    cdef list cookies = None
    cdef long long content_length = -1, length
    cdef const unsigned char* p
    cdef tuple field
    for i in range(count):
        field = headers[i]
        name = field[0]
        value = field[1]
        size += PyBytes_GET_SIZE(name) + PyBytes_GET_SIZE(value) + FIELD_OVERHEAD
        if PyBytes_GET_SIZE(name) and PyBytes_AS_STRING(name)[0] == b":":
            if regular:
                raise MalformedRequest(f"pseudo-header {name[:64]!r} after a regular field")
            reason = check_value(name, value)
            if reason is not None:
                raise MalformedRequest(reason)
            if _is(name, ":method", 7):
                if method is not None:
                    raise MalformedRequest("duplicate :method")
                if not _is_token(value):
                    raise MalformedRequest("invalid :method")
                method = value
            elif _is(name, ":scheme", 7):
                if scheme is not None:
                    raise MalformedRequest("duplicate :scheme")
                scheme = value
            elif _is(name, ":authority", 10):
                if authority is not None:
                    raise MalformedRequest("duplicate :authority")
                authority = value
            elif _is(name, ":path", 5):
                if path is not None:
                    raise MalformedRequest("duplicate :path")
                path = value
            else:
                raise MalformedRequest(f"unknown pseudo-header {name[:64]!r}")
            continue
        regular = True
        reason = check_field(name, value)
        if reason is not None:
            raise MalformedRequest(reason)
        if name in CONNECTION_SPECIFIC:
            raise MalformedRequest(f"connection-specific field {name.decode()!r}")
        if _is(name, "te", 2):
            if value.lower() != b"trailers":
                raise MalformedRequest("te other than trailers")
            continue
        if _is(name, "cookie", 6):
            if cookies is None:
                cookies = []
            cookies.append(value)
            continue
        if _is(name, "host", 4):
            if host is not None:
                raise MalformedRequest("duplicate host")
            host = value
            continue
        if _is(name, "content-length", 14):
            if not value.isdigit() or PyBytes_GET_SIZE(value) > 18:
                raise MalformedRequest("invalid content-length")
            length = int(value)
            if content_length >= 0 and length != content_length:
                raise MalformedRequest("conflicting content-length")
            content_length = length
            continue
        if _is(name, "content-type", 12) and value.startswith(b"application/grpc"):
            grpc = True
        fields.append(field)
    if count > max_fields:
        raise MalformedRequest(f"{count} header fields, over the limit of {max_fields}",
                               status=431, code="headers_too_large")
    if size > max_list_size:
        raise MalformedRequest(f"header list of {size} bytes, over the limit of {max_list_size}",
                               status=431, code="headers_too_large")
    if method is None:
        raise MalformedRequest("missing :method")
    if _is(method, "CONNECT", 7):
        # Tunnels over HTTP/2 streams are not proxied (yet): answered, not reset.
        raise MalformedRequest("CONNECT over HTTP/2 is not supported", status=501, code="h2_connect_unsupported")
    if not scheme:
        raise MalformedRequest("missing :scheme")
    if not path:
        raise MalformedRequest("missing :path")
    p = <const unsigned char*>PyBytes_AS_STRING(path)
    if p[0] != b"/" and not (_is(path, "*", 1) and _is(method, "OPTIONS", 7)):
        raise MalformedRequest("invalid :path")
    for i in range(PyBytes_GET_SIZE(path)):
        if p[i] <= 0x20 or p[i] == 0x7F:
            # Never a request line an HTTP/1 parser could read two ways.
            raise MalformedRequest("space or control character in :path")
    if host is not None:
        if authority is None:
            authority = host
        elif host != authority:
            raise MalformedRequest("host differs from :authority")
    if authority is not None and not authority:
        authority = None
    if cookies is not None:
        # Crumbs are joined for the HTTP/1 side (RFC 9113 §8.2.3).
        fields.append((b"cookie", b"; ".join(cookies)))
    return H2Request(method, scheme, authority, path, fields, content_length, grpc)


def h1_request_head(H2Request request, bytes extra, bytes framing, tuple drop=()):
    """The HTTP/1.1 request head for `request`: request line, Host, its fields except the
    ones the proxy replaces and those named in `drop`, `framing` ("content-length: N\\r\\n",
    "transfer-encoding: chunked\\r\\n" or nothing), `extra` (ready field lines), the empty
    line."""
    cdef bytes authority = request.authority if request.authority is not None else b""
    cdef list fields = request.fields
    cdef Py_ssize_t total, i, n = PyList_GET_SIZE(fields), pos
    cdef bytes name, value
    cdef char* o
    cdef bytes out
    cdef tuple field
    cdef list keep = []
    total = (PyBytes_GET_SIZE(request.method) + 1 + PyBytes_GET_SIZE(request.path) + 17
             + PyBytes_GET_SIZE(authority) + 2 + PyBytes_GET_SIZE(framing) + PyBytes_GET_SIZE(extra) + 2)
    for i in range(n):
        field = fields[i]
        name = field[0]
        if name in REPLACED and not _is(name, "cookie", 6) or drop and name in drop:
            continue
        value = field[1]
        keep.append(field)
        total += PyBytes_GET_SIZE(name) + 2 + PyBytes_GET_SIZE(value) + 2
    out = PyBytes_FromStringAndSize(NULL, total)
    o = PyBytes_AS_STRING(out)
    pos = _put(o, 0, request.method)
    o[pos] = b" "
    pos = _put(o, pos + 1, request.path)
    memcpy(o + pos, b" HTTP/1.1\r\nhost: ", 17)
    pos = _put(o, pos + 17, authority)
    memcpy(o + pos, b"\r\n", 2)
    pos += 2
    for field in keep:
        pos = _put(o, pos, field[0])
        memcpy(o + pos, b": ", 2)
        pos = _put(o, pos + 2, field[1])
        memcpy(o + pos, b"\r\n", 2)
        pos += 2
    pos = _put(o, pos, framing)
    pos = _put(o, pos, extra)
    memcpy(o + pos, b"\r\n", 2)
    return out


cdef inline Py_ssize_t _put(char* o, Py_ssize_t pos, bytes data):
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    memcpy(o + pos, PyBytes_AS_STRING(data), n)
    return pos + n


# Response fields that do not cross into HTTP/2 (RFC 9113 §8.2.2).
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade"})
cdef dict _STATUS = {}  # b"200" and the like, made once


def h2_response_headers(int status, list fields, extra=()):
    """An HTTP/1.1 response's status and fields as an HTTP/2 header list: names lowercased,
    hop-by-hop fields and the ones its Connection field names dropped, `extra` appended."""
    cdef object code = _STATUS.get(status)
    if code is None:
        code = _STATUS[status] = b"%d" % status
    cdef list out = [(b":status", code)]
    cdef object drop = HOP_BY_HOP
    cdef tuple field
    cdef bytes name, lower
    for field in fields:
        name = field[0]
        if PyBytes_GET_SIZE(name) == 10 and name.lower() == b"connection":
            drop = drop | {option.strip().lower() for option in (<bytes>field[1]).split(b",")}
    for field in fields:
        name = field[0]
        lower = name.lower() if _has_upper(name) else name
        if lower in drop or (PyBytes_GET_SIZE(lower) and PyBytes_AS_STRING(lower)[0] == b":"):
            continue
        out.append(field if lower is name else (lower, field[1]))
    if extra:
        out.extend(extra)
    return out


cdef inline bint _has_upper(bytes name):
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(name)
    cdef Py_ssize_t i
    for i in range(PyBytes_GET_SIZE(name)):
        if _UPPER[p[i]]:
            return True
    return False
