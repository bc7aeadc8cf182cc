"""Active health checks against real servers on 127.0.0.1: an HTTP check passes only on a
2xx in time, a TCP check on a connect; the checker flips endpoints both ways as their
servers fail and recover, and stops when cancelled."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
import trio

from proxy.cluster import EndpointAvailability
from proxy.cluster.health import HEALTHY, UNHEALTHY, HealthState
from proxy.config import Address, Cluster, Endpoint, HealthCheck
from proxy.upstream.health_check import (
    JITTER,
    check_endpoint,
    jittered,
    run_health_checks,
)

from .faulty_origin import Fault, FaultyOrigin

HTTP = HealthCheck(path="/healthz", interval=0.5, timeout=0.3)
TCP = HealthCheck(tcp=True, interval=0.5, timeout=0.3)


@pytest.fixture
def origins() -> Iterator[list[FaultyOrigin]]:
    """Three servers: healthy, answering 503, refusing connections."""
    servers = [FaultyOrigin("healthy"), FaultyOrigin("503").set_mode(Fault.ANSWER_503),
               FaultyOrigin("down").set_mode(Fault.REFUSE)]
    yield servers
    for server in servers:
        server.close()


def address(origin: FaultyOrigin) -> Address:
    return Address(*origin.address)


async def test_http_check_passes_only_on_2xx(origins):
    healthy, unavailable, down = origins
    with trio.fail_after(5):
        assert await check_endpoint(address(healthy), HTTP)
        assert not await check_endpoint(address(unavailable), HTTP)
        assert not await check_endpoint(address(down), HTTP)
    assert healthy.count("GET", "/healthz") == 1 and unavailable.count("GET", "/healthz") == 1


@pytest.mark.parametrize(
    ("fault", "passes"),
    [
        (Fault.GARBAGE, False),
        (Fault.RESET_BEFORE_HEADERS, False),
        (Fault.RESET_AFTER_HEADERS, True),  # a 200 head arrived; only the body was cut
    ],
)
async def test_http_check_on_a_broken_answer(origins, fault, passes):
    healthy = origins[0]
    healthy.set_mode(fault)
    with trio.fail_after(5):
        assert await check_endpoint(address(healthy), HTTP) is passes


async def test_http_check_fails_at_its_timeout_when_the_server_hangs(origins):
    healthy = origins[0]
    healthy.set_mode(Fault.HANG)
    started = trio.current_time()
    with trio.fail_after(5):
        assert not await check_endpoint(address(healthy), HTTP)
    assert 0.3 <= trio.current_time() - started < 1.0
    healthy.set_mode(Fault.SLOW, delay=0.1)  # slow, but within the timeout
    with trio.fail_after(5):
        assert await check_endpoint(address(healthy), HTTP)


async def test_tcp_check_is_a_connect(origins):
    healthy, unavailable, down = origins
    with trio.fail_after(5):
        assert await check_endpoint(address(healthy), TCP)
        assert await check_endpoint(address(unavailable), TCP)  # it accepts: that is all TCP sees
        assert not await check_endpoint(address(down), TCP)
    assert healthy.count() == 0  # nothing was sent


async def test_checker_flips_endpoints_both_ways(origins):
    healthy, unavailable, down = origins
    check = HealthCheck(path="/healthz", interval=0.05, timeout=0.05, healthy_threshold=2,
                        unhealthy_threshold=2, panic_threshold=30)  # one of three is enough
    endpoints = [Endpoint(address=address(o)) for o in origins]
    cluster = Cluster(name="c", endpoints=endpoints, health_check=check)
    availability = EndpointAvailability.for_cluster(cluster, now=trio.current_time())
    health = availability.health
    assert health is not None

    def statuses() -> list[str]:
        return [health.status(i) for i in range(3)]

    async def until(expected: list[str]) -> None:
        while statuses() != expected:
            await trio.sleep(0.01)

    with trio.fail_after(8):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_health_checks, cluster, health)
            await until([HEALTHY, UNHEALTHY, UNHEALTHY])
            assert availability.available(trio.current_time()) == [0]

            # The failing ones recover and the healthy one goes down.
            unavailable.heal()
            down.heal()
            healthy.set_mode(Fault.REFUSE)
            await until([UNHEALTHY, HEALTHY, HEALTHY])
            assert availability.available(trio.current_time()) == [1, 2]

            # Everything down: too few usable, so all of them take traffic (panic).
            unavailable.set_mode(Fault.ANSWER_503)
            down.set_mode(Fault.HANG)
            await until([UNHEALTHY] * 3)
            assert availability.available(trio.current_time()) == [0, 1, 2] and availability.panic
            nursery.cancel_scope.cancel()
    # Checks came at about the interval: a burst would be many more.
    assert 4 <= unavailable.count("GET", "/healthz") < 200


async def test_checker_stops_when_cancelled(origins):
    healthy = origins[0]
    cluster = Cluster(name="c", endpoints=[Endpoint(address=address(healthy))],
                      health_check=HealthCheck(path="/healthz", interval=0.05, timeout=0.05))
    health = HealthState.from_config(cluster.health_check, 1)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_health_checks, cluster, health)
            while not health.healthy(0):
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    seen = healthy.count()
    await trio.sleep(0.2)
    assert healthy.count() == seen


async def test_a_cluster_without_health_check_is_refused():
    cluster = Cluster(name="c", endpoints=["127.0.0.1:1"])
    with pytest.raises(ValueError, match="has no health_check"):
        await run_health_checks(cluster, HealthState(1))


def test_jitter_bounds():
    assert jittered(1.0, 0.0) == pytest.approx(1 - JITTER)
    assert jittered(1.0, 0.5) == pytest.approx(1.0)
    rng = random.Random(1)
    pauses = [jittered(5.0, rng.random()) for _ in range(1000)]
    assert 5.0 * (1 - JITTER) <= min(pauses) and max(pauses) < 5.0 * (1 + JITTER)
    assert max(pauses) - min(pauses) > 0.9  # spread over the whole range
