# cython: language_level=3
"""An access log record as one JSON line, in C: `proxy.telemetry.access_log.json_line`.

Written once per logged request, where the same formatting as Python calls cost several
microseconds. Values that are plain printable ASCII (nearly all of them: names, methods,
paths, ids, addresses) are copied as they are; anything else goes through the Python
encoder (`fallback`), so both produce the very same line.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_CheckExact
from libc.stdio cimport snprintf
from libc.string cimport memcpy


cdef extern from "Python.h":
    int PyUnicode_IS_ASCII(object)
    const char* PyUnicode_AsUTF8AndSize(object, Py_ssize_t*) except NULL
    object PyUnicode_DecodeASCII(const char*, Py_ssize_t, const char*)

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct tm:
        int tm_sec, tm_min, tm_hour, tm_mday, tm_mon, tm_year
    tm* gmtime_r(const time_t*, tm*)

cdef extern from "<math.h>" nogil:
    double nearbyint(double)

cdef enum:
    CAP = 8192  # bytes of one line; longer ones are formatted in Python


cdef class _Out:
    cdef char buf[CAP]
    cdef Py_ssize_t n
    cdef bint overflow

    cdef inline void raw(self, const char* s, Py_ssize_t k) noexcept:
        if self.n + k > CAP:
            self.overflow = True
            return
        memcpy(self.buf + self.n, s, k)
        self.n += k


cdef bint _plain(const unsigned char* s, Py_ssize_t k) noexcept:
    """Printable ASCII without a quote or a backslash: JSON as it stands."""
    cdef Py_ssize_t i
    cdef unsigned char c
    for i in range(k):
        c = s[i]
        if c < 0x20 or c > 0x7e or c == 34 or c == 92:
            return False
    return True


cdef int _text(_Out out, object value, object fallback) except -1:
    cdef const char* s
    cdef Py_ssize_t k
    cdef bytes encoded
    if value is None:
        out.raw("null", 4)
        return 0
    if PyBytes_CheckExact(value):
        s = PyBytes_AS_STRING(value)
        k = PyBytes_GET_SIZE(value)
        if _plain(<const unsigned char*>s, k):
            out.raw("\"", 1)
            out.raw(s, k)
            out.raw("\"", 1)
            return 0
    elif PyUnicode_CheckExact(value) and PyUnicode_IS_ASCII(value):
        s = PyUnicode_AsUTF8AndSize(value, &k)
        if _plain(<const unsigned char*>s, k):
            out.raw("\"", 1)
            out.raw(s, k)
            out.raw("\"", 1)
            return 0
    encoded = (<str>fallback(value)).encode("ascii")
    out.raw(PyBytes_AS_STRING(encoded), PyBytes_GET_SIZE(encoded))
    return 0


cdef void _int(_Out out, object value) noexcept:
    cdef char tmp[32]
    cdef int k
    if value is None:
        out.raw("null", 4)
    else:
        k = snprintf(tmp, 32, "%lld", <long long>value)
        out.raw(tmp, k)


cdef void _ms(_Out out, object value) noexcept:
    cdef char tmp[48]
    cdef int k
    if value is None:
        out.raw("null", 4)
    else:
        k = snprintf(tmp, 48, "%.3f", <double>value)
        out.raw(tmp, k)


cdef void _time(_Out out, double unix) noexcept:
    """`"2024-05-01T12:00:00.123"`-style, UTC, milliseconds rounded half to even."""
    cdef double total = nearbyint(unix * 1000.0)
    cdef long long ms = <long long>total
    cdef time_t seconds = <time_t>(ms // 1000)
    cdef int millis = <int>(ms % 1000)
    cdef tm parts
    cdef char tmp[40]
    cdef int k
    gmtime_r(&seconds, &parts)
    k = snprintf(tmp, 40, "\"%04d-%02d-%02dT%02d:%02d:%02d.%03dZ\"", parts.tm_year + 1900,
                 parts.tm_mon + 1, parts.tm_mday, parts.tm_hour, parts.tm_min, parts.tm_sec, millis)
    out.raw(tmp, k)


def json_line(object r, object fallback):
    """The record `r` (an AccessRecord) as one compact JSON object; `fallback(value)` encodes
    a text value that is not plain printable ASCII."""
    cdef _Out out = _Out()
    (start, listener, route, cluster, endpoint, method, authority, path, protocol, status, error,
     bytes_in, bytes_out, duration_ms, upstream_ms, attempts, request_id, trace_id, peer,
     peer_identity) = r
    out.raw("{\"time\":", 8)
    _time(out, start)
    out.raw(",\"listener\":", 12)
    _text(out, listener, fallback)
    if protocol == "tcp":
        out.raw(",\"cluster\":", 11)
        _text(out, cluster, fallback)
        out.raw(",\"endpoint\":", 12)
        _text(out, endpoint, fallback)
        out.raw(",\"protocol\":\"tcp\",\"error\":", 26)
        _text(out, error, fallback)
    else:
        out.raw(",\"route\":", 9)
        _text(out, route, fallback)
        out.raw(",\"cluster\":", 11)
        _text(out, cluster, fallback)
        out.raw(",\"endpoint\":", 12)
        _text(out, endpoint, fallback)
        out.raw(",\"method\":", 10)
        _text(out, method, fallback)
        out.raw(",\"authority\":", 13)
        _text(out, authority, fallback)
        out.raw(",\"path\":", 8)
        _text(out, path, fallback)
        out.raw(",\"protocol\":", 12)
        _text(out, protocol, fallback)
        out.raw(",\"status\":", 10)
        _int(out, status)
        out.raw(",\"error\":", 9)
        _text(out, error, fallback)
    out.raw(",\"bytes_in\":", 12)
    _int(out, bytes_in)
    out.raw(",\"bytes_out\":", 13)
    _int(out, bytes_out)
    out.raw(",\"duration_ms\":", 15)
    _ms(out, duration_ms)
    if protocol != "tcp":
        out.raw(",\"upstream_ms\":", 15)
        _ms(out, upstream_ms)
        out.raw(",\"attempts\":", 12)
        _int(out, attempts)
        out.raw(",\"request_id\":", 14)
        _text(out, request_id, fallback)
        out.raw(",\"trace_id\":", 12)
        _text(out, trace_id, fallback)
    out.raw(",\"peer\":", 8)
    _text(out, peer, fallback)
    out.raw(",\"peer_identity\":", 17)
    _text(out, peer_identity, fallback)
    out.raw("}", 1)
    if out.overflow:
        return None  # a line over 8 KiB: the caller formats it in Python
    return PyUnicode_DecodeASCII(out.buf, out.n, NULL)
