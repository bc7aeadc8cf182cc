"""Draining an HTTP listener: idle kept-alive connections close at once, a request in
flight finishes with `connection: close`, and the process exits well before drain_timeout."""

from __future__ import annotations

import http.client
import signal
import socket
import threading
import time

import pytest

from .support import HOST, free_port


class SlowOrigin:
    """HTTP/1.1 origin: /slow answers after `delay` seconds, anything else at once."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.server = socket.create_server((HOST, 0))
        self.address = self.server.getsockname()
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, data = data.partition(b"\r\n\r\n")
                if b" /slow" in head.split(b"\r\n", 1)[0]:
                    time.sleep(self.delay)
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    def close(self) -> None:
        self._stop = True
        self.server.close()


@pytest.fixture
def origin():
    server = SlowOrigin(delay=1.0)
    yield server
    server.close()


def http_config(origin: SlowOrigin) -> dict:
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
