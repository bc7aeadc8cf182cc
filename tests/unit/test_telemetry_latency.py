"""/stats/latency: JSON percentiles, HdrHistogram .hgrm text, and the reset interval."""

from __future__ import annotations

import json
import math
import random
import re

import pytest
from hdrh.histogram import HdrHistogram

from proxy.config import parse_config
from proxy.telemetry import (
    UNROUTED,
    LatencyWindow,
    Totals,
    WorkerStats,
    hdr,
    hgrm,
    latency_json,
    record_request,
    select,
)
from proxy.telemetry.latency import histograms

CONFIG = parse_config("""
listeners:
  - name: http-in
    address: 127.0.0.1:8080
    protocol: http
    routes:
      - {name: api, match: {prefix: /api}, cluster: api}
      - {name: default, match: {prefix: /}, cluster: web}
  - name: admin-in
    address: 127.0.0.1:8081
    protocol: http
    routes: [{name: default, match: {prefix: /}, cluster: web}]
  - {name: db, address: 127.0.0.1:15432, protocol: tcp, cluster: web}
clusters:
  - {name: web, endpoints: [127.0.0.1:9001]}
  - {name: api, endpoints: [127.0.0.1:9003]}
""")

# One HDR bucket is 1/1024 .. 1/2048 of its value wide: 3 significant digits.
HDR_PRECISION = 1e-3


def serve(stats: WorkerStats, route: str, cluster: str, seconds: list[float], listener: str = "http-in") -> None:
    c = stats.clusters[cluster]
    for s in seconds:
        record_request(stats.listeners[listener].routes[route], c, None, 200, None, s, s * 0.9)


def test_json_percentiles_match_the_recorded_latencies():
    stats = WorkerStats(CONFIG)
    # 1000 requests at 1..1000 ms: the p-th percentile is p * 10 ms.
    serve(stats, "api", "api", [ms / 1000 for ms in range(1, 1001)])
    body = latency_json(LatencyWindow().interval(stats.snapshot()))
    json.dumps(body)  # serialisable as is
    api = body["routes"]["http-in/api"]
    assert api["count"] == 1000
    for name, expected in [("p50", 500), ("p90", 900), ("p99", 990), ("p999", 999), ("p9999", 1000),
                           ("max", 1000)]:
        assert api[name] == pytest.approx(expected, rel=HDR_PRECISION), name
    assert api["mean"] == pytest.approx(500.5, rel=HDR_PRECISION)
    assert body["clusters"]["api"]["p50"] == pytest.approx(450, rel=HDR_PRECISION)
    assert body["routes"]["http-in/default"] == {"count": 0, "p50": None, "p90": None, "p99": None,
                                                 "p999": None, "p9999": None, "max": None, "mean": None}


def test_json_agrees_with_hdrhistogram():
    stats = WorkerStats(CONFIG)
    rng = random.Random(3)
    seconds = [rng.lognormvariate(-4, 1) for _ in range(5000)]
    serve(stats, "api", "api", seconds)
    reference = HdrHistogram(hdr.LOWEST_US, hdr.HIGHEST_US, hdr.SIGNIFICANT_FIGURES)
    for s in seconds:
        reference.record_value(int(s * 1e6))
    api = latency_json(histograms(stats.snapshot()))["routes"]["http-in/api"]
    expected = reference.get_percentile_to_value_dict([50, 90, 99, 99.9, 99.99])
    assert [api[p] for p in ("p50", "p90", "p99", "p999", "p9999")] == [v / 1000 for v in expected.values()]
    assert api["max"] == reference.get_max_value() / 1000
    assert api["mean"] == pytest.approx(reference.get_mean_value() / 1000, abs=1e-3)


def test_a_listener_sums_its_routes_and_tcp_listeners_have_no_latency():
    stats = WorkerStats(CONFIG)
    serve(stats, "api", "api", [0.01] * 3)
    serve(stats, "default", "web", [0.02] * 2)
    record_request(stats.listeners["http-in"].routes[UNROUTED], None, None, 404, "no_route", 0.0001, None)
    hists = histograms(stats.snapshot())
    assert set(hists["routes"]) == {"http-in/api", "http-in/default", "admin-in/default"}
    assert set(hists["listeners"]) == {"http-in", "admin-in"}
    assert hdr.total(hists["listeners"]["http-in"]) == 6


def test_select_names_one_histogram():
    stats = WorkerStats(CONFIG)
    serve(stats, "api", "api", [0.01])
    hists = histograms(stats.snapshot())
    assert hdr.total(select(hists, "route", "http-in/api")) == 1
    assert hdr.total(select(hists, "route", "api")) == 1  # only one listener has it
    assert hdr.total(select(hists, "cluster", "api")) == 1
    assert hdr.total(select(hists, "listener", "http-in")) == 1
    with pytest.raises(LookupError, match="admin-in/default, http-in/api, http-in/default"):
        select(hists, "route", "default")  # two listeners have one
    with pytest.raises(LookupError, match="no cluster 'nope'"):
        select(hists, "cluster", "nope")


PERCENTILE_LINE = re.compile(r"^\s*(\d+\.\d{3}) (\d\.\d{12})\s+(\d+)(?:\s+(\d+\.\d{2}))?$")


def parse_hgrm(text: str):
    """What HdrHistogram's plotters read: the percentile lines, and the footer."""
    lines = text.splitlines()
    assert lines[0].split() == ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"]
    assert lines[1] == ""
    rows, footer = [], {}
    for line in lines[2:]:
        if line.startswith("#["):
            footer.update(re.findall(r"(\w[\w ]*?)\s*=\s*([\d.]+)", line))
        else:
            match = PERCENTILE_LINE.match(line)
            assert match, line
            rows.append((float(match[1]), float(match[2]), int(match[3])))
    return rows, footer


def test_hgrm_loads_back_in_milliseconds():
    stats = WorkerStats(CONFIG)
    serve(stats, "api", "api", [ms / 1000 for ms in range(1, 1001)])
    text = hgrm(select(histograms(stats.snapshot()), "route", "http-in/api"))
    rows, footer = parse_hgrm(text)

    values = [value for value, _, _ in rows]
    assert values == sorted(values) and rows[-1][1:] == (1.0, 1000)
    # Java's ticks: 10% steps to 50%, then halving steps towards 100% (0.990625, not 0.99).
    at = {percentile: value for value, percentile, _ in rows}
    for percentile in [0.5, 0.75, 0.9, 0.990625, 0.9990234375]:
        assert at[percentile] == pytest.approx(math.ceil(percentile * 1000), rel=HDR_PRECISION)
    assert float(footer["Mean"]) == pytest.approx(500.5, rel=HDR_PRECISION)
    assert float(footer["StdDeviation"]) == pytest.approx(288.7, rel=1e-2)  # in ms too
    assert float(footer["Max"]) == pytest.approx(1000, rel=HDR_PRECISION)
    assert footer["Total count"] == "1000"
    assert (footer["Buckets"], footer["SubBuckets"]) == ("16", "2048")


def test_hgrm_of_an_empty_histogram():
    rows, footer = parse_hgrm(hgrm({}))
    assert rows == [] and footer["Total count"] == "0"


def test_reset_starts_a_new_interval():
    totals, window = Totals(), LatencyWindow()
    worker = WorkerStats(CONFIG)
    serve(worker, "api", "api", [0.001] * 5)
    totals.update(0, worker.snapshot())

    before = window.interval(totals.total(), reset=True)
    assert hdr.total(before["routes"]["http-in/api"]) == 5  # the interval that just ended

    serve(worker, "api", "api", [0.2] * 3)
    totals.update(0, worker.snapshot())
    after = latency_json(window.interval(totals.total()))["routes"]["http-in/api"]
    assert after["count"] == 3 and after["p50"] == pytest.approx(200, rel=HDR_PRECISION)

    # A worker restart changes nothing: its counts were retired, not lost.
    totals.exited(0)
    restarted = WorkerStats(CONFIG)
    serve(restarted, "api", "api", [0.05])
    totals.update(0, restarted.snapshot())
    assert window.interval(totals.total())["routes"]["http-in/api"] == {
        hdr.index_of(200_000): 3, hdr.index_of(50_000): 1}


def test_a_route_added_again_after_a_reset_reports_what_it_holds():
    window = LatencyWindow()
    stats = WorkerStats(CONFIG)
    serve(stats, "api", "api", [0.001] * 5)
    window.interval(stats.snapshot(), reset=True)
    fresh = WorkerStats(CONFIG)  # as if the route had been removed and added back
    serve(fresh, "api", "api", [0.002] * 2)
    assert window.interval(fresh.snapshot())["routes"]["http-in/api"] == {hdr.index_of(2000): 2}
