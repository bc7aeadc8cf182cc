# cython: language_level=3
"""L4 byte forwarding, one direction at a time, without Python work per chunk.

A pump moves bytes from a source fd to a destination fd until the kernel has
nothing more to give (EAGAIN), the destination is full, a byte budget is spent,
or the source reaches EOF. `SplicePump` goes through a pipe with splice(2), so
the bytes never enter user space; `CopyPump` uses recv/send through a buffer
for where splice cannot work (TLS, or kernels/sockets without splice support).

Both return the same status codes, so the Trio driver that waits on the fds is
the same for both:

    PUMP_WANT_READ   source empty, nothing pending: wait until it is readable
    PUMP_WANT_WRITE  destination full with bytes pending: wait until writable
    PUMP_AGAIN       a short read drained the source, or the budget is spent:
                     yield once, then pump again (yield, then try, then wait)
    PUMP_EOF         the source closed and every byte was delivered
    PUMP_READ_ERROR  reading the source failed (`.error` has the errno)
    PUMP_WRITE_ERROR writing the destination failed (`.error` has the errno)
"""

cdef extern from "<errno.h>" nogil:
    int errno
    int EAGAIN
    int EINTR
    int EINPROGRESS
    int ECONNABORTED
from libc.stdlib cimport malloc, free

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

cdef extern from "<sys/socket.h>" nogil:
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int MSG_NOSIGNAL


PUMP_WANT_READ = 1
PUMP_WANT_WRITE = 2
PUMP_AGAIN = 3
PUMP_EOF = 4
PUMP_READ_ERROR = 5
PUMP_WRITE_ERROR = 6

cdef enum:
    WANT_READ = 1
    WANT_WRITE = 2
    AGAIN = 3
    EOF = 4
    READ_ERROR = 5
    WRITE_ERROR = 6

# Pipes start at the kernel default (64 KiB) and grow once to this size when a
# read fills them: bulk streams get big batches, small-request connections keep
# the cheap default.
cdef enum:
    BULK_PIPE_SIZE = 1048576
# Bytes moved per call before the caller must yield (fairness, cancellation).
cdef enum:
    DEFAULT_BUDGET = 4194304


# Idle pipes shared by every SplicePump of the process. A pump holds a pipe only
# while bytes sit in it (the destination is full); otherwise the pipe goes back
# here at the end of each call. Connections then cost two socket fds instead of
# six, and a new connection usually skips pipe2() and close() (as HAProxy does).
cdef enum:
    PIPE_POOL_CAP = 256
cdef int _pool_r[PIPE_POOL_CAP]
cdef int _pool_w[PIPE_POOL_CAP]
cdef Py_ssize_t _pool_size[PIPE_POOL_CAP]
cdef int _pool_len = 0


def pooled_pipes():
    """How many idle pipes the pool holds (for tests and stats)."""
    return _pool_len


cdef class SplicePump:
    """src socket -> pipe -> dst socket with splice(2)."""

    cdef readonly int src
    cdef readonly int dst
    cdef int pipe_r
    cdef int pipe_w
    cdef Py_ssize_t pipe_size
    cdef Py_ssize_t in_pipe
    cdef bint src_eof
    cdef bint grow_tried
    cdef bint closed
    cdef readonly long long bytes
    cdef readonly int error

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

    @property
    def pending(self):
        """Bytes read from the source and not yet written to the destination."""
        return self.in_pipe

    cpdef int pump(self, Py_ssize_t budget=DEFAULT_BUDGET):
        cdef int status
        if self.closed:
            self.error = 9  # EBADF: pumping after close is a caller bug, fail loudly
            return READ_ERROR
        if self.pipe_r < 0:
            self._take_pipe()
        status = self._pump(budget)
        if self.in_pipe == 0:
            self._release_pipe()
        return status

    cdef int _pump(self, Py_ssize_t budget):
        cdef ssize_t n
        cdef Py_ssize_t moved = 0
        cdef Py_ssize_t want
        cdef bint drained = False
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
            if drained or moved >= budget:
                return AGAIN
            want = self.pipe_size
            n = splice(self.src, NULL, self.pipe_w, NULL, <size_t>want,
                       SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            if n > 0:
                self.in_pipe += n
                self.bytes += n
                moved += n
                if n < want:
                    drained = True
                elif not self.grow_tried:
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


cdef class CopyPump:
    """src socket -> user-space buffer -> dst socket with recv/send."""

    cdef readonly int src
    cdef readonly int dst
    cdef char *buf
    cdef Py_ssize_t size
    cdef Py_ssize_t start
    cdef Py_ssize_t end
    cdef bint src_eof
    cdef readonly long long bytes
    cdef readonly int error

    def __cinit__(self, int src, int dst, Py_ssize_t size=65536):
        if size <= 0:
            raise ValueError("buffer size must be positive")
        self.buf = <char *>malloc(size)
        if self.buf == NULL:
            raise MemoryError()
        self.size = size
        self.src = src
        self.dst = dst

    def __dealloc__(self):
        if self.buf != NULL:
            free(self.buf)
            self.buf = NULL

    def close(self):
        """Nothing to release before garbage collection; kept for symmetry with SplicePump."""

    @property
    def pending(self):
        return self.end - self.start

    cpdef int pump(self, Py_ssize_t budget=DEFAULT_BUDGET):
        cdef ssize_t n
        cdef Py_ssize_t moved = 0
        cdef bint drained = False
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
            if drained or moved >= budget:
                return AGAIN
            n = recv(self.src, self.buf, <size_t>self.size, 0)
            if n > 0:
                self.end = n
                self.bytes += n
                moved += n
                drained = n < self.size
            elif n == 0:
                self.src_eof = True
            elif errno == EINTR:
                continue
            elif errno == EAGAIN:
                return WANT_READ
            else:
                self.error = errno
                return READ_ERROR
