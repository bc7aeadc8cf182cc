# cython: language_level=3
"""Socket system calls on plain int fds, for the data path.

Python's `socket` objects cost a few microseconds per call and per object; a
proxy that owns its fds calls libc directly. Every function here retries EINTR,
never blocks (the fds are non-blocking) and reports failure as OSError, except
where a would-block result is an expected answer (documented per function).
"""

cdef extern from "<errno.h>" nogil:
    int errno
    int EAGAIN
    int EINTR
    int EINPROGRESS
    int ECONNABORTED
from libc.string cimport memset

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t
    struct sockaddr:
        sa_family_t sa_family
    struct sockaddr_storage:
        sa_family_t ss_family
    int AF_INET
    int AF_INET6
    int SOCK_STREAM
    int SOCK_NONBLOCK
    int SOCK_CLOEXEC
    int SOL_SOCKET
    int SO_ERROR
    int SO_LINGER
    int SHUT_WR
    int socket(int domain, int type, int protocol)
    int accept4(int fd, sockaddr *addr, socklen_t *addrlen, int flags)
    int connect(int fd, const sockaddr *addr, socklen_t addrlen)
    int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
    int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
    int getpeername(int fd, sockaddr *addr, socklen_t *addrlen)
    int shutdown(int fd, int how)
    struct linger:
        int l_onoff
        int l_linger

cdef extern from "<netinet/in.h>" nogil:
    int IPPROTO_TCP
    struct in_addr:
        unsigned int s_addr
    struct in6_addr:
        pass
    struct sockaddr_in:
        sa_family_t sin_family
        unsigned short sin_port
        in_addr sin_addr
    struct sockaddr_in6:
        sa_family_t sin6_family
        unsigned short sin6_port
        unsigned int sin6_flowinfo
        in6_addr sin6_addr
        unsigned int sin6_scope_id
    unsigned short htons(unsigned short)

cdef extern from "<netinet/tcp.h>" nogil:
    int TCP_NODELAY

cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int af, const char *src, void *dst)
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)

cdef extern from "<unistd.h>" nogil:
    int close(int fd)

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    short POLLOUT
    int poll(pollfd *fds, unsigned long nfds, int timeout)


cdef inline int _set_int_opt(int fd, int level, int name, int value) noexcept nogil:
    return setsockopt(fd, level, name, &value, sizeof(int))


def accept_nonblocking(int listen_fd, bint nodelay=False):
    """Accept one connection as a non-blocking, close-on-exec fd.

    Returns the new fd, or -1 when no connection is waiting (EAGAIN) or the
    peer gave up before we got to it (ECONNABORTED). Other errors (EMFILE,
    ENFILE, ENOBUFS...) raise OSError so the accept loop can back off.
    """
    cdef int fd
    while True:
        fd = accept4(listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)
        if fd >= 0:
            if nodelay:
                _set_int_opt(fd, IPPROTO_TCP, TCP_NODELAY, 1)
            return fd
        if errno == EINTR:
            continue
        if errno == EAGAIN or errno == ECONNABORTED:
            return -1
        raise OSError(errno, "accept4 failed")


def connect_nonblocking(str host, int port, bint nodelay=True):
    """Start a non-blocking TCP connect to an IP literal.

    Returns (fd, in_progress): when in_progress is true, wait until the fd is
    writable and read the outcome with `socket_error(fd)`. Raises OSError when
    the connect fails at once (e.g. ECONNREFUSED on loopback) and ValueError
    when `host` is not an IPv4 or IPv6 literal.
    """
    cdef sockaddr_storage storage
    cdef sockaddr_in *v4 = <sockaddr_in *>&storage
    cdef sockaddr_in6 *v6 = <sockaddr_in6 *>&storage
    cdef socklen_t length
    cdef int family
    cdef int fd
    cdef int rc
    cdef bytes host_b = host.encode("ascii")
    memset(&storage, 0, sizeof(storage))
    if inet_pton(AF_INET, host_b, &v4.sin_addr) == 1:
        family = AF_INET
        v4.sin_family = AF_INET
        v4.sin_port = htons(port)
        length = sizeof(sockaddr_in)
    elif inet_pton(AF_INET6, host_b, &v6.sin6_addr) == 1:
        family = AF_INET6
        v6.sin6_family = AF_INET6
        v6.sin6_port = htons(port)
        length = sizeof(sockaddr_in6)
    else:
        raise ValueError(f"not an IP address: {host!r}")
    fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    if fd < 0:
        raise OSError(errno, "socket failed")
    if nodelay:
        _set_int_opt(fd, IPPROTO_TCP, TCP_NODELAY, 1)
    while True:
        rc = connect(fd, <sockaddr *>&storage, length)
        if rc == 0:
            return fd, False
        if errno == EINTR:
            continue
        if errno == EINPROGRESS:
            return fd, True
        rc = errno
        close(fd)
        raise OSError(rc, f"connect to {host}:{port} failed")


def poll_writable(int fd):
    """True when the fd is writable now (or has an error to report); never waits.

    A loopback connect answers EINPROGRESS but has usually completed by the
    time the call returns: one poll() then saves a trip through the event loop.
    """
    cdef pollfd entry
    entry.fd = fd
    entry.events = POLLOUT
    entry.revents = 0
    return poll(&entry, 1, 0) > 0


def socket_error(int fd):
    """The pending error of a socket (SO_ERROR), 0 when there is none."""
    cdef int value = 0
    cdef socklen_t length = sizeof(int)
    if getsockopt(fd, SOL_SOCKET, SO_ERROR, &value, &length) != 0:
        return errno
    return value


def peer_ip(int fd):
    """The peer's IP address as text ("" when the socket has no IP peer)."""
    cdef sockaddr_storage storage
    cdef socklen_t length = sizeof(storage)
    cdef char text[64]
    cdef const char *out = NULL
    if getpeername(fd, <sockaddr *>&storage, &length) != 0:
        return ""
    if storage.ss_family == AF_INET:
        out = inet_ntop(AF_INET, &(<sockaddr_in *>&storage).sin_addr, text, sizeof(text))
    elif storage.ss_family == AF_INET6:
        out = inet_ntop(AF_INET6, &(<sockaddr_in6 *>&storage).sin6_addr, text, sizeof(text))
    if out == NULL:
        return ""
    return out.decode("ascii")


def shutdown_write(int fd):
    """Send FIN: the peer reads EOF while the other direction stays open.

    Errors are ignored: a peer that already went away is handled by whoever
    reads from or writes to it next.
    """
    shutdown(fd, SHUT_WR)


def close_fd(int fd):
    """Close an fd (EINTR is not retried: on Linux the fd is gone either way)."""
    close(fd)


def reset_on_close(int fd):
    """Make the coming close() send an RST instead of a FIN (SO_LINGER 0)."""
    cdef linger lg
    lg.l_onoff = 1
    lg.l_linger = 0
    setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg))


def reset_close(int fd):
    """Close with an RST instead of a FIN: propagate a reset."""
    reset_on_close(fd)
    close(fd)
