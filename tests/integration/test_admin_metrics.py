"""The admin plane's telemetry: /metrics counts exactly what was sent, across a worker
restart; /stats/latency sees an upstream's 30 ms; /config shows the active config."""

from __future__ import annotations

import http.client
import json
import os
import signal

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .support import HOST, TinyOrigin, free_port, wait_for


@pytest.fixture
def origin():
    server = TinyOrigin(delay=0.03)  # every /slow request takes 30 ms at the origin
    yield server
    server.close()


def config(origin: TinyOrigin) -> dict:
    return {
        "node": {"id": "metrics-test"},
        "listeners": [{"name": "in", "address": f"{HOST}:{free_port()}", "protocol": "http",
                       "routes": [{"name": "slow", "match": {"prefix": "/slow"}, "cluster": "up"},
                                  {"name": "fast", "match": {"prefix": "/fast"}, "cluster": "up"}]}],
        "clusters": [{"name": "up", "endpoints": [f"{origin.address[0]}:{origin.address[1]}"]}],
    }


def send(proxy, path: str, count: int) -> None:
    conn = http.client.HTTPConnection(*proxy.address(), timeout=10)
    for _ in range(count):
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        assert response.status in (200, 404)
    conn.close()


def samples(proxy) -> dict[tuple[str, frozenset], float]:
    status, text = proxy.get("/metrics")
    assert status == 200
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def requests_total(metrics, route: str, code_class: str) -> float:
    key = ("meshproxy_requests_total",
           frozenset({"listener": "in", "route": route, "code_class": code_class}.items()))
    return metrics.get(key, 0.0)


def test_counters_are_exact_and_survive_a_worker_restart(meshproxy, origin):
    proxy = meshproxy(config(origin))
    send(proxy, "/fast/a", 40)
    send(proxy, "/nowhere", 3)
    metrics = samples(proxy)
    assert requests_total(metrics, "fast", "2xx") == 40
    assert requests_total(metrics, "", "4xx") == 3
    assert metrics[("meshproxy_errors_total",
                    frozenset({"listener": "in", "route": "", "code": "no_route"}.items()))] == 3
    pool = {labels: value for (name, labels), value in metrics.items() if name == "meshproxy_upstream_pool_total"}
    assert sum(pool.values()) == 40  # every proxied request took a pooled connection or opened one

    (worker,) = proxy.worker_pids()
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: proxy.worker_pids() and proxy.worker_pids() != [worker], timeout=10, what="a new worker")
    wait_for(lambda: proxy.ready_status() == 200, timeout=10, what="ready again")
    send(proxy, "/fast/b", 10)
    metrics = samples(proxy)
    assert requests_total(metrics, "fast", "2xx") == 50  # counted before the kill are kept
    assert metrics[("meshproxy_worker_restarts_total", frozenset())] == 1


def test_latency_report_sees_the_upstream_delay(meshproxy, origin):
    proxy = meshproxy(config(origin))
    send(proxy, "/slow/x", 30)
    status, body = proxy.get("/stats/latency?format=json")
    assert status == 200
    report = json.loads(body)
    slow = report["routes"]["in/slow"]
    assert slow["count"] == 30
    assert 29 <= slow["p50"] <= 45, slow
    assert 29 <= report["clusters"]["up"]["p50"] <= 45
    status, text = proxy.get("/stats/latency?format=hgrm&route=slow")
    assert status == 200 and "Total count    =           30]" in text
    # ?reset=1 ends the interval: the next one starts empty.
    proxy.get("/stats/latency?reset=1")
    assert json.loads(proxy.get("/stats/latency")[1])["routes"]["in/slow"]["count"] == 0


def test_config_endpoint_shows_the_active_config(meshproxy, origin):
    proxy = meshproxy(config(origin))
    status, body = proxy.get("/config")
    assert status == 200
    shown = json.loads(body)
    assert shown["version"] == 1 and len(shown["sha256"]) == 64
    assert shown["config"]["node"] == {"id": "metrics-test"}
    assert [r["name"] for r in shown["config"]["listeners"][0]["routes"]] == ["slow", "fast"]


def test_clusters_endpoint_counts_per_endpoint(meshproxy, origin):
    proxy = meshproxy(config(origin))
    send(proxy, "/fast/c", 7)
    status, body = proxy.get("/clusters")
    assert status == 200
    (cluster,) = json.loads(body)["clusters"]
    assert cluster["name"] == "up" and cluster["lb"] == "round_robin"
    (endpoint,) = cluster["endpoints"]
    assert endpoint["address"] == f"{origin.address[0]}:{origin.address[1]}"
    assert (endpoint["requests"], endpoint["errors"], endpoint["active_requests"]) == (7, 0, 0)
    assert cluster["pool_hits"] + cluster["pool_misses"] == 7


def test_http_listener_counts_its_bytes(meshproxy, origin):
    proxy = meshproxy(config(origin))
    conn = http.client.HTTPConnection(*proxy.address(), timeout=10)
    conn.request("GET", "/fast/bytes")
    response = conn.getresponse()
    body = response.read()
    conn.close()
    wait_for(lambda: samples(proxy).get(("meshproxy_downstream_bytes_total",
                                         frozenset({"listener": "in", "direction": "in"}.items())), 0) > 0,
             timeout=5, what="the connection's bytes counted")
    metrics = samples(proxy)
    received = metrics[("meshproxy_downstream_bytes_total", frozenset({"listener": "in", "direction": "in"}.items()))]
    sent = metrics[("meshproxy_downstream_bytes_total", frozenset({"listener": "in", "direction": "out"}.items()))]
    assert received >= len("GET /fast/bytes HTTP/1.1\r\n\r\n")
    assert sent > len(body)
