"""What the demo's load generator saw, counted (pure: no I/O, time is an argument).

    tally = Tally()
    tally.record(status=200, latency_us=1800, version="v1")
    tally.success_rate, tally.split(), tally.percentiles_ms([50, 99])

    timeline = Timeline(start=now)            # per-second tallies, phases, the whole run
    timeline.record(now, 200, 1800, "v1")
    timeline.begin_phase(now, "v2 broken")
    timeline.window(now, seconds=10)          # a Tally of the last 10 s

Latencies go into sparse HDR counts (`proxy.telemetry.hdr`: 1 µs to 60 s, 3 significant
digits), the layout the sidecars use, so their `.hgrm` text and percentiles are comparable.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..telemetry.hdr import index_of, max_us, percentiles_us

VERSIONS = ("v1", "v2")


def is_success(status: int) -> bool:
    """A request counts as served when it got a 2xx or 3xx."""
    return 200 <= status < 400


@dataclass
class Tally:
    requests: int = 0
    ok: int = 0
    failures: Counter[str] = field(default_factory=Counter)  # "503", "timeout", "refused", ...
    versions: Counter[str] = field(default_factory=Counter)  # which backend answered, if one did
    callers: Counter[str] = field(default_factory=Counter)  # identity the backend saw the caller as
    latency: dict[int, int] = field(default_factory=dict)  # HDR index -> count, all requests
    by_version: dict[str, dict[int, int]] = field(default_factory=dict)  # the same per version

    def record(self, status: int, latency_us: int, version: str = "", caller: str = "",
               error: str = "") -> None:
        """One request: its status (0 when there was none, with `error` saying why)."""
        self.requests += 1
        index = index_of(max(1, latency_us))
        self.latency[index] = self.latency.get(index, 0) + 1
        if is_success(status):
            self.ok += 1
        else:
            self.failures[error or str(status)] += 1
        if version:
            self.versions[version] += 1
            per = self.by_version.setdefault(version, {})
            per[index] = per.get(index, 0) + 1
            self.callers[caller] += 1

    def merge(self, other: Tally) -> None:
        self.requests += other.requests
        self.ok += other.ok
        self.failures.update(other.failures)
        self.versions.update(other.versions)
        self.callers.update(other.callers)
        _add(self.latency, other.latency)
        for version, counts in other.by_version.items():
            _add(self.by_version.setdefault(version, {}), counts)

    @property
    def success_rate(self) -> float | None:
        return self.ok / self.requests if self.requests else None

    def split(self, versions: Iterable[str] = VERSIONS) -> dict[str, float] | None:
        """Each version's share of the requests a backend answered (None before any)."""
        return split_of(self.versions, versions)

    def percentiles_ms(self, percentiles: list[float]) -> list[float] | None:
        if not self.requests:
            return None
        return [us / 1000 for us in percentiles_us(self.latency, sorted(percentiles))]

    @property
    def max_ms(self) -> float:
        return max_us(self.latency) / 1000


def split_of(counts: Mapping[str, int], versions: Iterable[str] = VERSIONS) -> dict[str, float] | None:
    """Shares of `counts` over `versions` (summing to 1), None when nothing was counted."""
    names = list(versions)
    total = sum(counts.get(name, 0) for name in names)
    if not total:
        return None
    return {name: counts.get(name, 0) / total for name in names}


def split_error(observed: Mapping[str, float] | None, weights: Mapping[str, int]) -> float:
    """The largest gap, in percentage points, between an observed split and the one the
    weights ask for (inf when nothing was observed)."""
    if observed is None:
        return math.inf
    total = sum(weights.values())
    return max(abs(observed.get(name, 0.0) - weight / total) * 100 for name, weight in weights.items())


def format_split(observed: Mapping[str, float] | None) -> str:
    """{'v1': 0.903, 'v2': 0.097} -> '90.3/9.7'; '-' before any answer."""
    if observed is None:
        return "-"
    return "/".join(f"{share * 100:.1f}" for share in observed.values())


def _add(into: dict[int, int], counts: Mapping[int, int]) -> None:
    for index, n in counts.items():
        into[index] = into.get(index, 0) + n


@dataclass
class Phase:
    """A stretch of the run with one setting: "90/10", "50/50", "v2 broken", ..."""

    name: str
    start: float  # seconds since the run began
    weights: dict[str, int]  # the split configured during it
    end: float | None = None
    tally: Tally = field(default_factory=Tally)


class Timeline:
    """Per-second tallies (the live table's windows), the phases and the whole run."""

    def __init__(self, start: float, weights: Mapping[str, int], keep_seconds: int = 120,
                 phase: str = "steady") -> None:
        self.start = start
        self.total = Tally()
        self.phases = [Phase(phase, 0.0, dict(weights))]
        self._seconds: dict[int, Tally] = {}
        self._keep = keep_seconds

    @property
    def phase(self) -> Phase:
        return self.phases[-1]

    def record(self, now: float, status: int, latency_us: int, version: str = "", caller: str = "",
               error: str = "") -> None:
        second = int(now - self.start)
        tally = self._seconds.get(second)
        if tally is None:
            tally = self._seconds[second] = Tally()
            for old in [s for s in self._seconds if s <= second - self._keep]:
                del self._seconds[old]
        for target in (tally, self.total, self.phase.tally):
            target.record(status, latency_us, version, caller, error)

    def begin_phase(self, now: float, name: str, weights: Mapping[str, int] | None = None) -> Phase:
        elapsed = now - self.start
        self.phase.end = elapsed
        phase = Phase(name, elapsed, dict(self.phase.weights if weights is None else weights))
        self.phases.append(phase)
        return phase

    def finish(self, now: float) -> None:
        self.phase.end = now - self.start

    def window(self, now: float, seconds: int) -> Tally:
        """The requests completed in the last `seconds` whole seconds before `now`'s second."""
        current = int(now - self.start)
        merged = Tally()
        for second in range(current - seconds, current):
            tally = self._seconds.get(second)
            if tally is not None:
                merged.merge(tally)
        return merged
