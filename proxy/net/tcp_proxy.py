"""The L4 proxy: one accepted client fd, one upstream fd, bytes pumped both ways.

Each direction is a pump from `proxy._core.splice` driven by a small loop that
only waits when the kernel says so. A FIN in one direction is passed on with
shutdown(SHUT_WR) while the other keeps flowing; a reset on either side is
passed on as a reset to the other; `idle_timeout` with no bytes in either
direction closes both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import trio

from .._core import sockops
from .._core.splice import (
    PUMP_AGAIN,
    PUMP_EOF,
    PUMP_READ_ERROR,
    PUMP_WANT_READ,
    PUMP_WANT_WRITE,
    CopyPump,
    SplicePump,
)
from ..cluster import Balancer
from ..config import Cluster, Listener
from ..errors import UpstreamConnectError
from .connect import connect

log = logging.getLogger("meshproxy.tcp")

# Endpoints tried for one client before giving up (each only once).
MAX_CONNECT_ATTEMPTS = 5


@dataclass(slots=True)
class TcpListenerStats:
    accepted: int = 0
    active: int = 0
    rejected: int = 0  # over max_connections
    connect_failures: int = 0
    bytes_from_clients: int = 0
    bytes_to_clients: int = 0
    resets: int = 0
    idle_timeouts: int = 0


class _Relay:
    """The shared state of one proxied connection's two directions."""

    __slots__ = ("scope", "idle_timeout", "refresh_at", "granularity", "reset_fds")

    def __init__(self, idle_timeout: float) -> None:
        now = trio.current_time()
        self.scope = trio.CancelScope(deadline=now + idle_timeout)
        self.idle_timeout = idle_timeout
        # Moving a deadline costs a heap push; refresh it at most every
        # `granularity` seconds, so idle closes land within 5% of the timeout.
        self.granularity = min(1.0, idle_timeout / 20)
        self.refresh_at = now + self.granularity
        self.reset_fds: tuple[int, ...] = ()

    def fail(self, reset_fd: int) -> None:
        """One side broke: reset the other, stop both directions."""
        self.reset_fds = (reset_fd,)
        self.scope.cancel()


async def _pump_loop(relay: _Relay, pump: SplicePump | CopyPump) -> None:
    wait_readable = trio.lowlevel.wait_readable
    wait_writable = trio.lowlevel.wait_writable
    checkpoint = trio.lowlevel.checkpoint
    current_time = trio.current_time
    src, dst = pump.src, pump.dst
    while True:
        status = pump.pump()
        if status == PUMP_WANT_READ:
            await wait_readable(src)
        elif status == PUMP_AGAIN:
            # The source looked drained: yield once so the peer's next bytes can
            # arrive, then try again before paying for a wait.
            await checkpoint()
        elif status == PUMP_WANT_WRITE:
            await wait_writable(dst)
        elif status == PUMP_EOF:
            sockops.shutdown_write(dst)
            return
        else:
            # A read error means the source is gone: reset the destination.
            # A write error means the destination is gone: reset the source.
            relay.fail(dst if status == PUMP_READ_ERROR else src)
            return
        now = current_time()
        if now >= relay.refresh_at:
            relay.scope.deadline = now + relay.idle_timeout
            relay.refresh_at = now + relay.granularity


class TcpProxy:
    """Serves the connections of one tcp listener in one worker."""

    def __init__(self, listener: Listener, cluster: Cluster, balancer: Balancer) -> None:
        self.listener = listener
        self.cluster = cluster
        self.balancer = balancer
        self.stats = TcpListenerStats()
        self._pump_type = SplicePump if listener.splice else CopyPump

    async def serve(self, client_fd: int) -> None:
        """Proxy one accepted connection; always closes `client_fd`."""
        stats = self.stats
        stats.active += 1
        upstream_fd = -1
        reset_fds: tuple[int, ...] = ()
        try:
            try:
                upstream_fd = await self._connect()
            except UpstreamConnectError as exc:
                stats.connect_failures += 1
                log.info("%s: closing client: %s", self.listener.name, exc)
                return
            reset_fds = await self._relay(client_fd, upstream_fd)
        finally:
            stats.active -= 1
            for fd in (client_fd, upstream_fd):
                if fd < 0:
                    continue
                if fd in reset_fds:
                    sockops.reset_close(fd)
                else:
                    sockops.close_fd(fd)

    async def _connect(self) -> int:
        endpoints = self.cluster.endpoints
        timeout = self.cluster.connect_timeout
        tried: list[int] = []
        last_error: UpstreamConnectError | None = None
        for _ in range(min(len(endpoints), MAX_CONNECT_ATTEMPTS)):
            index = self.balancer.pick(tried)
            tried.append(index)
            try:
                return await connect(endpoints[index].address, timeout)
            except UpstreamConnectError as exc:
                log.debug("%s: %s", self.listener.name, exc)
                last_error = exc
        assert last_error is not None  # the cluster has at least one endpoint (config invariant)
        raise last_error

    async def _relay(self, client_fd: int, upstream_fd: int) -> tuple[int, ...]:
        """Pump both directions until both saw EOF, one side broke or idle expired.

        Returns the fds to close with a reset rather than a FIN.
        """
        relay = _Relay(self.listener.idle_timeout)
        to_upstream = self._pump_type(client_fd, upstream_fd)
        to_client = self._pump_type(upstream_fd, client_fd)
        try:
            with relay.scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_pump_loop, relay, to_client)
                    await _pump_loop(relay, to_upstream)
        finally:
            self.stats.bytes_from_clients += to_upstream.bytes
            self.stats.bytes_to_clients += to_client.bytes
            to_upstream.close()
            to_client.close()
        if relay.reset_fds:
            self.stats.resets += 1
        elif relay.scope.cancelled_caught:
            self.stats.idle_timeouts += 1
        return relay.reset_fds
