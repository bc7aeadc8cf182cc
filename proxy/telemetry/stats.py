"""What one worker counts, recorded on the request path.

Every object here is plain slots and integers so that recording is attribute arithmetic:
the request path holds the objects it needs (resolved once per config version, never looked
up by a formatted name per request) and bumps them directly or through `record_request`.

    stats = WorkerStats(config)                 # on setup; stats.ensure(new) on each reload
    listener = stats.listeners["http-in"]       # ListenerStats: connections, bytes
    route = listener.routes["api"]              # RouteStats; listener.routes[UNROUTED] for
                                                # requests answered before a route matched
    cluster = stats.clusters["web"]             # ClusterStats: pool, retries, upstream latency
    endpoint = cluster.endpoints["127.0.0.1:9001"]  # EndpointStats, keyed by str(address)

    endpoint.active += 1                        # request sent ... and when it is done:
    endpoint.active -= 1
    record_request(route, cluster, endpoint, 200, None, 0.0021, 0.0017)  # in C: _core/tally.pyx

Status classes are counted in a list indexed by `status // 100`; index 0 is for requests that
got no response at all (pass status 0: the client went away, or the connection was cut).
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

from .snapshot import Snapshot, copied, new_origin

if TYPE_CHECKING:
    from ..config import Config

UNROUTED = ""  # the route name under which an HTTP listener counts requests no route took
STATUS_CLASSES = 6  # none, 1xx .. 5xx


class ListenerStats:
    """One listener's downstream connections. For tcp listeners also how connections ended
    badly: no upstream could be reached, a reset, the idle timeout. With `tls`, the mTLS
    handshakes that succeeded and failed; with a `policy`, its decisions."""

    __slots__ = ("accepted", "active", "authz_allowed", "authz_denied", "bytes_from_clients",
                 "bytes_to_clients", "connect_failures", "h2_connections", "h2_cut_off", "h2_streams",
                 "idle_timeouts", "protocol", "rejected", "resets", "routes", "tls_failures", "tls_handshakes")

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self.accepted = 0
        self.active = 0  # gauge: open connections
        self.rejected = 0  # over max_connections
        self.bytes_from_clients = 0
        self.bytes_to_clients = 0
        self.connect_failures = 0  # tcp: clients closed because no endpoint answered
        self.resets = 0
        self.idle_timeouts = 0
        self.tls_handshakes = 0  # mTLS clients whose SVID was accepted
        self.tls_failures = 0  # handshakes refused: no or bad certificate, not TLS, timeout
        self.authz_allowed = 0  # policy decisions (connections on tcp, requests on http)
        self.authz_denied = 0
        self.h2_connections = 0  # http: connections that spoke HTTP/2
        self.h2_streams = 0  # ... and the streams (requests) they opened
        self.h2_cut_off: dict[str, int] = {}  # HTTP/2 clients cut off, by why (a flood, protocol_error)
        self.routes: dict[str, RouteStats] = {}  # http: route name -> stats, UNROUTED included


class RouteStats:
    """Requests a route took: by status class, by x-meshproxy-error code, and their total
    latency (downstream first byte to last byte out) as HDR buckets."""

    __slots__ = ("errors", "latency", "requests")

    def __init__(self) -> None:
        self.requests = [0] * STATUS_CLASSES
        self.errors: dict[str, int] = {}
        self.latency: dict[int, int] = defaultdict(int)  # hdr.index_of(µs) -> count


class EndpointStats:
    """One endpoint of a cluster. `errors` counts 5xx answers and failed connects."""

    __slots__ = ("active", "ejected", "ejections", "errors", "requests", "unhealthy")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.active = 0  # gauge: requests in flight
        self.ejected = 0  # gauge: 1 while outlier detection keeps it out (per worker)
        self.ejections = 0  # times outlier detection ejected it
        self.unhealthy = 0  # gauge: 1 while health checks fail it, or before the first one


class ClusterStats:
    """Requests sent to a cluster (by the status the client got), its upstream connections
    and their reuse, and upstream latency (request sent to response head) as HDR buckets."""

    __slots__ = ("connect_failures", "connections", "endpoints", "errors", "latency", "pool_hits",
                 "pool_misses", "requests", "retries")

    def __init__(self) -> None:
        self.requests = [0] * STATUS_CLASSES
        self.errors: dict[str, int] = {}
        self.latency: dict[int, int] = defaultdict(int)
        self.connections = 0  # upstream connections opened
        self.pool_hits = 0  # a kept-alive connection reused
        self.pool_misses = 0  # none idle: a new one opened
        self.connect_failures = 0
        self.retries = 0
        self.endpoints: dict[str, EndpointStats] = {}


class WorkerStats:
    """The stats objects of one worker, by name, for the current config version."""

    __slots__ = ("clusters", "listeners", "origin")

    def __init__(self, config: Config | None = None) -> None:
        self.listeners: dict[str, ListenerStats] = {}
        self.clusters: dict[str, ClusterStats] = {}
        self.origin = new_origin()  # tells this process's snapshots from its successor's
        if config is not None:
            self.ensure(config)

    def ensure(self, config: Config) -> None:
        """Objects for exactly the listeners, routes, clusters and endpoints of `config`.

        Names that stay keep their objects, and so their counts and any reference the request
        path holds; removed names are dropped (requests still in flight on the old config
        finish on objects no longer reported); new names start at zero.
        """
        listeners = {}
        for listener in config.listeners:
            stats = self.listeners.get(listener.name)
            if stats is None or stats.protocol != listener.protocol:
                stats = ListenerStats(listener.protocol)
            if listener.protocol == "http":
                names = [UNROUTED, *(route.name for route in listener.routes)]
                stats.routes = {name: stats.routes.get(name) or RouteStats() for name in names}
            listeners[listener.name] = stats
        clusters = {}
        for cluster in config.clusters:
            stats = self.clusters.get(cluster.name) or ClusterStats()
            addresses = [str(endpoint.address) for endpoint in cluster.endpoints]
            stats.endpoints = {a: stats.endpoints.get(a) or EndpointStats() for a in addresses}
            clusters[cluster.name] = stats
        self.listeners = listeners
        self.clusters = clusters

    def snapshot(self) -> Snapshot:
        return Snapshot(copied(self.listeners), copied(self.clusters), self.origin)


def record_connect_failure(cluster: ClusterStats, endpoint: EndpointStats) -> None:
    """A connect to `endpoint` failed (refused, timed out, unreachable); the request may go on
    to another endpoint and is counted by `record_request` when it ends."""
    cluster.connect_failures += 1
    endpoint.errors += 1
