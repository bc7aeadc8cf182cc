"""Recording, the HDR layout, snapshots, merging and totals that survive worker restarts."""

from __future__ import annotations

import pickle
import random

import pytest
from hdrh.histogram import HdrHistogram

from proxy._core.tally import index_of_seconds
from proxy.config import parse_config
from proxy.telemetry import (
    UNROUTED,
    Snapshot,
    Totals,
    WorkerStats,
    hdr,
    merge,
    record_connect_failure,
    record_request,
)

CONFIG = """
listeners:
  - name: http-in
    address: 127.0.0.1:8080
    protocol: http
    routes:
      - {name: api, match: {prefix: /api}, cluster: api}
      - {name: default, match: {prefix: /}, cluster: web}
  - {name: db, address: 127.0.0.1:15432, protocol: tcp, cluster: pg}
clusters:
  - {name: web, endpoints: [127.0.0.1:9001, {address: 127.0.0.1:9002, weight: 2}]}
  - {name: api, endpoints: ["[::1]:9003"]}
  - {name: pg, endpoints: [127.0.0.1:5432]}
"""


def config(text: str = CONFIG):
    return parse_config(text)


def record(stats: WorkerStats, route: str, cluster: str, endpoint: str, status: int = 200,
           error: str | None = None, total: float = 0.002, upstream: float | None = 0.001) -> None:
    c = stats.clusters[cluster]
    record_request(stats.listeners["http-in"].routes[route], c, c.endpoints[endpoint], status, error,
                   total, upstream)


# -- HDR layout ------------------------------------------------------------------------------


def test_index_of_is_hdrhistograms_own_index():
    reference = HdrHistogram(hdr.LOWEST_US, hdr.HIGHEST_US, hdr.SIGNIFICANT_FIGURES)
    rng = random.Random(4)
    values = [1, 2, 1023, 1024, 2047, 2048, 2049, 4095, 4096, 30_000, hdr.HIGHEST_US]
    values += [rng.randrange(1, hdr.HIGHEST_US) for _ in range(5000)]
    values += [int(rng.lognormvariate(8, 2)) + 1 for _ in range(5000)]
    for value in values:
        value = min(value, hdr.HIGHEST_US)
        assert hdr.index_of(value) == reference.get_counts_array_index(value), value
        assert hdr.lowest_us(hdr.index_of(value)) <= value <= hdr.highest_us(hdr.index_of(value))


def test_bucket_bounds_are_hdrhistograms_own():
    reference = HdrHistogram(hdr.LOWEST_US, hdr.HIGHEST_US, hdr.SIGNIFICANT_FIGURES)
    for index in range(hdr.index_of(hdr.HIGHEST_US) + 1):
        low = reference.get_value_from_index(index)
        assert hdr.lowest_us(index) == low, index
        assert hdr.highest_us(index) == reference.get_highest_equivalent_value(low), index
        assert hdr.middle_us(index) == reference._hdr_median_equiv_value(low), index


def test_values_outside_the_range_are_clamped():
    assert hdr.index_of(0) == hdr.index_of(-5) == hdr.index_of(1)
    assert hdr.index_of(10**12) == hdr.index_of(hdr.HIGHEST_US)
    stats = WorkerStats(config())
    route = stats.listeners["http-in"].routes["api"]
    record_request(route, None, None, 200, None, -0.5, None)
    record_request(route, None, None, 200, None, 3600.0, None)
    assert dict(route.latency) == {hdr.index_of(1): 1, hdr.index_of(hdr.HIGHEST_US): 1}


def test_sparse_counts_summarise_as_hdrhistogram_does():
    rng = random.Random(7)
    values = [int(rng.lognormvariate(9, 1)) + 1 for _ in range(3000)]
    reference = HdrHistogram(hdr.LOWEST_US, hdr.HIGHEST_US, hdr.SIGNIFICANT_FIGURES)
    counts: dict[int, int] = {}
    for value in values:
        reference.record_value(value)
        counts[hdr.index_of(value)] = counts.get(hdr.index_of(value), 0) + 1
    assert hdr.total(counts) == reference.get_total_count() == 3000
    assert hdr.max_us(counts) == reference.get_max_value()
    percentiles = [50, 90, 99, 99.9, 99.99, 100]
    expected = reference.get_percentile_to_value_dict(percentiles)
    assert hdr.percentiles_us(counts, percentiles) == [expected[p] for p in percentiles]
    assert hdr.mean_us(counts) == pytest.approx(reference.get_mean_value())
    assert hdr.stddev_us(counts) == pytest.approx(reference.get_stddev())
    assert hdr.sum_us(counts) == pytest.approx(sum(values), rel=5e-4)


def test_percentile_steps_follow_java_hdrhistograms_ticks():
    counts = {hdr.index_of(ms * 1000): 1 for ms in range(1, 1001)}
    steps = list(hdr.percentile_steps(counts))
    assert [level for _, level, _ in steps[:17]] == [
        0, 10, 20, 30, 40, 50, 55, 60, 65, 70, 75, 77.5, 80, 82.5, 85, 87.5, 88.75]
    for value, level, seen in steps:
        assert seen == pytest.approx(max(level * 10, 1), abs=1)  # one sample per ms
        assert value == hdr.highest_us(hdr.index_of(seen * 1000))
    assert steps[-1] == (hdr.max_us(counts), 100.0, 1000)
    assert steps[-2][1] < 100 and steps[-2][2] == 1000  # the last value's own row comes first
    assert list(hdr.percentile_steps({})) == []
    assert list(hdr.percentile_steps({hdr.index_of(7): 3})) == [(7, 0.0, 3), (7, 100.0, 3)]


# -- recording -------------------------------------------------------------------------------


def test_a_request_is_counted_on_route_cluster_and_endpoint():
    stats = WorkerStats(config())
    record(stats, "default", "web", "127.0.0.1:9001", 200, total=0.0021, upstream=0.0017)
    record(stats, "default", "web", "127.0.0.1:9002", 503, "upstream_timeout", 0.5, None)
    route = stats.listeners["http-in"].routes["default"]
    web = stats.clusters["web"]
    assert route.requests == [0, 0, 1, 0, 0, 1]
    assert web.requests == [0, 0, 1, 0, 0, 1]
    assert route.errors == web.errors == {"upstream_timeout": 1}
    assert dict(route.latency) == {hdr.index_of(2100): 1, hdr.index_of(500_000): 1}
    assert dict(web.latency) == {hdr.index_of(1700): 1}  # no upstream time for the timeout
    assert [(e.requests, e.errors) for e in web.endpoints.values()] == [(1, 0), (1, 1)]


def test_requests_before_a_route_count_as_unrouted():
    stats = WorkerStats(config())
    unrouted = stats.listeners["http-in"].routes[UNROUTED]
    record_request(unrouted, None, None, 404, "no_route", 0.00003, None)
    record_request(unrouted, None, None, 0, None, 0.00003, None)  # the client left
    assert unrouted.requests == [1, 0, 0, 0, 1, 0]
    assert unrouted.errors == {"no_route": 1}


def test_a_failed_connect_counts_on_cluster_and_endpoint():
    stats = WorkerStats(config())
    web = stats.clusters["web"]
    record_connect_failure(web, web.endpoints["127.0.0.1:9001"])
    assert web.connect_failures == 1
    assert web.endpoints["127.0.0.1:9001"].errors == 1


def test_registry_follows_the_config():
    stats = WorkerStats(config())
    assert set(stats.listeners) == {"http-in", "db"}
    assert set(stats.listeners["http-in"].routes) == {UNROUTED, "api", "default"}
    assert stats.listeners["db"].routes == {}
    assert set(stats.clusters["web"].endpoints) == {"127.0.0.1:9001", "127.0.0.1:9002"}
    assert set(stats.clusters["api"].endpoints) == {"[::1]:9003"}


def test_a_reload_keeps_the_objects_of_unchanged_names():
    stats = WorkerStats(config())
    listener = stats.listeners["http-in"]
    api_route = listener.routes["api"]
    web = stats.clusters["web"]
    kept_endpoint = web.endpoints["127.0.0.1:9002"]
    record(stats, "api", "web", "127.0.0.1:9002")
    listener.accepted = 5

    stats.ensure(config(CONFIG.replace("name: default", "name: fallback")
                        .replace("127.0.0.1:9001, ", "127.0.0.1:9005, ")
                        .replace("  - {name: db, address: 127.0.0.1:15432, protocol: tcp, cluster: pg}\n", "")))

    assert stats.listeners["http-in"] is listener and listener.accepted == 5
    assert listener.routes["api"] is api_route and api_route.requests[2] == 1
    assert set(listener.routes) == {UNROUTED, "api", "fallback"}
    assert "db" not in stats.listeners
    assert stats.clusters["web"] is web
    assert web.endpoints["127.0.0.1:9002"] is kept_endpoint and kept_endpoint.requests == 1
    assert set(web.endpoints) == {"127.0.0.1:9005", "127.0.0.1:9002"}


def test_a_listener_that_changes_protocol_starts_over():
    stats = WorkerStats(config())
    stats.listeners["db"].accepted = 3
    stats.ensure(config(CONFIG.replace(
        "{name: db, address: 127.0.0.1:15432, protocol: tcp, cluster: pg}",
        "{name: db, address: 127.0.0.1:15432, protocol: http, routes: [{name: r, match: {prefix: /}, cluster: pg}]}")))
    assert stats.listeners["db"].accepted == 0
    assert set(stats.listeners["db"].routes) == {UNROUTED, "r"}


# -- snapshots -------------------------------------------------------------------------------


def busy_worker(requests: int = 10, seed: int = 0) -> WorkerStats:
    stats = WorkerStats(config())
    rng = random.Random(seed)
    for _ in range(requests):
        record(stats, "api", "api", "[::1]:9003", rng.choice([200, 200, 404, 502]),
               total=rng.uniform(0.001, 0.05), upstream=rng.uniform(0.0005, 0.04))
    stats.listeners["http-in"].accepted += requests
    stats.listeners["http-in"].active = 2
    stats.clusters["api"].endpoints["[::1]:9003"].active = 1
    return stats


def test_snapshot_survives_pickle_and_is_detached_from_recording():
    stats = busy_worker(50)
    snapshot = stats.snapshot()
    latency_then = dict(stats.listeners["http-in"].routes["api"].latency)
    copy = pickle.loads(pickle.dumps(snapshot, protocol=pickle.HIGHEST_PROTOCOL))
    record(stats, "api", "api", "[::1]:9003")
    stats.listeners["http-in"].accepted += 1

    for snap in (snapshot, copy):
        route = snap.listeners["http-in"].routes["api"]
        assert sum(route.requests) == 50
        assert route.latency == latency_then and hdr.total(route.latency) == 50
        assert snap.listeners["http-in"].accepted == 50
        assert snap.listeners["http-in"].active == 2
        assert snap.clusters["api"].endpoints["[::1]:9003"].requests == 50
        assert snap.origin == stats.origin
    assert copy.listeners["db"].protocol == "tcp"


def test_merge_adds_every_counter_and_bucket():
    workers = [busy_worker(10 * (i + 1), seed=i) for i in range(3)]
    merged = merge(w.snapshot() for w in workers)
    route = merged.listeners["http-in"].routes["api"]
    assert sum(route.requests) == 60
    for status_class in range(6):
        assert route.requests[status_class] == sum(
            w.listeners["http-in"].routes["api"].requests[status_class] for w in workers)
    buckets = set().union(*(w.listeners["http-in"].routes["api"].latency for w in workers))
    for index in buckets:
        assert route.latency[index] == sum(
            w.listeners["http-in"].routes["api"].latency.get(index, 0) for w in workers)
    assert merged.listeners["http-in"].active == 6  # gauges of live workers add up
    assert merged.clusters["api"].endpoints["[::1]:9003"].requests == 60
    assert merged.origin is None
    assert merge([]) == Snapshot()


def test_merge_tolerates_workers_on_different_config_versions():
    old, new = WorkerStats(config()), WorkerStats(config(CONFIG.replace("name: api, match", "name: v2, match")))
    record(old, "api", "web", "127.0.0.1:9001")
    record(new, "v2", "web", "127.0.0.1:9001")
    routes = merge([old.snapshot(), new.snapshot()]).listeners["http-in"].routes
    assert routes["api"].requests[2] == routes["v2"].requests[2] == 1


def test_totals_stay_monotonic_when_a_worker_dies():
    totals = Totals()
    first, other = busy_worker(10, seed=1), busy_worker(5, seed=2)
    totals.update(0, first.snapshot())
    totals.update(1, other.snapshot())
    before = totals.total()
    assert sum(before.listeners["http-in"].routes["api"].requests) == 15

    record(first, "api", "api", "[::1]:9003")  # never reported: the worker dies first
    totals.exited(0)
    after = totals.total()
    assert sum(after.listeners["http-in"].routes["api"].requests) == 15
    assert after.listeners["http-in"].accepted == 15
    assert after.listeners["http-in"].active == 2  # only the live worker's connections
    assert after.clusters["api"].endpoints["[::1]:9003"].active == 1

    restarted = WorkerStats(config())
    totals.update(0, restarted.snapshot())
    record(restarted, "api", "api", "[::1]:9003")
    totals.update(0, restarted.snapshot())
    assert sum(totals.total().listeners["http-in"].routes["api"].requests) == 16
    assert hdr.total(totals.total().listeners["http-in"].routes["api"].latency) == 16


def test_totals_notice_a_restart_without_being_told():
    totals = Totals()
    first = busy_worker(10)
    totals.update(0, first.snapshot())
    totals.update(0, WorkerStats(config()).snapshot())  # a new process in slot 0
    merged = totals.total()
    assert sum(merged.listeners["http-in"].routes["api"].requests) == 10
    assert merged.listeners["http-in"].active == 0


def test_a_worker_that_misses_a_scrape_still_counts():
    totals = Totals()
    a, b = busy_worker(3), busy_worker(4)
    totals.update(0, a.snapshot())
    totals.update(1, b.snapshot())
    record(a, "api", "api", "[::1]:9003")
    totals.update(0, a.snapshot())  # worker 1 did not answer this time
    assert sum(totals.total().listeners["http-in"].routes["api"].requests) == 8


def test_totals_leave_out_names_no_worker_has_any_more():
    totals = Totals()
    old = busy_worker(6)
    record(old, "default", "web", "127.0.0.1:9001", 503, "upstream_reset", 7.5)
    totals.update(0, old.snapshot())
    totals.exited(0)
    # The restarted worker runs a config without the route "default" and the listener "db".
    reloaded = WorkerStats(config(CONFIG.replace("name: default", "name: fallback")
                                  .replace("  - {name: db, address: 127.0.0.1:15432, protocol: tcp, cluster: pg}\n", "")))
    record(reloaded, "api", "api", "[::1]:9003", total=0.0001)
    totals.update(0, reloaded.snapshot())

    merged = totals.total()
    assert set(merged.listeners) == {"http-in"}
    assert set(merged.listeners["http-in"].routes) == {UNROUTED, "api", "fallback"}
    api = merged.listeners["http-in"].routes["api"]
    assert sum(api.requests) == 7  # retired and live counts of a name both workers have
    assert hdr.total(api.latency) == 7  # buckets only the dead worker filled are kept
    assert merged.clusters["web"].errors == {"upstream_reset": 1}
    assert merged.clusters["web"].endpoints["127.0.0.1:9001"].errors == 1

    totals.exited(0)  # no worker left: whatever was counted is still reported
    assert set(totals.total().listeners) == {"http-in", "db"}


@pytest.mark.parametrize("seconds", [-1.0, 0.0, 0.0000004, 0.000001, 0.0000015, 0.002047, 0.002048,
                                     0.0021234, 0.5, 1.999999, 59.9, 60.0, 3600.0])
def test_recorded_bucket_is_hdrhistograms_index(seconds):
    """The C recorder files a latency where HdrHistogram's layout puts it."""
    assert index_of_seconds(seconds) == hdr.index_of(int(seconds * 1e6))


def test_recorded_bucket_matches_hdr_over_a_sweep():
    for us in [*range(1, 5000), *range(5000, 70_000_000, 9973)]:
        assert index_of_seconds(us / 1e6) == hdr.index_of(int(us / 1e6 * 1e6))
