"""Keep-alive connections to upstream endpoints.

An `EndpointPool` keeps idle connections to one endpoint, most recently used
first (a warm connection is the likeliest to still be open). Taking one checks
that the upstream has not closed it while it sat idle, so a request is never
written into a connection that is already gone; a connection goes back only
after its response was fully written to the client. Idle connections are
bounded in number and age.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

from .._core import sockops
from .._core.iobuf import RecvBuffer, peer_closed
from ..cluster import make_balancer
from ..cluster.circuit import CONNECTIONS, PENDING, CircuitBreaker
from ..cluster.health import EndpointAvailability
from ..config import Address, Cluster
from ..errors import (
    CircuitOpenError,
    NoHealthyUpstreamError,
    UpstreamConnectError,
    UpstreamTlsError,
)
from ..net.connect import connect
from ..telemetry import ClusterStats, record_connect_failure

if TYPE_CHECKING:
    from ..net.tls_bridge import TlsBridges

log = logging.getLogger("meshproxy.upstream")

# Idle connections kept per endpoint, and how long one may sit idle. A few busy
# HTTP/2 clients keep hundreds of requests in flight (100 streams each): fewer idle
# connections than that means a connect and a close for most of their requests.
# Upstream servers commonly close idle keep-alive connections after 60-75 s;
# closing ours first avoids racing them.
MAX_IDLE_PER_ENDPOINT = 512
IDLE_TIMEOUT = 50.0
RESPONSE_BUFFER = 65536


class UpstreamConn:
    """One connection to an endpoint, with the buffer its responses are read into."""

    __slots__ = ("buffer", "circuit", "endpoint", "fd", "idle_since")

    def __init__(self, fd: int, endpoint: int, circuit: CircuitBreaker | None = None) -> None:
        self.fd = fd
        self.endpoint = endpoint
        self.buffer = RecvBuffer(RESPONSE_BUFFER)
        self.idle_since = 0.0
        self.circuit = circuit  # holds one of its connections until closed

    def close(self) -> None:
        if self.fd >= 0:
            sockops.close_fd(self.fd)
            self.fd = -1
            if self.circuit is not None:
                self.circuit.release(CONNECTIONS)


class EndpointPool:
    def __init__(self, address: Address, index: int, connect_timeout: float,
                 cluster_stats: ClusterStats, circuit: CircuitBreaker | None = None,
                 origination: Origination | None = None) -> None:
        self.address = address
        self.index = index
        self.connect_timeout = connect_timeout
        self.cluster_stats = cluster_stats
        self.circuit = circuit  # the cluster's, when it has one
        self.origination = origination  # mTLS to the endpoint (`clusters[].tls`)
        self.address_text = str(address)  # for logs and spans, made once
        self.stats = cluster_stats.endpoints[str(address)]
        self._idle: list[UpstreamConn] = []
        self.active = 0  # connections handed out and not yet returned or closed
        self.retired = False  # a reload replaced this endpoint: no more pooling

    def take_idle(self) -> UpstreamConn | None:
        """The most recently used idle connection that is still clean and open.

        Every candidate is peeked at (one syscall): the upstream may have
        closed it, or sent bytes nobody asked for, which must never be read as
        the answer to the next request.
        """
        idle = self._idle
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since > IDLE_TIMEOUT or peer_closed(conn.fd):
                conn.close()
                continue
            self.cluster_stats.pool_hits += 1
            self.active += 1
            return conn
        self.cluster_stats.pool_misses += 1
        return None

    async def open(self) -> UpstreamConn:
        """A new pooled connection (see `connect` for the errors)."""
        fd = await self.connect()
        self.active += 1
        return UpstreamConn(fd, self.index, self.circuit)

    async def connect(self) -> int:
        """A new connection's fd (with `tls`, the plaintext end of the mTLS bridge), owned by
        the caller. It holds one of the breaker's connections until `connection_closed`
        (an UpstreamConn does that itself). CircuitOpenError when the cluster's breaker allows
        no more connections or connects waiting, UpstreamConnectError when the connect fails."""
        circuit = self.circuit
        if circuit is not None:
            if not circuit.try_acquire(CONNECTIONS):
                raise CircuitOpenError("max_connections reached")
            if not circuit.try_acquire(PENDING):
                circuit.release(CONNECTIONS)
                raise CircuitOpenError("max_pending reached")
        try:
            fd = await connect(self.address, self.connect_timeout)
            if self.origination is not None:
                fd = await self.origination.originate(fd)
        except BaseException as exc:
            if circuit is not None:
                circuit.release(CONNECTIONS)
            if isinstance(exc, UpstreamConnectError):
                record_connect_failure(self.cluster_stats, self.stats)
            raise
        finally:
            if circuit is not None:
                circuit.release(PENDING)
        self.cluster_stats.connections += 1
        return fd

    def connection_closed(self) -> None:
        """A connection from `connect` was closed by its owner."""
        if self.circuit is not None:
            self.circuit.release(CONNECTIONS)

    def give_back(self, conn: UpstreamConn) -> None:
        """Return a connection whose last response was fully delivered."""
        self.active -= 1
        if self.retired or len(self._idle) >= MAX_IDLE_PER_ENDPOINT or len(conn.buffer):
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


class Origination:
    """mTLS to a cluster's endpoints: the worker's TLS bridges (set once the worker has
    them) and the identities the endpoints may present."""

    __slots__ = ("bridges", "expected")

    def __init__(self, expected: tuple[str, ...]) -> None:
        self.expected = expected
        self.bridges: TlsBridges | None = None

    async def originate(self, fd: int) -> int:
        """The plaintext fd standing for a TLS connection over `fd` (which this takes over);
        UpstreamTlsError or UpstreamIdentityError (both connect errors) when it fails."""
        if self.bridges is None:
            sockops.close_fd(fd)
            raise UpstreamTlsError("no TLS bridges in this process")
        return await self.bridges.originate(fd, self.expected)


class UpstreamCluster:
    """A cluster's balancer, one pool per endpoint, and what keeps traffic from bad
    endpoints: health checks, outlier ejection, the circuit breaker."""

    def __init__(self, cluster: Cluster, stats: ClusterStats) -> None:
        self.config = cluster
        self.name = cluster.name
        self.stats = stats
        self.balancer = make_balancer(cluster)
        self.hash_on = cluster.hash_on
        # What `hash_key` looks up, encoded once.
        self._hash_header = cluster.hash_on.header.encode() if cluster.hash_on and cluster.hash_on.header else None
        self._hash_cookie = cluster.hash_on.cookie.encode() if cluster.hash_on and cluster.hash_on.cookie else None
        # Balancers that steer by requests in flight or latency need to be told.
        self.load_aware = cluster.lb in ("least_request", "peak_ewma")
        self.http2 = cluster.protocol == "http2"  # spoken upstream: HTTP/2 clients only, for now
        # Shared by the whole cluster, as Envoy's thresholds are (per worker here).
        self.circuit = CircuitBreaker(cluster.circuit_breaker) if cluster.circuit_breaker else None
        self.origination = Origination(tuple(cluster.tls.identity)) if cluster.tls is not None else None
        self.pools = [
            EndpointPool(endpoint.address, i, cluster.connect_timeout, stats, self.circuit,
                         self.origination)
            for i, endpoint in enumerate(cluster.endpoints)
        ]
        # None when neither health checks nor outlier detection are configured: every
        # endpoint always takes traffic, and the request path skips all of this.
        self.availability: EndpointAvailability | None = None
        self.outlier = None
        if cluster.health_check is not None or cluster.outlier_detection is not None:
            self.availability = EndpointAvailability.for_cluster(cluster, time.monotonic())
            self.outlier = self.availability.outlier
            for pool in self.pools:
                pool.stats.unhealthy = int(self.availability.health is not None)  # pending

    def pick(self, exclude: Collection[int] = (), key: bytes | None = None) -> EndpointPool:
        """The endpoint for one try, never one in `exclude` unless all are; unhealthy and
        ejected endpoints are left out too (all of them in panic routing).
        NoHealthyUpstreamError when none is left even so."""
        availability = self.availability
        if availability is not None:
            now = time.monotonic()
            if self.outlier is not None:
                for index in self.outlier.refresh(now):
                    self._ejection_ended(index)
            unusable = availability.excluded(now)
            if unusable:
                if len(unusable) == len(self.pools):
                    raise NoHealthyUpstreamError("no healthy endpoint")
                both = unusable.union(exclude)
                # Every usable endpoint was tried: a retry goes to one of them again rather
                # than to an unhealthy one.
                exclude = both if len(both) < len(self.pools) else unusable
        return self.pools[self.balancer.pick(exclude, key)]

    def record_outcome(self, pool: EndpointPool, status: int, error: str | None) -> None:
        """How a try ended, for outlier detection: the upstream's `status`, or a local
        `error` code when it gave no answer."""
        outlier = self.outlier
        if outlier is None:
            return
        now = time.monotonic()
        if error is not None and status == 0:
            ejected = outlier.record_local_failure(pool.index, now)
        else:
            ejected = outlier.record_response(pool.index, status, now)
        if ejected:
            pool.stats.ejected = 1
            pool.stats.ejections += 1
            log.warning("%s: endpoint %s ejected for %.0fs (outlier detection)", self.name,
                        pool.address, (outlier.ejected_until(pool.index) or now) - now)

    def _ejection_ended(self, index: int) -> None:
        pool = self.pools[index]
        pool.stats.ejected = 0
        log.info("%s: endpoint %s back from ejection", self.name, pool.address)

    def record(self, index: int, passed: bool) -> bool:
        """An active health check's verdict on endpoint `index` (the health checker feeds
        the cluster as it would a `HealthState`); True when the endpoint's state flipped."""
        assert self.availability is not None and self.availability.health is not None
        health = self.availability.health
        flipped = health.record(index, passed)
        if flipped:
            self.pools[index].stats.unhealthy = int(not health.healthy(index))
        return flipped

    def status(self, index: int) -> str:
        """"healthy", "unhealthy" or "pending" (health checks), or "ejected"; "healthy"
        when the cluster checks nothing."""
        if self.outlier is not None and self.outlier.ejected(index):
            return "ejected"
        if self.availability is None or self.availability.health is None:
            return "healthy"
        return self.availability.health.status(index)

    def refresh(self) -> None:
        """Bring ejections that ran out up to date without waiting for traffic (called
        from the worker's periodic sweep) so /clusters never shows a stale ejection."""
        if self.outlier is not None:
            for index in self.outlier.refresh(time.monotonic()):
                self._ejection_ended(index)

    def hash_key(self, header: Callable[[bytes], bytes | None], peer: bytes) -> bytes | None:
        """What a hashing balancer hashes for this request (None: pick at random)."""
        hash_on = self.hash_on
        if hash_on is None:
            return None
        if self._hash_header is not None:
            return header(self._hash_header)
        if self._hash_cookie is not None:
            return _cookie(header(b"cookie"), self._hash_cookie)
        return peer

    def close_expired(self) -> None:
        self.refresh()
        for pool in self.pools:
            pool.close_expired()

    def close(self) -> None:
        for pool in self.pools:
            pool.close()

    @property
    def tls(self) -> TlsBridges | None:
        return self.origination.bridges if self.origination is not None else None

    @tls.setter
    def tls(self, bridges: TlsBridges) -> None:
        """The worker's TLS bridges, for clusters that originate mTLS."""
        if self.origination is not None:
            self.origination.bridges = bridges

    def retire(self) -> None:
        """A reload replaced this cluster: close idle connections now, the rest when
        their requests end (requests in flight finish on it)."""
        for pool in self.pools:
            pool.retired = True
            pool.close()


def _cookie(header: bytes | None, name: bytes) -> bytes | None:
    """The value of cookie `name` in a Cookie header ("a=1; b=2")."""
    if not header:
        return None
    for pair in header.split(b";"):
        key, sep, value = pair.strip().partition(b"=")
        if sep and key == name:
            return value
    return None
