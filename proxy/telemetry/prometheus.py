"""`GET /metrics`: a merged snapshot and the supervisor's own values in Prometheus text format.

    body = render_metrics(totals.total(), SupervisorStats(...))   # served as CONTENT_TYPE

The text is made by prometheus_client from a collector over this one snapshot, on a private
registry (the global one would mix in the client library's own process metrics).

Families, all prefixed `meshproxy_`:
- downstream, per listener: `downstream_connections_total`, `_active`, `_rejected_total`,
  `downstream_bytes_total{direction="in|out"}` (in: from clients), and for tcp listeners
  `downstream_connection_errors_total{reason="connect_failed|reset|idle_timeout"}`;
- requests, per listener and route: `requests_total{code_class}`, `errors_total{code}`
  (x-meshproxy-error codes), `request_duration_seconds` (histogram). `route=""` holds the
  requests answered before any route matched (400s, `no_route`);
- upstream, per cluster: `upstream_requests_total{code_class}`, `upstream_errors_total{code}`,
  `upstream_connections_total`, `upstream_pool_total{result="hit|miss"}`,
  `upstream_connect_failures_total`, `upstream_retries_total`, `upstream_duration_seconds`
  (histogram, request sent to response head), and per endpoint
  `upstream_endpoint_requests_total`, `_errors_total`, `upstream_endpoint_requests_active`;
- HTTP/2, per http listener: `downstream_http2_connections_total`, `downstream_http2_streams_total`,
  `downstream_http2_cut_off_total{reason}` (clients whose connection ended for a flood, by its name,
  or for a protocol error);
- mTLS and authorization, per listener: `downstream_tls_handshakes_total{result="ok|failed"}`,
  `authz_decisions_total{decision="allow|deny"}`;
- identity (with `identity` configured): `identity_cert_expiry_seconds` (unix time),
  `identity_rotations_total`, `identity_failures_total`;
- the supervisor: `info{node,version}`, `config_version`, `config_reloads_total{result}`,
  `worker_restarts_total`, and per process (`process="supervisor|worker-N"`)
  `process_cpu_seconds_total`, `process_resident_memory_bytes`, `process_open_fds`.
  A restarted worker's process series starts again from zero, which Prometheus reads as a
  counter reset.

`code_class` is "1xx".."5xx", or "none" for requests that got no response.

Histogram buckets come from the HDR buckets at render time: the count for bound `le` is the
number of samples whose HDR bucket starts at or below it, HdrHistogram's own "count up to a
value"; a sample at most 0.1% above a bound (one HDR bucket width) may count under it. The
`_sum` takes each sample at its HDR bucket's middle (HdrHistogram's mean times the count),
so it is within 0.05% of the true sum.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from .._version import __version__
from .hdr import Counts, index_of, sum_us
from .process import ProcessUsage
from .snapshot import Snapshot

# The classic text format, which every Prometheus reads. (prometheus_client's
# CONTENT_TYPE_LATEST announces 1.0.0; the text is the same for our plain metric names.)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_BUCKET_INDEX = [index_of(round(bound * 1e6)) for bound in BUCKETS]  # ascending
_BUCKET_LABELS = [floatToGoString(bound) for bound in BUCKETS]
_CLASS_LABELS = ["none", "1xx", "2xx", "3xx", "4xx", "5xx"]  # by status // 100


@dataclass(frozen=True)
class IdentityStats:
    """The sidecar's SVID: when it expires, how often it was renewed and how often that failed."""

    expiry: float | None  # unix time; None until the first SVID
    rotations: int
    failures: int


@dataclass(frozen=True)
class SupervisorStats:
    """What only the supervisor knows, for one scrape."""

    node: str  # config `node.id`
    config_version: int
    reloads_ok: int
    reloads_failed: int
    worker_restarts: int
    processes: Sequence[ProcessUsage] = ()
    identity: IdentityStats | None = None  # with `identity` configured


def render_metrics(snapshot: Snapshot, supervisor: SupervisorStats) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot, supervisor))
    return generate_latest(registry)


def buckets(counts: Counts) -> list[tuple[str, int]]:
    """Cumulative Prometheus buckets, `(le, count)` pairs ending with "+Inf", from HDR buckets."""
    indices = sorted(counts)
    up_to = [0, *accumulate(map(counts.__getitem__, indices))]  # up_to[k]: the first k buckets
    return [(label, up_to[bisect_right(indices, bound)])
            for label, bound in zip(_BUCKET_LABELS, _BUCKET_INDEX, strict=True)] + [("+Inf", up_to[-1])]


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Snapshot, supervisor: SupervisorStats) -> None:
        self.snapshot = snapshot
        self.supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        yield from self._supervisor()
        yield from self._downstream()
        yield from self._requests()
        yield from self._upstream()

    def _supervisor(self) -> Iterator[Metric]:
        sup = self.supervisor
        info = GaugeMetricFamily("meshproxy_info", "This proxy: node id and version.",
                                 labels=["node", "version"])
        info.add_metric([sup.node, __version__], 1)
        yield info
        yield GaugeMetricFamily("meshproxy_config_version", "Version of the active config.",
                                value=sup.config_version)
        reloads = CounterMetricFamily("meshproxy_config_reloads", "Config changes applied or refused.",
                                      labels=["result"])
        reloads.add_metric(["ok"], sup.reloads_ok)
        reloads.add_metric(["failed"], sup.reloads_failed)
        yield reloads
        yield CounterMetricFamily("meshproxy_worker_restarts", "Workers restarted after they died.",
                                  value=sup.worker_restarts)
        cpu = CounterMetricFamily("meshproxy_process_cpu_seconds", "User and system CPU time.",
                                  labels=["process"])
        rss = GaugeMetricFamily("meshproxy_process_resident_memory_bytes", "Resident memory.",
                                labels=["process"])
        fds = GaugeMetricFamily("meshproxy_process_open_fds", "Open file descriptors.",
                                labels=["process"])
        for process in sup.processes:
            cpu.add_metric([process.name], process.cpu_seconds)
            rss.add_metric([process.name], process.resident_bytes)
            fds.add_metric([process.name], process.open_fds)
        yield from (cpu, rss, fds)
        if sup.identity is not None:
            yield from _identity(sup.identity)

    def _downstream(self) -> Iterator[Metric]:
        labels = ["listener"]
        accepted = CounterMetricFamily("meshproxy_downstream_connections", "Connections accepted.",
                                       labels=labels)
        active = GaugeMetricFamily("meshproxy_downstream_connections_active", "Connections open.",
                                   labels=labels)
        rejected = CounterMetricFamily("meshproxy_downstream_connections_rejected",
                                       "Connections closed at once: the listener's max_connections "
                                       "were open.", labels=labels)
        transferred = CounterMetricFamily("meshproxy_downstream_bytes",
                                          "Bytes from clients (in) and to clients (out).",
                                          labels=["listener", "direction"])
        failed = CounterMetricFamily("meshproxy_downstream_connection_errors",
                                     "TCP listener connections that ended badly, by reason.",
                                     labels=["listener", "reason"])
        handshakes = CounterMetricFamily("meshproxy_downstream_tls_handshakes", "mTLS handshakes "
                                         "of clients: peer SVID accepted (ok) or refused (failed).",
                                         labels=["listener", "result"])
        decisions = CounterMetricFamily("meshproxy_authz_decisions", "Policy decisions: tcp "
                                        "connections or http requests allowed or denied.",
                                        labels=["listener", "decision"])
        h2_connections = CounterMetricFamily("meshproxy_downstream_http2_connections", "Connections that "
                                             "spoke HTTP/2.", labels=labels)
        h2_streams = CounterMetricFamily("meshproxy_downstream_http2_streams", "HTTP/2 streams (requests) "
                                         "clients opened.", labels=labels)
        h2_cut_off = CounterMetricFamily("meshproxy_downstream_http2_cut_off", "HTTP/2 clients whose "
                                         "connection was ended: a flood (by its name) or a protocol error.",
                                         labels=["listener", "reason"])
        for name, listener in self.snapshot.listeners.items():
            if listener.protocol == "http":
                h2_connections.add_metric([name], listener.h2_connections)
                h2_streams.add_metric([name], listener.h2_streams)
                for reason, n in sorted(listener.h2_cut_off.items()):
                    h2_cut_off.add_metric([name, reason], n)
            accepted.add_metric([name], listener.accepted)
            active.add_metric([name], listener.active)
            rejected.add_metric([name], listener.rejected)
            transferred.add_metric([name, "in"], listener.bytes_from_clients)
            transferred.add_metric([name, "out"], listener.bytes_to_clients)
            if listener.protocol == "tcp":
                failed.add_metric([name, "connect_failed"], listener.connect_failures)
                failed.add_metric([name, "reset"], listener.resets)
                failed.add_metric([name, "idle_timeout"], listener.idle_timeouts)
            handshakes.add_metric([name, "ok"], listener.tls_handshakes)
            handshakes.add_metric([name, "failed"], listener.tls_failures)
            decisions.add_metric([name, "allow"], listener.authz_allowed)
            decisions.add_metric([name, "deny"], listener.authz_denied)
        yield from (accepted, active, rejected, transferred, failed, handshakes, decisions, h2_connections,
                    h2_streams, h2_cut_off)

    def _requests(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("meshproxy_requests", "Requests by listener, route and the "
                                       "status class the client got.",
                                       labels=["listener", "route", "code_class"])
        errors = CounterMetricFamily("meshproxy_errors", "Requests answered with an "
                                     "x-meshproxy-error code.", labels=["listener", "route", "code"])
        duration = HistogramMetricFamily("meshproxy_request_duration_seconds", "Request latency: "
                                         "first byte in to last byte out.", labels=["listener", "route"])
        for listener_name, listener in self.snapshot.listeners.items():
            for route_name, route in listener.routes.items():
                key = [listener_name, route_name]
                _by_class(requests, key, route.requests)
                for code, n in sorted(route.errors.items()):
                    errors.add_metric([*key, code], n)
                duration.add_metric(key, buckets(route.latency), sum_us(route.latency) / 1e6)
        yield from (requests, errors, duration)

    def _upstream(self) -> Iterator[Metric]:
        cluster_label = ["cluster"]
        requests = CounterMetricFamily("meshproxy_upstream_requests", "Requests sent to a cluster, "
                                       "by the status class the client got.",
                                       labels=["cluster", "code_class"])
        errors = CounterMetricFamily("meshproxy_upstream_errors", "Requests for a cluster answered "
                                     "with an x-meshproxy-error code.", labels=["cluster", "code"])
        opened = CounterMetricFamily("meshproxy_upstream_connections", "Upstream connections opened.",
                                     labels=cluster_label)
        pool = CounterMetricFamily("meshproxy_upstream_pool", "Upstream connection wanted: a kept-alive "
                                   "one reused (hit) or none idle (miss).", labels=["cluster", "result"])
        connect_failures = CounterMetricFamily("meshproxy_upstream_connect_failures",
                                               "Connects to an endpoint that failed.", labels=cluster_label)
        retries = CounterMetricFamily("meshproxy_upstream_retries", "Requests sent again.",
                                      labels=cluster_label)
        duration = HistogramMetricFamily("meshproxy_upstream_duration_seconds", "Upstream latency: "
                                         "request sent to response head.", labels=cluster_label)
        endpoint_labels = ["cluster", "endpoint"]
        endpoint_requests = CounterMetricFamily("meshproxy_upstream_endpoint_requests",
                                                "Requests sent to an endpoint.", labels=endpoint_labels)
        endpoint_errors = CounterMetricFamily("meshproxy_upstream_endpoint_errors", "5xx answers and "
                                              "failed connects of an endpoint.", labels=endpoint_labels)
        endpoint_active = GaugeMetricFamily("meshproxy_upstream_endpoint_requests_active",
                                            "Requests in flight to an endpoint.", labels=endpoint_labels)
        endpoint_healthy = GaugeMetricFamily("meshproxy_upstream_endpoint_healthy", "1 while an endpoint "
                                             "passes its health checks (or has none) and is not ejected, "
                                             "in every worker.", labels=endpoint_labels)
        endpoint_ejections = CounterMetricFamily("meshproxy_upstream_endpoint_ejections", "Times outlier "
                                                 "detection ejected an endpoint.", labels=endpoint_labels)
        for name, cluster in self.snapshot.clusters.items():
            _by_class(requests, [name], cluster.requests)
            for code, n in sorted(cluster.errors.items()):
                errors.add_metric([name, code], n)
            opened.add_metric([name], cluster.connections)
            pool.add_metric([name, "hit"], cluster.pool_hits)
            pool.add_metric([name, "miss"], cluster.pool_misses)
            connect_failures.add_metric([name], cluster.connect_failures)
            retries.add_metric([name], cluster.retries)
            duration.add_metric([name], buckets(cluster.latency), sum_us(cluster.latency) / 1e6)
            for address, endpoint in cluster.endpoints.items():
                endpoint_requests.add_metric([name, address], endpoint.requests)
                endpoint_errors.add_metric([name, address], endpoint.errors)
                endpoint_active.add_metric([name, address], endpoint.active)
                endpoint_healthy.add_metric([name, address],
                                            0 if endpoint.unhealthy or endpoint.ejected else 1)
                endpoint_ejections.add_metric([name, address], endpoint.ejections)
        yield from (requests, errors, opened, pool, connect_failures, retries, duration,
                    endpoint_requests, endpoint_errors, endpoint_active, endpoint_healthy,
                    endpoint_ejections)


def _identity(identity: IdentityStats) -> Iterator[Metric]:
    if identity.expiry is not None:
        yield GaugeMetricFamily("meshproxy_identity_cert_expiry_seconds", "When this sidecar's "
                                "certificate expires (unix time).", value=identity.expiry)
    yield CounterMetricFamily("meshproxy_identity_rotations", "Certificates that replaced an "
                              "earlier one.", value=identity.rotations)
    yield CounterMetricFamily("meshproxy_identity_failures", "Requests to the CA that got no "
                              "certificate.", value=identity.failures)


def _by_class(family: CounterMetricFamily, key: list[str], by_class: list[int]) -> None:
    # Every class, zeros included: a series that appears at 1 hides its first increase.
    for label, n in zip(_CLASS_LABELS, by_class, strict=True):
        family.add_metric([*key, label], n)
