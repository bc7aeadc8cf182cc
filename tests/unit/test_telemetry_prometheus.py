"""/metrics text: parses with Prometheus' own parser and carries exactly what was recorded."""

from __future__ import annotations

import os
import random

import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy import __version__
from proxy.config import parse_config
from proxy.telemetry import (
    CONTENT_TYPE,
    UNROUTED,
    ProcessUsage,
    SupervisorStats,
    Totals,
    WorkerStats,
    read_process_usage,
    record_connect_failure,
    record_request,
    render_metrics,
)
from proxy.telemetry.prometheus import BUCKETS

CONFIG = parse_config("""
listeners:
  - name: http-in
    address: 127.0.0.1:8080
    protocol: http
    routes:
      - {name: api, match: {prefix: /api}, cluster: api}
      - {name: default, match: {prefix: /}, cluster: web}
  - {name: db, address: 127.0.0.1:15432, protocol: tcp, cluster: pg}
clusters:
  - {name: web, endpoints: [127.0.0.1:9001, 127.0.0.1:9002]}
  - {name: api, endpoints: [127.0.0.1:9003]}
  - {name: pg, endpoints: [127.0.0.1:5432]}
""")

SUPERVISOR = SupervisorStats(
    node="web-1", config_version=7, reloads_ok=6, reloads_failed=2, worker_restarts=1,
    processes=(ProcessUsage("supervisor", 1.5, 30_000_000, 12), ProcessUsage("worker-1", 9.25, 50_000_000, 40)),
)


def samples(text: bytes) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels) -> value, from Prometheus' own parser."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


def value(parsed, name: str, **labels: str) -> float:
    return parsed[(name, frozenset(labels.items()))]


def two_workers_one_dead():
    """Latencies recorded per route/cluster, and the stats of both workers' traffic."""
    totals = Totals()
    latencies: dict[str, list[float]] = {"api": [], "web": []}
    rng = random.Random(1)
    for worker in range(2):
        stats = WorkerStats(CONFIG)
        listener = stats.listeners["http-in"]
        api = stats.clusters["api"]
        for _ in range(40):
            seconds = rng.choice([0.0003, 0.0007, 0.004, 0.03, 0.2, 3.0, 20.0])
            latencies["api"].append(seconds)
            record_request(listener.routes["api"], api, api.endpoints["127.0.0.1:9003"], 200, None,
                           seconds + 0.0001, seconds)
        web = stats.clusters["web"]
        for status, error in [(502, "connect_refused"), (504, "upstream_timeout"), (404, None)]:
            record_request(listener.routes["default"], web, web.endpoints["127.0.0.1:9002"], status, error,
                           0.01, None)
        record_request(listener.routes[UNROUTED], None, None, 404, "no_route", 0.00002, None)
        record_connect_failure(web, web.endpoints["127.0.0.1:9001"])
        listener.accepted += 10
        listener.active = 3
        listener.bytes_from_clients += 1000
        listener.bytes_to_clients += 5000
        web.pool_hits += 7
        web.pool_misses += 2
        web.connections += 2
        web.retries += 1
        db = stats.listeners["db"]
        db.accepted += 4
        db.resets += 1
        db.idle_timeouts += 2
        db.connect_failures += 1
        totals.update(worker, stats.snapshot())
    totals.exited(0)  # worker 0 died; its counters stay, its gauges go
    return totals.total(), latencies


def test_counters_carry_exact_counts():
    merged, _ = two_workers_one_dead()
    text = render_metrics(merged, SUPERVISOR)
    parsed = samples(text)
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")

    route = {"listener": "http-in", "route": "api"}
    assert value(parsed, "meshproxy_requests_total", **route, code_class="2xx") == 80
    assert value(parsed, "meshproxy_requests_total", **route, code_class="5xx") == 0
    default = {"listener": "http-in", "route": "default"}
    assert value(parsed, "meshproxy_requests_total", **default, code_class="5xx") == 4
    assert value(parsed, "meshproxy_requests_total", **default, code_class="4xx") == 2
    assert value(parsed, "meshproxy_errors_total", **default, code="connect_refused") == 2
    assert value(parsed, "meshproxy_errors_total", **default, code="upstream_timeout") == 2
    assert value(parsed, "meshproxy_errors_total", listener="http-in", route="", code="no_route") == 2
    assert value(parsed, "meshproxy_requests_total", listener="http-in", route="", code_class="4xx") == 2

    assert value(parsed, "meshproxy_downstream_connections_total", listener="http-in") == 20
    assert value(parsed, "meshproxy_downstream_connections_active", listener="http-in") == 3
    assert value(parsed, "meshproxy_downstream_bytes_total", listener="http-in", direction="in") == 2000
    assert value(parsed, "meshproxy_downstream_bytes_total", listener="http-in", direction="out") == 10000
    for reason, n in [("reset", 2), ("idle_timeout", 4), ("connect_failed", 2)]:
        assert value(parsed, "meshproxy_downstream_connection_errors_total", listener="db", reason=reason) == n
    assert not any(name == "meshproxy_downstream_connection_errors_total" and ("listener", "http-in") in labels
                   for name, labels in parsed)

    assert value(parsed, "meshproxy_upstream_requests_total", cluster="api", code_class="2xx") == 80
    assert value(parsed, "meshproxy_upstream_errors_total", cluster="web", code="upstream_timeout") == 2
    assert value(parsed, "meshproxy_upstream_pool_total", cluster="web", result="hit") == 14
    assert value(parsed, "meshproxy_upstream_pool_total", cluster="web", result="miss") == 4
    assert value(parsed, "meshproxy_upstream_connections_total", cluster="web") == 4
    assert value(parsed, "meshproxy_upstream_connect_failures_total", cluster="web") == 2
    assert value(parsed, "meshproxy_upstream_retries_total", cluster="web") == 2
    endpoint = {"cluster": "web", "endpoint": "127.0.0.1:9002"}
    assert value(parsed, "meshproxy_upstream_endpoint_requests_total", **endpoint) == 6
    assert value(parsed, "meshproxy_upstream_endpoint_errors_total", **endpoint) == 4
    assert value(parsed, "meshproxy_upstream_endpoint_errors_total", cluster="web", endpoint="127.0.0.1:9001") == 2
    assert value(parsed, "meshproxy_upstream_endpoint_requests_active", **endpoint) == 0


def test_supervisor_values():
    parsed = samples(render_metrics(WorkerStats(CONFIG).snapshot(), SUPERVISOR))
    assert value(parsed, "meshproxy_info", node="web-1", version=__version__) == 1
    assert value(parsed, "meshproxy_config_version") == 7
    assert value(parsed, "meshproxy_config_reloads_total", result="ok") == 6
    assert value(parsed, "meshproxy_config_reloads_total", result="failed") == 2
    assert value(parsed, "meshproxy_worker_restarts_total") == 1
    assert value(parsed, "meshproxy_process_cpu_seconds_total", process="worker-1") == 9.25
    assert value(parsed, "meshproxy_process_resident_memory_bytes", process="supervisor") == 30_000_000
    assert value(parsed, "meshproxy_process_open_fds", process="worker-1") == 40


@pytest.mark.parametrize(("family", "labels", "key"), [
    ("meshproxy_request_duration_seconds", {"listener": "http-in", "route": "api"}, "api"),
    ("meshproxy_upstream_duration_seconds", {"cluster": "api"}, "api"),
])
def test_histograms_are_cumulative_and_agree_with_the_samples(family, labels, key):
    merged, latencies = two_workers_one_dead()
    parsed = samples(render_metrics(merged, SUPERVISOR))
    # The route's total latency is the upstream latency plus 0.1 ms.
    recorded = latencies[key] if family.startswith("meshproxy_upstream") else [s + 0.0001 for s in latencies[key]]
    counts = [value(parsed, f"{family}_bucket", **labels, le=le)
              for le in [*(str(float(b)) for b in BUCKETS), "+Inf"]]
    assert counts == sorted(counts)  # cumulative
    # The samples sit well away from the bounds, where HDR buckets are exact enough.
    assert counts[:-1] == [sum(1 for s in recorded if s <= bound) for bound in BUCKETS]
    assert counts[-1] == value(parsed, f"{family}_count", **labels) == len(recorded)
    assert value(parsed, f"{family}_sum", **labels) == pytest.approx(sum(recorded), rel=1e-3)


def test_process_usage_of_this_process():
    usage = read_process_usage("supervisor", os.getpid())
    assert usage is not None and usage.name == "supervisor"
    assert 0 < usage.cpu_seconds < 1e6
    assert usage.resident_bytes > 1_000_000
    assert usage.open_fds >= 3
    assert read_process_usage("gone", 2**22 + 1) is None  # above the kernel's pid_max
