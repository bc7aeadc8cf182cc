"""HTTP/2 clients through meshproxy: to HTTP/1.1 and HTTP/2 upstreams, with real clients.

The proxy is meshproxy's real request path (`Http1Proxy`, its route table and clusters,
the HTTP/2 driver), run in-process by `h2_support.InProcessProxy`; the upstreams are the
scriptable HTTP/1.1 origin of `http_support` and the HTTP/2 origin of `h2_support`; the
clients are nghttp and h2load (nghttp2-client) where installed, and the `h2` library.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
import subprocess
import threading
import time

import pytest

from .h2_support import H2Client, H2Origin, InProcessProxy, pattern
from .http_support import Origin, chunked, cluster, delay, http_config, respond, route
from .support import free_port

NGHTTP = shutil.which("nghttp")
H2LOAD = shutil.which("h2load")


@pytest.fixture
def origin():
    server = Origin("h1")
    yield server
    server.close()


@pytest.fixture
def h2_origin():
    server = H2Origin()
    yield server
    server.close()


@pytest.fixture
def proxies():
    started: list[InProcessProxy] = []

    def start(config, **options) -> InProcessProxy:
        proxy = InProcessProxy(config, **options)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.close()


def _config(origin: Origin):
    routes = [route("api", "up", prefix="/")]
    return http_config(routes, [cluster("up", [origin])])


# -- HTTP/2 to HTTP/1.1 ------------------------------------------------------------------


def test_get_through_to_an_http1_origin(origin, proxies):
    proxy = proxies(_config(origin))
    client = H2Client(proxy.address)
    try:
        response = client.get("/hello?x=1", headers=[(b"x-forwarded-for", b"10.1.1.1"), (b"cookie", b"a=1"),
                                                      (b"cookie", b"b=2")])
    finally:
        client.close()
    assert response.status == 200
    seen = origin.wait_requests(1)[0]
    assert seen.method == "GET" and seen.target == "/hello?x=1" and seen.version == "HTTP/1.1"
    assert seen.header("host") == "test"
    assert seen.header("x-forwarded-for") == "10.1.1.1, 127.0.0.1"
    assert seen.header("x-forwarded-proto") == "http"
    assert seen.header("x-request-id")
    assert seen.header("cookie") == "a=1; b=2"
    body = json.loads(response.body)
    assert body["target"] == "/hello?x=1"


def test_post_bodies_both_framings(origin, proxies):
    proxy = proxies(_config(origin))
    client = H2Client(proxy.address)
    try:
        known = client.get("/a", method="POST", headers=[(b"content-length", b"5")], body=b"hello")
        # No content-length, body in pieces: goes chunked, unless it all came with the headers.
        sid = client.request("/b", method="POST", body=b"x" * 70000, end=False)
        client.send_body(sid, b"y" * 1000, end=True)
        streamed = client.wait(sid)
        empty = client.get("/c", method="POST")
    finally:
        client.close()
    assert known.status == streamed.status == empty.status == 200
    requests = {r.path: r for r in origin.wait_requests(3)}
    assert requests["/a"].body == b"hello" and requests["/a"].header("content-length") == "5"
    assert requests["/b"].body_length == 71000
    assert requests["/b"].chunked or requests["/b"].header("content-length") == "71000"
    assert requests["/c"].header("content-length") == "0"


def test_chunked_response_trailers_become_h2_trailers(origin, proxies):
    origin.on("/t", chunked([b"abc", b"defg"], trailers=[("grpc-status", "0"), ("x-sum", "7")]))
    proxy = proxies(_config(origin))
    client = H2Client(proxy.address)
    try:
        response = client.get("/t", headers=[(b"te", b"trailers")])
    finally:
        client.close()
    assert response.status == 200
    assert bytes(response.body) == b"abcdefg"
    assert (b"grpc-status", b"0") in response.trailers and (b"x-sum", b"7") in response.trailers
    assert response.header(b"transfer-encoding") is None


def test_large_response_under_flow_control(origin, proxies):
    size = 3 << 20
    origin.on("/big", respond(200, pattern(size)))
    proxy = proxies(_config(origin))
    client = H2Client(proxy.address)
    try:
        response = client.get("/big", timeout=30)
    finally:
        client.close()
    assert response.status == 200
    assert hashlib.sha256(response.body).hexdigest() == hashlib.sha256(pattern(size)).hexdigest()


def test_errors_are_local_replies_with_codes(origin, upstreams, proxies):
    refused = upstreams.refused()
    config = http_config([route("api", "up", prefix="/api"), route("down", "down", prefix="/down")],
                         [cluster("up", [origin]), cluster("down", [refused.address])])
    proxy = proxies(config)
    client = H2Client(proxy.address)
    try:
        missing = client.get("/nothing")
        down = client.get("/down")
        ok = client.get("/api")
    finally:
        client.close()
    assert missing.status == 404 and missing.header(b"x-meshproxy-error") == b"no_route"
    assert down.status == 502 and down.header(b"x-meshproxy-error") == b"connect_refused"
    assert ok.status == 200
    stats = proxy.stats.listeners["in"].routes
    assert stats[""].errors.get("no_route") == 1
    assert stats["down"].errors.get("connect_refused") == 1


def test_upstream_timeout_is_504(origin, proxies):
    origin.on("/slow", delay(3, respond(200, b"late")))
    config = http_config([route("api", "up", prefix="/", timeout="300ms")], [cluster("up", [origin])])
    proxy = proxies(config)
    client = H2Client(proxy.address)
    try:
        response = client.get("/slow")
    finally:
        client.close()
    assert response.status == 504 and response.header(b"x-meshproxy-error") == b"upstream_timeout"


def test_client_reset_stops_the_upstream_exchange(origin, proxies):
    origin.on("/slow", delay(5, respond(200, b"late")))
    proxy = proxies(_config(origin))
    client = H2Client(proxy.address)
    try:
        sid = client.request("/slow")
        deadline = time.monotonic() + 5
        while not origin.connections and time.monotonic() < deadline:
            client.pump(0.05)
        [upstream] = origin.connections
        client.conn.reset_stream(sid, 8)  # CANCEL
        client.flush()
        # The worker stops waiting at once and drops the connection mid-exchange (the
        # origin, asleep in its delay, would only notice later: peek for the FIN).
        assert _peer_closed_within(upstream.sock, 2)
        after = client.get("/fine")
    finally:
        client.close()
    assert after.status == 200
    assert client.responses[sid].status == 0  # nothing came back on the reset stream


def _peer_closed_within(sock: socket.socket, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"":
                return True
        except BlockingIOError:
            pass
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("bad", [
    [(b"Upper", b"x")],
    [(b"connection", b"keep-alive")],
    [(b"transfer-encoding", b"chunked")],
    [(b"te", b"gzip")],
    [(b"x-a", b"bar\r\ntransfer-encoding: chunked")],
    [(b"x-a", b" padded")],
    [(b"", b"empty-name")],
    [(b"host", b"other")],
], ids=["uppercase", "connection", "transfer-encoding", "te", "crlf", "whitespace", "empty-name",
        "host-mismatch"])
def test_malformed_requests_are_reset_and_never_forwarded(origin, proxies, bad):
    proxy = proxies(_config(origin))
    client = H2Client(proxy.address)
    try:
        sid = client.request("/smuggle", headers=bad)
        response = client.wait(sid)
        good = client.get("/after")  # the connection lives on
    finally:
        client.close()
    assert response.reset == 1  # PROTOCOL_ERROR
    assert good.status == 200
    assert [r.path for r in origin.wait_requests(1)] == ["/after"]


def test_content_length_mismatch_never_reaches_upstream(origin, proxies):
    proxy = proxies(_config(origin))
    client = H2Client(proxy.address)
    try:
        sid = client.request("/cl", method="POST", headers=[(b"content-length", b"0")],
                             body=b"GET /admin HTTP/1.1\r\nhost: x\r\n\r\n")
        client.wait_closed(5)
    finally:
        client.close()
    assert client.responses[sid].status != 200
    assert all(r.path != "/admin" for r in origin.requests)
    assert len(origin.requests) <= 1


@pytest.mark.skipif(NGHTTP is None, reason="nghttp (nghttp2-client) not installed")
def test_nghttp_client(origin, proxies, tmp_path):
    proxy = proxies(_config(origin))
    body = tmp_path / "body"
    body.write_bytes(b"z" * 100000)
    result = subprocess.run([NGHTTP, "-s", "-d", str(body), f"{proxy.url}/upload", f"{proxy.url}/second"],
                            capture_output=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    requests = {r.path: r for r in origin.wait_requests(2)}
    assert requests["/upload"].body_length == 100000
    assert requests["/upload"].method == "POST"


@pytest.mark.skipif(H2LOAD is None, reason="h2load (nghttp2-client) not installed")
def test_h2load_every_request_succeeds(origin, proxies):
    origin.on("/small", respond(200, b"x" * 100))
    proxy = proxies(_config(origin))
    result = subprocess.run([H2LOAD, "-n", "4000", "-c", "8", "-m", "10", f"{proxy.url}/small"],
                            capture_output=True, timeout=60, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", result.stdout)
    assert match, result.stdout
    total, done, succeeded, failed = map(int, match.groups())
    assert (total, done, succeeded, failed) == (4000, 4000, 4000, 0), result.stdout
    assert "4000 2xx" in result.stdout


# -- HTTP/2 to HTTP/2 --------------------------------------------------------------------


def _h2_config(h2_origin: H2Origin, **route_fields):
    return http_config([route("h2", "grpcish", prefix="/", **route_fields)],
                       [cluster("grpcish", [h2_origin.endpoint], protocol="http2")])


def test_h2_upstream_passes_trailers_and_bodies(h2_origin, proxies):
    proxy = proxies(_h2_config(h2_origin))
    client = H2Client(proxy.address)
    try:
        trailers = client.get("/trailers", headers=[(b"te", b"trailers")])
        echo = client.get("/echo", method="POST", body=b"q" * 200000, headers=[(b"content-type", b"text/x")])
        big = client.get("/big/2000000", timeout=30)
    finally:
        client.close()
    assert trailers.status == 200 and bytes(trailers.body) == b"hello"
    assert (b"x-checksum", b"abc") in trailers.trailers and (b"grpc-status", b"0") in trailers.trailers
    seen = json.loads(echo.body)
    assert seen["body_length"] == 200000
    names = [n for n, _ in seen["headers"]]
    assert "x-forwarded-for" in names and "x-request-id" in names
    assert bytes(big.body) == pattern(2000000)


def test_h2_upstream_streams_are_multiplexed(h2_origin, proxies):
    proxy = proxies(_h2_config(h2_origin))
    clients = [H2Client(proxy.address) for _ in range(4)]
    try:
        sids = [(c, [c.request(f"/slow/0.3?{i}") for i in range(20)]) for c in clients]
        results = [c.wait(sid) for c, ids in sids for sid in ids]
    finally:
        for c in clients:
            c.close()
    assert [(r.status, r.reset, r.header(b"x-meshproxy-error")) for r in results if r.status != 200] == []
    assert h2_origin.connections == 1  # 80 streams, one connection (the origin allows 100)
    assert h2_origin.max_concurrent > 40


def test_h2_upstream_reset_is_502_or_reset(h2_origin, proxies):
    proxy = proxies(_h2_config(h2_origin))
    client = H2Client(proxy.address)
    try:
        response = client.get("/reset")
        after = client.get("/fine")
    finally:
        client.close()
    assert response.status == 502 and response.header(b"x-meshproxy-error") == b"upstream_reset"
    assert after.status == 200


def test_drain_sends_goaway_and_finishes_open_streams(h2_origin, proxies):
    proxy = proxies(_h2_config(h2_origin))
    client = H2Client(proxy.address)
    try:
        sid = client.request("/slow/0.5")
        client.pump(0.1)
        threading.Timer(0.1, proxy.drain).start()
        response = client.wait(sid)
        assert response.status == 200
        assert client.wait_closed(5)
        assert client.goaway is not None and client.goaway.error_code == 0
    finally:
        client.close()


# -- HTTP/1.1 clients to HTTP/2 upstreams --------------------------------------------------


def _recv(sock: socket.socket) -> bytes:
    data = sock.recv(65536)
    assert data, "the proxy closed the connection"
    return data


def _read_chunked_response(sock: socket.socket) -> tuple[bytes, bytes, bytes]:
    """(head, body, trailer section) of one chunked HTTP/1.1 response."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += _recv(sock)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower(), head
    body = b""
    while True:
        while b"\r\n" not in rest:
            rest += _recv(sock)
        line, _, rest = rest.partition(b"\r\n")
        size = int(line, 16)
        if size == 0:
            while not (rest.startswith(b"\r\n") or b"\r\n\r\n" in rest):
                rest += _recv(sock)
            return head, body, rest.partition(b"\r\n\r\n")[0] if not rest.startswith(b"\r\n") else b""
        while len(rest) < size + 2:
            rest += _recv(sock)
        body += rest[:size]
        rest = rest[size + 2:]


def test_http1_clients_reach_an_h2_upstream(h2_origin, proxies):
    proxy = proxies(_h2_config(h2_origin))
    sock = socket.create_connection(proxy.address, timeout=10)
    try:
        sock.sendall(b"GET /json?x=1 HTTP/1.1\r\nHost: api.test\r\nX-Custom: yes\r\nConnection: keep-alive, x-hop\r\n"
                     b"X-Hop: dropped\r\n\r\n")
        head, body, _ = _read_chunked_response(sock)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"x-origin: h2" in head
        seen = json.loads(body)
        assert seen["path"] == "/json?x=1"
        fields = dict(seen["headers"])
        assert fields[":authority"] == "api.test" and fields["x-custom"] == "yes"
        assert "connection" not in fields and "x-hop" not in fields and "x-forwarded-for" in fields
        # A body with a length, on the same connection.
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: api.test\r\nContent-Length: 100000\r\n\r\n")
        sock.sendall(b"u" * 100000)
        _, body, _ = _read_chunked_response(sock)
        assert json.loads(body)["body_length"] == 100000
        # A chunked body whose trailers become HTTP/2 trailers.
        sock.sendall(b"POST /chunks HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-t: 1\r\n\r\n")
        _, body, _ = _read_chunked_response(sock)
        seen = json.loads(body)
        assert seen["body_length"] == 11 and seen["trailers"] == [["x-t", "1"]]
        # The upstream's trailers come back in the chunked trailer section.
        sock.sendall(b"GET /trailers HTTP/1.1\r\nHost: api.test\r\nTE: trailers\r\n\r\n")
        _, body, trailers = _read_chunked_response(sock)
        assert body == b"hello"
        assert b"x-checksum: abc" in trailers and b"grpc-status: 0" in trailers
    finally:
        sock.close()
    assert h2_origin.connections == 1


def test_http10_clients_of_an_h2_upstream_get_a_body_that_ends_with_the_connection(h2_origin, proxies):
    proxy = proxies(_h2_config(h2_origin))
    sock = socket.create_connection(proxy.address, timeout=10)
    try:
        sock.sendall(b"GET /old HTTP/1.0\r\nHost: api.test\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"chunked" not in head.lower()
    assert json.loads(body)["path"] == "/old"


def test_http1_client_to_an_unreachable_h2_cluster_gets_502(proxies):
    config = http_config([route("h2", "gone", prefix="/")],
                         [cluster("gone", [f"127.0.0.1:{free_port()}"], protocol="http2")])
    proxy = proxies(config)
    sock = socket.create_connection(proxy.address, timeout=10)
    try:
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: api.test\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
            data += chunk
    finally:
        sock.close()
    assert data.startswith(b"HTTP/1.1 502 ") and b"x-meshproxy-error: connect_refused" in data


def test_http1_client_to_a_resetting_h2_upstream_gets_502(h2_origin, proxies):
    proxy = proxies(_h2_config(h2_origin))
    sock = socket.create_connection(proxy.address, timeout=10)
    try:
        sock.sendall(b"GET /reset HTTP/1.1\r\nHost: api.test\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    assert data.startswith(b"HTTP/1.1 502 ") and b"x-meshproxy-error: upstream_reset" in data


@pytest.mark.skipif(H2LOAD is None, reason="h2load (nghttp2-client) not installed")
def test_every_slot_and_connection_comes_back_under_load(origin, proxies):
    """Answered at once by the reader or carried on by a worker (a slow answer), every
    stream gives back its circuit breaker slot and its upstream connection."""
    origin.on("/small", respond(200, b"x" * 100))
    origin.on("/late", delay(0.05, respond(200, b"late")))
    config = http_config([route("api", "up", prefix="/")],
                         [cluster("up", [origin], circuit_breaker={"max_requests": 100000})])
    proxy = proxies(config)
    result = subprocess.run([H2LOAD, "-n", "3000", "-c", "4", "-m", "10", f"{proxy.url}/small", f"{proxy.url}/late"],
                            capture_output=True, timeout=60, text=True, check=False)
    assert result.returncode == 0 and "3000 succeeded, 0 failed" in result.stdout, result.stdout
    up = proxy.proxy.clusters["up"]

    def settled() -> bool:
        pool = up.pools[0]
        # Connections stay in use while pooled; requests, pending connects and retries do not.
        return up.circuit.in_use[1:] == [0, 0, 0] and pool.active == 0 and pool.stats.active == 0

    deadline = time.monotonic() + 5
    while not proxy.call(settled) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proxy.call(settled), (up.circuit.in_use, up.pools[0].active, up.pools[0].stats.active)
