"""Snapshots of the counters, their sum over workers, and totals that survive a worker's death.

A snapshot holds copies of the very objects the workers record into (`stats.ListenerStats`
and friends), so a counter is named once, where it is counted, and every renderer reads it
by the same attribute. Adding two snapshots is generic: integers add, lists add element by
element (status classes), dicts add key by key (names, error codes, histogram buckets),
strings are kept, and stats objects add slot by slot. A counter added to a stats class is
therefore snapshotted, merged and retired without a line changed here.

Gauges (`active`: open connections, requests in flight; `ejected`, `unhealthy`: endpoint
state) are the exception: they describe live processes, so a dead worker's last values are
not carried into the retired totals.

Why sparse histogram buckets rather than `HdrHistogram.encode()` blobs: a snapshot is
taken on the worker's event loop, and encoding means building a dense 17,408-counter
histogram and compressing it, 1-2 ms per histogram; copying the sparse dict is a tenth of
that. The supervisor needs the buckets one by one anyway (Prometheus buckets). A bucket
pickles into about 5 bytes; a route with a few thousand distinct latencies costs ~15 kB.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .stats import ClusterStats, ListenerStats

GAUGES = frozenset({"active", "ejected", "unhealthy"})


@dataclass(slots=True)
class Snapshot:
    """Counters of one worker, or the sum over several. Picklable; never mutated once made."""

    listeners: dict[str, ListenerStats] = field(default_factory=dict)
    clusters: dict[str, ClusterStats] = field(default_factory=dict)
    # The WorkerStats it was taken from (random, per process); None for a merged snapshot.
    origin: bytes | None = None


def new_origin() -> bytes:
    return os.urandom(8)


def copied(value: Any) -> Any:
    """A deep copy of live counters (dicts, lists, stats objects) that recording cannot touch."""
    return _plus(None, value, gauges=True)


def merge(snapshots: Iterable[Snapshot]) -> Snapshot:
    """The sum of several snapshots: what all the workers together counted."""
    return _sum(snapshots, gauges=True)


class Totals:
    """The supervisor's view of all workers, past and present, for /metrics and /stats/latency.

    Feed it each worker's latest snapshot with `update`; `total()` is the sum of the latest
    snapshot of every worker plus everything counted by workers that are gone. A worker that
    dies takes with it only what it counted after its last snapshot, and counters never go
    backwards. A worker that misses one scrape is still counted, by its previous snapshot.

    Names the workers no longer have (a listener, route, cluster or endpoint removed by a
    reload) are left out of the total, though their retired counts are kept: if the name
    comes back, its counters go on from where they were.
    """

    def __init__(self) -> None:
        self._latest: dict[int, Snapshot] = {}
        self._retired = Snapshot()  # counters of workers gone, their gauges left out

    def update(self, worker: int, snapshot: Snapshot) -> None:
        """`snapshot` is the latest from the worker in slot `worker`.

        A snapshot from a new process in the slot (the worker was restarted) retires the
        previous one's counts first, even if `exited` was not called.
        """
        previous = self._latest.get(worker)
        if previous is not None and previous.origin != snapshot.origin:
            self._retire(previous)
        self._latest[worker] = snapshot

    def exited(self, worker: int) -> None:
        """The worker in slot `worker` is gone: keep its counters, drop its gauges."""
        previous = self._latest.pop(worker, None)
        if previous is not None:
            self._retire(previous)

    def total(self) -> Snapshot:
        if not self._latest:
            return merge([self._retired])
        live = merge(self._latest.values())
        return merge([live, Snapshot(_within(self._retired.listeners, live.listeners),
                                     _within(self._retired.clusters, live.clusters))])

    def _retire(self, snapshot: Snapshot) -> None:
        self._retired = _sum([self._retired, snapshot], gauges=False)


def _sum(snapshots: Iterable[Snapshot], gauges: bool) -> Snapshot:
    listeners: dict | None = None
    clusters: dict | None = None
    for snapshot in snapshots:
        listeners = _plus(listeners, snapshot.listeners, gauges)
        clusters = _plus(clusters, snapshot.clusters, gauges)
    return Snapshot(listeners or {}, clusters or {})


def _within(a: Any, shape: Any) -> Any:
    """`a` without the named stats objects (listeners, routes, clusters, endpoints), at any
    depth, that `shape` does not have. Counts by error code or HDR bucket are all kept."""
    if isinstance(a, dict):
        if type(next(iter(a.values()), 0)) is int:
            return a
        return {key: _within(value, shape[key]) for key, value in a.items() if key in shape}
    if hasattr(type(a), "__slots__"):
        out = copy.copy(a)
        for name in type(a).__slots__:
            setattr(out, name, _within(getattr(a, name), getattr(shape, name)))
        return out
    return a


def _plus(a: Any, b: Any, gauges: bool) -> Any:
    """A new value equal to a + b, for two values of the same shape; a is None when only b
    has the entry. Neither is modified. With gauges=False, b's gauges are not added."""
    if isinstance(b, int):
        return b if a is None else a + b
    if isinstance(b, str):
        return b
    if isinstance(b, list):
        return list(b) if a is None else [x + y for x, y in zip(a, b, strict=True)]
    if isinstance(b, dict):
        if type(next(iter(b.values()), 0)) is int:
            # Counts by HDR bucket or error code: the bulk of the work, kept tight.
            if a is None:
                return dict(b)
            out = dict(a)
            get = out.get
            for key, n in b.items():
                out[key] = get(key, 0) + n
            return out
        out = {} if a is None else dict(a)
        for key, value in b.items():
            out[key] = _plus(out.get(key), value, gauges)
        return out
    cls = type(b)
    out = cls.__new__(cls)
    for name in cls.__slots__:
        if name in GAUGES and not gauges:
            setattr(out, name, 0 if a is None else getattr(a, name))
        else:
            setattr(out, name, _plus(None if a is None else getattr(a, name), getattr(b, name), gauges))
    return out
