"""The L4 proxy: one accepted client fd, one upstream fd, bytes pumped both ways.

Connection set-up (endpoint pick, connect with failover) is a Trio task per
connection. Once both fds are open the bytes are moved by the worker's
`RelayEngine` (`proxy._core.splice`) in C, and the connection's task only
sleeps until the relay finishes or goes idle. A FIN in one direction is passed
on while the other keeps flowing; a reset on either side is passed on as a
reset to the other; `idle_timeout` with no bytes either way closes both.

With mTLS (`tls` on the listener or the cluster) the relay runs on the plaintext ends of
TLS bridges (net/tls_bridge.py): splice cannot read TLS, the bridge does the copying. A
listener's `policy` is enforced here, once per connection, by the client's verified
identity (none for a plaintext client): a denied client is closed at once.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import trio

from .._core import sockops
from .._core.splice import Relay, RelayEngine, monotonic
from ..config import Listener
from ..errors import ProxyError, UpstreamConnectError
from ..policy import Policy
from ..telemetry import ListenerStats

if TYPE_CHECKING:
    from ..http.observe import Observer
    from ..upstream import EndpointPool, UpstreamCluster
    from .tls_bridge import TlsBridges

log = logging.getLogger("meshproxy.tcp")

# Endpoints tried for one client before giving up (each only once).
MAX_CONNECT_ATTEMPTS = 5


async def run_engine(engine: RelayEngine) -> None:
    """The one task that moves the bytes of every relay in this worker."""
    wait_readable = trio.lowlevel.wait_readable
    checkpoint = trio.lowlevel.checkpoint
    epfd = engine.fileno()
    try:
        while True:
            if engine.has_backlog:
                await checkpoint()  # relays with bytes left: yield once, go on
            else:
                await wait_readable(epfd)
            engine.run()
    finally:
        trio.lowlevel.notify_closing(epfd)
        engine.close()


class TcpProxy:
    """Serves the connections of one tcp listener in one worker."""

    def __init__(self, listener: Listener, cluster: UpstreamCluster, engine: RelayEngine,
                 stats: ListenerStats, tls: TlsBridges | None = None) -> None:
        self.engine = engine
        self.stats = stats
        self.tls = tls  # the worker's TLS bridges: client identities, mTLS to the cluster
        self.observer: Observer | None = None  # the access log, when configured (set by the worker)
        self.update(listener, cluster)

    def update(self, listener: Listener, cluster: UpstreamCluster) -> None:
        """Take a new config version: connections accepted from now on use it."""
        self.listener = listener
        self.upstream = cluster
        self.cluster = cluster.config
        self.balancer = cluster.balancer
        self.policy = Policy.compile(listener.policy, self.stats)
        hash_on = cluster.config.hash_on
        # Only the source address exists at L4; header/cookie keys fall back to random.
        self.hash_source_ip = hash_on is not None and bool(hash_on.source_ip)

    def drain(self) -> None:
        """Nothing to do: open L4 connections run to their end (or the drain deadline)."""

    async def serve(self, client_fd: int) -> None:
        """Proxy one accepted connection; always closes `client_fd`.

        The acceptor counted the connection in `stats.active`; this uncounts it.
        """
        stats = self.stats
        upstream_fd = -1
        endpoint = -1
        pool: EndpointPool | None = None
        reset_fd = -1
        outcome = _Outcome()
        if self.observer is not None:
            outcome.peer = self._client_ip(client_fd)  # now: once the client is gone it has none
        try:
            if not self.policy.empty and not self._allowed(client_fd):
                outcome.error = "forbidden"
                return
            try:
                upstream_fd, pool, connect_time = await self._connect(client_fd)
            except ProxyError as exc:  # refused, unhealthy, breaker open: no upstream
                stats.connect_failures += 1
                outcome.error = exc.code
                log.info("%s: closing client: %s", self.listener.name, exc)
                return
            # For L4 the balancer's "request" is the connection: least_request
            # counts open connections, peak_ewma learns connect latency.
            endpoint = pool.index
            self.balancer.on_request_start(endpoint)
            reset_fd = await self._relay(client_fd, upstream_fd, outcome)
        finally:
            stats.active -= 1
            if self.observer is not None:
                self._log(client_fd, endpoint, outcome)
            if endpoint >= 0 and upstream_fd >= 0:
                self.balancer.on_request_end(endpoint, connect_time)
            for fd in (client_fd, upstream_fd):
                if fd == reset_fd:
                    sockops.reset_close(fd)
                elif fd >= 0:
                    sockops.close_fd(fd)
            if pool is not None:
                pool.connection_closed()

    def _allowed(self, client_fd: int) -> bool:
        peer = self.tls.peer(client_fd) if self.tls is not None else None
        identity = peer.identity if peer is not None else None
        if self.policy.decide(identity):
            return True
        log.debug("%s: policy denies %s", self.listener.name, identity or "a client without identity")
        return False

    def _client_ip(self, client_fd: int) -> str:
        peer = self.tls.peer(client_fd) if self.tls is not None else None
        return peer.ip if peer is not None else sockops.peer_ip(client_fd)

    async def _connect(self, client_fd: int) -> tuple[int, EndpointPool, float]:
        """(fd, endpoint, seconds the connect took), trying endpoints in turn as the cluster
        picks them: healthy and not ejected, within its circuit breaker. With `tls` on the
        cluster the fd is the plaintext end of an mTLS connection whose peer is one of the
        cluster's identities (a refused one counts as a failed connect)."""
        upstream = self.upstream
        key = self._client_ip(client_fd).encode() if self.hash_source_ip else None
        tried: list[int] = []
        last_error: UpstreamConnectError | None = None
        for _ in range(min(len(upstream.pools), MAX_CONNECT_ATTEMPTS)):
            pool = upstream.pick(tried, key)
            tried.append(pool.index)
            started = monotonic()
            try:
                fd = await pool.connect()
            except UpstreamConnectError as exc:
                log.debug("%s: %s", self.listener.name, exc)
                upstream.record_outcome(pool, 0, exc.code)
                last_error = exc
                continue
            upstream.record_outcome(pool, 200, None)  # a connection made: a success, at L4
            return fd, pool, monotonic() - started
        assert last_error is not None  # the cluster has at least one endpoint (config invariant)
        raise last_error

    async def _relay(self, client_fd: int, upstream_fd: int, outcome: _Outcome) -> int:
        relay = Relay(client_fd, upstream_fd, self.listener.splice)
        try:
            reset_fd = await relay_until_done(self.engine, relay, self.listener.idle_timeout)
        finally:
            self.stats.bytes_from_clients += relay.bytes_from_client
            self.stats.bytes_to_clients += relay.bytes_to_client
            outcome.bytes_in, outcome.bytes_out = relay.bytes_from_client, relay.bytes_to_client
        if reset_fd is None:
            self.stats.idle_timeouts += 1
            outcome.error = "idle_timeout"
            return -1
        if reset_fd >= 0:
            self.stats.resets += 1
            outcome.error = "connection_reset"
        return reset_fd

    def _log(self, client_fd: int, endpoint: int, outcome: _Outcome) -> None:
        assert self.observer is not None
        peer = self.tls.peer(client_fd) if self.tls is not None else None
        self.observer.end_tcp(
            outcome.started_wall, cluster=self.cluster.name,
            endpoint=str(self.cluster.endpoints[endpoint].address) if endpoint >= 0 else None,
            error=outcome.error, bytes_in=outcome.bytes_in, bytes_out=outcome.bytes_out,
            duration=monotonic() - outcome.started, peer=outcome.peer,
            peer_identity=peer.identity if peer is not None else None)


class _Outcome:
    """How one connection went, for its access log line."""

    __slots__ = ("bytes_in", "bytes_out", "error", "peer", "started", "started_wall")

    def __init__(self) -> None:
        self.started = monotonic()
        self.started_wall = time.time()
        self.error: str | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.peer = ""


async def relay_until_done(engine: RelayEngine, relay: Relay, idle_timeout: float) -> int | None:
    """Relay until both sides closed, one side broke, or `idle_timeout` passed quietly.

    Returns the fd to close with a reset rather than a FIN, -1 for a clean
    finish, or None when the relay went idle. The caller
    closes both fds; the relay is out of the engine when this returns.
    """
    finished = trio.Event()
    relay.on_finish = finished.set
    engine.add(relay)
    try:
        # The engine stamps `last_active`; the deadline is only moved when it
        # fires, so an active connection costs nothing per byte here.
        while not finished.is_set():
            quiet_for = monotonic() - relay.last_active
            if quiet_for >= idle_timeout:
                log.debug("relay idle for %.1fs, closing", quiet_for)
                return None
            with trio.move_on_after(idle_timeout - quiet_for):
                await finished.wait()
    finally:
        if not relay.finished:
            engine.discard(relay)
    return relay.reset_fd
