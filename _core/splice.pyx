# cython: language_level=3
"""L4 forwarding: both directions of every connection, serviced in C.

A pump moves bytes one way, from a source fd to a destination fd, until the
kernel has nothing more to give, the destination is full, a byte budget is
spent, or the source reaches EOF. `SplicePump` goes through a pipe with
splice(2), so the bytes never enter user space; `CopyPump` uses recv/send
through a buffer, for where splice cannot work (TLS, sockets without splice).

A `Relay` is one proxied connection: a client fd, an upstream fd and a pump
each way. A `RelayEngine` registers the fds of its relays in an edge-triggered
epoll set of its own and, each time the owning Trio task wakes up because that
epoll fd is readable, pumps every relay the kernel reported, in C. A request on
a kept-alive connection therefore costs its splice (or recv/send) calls and a
share of one wake-up: no Python frame runs per request or per chunk.

Pump status codes:

    PUMP_WANT_READ   the source is drained: wait until it is readable again
    PUMP_WANT_WRITE  the destination is full with bytes pending: wait until writable
    PUMP_BUDGET      the byte budget is spent with more to move: yield, then pump again
    PUMP_EOF         the source closed and every byte was delivered
    PUMP_READ_ERROR  reading the source failed (`.error` has the errno)
    PUMP_WRITE_ERROR writing the destination failed (`.error` has the errno)
"""

from libc.stdint cimport uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc
from cpython.ref cimport PyObject

cdef extern from "<errno.h>" nogil:
    int errno
    int EAGAIN
    int EINTR

cdef extern from "<fcntl.h>" nogil:
    int O_NONBLOCK
    int O_CLOEXEC
    int F_SETPIPE_SZ
    int F_GETPIPE_SZ
    int fcntl(int fd, int cmd, ...)
    unsigned int SPLICE_F_MOVE
    unsigned int SPLICE_F_NONBLOCK
    ssize_t splice(int fd_in, long long *off_in, int fd_out, long long *off_out,
                   size_t len, unsigned int flags)

cdef extern from "<unistd.h>" nogil:
    int pipe2(int *fds, int flags)
    int close(int fd)

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int CLOCK_MONOTONIC
    int clock_gettime(int clock, timespec *ts)

cdef extern from "<sys/socket.h>" nogil:
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int shutdown(int fd, int how)
    int MSG_NOSIGNAL
    int SHUT_WR

cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64
    struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    int EPOLL_CLOEXEC
    int EPOLL_CTL_ADD
    int EPOLL_CTL_DEL
    uint32_t EPOLLIN
    uint32_t EPOLLOUT
    uint32_t EPOLLERR
    uint32_t EPOLLHUP
    uint32_t EPOLLRDHUP
    uint32_t EPOLLET


PUMP_WANT_READ = 1
PUMP_WANT_WRITE = 2
PUMP_BUDGET = 3
PUMP_EOF = 4
PUMP_READ_ERROR = 5
PUMP_WRITE_ERROR = 6

cdef enum:
    WANT_READ = 1
    WANT_WRITE = 2
    BUDGET = 3
    EOF = 4
    READ_ERROR = 5
    WRITE_ERROR = 6

cdef enum:
    # Pipes start at the kernel default (64 KiB) and grow once to this size
    # when a read fills them: bulk streams get big batches, small-request
    # connections keep the cheap default.
    BULK_PIPE_SIZE = 1048576
    # Bytes one pump call moves before it lets others run (fairness).
    DEFAULT_BUDGET = 1048576
    COPY_BUFFER_SIZE = 65536
    # Idle pipes kept for reuse by the next pump that needs one.
    PIPE_POOL_CAP = 256
    # Events taken per engine wake-up.
    MAX_EVENTS = 256


cdef class Pump:
    """One direction of a connection: src fd -> dst fd (base of both kinds)."""

    cdef readonly int src
    cdef readonly int dst
    cdef readonly long long bytes
    cdef readonly int error
    # Stop after this many bytes (-1: until EOF). A length-delimited HTTP body
    # is pumped this way; reaching the limit reports PUMP_EOF with the source
    # left open, so `bytes < limit` at PUMP_EOF means the source ended early.
    cdef public long long limit
    # Set once the source reported a FIN, reset or error. With edge-triggered
    # readiness no further event follows, so from then on a short read must
    # not end the call: read on until EOF, the error, or EAGAIN.
    cdef public bint src_closing
    cdef bint src_eof
    cdef bint closed

    def __cinit__(self, *args, **kwargs):
        self.limit = -1

    cpdef int pump(self, Py_ssize_t budget=DEFAULT_BUDGET):
        raise NotImplementedError

    cpdef Py_ssize_t pending(self):
        """Bytes read from the source and not yet written to the destination."""
        return 0

    def close(self):
        self.closed = True


# Idle pipes shared by every SplicePump of the process. A pump holds a pipe only
# while bytes sit in it (the destination is full); otherwise the pipe goes back
# here at the end of each call. A connection then costs two socket fds instead
# of six, and a new one usually skips pipe2() and close() (as HAProxy does).
cdef int _pool_r[PIPE_POOL_CAP]
cdef int _pool_w[PIPE_POOL_CAP]
cdef Py_ssize_t _pool_size[PIPE_POOL_CAP]
cdef int _pool_len = 0


def pooled_pipes():
    """How many idle pipes the pool holds."""
    return _pool_len


cdef class SplicePump(Pump):
    """src socket -> pipe -> dst socket with splice(2)."""

    cdef int pipe_r
    cdef int pipe_w
    cdef Py_ssize_t pipe_size
    cdef Py_ssize_t in_pipe
    cdef bint grow_tried

    def __cinit__(self, int src, int dst):
        self.pipe_r = -1
        self.pipe_w = -1
        self.src = src
        self.dst = dst

    def __dealloc__(self):
        self._release_pipe()

    cdef int _take_pipe(self) except -1:
        global _pool_len
        cdef int fds[2]
        if _pool_len > 0:
            _pool_len -= 1
            self.pipe_r = _pool_r[_pool_len]
            self.pipe_w = _pool_w[_pool_len]
            self.pipe_size = _pool_size[_pool_len]
            return 0
        if pipe2(fds, O_NONBLOCK | O_CLOEXEC) != 0:
            raise OSError(errno, "pipe2 failed")
        self.pipe_r = fds[0]
        self.pipe_w = fds[1]
        self.pipe_size = fcntl(self.pipe_r, F_GETPIPE_SZ)
        if self.pipe_size <= 0:
            self.pipe_size = 65536
        return 0

    cdef void _release_pipe(self) noexcept:
        """Pool the pipe when it is empty; close it when it still holds bytes."""
        global _pool_len
        if self.pipe_r < 0:
            return
        if self.in_pipe == 0 and _pool_len < PIPE_POOL_CAP:
            _pool_r[_pool_len] = self.pipe_r
            _pool_w[_pool_len] = self.pipe_w
            _pool_size[_pool_len] = self.pipe_size
            _pool_len += 1
        else:
            close(self.pipe_r)
            close(self.pipe_w)
        self.pipe_r = -1
        self.pipe_w = -1
        self.in_pipe = 0

    def close(self):
        """Give the pipe back; bytes still in it are dropped (the connection is gone)."""
        self.closed = True
        self._release_pipe()

    cpdef Py_ssize_t pending(self):
        return self.in_pipe

    cpdef int pump(self, Py_ssize_t budget=DEFAULT_BUDGET):
        cdef int status
        if self.closed:
            self.error = 9  # EBADF: pumping after close is a caller bug, fail loudly
            return READ_ERROR
        if self.pipe_r < 0:
            try:
                self._take_pipe()
            except OSError as exc:
                # Out of fds (EMFILE/ENFILE): this connection fails, the worker goes on.
                self.error = exc.errno or 24
                return READ_ERROR
        status = self._pump(budget)
        if self.in_pipe == 0:
            self._release_pipe()
        return status

    cdef int _pump(self, Py_ssize_t budget) noexcept:
        cdef ssize_t n
        cdef Py_ssize_t moved = 0
        cdef Py_ssize_t want
        while True:
            while self.in_pipe > 0:
                n = splice(self.pipe_r, NULL, self.dst, NULL, <size_t>self.in_pipe,
                           SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
                if n > 0:
                    self.in_pipe -= n
                elif n < 0:
                    if errno == EINTR:
                        continue
                    if errno == EAGAIN:
                        return WANT_WRITE
                    self.error = errno
                    return WRITE_ERROR
            if self.src_eof:
                return EOF
            # A short splice does not mean the socket is empty (a pipe holds a
            # limited number of segments): read on until EAGAIN, which is what
            # edge-triggered readiness needs before it reports anything new.
            if moved >= budget:
                return BUDGET
            want = self.pipe_size
            if self.limit >= 0:
                if self.bytes >= self.limit:
                    return EOF
                if want > self.limit - self.bytes:
                    want = <Py_ssize_t>(self.limit - self.bytes)
            n = splice(self.src, NULL, self.pipe_w, NULL, <size_t>want,
                       SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            if n > 0:
                self.in_pipe += n
                self.bytes += n
                moved += n
                if n == want and not self.grow_tried:
                    self._grow()
            elif n == 0:
                self.src_eof = True
            elif errno == EINTR:
                continue
            elif errno == EAGAIN:
                return WANT_READ
            else:
                self.error = errno
                return READ_ERROR

    cdef void _grow(self) noexcept:
        # A full pipe means a bulk stream: larger batches cut syscalls per byte.
        # If the kernel refuses (pipe-max-size, per-user limits) the size stays.
        cdef int size
        self.grow_tried = True
        if self.pipe_size >= BULK_PIPE_SIZE:
            return
        size = fcntl(self.pipe_w, F_SETPIPE_SZ, <int>BULK_PIPE_SIZE)
        if size > 0:
            self.pipe_size = size


cdef class CopyPump(Pump):
    """src socket -> user-space buffer -> dst socket with recv/send."""

    cdef char *buf
    cdef Py_ssize_t size
    cdef Py_ssize_t start
    cdef Py_ssize_t end

    def __cinit__(self, int src, int dst, Py_ssize_t size=COPY_BUFFER_SIZE):
        if size <= 0:
            raise ValueError("buffer size must be positive")
        self.buf = <char *>malloc(size)
        if self.buf == NULL:
            raise MemoryError()
        self.size = size
        self.src = src
        self.dst = dst

    def __dealloc__(self):
        free(self.buf)
        self.buf = NULL

    cpdef Py_ssize_t pending(self):
        return self.end - self.start

    cpdef int pump(self, Py_ssize_t budget=DEFAULT_BUDGET):
        cdef ssize_t n
        cdef Py_ssize_t moved = 0
        cdef Py_ssize_t want
        cdef bint drained = False
        if self.closed:
            self.error = 9
            return READ_ERROR
        while True:
            while self.end > self.start:
                n = send(self.dst, self.buf + self.start, <size_t>(self.end - self.start),
                         MSG_NOSIGNAL)
                if n >= 0:
                    self.start += n
                elif errno == EINTR:
                    continue
                elif errno == EAGAIN:
                    return WANT_WRITE
                else:
                    self.error = errno
                    return WRITE_ERROR
            self.start = 0
            self.end = 0
            if self.src_eof:
                return EOF
            if drained and not self.src_closing:
                return WANT_READ
            if moved >= budget:
                return BUDGET
            want = self.size
            if self.limit >= 0:
                if self.bytes >= self.limit:
                    return EOF
                if want > self.limit - self.bytes:
                    want = <Py_ssize_t>(self.limit - self.bytes)
            n = recv(self.src, self.buf, <size_t>want, 0)
            if n > 0:
                self.end = n
                self.bytes += n
                moved += n
                drained = n < want
            elif n == 0:
                self.src_eof = True
            elif errno == EINTR:
                continue
            elif errno == EAGAIN:
                return WANT_READ
            else:
                self.error = errno
                return READ_ERROR


cdef inline double _monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


def monotonic():
    """The clock of `Relay.last_active` (CLOCK_MONOTONIC, as time.monotonic())."""
    return _monotonic()


cdef enum:
    # Which pump of a relay an event concerns.
    TO_UPSTREAM = 1
    TO_CLIENT = 2


cdef class Relay:
    """One proxied connection: client fd <-> upstream fd, a pump each way.

    The relay does not own its fds: whoever created it closes them once it is
    finished (or discarded), resetting `reset_fd` when it is not -1.
    """

    cdef readonly Pump to_upstream
    cdef readonly Pump to_client
    cdef readonly int client_fd
    cdef readonly int upstream_fd
    cdef readonly double last_active
    cdef readonly bint finished
    cdef readonly int reset_fd
    cdef readonly int error
    cdef int open_pumps
    cdef bint up_done
    cdef bint down_done
    cdef bint queued
    cdef public object on_finish

    def __cinit__(self, int client_fd, int upstream_fd, bint use_splice=True):
        self.client_fd = client_fd
        self.upstream_fd = upstream_fd
        if use_splice:
            self.to_upstream = SplicePump(client_fd, upstream_fd)
            self.to_client = SplicePump(upstream_fd, client_fd)
        else:
            self.to_upstream = CopyPump(client_fd, upstream_fd)
            self.to_client = CopyPump(upstream_fd, client_fd)
        self.reset_fd = -1
        self.last_active = _monotonic()

    @property
    def bytes_from_client(self):
        return self.to_upstream.bytes

    @property
    def bytes_to_client(self):
        return self.to_client.bytes


cdef class RelayEngine:
    """Services many relays from one edge-triggered epoll set.

    The owner waits until `fileno()` is readable (or, when `has_backlog` is
    true, just yields) and then calls `run()`, which pumps every relay with
    news in C and calls `on_finish()` of each relay that finished.
    """

    cdef int epfd
    cdef epoll_event *events
    cdef set active
    cdef list backlog  # relays that spent their budget with bytes left to move

    def __cinit__(self):
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise OSError(errno, "epoll_create1 failed")
        self.events = <epoll_event *>malloc(MAX_EVENTS * sizeof(epoll_event))
        if self.events == NULL:
            raise MemoryError()
        self.active = set()
        self.backlog = []

    def __dealloc__(self):
        free(self.events)
        if self.epfd >= 0:
            close(self.epfd)

    def fileno(self):
        return self.epfd

    @property
    def has_backlog(self):
        return len(self.backlog) > 0

    def __len__(self):
        return len(self.active)

    def close(self):
        """Forget every relay and close the epoll fd (the relays' fds stay open)."""
        for relay in list(self.active):
            self.discard(relay)
        if self.epfd >= 0:
            close(self.epfd)
            self.epfd = -1

    def add(self, Relay relay):
        """Start servicing `relay` (its fds must be non-blocking sockets)."""
        cdef epoll_event ev
        cdef uintptr_t tag = <uintptr_t><PyObject *>relay
        ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET
        # The low bit of the (aligned) object pointer says which fd fired.
        ev.data.u64 = tag
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, relay.client_fd, &ev) != 0:
            raise OSError(errno, "epoll_ctl(ADD) failed")
        ev.data.u64 = tag | 1
        if epoll_ctl(self.epfd, EPOLL_CTL_ADD, relay.upstream_fd, &ev) != 0:
            err = errno
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, relay.client_fd, NULL)
            raise OSError(err, "epoll_ctl(ADD) failed")
        self.active.add(relay)
        relay.open_pumps = 2

    def discard(self, Relay relay):
        """Stop servicing `relay` without finishing it (e.g. on idle timeout)."""
        if relay in self.active:
            self._unregister(relay)
        relay.to_upstream.close()
        relay.to_client.close()

    cdef void _unregister(self, Relay relay):
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, relay.client_fd, NULL)
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, relay.upstream_fd, NULL)
        self.active.discard(relay)
        relay.finished = True

    def run(self):
        """Pump every relay with news; returns how many relays finished."""
        cdef double now = _monotonic()
        cdef int n, i, which
        cdef uint32_t flags
        cdef uint64_t tag
        cdef Relay relay
        cdef list finished = []
        cdef list backlog = self.backlog
        if backlog:
            self.backlog = []
            for relay in backlog:
                relay.queued = False
                if not relay.finished:
                    self._service(relay, TO_UPSTREAM | TO_CLIENT, now, finished)
        n = epoll_wait(self.epfd, self.events, MAX_EVENTS, 0)
        for i in range(n):
            tag = self.events[i].data.u64
            flags = self.events[i].events
            relay = <Relay><PyObject *><uintptr_t>(tag & ~(<uint64_t>1))
            if relay.finished:
                continue
            # Readable: pump the direction reading this fd. Writable: pump the
            # direction writing to it, but only if it has bytes waiting (a new
            # socket reports writable at once; reading then would find nothing).
            which = 0
            if tag & 1:  # the upstream fd
                if flags & (EPOLLRDHUP | EPOLLERR | EPOLLHUP):
                    relay.to_client.src_closing = True
                if flags & (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP):
                    which |= TO_CLIENT
                if flags & (EPOLLERR | EPOLLHUP) or (
                        flags & EPOLLOUT and relay.to_upstream.pending() > 0):
                    which |= TO_UPSTREAM
            else:
                if flags & (EPOLLRDHUP | EPOLLERR | EPOLLHUP):
                    relay.to_upstream.src_closing = True
                if flags & (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP):
                    which |= TO_UPSTREAM
                if flags & (EPOLLERR | EPOLLHUP) or (
                        flags & EPOLLOUT and relay.to_client.pending() > 0):
                    which |= TO_CLIENT
            if which:
                self._service(relay, which, now, finished)
        for relay in finished:
            relay.to_upstream.close()
            relay.to_client.close()
            if relay.on_finish is not None:
                relay.on_finish()
        return len(finished)

    cdef void _service(self, Relay relay, int which, double now, list finished):
        relay.last_active = now
        if which & TO_UPSTREAM and not relay.up_done:
            self._settle(relay, relay.to_upstream, relay.to_upstream.pump(DEFAULT_BUDGET), finished)
        if which & TO_CLIENT and not relay.down_done and not relay.finished:
            self._settle(relay, relay.to_client, relay.to_client.pump(DEFAULT_BUDGET), finished)

    cdef void _settle(self, Relay relay, Pump pump, int status, list finished):
        if status == WANT_READ or status == WANT_WRITE:
            return  # edge-triggered: the kernel reports the next change
        if status == BUDGET:
            if not relay.queued:
                relay.queued = True
                self.backlog.append(relay)
            return
        if status == EOF:
            # Half-close: pass the FIN on, keep the other direction flowing.
            shutdown(pump.dst, SHUT_WR)
            if pump is relay.to_upstream:
                relay.up_done = True
            else:
                relay.down_done = True
            relay.open_pumps -= 1
            if relay.open_pumps > 0:
                return
        else:
            # A read error means the source is gone: reset the destination.
            # A write error means the destination is gone: reset the source.
            relay.error = pump.error
            relay.reset_fd = pump.dst if status == READ_ERROR else pump.src
        self._unregister(relay)
        finished.append(relay)
