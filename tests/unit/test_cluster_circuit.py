"""The circuit breaker: each resource trips at its limit, counts what it refused, and lets
traffic through again as soon as something is released."""

import pytest

from proxy.cluster import CircuitBreaker, Resource
from proxy.cluster.circuit import CONNECTIONS, PENDING, REQUESTS, RETRIES
from proxy.config import CircuitLimits


def test_defaults_are_envoys():
    breaker = CircuitBreaker()
    assert breaker.limits == [1024, 1024, 1024, 3]
    assert [name for name, *_ in breaker.states()] == ["connections", "pending", "requests", "retries"]


def test_trips_at_the_limit_and_recovers_on_release():
    breaker = CircuitBreaker(CircuitLimits(max_requests=2))
    assert breaker.try_acquire(REQUESTS) and breaker.try_acquire(REQUESTS)
    assert breaker.is_open(REQUESTS)
    assert not breaker.try_acquire(REQUESTS)
    assert not breaker.try_acquire(REQUESTS)
    assert breaker.overflows[REQUESTS] == 2
    breaker.release(REQUESTS)
    assert not breaker.is_open(REQUESTS)
    assert breaker.try_acquire(REQUESTS)  # traffic flows again
    assert breaker.in_use[REQUESTS] == 2


@pytest.mark.parametrize("resource", list(Resource))
def test_resources_are_counted_apart(resource):
    limits = CircuitLimits(max_connections=1, max_pending=1, max_requests=1, max_retries=1)
    breaker = CircuitBreaker(limits)
    assert breaker.try_acquire(resource)
    assert not breaker.try_acquire(resource)
    others = [r for r in Resource if r != resource]
    assert all(breaker.try_acquire(other) for other in others)
    assert [row[1:] for row in breaker.states()] == [(1, 1, 1 if r == resource else 0) for r in Resource]


def test_zero_retries_allowed():
    breaker = CircuitBreaker(CircuitLimits(max_retries=0))
    assert breaker.is_open(RETRIES) and not breaker.try_acquire(RETRIES)


def test_reload_changes_limits_and_keeps_what_is_in_use():
    breaker = CircuitBreaker(CircuitLimits(max_connections=3))
    for _ in range(3):
        assert breaker.try_acquire(CONNECTIONS)
    breaker.reconfigure(CircuitLimits(max_connections=2))
    assert breaker.in_use[CONNECTIONS] == 3 and not breaker.try_acquire(CONNECTIONS)
    breaker.release(CONNECTIONS)
    breaker.release(CONNECTIONS)
    assert breaker.try_acquire(CONNECTIONS)
    breaker.reconfigure(None)
    assert breaker.limits[CONNECTIONS] == 1024


def test_release_without_acquire_is_a_bug():
    breaker = CircuitBreaker()
    with pytest.raises(ValueError, match="pending released more often than acquired"):
        breaker.release(PENDING)
