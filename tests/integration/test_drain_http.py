"""Draining an HTTP listener: idle kept-alive connections close at once, a request in
flight finishes with `connection: close`, and the process exits well before drain_timeout."""

from __future__ import annotations

import http.client
import signal
import time

import pytest

from .support import HOST, TinyOrigin, free_port


@pytest.fixture
def origin():
    server = TinyOrigin(delay=1.0)
    yield server
    server.close()


def http_config(origin: TinyOrigin) -> dict:
    return {
        "workers": 1,
        "drain_timeout": "20s",
        "listeners": [{"name": "in", "address": f"{HOST}:{free_port()}", "protocol": "http",
                       "routes": [{"name": "all", "match": {"prefix": "/"}, "cluster": "up"}]}],
        "clusters": [{"name": "up", "endpoints": [f"{origin.address[0]}:{origin.address[1]}"]}],
    }


def test_drain_closes_idle_keepalive_and_finishes_the_request_in_flight(meshproxy, origin):
    proxy = meshproxy(http_config(origin))
    host, port = proxy.address()

    idle = http.client.HTTPConnection(host, port, timeout=10)
    idle.request("GET", "/warm")
    assert idle.getresponse().read() == b"ok"  # now an idle kept-alive connection

    busy = http.client.HTTPConnection(host, port, timeout=10)
    busy.request("GET", "/slow")
    time.sleep(0.2)  # the request is at the origin
    started = time.monotonic()
    proxy.send_signal(signal.SIGTERM)

    response = busy.getresponse()
    assert response.read() == b"ok"
    assert response.getheader("connection") == "close"

    # The idle connection was closed by the proxy: reading it sees EOF.
    idle.sock.settimeout(5)
    assert idle.sock.recv(1) == b""

    assert proxy.wait(timeout=15) == 0
    assert time.monotonic() - started < 5, "drain waited for idle connections"
