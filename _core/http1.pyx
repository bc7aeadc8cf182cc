# cython: language_level=3
"""HTTP/1.1 message heads and chunked framing, strict per RFC 9112 (sans-IO).

`parse_request` / `parse_response` look at `data[start:end]` (any object with
the buffer protocol) and return a head once its final empty line is there,
`None` while it is incomplete, or raise `ProtocolError` as soon as the bytes
seen so far cannot become a valid head (or a limit is already exceeded). A
head keeps one `bytes` copy of its `size` bytes and C offsets into it; Python
objects for the method, target, fields... are made only when asked for.

`ChunkedScanner` walks a chunked body (RFC 9112 7.1) that the caller forwards
verbatim: it says how many bytes belong to the body and checks the framing.

Choices where the RFCs allow either accepting or refusing (everything refused
raises `ProtocolError`; for a response the status is always 502 and the code
`bad_response`):

- Line endings must be CRLF; a bare LF or a bare CR anywhere is refused.
- One empty line (CRLF) before the request or status line is skipped
  (RFC 9112 2.2) and counted in `size`; a second one is refused.
- obs-fold, whitespace before the first field line, whitespace between a field
  name and its colon, empty names, non-token bytes in names and CTLs (other
  than HTAB, and including DEL) in values are refused. obs-text (0x80-0xFF) is
  accepted in values and reason phrases, never in names, targets or Host.
- Request line: `method SP request-target SP HTTP-version`, single spaces. The
  target is visible ASCII without `#` (a fragment is not part of a
  request-target). origin-form, absolute-form (http/https only, no userinfo,
  non-empty host), authority-form (CONNECT only, port required) and `*`
  (OPTIONS only). `HTTP/1.0` and `HTTP/1.1` are served; another well-formed
  `HTTP/x.y` is 505, anything else 400.
- Host: required on HTTP/1.1 requests, refused when repeated (even with equal
  values) or not `host[:port]`. Empty Host is valid. When the target carries
  an authority (absolute-form, or CONNECT's authority-form) that authority is
  the request's `host` whatever Host says (RFC 9112 3.2.2), and `serialize()`
  sends it as Host.
- Content-Length: 1*DIGIT up to 2**63-1; leading zeros are accepted (and
  re-sent without them). A second Content-Length field or a list ("5, 5") is
  refused even when the values agree (as llhttp and Envoy do).
- Transfer-Encoding: one field line only; the only coding served is
  `chunked`, which must be last and appear once (else 400); other codings
  before it (`gzip, chunked`) are 501 (there is no "known but unsupported"
  middle ground: the proxy never decodes). Empty list elements, parameters
  and non-token elements are 400. Refused together with Content-Length, and
  on HTTP/1.0 requests. Responses follow the same rules (502), so a response
  with both Content-Length and Transfer-Encoding is refused rather than
  "Transfer-Encoding wins".
- Connection options are tokens (an element that is not one is refused).
  Every option names a field that `serialize()` removes, except framing and
  routing fields (Content-Length, Transfer-Encoding, Host), which are never
  removed that way.
- Response status is exactly three digits in 100..599; the reason phrase may
  be empty and the SP before it may be missing.
- Response bodies per RFC 9112 6.3: none after HEAD, for 1xx, 204 and 304,
  and for a 2xx to CONNECT (a tunnel); else chunked, else Content-Length,
  else until the upstream closes. `keep_alive` is False for until-close
  bodies, 101 and CONNECT 2xx (the connection is no longer HTTP).

`serialize()` re-sends a head in the proxy's own version (`HTTP/1.1`,
RFC 9110 6.2), each field as `name: value` with the value OWS-trimmed, without
hop-by-hop fields. An absolute-form target is sent in origin-form with its
authority as Host; an HTTP/1.0 request without Host gets an empty Host.

Limits (a `Limits` object): the request line without its CRLF may be
`max_request_line` bytes (else 414 `request_line_too_long`); the field lines
plus the final empty line, CRLFs included, may be `max_header_bytes` bytes
(else 431 `headers_too_large`); at most `max_headers` field lines (else 431
`too_many_headers`). Both size limits are raised while the head is still
incomplete, as soon as they are certain.
"""

from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcmp, memcpy

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_CheckExact, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE

__all__ = [
    "BODY_NONE", "BODY_LENGTH", "BODY_CHUNKED", "BODY_UNTIL_CLOSE",
    "ProtocolError", "Limits", "RequestHead", "ResponseHead", "ChunkedScanner",
    "parse_request", "parse_response",
]

BODY_NONE = 0
BODY_LENGTH = 1
BODY_CHUNKED = 2
BODY_UNTIL_CLOSE = 3

# Longest chunk-size line (size, extensions, CRLF excluded) a scanner accepts.
MAX_CHUNK_LINE = 4096


class ProtocolError(Exception):
    """The peer sent bytes that are not a valid HTTP/1.1 message.

    `status` is the reply the proxy should send (400, 413, 414, 431, 501, 505;
    502 when the culprit is an upstream's response), `code` a short machine
    code for logs and `x-meshproxy-error`, and `str(exc)` a short reason.
    """

    def __init__(self, reason, status=400, code="bad_request"):
        super().__init__(reason)
        self.status = status
        self.code = code

    def __reduce__(self):
        return (ProtocolError, (str(self), self.status, self.code))


# ---------------------------------------------------------------------------
# Character classes

cdef uint8_t _TCHAR[256]    # token: ALPHA DIGIT !#$%&'*+-.^_`|~
cdef uint8_t _VALUE[256]    # field-value byte: HTAB SP VCHAR obs-text
cdef uint8_t _TARGET[256]   # request-target byte: VCHAR except '#'
cdef uint8_t _VCHAR[256]    # 0x21-0x7E
cdef uint8_t _REGNAME[256]  # reg-name: unreserved sub-delims '%'
cdef uint8_t _IPLIT[256]    # inside [ ]: HEXDIG ':' '.' and zone-id bytes
cdef uint8_t _QDTEXT[256]   # quoted-string text: HTAB SP 0x21 0x23-0x5B 0x5D-0x7E obs-text
cdef uint8_t _LOWER[256]
cdef int _HEX[256]          # hex digit value, -1 when not one


cdef void _init_tables() noexcept:
    cdef int c
    cdef bytes tsym = b"!#$%&'*+-.^_`|~"
    cdef bytes regsym = b"-._~!$&'()*+,;=%"
    for c in range(256):
        _TCHAR[c] = 0
        _VALUE[c] = 1 if (c == 9 or c == 32 or (0x21 <= c <= 0x7E) or c >= 0x80) else 0
        _VCHAR[c] = 1 if 0x21 <= c <= 0x7E else 0
        _TARGET[c] = 1 if (0x21 <= c <= 0x7E and c != 0x23) else 0
        _REGNAME[c] = 0
        _IPLIT[c] = 0
        _QDTEXT[c] = 1 if (c == 9 or c == 32 or c == 0x21 or (0x23 <= c <= 0x5B)
                           or (0x5D <= c <= 0x7E) or c >= 0x80) else 0
        _LOWER[c] = c + 32 if 0x41 <= c <= 0x5A else c
        if 0x30 <= c <= 0x39:
            _HEX[c] = c - 0x30
        elif 0x41 <= c <= 0x46:
            _HEX[c] = c - 0x41 + 10
        elif 0x61 <= c <= 0x66:
            _HEX[c] = c - 0x61 + 10
        else:
            _HEX[c] = -1
        if (0x30 <= c <= 0x39) or (0x41 <= c <= 0x5A) or (0x61 <= c <= 0x7A):
            _TCHAR[c] = 1
            _REGNAME[c] = 1
            _IPLIT[c] = 1
    for c in tsym:
        _TCHAR[c] = 1
    for c in regsym:
        _REGNAME[c] = 1
    for c in b":.%-_~":
        _IPLIT[c] = 1


_init_tables()


# Word-at-a-time skips over the long runs (values, targets): 8 bytes per step
# while none needs a closer look, then byte by byte through the word that does.
cdef uint64_t _ONES = 0x0101010101010101ULL
cdef uint64_t _HIGHS = 0x8080808080808080ULL

cdef inline uint64_t _has_less(uint64_t x, uint64_t n) noexcept:
    """High bit set in the result iff some byte of x is < n (n <= 128)."""
    return (x - _ONES * n) & ~x & _HIGHS


cdef inline uint64_t _has_byte(uint64_t x, uint64_t b) noexcept:
    return _has_less(x ^ (_ONES * b), 1)


cdef inline Py_ssize_t _skip_value(const unsigned char* d, Py_ssize_t p, Py_ssize_t lim) noexcept:
    """First index >= p whose byte is not a field-value byte (or lim)."""
    cdef uint64_t x
    cdef Py_ssize_t stop
    while True:
        while p + 8 <= lim:
            memcpy(&x, d + p, 8)
            if (_has_less(x, 0x20) | _has_byte(x, 0x7F)) != 0:
                break
            p += 8
        stop = p + 8 if p + 8 < lim else lim
        while p < stop and _VALUE[d[p]]:
            p += 1
        if p < stop or p >= lim:
            return p


cdef inline Py_ssize_t _skip_target(const unsigned char* d, Py_ssize_t p, Py_ssize_t lim) noexcept:
    """First index >= p whose byte may not be in a request-target (or lim)."""
    cdef uint64_t x
    cdef Py_ssize_t stop
    while True:
        while p + 8 <= lim:
            memcpy(&x, d + p, 8)
            if ((x & _HIGHS) | _has_less(x, 0x21) | _has_byte(x, 0x7F) | _has_byte(x, 0x23)) != 0:
                break
            p += 8
        stop = p + 8 if p + 8 < lim else lim
        while p < stop and _TARGET[d[p]]:
            p += 1
        if p < stop or p >= lim:
            return p


# ---------------------------------------------------------------------------
# Limits

cdef class Limits:
    """Size limits for heads and trailer sections (Envoy's defaults)."""

    cdef readonly Py_ssize_t max_request_line
    cdef readonly Py_ssize_t max_header_bytes
    cdef readonly Py_ssize_t max_headers

    def __init__(self, Py_ssize_t max_request_line=8192, Py_ssize_t max_header_bytes=61440,
                 Py_ssize_t max_headers=100):
        if not 16 <= max_request_line <= (1 << 26):
            raise ValueError("max_request_line must be in 16..67108864")
        if not 16 <= max_header_bytes <= (1 << 26):
            raise ValueError("max_header_bytes must be in 16..67108864")
        if not 1 <= max_headers <= 65536:
            raise ValueError("max_headers must be in 1..65536")
        self.max_request_line = max_request_line
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers

    def __reduce__(self):
        return (Limits, (self.max_request_line, self.max_header_bytes, self.max_headers))

    def __repr__(self):
        return (f"Limits(max_request_line={self.max_request_line}, "
                f"max_header_bytes={self.max_header_bytes}, max_headers={self.max_headers})")


# ---------------------------------------------------------------------------
# Parse state shared by requests and responses

# Field kinds: the names the parser acts on.
cdef enum:
    K_OTHER = 0
    K_HOST
    K_CONTENT_LENGTH
    K_TRANSFER_ENCODING
    K_CONNECTION
    K_KEEP_ALIVE
    K_PROXY_CONNECTION
    K_TE
    K_TRAILER
    K_UPGRADE
    K_EXPECT

# Field flags
cdef enum:
    F_NOMINATED = 1     # named by a Connection option: hop-by-hop

# Connection options seen
cdef enum:
    C_CLOSE = 1
    C_KEEP_ALIVE = 2
    C_UPGRADE = 4

# Request-target forms
cdef enum:
    FORM_ORIGIN = 0
    FORM_ABSOLUTE
    FORM_AUTHORITY
    FORM_ASTERISK

ctypedef struct Field:
    uint32_t name_off
    uint32_t name_len
    uint32_t value_off
    uint32_t value_len
    uint8_t kind
    uint8_t flags

ctypedef struct Info:
    Py_ssize_t size
    uint32_t ls          # start of the request/status line
    uint32_t m_len       # method length (at ls)
    uint32_t t_off       # request-target
    uint32_t t_len
    uint32_t p_off       # path within the target
    uint32_t p_len
    uint32_t a_off       # authority of an absolute/authority-form target
    uint32_t a_len
    uint32_t r_off       # reason phrase
    uint32_t r_len
    int form
    int version
    int status
    int nfields
    int64_t content_length
    int cl_idx
    int te_idx
    int host_idx
    int upgrade_idx
    int n_upgrade
    int conn
    bint has_connection
    bint chunked
    bint expect_continue
    bint connect
    bint options

# Scratch array the parser fills; copied into the head when it is complete.
cdef Field* _scratch = NULL
cdef Py_ssize_t _scratch_cap = 0


cdef int _reserve(Py_ssize_t n) except -1:
    global _scratch, _scratch_cap
    cdef Field* grown
    if n <= _scratch_cap:
        return 0
    grown = <Field*>realloc(_scratch, n * sizeof(Field))
    if grown == NULL:
        raise MemoryError()
    _scratch = grown
    _scratch_cap = n
    return 0


cdef int _fail(bint resp, int status, str code, str reason) except -1:
    if resp:
        raise ProtocolError(reason, 502, "bad_response")
    raise ProtocolError(reason, status, code)


cdef inline bint _ieq(const unsigned char* s, const char* lit, Py_ssize_t n) noexcept:
    """s[:n] equals the lowercase literal, ignoring ASCII case."""
    cdef Py_ssize_t i
    for i in range(n):
        if _LOWER[s[i]] != <unsigned char>lit[i]:
            return False
    return True


cdef inline bint _ieq2(const unsigned char* a, const unsigned char* b, Py_ssize_t n) noexcept:
    cdef Py_ssize_t i
    for i in range(n):
        if _LOWER[a[i]] != _LOWER[b[i]]:
            return False
    return True


cdef inline int _classify(const unsigned char* s, Py_ssize_t n) noexcept:
    cdef unsigned char c0 = _LOWER[s[0]]
    if n == 4:
        if c0 == b'h' and _ieq(s, "host", 4):
            return K_HOST
    elif n == 14:
        if c0 == b'c' and _ieq(s, "content-length", 14):
            return K_CONTENT_LENGTH
    elif n == 17:
        if c0 == b't' and _ieq(s, "transfer-encoding", 17):
            return K_TRANSFER_ENCODING
    elif n == 10:
        if c0 == b'c' and _ieq(s, "connection", 10):
            return K_CONNECTION
        if c0 == b'k' and _ieq(s, "keep-alive", 10):
            return K_KEEP_ALIVE
    elif n == 16:
        if c0 == b'p' and _ieq(s, "proxy-connection", 16):
            return K_PROXY_CONNECTION
    elif n == 2:
        if c0 == b't' and _ieq(s, "te", 2):
            return K_TE
    elif n == 7:
        if c0 == b't' and _ieq(s, "trailer", 7):
            return K_TRAILER
        if c0 == b'u' and _ieq(s, "upgrade", 7):
            return K_UPGRADE
    elif n == 6:
        if c0 == b'e' and _ieq(s, "expect", 6):
            return K_EXPECT
    return K_OTHER


cdef bint _valid_authority(const unsigned char* s, Py_ssize_t n, bint need_host, bint need_port) noexcept:
    """`host [":" port]` (RFC 3986 3.2.2-3.2.3) without userinfo."""
    cdef Py_ssize_t i = 0, j
    if n == 0:
        return not need_host
    if s[0] == b'[':
        i = 1
        while i < n and _IPLIT[s[i]]:
            i += 1
        if i >= n or s[i] != b']' or i == 1:
            return False
        i += 1
    else:
        while i < n and _REGNAME[s[i]]:
            if s[i] == b'%':
                if i + 2 >= n or _HEX[s[i + 1]] < 0 or _HEX[s[i + 2]] < 0:
                    return False
                i += 2
            i += 1
        if i == 0:
            return False
    if i == n:
        return not need_port
    if s[i] != b':':
        return False
    i += 1
    j = i
    while i < n and 0x30 <= s[i] <= 0x39:
        i += 1
    if i != n or i - j > 5 or (need_port and i == j):
        return False
    return True


cdef int _parse_content_length(const unsigned char* s, Py_ssize_t n, bint resp, int64_t* out) except -1:
    cdef Py_ssize_t i
    cdef int64_t v = 0
    cdef int digit
    if n == 0:
        _fail(resp, 400, "bad_request", "empty Content-Length")
    for i in range(n):
        digit = <int>s[i] - 0x30
        if digit < 0 or digit > 9:
            if s[i] == b',':
                _fail(resp, 400, "bad_request", "Content-Length must be a single value")
            _fail(resp, 400, "bad_request", "invalid Content-Length")
        if v > (0x7FFFFFFFFFFFFFFF - digit) // 10:
            _fail(resp, 400, "bad_request", "Content-Length too large")
        v = v * 10 + digit
    out[0] = v
    return 0


cdef inline Py_ssize_t _next_element(const unsigned char* s, Py_ssize_t n, Py_ssize_t i,
                                     Py_ssize_t* es, Py_ssize_t* el) noexcept:
    """One element of a comma list from s[i:]: OWS-trimmed bounds; returns the
    index after its comma (n + 1 when it was the last one)."""
    cdef Py_ssize_t j
    while i < n and (s[i] == 32 or s[i] == 9):
        i += 1
    j = i
    while j < n and s[j] != b',':
        j += 1
    es[0] = i
    el[0] = j - i
    while el[0] > 0 and (s[i + el[0] - 1] == 32 or s[i + el[0] - 1] == 9):
        el[0] -= 1
    return j + 1


cdef inline bint _is_token(const unsigned char* s, Py_ssize_t n) noexcept:
    cdef Py_ssize_t i
    if n == 0:
        return False
    for i in range(n):
        if not _TCHAR[s[i]]:
            return False
    return True


cdef int _check_transfer_encoding(const unsigned char* s, Py_ssize_t n, bint resp) except -1:
    """Accept exactly one `chunked` coding, last (see the module docstring)."""
    cdef Py_ssize_t i = 0, es = 0, el = 0
    cdef int chunked = 0, others = 0
    cdef bint last_chunked = False
    if n == 0:
        _fail(resp, 400, "bad_request", "empty Transfer-Encoding")
    while i <= n:
        i = _next_element(s, n, i, &es, &el)
        if el == 0:
            _fail(resp, 400, "bad_request", "empty element in Transfer-Encoding")
        if not _is_token(s + es, el):
            _fail(resp, 400, "bad_request", "invalid Transfer-Encoding")
        if el == 7 and _ieq(s + es, "chunked", 7):
            chunked += 1
            last_chunked = True
        else:
            others += 1
            last_chunked = False
    if not last_chunked:
        _fail(resp, 400, "bad_request", "Transfer-Encoding does not end in chunked")
    if chunked > 1:
        _fail(resp, 400, "bad_request", "chunked applied more than once")
    if others:
        _fail(resp, 501, "unsupported_transfer_coding", "unsupported transfer coding")
    return 0


cdef int _scan_connection(const unsigned char* s, Py_ssize_t n, bint resp, Info* info) except -1:
    cdef Py_ssize_t i = 0, es = 0, el = 0
    while i <= n:
        i = _next_element(s, n, i, &es, &el)
        if el == 0:
            continue
        if not _is_token(s + es, el):
            _fail(resp, 400, "bad_request", "invalid Connection header")
        if el == 5 and _ieq(s + es, "close", 5):
            info.conn |= C_CLOSE
        elif el == 10 and _ieq(s + es, "keep-alive", 10):
            info.conn |= C_KEEP_ALIVE
        elif el == 7 and _ieq(s + es, "upgrade", 7):
            info.conn |= C_UPGRADE
    return 0


cdef void _mark_nominated(const unsigned char* d, Info* info) noexcept:
    """Flag every field a Connection option names (RFC 9110 7.6.1)."""
    cdef int i, j
    cdef Py_ssize_t k, n, es = 0, el = 0
    cdef const unsigned char* s
    cdef Field* f
    for i in range(info.nfields):
        if _scratch[i].kind != K_CONNECTION:
            continue
        s = d + _scratch[i].value_off
        n = _scratch[i].value_len
        k = 0
        while k <= n:
            k = _next_element(s, n, k, &es, &el)
            if el == 0:
                continue
            for j in range(info.nfields):
                f = &_scratch[j]
                if (f.name_len == el and f.kind != K_CONTENT_LENGTH and f.kind != K_TRANSFER_ENCODING
                        and f.kind != K_HOST and f.kind != K_UPGRADE
                        and _ieq2(d + f.name_off, s + es, el)):
                    f.flags |= F_NOMINATED


# ---------------------------------------------------------------------------
# The head parser

cdef int _request_line(const unsigned char* d, Py_ssize_t base, Py_ssize_t ls, Py_ssize_t end,
                       Limits limits, Info* info, Py_ssize_t* pos) except -1:
    """Parse the request line at d[ls:]; 1 and *pos after its CRLF, 0 if incomplete."""
    cdef Py_ssize_t hard = ls + limits.max_request_line + 1   # its CR must be before this
    cdef Py_ssize_t lim = end if end < hard else hard
    cdef Py_ssize_t p = ls, ts, vs, vlen
    cdef unsigned char c
    while p < lim and _TCHAR[d[p]]:
        p += 1
    if p >= lim:
        return _line_need(p, hard, False)
    if d[p] != 32 or p == ls:
        if p == ls and d[p] == 13:
            _fail(False, 400, "bad_request", "more than one empty line before the request line")
        if p == ls and d[p] == 10:
            _fail(False, 400, "bad_request", "bare LF line terminator")
        if p == ls and d[p] == 32:
            _fail(False, 400, "bad_request", "whitespace before the request line")
        if p == ls:
            _fail(False, 400, "bad_request", "invalid method")
        if d[p] == 13 or d[p] == 10:
            _fail(False, 400, "bad_request", "malformed request line")
        _fail(False, 400, "bad_request", "invalid character in method")
    info.m_len = <uint32_t>(p - ls)
    p += 1
    ts = p
    p = _skip_target(d, p, lim)
    if p >= lim:
        return _line_need(p, hard, False)
    if p == ts:
        if d[p] == 32:
            _fail(False, 400, "bad_request", "more than one space in the request line")
        if d[p] == 13 or d[p] == 10:
            _fail(False, 400, "bad_request", "malformed request line")
        _fail(False, 400, "bad_request", "invalid character in request-target")
    if d[p] != 32:
        if d[p] == 13 or d[p] == 10:
            _fail(False, 400, "bad_request", "missing HTTP version")
        if d[p] == 9:
            _fail(False, 400, "bad_request", "tab in the request line")
        _fail(False, 400, "bad_request", "invalid character in request-target")
    info.t_off = <uint32_t>(ts - base)
    info.t_len = <uint32_t>(p - ts)
    p += 1
    vs = p
    while p < lim and _VCHAR[d[p]]:
        p += 1
    if p >= lim:
        return _line_need(p, hard, False)
    c = d[p]
    if c != 13:
        if c == 10:
            _fail(False, 400, "bad_request", "bare LF line terminator")
        if c == 32 or c == 9:
            _fail(False, 400, "bad_request", "whitespace after the HTTP version")
        _fail(False, 400, "bad_version", "malformed HTTP version")
    if p + 1 >= end:
        return 0
    if d[p + 1] != 10:
        _fail(False, 400, "bad_request", "bare CR in the request line")
    vlen = p - vs
    info.version = _version(d + vs, vlen)
    if info.version == 0:
        _fail(False, 400, "bad_version", "malformed HTTP version")
    if info.version < 0:
        _fail(False, 505, "bad_version", "unsupported HTTP version")
    pos[0] = p + 2
    return 1


cdef inline int _line_need(Py_ssize_t p, Py_ssize_t hard, bint resp) except -1:
    if p >= hard:
        if resp:
            _fail(True, 502, "bad_response", "status line too long")
        _fail(False, 414, "request_line_too_long", "request line too long")
    return 0


cdef inline int _version(const unsigned char* v, Py_ssize_t n) noexcept:
    """10 or 11; -1 for another well-formed HTTP/x.y; 0 when malformed."""
    if n != 8 or memcmp(v, b"HTTP/", 5) != 0 or v[6] != b'.':
        return 0
    if not (0x30 <= v[5] <= 0x39 and 0x30 <= v[7] <= 0x39):
        return 0
    if v[5] == b'1' and v[7] == b'1':
        return 11
    if v[5] == b'1' and v[7] == b'0':
        return 10
    return -1


cdef int _target(const unsigned char* d, Info* info) except -1:
    """Classify the request-target (RFC 9112 3.2) and find its path/authority."""
    cdef const unsigned char* t = d + info.t_off
    cdef Py_ssize_t n = info.t_len, i, a
    cdef const unsigned char* m = d + info.ls
    info.connect = info.m_len == 7 and memcmp(m, b"CONNECT", 7) == 0
    info.options = info.m_len == 7 and memcmp(m, b"OPTIONS", 7) == 0
    if info.connect:
        if not _valid_authority(t, n, True, True):
            _fail(False, 400, "bad_request", "CONNECT needs an authority-form target (host:port)")
        info.form = FORM_AUTHORITY
        info.a_off = info.t_off
        info.a_len = info.t_len
        info.p_off = info.t_off
        info.p_len = 0
        return 0
    if t[0] == b'/':
        info.form = FORM_ORIGIN
        i = 0
        while i < n and t[i] != b'?':
            i += 1
        info.p_off = info.t_off
        info.p_len = <uint32_t>i
        return 0
    if n == 1 and t[0] == b'*':
        if not info.options:
            _fail(False, 400, "bad_request", "'*' target is only allowed with OPTIONS")
        info.form = FORM_ASTERISK
        info.p_off = info.t_off
        info.p_len = 1
        return 0
    # absolute-form: "http" / "https" "://" authority path-abempty [ "?" query ]
    if n >= 7 and _ieq(t, "http://", 7):
        i = 7
    elif n >= 8 and _ieq(t, "https://", 8):
        i = 8
    else:
        i = 0
        while i < n and t[i] != b':':
            i += 1
        if i < n and i > 0:
            _fail(False, 400, "bad_request", "unsupported URI scheme in request-target")
        _fail(False, 400, "bad_request", "invalid request-target")
    a = i
    while i < n and t[i] != b'/' and t[i] != b'?':
        i += 1
    if not _valid_authority(t + a, i - a, True, False):
        _fail(False, 400, "bad_request", "invalid authority in request-target")
    info.form = FORM_ABSOLUTE
    info.a_off = <uint32_t>(info.t_off + a)
    info.a_len = <uint32_t>(i - a)
    info.p_off = <uint32_t>(info.t_off + i)
    a = i
    while i < n and t[i] != b'?':
        i += 1
    info.p_len = <uint32_t>(i - a)
    return 0


cdef int _status_line(const unsigned char* d, Py_ssize_t base, Py_ssize_t ls, Py_ssize_t end,
                      Limits limits, Info* info, Py_ssize_t* pos) except -1:
    """Parse the status line at d[ls:]; 1 and *pos after its CRLF, 0 if incomplete."""
    cdef Py_ssize_t hard = ls + limits.max_request_line + 1
    cdef Py_ssize_t lim = end if end < hard else hard
    cdef Py_ssize_t p = ls, rs, k
    cdef int v, status = 0
    while p < lim and _VCHAR[d[p]]:
        p += 1
    if p >= lim:
        return _line_need(p, hard, True)
    if p == ls:
        if d[p] == 13:
            _fail(True, 502, "", "more than one empty line before the status line")
        _fail(True, 502, "", "malformed status line")
    v = _version(d + ls, p - ls)
    if v == 0:
        _fail(True, 502, "", "malformed HTTP version in status line")
    if v < 0:
        _fail(True, 502, "", "unsupported HTTP version in status line")
    info.version = v
    if d[p] != 32:
        _fail(True, 502, "", "malformed status line")
    p += 1
    for k in range(3):
        if p >= lim:
            return _line_need(p, hard, True)
        if not 0x30 <= d[p] <= 0x39:
            _fail(True, 502, "", "status code is not three digits")
        status = status * 10 + (d[p] - 0x30)
        p += 1
    if p >= lim:
        return _line_need(p, hard, True)
    if status < 100 or status > 599:
        _fail(True, 502, "", "status code out of range")
    info.status = status
    if d[p] == 32:
        p += 1
        rs = p
        while p < lim and _VALUE[d[p]]:
            p += 1
        if p >= lim:
            return _line_need(p, hard, True)
        info.r_off = <uint32_t>(rs - base)
        info.r_len = <uint32_t>(p - rs)
    else:
        info.r_off = <uint32_t>(p - base)
        info.r_len = 0
    if d[p] != 13:
        if d[p] == 10:
            _fail(True, 502, "", "bare LF line terminator")
        _fail(True, 502, "", "invalid character in status line")
    if p + 1 >= end:
        return 0
    if d[p + 1] != 10:
        _fail(True, 502, "", "bare CR in status line")
    pos[0] = p + 2
    return 1


cdef int _parse_head(const unsigned char* d, Py_ssize_t start, Py_ssize_t end, Limits limits,
                     bint resp, Info* info) except -1:
    """1 when d[start:end] holds a complete valid head (info filled, fields in
    _scratch), 0 when more bytes are needed; raises ProtocolError otherwise."""
    cdef Py_ssize_t p = start, ls, hs, hard, lim, ns, nlen, vs, ve
    cdef int n = 0, kind, r
    cdef int max_headers = <int>limits.max_headers
    cdef unsigned char c
    cdef Field* f

    if p >= end:
        return 0
    c = d[p]
    if c == 13:
        if p + 1 >= end:
            return 0
        if d[p + 1] != 10:
            _fail(resp, 400, "bad_request", "bare CR before the start line")
        p += 2
    elif c == 10:
        _fail(resp, 400, "bad_request", "bare LF line terminator")
    ls = p
    info.ls = <uint32_t>(ls - start)
    if p >= end:
        return 0
    if resp:
        r = _status_line(d, start, ls, end, limits, info, &p)
    else:
        r = _request_line(d, start, ls, end, limits, info, &p)
    if r == 0:
        return 0
    if not resp:
        _target(d + start, info)

    _reserve(limits.max_headers)
    hs = p
    hard = hs + limits.max_header_bytes   # the whole field section must end before this
    lim = end if end < hard else hard
    while True:
        if p >= lim:
            return _section_need(p, hard, resp)
        c = d[p]
        if c == 13:
            if p + 1 >= lim:
                return _section_need(p + 1, hard, resp)
            if d[p + 1] != 10:
                _fail(resp, 400, "bad_request", "bare CR in header section")
            p += 2
            break
        ns = p
        while p < lim and _TCHAR[d[p]]:
            p += 1
        if p >= lim:
            return _section_need(p, hard, resp)
        c = d[p]
        if c != b':' or p == ns:
            if p == ns:
                if c == 32 or c == 9:
                    _fail(resp, 400, "bad_request", "obs-fold not allowed" if n else
                          "whitespace before the first header field")
                if c == b':':
                    _fail(resp, 400, "bad_request", "empty header field name")
                if c == 10:
                    _fail(resp, 400, "bad_request", "bare LF line terminator")
            if c == 32 or c == 9:
                _fail(resp, 400, "bad_request", "whitespace between header field name and colon")
            if c == 13 or c == 10:
                _fail(resp, 400, "bad_request", "header field line without a colon")
            _fail(resp, 400, "bad_request", "invalid character in header field name")
        nlen = p - ns
        p += 1
        while p < lim and (d[p] == 32 or d[p] == 9):
            p += 1
        vs = p
        p = _skip_value(d, p, lim)
        if p >= lim:
            return _section_need(p, hard, resp)
        c = d[p]
        if c != 13:
            if c == 10:
                _fail(resp, 400, "bad_request", "bare LF line terminator")
            if c == 0:
                _fail(resp, 400, "bad_request", "NUL in header field value")
            _fail(resp, 400, "bad_request", "control character in header field value")
        if p + 1 >= lim:
            return _section_need(p + 1, hard, resp)
        if d[p + 1] != 10:
            _fail(resp, 400, "bad_request", "bare CR in header field value")
        ve = p
        while ve > vs and (d[ve - 1] == 32 or d[ve - 1] == 9):
            ve -= 1
        p += 2
        if n >= max_headers:
            if resp:
                _fail(True, 502, "", "too many header fields")
            _fail(False, 431, "too_many_headers", "too many header fields")
        kind = _classify(d + ns, nlen)
        f = &_scratch[n]
        f.name_off = <uint32_t>(ns - start)
        f.name_len = <uint32_t>nlen
        f.value_off = <uint32_t>(vs - start)
        f.value_len = <uint32_t>(ve - vs)
        f.kind = <uint8_t>kind
        f.flags = 0
        if kind != K_OTHER:
            _field(d + vs, ve - vs, kind, n, resp, info)
        n += 1
    info.nfields = n
    info.size = p - start
    _semantics(d + start, resp, info)
    return 1


cdef inline int _section_need(Py_ssize_t p, Py_ssize_t hard, bint resp) except -1:
    if p >= hard:
        if resp:
            _fail(True, 502, "", "response header section too large")
        _fail(False, 431, "headers_too_large", "header section too large")
    return 0


cdef int _field(const unsigned char* v, Py_ssize_t n, int kind, int idx, bint resp, Info* info) except -1:
    """Act on one field the parser knows, as soon as it is read."""
    if kind == K_HOST:
        if resp:
            return 0
        if info.host_idx >= 0:
            _fail(resp, 400, "bad_request", "duplicate Host header")
        info.host_idx = idx
        if not resp and not _valid_authority(v, n, False, False):
            _fail(False, 400, "bad_request", "invalid Host header")
    elif kind == K_CONTENT_LENGTH:
        if info.cl_idx >= 0:
            _fail(resp, 400, "bad_request", "duplicate Content-Length")
        info.cl_idx = idx
        _parse_content_length(v, n, resp, &info.content_length)
    elif kind == K_TRANSFER_ENCODING:
        if info.te_idx >= 0:
            _fail(resp, 400, "bad_request", "duplicate Transfer-Encoding")
        info.te_idx = idx
    elif kind == K_CONNECTION:
        info.has_connection = True
        _scan_connection(v, n, resp, info)
    elif kind == K_EXPECT:
        if n == 12 and _ieq(v, "100-continue", 12):
            info.expect_continue = True
    elif kind == K_UPGRADE:
        if info.upgrade_idx < 0:
            info.upgrade_idx = idx
        info.n_upgrade += 1
    return 0


cdef int _semantics(const unsigned char* h, bint resp, Info* info) except -1:
    """Checks across fields, once the head is complete (h = head start)."""
    cdef Field* f
    if info.te_idx >= 0:
        if info.cl_idx >= 0:
            _fail(resp, 400, "bad_request", "both Content-Length and Transfer-Encoding")
        if info.version == 10:
            _fail(resp, 400, "bad_request", "Transfer-Encoding in an HTTP/1.0 message")
        f = &_scratch[info.te_idx]
        _check_transfer_encoding(h + f.value_off, f.value_len, resp)
        info.chunked = True
    if not resp:
        if info.version == 11 and info.host_idx < 0:
            _fail(False, 400, "bad_request", "missing Host header")
        if info.version == 10:
            info.expect_continue = False   # RFC 9110 10.1.1: ignored in HTTP/1.0
    if info.has_connection:
        _mark_nominated(h, info)
    return 0


cdef inline void _info_init(Info* info) noexcept:
    info.size = 0
    info.ls = 0
    info.m_len = 0
    info.t_off = info.t_len = 0
    info.p_off = info.p_len = 0
    info.a_off = info.a_len = 0
    info.r_off = info.r_len = 0
    info.form = FORM_ORIGIN
    info.version = 0
    info.status = 0
    info.nfields = 0
    info.content_length = -1
    info.cl_idx = -1
    info.te_idx = -1
    info.host_idx = -1
    info.upgrade_idx = -1
    info.n_upgrade = 0
    info.conn = 0
    info.has_connection = False
    info.chunked = False
    info.expect_continue = False
    info.connect = False
    info.options = False


cdef int _acquire(object data, Py_buffer* view, const unsigned char** ptr, Py_ssize_t* size) except -1:
    """Point at the bytes of `data`; 1 when `view` must be released."""
    if PyBytes_CheckExact(data):
        ptr[0] = <const unsigned char*>PyBytes_AS_STRING(data)
        size[0] = PyBytes_GET_SIZE(data)
        return 0
    if PyByteArray_CheckExact(data):
        # Safe without a buffer export: nothing below runs Python code before
        # the head bytes are copied.
        ptr[0] = <const unsigned char*>PyByteArray_AS_STRING(data)
        size[0] = PyByteArray_GET_SIZE(data)
        return 0
    PyObject_GetBuffer(data, view, PyBUF_SIMPLE)
    ptr[0] = <const unsigned char*>view.buf
    size[0] = view.len
    return 1


cdef inline int _check_range(Py_ssize_t start, Py_ssize_t end, Py_ssize_t size) except -1:
    if start < 0 or end < start or end > size:
        raise ValueError(f"bad range [{start}:{end}] for a buffer of {size} bytes")
    return 0


cdef Field* _copy_fields(int n) except NULL:
    cdef Field* fields = <Field*>malloc((n if n > 0 else 1) * sizeof(Field))
    if fields == NULL:
        raise MemoryError()
    if n > 0:
        memcpy(fields, _scratch, n * sizeof(Field))
    return fields


# ---------------------------------------------------------------------------
# Heads

cdef bytes _B_EMPTY = b""
cdef bytes _B_SLASH = b"/"
cdef bytes _B_STAR = b"*"
cdef tuple _METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS",
                       b"TRACE", b"PATCH")


cdef class _Head:
    """What both heads share: the head bytes, their fields, field lookups."""

    cdef bytes _raw
    cdef const unsigned char* _p
    cdef Field* _fields
    cdef Info _i
    cdef object _headers
    cdef object _upgrade
    cdef readonly int version
    cdef readonly long long content_length
    cdef readonly bint chunked
    cdef readonly bint keep_alive
    cdef readonly Py_ssize_t size

    def __init__(self):
        raise TypeError("heads are made by parse_request() / parse_response()")

    def __dealloc__(self):
        free(self._fields)

    cdef inline bytes _slice(self, uint32_t off, uint32_t n):
        return PyBytes_FromStringAndSize(<const char*>self._p + off, n)

    cdef void _init(self, bytes raw, Field* fields, Info* info):
        self._raw = raw
        self._p = <const unsigned char*>PyBytes_AS_STRING(raw)
        self._fields = fields
        self._i = info[0]
        self.version = info.version
        self.content_length = info.content_length
        self.chunked = info.chunked
        self.size = info.size

    cdef object _upgrade_value(self):
        """The Upgrade field value(s), joined when repeated."""
        cdef int i
        cdef Field* f
        if self._i.upgrade_idx < 0:
            return None
        f = &self._fields[self._i.upgrade_idx]
        if self._i.n_upgrade == 1:
            return self._slice(f.value_off, f.value_len)
        return b", ".join(self.get_all(b"upgrade"))

    @property
    def upgrade(self):
        """The Upgrade field value when Connection lists "upgrade", else None."""
        return self._upgrade

    @property
    def raw(self) -> bytes:
        """The head bytes as received (`size` bytes)."""
        return self._raw

    def get(self, name) -> bytes | None:
        """The first value of a field (name compared case-insensitively), OWS-trimmed."""
        cdef const unsigned char* s
        cdef Py_ssize_t n
        cdef int i
        cdef Field* f
        if not PyBytes_CheckExact(name):
            name = bytes(name)
        s = <const unsigned char*>PyBytes_AS_STRING(name)
        n = PyBytes_GET_SIZE(name)
        for i in range(self._i.nfields):
            f = &self._fields[i]
            if f.name_len == n and _ieq2(self._p + f.name_off, s, n):
                return self._slice(f.value_off, f.value_len)
        return None

    def get_all(self, name) -> list:
        """Every value of a field, in order."""
        cdef const unsigned char* s
        cdef Py_ssize_t n
        cdef int i
        cdef Field* f
        cdef list out = []
        if not PyBytes_CheckExact(name):
            name = bytes(name)
        s = <const unsigned char*>PyBytes_AS_STRING(name)
        n = PyBytes_GET_SIZE(name)
        for i in range(self._i.nfields):
            f = &self._fields[i]
            if f.name_len == n and _ieq2(self._p + f.name_off, s, n):
                out.append(self._slice(f.value_off, f.value_len))
        return out

    @property
    def headers(self) -> list:
        """[(name as sent, OWS-trimmed value)] in order, hop-by-hop fields included."""
        cdef int i
        cdef Field* f
        cdef list out
        if self._headers is None:
            out = []
            for i in range(self._i.nfields):
                f = &self._fields[i]
                out.append((self._slice(f.name_off, f.name_len), self._slice(f.value_off, f.value_len)))
            self._headers = out
        return list(self._headers)

    cdef Py_ssize_t _fields_out(self, char* out, bint keep_upgrade, tuple drop) except -1:
        """Write (out != NULL) or measure the forwarded field lines."""
        cdef int i, j, kind
        cdef Py_ssize_t total = 0, n, vlen
        cdef Field* f
        cdef bytes name
        cdef char digits[24]
        cdef int ndig
        cdef long long v
        cdef bint keep_up = keep_upgrade and self._upgrade is not None
        cdef bint replaced_host = self._i.form == FORM_ABSOLUTE or self._i.form == FORM_AUTHORITY
        cdef Py_ssize_t ndrop = len(drop)
        for i in range(self._i.nfields):
            f = &self._fields[i]
            kind = f.kind
            if kind != K_OTHER:
                if (kind == K_CONNECTION or kind == K_KEEP_ALIVE or kind == K_PROXY_CONNECTION
                        or kind == K_TE or kind == K_TRAILER):
                    continue
                if kind == K_UPGRADE and not keep_up:
                    continue
                if kind == K_HOST and replaced_host:
                    continue
            if f.flags & F_NOMINATED:
                continue
            if ndrop:
                for j in range(ndrop):
                    name = <bytes>drop[j]
                    if (PyBytes_GET_SIZE(name) == f.name_len and
                            _ieq2(self._p + f.name_off, <const unsigned char*>PyBytes_AS_STRING(name),
                                  f.name_len)):
                        break
                else:
                    j = -1
                if j >= 0:
                    continue
            vlen = f.value_len
            if kind == K_CONTENT_LENGTH and vlen > 1 and self._p[f.value_off] == b'0':
                # Leading zeros: re-send the plain decimal value.
                v = self.content_length
                ndig = 0
                while True:
                    digits[ndig] = <char>(0x30 + v % 10)
                    ndig += 1
                    v //= 10
                    if v == 0:
                        break
                if out != NULL:
                    memcpy(out + total, self._p + f.name_off, f.name_len)
                    total += f.name_len
                    out[total] = b':'
                    out[total + 1] = b' '
                    total += 2
                    for j in range(ndig):
                        out[total + j] = digits[ndig - 1 - j]
                    total += ndig
                    out[total] = b'\r'
                    out[total + 1] = b'\n'
                    total += 2
                else:
                    total += f.name_len + 4 + ndig
                continue
            if out != NULL:
                memcpy(out + total, self._p + f.name_off, f.name_len)
                total += f.name_len
                out[total] = b':'
                out[total + 1] = b' '
                total += 2
                memcpy(out + total, self._p + f.value_off, vlen)
                total += vlen
                out[total] = b'\r'
                out[total + 1] = b'\n'
                total += 2
            else:
                total += f.name_len + 4 + vlen
        if keep_up:
            if out != NULL:
                memcpy(out + total, b"Connection: upgrade\r\n", 21)
            total += 21
        return total


cdef inline tuple _drop_tuple(object drop):
    if drop is None:
        return ()
    if type(drop) is tuple:
        for name in <tuple>drop:
            if not PyBytes_CheckExact(name):
                break
        else:
            return <tuple>drop
    return tuple([bytes(name) for name in drop])


cdef bint _named(bytes name, tuple names):
    cdef bytes n
    for n in names:
        if PyBytes_GET_SIZE(n) == PyBytes_GET_SIZE(name) and _ieq2(
                <const unsigned char*>PyBytes_AS_STRING(n), <const unsigned char*>PyBytes_AS_STRING(name),
                PyBytes_GET_SIZE(name)):
            return True
    return False


cdef class RequestHead(_Head):
    """A parsed request head. Made by `parse_request()`."""

    cdef object _method
    cdef object _target
    cdef object _path
    cdef object _host
    cdef bint _host_done
    cdef readonly bint expect_continue

    @property
    def method(self) -> bytes:
        cdef bytes m
        cdef Py_ssize_t n
        if self._method is None:
            n = self._i.m_len
            for m in _METHODS:
                if PyBytes_GET_SIZE(m) == n and memcmp(PyBytes_AS_STRING(m), self._p + self._i.ls, n) == 0:
                    self._method = m
                    break
            else:
                self._method = self._slice(self._i.ls, self._i.m_len)
        return self._method

    @property
    def target(self) -> bytes:
        """The request-target as sent."""
        if self._target is None:
            self._target = self._slice(self._i.t_off, self._i.t_len)
        return self._target

    @property
    def path(self) -> bytes:
        """The target's path: up to '?' for origin-form; for absolute-form the
        URI's path ("/" when empty, "*" for OPTIONS); "*" for asterisk-form;
        empty for CONNECT."""
        if self._path is None:
            if self._i.form == FORM_ORIGIN and self._i.p_len == self._i.t_len:
                self._path = self.target
            elif self._i.form == FORM_ABSOLUTE and self._i.p_len == 0:
                self._path = _B_STAR if self._i.options else _B_SLASH
            elif self._i.form == FORM_AUTHORITY:
                self._path = _B_EMPTY
            else:
                self._path = self._slice(self._i.p_off, self._i.p_len)
        return self._path

    @property
    def host(self):
        """The target's authority (absolute-form, CONNECT), else the Host value, else None."""
        cdef Field* f
        if not self._host_done:
            if self._i.form == FORM_ABSOLUTE or self._i.form == FORM_AUTHORITY:
                self._host = self._slice(self._i.a_off, self._i.a_len)
            elif self._i.host_idx >= 0:
                f = &self._fields[self._i.host_idx]
                self._host = self._slice(f.value_off, f.value_len)
            self._host_done = True
        return self._host

    def serialize(self, extra=b"", bint keep_upgrade=False, drop=()) -> bytes:
        """The head to send upstream.

        `HTTP/1.1` request line (an absolute-form target becomes origin-form and
        its authority the Host field, sent first), then every field except the
        hop-by-hop ones (Connection, Keep-Alive, Proxy-Connection, TE, Trailer,
        Upgrade, and the fields Connection names) and those named in `drop`
        (lowercase names), then `extra` (ready "name: value\\r\\n" lines), then
        the empty line. With `keep_upgrade` and an upgrade request, Upgrade is
        kept and "Connection: upgrade" added. An HTTP/1.0 request without Host
        gets an empty one (HTTP/1.1 requires it) unless `drop` names "host".
        """
        cdef bytes ex = extra if PyBytes_CheckExact(extra) else bytes(extra)
        cdef tuple dr = _drop_tuple(drop)
        cdef Info* i = &self._i
        cdef Py_ssize_t tlen, fields_len, total, pos
        cdef const unsigned char* tp
        cdef Py_ssize_t q_off = 0, q_len = 0
        cdef bytes out
        cdef char* o
        cdef bint host_line = i.form == FORM_ABSOLUTE or i.form == FORM_AUTHORITY
        cdef bint empty_host = False
        if not host_line and i.host_idx < 0:
            # HTTP/1.0 without Host, sent on as HTTP/1.1: which requires one,
            # empty when the target has no authority (RFC 9112 3.2).
            empty_host = not _named(b"host", dr)
        # request-target to send
        if i.form == FORM_ABSOLUTE:
            q_off = i.p_off + i.p_len
            q_len = i.t_off + i.t_len - q_off
            if i.p_len == 0:
                tlen = 1 + q_len
            else:
                tlen = i.p_len + q_len
        else:
            tlen = i.t_len
        fields_len = self._fields_out(NULL, keep_upgrade, dr)
        total = i.m_len + 1 + tlen + 11 + fields_len + PyBytes_GET_SIZE(ex) + 2
        if host_line:
            total += 8 + i.a_len
        elif empty_host:
            total += 8
        out = PyBytes_FromStringAndSize(NULL, total)
        o = PyBytes_AS_STRING(out)
        memcpy(o, self._p + i.ls, i.m_len)
        pos = i.m_len
        o[pos] = b' '
        pos += 1
        if i.form == FORM_ABSOLUTE:
            if i.p_len == 0:
                o[pos] = b'*' if (i.options and q_len == 0) else b'/'
                pos += 1
            else:
                memcpy(o + pos, self._p + i.p_off, i.p_len)
                pos += i.p_len
            memcpy(o + pos, self._p + q_off, q_len)
            pos += q_len
        else:
            memcpy(o + pos, self._p + i.t_off, i.t_len)
            pos += i.t_len
        memcpy(o + pos, b" HTTP/1.1\r\n", 11)
        pos += 11
        if host_line:
            memcpy(o + pos, b"Host: ", 6)
            pos += 6
            memcpy(o + pos, self._p + i.a_off, i.a_len)
            pos += i.a_len
            o[pos] = b'\r'
            o[pos + 1] = b'\n'
            pos += 2
        elif empty_host:
            memcpy(o + pos, b"Host: \r\n", 8)
            pos += 8
        pos += self._fields_out(o + pos, keep_upgrade, dr)
        memcpy(o + pos, PyBytes_AS_STRING(ex), PyBytes_GET_SIZE(ex))
        pos += PyBytes_GET_SIZE(ex)
        o[pos] = b'\r'
        o[pos + 1] = b'\n'
        return out

    def __repr__(self):
        return (f"<RequestHead {self.method.decode('latin-1')} {self.target.decode('latin-1')} "
                f"HTTP/{self.version // 10}.{self.version % 10} fields={self._i.nfields} size={self.size}>")


cdef class ResponseHead(_Head):
    """A parsed response head. Made by `parse_response()`."""

    cdef readonly int status
    cdef readonly int body

    @property
    def reason(self) -> bytes:
        return self._slice(self._i.r_off, self._i.r_len)

    def serialize(self, extra=b"", bint keep_upgrade=False, drop=()) -> bytes:
        """The head to send downstream: `HTTP/1.1` status line, the fields
        without hop-by-hop ones and `drop`, `extra`, the empty line (see
        `RequestHead.serialize`)."""
        cdef bytes ex = extra if PyBytes_CheckExact(extra) else bytes(extra)
        cdef tuple dr = _drop_tuple(drop)
        cdef Py_ssize_t fields_len, total, pos
        cdef bytes out
        cdef char* o
        cdef int s = self.status
        fields_len = self._fields_out(NULL, keep_upgrade, dr)
        total = 13 + self._i.r_len + 2 + fields_len + PyBytes_GET_SIZE(ex) + 2
        out = PyBytes_FromStringAndSize(NULL, total)
        o = PyBytes_AS_STRING(out)
        memcpy(o, b"HTTP/1.1 ", 9)
        o[9] = <char>(0x30 + s // 100)
        o[10] = <char>(0x30 + (s // 10) % 10)
        o[11] = <char>(0x30 + s % 10)
        o[12] = b' '
        memcpy(o + 13, self._p + self._i.r_off, self._i.r_len)
        pos = 13 + self._i.r_len
        o[pos] = b'\r'
        o[pos + 1] = b'\n'
        pos += 2
        pos += self._fields_out(o + pos, keep_upgrade, dr)
        memcpy(o + pos, PyBytes_AS_STRING(ex), PyBytes_GET_SIZE(ex))
        pos += PyBytes_GET_SIZE(ex)
        o[pos] = b'\r'
        o[pos + 1] = b'\n'
        return out

    def __repr__(self):
        return (f"<ResponseHead HTTP/{self.version // 10}.{self.version % 10} {self.status} "
                f"body={self.body} fields={self._i.nfields} size={self.size}>")


def parse_request(data, Py_ssize_t start, Py_ssize_t end, Limits limits not None):
    """Parse the request head at data[start:end]: a RequestHead, or None while incomplete.

    Raises ProtocolError for an invalid head or one over `limits` (even while
    incomplete). The head copies its `size` bytes: `data` may be reused after.
    """
    cdef Py_buffer view
    cdef const unsigned char* d
    cdef Py_ssize_t n
    cdef Info info
    cdef int got
    cdef bytes raw
    cdef Field* fields
    cdef RequestHead h
    cdef int release = _acquire(data, &view, &d, &n)
    try:
        _check_range(start, end, n)
        _info_init(&info)
        got = _parse_head(d, start, end, limits, False, &info)
        if not got:
            return None
        raw = PyBytes_FromStringAndSize(<const char*>d + start, info.size)
        # Out of the shared scratch array before anything can run Python code.
        fields = _copy_fields(info.nfields)
    finally:
        if release:
            PyBuffer_Release(&view)
    try:
        h = RequestHead.__new__(RequestHead)
    except BaseException:
        free(fields)
        raise
    h._init(raw, fields, &info)
    h.expect_continue = info.expect_continue
    if info.version == 11:
        h.keep_alive = not (info.conn & C_CLOSE)
    else:
        h.keep_alive = (info.conn & C_KEEP_ALIVE) and not (info.conn & C_CLOSE)
    if info.version == 11 and (info.conn & C_UPGRADE):
        h._upgrade = h._upgrade_value()
    return h


def parse_response(data, Py_ssize_t start, Py_ssize_t end, Limits limits not None, request_method):
    """Parse the response head at data[start:end]: a ResponseHead, or None while incomplete.

    `request_method` (bytes) decides the body per RFC 9112 6.3: none after
    HEAD, none (a tunnel) after a 2xx to CONNECT. Errors are ProtocolError
    502 `bad_response`.
    """
    cdef Py_buffer view
    cdef const unsigned char* d
    cdef Py_ssize_t n
    cdef Info info
    cdef int got, status
    cdef bytes raw
    cdef Field* fields
    cdef ResponseHead h
    cdef bint keep
    cdef bytes method = request_method if PyBytes_CheckExact(request_method) else bytes(request_method)
    cdef int release = _acquire(data, &view, &d, &n)
    try:
        _check_range(start, end, n)
        _info_init(&info)
        got = _parse_head(d, start, end, limits, True, &info)
        if not got:
            return None
        raw = PyBytes_FromStringAndSize(<const char*>d + start, info.size)
        # Out of the shared scratch array before anything can run Python code.
        fields = _copy_fields(info.nfields)
    finally:
        if release:
            PyBuffer_Release(&view)
    try:
        h = ResponseHead.__new__(ResponseHead)
    except BaseException:
        free(fields)
        raise
    h._init(raw, fields, &info)
    status = info.status
    h.status = status
    if info.version == 11:
        keep = not (info.conn & C_CLOSE)
    else:
        keep = (info.conn & C_KEEP_ALIVE) and not (info.conn & C_CLOSE)
    if status < 200 or status == 204 or status == 304 or method == b"HEAD":
        h.body = BODY_NONE
        if status == 101:
            keep = False
    elif method == b"CONNECT" and status < 300:
        h.body = BODY_NONE   # the connection becomes a tunnel
        keep = False
    elif info.chunked:
        h.body = BODY_CHUNKED
    elif info.cl_idx >= 0:
        h.body = BODY_LENGTH
    else:
        h.body = BODY_UNTIL_CLOSE
        keep = False
    h.keep_alive = keep
    if info.version == 11 and (info.conn & C_UPGRADE):
        h._upgrade = h._upgrade_value()
    return h


# ---------------------------------------------------------------------------
# Chunked bodies

cdef enum:
    S_SIZE_START = 0    # first hex digit of a chunk size
    S_SIZE              # more hex digits, ';', BWS or CR
    S_SIZE_BWS          # whitespace after the size: only ';' may follow
    S_EXT_PRE_NAME      # after ';': BWS, then an extension name
    S_EXT_NAME
    S_EXT_POST_NAME     # BWS after a name: '=' or ';'
    S_EXT_PRE_VAL       # after '=': BWS, then a token or a quoted string
    S_EXT_TVAL
    S_EXT_QVAL
    S_EXT_QPAIR
    S_EXT_QEND          # after the closing quote: ';', BWS or CR
    S_EXT_POST_VAL      # BWS after a value: ';'
    S_SIZE_LF           # CR seen at the end of the size line
    S_DATA
    S_DATA_CR
    S_DATA_LF
    S_TR_LINE           # start of a trailer line (or the final CRLF)
    S_TR_NAME
    S_TR_VALUE
    S_TR_LF
    S_END_LF            # CR of the final empty line seen
    S_DONE
    S_FAILED


cdef class ChunkedScanner:
    """Walks a chunked body (RFC 9112 7.1) to find where it ends, validating the
    framing; the caller forwards the bytes verbatim.

    Chunk sizes are 1-16 hex digits (at most 2**63-1) with nothing around
    them but chunk extensions (`;name`, `;name=token`, `;name="quoted"`, BWS
    around ';' and '='); a size line may be `MAX_CHUNK_LINE` bytes. Data must
    be followed by exactly CRLF. Trailer fields are checked like header fields
    and bounded by the limits' `max_header_bytes` and `max_headers`;
    Content-Length, Transfer-Encoding and Host are refused there. Errors are
    ProtocolError code `bad_chunk`, status 400 (502 with `response=True`).
    """

    cdef int _state
    cdef uint64_t _size
    cdef int _digits
    cdef Py_ssize_t _line
    cdef Py_ssize_t _trailer_bytes
    cdef Py_ssize_t _trailers
    cdef Py_ssize_t _max_trailer_bytes
    cdef Py_ssize_t _max_trailers
    cdef int _status
    cdef unsigned char _name[24]
    cdef int _name_len
    cdef readonly bint done

    def __init__(self, Limits limits not None, bint response=False):
        self._max_trailer_bytes = limits.max_header_bytes
        self._max_trailers = limits.max_headers
        self._status = 502 if response else 400
        self.reset()

    def reset(self) -> None:
        """Start over, for the next chunked body."""
        self._state = S_SIZE_START
        self._size = 0
        self._digits = 0
        self._line = 0
        self._trailer_bytes = 0
        self._trailers = 0
        self._name_len = 0
        self.done = False

    @property
    def remaining(self) -> int:
        """Data bytes still expected in the current chunk."""
        return self._size if self._state == S_DATA else 0

    cdef int _bad(self, str reason) except -1:
        self._state = S_FAILED
        raise ProtocolError(reason, self._status, "bad_chunk")

    def scan(self, data, Py_ssize_t start, Py_ssize_t end) -> int:
        """How many bytes of data[start:end] belong to the body (stops at its end)."""
        cdef Py_buffer view
        cdef const unsigned char* d
        cdef Py_ssize_t n, p
        cdef int release = _acquire(data, &view, &d, &n)
        try:
            _check_range(start, end, n)
            p = self._run(d, start, end)
        finally:
            if release:
                PyBuffer_Release(&view)
        return p - start

    cdef Py_ssize_t _run(self, const unsigned char* d, Py_ssize_t p, Py_ssize_t end) except -1:
        cdef int st = self._state
        cdef unsigned char c
        cdef Py_ssize_t take
        cdef int h
        if st == S_FAILED:
            self._bad("chunked body already failed")
        while p < end:
            if st == S_DATA:
                take = end - p
                if <uint64_t>take > self._size:
                    take = <Py_ssize_t>self._size
                p += take
                self._size -= take
                if self._size == 0:
                    st = S_DATA_CR
                continue
            if st == S_DONE:
                break
            c = d[p]
            p += 1
            if st <= S_SIZE_LF:
                self._line += 1
                if self._line > MAX_CHUNK_LINE + 2:
                    self._bad("chunk size line too long")
            if st == S_SIZE_START:
                h = _HEX[c]
                if h < 0:
                    self._bad("invalid chunk size" if c != 13 else "empty chunk size")
                self._size = h
                self._digits = 1
                st = S_SIZE
            elif st == S_SIZE:
                h = _HEX[c]
                if h >= 0:
                    self._digits += 1
                    if self._digits > 16 or self._size >= (<uint64_t>1 << 59):
                        self._bad("chunk size too large")
                    self._size = self._size * 16 + h
                elif c == 13:
                    st = S_SIZE_LF
                elif c == b';':
                    st = S_EXT_PRE_NAME
                elif c == 32 or c == 9:
                    st = S_SIZE_BWS
                else:
                    self._bad("invalid chunk size")
            elif st == S_SIZE_BWS:
                if c == b';':
                    st = S_EXT_PRE_NAME
                elif not (c == 32 or c == 9):
                    self._bad("whitespace after chunk size")
            elif st == S_EXT_PRE_NAME:
                if _TCHAR[c]:
                    st = S_EXT_NAME
                elif not (c == 32 or c == 9):
                    self._bad("invalid chunk extension")
            elif st == S_EXT_NAME:
                if _TCHAR[c]:
                    pass
                elif c == 13:
                    st = S_SIZE_LF
                elif c == b'=':
                    st = S_EXT_PRE_VAL
                elif c == b';':
                    st = S_EXT_PRE_NAME
                elif c == 32 or c == 9:
                    st = S_EXT_POST_NAME
                else:
                    self._bad("invalid chunk extension")
            elif st == S_EXT_POST_NAME:
                if c == b'=':
                    st = S_EXT_PRE_VAL
                elif c == b';':
                    st = S_EXT_PRE_NAME
                elif not (c == 32 or c == 9):
                    self._bad("whitespace at the end of a chunk extension" if c == 13
                              else "invalid chunk extension")
            elif st == S_EXT_PRE_VAL:
                if _TCHAR[c]:
                    st = S_EXT_TVAL
                elif c == b'"':
                    st = S_EXT_QVAL
                elif not (c == 32 or c == 9):
                    self._bad("invalid chunk extension value")
            elif st == S_EXT_TVAL:
                if _TCHAR[c]:
                    pass
                elif c == 13:
                    st = S_SIZE_LF
                elif c == b';':
                    st = S_EXT_PRE_NAME
                elif c == 32 or c == 9:
                    st = S_EXT_POST_VAL
                else:
                    self._bad("invalid chunk extension value")
            elif st == S_EXT_QVAL:
                if c == b'"':
                    st = S_EXT_QEND
                elif c == b'\\':
                    st = S_EXT_QPAIR
                elif not _QDTEXT[c]:
                    self._bad("invalid character in quoted chunk extension")
            elif st == S_EXT_QPAIR:
                if not _VALUE[c]:
                    self._bad("invalid character in quoted chunk extension")
                st = S_EXT_QVAL
            elif st == S_EXT_QEND:
                if c == b';':
                    st = S_EXT_PRE_NAME
                elif c == 13:
                    st = S_SIZE_LF
                elif c == 32 or c == 9:
                    st = S_EXT_POST_VAL
                else:
                    self._bad("invalid chunk extension")
            elif st == S_EXT_POST_VAL:
                if c == b';':
                    st = S_EXT_PRE_NAME
                elif not (c == 32 or c == 9):
                    self._bad("whitespace at the end of a chunk extension" if c == 13
                              else "invalid chunk extension")
            elif st == S_SIZE_LF:
                if c != 10:
                    self._bad("bare CR in chunk size line")
                self._line = 0
                st = S_DATA if self._size else S_TR_LINE
            elif st == S_DATA_CR:
                if c != 13:
                    self._bad("chunk data not followed by CRLF")
                st = S_DATA_LF
            elif st == S_DATA_LF:
                if c != 10:
                    self._bad("chunk data not followed by CRLF")
                st = S_SIZE_START
            else:
                # trailer section
                self._trailer_bytes += 1
                if self._trailer_bytes > self._max_trailer_bytes:
                    self._bad("trailer section too large")
                if st == S_TR_LINE:
                    if c == 13:
                        st = S_END_LF
                    elif _TCHAR[c]:
                        self._trailers += 1
                        if self._trailers > self._max_trailers:
                            self._bad("too many trailer fields")
                        self._name[0] = _LOWER[c]
                        self._name_len = 1
                        st = S_TR_NAME
                    elif c == 32 or c == 9:
                        self._bad("obs-fold not allowed in trailers")
                    elif c == b':':
                        self._bad("empty trailer field name")
                    else:
                        self._bad("invalid trailer field")
                elif st == S_TR_NAME:
                    if _TCHAR[c]:
                        if self._name_len < 24:
                            self._name[self._name_len] = _LOWER[c]
                        self._name_len += 1
                    elif c == b':':
                        self._check_trailer_name()
                        st = S_TR_VALUE
                    elif c == 32 or c == 9:
                        self._bad("whitespace between trailer field name and colon")
                    else:
                        self._bad("invalid character in trailer field name")
                elif st == S_TR_VALUE:
                    if _VALUE[c]:
                        pass
                    elif c == 13:
                        st = S_TR_LF
                    else:
                        self._bad("invalid character in trailer field value")
                elif st == S_TR_LF:
                    if c != 10:
                        self._bad("bare CR in trailer field")
                    st = S_TR_LINE
                elif st == S_END_LF:
                    if c != 10:
                        self._bad("bare CR at the end of the trailer section")
                    st = S_DONE
                    self.done = True
                    break
        self._state = st
        return p

    cdef int _check_trailer_name(self) except -1:
        cdef int n = self._name_len
        if ((n == 14 and memcmp(self._name, b"content-length", 14) == 0)
                or (n == 17 and memcmp(self._name, b"transfer-encoding", 17) == 0)
                or (n == 4 and memcmp(self._name, b"host", 4) == 0)):
            self._bad("framing or routing field in trailers")
        return 0
