"""Telemetry: what workers count, how the supervisor sums it, and how it is shown.

Pure: no trio, no sockets. Workers record into `WorkerStats` and answer snapshots; the
supervisor keeps `Totals` over worker restarts and renders /metrics and /stats/latency.
"""

from .latency import Histograms, LatencyWindow, hgrm, latency_json, select
from .process import ProcessUsage, read_process_usage
from .prometheus import CONTENT_TYPE, IdentityStats, SupervisorStats, render_metrics
from .snapshot import Snapshot, Totals, merge
from .stats import (
    UNROUTED,
    ClusterStats,
    EndpointStats,
    ListenerStats,
    RouteStats,
    WorkerStats,
    record_connect_failure,
)

__all__ = [
    "CONTENT_TYPE",
    "UNROUTED",
    "ClusterStats",
    "EndpointStats",
    "Histograms",
    "IdentityStats",
    "LatencyWindow",
    "ListenerStats",
    "ProcessUsage",
    "RouteStats",
    "Snapshot",
    "SupervisorStats",
    "Totals",
    "WorkerStats",
    "hgrm",
    "latency_json",
    "merge",
    "read_process_usage",
    "record_connect_failure",
    "record_request",
    "render_metrics",
    "select",
]


def __getattr__(name: str) -> object:
    # `record_request` is compiled (_core/tally.pyx): loaded on first use, so that what
    # needs only the pure parts (`meshproxy check` validating an access log format) works
    # before the extensions are built.
    if name == "record_request":
        from .._core.tally import record_request

        return record_request
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
