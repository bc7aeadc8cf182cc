"""Listening sockets, bound once by the supervisor and shared with the workers.

Each worker gets its own socket per listener, all bound to the same address with
SO_REUSEPORT, so the kernel spreads new connections over the workers. The
supervisor keeps its copy of every socket: when a worker dies, connections
queued on its socket wait for the restarted worker instead of being reset.
"""

from __future__ import annotations

import errno
import socket

from ..config import Address
from ..errors import UsageError


def _family(host: str) -> int:
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"cannot resolve listen address {host!r}: {exc}") from exc
    return infos[0][0]


def _check_free(family: int, address: Address) -> None:
    """Fail if something already listens on the address.

    SO_REUSEPORT would otherwise let a second meshproxy (or anything else that
    sets it) silently share the port and take half the connections.
    """
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((address.host, address.port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(f"address {address} is already in use") from exc
        raise UsageError(f"cannot bind {address}: {exc.strerror}") from exc
    finally:
        probe.close()


def bind_listener(address: Address, count: int, backlog: int = socket.SOMAXCONN) -> list[socket.socket]:
    """`count` non-blocking listening sockets sharing `address` (port 0 picks one)."""
    family = _family(address.host)
    if address.port:
        _check_free(family, address)
    sockets: list[socket.socket] = []
    port = address.port
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((address.host, port))
            port = sock.getsockname()[1]
            sock.listen(backlog)
            sock.setblocking(False)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise UsageError(f"cannot listen on {address}: {exc.strerror}") from exc
    return sockets


def bound_address(sock: socket.socket) -> Address:
    host, port = sock.getsockname()[:2]
    return Address(host, port)
