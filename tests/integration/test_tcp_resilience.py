"""A tcp listener's cluster keeps traffic off bad endpoints as an http one does: active
health checks and the circuit breaker's connection limit apply to L4 connections too."""

from __future__ import annotations

import json
import socket
import time

from .support import endpoint, tcp_config


def echo_once(address: tuple[str, int], payload: bytes = b"ping") -> bytes:
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        return data


def clusters(proxy) -> dict:
    status, text = proxy.get("/clusters")
    assert status == 200, text
    return json.loads(text)["clusters"][0]


def test_health_checks_keep_connections_off_a_dead_endpoint(meshproxy, upstreams):
    good = upstreams.echo()
    dead = upstreams.refused()
    config = tcp_config([endpoint(good.address), endpoint(dead.address)])
    config["clusters"][0]["health_check"] = {"tcp": True, "interval": "200ms", "timeout": "200ms",
                                             "unhealthy_threshold": 1, "healthy_threshold": 1}
    proxy = meshproxy(config)
    deadline = time.monotonic() + 5
    while True:  # until the first checks decided (before that, panic routing uses both)
        seen = clusters(proxy)["endpoints"]
        if seen[1]["health"] == "unhealthy" or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert seen[1]["health"] == "unhealthy", seen
    before = good.accepted
    for _ in range(20):
        assert echo_once(proxy.address()) == b"ping"
    assert good.accepted - before == 20  # every connection went to the healthy endpoint
    assert clusters(proxy)["connect_failures"] == 0


def test_the_breaker_limits_upstream_connections(meshproxy, upstreams):
    server = upstreams.echo()
    config = tcp_config([endpoint(server.address)])
    config["clusters"][0]["circuit_breaker"] = {"max_connections": 2}
    proxy = meshproxy(config)
    held = [socket.create_connection(proxy.address(), timeout=5) for _ in range(2)]
    try:
        for sock in held:  # both relayed: each holds an upstream connection
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
        with socket.create_connection(proxy.address(), timeout=5) as third:
            third.sendall(b"y")
            try:
                answer = third.recv(1)
            except ConnectionResetError:  # closed with our byte unread: a reset
                answer = b""
            assert answer == b""  # closed at once: no upstream connection allowed
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while True:  # the slots come back when the held connections end
        try:
            if echo_once(proxy.address(), b"z") == b"z":
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, "the breaker never let connections through again"
        time.sleep(0.05)
