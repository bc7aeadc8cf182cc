"""`GET /stats/latency` bodies: HDR latency per listener, route and cluster, in milliseconds.

    window = LatencyWindow()                                 # one per supervisor
    hists = window.interval(totals.total(), reset=query has reset=1)
    latency_json(hists)                                      # ?format=json
    hgrm(select(hists, "route", "http-in/api"))              # ?format=hgrm&route=http-in/api

Routes are named `listener/route`; a listener's histogram is the sum of its routes', so it
also holds the requests answered before any route matched. Clusters hold upstream latency.

Units: workers record µs; both formats report ms. For `.hgrm` that is what HdrHistogram's
plotters label their axis with, and what wrk2 prints (values recorded in µs, output value
unit scaling ratio 1000).

`?reset=1` starts a new interval. The worker histograms also feed the Prometheus
histograms of /metrics, which must never go down, so workers never reset: the supervisor
remembers the merged histograms at the last reset and reports the difference. That needs
nothing from the workers and cannot lose a sample in flight between them.
"""

from __future__ import annotations

from typing import Any

from .hdr import (
    BUCKET_COUNT,
    SUB_BUCKET_COUNT,
    Counts,
    max_us,
    mean_us,
    percentile_steps,
    percentiles_us,
    stddev_us,
    total,
)
from .snapshot import Snapshot
from .stats import UNROUTED

Histograms = dict[str, dict[str, Counts]]  # "listeners" | "routes" | "clusters" -> name -> counts
KINDS = {"listener": "listeners", "route": "routes", "cluster": "clusters"}  # selector -> section

MS = 1000  # µs per reported unit
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p999": 99.9, "p9999": 99.99}


def histograms(snapshot: Snapshot) -> Histograms:
    listeners: dict[str, Counts] = {}
    routes: dict[str, Counts] = {}
    for listener_name, listener in snapshot.listeners.items():
        summed: dict[int, int] = {}
        for route_name, route in listener.routes.items():
            for index, n in route.latency.items():
                summed[index] = summed.get(index, 0) + n
            if route_name != UNROUTED:
                routes[f"{listener_name}/{route_name}"] = route.latency
        if listener.routes:  # tcp listeners have no requests to time
            listeners[listener_name] = summed
    clusters = {name: cluster.latency for name, cluster in snapshot.clusters.items()}
    return {"listeners": listeners, "routes": routes, "clusters": clusters}


class LatencyWindow:
    """The interval `/stats/latency` reports: everything since the last `?reset=1`."""

    def __init__(self) -> None:
        self._start: Histograms = {}  # the merged histograms at the last reset

    def interval(self, snapshot: Snapshot, reset: bool = False) -> Histograms:
        """The histograms since the last reset; with `reset`, a new interval starts after them."""
        now = histograms(snapshot)
        since = {
            section: {name: _since(counts, self._start.get(section, {}).get(name))
                      for name, counts in by_name.items()}
            for section, by_name in now.items()
        }
        if reset:
            self._start = now
        return since


def _since(counts: Counts, start: Counts | None) -> Counts:
    # Merged buckets only grow; one that shrank means the route or cluster was removed and
    # added again since the reset, so all it holds is new.
    if start is None or any(counts.get(index, 0) < n for index, n in start.items()):
        return counts
    return {index: n - start.get(index, 0) for index, n in counts.items() if n > start.get(index, 0)}


def latency_json(hists: Histograms) -> dict[str, Any]:
    """`{routes: {name: {count, p50, p90, p99, p999, p9999, max, mean}}, clusters: ..., listeners: ...}`
    in ms; with no samples only `count` is set (0) and the rest are null."""
    return {section: {name: _summary(counts) for name, counts in by_name.items()}
            for section, by_name in hists.items()}


def _summary(counts: Counts) -> dict[str, Any]:
    n = total(counts)
    if not n:
        return {"count": 0, **dict.fromkeys(PERCENTILES), "max": None, "mean": None}
    # The value at the 100th percentile is the maximum, as HdrHistogram reports it.
    *values, maximum = percentiles_us(counts, [*PERCENTILES.values(), 100.0])
    return {
        "count": n,
        **{name: value / MS for name, value in zip(PERCENTILES, values, strict=True)},
        "max": maximum / MS,
        "mean": round(mean_us(counts) / MS, 3),
    }


def select(hists: Histograms, kind: str, name: str) -> Counts:
    """The histogram a `?listener=`, `?route=` or `?cluster=` selector names (`kind` is the
    parameter's name). A route is `listener/route`, or just `route` when only one listener
    has a route by that name. Raises LookupError, saying what exists, when nothing matches."""
    by_name = hists[KINDS[kind]]
    if name in by_name:
        return by_name[name]
    if kind == "route":
        found = [key for key in by_name if key.split("/", 1)[1] == name]
        if len(found) == 1:
            return by_name[found[0]]
    raise LookupError(f"no {kind} {name!r}; {KINDS[kind]}: {', '.join(sorted(by_name)) or 'none'}")


def hgrm(counts: Counts) -> str:
    """HdrHistogram's percentile distribution text for one histogram, values in ms, in the
    Java HdrHistogram's format (`outputPercentileDistribution` with 5 ticks per half distance)."""
    lines = [f"{'Value':>12} {'Percentile':>14} {'TotalCount':>10} {'1/(1-Percentile)':>14}\n\n"]
    for value, percentile, seen in percentile_steps(counts):
        fraction = percentile / 100
        if fraction < 1:
            lines.append(f"{value / MS:12.3f} {fraction:2.12f} {seen:10d} {1 / (1 - fraction):14.2f}\n")
        else:
            lines.append(f"{value / MS:12.3f} {fraction:2.12f} {seen:10d}\n")
    lines.append(f"#[Mean    = {mean_us(counts) / MS:12.3f}, StdDeviation   = {stddev_us(counts) / MS:12.3f}]\n"
                 f"#[Max     = {max_us(counts) / MS:12.3f}, Total count    = {total(counts):12d}]\n"
                 f"#[Buckets = {BUCKET_COUNT:12d}, SubBuckets     = {SUB_BUCKET_COUNT:12d}]\n")
    return "".join(lines)
