"""Keep-alive connections to upstream endpoints.

An `EndpointPool` keeps idle connections to one endpoint, most recently used
first (a warm connection is the likeliest to still be open). Taking one checks
that the upstream has not closed it while it sat idle, so a request is never
written into a connection that is already gone; a connection goes back only
after its response was fully written to the client. Idle connections are
bounded in number and age.
"""

from __future__ import annotations

import time
from collections.abc import Collection

from .._core import sockops
from .._core.iobuf import RecvBuffer, peer_closed
from ..cluster import Balancer, make_balancer
from ..config import Address, Cluster
from ..net.connect import connect

# Idle connections kept per endpoint, and how long one may sit idle. Upstream
# servers commonly close idle keep-alive connections after 60-75 s; closing
# ours first avoids racing them.
MAX_IDLE_PER_ENDPOINT = 128
IDLE_TIMEOUT = 50.0
RESPONSE_BUFFER = 65536
FRESH_IDLE = 1.0


class UpstreamConn:
    """One connection to an endpoint, with the buffer its responses are read into."""

    __slots__ = ("fd", "endpoint", "buffer", "requests", "idle_since")

    def __init__(self, fd: int, endpoint: int) -> None:
        self.fd = fd
        self.endpoint = endpoint
        self.buffer = RecvBuffer(RESPONSE_BUFFER)
        self.requests = 0
        self.idle_since = 0.0

    def close(self) -> None:
        if self.fd >= 0:
            sockops.close_fd(self.fd)
            self.fd = -1


class EndpointPool:
    def __init__(self, address: Address, index: int, connect_timeout: float) -> None:
        self.address = address
        self.index = index
        self.connect_timeout = connect_timeout
        self._idle: list[UpstreamConn] = []
        self.opened = 0
        self.reused = 0
        self.active = 0  # connections handed out and not yet returned or closed

    def take_idle(self, check: bool = True) -> UpstreamConn | None:
        """The most recently used idle connection that is still open.

        With `check` false, a connection idle for less than FRESH_IDLE is
        taken without the peek syscall: upstreams close idle connections
        after seconds, and a request that finds one closed anyway is retried
        (the caller passes `check=False` only for requests it may replay).
        """
        idle = self._idle
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            quiet = now - conn.idle_since
            if quiet > IDLE_TIMEOUT or ((check or quiet > FRESH_IDLE) and peer_closed(conn.fd)):
                conn.close()
                continue
            self.reused += 1
            self.active += 1
            return conn
        return None

    async def open(self) -> UpstreamConn:
        fd = await connect(self.address, self.connect_timeout)
        self.opened += 1
        self.active += 1
        return UpstreamConn(fd, self.index)

    def give_back(self, conn: UpstreamConn) -> None:
        """Return a connection whose last response was fully delivered."""
        self.active -= 1
        if len(self._idle) >= MAX_IDLE_PER_ENDPOINT or len(conn.buffer):
            conn.close()  # unsolicited bytes after a response: not reusable
            return
        conn.idle_since = time.monotonic()
        self._idle.append(conn)

    def discard(self, conn: UpstreamConn) -> None:
        """Close a connection that cannot be reused (broken, or mid-message)."""
        self.active -= 1
        conn.close()

    def close_expired(self) -> None:
        now = time.monotonic()
        keep = []
        for conn in self._idle:
            if now - conn.idle_since > IDLE_TIMEOUT:
                conn.close()
            else:
                keep.append(conn)
        self._idle = keep

    def close(self) -> None:
        for conn in self._idle:
            conn.close()
        self._idle.clear()

    @property
    def idle(self) -> int:
        return len(self._idle)


class UpstreamCluster:
    """A cluster's balancer and one pool per endpoint."""

    def __init__(self, cluster: Cluster, balancer: Balancer | None = None) -> None:
        self.config = cluster
        self.name = cluster.name
        self.balancer = balancer or make_balancer(cluster)
        self.pools = [
            EndpointPool(endpoint.address, i, cluster.connect_timeout)
            for i, endpoint in enumerate(cluster.endpoints)
        ]

    def pick(self, exclude: Collection[int] = ()) -> EndpointPool:
        return self.pools[self.balancer.pick(exclude)]

    def close_expired(self) -> None:
        for pool in self.pools:
            pool.close_expired()

    def close(self) -> None:
        for pool in self.pools:
            pool.close()
