# cython: language_level=3
"""Counting one finished request: `proxy.telemetry.stats.record_request`, in C.

Called once per request on the hot path, where the same arithmetic as Python
bytecode cost close to a microsecond. The objects are the plain Python ones
of `proxy.telemetry.stats` (slots, lists of ints, dicts); only the work on
them moves here. The HDR layout constants are `proxy.telemetry.hdr`'s (1 µs
to 60 s, 3 significant figures); a unit test holds the two in step.
"""

from cpython.dict cimport PyDict_GetItem, PyDict_SetItem
from cpython.object cimport PyObject

cdef long long LOWEST_US = 1
cdef long long HIGHEST_US = 60000000
cdef long long SUB_BUCKET_MASK = 2047
cdef int HALF_COUNT_MAGNITUDE = 10
cdef long long HALF_COUNT = 1024


cdef inline long long _index_of(double seconds) noexcept:
    """HdrHistogram's counts index of `seconds`, in µs, clamped to the tracked range."""
    cdef long long us = <long long>(seconds * 1e6)
    if us < LOWEST_US:
        us = LOWEST_US
    elif us > HIGHEST_US:
        us = HIGHEST_US
    cdef int bucket = (64 - __builtin_clzll(<unsigned long long>(us | SUB_BUCKET_MASK))) - HALF_COUNT_MAGNITUDE - 1
    return ((bucket + 1) << HALF_COUNT_MAGNITUDE) + (us >> bucket) - HALF_COUNT


cdef extern from *:
    int __builtin_clzll(unsigned long long) nogil


cdef inline void _bump(object counts, object key) except *:
    """counts[key] += 1 for a dict (or a defaultdict, without calling its factory)."""
    cdef PyObject* old = PyDict_GetItem(counts, key)
    if old == NULL:
        PyDict_SetItem(counts, key, 1)
    else:
        PyDict_SetItem(counts, key, <object>old + 1)


cdef inline void _bump_list(list counts, Py_ssize_t i) except *:
    counts[i] = counts[i] + 1


def index_of_seconds(double seconds) -> int:
    """The counts index `record_request` files `seconds` under (for tests)."""
    return _index_of(seconds)


def record_request(route, cluster, endpoint, int status, error, double total, upstream) -> None:
    """Count one finished request (or one answered locally).

    `status` is what the client got (0: nothing), `error` its x-meshproxy-error code or None,
    `total` the seconds from the request's first byte in to the response's last byte out,
    `upstream` the seconds from sending the request to the response head (None when no
    upstream answered). `cluster` and `endpoint` are None when none was chosen.
    """
    cdef Py_ssize_t status_class = status // 100
    _bump_list(route.requests, status_class)
    _bump(route.latency, _index_of(total))
    if error is not None:
        _bump(route.errors, error)
    if cluster is not None:
        _bump_list(cluster.requests, status_class)
        if error is not None:
            _bump(cluster.errors, error)
        if upstream is not None:
            _bump(cluster.latency, _index_of(upstream))
    if endpoint is not None:
        endpoint.requests += 1
        if status >= 500:
            endpoint.errors += 1
