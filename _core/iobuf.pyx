# cython: language_level=3
"""Receive buffers and sends on plain int fds, for the HTTP path.

`RecvBuffer` owns a fixed-size bytearray: recv() appends at `end`, parsers
read `data[start:end]` in place (the buffer protocol, no copy), and consumed
bytes are dropped by moving `start`. Sends take any bytes-like object and an
offset, so a partial write resumes where it stopped.

Return conventions (no exceptions on the expected paths):
    recv:  n > 0 bytes read, 0 at EOF, -1 would block, -2 buffer full
    send:  n >= 0 bytes written, -1 would block
Other errors (ECONNRESET, EPIPE, ...) raise OSError.
"""

from cpython.bytearray cimport PyByteArray_AS_STRING
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE
from libc.string cimport memmove

cdef extern from "<errno.h>" nogil:
    int errno
    int EAGAIN
    int EINTR

cdef extern from "<linux/tcp.h>" nogil:
    # linux/tcp.h, not netinet/tcp.h: glibc's copy lacks the byte counters.
    struct tcp_info:
        unsigned long long tcpi_bytes_acked
        unsigned long long tcpi_bytes_received
    int TCP_INFO

cdef extern from "<netinet/in.h>" nogil:
    int IPPROTO_TCP

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int MSG_NOSIGNAL
    int MSG_PEEK
    int MSG_DONTWAIT


cdef class RecvBuffer:
    cdef bytearray _data
    cdef char *_ptr
    cdef readonly Py_ssize_t start
    cdef readonly Py_ssize_t end
    cdef readonly Py_ssize_t capacity

    def __cinit__(self, Py_ssize_t capacity=65536):
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self._data = bytearray(capacity)
        self._ptr = PyByteArray_AS_STRING(self._data)
        self.capacity = capacity

    @property
    def data(self):
        """The storage; valid bytes are data[start:end]. Never resized."""
        return self._data

    def __len__(self):
        return self.end - self.start

    cpdef Py_ssize_t recv(self, int fd) except -3:
        cdef ssize_t n
        if self.start == self.end:
            self.start = 0
            self.end = 0
        elif self.end == self.capacity and self.start > 0:
            memmove(self._ptr, self._ptr + self.start, self.end - self.start)
            self.end -= self.start
            self.start = 0
        if self.end == self.capacity:
            return -2
        while True:
            n = recv(fd, self._ptr + self.end, <size_t>(self.capacity - self.end), 0)
            if n >= 0:
                self.end += n
                return n
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                return -1
            raise OSError(errno, "recv failed")

    cpdef void consume(self, Py_ssize_t n):
        """Drop n bytes from the front (they were parsed or forwarded)."""
        if n < 0 or n > self.end - self.start:
            raise ValueError("consume beyond the buffered bytes")
        self.start += n
        if self.start == self.end:
            self.start = 0
            self.end = 0

    cpdef bytes take(self, Py_ssize_t n):
        """The first n buffered bytes as a new object, consumed."""
        cdef bytes out
        if n > self.end - self.start:
            n = self.end - self.start
        out = self._ptr[self.start:self.start + n]
        self.consume(n)
        return out

    cpdef Py_ssize_t send_to(self, int fd, Py_ssize_t n) except -3:
        """Send up to n buffered bytes to fd and consume what was written."""
        cdef ssize_t sent
        if n > self.end - self.start:
            n = self.end - self.start
        if n == 0:
            return 0
        while True:
            sent = send(fd, self._ptr + self.start, <size_t>n, MSG_NOSIGNAL)
            if sent >= 0:
                self.consume(sent)
                return sent
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                return -1
            raise OSError(errno, "send failed")

    def grow(self, Py_ssize_t capacity):
        """Enlarge the storage (for a head that does not fit), keeping the bytes."""
        cdef bytearray data
        if capacity <= self.capacity:
            return
        data = bytearray(capacity)
        data[0:self.end - self.start] = self._data[self.start:self.end]
        self._data = data
        self._ptr = PyByteArray_AS_STRING(data)
        self.end -= self.start
        self.start = 0
        self.capacity = capacity

    def clear(self):
        self.start = 0
        self.end = 0


def send_from(int fd, object data, Py_ssize_t offset=0):
    """Send data[offset:] (any bytes-like object); bytes written or -1 to wait."""
    cdef Py_buffer view
    cdef ssize_t sent
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        if offset < 0 or offset > view.len:
            raise ValueError("offset out of range")
        if offset == view.len:
            return 0
        while True:
            sent = send(fd, <char *>view.buf + offset, <size_t>(view.len - offset), MSG_NOSIGNAL)
            if sent >= 0:
                return sent
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                return -1
            raise OSError(errno, "send failed")
    finally:
        PyBuffer_Release(&view)


def peer_closed(int fd):
    """True when an idle connection's peer has closed or reset it.

    Checked before reusing a pooled upstream connection: a peek that finds EOF
    (or an error) means a request sent there would be lost; unexpected bytes on
    an idle connection make it unusable too.
    """
    cdef char byte
    cdef ssize_t n = recv(fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT)
    if n < 0:
        return errno != EAGAIN and errno != EINTR
    return True


def tcp_bytes(int fd):
    """(bytes received, bytes sent and acknowledged) over a TCP connection's life, as the
    kernel counted them; (0, 0) when it cannot say. One call when a connection ends
    replaces counting at every recv and send."""
    cdef tcp_info info
    cdef socklen_t length = sizeof(info)
    if getsockopt(fd, IPPROTO_TCP, TCP_INFO, &info, &length) != 0:
        return 0, 0
    return info.tcpi_bytes_received, info.tcpi_bytes_acked
