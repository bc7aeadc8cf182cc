"""Hot reload: PUT /config, POST /reload and SIGHUP apply a new version to every worker
while clients keep requests flowing, with none failing; a bad config changes nothing."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time

import pytest
import yaml

from .support import HOST, TinyOrigin, free_port, wait_for


@pytest.fixture
def origins():
    made = [TinyOrigin(b"blue"), TinyOrigin(b"green")]
    yield made
    for origin in made:
        origin.close()


def make_config(origins, port: int, version: int, extra_port: int | None = None) -> dict:
    """Version-dependent routing: /v{version} exists only in this version; odd versions
    send /app to blue, even ones to green."""
    blue, green = origins
    listeners = [{
        "name": "web", "address": f"{HOST}:{port}", "protocol": "http",
        "routes": [
            {"name": f"v{version}", "match": {"prefix": f"/v{version}"}, "cluster": "blue"},
            {"name": "app", "match": {"prefix": "/app"}, "cluster": "blue" if version % 2 else "green"},
            {"name": "split", "match": {"prefix": "/split"},
             "split": [{"cluster": "blue", "weight": version}, {"cluster": "green", "weight": 50}]},
        ],
    }]
    if extra_port is not None:
        listeners.append({"name": "extra", "address": f"{HOST}:{extra_port}", "protocol": "http",
                          "routes": [{"name": "all", "match": {"prefix": "/"}, "cluster": "green"}]})
    return {
        "node": {"id": "reload-test"},
        "workers": 2,
        "listeners": listeners,
        "clusters": [{"name": "blue", "endpoints": [blue.endpoint]},
                     {"name": "green", "endpoints": [green.endpoint]}],
    }


def put(proxy, config: dict) -> tuple[int, dict]:
    """PUT a config, keeping the admin section the running proxy was started with."""
    return admin(proxy, "PUT", "/config", yaml.safe_dump({**config, "admin": proxy.config["admin"]}).encode())


def admin(proxy, method: str, path: str, body: bytes = b"") -> tuple[int, dict]:
    conn = http.client.HTTPConnection(*proxy.admin, timeout=30)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class Load:
    """Keep-alive clients sending GET /app and /split until stopped; every failure is kept."""

    def __init__(self, port: int, clients: int = 6) -> None:
        self.port = port
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]
        for thread in self._threads:
            thread.start()

    def _run(self, i: int) -> None:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
        path = "/app" if i % 2 else "/split"
        while not self._stop.is_set():
            try:
                conn.request("GET", path)
                response = conn.getresponse()
                body = response.read()
                if response.status != 200 or body not in (b"blue", b"green"):
                    self.failures.append(f"{response.status} {body[:80]!r}")
                else:
                    self.ok += 1
                if response.getheader("connection") == "close":
                    conn.close()
                    conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
        conn.close()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)


@pytest.mark.slow
def test_thirty_reloads_under_load_fail_no_request(meshproxy, origins):
    port, extra = free_port(), free_port()
    proxy = meshproxy(make_config(origins, port, 1))
    load = Load(port)
    try:
        for version in range(2, 32):
            # Every third version adds a listener, the next one removes it again.
            extra_port = extra if version % 3 == 0 else None
            status, answer = put(proxy, make_config(origins, port, version, extra_port))
            assert (status, answer) == (200, {"version": version, "changed": True})
            # The change is in effect for the very next request, on every worker.
            for _ in range(4):
                assert get(port, f"/v{version}") == (200, b"blue")
                assert get(port, "/app")[1] == (b"blue" if version % 2 else b"green")
                assert get(port, f"/v{version - 1}")[0] == 404
            if extra_port is not None:
                assert get(extra, "/x") == (200, b"green")
            time.sleep(0.1)
    finally:
        load.stop()
    assert load.failures == [], load.failures[:10]
    assert load.ok > 200
    status, shown = admin(proxy, "GET", "/config")
    assert shown["version"] == 31


def test_bad_config_changes_nothing(meshproxy, origins):
    port = free_port()
    proxy = meshproxy(make_config(origins, port, 1))
    bad = make_config(origins, port, 2)
    bad["listeners"][0]["routes"][1]["cluster"] = "purple"
    bad["clusters"][0]["endpoints"] = []
    status, answer = put(proxy, bad)
    assert status == 400
    paths = {error["path"] for error in answer["errors"]}
    assert {"listeners[0].routes[1].cluster", "clusters[0].endpoints"} <= paths
    assert admin(proxy, "GET", "/config")[1]["version"] == 1
    assert get(port, "/v1") == (200, b"blue")
    # Changes that need a restart are refused the same way.
    status, answer = put(proxy, {**make_config(origins, port, 2), "workers": 3})
    assert status == 400 and answer["errors"][0]["path"] == "workers"
    metrics = proxy.get("/metrics")[1]
    assert 'meshproxy_config_reloads_total{result="failed"} 2.0' in metrics


def test_reload_from_file_and_sighup_and_restarted_worker(meshproxy, origins):
    port = free_port()
    proxy = meshproxy(make_config(origins, port, 1))
    proxy.config_path.write_text(yaml.safe_dump({**make_config(origins, port, 2), "admin": proxy.config["admin"]}))
    assert admin(proxy, "POST", "/reload") == (200, {"version": 2, "changed": True})
    assert get(port, "/v2") == (200, b"blue")

    proxy.config_path.write_text(yaml.safe_dump({**make_config(origins, port, 3), "admin": proxy.config["admin"]}))
    proxy.send_signal(signal.SIGHUP)
    wait_for(lambda: get(port, "/v3")[0] == 200, timeout=10, what="SIGHUP reload")

    # A worker killed now comes back on version 3, not the version it first started with.
    victim = proxy.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(proxy.worker_pids()) == 2 and victim not in proxy.worker_pids(),
             timeout=10, what="the worker restarted")
    for _ in range(20):
        assert get(port, "/v3") == (200, b"blue")
        assert get(port, "/v1")[0] == 404


def test_a_streaming_response_started_before_a_reload_finishes_on_the_old_config(meshproxy, origins):
    """A 2 s response from a cluster the reload removes still arrives whole; requests
    after the reload go where the new config says."""
    size, parts = 200_000, 20
    streamer = socket.create_server((HOST, 0))

    def stream() -> None:
        conn, _ = streamer.accept()
        with conn:
            while b"\r\n\r\n" not in conn.recv(65536):
                pass
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
            for _ in range(parts):
                conn.sendall(b"s" * (size // parts))
                time.sleep(0.1)

    threading.Thread(target=stream, daemon=True).start()
    port = free_port()
    config = make_config(origins, port, 1)
    config["clusters"].append({"name": "old", "endpoints": [f"{HOST}:{streamer.getsockname()[1]}"]})
    config["listeners"][0]["routes"].insert(0, {"name": "stream", "match": {"prefix": "/stream"}, "cluster": "old"})
    proxy = meshproxy(config)
    try:
        client = http.client.HTTPConnection(HOST, port, timeout=10)
        client.request("GET", "/stream")
        response = client.getresponse()
        first = response.read(10_000)
        # Reload: the route and its cluster are gone, /stream now falls through to 404.
        assert put(proxy, make_config(origins, port, 2)) == (200, {"version": 2, "changed": True})
        assert get(port, "/stream")[0] == 404
        rest = response.read()
        assert len(first) + len(rest) == size and set(first + rest) == {ord("s")}
        client.close()
    finally:
        streamer.close()


def test_a_request_in_flight_survives_a_reload_that_removes_its_route(meshproxy, origins):
    slow = TinyOrigin(b"slow", delay=1.0)
    try:
        port = free_port()
        config = make_config(origins, port, 1)
        config["clusters"].append({"name": "slowpoke", "endpoints": [slow.endpoint]})
        config["listeners"][0]["routes"].insert(0, {"name": "slow", "match": {"prefix": "/slow"},
                                                    "cluster": "slowpoke"})
        proxy = meshproxy({**config, "workers": 1})
        (worker,) = proxy.worker_pids()
        result: list[tuple[int, bytes]] = []
        thread = threading.Thread(target=lambda: result.append(get(port, "/slow/x")))
        thread.start()
        time.sleep(0.3)  # the request waits at the origin
        assert put(proxy, {**make_config(origins, port, 2), "workers": 1})[0] == 200
        thread.join(10)
        assert result == [(200, b"slow")]
        assert get(port, "/slow/x")[0] == 404
        time.sleep(0.3)
        assert proxy.worker_pids() == [worker], proxy.log()[-3000:]  # the worker did not die
        assert "Traceback" not in proxy.log()
    finally:
        slow.close()
