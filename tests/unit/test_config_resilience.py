"""Resilience config: routes[].retry, fault, rate_limit, mirror and clusters[].circuit_breaker,
outlier_detection, health_check parse into typed objects with their defaults, and every
mistake is reported with its field path."""

import json
import pickle
from pathlib import Path

import pytest

from proxy.config import (
    Backoff,
    CircuitLimits,
    ConfigError,
    Fault,
    FaultAbort,
    FaultDelay,
    HealthCheck,
    Mirror,
    OutlierDetection,
    RateLimit,
    Retry,
    RetryBudget,
    config_to_dict,
    load_config,
    parse_config,
)

BASE = """
listeners:
  - name: in
    address: 127.0.0.1:0
    protocol: http
    routes:
      - name: r
        match: {prefix: /}
        cluster: web
ROUTE
clusters:
  - name: web
    endpoints: [127.0.0.1:9001, 127.0.0.1:9002]
CLUSTER
  - {name: shadow, endpoints: [127.0.0.1:9003]}
"""
ROUTE = "listeners[0].routes[0]"
CLUSTER = "clusters[0]"


def config(route: str = "", cluster: str = "") -> str:
    """BASE with YAML lines added to its one route and to its cluster `web`."""
    return BASE.replace("ROUTE", route and f"        {route}").replace("CLUSTER", cluster and f"    {cluster}")


def errors(text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return {e.path: e.message for e in info.value.errors}


def route_of(text: str):
    return parse_config(text).listener("in").routes[0]


def cluster_of(text: str):
    return parse_config(text).cluster("web")


# -- defaults ---------------------------------------------------------------------------------


def test_nothing_is_on_unless_configured():
    route = route_of(config())
    assert (route.retry, route.fault, route.rate_limit, route.mirror) == (None, None, None, None)
    cluster = cluster_of(config())
    assert (cluster.circuit_breaker, cluster.outlier_detection, cluster.health_check) == (None, None, None)
    assert "retry" not in config_to_dict(parse_config(config()))["listeners"][0]["routes"][0]


def test_retry_defaults_are_envoys_and_linkerds():
    retry = route_of(config("retry: {}")).retry
    assert retry == Retry(
        attempts=1, on=("connect-failure", "refused", "reset", "gateway-error"), retriable_status_codes=(),
        per_try_timeout=None, backoff=Backoff(base=0.025, max=0.25),
        budget=RetryBudget(percent=20.0, min_per_second=10), max_body_bytes=65536,
    )


def test_cluster_defaults():
    assert CircuitLimits() == CircuitLimits(max_connections=1024, max_pending=1024, max_requests=1024, max_retries=3)
    detection = cluster_of(config(cluster="outlier_detection: {}")).outlier_detection
    assert detection == OutlierDetection(consecutive_5xx=5, consecutive_gateway_errors=5, interval=10.0,
                                         base_ejection_time=30.0, max_ejection_percent=10)
    check = cluster_of(config(cluster="health_check: {path: /healthz}")).health_check
    assert check == HealthCheck(path="/healthz", interval=5.0, timeout=1.0, healthy_threshold=2,
                                unhealthy_threshold=3, panic_threshold=50.0)


def test_everything_set():
    route = route_of(config(
        "retry: {attempts: 3, on: [5xx, retriable-status-codes], retriable_status_codes: [409, 429], "
        "per_try_timeout: 250ms, backoff: {base: 10ms, max: 1s}, budget: {percent: 12.5, min_per_second: 0}, "
        "max_body_bytes: 0}\n"
        "        fault: {delay: {percent: 0.5, duration: 2s}, abort: {percent: 10, status: 418}}\n"
        "        rate_limit: {rps: 100, burst: 20}\n"
        "        mirror: {cluster: shadow, percent: 25}"
    ))
    assert route.retry == Retry(attempts=3, on=("5xx", "retriable-status-codes"), retriable_status_codes=(409, 429),
                                per_try_timeout=0.25, backoff=Backoff(base=0.01, max=1.0),
                                budget=RetryBudget(percent=12.5, min_per_second=0), max_body_bytes=0)
    assert route.fault == Fault(delay=FaultDelay(percent=0.5, duration=2.0), abort=FaultAbort(percent=10, status=418))
    assert route.rate_limit == RateLimit(rps=100, burst=20)
    assert route.mirror == Mirror(cluster="shadow", percent=25)


def test_the_503_condition_may_be_written_as_a_number():
    # YAML reads `503` as an integer; it names the condition all the same.
    assert route_of(config("retry: {on: [503, reset]}")).retry.on == ("503", "reset")


@pytest.mark.parametrize("key", ["on", "off", "yes", "no", "On", "Y"])
def test_yaml_11_boolean_words_are_plain_keys(key):
    # PyYAML would read `on:` as the key True; a header named `on` or `no` stays a name too.
    match = parse_config(config().replace("match: {prefix: /}", f"match: {{headers: {{{key}: x}}}}"))
    assert match.listener("in").routes[0].match.headers == ((key.lower(), "x"),)
    assert errors(config().replace("name: r", "name: r\n        on: x")) == {f"{ROUTE}.on": "unknown field"}


def test_yaml_booleans_as_values_are_unchanged():
    listener = "listeners: [{name: t, address: 127.0.0.1:0, protocol: tcp, cluster: c, splice: no}]"
    assert not parse_config(f"{listener}\nclusters: [{{name: c, endpoints: [127.0.0.1:1]}}]").listeners[0].splice


@pytest.mark.parametrize(("rps", "burst"), [("0.5", 1), ("1", 1), ("2.5", 3), ("100", 100)])
def test_rate_limit_burst_defaults_to_rps_rounded_up(rps, burst):
    assert route_of(config(f"rate_limit: {{rps: {rps}}}")).rate_limit.burst == burst


def test_health_check_tcp():
    check = cluster_of(config(cluster="health_check: {tcp: true, interval: 2s, timeout: 2s}")).health_check
    assert (check.tcp, check.path, check.interval, check.timeout) == (True, None, 2.0, 2.0)


def test_fault_percent_defaults_to_all_requests():
    fault = route_of(config("fault: {abort: {status: 503}}")).fault
    assert (fault.delay, fault.abort) == (None, FaultAbort(percent=100.0, status=503))


def test_round_trips_through_json_and_pickle():
    text = config(
        "retry: {on: [503], per_try_timeout: 1.5s}\n        fault: {delay: {duration: 250ms}}\n"
        "        rate_limit: {rps: 2.5}\n        mirror: {cluster: shadow}",
        "circuit_breaker: {max_requests: 10}\n    outlier_detection: {interval: 1m}\n"
        "    health_check: {path: /ready, timeout: 100ms}",
    )
    parsed = parse_config(text)
    data = config_to_dict(parsed)
    route = data["listeners"][0]["routes"][0]
    assert route["retry"]["per_try_timeout"] == "1.5s"
    assert route["retry"]["backoff"] == {"base": "25ms", "max": "250ms"}
    assert data["clusters"][0]["outlier_detection"]["interval"] == "1m"
    assert parse_config(json.dumps(data)) == parsed
    assert pickle.loads(pickle.dumps(parsed)) == parsed


# -- errors, each at its path ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "path", "message"),
    [
        ("retry: {attempts: 11}", "retry.attempts", "must be less than or equal to 10, got 11"),
        ("retry: {attempts: -1}", "retry.attempts", "must be greater than or equal to 0, got -1"),
        ("retry: {on: []}", "retry.on", "must not be empty"),
        ("retry: {on: [5xx, bogus]}", "retry.on[1]",
         ("must be 'connect-failure', 'refused', 'reset', '5xx', 'gateway-error', '503' or "
          "'retriable-status-codes', got 'bogus'")),
        ("retry: {on: [502]}", "retry.on[0]", "got 502"),
        ("retry: {on: [reset, 5xx, reset]}", "retry.on[2]", "'reset' is listed twice"),
        ("retry: {on: [retriable-status-codes]}", "retry.retriable_status_codes",
         "required when on includes 'retriable-status-codes'"),
        ("retry: {retriable_status_codes: [429]}", "retry.retriable_status_codes",
         "only used when on includes 'retriable-status-codes'"),
        ("retry: {on: [retriable-status-codes], retriable_status_codes: [200]}",
         "retry.retriable_status_codes[0]", "must be greater than or equal to 400, got 200"),
        ("retry: {on: [retriable-status-codes], retriable_status_codes: [429, 429]}",
         "retry.retriable_status_codes[1]", "429 is listed twice"),
        ("retry: {per_try_timeout: 5}", "retry.per_try_timeout", "must be a duration string with a unit"),
        ("retry: {backoff: {base: 1s, max: 100ms}}", "retry.backoff.max", "must not be shorter than base (1s)"),
        ("retry: {backoff: {base: 0s}}", "retry.backoff.base", "must be greater than 0, got '0s'"),
        ("retry: {budget: {percent: 101}}", "retry.budget.percent", "must be less than or equal to 100, got 101"),
        ("retry: {budget: {percent: '20%'}}", "retry.budget.percent", "must be a number, got '20%'"),
        ("retry: {budget: {min_per_sec: 5}}", "retry.budget.min_per_sec",
         "unknown field; did you mean 'min_per_second'?"),
        ("retry: {max_body_bytes: 17000000}", "retry.max_body_bytes", "must be less than or equal to 16777216"),
        ("retry: {tries: 2}", "retry.tries", "unknown field"),
        ("retry: 3", "retry", "must be a mapping, got 3"),
        ("fault: {}", "fault", "set delay, abort or both"),
        ("fault: {delay: {percent: 50}}", "fault.delay.duration", "required field missing"),
        ("fault: {delay: {duration: 1s, percent: -5}}", "fault.delay.percent",
         "must be greater than or equal to 0, got -5"),
        ("fault: {abort: {percent: 50}}", "fault.abort.status", "required field missing"),
        ("fault: {abort: {status: 600}}", "fault.abort.status", "must be less than or equal to 599, got 600"),
        ("fault: {abort: {status: 503, percent: true}}", "fault.abort.percent", "must be a number, got true"),
        ("rate_limit: {}", "rate_limit.rps", "required field missing"),
        ("rate_limit: {rps: 0}", "rate_limit.rps", "must be greater than 0, got 0"),
        ("rate_limit: {rps: 10, burst: 0}", "rate_limit.burst", "must be greater than or equal to 1, got 0"),
        ("rate_limit: {rps: 10, burst: 1.5}", "rate_limit.burst", "must be an integer, got 1.5"),
        ("mirror: {percent: 10}", "mirror.cluster", "required field missing"),
        ("mirror: {cluster: shadow, percent: 200}", "mirror.percent", "must be less than or equal to 100"),
        ("mirror: {cluster: shadw}", "mirror.cluster", "unknown cluster 'shadw'; did you mean 'shadow'?"),
    ],
)
def test_route_errors(route, path, message):
    found = errors(config(route))
    assert f"{ROUTE}.{path}" in found, found
    assert message in found[f"{ROUTE}.{path}"]


def test_a_bad_rate_is_one_error_not_also_a_missing_burst():
    assert errors(config("rate_limit: {rps: -1}")) == {f"{ROUTE}.rate_limit.rps": "must be greater than 0, got -1"}


@pytest.mark.parametrize(
    ("cluster", "path", "message"),
    [
        ("circuit_breaker: {max_connections: 0}", "circuit_breaker.max_connections",
         "must be greater than or equal to 1, got 0"),
        ("circuit_breaker: {max_retries: -1}", "circuit_breaker.max_retries",
         "must be greater than or equal to 0, got -1"),
        ("circuit_breaker: {max_pendng: 5}", "circuit_breaker.max_pendng",
         "unknown field; did you mean 'max_pending'?"),
        ("outlier_detection: {consecutive_5xx: -1}", "outlier_detection.consecutive_5xx",
         "must be greater than or equal to 0"),
        ("outlier_detection: {interval: 10}", "outlier_detection.interval", "must be a duration string"),
        ("outlier_detection: {base_ejection_time: 0ms}", "outlier_detection.base_ejection_time",
         "must be greater than 0"),
        ("outlier_detection: {max_ejection_percent: 101}", "outlier_detection.max_ejection_percent",
         "must be less than or equal to 100, got 101"),
        ("outlier_detection: {max_ejection_percent: 12.5}", "outlier_detection.max_ejection_percent",
         "must be an integer, got 12.5"),
        ("health_check: {}", "health_check", "set exactly one of path or tcp: true (found none)"),
        ("health_check: {tcp: false}", "health_check", "set exactly one of path or tcp: true (found none)"),
        ("health_check: {path: /h, tcp: true}", "health_check",
         "set exactly one of path or tcp: true (found path and tcp)"),
        ("health_check: {path: healthz}", "health_check.path", 'must start with "/"'),
        ("health_check: {path: '/h?x=1'}", "health_check.path", "must be a path without '?' or '#'"),
        ("health_check: {tcp: 'yes'}", "health_check.tcp", "must be true or false, got 'yes'"),
        ("health_check: {tcp: true, timeout: 6s}", "health_check.timeout", "must not be longer than interval (5s)"),
        ("health_check: {tcp: true, healthy_threshold: 0}", "health_check.healthy_threshold",
         "must be greater than or equal to 1, got 0"),
        ("health_check: {tcp: true, panic_threshold: 100.5}", "health_check.panic_threshold",
         "must be less than or equal to 100"),
    ],
)
def test_cluster_errors(cluster, path, message):
    found = errors(config(cluster=cluster))
    assert f"{CLUSTER}.{path}" in found, found
    assert message in found[f"{CLUSTER}.{path}"]


def test_all_problems_at_once():
    found = errors(config("retry: {attempts: 99, budget: {percent: -1}}\n        mirror: {cluster: nope}",
                          "circuit_breaker: {max_requests: 0}"))
    assert set(found) == {f"{ROUTE}.retry.attempts", f"{ROUTE}.retry.budget.percent",
                          f"{ROUTE}.mirror.cluster", f"{CLUSTER}.circuit_breaker.max_requests"}


def test_the_shipped_resilience_example_uses_every_option():
    example = load_config(Path(__file__).resolve().parents[2] / "configs/examples/resilience.yaml")
    orders, search, chaos = example.listener("http-in").routes
    assert orders.retry.attempts == 2 and orders.retry.retriable_status_codes == (409,)
    assert orders.mirror == Mirror(cluster="orders-next", percent=5)
    assert search.rate_limit == RateLimit(rps=200, burst=400) and search.retry.on == ("5xx",)
    assert chaos.fault.delay.duration == 0.5 and chaos.fault.abort.status == 503
    cluster = example.cluster("orders")
    assert cluster.circuit_breaker == CircuitLimits()
    assert cluster.outlier_detection == OutlierDetection()
    assert cluster.health_check == HealthCheck(path="/healthz")
    assert example.cluster("search").health_check.tcp
