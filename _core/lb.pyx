# cython: language_level=3
"""Endpoint selection for one cluster: the per-request part of load balancing, in C.

A balancer holds per-endpoint state (weights, requests in flight, latency estimates) and
answers "which endpoint next?" with an index into the cluster's endpoints:

    RoundRobin      smooth weighted round robin (nginx): exact shares, interleaved
    WeightedRandom  independent picks in proportion to the weights
    LeastRequest    power of two choices (Envoy): two weighted-random candidates, the one
                    with fewer requests in flight per unit of weight wins
    PeakEwma        two choices on cost = latency estimate * (in flight + 1) (Linkerd)
    RingHash        consistent hashing on a ring of virtual nodes (Ketama)
    Maglev          consistent hashing through a 65537-slot lookup table (Google's Maglev)

`pick(exclude, key)` never returns an index in `exclude` (the endpoints a failing request
already tried) unless every endpoint is in it; then a repeat beats no answer and the
exclusion is ignored. Hash balancers pick by `key`, and at random when it is None.

The ring and the table depend only on the cluster's config (addresses and weights), so
every proxy builds the same ones and sends a given key to the same endpoint.
"""

from libc.math cimport exp
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdio cimport snprintf
from libc.stdlib cimport calloc, free, malloc, qsort
from libc.string cimport memcpy, memset
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE

import os

cdef extern from "<endian.h>" nogil:
    uint64_t le64toh(uint64_t x)
    uint32_t le32toh(uint32_t x)

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int CLOCK_MONOTONIC
    int clock_gettime(int clock, timespec *ts)

DEFAULT_RTT = 0.030  # PeakEwma: a new endpoint's latency until one is observed (Linkerd's)
DECAY = 10.0  # PeakEwma: seconds for the estimate to move 63% of the way to new observations
RING_VNODES = 1024  # RingHash: points for an endpoint of the smallest weight
MAX_RING = 1 << 20  # RingHash: more points than this and every count is scaled down
MAGLEV_SIZE = 65537  # Maglev: table slots, a prime (the paper's and Envoy's default)
cdef enum:
    _MAX_ADDRESS = 300  # longer than any "host:port" the config accepts


# -- xxHash64 ---------------------------------------------------------------------------------
# The reference algorithm (github.com/Cyan4973/xxHash); the tests pin its published values.

cdef uint64_t P1 = 0x9E3779B185EBCA87ULL
cdef uint64_t P2 = 0xC2B2AE3D27D4EB4FULL
cdef uint64_t P3 = 0x165667B19E3779F9ULL
cdef uint64_t P4 = 0x85EBCA77C2B2AE63ULL
cdef uint64_t P5 = 0x27D4EB2F165667C5ULL


cdef inline uint64_t _rotl(uint64_t x, int r) noexcept nogil:
    return (x << r) | (x >> (64 - r))


cdef inline uint64_t _read64(const unsigned char *p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return le64toh(v)


cdef inline uint64_t _round(uint64_t acc, uint64_t lane) noexcept nogil:
    return _rotl(acc + lane * P2, 31) * P1


cdef inline uint64_t _merge(uint64_t h, uint64_t acc) noexcept nogil:
    return (h ^ _round(0, acc)) * P1 + P4


cdef uint64_t _xxh64(const unsigned char *p, size_t n, uint64_t seed) noexcept nogil:
    cdef const unsigned char *end = p + n
    cdef uint64_t h, v1, v2, v3, v4
    cdef uint32_t word
    if n >= 32:
        v1 = seed + P1 + P2
        v2 = seed + P2
        v3 = seed
        v4 = seed - P1
        while end - p >= 32:
            v1 = _round(v1, _read64(p))
            v2 = _round(v2, _read64(p + 8))
            v3 = _round(v3, _read64(p + 16))
            v4 = _round(v4, _read64(p + 24))
            p += 32
        h = _rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)
        h = _merge(_merge(_merge(_merge(h, v1), v2), v3), v4)
    else:
        h = seed + P5
    h += n
    while end - p >= 8:
        h = _rotl(h ^ _round(0, _read64(p)), 27) * P1 + P4
        p += 8
    if end - p >= 4:
        memcpy(&word, p, 4)
        h = _rotl(h ^ (<uint64_t>le32toh(word) * P1), 23) * P2 + P3
        p += 4
    while p < end:
        h = _rotl(h ^ (<uint64_t>p[0] * P5), 11) * P1
        p += 1
    h = (h ^ (h >> 33)) * P2
    h = (h ^ (h >> 29)) * P3
    return h ^ (h >> 32)


cdef uint64_t _hash_bytes(bytes data, uint64_t seed) noexcept:  # data is never None
    return _xxh64(<const unsigned char *>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), seed)


def xxh64(bytes data not None, uint64_t seed=0):
    """XXH64 of `data`: the hash the hash balancers key on, for tests and tools."""
    return _hash_bytes(data, seed)


cdef double _monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


# -- the shared state -------------------------------------------------------------------------


cdef class LoadBalancer:
    """Weights, requests in flight, the failover exclusion and the random source."""

    cdef readonly tuple endpoints
    cdef Py_ssize_t n
    cdef int64_t *weight
    cdef int64_t *cumulative  # weight[0] + ... + weight[i], for weighted random picks
    cdef int64_t total
    cdef int64_t *in_flight
    cdef uint8_t *excluded  # set only while one pick runs
    cdef Py_ssize_t n_excluded
    cdef int64_t excluded_weight
    cdef uint64_t rng  # splitmix64 state

    def __cinit__(self, endpoints, seed=None, *args, **kwargs):
        self.endpoints = tuple(endpoints)
        self.n = len(self.endpoints)
        if self.n == 0:
            raise ValueError("a balancer needs at least one endpoint")
        self.weight = <int64_t *>calloc(self.n, sizeof(int64_t))
        self.cumulative = <int64_t *>calloc(self.n, sizeof(int64_t))
        self.in_flight = <int64_t *>calloc(self.n, sizeof(int64_t))
        self.excluded = <uint8_t *>calloc(self.n, sizeof(uint8_t))
        if not (self.weight and self.cumulative and self.in_flight and self.excluded):
            raise MemoryError()
        for i, endpoint in enumerate(self.endpoints):
            if endpoint.weight < 1:
                raise ValueError(f"endpoint weights must be positive, got {endpoint.weight}")
            self.weight[i] = endpoint.weight
            self.total += self.weight[i]
            self.cumulative[i] = self.total
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little")
        self.rng = seed & 0xFFFFFFFFFFFFFFFF

    def __dealloc__(self):
        free(self.weight)
        free(self.cumulative)
        free(self.in_flight)
        free(self.excluded)

    def pick(self, exclude=(), key=None):
        """Index of the endpoint to use, never one in `exclude` unless all are."""
        if not exclude:
            return self._choose(key)
        try:
            for index in exclude:
                self._set_excluded(index, True)
            if self.n_excluded == self.n:
                self._clear_excluded()
            return self._choose(key)
        finally:
            self._clear_excluded()

    def on_request_start(self, Py_ssize_t index):
        self._check(index)
        self.in_flight[index] += 1

    def on_request_end(self, Py_ssize_t index, double latency):
        """A request to `index` finished after `latency` seconds (whatever its outcome)."""
        self._check(index)
        if self.in_flight[index] > 0:
            self.in_flight[index] -= 1
        self._observe(index, latency)

    def active(self, Py_ssize_t index):
        """Requests in flight to `index`."""
        self._check(index)
        return self.in_flight[index]

    cdef int _check(self, Py_ssize_t index) except -1:
        if not 0 <= index < self.n:
            raise IndexError(f"endpoint index {index} out of range for {self.n} endpoints")
        return 0

    cdef Py_ssize_t _choose(self, object key) except -1:
        raise NotImplementedError

    cdef int _observe(self, Py_ssize_t index, double latency) except -1:
        return 0

    cdef void _set_excluded(self, Py_ssize_t index, bint on) noexcept:
        if 0 <= index < self.n and self.excluded[index] != on:
            self.excluded[index] = on
            self.n_excluded += 1 if on else -1
            self.excluded_weight += self.weight[index] if on else -self.weight[index]

    cdef void _clear_excluded(self) noexcept:
        if self.n_excluded:
            memset(self.excluded, 0, self.n)
            self.n_excluded = 0
            self.excluded_weight = 0

    cdef inline uint64_t _rand(self) noexcept:
        # splitmix64: tiny, fast, and plenty for spreading load (not for secrets)
        self.rng += 0x9E3779B97F4A7C15ULL
        cdef uint64_t z = self.rng
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
        return z ^ (z >> 31)

    cdef Py_ssize_t _random(self) noexcept:
        """A weighted random index among the endpoints not excluded."""
        # The modulo's bias is below total / 2**64: nothing next to real traffic.
        cdef int64_t r = self._rand() % <uint64_t>(self.total - self.excluded_weight)
        cdef Py_ssize_t lo = 0, hi = self.n - 1, mid
        if self.n_excluded == 0:  # the first cumulative weight above r
            while lo < hi:
                mid = (lo + hi) // 2
                if self.cumulative[mid] > r:
                    hi = mid
                else:
                    lo = mid + 1
            return lo
        while self.excluded[lo] or r >= self.weight[lo]:
            if not self.excluded[lo]:
                r -= self.weight[lo]
            lo += 1
        return lo


# -- no feedback ------------------------------------------------------------------------------


cdef class RoundRobin(LoadBalancer):
    """Smooth weighted round robin (the nginx algorithm).

    Each pick adds every endpoint's weight to its running score, takes the highest score
    and subtracts the total weight from it. Over any window of sum(weights) picks each
    endpoint is chosen exactly `weight` times, interleaved rather than bunched (5,1,1 gives
    a a b a c a a). Excluded endpoints sit the pick out, scores untouched.
    """

    cdef int64_t *score

    def __cinit__(self, *args, **kwargs):
        self.score = <int64_t *>calloc(self.n, sizeof(int64_t))
        if not self.score:
            raise MemoryError()

    def __dealloc__(self):
        free(self.score)

    cdef Py_ssize_t _choose(self, object key) except -1:
        cdef Py_ssize_t i, best = -1
        cdef int64_t total = 0
        for i in range(self.n):
            if self.excluded[i]:
                continue
            self.score[i] += self.weight[i]
            total += self.weight[i]
            if best < 0 or self.score[i] > self.score[best]:
                best = i
        self.score[best] -= total
        return best


cdef class WeightedRandom(LoadBalancer):
    """Independent picks in proportion to the endpoint weights."""

    cdef Py_ssize_t _choose(self, object key) except -1:
        return self._random()


# -- power of two choices ---------------------------------------------------------------------


cdef class _TwoChoices(LoadBalancer):
    """Draw two distinct endpoints by weight and keep the one with the lower load.

    Comparing two random endpoints, rather than scanning for the least loaded, avoids the
    herd: every proxy sharing stale counts would pick the same "best" endpoint at once.
    Drawing them by weight keeps the weights' shares while loads are equal.
    """

    cdef double _load(self, Py_ssize_t index) except? -1.0:
        raise NotImplementedError

    cdef Py_ssize_t _choose(self, object key) except -1:
        cdef Py_ssize_t first = self._random(), second
        if self.n - self.n_excluded < 2:
            return first
        self._set_excluded(first, True)
        second = self._random()
        self._set_excluded(first, False)
        return second if self._load(second) < self._load(first) else first


cdef class LeastRequest(_TwoChoices):
    """Power of two choices on requests in flight per unit of weight."""

    cdef double _load(self, Py_ssize_t index) except? -1.0:
        return self.in_flight[index] / <double>self.weight[index]


cdef class PeakEwma(_TwoChoices):
    """Power of two choices on cost = latency estimate * (in flight + 1) / weight.

    The estimate is an exponentially weighted moving average of observed latencies with
    time constant `decay`, except that a latency above it replaces it at once (the "peak"):
    a slowing endpoint is avoided right away and trusted again only gradually. Read for a
    pick, the estimate also decays towards zero with the time since the last observation,
    as in Finagle and Linkerd, so an endpoint that lost all its traffic to a bad spell is
    tried again and can show that it recovered.
    """

    cdef double *rtt  # estimate in seconds, as of `stamp`
    cdef double *stamp  # time of the last observation
    cdef double decay
    cdef object clock

    def __cinit__(self, endpoints, seed=None, double default_rtt=DEFAULT_RTT,
                  double decay=DECAY, clock=None):
        if not (default_rtt > 0 and decay > 0):
            raise ValueError("default_rtt and decay must be positive")
        self.decay = decay
        self.clock = clock
        self.rtt = <double *>malloc(self.n * sizeof(double))
        self.stamp = <double *>malloc(self.n * sizeof(double))
        if not (self.rtt and self.stamp):
            raise MemoryError()
        cdef double now = self._now()
        for i in range(self.n):
            self.rtt[i] = default_rtt
            self.stamp[i] = now

    def __dealloc__(self):
        free(self.rtt)
        free(self.stamp)

    def estimate(self, Py_ssize_t index):
        """The latency estimate for `index` now, in seconds, as a pick sees it."""
        self._check(index)
        return self._estimate(index, self._now())

    cdef double _now(self) except? -1.0:
        return _monotonic() if self.clock is None else self.clock()

    cdef inline double _estimate(self, Py_ssize_t index, double now) noexcept:
        return self.rtt[index] * exp((self.stamp[index] - now) / self.decay)

    cdef double _load(self, Py_ssize_t index) except? -1.0:
        cdef double rtt = self._estimate(index, self._now())
        return rtt * (self.in_flight[index] + 1) / self.weight[index]

    cdef int _observe(self, Py_ssize_t index, double latency) except -1:
        cdef double now = self._now()
        cdef double old = exp((self.stamp[index] - now) / self.decay)  # the old value's share
        if latency > self.rtt[index]:
            self.rtt[index] = latency
        else:
            self.rtt[index] = self.rtt[index] * old + latency * (1.0 - old)
        self.stamp[index] = now
        return 0


# -- consistent hashing -----------------------------------------------------------------------


cdef class _HashTable(LoadBalancer):
    """Slots owned by endpoints; a key hashes to a slot. Without a key, a weighted random pick.

    Failover walks on to the next slot whose endpoint is not excluded: on the ring that is
    the next point clockwise, so the keys of a failing endpoint spread as if it were removed.
    """

    cdef int32_t *owner  # endpoint index of each slot
    cdef Py_ssize_t size

    def __dealloc__(self):
        free(self.owner)

    cdef Py_ssize_t _slot(self, uint64_t hash) noexcept:
        return 0  # each table maps hashes to its slots its own way

    cdef Py_ssize_t _choose(self, object key) except -1:
        if key is None:
            return self._random()
        cdef Py_ssize_t slot = self._slot(_hash_bytes(key, 0)), step, index
        for step in range(self.size):
            index = self.owner[(slot + step) % self.size]
            if not self.excluded[index]:
                return index
        return self._random()  # only with more endpoints than slots, when some own none

    def owners(self):
        """The endpoint index of every slot, for tests and diagnostics."""
        return [self.owner[i] for i in range(self.size)]


cdef struct _Point:
    uint64_t hash
    int32_t owner


cdef int _by_hash(const void *a, const void *b) noexcept nogil:
    cdef const _Point *x = <const _Point *>a
    cdef const _Point *y = <const _Point *>b
    if x.hash != y.hash:
        return -1 if x.hash < y.hash else 1
    return x.owner - y.owner


cdef bytes _address(endpoint):
    address = str(endpoint.address).encode()
    if len(address) >= _MAX_ADDRESS - 24:
        raise ValueError(f"endpoint address too long to hash: {endpoint.address}")
    return address


cdef class RingHash(_HashTable):
    """Ketama-style consistent hashing: each endpoint owns points on a 64-bit ring, and a key
    goes to the first point at or after its hash.

    An endpoint's points are the hashes of "<address>_0", "<address>_1", ... (as in Envoy), and
    their number depends only on its own weight relative to the smallest weight, not on how
    many endpoints there are: adding or removing an endpoint moves only the keys it gains or
    loses. The smallest weight gets RING_VNODES points, so one endpoint's share of the ring
    is within a few percent of its weight's share.
    """

    cdef uint64_t *points  # sorted; points[i] belongs to owner[i]

    def __cinit__(self, *args, **kwargs):
        cdef Py_ssize_t i, v, size = 0, length
        cdef char buffer[_MAX_ADDRESS]
        scale = RING_VNODES / min(self.weight[i] for i in range(self.n))
        scale = min(scale, MAX_RING / self.total)
        counts = [max(1, round(self.weight[i] * scale)) for i in range(self.n)]
        cdef _Point *ring = <_Point *>malloc(sum(counts) * sizeof(_Point))
        if not ring:
            raise MemoryError()
        try:
            for i, endpoint in enumerate(self.endpoints):
                address = _address(endpoint)
                memcpy(buffer, PyBytes_AS_STRING(address), len(address))
                for v in range(counts[i]):
                    length = len(address) + snprintf(buffer + len(address), 24, "_%zd", v)
                    ring[size].hash = _xxh64(<unsigned char *>buffer, length, 0)
                    ring[size].owner = i
                    size += 1
            qsort(ring, size, sizeof(_Point), _by_hash)
            self.points = <uint64_t *>malloc(size * sizeof(uint64_t))
            self.owner = <int32_t *>malloc(size * sizeof(int32_t))
            if not (self.points and self.owner):
                raise MemoryError()
            for i in range(size):
                self.points[i] = ring[i].hash
                self.owner[i] = ring[i].owner
            self.size = size
        finally:
            free(ring)

    def __dealloc__(self):
        free(self.points)

    cdef Py_ssize_t _slot(self, uint64_t hash) noexcept:
        # the first point at or after `hash`; past the last one the ring wraps to slot 0
        cdef Py_ssize_t lo = 0, hi = self.size, mid
        while lo < hi:
            mid = (lo + hi) // 2
            if self.points[mid] < hash:
                lo = mid + 1
            else:
                hi = mid
        return lo % self.size


cdef class Maglev(_HashTable):
    """Maglev hashing (Eisenbud et al., NSDI 2016): a lookup table of MAGLEV_SIZE slots,
    filled by letting the endpoints claim slots in turn, each along its own permutation of
    the table (offset and step from hashes of its address).

    Weighted as in Envoy: in round r an endpoint claims a slot if r * weight / max weight has
    reached the number it already holds, so shares follow the weights while every endpoint
    gets a slot in the first round. Equal weights get equal shares to within one slot, and a
    change of endpoints moves little more than the share that changed hands.
    """

    def __cinit__(self, *args, **kwargs):
        cdef Py_ssize_t size = MAGLEV_SIZE, filled = 0, i, rounds = 0
        cdef uint64_t *position = <uint64_t *>malloc(self.n * sizeof(uint64_t))
        cdef uint64_t *step = <uint64_t *>malloc(self.n * sizeof(uint64_t))
        cdef double *share = <double *>malloc(self.n * sizeof(double))
        cdef double *claimed = <double *>calloc(self.n, sizeof(double))
        self.owner = <int32_t *>malloc(size * sizeof(int32_t))
        try:
            if not (position and step and share and claimed and self.owner):
                raise MemoryError()
            heaviest = max(self.weight[i] for i in range(self.n))
            for i, endpoint in enumerate(self.endpoints):
                address = _address(endpoint)
                position[i] = _hash_bytes(address, 0) % size
                step[i] = _hash_bytes(address, 1) % (size - 1) + 1
                share[i] = self.weight[i] / heaviest
            memset(self.owner, 0xFF, size * sizeof(int32_t))  # -1: free
            while filled < size:
                for i in range(self.n):
                    if rounds * share[i] < claimed[i]:
                        continue
                    while self.owner[position[i]] >= 0:
                        position[i] = (position[i] + step[i]) % size
                    self.owner[position[i]] = i
                    claimed[i] += 1
                    filled += 1
                    if filled == size:
                        break
                rounds += 1
            self.size = size
        finally:
            free(position)
            free(step)
            free(share)
            free(claimed)

    cdef Py_ssize_t _slot(self, uint64_t hash) noexcept:
        return hash % self.size
