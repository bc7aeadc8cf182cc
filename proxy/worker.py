"""A worker process: one Trio loop serving every listener on its own sockets.

Started by the supervisor as `python -m proxy.worker --control-fd N`; receives
its `Setup` (config and listening fds) over the control channel, reports
`Ready`, and serves until told to drain, sent SIGTERM, or orphaned (the control
channel closes when the supervisor dies). With an `identity` configured, the
supervisor sends each new SVID as an `Identity` message; listeners with `tls`
terminate mTLS with it and clusters with `tls` originate it (net/tls_bridge.py).
"""

from __future__ import annotations

import argparse
import logging
import resource
import signal
import socket
import ssl
import sys

import trio

from . import control
from ._core import sockops
from ._core.splice import RelayEngine
from .config import Config, Listener, Telemetry
from .http.h1proxy import Http1Proxy
from .http.observe import Observer, Tracing
from .identity.tls import TlsContexts
from .log_sink import AccessLogSink
from .logs import LEVELS, setup_logging
from .net.accept import accept_loop
from .net.tcp_proxy import TcpProxy, run_engine
from .net.tls_bridge import TlsBridges
from .telemetry import WorkerStats
from .telemetry.access_log import AccessLogFilter, compile_format
from .tracing.exporter import SpanExporter
from .upstream import UpstreamCluster
from .upstream.h2pool import H2Upstreams
from .upstream.health_check import run_health_checks

log = logging.getLogger("meshproxy.worker")

POOL_SWEEP_INTERVAL = 5.0


class ListenerServer:
    """Accepts on one listening fd and runs each connection as a task it owns."""

    def __init__(self, listener: Listener, listen_fd: int, proxy: TcpProxy | Http1Proxy,
                 max_connections: int | None, tls: TlsBridges):
        self.listener = listener
        self.listen_fd = listen_fd
        self.proxy = proxy
        self.max_connections = max_connections
        self.tls = tls
        self._accepting = trio.CancelScope()
        self._connections: trio.Nursery | None = None

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listen_fd = self.listen_fd
        try:
            async with trio.open_nursery() as self._connections:
                with self._accepting:
                    task_status.started()
                    await accept_loop(listen_fd, self._on_accept, nodelay=True)
                # Draining. Close the listening fd now (nobody waits on it once
                # the accept loop ended), so new connections are refused rather
                # than queued; the nursery then waits for the open ones.
                listen_fd = -1
                sockops.close_fd(self.listen_fd)
                log.debug("%s: stopped accepting", self.listener.name)
        finally:
            if listen_fd >= 0:
                sockops.close_fd(listen_fd)

    def _on_accept(self, fd: int) -> None:
        stats = self.proxy.stats
        if self.max_connections is not None and stats.active >= self.max_connections:
            stats.rejected += 1
            sockops.close_fd(fd)
            return
        # Counted here, not when the task first runs, so one accept burst
        # cannot overshoot the cap; `serve` uncounts it when it ends.
        stats.accepted += 1
        stats.active += 1
        assert self._connections is not None
        if self.listener.tls is None:
            self._connections.start_soon(self.proxy.serve, fd)
        else:
            self._connections.start_soon(self._serve_tls, self.proxy, self.listener, fd)

    async def _serve_tls(self, proxy: TcpProxy | Http1Proxy, listener: Listener, fd: int) -> None:
        """mTLS first, then the listener's driver on the plaintext (it sees the client's
        identity through `tls.peer(fd)`). The tcp relay counts its bytes itself."""
        assert listener.tls is not None
        http = listener.protocol == "http"
        await self.tls.serve_downstream(fd, listener.tls.mode, proxy.serve, proxy.stats,
                                        listener.idle_timeout, count_bytes=http, http=http)

    def stop_accepting(self) -> None:
        self._accepting.cancel()
        self.proxy.drain()


def _share(limit: int | None, workers: int) -> int | None:
    """This worker's part of a per-listener connection cap (rounded up)."""
    if limit is None:
        return None
    return max(1, -(-limit // workers))


class TelemetryRuntime:
    """The worker's access log sink and span exporter for `config.telemetry`, each a task
    of its own; a reload that changes `telemetry` starts new ones and lets the old ones
    flush and stop."""

    def __init__(self) -> None:
        self.config: Telemetry | None = None
        self.node = ""
        self.sink: AccessLogSink | None = None
        self._stop: list[trio.CancelScope] = []
        self._observer_parts: tuple | None = None  # (sink, format, filter, tracing) or None

    async def apply(self, config: Config, nursery: trio.Nursery) -> bool:
        """Bring the sink and exporter in line with `config`; True when they changed."""
        telemetry = config.telemetry
        if telemetry == self.config and config.node.id == self.node:
            return False
        stopping, self._stop = self._stop, []
        sink = None
        self._observer_parts = None
        log_config, trace_config = telemetry.access_log, telemetry.tracing
        if log_config is not None:
            sink = AccessLogSink(log_config.path)
            try:
                await nursery.start(self._run, sink.run)
            except OSError as exc:
                log.error("telemetry.access_log.path: cannot open %s (%s): no access log",
                          log_config.path, exc.strerror)
                sink = None
        tracing = None
        if trace_config is not None:
            exporter = SpanExporter(trace_config.otlp_endpoint, trace_config.service_name or config.node.id,
                                    encoding=trace_config.encoding)
            await nursery.start(self._run, exporter.run)
            tracing = Tracing(trace_config.propagation, trace_config.sample_rate, exporter)
        if log_config is not None or tracing is not None:
            fmt = compile_format(log_config.format if log_config is not None else "json")
            keep = (AccessLogFilter(log_config.sample_rate, log_config.only, log_config.min_status)
                    if log_config is not None else AccessLogFilter())
            self._observer_parts = (sink, fmt, keep, tracing)
        self.config, self.node, self.sink = telemetry, config.node.id, sink
        for scope in stopping:
            scope.cancel()  # the old sink and exporter flush what they hold as they stop
        return True

    async def _run(self, run, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.CancelScope() as scope:
            self._stop.append(scope)
            await run(task_status=task_status)

    def observer(self, listener: str) -> Observer | None:
        """What a listener's handler reports its requests to; None when nothing is observed."""
        if self._observer_parts is None:
            return None
        return Observer(listener, *self._observer_parts)

    def reopen(self) -> None:
        """SIGUSR1: reopen the access log file (it was rotated)."""
        if self.sink is not None:
            self.sink.reopen()


class DataPlane:
    """The assembly point: listeners, their handlers and the clusters they share, for
    the config version in effect. `apply` moves to a new version in place: unchanged
    clusters keep their pools, unchanged listeners keep their sockets and connections,
    removed ones drain, new ones start accepting."""

    def __init__(self, config: Config, engine: RelayEngine, stats: WorkerStats, tls: TlsBridges) -> None:
        self.config = config
        self.engine = engine
        self.stats = stats
        self.tls = tls
        self.telemetry = TelemetryRuntime()
        self.clusters: dict[str, UpstreamCluster] = {}
        self.servers: dict[str, ListenerServer] = {}
        self._nursery: trio.Nursery | None = None
        self._background: trio.Nursery | None = None  # health checks, log sink, span exporter
        self._health_checks: dict[str, trio.CancelScope] = {}  # cluster name -> its checker
        self.h2_upstreams: H2Upstreams | None = None  # HTTP/2 upstream pools, in `_background`

    def _handler(self, listener: Listener) -> TcpProxy | Http1Proxy:
        stats = self.stats.listeners[listener.name]
        handler: TcpProxy | Http1Proxy
        if listener.protocol == "tcp":
            handler = TcpProxy(listener, self.clusters[listener.cluster], self.engine, stats, self.tls)
        else:
            handler = Http1Proxy(listener, self.clusters, self.engine, stats)
            handler.tls = self.tls  # the client's verified identity: handler.tls.peer(fd)
            handler.h2_upstreams = self.h2_upstreams
        handler.observer = self.telemetry.observer(listener.name)
        return handler

    def _sync_clusters(self, config: Config) -> None:
        clusters = {}
        for cluster in config.clusters:
            current = self.clusters.get(cluster.name)
            if current is not None and current.config == cluster:
                clusters[cluster.name] = current
            else:
                clusters[cluster.name] = upstream = UpstreamCluster(cluster, self.stats.clusters[cluster.name])
                upstream.tls = self.tls  # mTLS origination for `cluster.tls`: tls.originate(fd, ids)
                self._start_health_checks(upstream)
        for name, current in self.clusters.items():
            if clusters.get(name) is not current:
                current.retire()  # a replacement started its own checker already
                if name not in clusters:
                    scope = self._health_checks.pop(name, None)
                    if scope is not None:
                        scope.cancel()
        self.clusters = clusters
        if self.h2_upstreams is not None:
            self.h2_upstreams.retain(clusters.values())  # replaced clusters' pools say GOAWAY

    def _start_health_checks(self, upstream: UpstreamCluster) -> None:
        """Active checks for a cluster with `health_check`, replacing those of the cluster
        it replaces; the verdicts go to the cluster, which keeps traffic off failing endpoints."""
        previous = self._health_checks.pop(upstream.name, None)
        if previous is not None:
            previous.cancel()
        if upstream.config.health_check is None or self._background is None:
            return
        scope = trio.CancelScope()
        self._health_checks[upstream.name] = scope
        self._background.start_soon(self._check_health, upstream, scope)

    @staticmethod
    async def _check_health(upstream: UpstreamCluster, scope: trio.CancelScope) -> None:
        with scope:
            await run_health_checks(upstream.config, upstream)

    async def start(self, nursery: trio.Nursery, background: trio.Nursery,
                    listener_fds: dict[str, int]) -> None:
        self._nursery = nursery
        self._background = background
        self.h2_upstreams = H2Upstreams(background)
        await self.telemetry.apply(self.config, background)
        self._sync_clusters(self.config)
        for listener in self.config.listeners:
            await self._start_server(listener, listener_fds[listener.name])

    async def _start_server(self, listener: Listener, fd: int) -> None:
        cap = _share(listener.max_connections, self.config.worker_count)
        server = ListenerServer(listener, fd, self._handler(listener), cap, self.tls)
        self.servers[listener.name] = server
        assert self._nursery is not None
        await self._nursery.start(server.serve)

    async def apply(self, config: Config, new_fds: dict[str, int]) -> None:
        self.stats.ensure(config)
        assert self._background is not None
        observers_changed = await self.telemetry.apply(config, self._background)
        self._sync_clusters(config)
        self.config = config
        wanted = {listener.name: listener for listener in config.listeners}
        for name, server in list(self.servers.items()):
            if name not in wanted or name in new_fds:
                server.stop_accepting()  # removed, or moved to a new socket: drain
                del self.servers[name]
        for listener in config.listeners:
            server = self.servers.get(listener.name)
            if server is None:
                await self._start_server(listener, new_fds[listener.name])
                continue
            changed_protocol = server.listener.protocol != listener.protocol
            server.listener = listener
            server.max_connections = _share(listener.max_connections, config.worker_count)
            if changed_protocol:
                # Same socket, new kind of handler; open connections keep the old one.
                server.proxy = self._handler(listener)
                continue
            if listener.protocol == "tcp":
                server.proxy.update(listener, self.clusters[listener.cluster])
            else:
                server.proxy.update(listener, self.clusters)
            if observers_changed:
                server.proxy.observer = self.telemetry.observer(listener.name)

    def stop_accepting(self) -> None:
        for server in self.servers.values():
            server.stop_accepting()

    def open_connections(self) -> int:
        return sum(server.proxy.stats.active for server in self.servers.values())

    def close(self) -> None:
        for cluster in self.clusters.values():
            cluster.close()
        if self.h2_upstreams is not None:
            self.h2_upstreams.close()


async def _reopen_logs(plane: DataPlane, signals: trio.abc.ReceiveChannel) -> None:
    """SIGUSR1 (sent by the supervisor on its own SIGUSR1 or POST /logs/reopen): the access
    log was rotated; write on to a new file at its path."""
    async for _ in signals:
        log.info("reopening the access log")
        plane.telemetry.reopen()


async def _sweep_idle_upstreams(plane: DataPlane) -> None:
    """Close pooled upstream connections that sat idle too long."""
    while True:
        await trio.sleep(POOL_SWEEP_INTERVAL)
        for cluster in plane.clusters.values():
            cluster.close_expired()


class _Control:
    """The worker's side of the control channel, for its whole life: answers snapshot
    requests, applies new config versions, and reports the first reason to drain (a Drain message, SIGTERM, or the
    supervisor gone) through `drain_requested`."""

    def __init__(self, channel: control.ControlChannel, stats: WorkerStats, plane: DataPlane) -> None:
        self.channel = channel
        self.stats = stats
        self.plane = plane
        self.drain_requested = trio.Event()
        self.drain_timeout: float | None = None  # None: the config's drain_timeout

    def _drain(self, timeout: float | None) -> None:
        if not self.drain_requested.is_set():
            self.drain_timeout = timeout
            self.drain_requested.set()

    async def read_messages(self) -> None:
        while True:
            message = await self.channel.receive()
            if message is None:
                log.warning("supervisor is gone: draining")
                self._drain(None)
                return
            if isinstance(message, control.SnapshotRequest):
                await self.channel.send(control.SnapshotReply(message.request, self.stats.snapshot()))
            elif isinstance(message, control.Apply):
                fds = dict(zip(message.new_listeners, self.channel.take_fds(len(message.new_listeners)),
                               strict=True))
                if not self.drain_requested.is_set():
                    await self.plane.apply(message.config, fds)
                    log.info("config version %d applied", message.version)
                else:
                    for fd in fds.values():
                        sockops.close_fd(fd)
                await self.channel.send(control.Applied(message.version))
            elif isinstance(message, control.Identity):
                self._use_identity(message)
            elif isinstance(message, control.Drain):
                self._drain(message.timeout)
            else:
                log.warning("unexpected control message %r", type(message).__name__)

    def _use_identity(self, identity: control.Identity) -> None:
        try:
            contexts = TlsContexts.build(identity.cert_chain_pem, identity.key_pem,
                                         identity.bundle_pem, identity.spiffe_id)
        except (ssl.SSLError, ValueError) as exc:
            log.error("identity %s is not usable (%s): keeping the previous one", identity.spiffe_id, exc)
            return
        self.plane.tls.update(contexts)
        log.debug("identity %s in effect for new connections", identity.spiffe_id)

    async def watch_signals(self, signals: trio.abc.ReceiveChannel) -> None:
        # After the first SIGTERM, more must not cut open connections (the supervisor kills
        # workers itself when it is told to stop at once).
        async for _ in signals:
            if self.drain_requested.is_set():
                log.info("SIGTERM while draining: already draining")
            else:
                log.info("SIGTERM: draining")
                self._drain(None)


async def run_worker(control_fd: int) -> None:
    channel = control.ControlChannel(socket.socket(fileno=control_fd))
    setup = await channel.receive()
    if not isinstance(setup, control.Setup):
        raise SystemExit("worker: expected a Setup message from the supervisor")
    config = setup.config
    engine = RelayEngine()
    stats = WorkerStats(config)
    tls = TlsBridges()
    plane = DataPlane(config, engine, stats, tls)
    ctl = _Control(channel, stats, plane)
    with trio.open_signal_receiver(signal.SIGTERM) as signals, \
            trio.open_signal_receiver(signal.SIGUSR1) as reopen_signals:
        async with trio.open_nursery() as background:
            background.start_soon(run_engine, engine)
            await background.start(tls.run)
            background.start_soon(_sweep_idle_upstreams, plane)
            background.start_soon(ctl.watch_signals, signals)
            background.start_soon(_reopen_logs, plane, reopen_signals)
            with trio.CancelScope() as serving:
                async with trio.open_nursery() as nursery:
                    await plane.start(nursery, background, setup.listener_fds)
                    background.start_soon(ctl.read_messages)
                    await channel.send(control.Ready(setup.worker))
                    log.info("worker %d serving %d listener(s)", setup.worker, len(plane.servers))
                    await ctl.drain_requested.wait()
                    timeout = ctl.drain_timeout if ctl.drain_timeout is not None else plane.config.drain_timeout
                    plane.stop_accepting()
                    log.info("worker %d draining %d connection(s), up to %gs",
                             setup.worker, plane.open_connections(), timeout)
                    serving.deadline = trio.current_time() + timeout
            if serving.cancelled_caught:
                log.warning("worker %d: drain timeout, closed the remaining connections", setup.worker)
            background.cancel_scope.cancel()
    plane.close()


def _raise_fd_limit() -> None:
    """Use the hard fd limit: a proxy needs two fds per proxied connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="meshproxy-worker")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--log-level", choices=LEVELS, default="info")
    args = parser.parse_args(argv)
    setup_logging(args.log_level, f"worker[{args.index}]")
    # Ctrl-C in a terminal signals the whole process group; the supervisor
    # decides how workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _raise_fd_limit()
    trio.run(run_worker, args.control_fd)
    sys.exit(0)


if __name__ == "__main__":
    main()
