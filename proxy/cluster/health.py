"""Which endpoints may take traffic (pure: no I/O; `now` is an argument).

`HealthState` holds the active health checks' verdicts per endpoint: a run of
`healthy_threshold` passes or `unhealthy_threshold` failures flips an endpoint. As in
Envoy, an endpoint starts "pending" (no traffic) and its first check decides it.

`EndpointAvailability` combines those verdicts with outlier ejections. When fewer than
`panic_threshold` percent of the endpoints are usable, it keeps none out (panic routing):
spreading traffic over every endpoint serves some requests, where none would serve none.

    availability = EndpointAvailability.for_cluster(cluster, now)
    pick = balancer.pick(exclude=availability.excluded(now) | set(tried))
    ...the health checker calls availability.health.record(index, passed)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .outlier import OutlierDetector

if TYPE_CHECKING:
    from ..config import Cluster, HealthCheck

PENDING = "pending"
HEALTHY = "healthy"
UNHEALTHY = "unhealthy"
DEFAULT_PANIC_THRESHOLD = 50.0  # Envoy's healthy_panic_threshold


class HealthState:
    __slots__ = ("_state", "_streak", "healthy_threshold", "unhealthy_threshold", "version")

    def __init__(self, endpoints: int, healthy_threshold: int = 2,
                 unhealthy_threshold: int = 3) -> None:
        if healthy_threshold < 1 or unhealthy_threshold < 1:
            raise ValueError("thresholds must be at least 1")
        self.healthy_threshold = healthy_threshold
        self.unhealthy_threshold = unhealthy_threshold
        self._state = [PENDING] * endpoints
        self._streak = [0] * endpoints  # results in a row that disagree with the state
        self.version = 0  # changes whenever an endpoint changes state

    @classmethod
    def from_config(cls, check: HealthCheck, endpoints: int) -> HealthState:
        return cls(endpoints, check.healthy_threshold, check.unhealthy_threshold)

    def record(self, index: int, passed: bool) -> bool:
        """One check's verdict on endpoint `index`; True when it changed the endpoint's state."""
        state = self._state[index]
        if state == PENDING:
            self._state[index] = HEALTHY if passed else UNHEALTHY
        elif passed == (state == HEALTHY):
            self._streak[index] = 0
            return False
        else:
            self._streak[index] += 1
            needed = self.healthy_threshold if passed else self.unhealthy_threshold
            if self._streak[index] < needed:
                return False
            self._state[index] = HEALTHY if passed else UNHEALTHY
        self._streak[index] = 0
        self.version += 1
        return True

    def healthy(self, index: int) -> bool:
        return self._state[index] == HEALTHY

    def status(self, index: int) -> str:
        """One of "pending", "healthy" or "unhealthy" (for /clusters)."""
        return self._state[index]


class EndpointAvailability:
    __slots__ = ("_excluded", "_seen", "endpoints", "health", "outlier", "panic",
                 "panic_threshold")

    def __init__(self, endpoints: int, health: HealthState | None = None,
                 outlier: OutlierDetector | None = None,
                 panic_threshold: float = DEFAULT_PANIC_THRESHOLD) -> None:
        self.endpoints = endpoints
        self.health = health  # None: no active checks, every endpoint counts as healthy
        self.outlier = outlier  # None: no outlier detection
        self.panic_threshold = panic_threshold  # percent; 0: never panic
        self.panic = False  # as of the last look: too few usable, so none kept out
        self._seen: tuple[int, int] | None = None
        self._excluded: frozenset[int] = frozenset()

    @classmethod
    def for_cluster(cls, cluster: Cluster, now: float) -> EndpointAvailability:
        """Fresh state for `cluster`'s health_check and outlier_detection (either optional)."""
        n = len(cluster.endpoints)
        check = cluster.health_check
        health = HealthState.from_config(check, n) if check is not None else None
        detection = cluster.outlier_detection
        outlier = OutlierDetector(detection, n, now) if detection is not None else None
        panic = check.panic_threshold if check is not None else DEFAULT_PANIC_THRESHOLD
        return cls(n, health, outlier, panic)

    def excluded(self, now: float) -> frozenset[int]:
        """The endpoints to keep traffic from now: unhealthy or ejected ones, or none in
        panic. Recomputed only when a health verdict or an ejection changed."""
        outlier = self.outlier
        if outlier is not None:
            outlier.refresh(now)
        seen = (self.health.version if self.health is not None else -1,
                outlier.version if outlier is not None else -1)
        if seen != self._seen:
            self._seen = seen
            self._excluded = self._compute()
        return self._excluded

    def available(self, now: float) -> list[int]:
        """The endpoints traffic may go to now (all of them in panic)."""
        excluded = self.excluded(now)
        return [i for i in range(self.endpoints) if i not in excluded]

    def usable(self, index: int) -> bool:
        """Healthy (or not checked) and not ejected, whatever the panic rule says."""
        if self.health is not None and not self.health.healthy(index):
            return False
        return self.outlier is None or not self.outlier.ejected(index)

    def _compute(self) -> frozenset[int]:
        out = [i for i in range(self.endpoints) if not self.usable(i)]
        usable = self.endpoints - len(out)
        self.panic = bool(out) and 100 * usable < self.panic_threshold * self.endpoints
        return frozenset() if self.panic else frozenset(out)
