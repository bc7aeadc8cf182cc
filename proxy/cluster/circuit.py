"""A cluster's circuit breaker: counts of what is in use against `circuit_breaker` limits
(pure: plain counters). Past a limit the request is answered 503 `circuit_open` at once
rather than queued.

    breaker = CircuitBreaker(cluster.circuit_breaker)     # one per cluster, per worker
    if not breaker.try_acquire(REQUESTS):
        ...answer 503 circuit_open
    try:
        ...
    finally:
        breaker.release(REQUESTS)

`CONNECTIONS` is held while an upstream connection is open, `PENDING` while a request waits
for one, `REQUESTS` while a request is in flight, `RETRIES` while a retry is in flight.
"""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING

from ..config import CircuitLimits

if TYPE_CHECKING:
    from collections.abc import Iterator


class Resource(IntEnum):
    CONNECTIONS = 0
    PENDING = 1
    REQUESTS = 2
    RETRIES = 3


CONNECTIONS, PENDING, REQUESTS, RETRIES = Resource


class CircuitBreaker:
    __slots__ = ("in_use", "limits", "overflows")

    def __init__(self, limits: CircuitLimits | None = None) -> None:
        self.limits = [0] * len(Resource)
        self.in_use = [0] * len(Resource)  # gauges
        self.overflows = [0] * len(Resource)  # requests refused at each limit, ever
        self.reconfigure(limits)

    def reconfigure(self, limits: CircuitLimits | None) -> None:
        """New limits (a reload); what is in use stays counted. None: Envoy's defaults."""
        limits = limits or CircuitLimits()
        self.limits[:] = [limits.max_connections, limits.max_pending, limits.max_requests,
                          limits.max_retries]

    def try_acquire(self, resource: Resource) -> bool:
        """Take one of `resource` if under its limit; False (and counted) when it is open."""
        if self.in_use[resource] < self.limits[resource]:
            self.in_use[resource] += 1
            return True
        self.overflows[resource] += 1
        return False

    def release(self, resource: Resource) -> None:
        if self.in_use[resource] <= 0:
            raise ValueError(f"{resource.name.lower()} released more often than acquired")
        self.in_use[resource] -= 1

    def is_open(self, resource: Resource) -> bool:
        """True while `resource` is at its limit: the next try_acquire would fail."""
        return self.in_use[resource] >= self.limits[resource]

    def states(self) -> Iterator[tuple[str, int, int, int]]:
        """(name, in use, limit, overflows) per resource, for /clusters and metrics."""
        for resource in Resource:
            yield (resource.name.lower(), self.in_use[resource], self.limits[resource],
                   self.overflows[resource])
