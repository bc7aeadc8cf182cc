"""Non-blocking upstream connects on plain fds, with a deadline per attempt."""

from __future__ import annotations

import errno
import functools
import ipaddress
import socket

import trio

from .._core import sockops
from ..config import Address
from ..errors import UpstreamConnectError

_REFUSED = {errno.ECONNREFUSED, errno.ECONNRESET}


@functools.lru_cache(maxsize=4096)
def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# Hostname endpoints: answers are kept this long, then looked up again, so an
# endpoint whose address changes is followed without a restart.
DNS_TTL = 30.0
_resolved: dict[tuple[str, int], tuple[str, float]] = {}


async def resolve(address: Address) -> str:
    """An IP literal for `address.host`; hostnames are cached for DNS_TTL seconds."""
    if is_ip_literal(address.host):
        return address.host
    key = (address.host, address.port)
    cached = _resolved.get(key)
    now = trio.current_time()
    if cached is not None and cached[1] > now:
        return cached[0]
    try:
        infos = await trio.socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if cached is not None:
            return cached[0]  # keep the last good answer while the resolver fails
        raise UpstreamConnectError(f"cannot resolve {address.host}: {exc}", code="dns_failed") from exc
    ip = infos[0][4][0]
    _resolved[key] = (ip, now + DNS_TTL)
    return ip


async def connect(address: Address, timeout: float) -> int:
    """Connect to `address` within `timeout` seconds; the caller owns the fd.

    Raises UpstreamConnectError with code `connect_refused`, `connect_timeout`
    or `connect_failed`.
    """
    host = await resolve(address)
    try:
        fd, in_progress = sockops.connect_nonblocking(host, address.port)
    except OSError as exc:
        raise _connect_error(address, exc.errno) from exc
    if not in_progress:
        return fd
    if not sockops.poll_writable(fd):
        try:
            with trio.move_on_after(timeout) as scope:
                await trio.lowlevel.wait_writable(fd)
        except BaseException:
            sockops.close_fd(fd)
            raise
        if scope.cancelled_caught:
            sockops.close_fd(fd)
            raise UpstreamConnectError(
                f"connect to {address} timed out after {timeout:g}s", code="connect_timeout"
            )
    err = sockops.socket_error(fd)
    if err:
        sockops.close_fd(fd)
        raise _connect_error(address, err)
    return fd


def _connect_error(address: Address, err: int | None) -> UpstreamConnectError:
    code = "connect_refused" if err in _REFUSED else "connect_failed"
    reason = errno.errorcode.get(err or 0, str(err))
    return UpstreamConnectError(f"connect to {address} failed: {reason}", code=code)
