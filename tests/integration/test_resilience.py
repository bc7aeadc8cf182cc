"""Resilience seen from outside: retries, budgets, timeouts, outlier ejection, circuit
breaking, fault injection, rate limits, mirroring and health checks, with meshproxy as a
real process in front of real upstreams that fail on command (`FaultyOrigin`).

Each behaviour is shown to happen and, where that applies, to stop happening (an ejected
endpoint comes back, a tripped breaker lets traffic through again, a limited route admits
requests again). What reached an upstream is counted at the upstream itself, so "a POST is
never replayed" means the origin saw it once.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .faulty_origin import Fault, FaultyOrigin
from .h2_support import H2Client
from .http_support import RawClient, Response, cluster, http_config, request, route
from .support import wait_for

Address = tuple[str, int]

# Tiny backoff so that retry tests spend their time on what they measure.
QUICK_BACKOFF = {"base": "1ms", "max": "5ms"}


@pytest.fixture
def faulty() -> Iterator[Callable[[str], FaultyOrigin]]:
    """`faulty("name")` starts a FaultyOrigin; all are closed after the test."""
    started: list[FaultyOrigin] = []

    def start(name: str) -> FaultyOrigin:
        origin = FaultyOrigin(name)
        started.append(origin)
        return origin

    yield start
    for origin in started:
        origin.close()


# -- helpers ---------------------------------------------------------------------------------


def routed(name: str, cluster_name: str, *, timeout: str | None = None, prefix: str = "/",
           **policies: Any) -> dict[str, Any]:
    """A route with resilience fields (`retry=`, `fault=`, `rate_limit=`, `mirror=`)."""
    return {**route(name, cluster_name, timeout=timeout, prefix=prefix), **policies}


def endpoints(*origins: FaultyOrigin) -> list[str]:
    return [origin.endpoint for origin in origins]


def one_cluster_config(origins: list[FaultyOrigin], *, cluster_fields: dict[str, Any] | None = None,
                       **policies: Any) -> dict[str, Any]:
    """One route `all` (prefix /) to one cluster `up` holding `origins`."""
    timeout = policies.pop("timeout", None)
    return http_config([routed("all", "up", timeout=timeout, **policies)],
                       [cluster("up", endpoints(*origins), **(cluster_fields or {}))])


def timed(address: Address, method: str = "GET", target: str = "/", body: bytes | None = None,
          timeout: float = 10.0) -> tuple[Response, float]:
    """One request on a fresh connection, and the seconds it took."""
    started = time.monotonic()
    response = request(address, method, target, body=body, timeout=timeout)
    return response, time.monotonic() - started


def statuses(responses: list[Response]) -> list[tuple[int, str | None]]:
    return [(r.status, r.error_code or r.header("x-origin")) for r in responses]


def fire_concurrently(address: Address, count: int, target: str = "/") -> list[tuple[Response, float]]:
    """`count` GETs at the same moment, each on its own connection: (response, seconds)."""
    barrier = threading.Barrier(count)
    results: list[tuple[Response, float] | None] = [None] * count
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            client = RawClient(address, timeout=10)
            with client:
                barrier.wait(5)
                started = time.monotonic()
                client.request("GET", target)
                response = client.read_response()
                results[i] = (response, time.monotonic() - started)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert not errors, errors[0]
    assert all(r is not None for r in results), "a request thread did not finish"
    return [r for r in results if r is not None]


def metric_value(proxy: Any, sample_name: str, **labels: str) -> float | None:
    """The value of one sample of GET /metrics (None when absent)."""
    status, text = proxy.get("/metrics")
    assert status == 200, text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


def cluster_info(proxy: Any, name: str) -> dict[str, Any]:
    status, text = proxy.get("/clusters")
    assert status == 200, text
    return next(c for c in json.loads(text)["clusters"] if c["name"] == name)


# -- retries ---------------------------------------------------------------------------------

# How a failing endpoint fails, the retry condition that covers it, and what a client
# sees when such a failure reaches it.
FAILING = {
    "5xx": (Fault.ANSWER_503, "5xx", (503, "bad")),
    "reset": (Fault.RESET_BEFORE_HEADERS, "reset", (502, "upstream_reset")),
    "connect-failure": (Fault.REFUSE, "connect-failure", None),
}


@pytest.mark.parametrize("failure", list(FAILING))
def test_retried_gets_succeed_through_a_cluster_with_one_failing_endpoint(meshproxy, faulty, failure):
    fault, condition, _ = FAILING[failure]
    good, bad = faulty("good"), faulty("bad")
    bad.set_mode(fault)
    proxy = meshproxy(one_cluster_config(
        [good, bad], retry={"attempts": 2, "on": [condition], "backoff": QUICK_BACKOFF}))
    responses = [timed(proxy.address())[0] for _ in range(12)]
    assert statuses(responses) == [(200, "good")] * 12
    assert good.count("GET", "/") == 12
    # The failing endpoint was tried (round robin sends it every other first try), so the
    # successes are the retries' doing, not the balancer's luck.
    if fault is Fault.REFUSE:
        assert cluster_info(proxy, "up")["connect_failures"] >= 3
    else:
        assert bad.count("GET", "/") >= 3


@pytest.mark.parametrize("failure", ["5xx", "reset"])
def test_http2_streams_are_retried_by_the_route_policy(meshproxy, faulty, failure):
    """The same policy holds for HTTP/2 clients: each stream that met the failing endpoint
    is sent again to the good one."""
    fault, condition, _ = FAILING[failure]
    good, bad = faulty("good"), faulty("bad")
    bad.set_mode(fault)
    proxy = meshproxy(one_cluster_config(
        [good, bad], retry={"attempts": 2, "on": [condition], "backoff": QUICK_BACKOFF}))
    client = H2Client(proxy.address())
    try:
        responses = [client.get("/") for _ in range(12)]
    finally:
        client.close()
    assert [(r.status, r.header(b"x-origin")) for r in responses] == [(200, b"good")] * 12
    assert good.count("GET", "/") == 12
    assert bad.count("GET", "/") >= 3


@pytest.mark.parametrize("failure", ["5xx", "reset"])
def test_without_a_retry_policy_the_failing_endpoint_fails_requests(meshproxy, faulty, failure):
    """The control: the same cluster and no `retry`, and some requests fail. (A refused
    connect is not in this list: it moves on to the next endpoint whatever the route says,
    since nothing of the request went out.)"""
    fault, _, failed = FAILING[failure]
    good, bad = faulty("good"), faulty("bad")
    bad.set_mode(fault)
    proxy = meshproxy(one_cluster_config([good, bad]))
    seen = statuses([timed(proxy.address())[0] for _ in range(12)])
    assert failed in seen, seen
    assert (200, "good") in seen, seen
    assert good.count("GET", "/") + bad.count("GET", "/") == 12  # each sent once


@pytest.mark.parametrize(("fault", "expected"), [
    (Fault.ANSWER_503, 503),
    (Fault.RESET_BEFORE_HEADERS, 502),
    (Fault.HANG, 504),  # ended by the per-try timeout
], ids=["503", "reset", "hang"])
def test_a_post_that_reached_an_upstream_is_never_replayed(meshproxy, faulty, fault, expected):
    a, b = faulty("a"), faulty("b")
    for origin in (a, b):
        origin.fail("/pay", fault)  # whichever endpoint a replay went to, it would count
    proxy = meshproxy(one_cluster_config(
        [a, b], retry={"attempts": 3, "on": ["5xx", "reset", "gateway-error", "connect-failure"],
                       "per_try_timeout": "200ms", "backoff": QUICK_BACKOFF}))
    response, _ = timed(proxy.address(), "POST", "/pay", body=b'{"amount": 100}')
    assert response.status == expected, response
    time.sleep(0.2)  # a replay, if any, would have arrived by now
    assert a.count("POST", "/pay") + b.count("POST", "/pay") == 1

    # The same failure on a GET is retried: the policy was live, only the method held it back.
    response, _ = timed(proxy.address(), "GET", "/pay")
    assert response.status == expected, response
    assert a.count("GET", "/pay") + b.count("GET", "/pay") == 4  # 1 + attempts
    assert a.count("POST", "/pay") + b.count("POST", "/pay") == 1


def test_a_post_whose_connect_was_refused_goes_to_the_other_endpoint(meshproxy, faulty):
    good, down = faulty("good"), faulty("down")
    down.set_mode(Fault.REFUSE)
    proxy = meshproxy(one_cluster_config(
        [good, down], retry={"attempts": 2, "on": ["connect-failure"], "backoff": QUICK_BACKOFF}))
    body = b"x" * 100
    for _ in range(6):
        response, _ = timed(proxy.address(), "POST", "/orders", body=body)
        assert (response.status, response.header("x-origin")) == (200, "good"), response
    assert good.count("POST", "/orders") == 6
    assert {r.body_length for r in good.requests} == {len(body)}
    assert cluster_info(proxy, "up")["connect_failures"] >= 3  # the refused endpoint was tried


def test_attempts_bound_the_tries(meshproxy, faulty):
    bad = faulty("bad").set_mode(Fault.ANSWER_503)
    proxy = meshproxy(one_cluster_config(
        [bad], retry={"attempts": 2, "on": ["5xx"], "backoff": QUICK_BACKOFF}))
    response, _ = timed(proxy.address())
    assert (response.status, response.header("x-origin")) == (503, "bad"), response
    time.sleep(0.2)
    assert bad.count("GET", "/") == 3  # the first try and 2 retries, no more


def test_circuit_breaker_max_retries_limits_retries_in_flight(meshproxy, faulty):
    """`max_retries` bounds retries in flight at once (Envoy's "parallel retries"), not
    the retries of one request over its life: one request's retries, one after another,
    each need a single slot."""
    bad = faulty("bad").set_mode(Fault.ANSWER_503)
    proxy = meshproxy(one_cluster_config(
        [bad], cluster_fields={"circuit_breaker": {"max_retries": 1}},
        retry={"attempts": 2, "on": ["5xx"], "backoff": QUICK_BACKOFF}))
    response, _ = timed(proxy.address())
    assert response.status == 503, response
    assert bad.count() == 3  # retries one after another: never more than 1 in flight

    proxy2 = meshproxy(one_cluster_config(
        [bad], cluster_fields={"circuit_breaker": {"max_retries": 0}},
        retry={"attempts": 2, "on": ["5xx"], "backoff": QUICK_BACKOFF}))
    bad.forget()
    response, _ = timed(proxy2.address())
    assert response.status == 503, response
    time.sleep(0.2)
    assert bad.count() == 1


def test_retry_budget_caps_retries_under_a_total_outage(meshproxy, faulty):
    """Budget 0% + 1/s over the 10 s window: at most 10 retries, however many requests."""
    bad = faulty("bad").set_mode(Fault.ANSWER_503)
    proxy = meshproxy(one_cluster_config(
        [bad], retry={"attempts": 3, "on": ["5xx"], "backoff": QUICK_BACKOFF,
                      "budget": {"percent": 0, "min_per_second": 1}}))
    requests = 30
    with RawClient(proxy.address()) as client:
        for _ in range(requests):
            client.request("GET", "/")
            assert client.read_response().status == 503
    time.sleep(0.2)
    retries = bad.count("GET", "/") - requests
    assert 1 <= retries <= 10, f"{retries} retries reached the origin"
    counted = wait_for(lambda: metric_value(proxy, "meshproxy_upstream_retries_total", cluster="up"),
                       3.0, "meshproxy_upstream_retries_total for cluster up")
    assert 1 <= counted <= 10, counted


# -- timeouts --------------------------------------------------------------------------------


@pytest.mark.parametrize("retry", [
    None,
    {"attempts": 5, "on": ["reset", "5xx"], "backoff": QUICK_BACKOFF},
    {"attempts": 10, "on": ["reset"], "per_try_timeout": "100ms", "backoff": QUICK_BACKOFF},
], ids=["no-retry", "retry", "retry-per-try-timeout"])
def test_route_timeout_is_a_504_on_time(meshproxy, faulty, retry):
    """`timeout` covers the whole request, retries included."""
    hang = faulty("hang").set_mode(Fault.HANG)
    policies = {"retry": retry} if retry else {}
    proxy = meshproxy(one_cluster_config([hang], timeout="300ms", **policies))
    response, took = timed(proxy.address())
    assert (response.status, response.error_code) == (504, "upstream_timeout"), response
    assert 0.3 <= took < 1.0, took
    if retry and "per_try_timeout" in retry:
        assert hang.count("GET", "/") >= 2  # tries timed out one by one inside the route timeout

    hang.heal()
    response, took = timed(proxy.address())
    assert (response.status, response.header("x-origin")) == (200, "hang"), response
    assert took < 0.3, took


def test_route_timeout_covers_a_connect_that_never_completes(meshproxy, upstreams):
    hole = upstreams.blackhole()
    proxy = meshproxy(http_config([route("all", "up", timeout="300ms")],
                                  [cluster("up", [hole.address], connect_timeout="5s")]))
    response, took = timed(proxy.address())
    assert (response.status, response.error_code) == (504, "upstream_timeout"), response
    assert 0.3 <= took < 1.0, took


def test_per_try_timeout_moves_on_to_a_healthy_endpoint(meshproxy, faulty):
    good, hang = faulty("good"), faulty("hang")
    hang.set_mode(Fault.HANG)
    proxy = meshproxy(one_cluster_config(
        [good, hang], timeout="3s",
        retry={"attempts": 2, "on": ["reset"], "per_try_timeout": "200ms", "backoff": QUICK_BACKOFF}))
    for _ in range(4):
        response, took = timed(proxy.address())
        assert (response.status, response.header("x-origin")) == (200, "good"), response
        assert took < 1.0, took  # a try at the hanging endpoint costs 200 ms, not 3 s
    assert hang.count("GET", "/") >= 1


# -- outlier detection -----------------------------------------------------------------------


def test_a_failing_endpoint_is_ejected_and_comes_back(meshproxy, faulty):
    good, bad = faulty("good"), faulty("bad")
    bad.set_mode(Fault.ANSWER_503)
    proxy = meshproxy(one_cluster_config([good, bad], cluster_fields={"outlier_detection": {
        "consecutive_5xx": 3, "interval": "1s", "base_ejection_time": "2s", "max_ejection_percent": 50}}))
    address = proxy.address()

    # Round robin sends every other request to the failing endpoint until its third 503.
    failed = 0
    for _ in range(20):
        response, _ = timed(address)
        failed += response.status != 200
        if bad.count() >= 3:
            break
    ejected_at = time.monotonic()
    assert bad.count() == 3 and failed == 3, (bad.count(), failed)

    # Ejected: plain requests stop failing, and the endpoint gets nothing.
    while time.monotonic() - ejected_at < 1.5:
        response, _ = timed(address)
        assert (response.status, response.header("x-origin")) == (200, "good"), response
        time.sleep(0.02)
    assert bad.count() == 3

    endpoint = next(e for e in cluster_info(proxy, "up")["endpoints"] if e["address"] == bad.endpoint)
    # /clusters reports an ejection only if it has a field for it; its absence is a gap
    # noted elsewhere, not a failure of the ejection itself.
    ejection_fields = {k: v for k, v in endpoint.items() if "eject" in k}
    if ejection_fields:
        assert any(v not in (0, False, None) for v in ejection_fields.values()), endpoint

    # After base_ejection_time (2 s) it takes traffic again.
    bad.heal()

    def bad_answers() -> bool:
        response, _ = timed(address)
        assert response.status == 200, response
        return response.header("x-origin") == "bad"

    wait_for(bad_answers, 3.0, "the ejected endpoint to take traffic again", interval=0.05)
    assert time.monotonic() - ejected_at >= 1.8


def test_ejection_never_takes_more_than_max_ejection_percent(meshproxy, faulty):
    """Both endpoints fail; at 50% only one of the two may be out, so the other still
    takes every request (answering its own 503) instead of the cluster having none."""
    a, b = faulty("a"), faulty("b")
    for origin in (a, b):
        origin.set_mode(Fault.ANSWER_503)
    proxy = meshproxy(one_cluster_config([a, b], cluster_fields={"outlier_detection": {
        "consecutive_5xx": 3, "interval": "1s", "base_ejection_time": "5s", "max_ejection_percent": 50}}))
    responses = [timed(proxy.address())[0] for _ in range(20)]
    assert all(r.status == 503 and r.error_code is None for r in responses), statuses(responses)
    counts = sorted([a.count(), b.count()])
    assert counts[0] == 3 and counts[1] == 17, counts  # one ejected after its third 503


# -- circuit breaker -------------------------------------------------------------------------


def test_circuit_breaker_sheds_excess_concurrent_requests_at_once(meshproxy, faulty):
    slow = faulty("slow").set_mode(Fault.SLOW, delay=1.0)
    proxy = meshproxy(one_cluster_config([slow], cluster_fields={"circuit_breaker": {"max_requests": 2}}))
    results = fire_concurrently(proxy.address(), 6)
    ok = [took for response, took in results if response.status == 200]
    shed = [(response, took) for response, took in results if response.status != 200]
    assert 1 <= len(ok) <= 2, statuses([r for r, _ in results])
    assert len(ok) + len(shed) == 6
    for response, took in shed:
        assert (response.status, response.error_code) == (503, "circuit_open"), response
        assert took < 0.5, took  # at once, not after the 1 s the admitted ones take
    assert all(took >= 0.9 for took in ok), ok
    assert slow.count("GET", "/") == len(ok)

    # The breaker closes again: as many requests as it allows all go through together.
    again = fire_concurrently(proxy.address(), 2)
    assert statuses([r for r, _ in again]) == [(200, "slow")] * 2


# -- fault injection -------------------------------------------------------------------------


def test_fault_abort_answers_locally(meshproxy, faulty):
    origin = faulty("origin")
    config = http_config(
        [routed("chaos", "up", prefix="/chaos", fault={"abort": {"percent": 100, "status": 418}}),
         routed("all", "up")],
        [cluster("up", endpoints(origin))])
    proxy = meshproxy(config)
    for _ in range(3):
        response, _ = timed(proxy.address(), "GET", "/chaos/x")
        assert (response.status, response.error_code) == (418, "fault_abort"), response
    assert origin.count() == 0
    # A route without the fault reaches the origin.
    response, _ = timed(proxy.address(), "GET", "/plain")
    assert (response.status, response.header("x-origin")) == (200, "origin"), response
    assert origin.count() == 1


def test_fault_delay_holds_requests_back(meshproxy, faulty):
    origin = faulty("origin")
    config = http_config(
        [routed("chaos", "up", prefix="/chaos",
                fault={"delay": {"percent": 100, "duration": "300ms"}}),
         routed("all", "up")],
        [cluster("up", endpoints(origin))])
    proxy = meshproxy(config)
    response, took = timed(proxy.address(), "GET", "/chaos/x")
    assert (response.status, response.header("x-origin")) == (200, "origin"), response
    assert 0.3 <= took < 1.0, took
    response, took = timed(proxy.address(), "GET", "/plain")
    assert response.status == 200, response
    assert took < 0.3, took


# -- rate limit ------------------------------------------------------------------------------


def test_rate_limit_answers_429_over_the_burst_then_admits_again(meshproxy, faulty):
    origin = faulty("origin")
    proxy = meshproxy(one_cluster_config([origin], rate_limit={"rps": 5, "burst": 5}))
    address = proxy.address()
    burst = [timed(address)[0] for _ in range(20)]
    passed = [r for r in burst if r.status == 200]
    limited = [r for r in burst if r.status != 200]
    assert 5 <= len(passed) <= 6, statuses(burst)  # the burst, and maybe a token refilled meanwhile
    assert all((r.status, r.error_code) == (429, "rate_limited") for r in limited), statuses(limited)
    assert origin.count() == len(passed)

    time.sleep(1.0)  # refills 5 tokens
    again = [timed(address)[0] for _ in range(5)]
    assert [r.status for r in again] == [200] * 5, statuses(again)


# -- mirroring -------------------------------------------------------------------------------


def mirror_config(primary: FaultyOrigin, shadow: FaultyOrigin) -> dict[str, Any]:
    return http_config([routed("all", "up", mirror={"cluster": "shadow", "percent": 100})],
                       [cluster("up", endpoints(primary)), cluster("shadow", endpoints(shadow))])


def test_mirror_sends_a_copy_and_the_client_gets_the_primary_answer(meshproxy, faulty):
    primary, shadow = faulty("primary"), faulty("shadow")
    proxy = meshproxy(mirror_config(primary, shadow))
    response, _ = timed(proxy.address(), "GET", "/items")
    assert (response.status, response.header("x-origin")) == (200, "primary"), response
    assert response.json()["origin"] == "primary"
    body = b'{"name": "copy me"}'
    response, _ = timed(proxy.address(), "POST", "/items", body=body)
    assert (response.status, response.header("x-origin")) == (200, "primary"), response

    copies = shadow.wait_requests(2, timeout=3)
    assert sorted((r.method, r.path, r.body_length) for r in copies) == [
        ("GET", "/items", 0), ("POST", "/items", len(body))]
    assert all(r.header("x-meshproxy-shadow") == "1" for r in copies), copies
    assert all(r.header("x-meshproxy-shadow") is None for r in primary.requests)
    assert primary.count() == 2


@pytest.mark.parametrize("fault", [Fault.HANG, Fault.REFUSE])
def test_a_broken_mirror_never_slows_the_primary(meshproxy, faulty, fault):
    primary, shadow = faulty("primary"), faulty("shadow")
    shadow.set_mode(fault)
    proxy = meshproxy(mirror_config(primary, shadow))
    with RawClient(proxy.address()) as client:  # kept alive: the next request must not wait either
        for _ in range(5):
            started = time.monotonic()
            client.request("GET", "/items")
            response = client.read_response()
            took = time.monotonic() - started
            assert (response.status, response.header("x-origin")) == (200, "primary"), response
            assert took < 0.5, took
    for _ in range(3):
        response, took = timed(proxy.address(), "GET", "/items")
        assert response.status == 200 and took < 0.5, (response, took)
    assert primary.count() == 8
    if fault is Fault.HANG:
        shadow.wait_requests(1, timeout=3)  # the copies went out, and hang there


# -- active health checks --------------------------------------------------------------------


def test_health_checks_keep_traffic_off_an_unhealthy_endpoint(meshproxy, faulty):
    good, sick = faulty("good"), faulty("sick")
    sick.fail("/healthz", Fault.ANSWER_503)  # only its checks fail: its traffic would succeed
    proxy = meshproxy(one_cluster_config([good, sick], cluster_fields={"health_check": {
        "path": "/healthz", "interval": "300ms", "timeout": "200ms",
        "healthy_threshold": 1, "unhealthy_threshold": 1}}))
    address = proxy.address()
    wait_for(lambda: sick.count("GET", "/healthz") >= 1 and good.count("GET", "/healthz") >= 1,
             2.0, "a health check to reach both endpoints")

    for _ in range(10):
        response, _ = timed(address)
        assert (response.status, response.header("x-origin")) == (200, "good"), response
    assert sick.count("GET", "/") == 0

    # Healed, it passes its next check and takes traffic again.
    sick.heal()

    def sick_answers() -> bool:
        response, _ = timed(address)
        assert response.status == 200, response
        return response.header("x-origin") == "sick"

    wait_for(sick_answers, 3.0, "the healed endpoint to take traffic again", interval=0.05)
