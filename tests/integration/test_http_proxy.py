"""The HTTP/1.1 reverse proxy end to end: real clients (curl, http.client, raw sockets),
a meshproxy process, and scriptable origins started by the test (`http_support.Origin`).

Covers routing, weighted splits and endpoint weights, what the proxy adds and removes on
the way (hop-by-hop fields, X-Forwarded-*, X-Request-Id), bodies both ways in every
framing, keep-alive and pipelining, Expect: 100-continue, upgrades and CONNECT tunnels,
the errors a client sees (status + `x-meshproxy-error`), and failures mid-exchange
(upstreams and clients that break off, stray upstream bytes, the idle-pool race).

Most tests share one proxy per module (`site`, which fails a test during which the
worker died); a test that needs its own config, or that could leave the shared proxy in
a bad state when the product misbehaves, starts its own with `meshproxy`.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from proxy.upstream.pool import MAX_IDLE_PER_ENDPOINT

from .http_support import (
    Origin,
    Origins,
    RawClient,
    RssWatch,
    blocks,
    blocks_sha256,
    break_mid_body,
    build_request,
    chunked,
    close_before_response,
    cluster,
    connect_echo,
    curl,
    curl_sha256,
    delay,
    http_config,
    no_body,
    raw,
    request,
    respond,
    route,
    simple_config,
    slow_body,
    start_shared_proxy,
    stream,
    until_close,
    upgrade_echo,
)
from .support import pattern, wait_for

MiB = 1 << 20
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"}


def names(headers) -> set[str]:
    return {name.lower() for name, _ in headers}


def single_worker(proxy) -> int:
    pids = proxy.worker_pids()
    assert len(pids) == 1, pids
    return pids[0]


class Site:
    """A proxy shared by a module's tests: `main` behind every path, `idle` (an origin
    that closes idle keep-alive connections after 30 ms) behind /idle/, and a route
    with a 400 ms timeout for /short/. Tests register their own paths on `main`."""

    def __init__(self, proxy, main: Origin, idle: Origin) -> None:
        self.proxy = proxy
        self.main = main
        self.idle = idle
        self.pid = single_worker(proxy)
        self._accepted = 0

    def address(self) -> tuple[str, int]:
        return self.proxy.address()

    def begin(self) -> None:
        self.main.reset()
        self.idle.reset()
        self._accepted = self.main.accepted
        self._log_at = len(self.proxy.log())

    def new_log(self) -> str:
        """What the proxy logged during this test."""
        return self.proxy.log()[self._log_at:]

    def new_connections(self) -> int:
        """Connections the proxy opened to `main` during this test."""
        return self.main.accepted - self._accepted


@pytest.fixture(scope="module")
def shared_site(tmp_path_factory):
    main, idle = Origin("main"), Origin("idle", idle_close=0.03)
    config = http_config(
        [route("short", "main", prefix="/short/", timeout="400ms"),
         route("idle", "idle", prefix="/idle/"),
         route("all", "main", prefix="/")],
        [cluster("main", [main]), cluster("idle", [idle])],
    )
    proxy = start_shared_proxy(config, tmp_path_factory.mktemp("http-proxy"))
    yield Site(proxy, main, idle)
    proxy.kill()
    main.close()
    idle.close()


@pytest.fixture
def site(shared_site):
    """The shared proxy, its origins' records cleared; fails the test that kills the worker."""
    shared_site.begin()
    yield shared_site
    before, pids = shared_site.pid, shared_site.proxy.worker_pids()
    if pids != [before]:
        shared_site.proxy.wait_ready(workers=1)
        shared_site.pid = single_worker(shared_site.proxy)
        pytest.fail(f"the worker died during this test (pid {before}, now {pids})")
    logged = shared_site.new_log()
    if "Traceback" in logged:
        pytest.fail(f"the proxy logged a traceback during this test:\n{logged[-3000:]}")


@pytest.fixture
def origins():
    """`origins("name", idle_close=...)` starts an Origin; all are closed after the test."""
    factory = Origins()
    yield factory
    factory.close()


# -- routing ---------------------------------------------------------------------------------

ROUTED = ("exact", "canary", "api_host", "wildcard", "writes", "api", "first", "second", "default")


@pytest.fixture(scope="module")
def routing(tmp_path_factory):
    """One proxy whose routes exercise every match condition, one origin per cluster."""
    servers = {name: Origin(name) for name in ROUTED}
    config = http_config(
        [
            route("exact", "exact", path="/exact"),
            route("canary", "canary", prefix="/api", headers={"x-canary": "1"}, methods=["GET"]),
            route("api-host", "api_host", prefix="/api", host="api.example.com"),
            route("wildcard", "wildcard", prefix="/", host="*.example.com"),
            route("writes", "writes", prefix="/submit", methods=["POST", "PUT"]),
            route("api", "api", prefix="/api"),
            route("first", "first", prefix="/twice"),
            route("second", "second", prefix="/twice"),
            route("default", "default", prefix="/"),
        ],
        [cluster(name, [origin]) for name, origin in servers.items()],
    )
    proxy = start_shared_proxy(config, tmp_path_factory.mktemp("routing"))
    yield proxy
    proxy.kill()
    for origin in servers.values():
        origin.close()


ROUTING_CASES = [
    # (method, target, Host, extra headers, cluster that must answer)
    ("GET", "/exact", "example.com", [], "exact"),
    ("GET", "/exact?x=1", "example.com", [], "exact"),  # the query is not part of the path
    ("GET", "/exact/", "example.com", [], "default"),
    ("GET", "/exactly", "example.com", [], "default"),
    ("GET", "/api/users", "example.com", [("X-Canary", "1")], "canary"),
    ("GET", "/api/users", "example.com", [("x-canary", "2")], "api"),
    ("POST", "/api/users", "example.com", [("x-canary", "1")], "api"),  # canary is GET only
    ("GET", "/api/users", "example.com", [], "api"),
    ("GET", "/apis", "example.com", [], "api"),  # a plain string prefix
    ("GET", "/ap", "example.com", [], "default"),
    ("GET", "/api/x", "api.example.com", [], "api_host"),
    ("GET", "/api/x", "API.Example.COM:8080", [], "api_host"),  # case and port ignored
    ("GET", "/api/x", "api.example.com", [("x-canary", "1")], "canary"),  # first match wins
    ("GET", "/anything", "foo.example.com", [], "wildcard"),
    ("GET", "/anything", "a.b.example.com:81", [], "wildcard"),
    ("GET", "/anything", "example.com", [], "default"),  # *.example.com needs a subdomain
    ("GET", "/anything", "fooexample.com", [], "default"),
    ("POST", "/submit", "example.com", [], "writes"),
    ("PUT", "/submit/1", "example.com", [], "writes"),
    ("GET", "/submit", "example.com", [], "default"),
    ("GET", "/twice", "example.com", [], "first"),  # two equal routes: the first one
    ("GET", "/", "example.com", [], "default"),
]


@pytest.mark.parametrize(("method", "target", "host", "headers", "expected"), ROUTING_CASES,
                         ids=[f"{c[0]} {c[2]}{c[1]} {c[3]}" for c in ROUTING_CASES])
def test_route_matching(routing, method, target, host, headers, expected):
    body = b"payload" if method in ("POST", "PUT") else None
    response = request(routing.address(), method, target, headers, body, host=host)
    assert response.status == 200, response
    seen = response.json()
    assert seen["origin"] == expected
    assert seen["method"] == method and seen["target"] == target


def test_absolute_form_target_routes_on_its_authority(routing):
    """RFC 9112 3.2.2: the target's authority wins over Host; it goes upstream as Host."""
    response = request(routing.address(), "GET", "http://foo.example.com/x?y=1", host="other.test")
    assert response.status == 200, response
    seen = response.json()
    assert seen["origin"] == "wildcard"
    assert seen["target"] == "/x?y=1"
    assert [v for n, v in seen["headers"] if n.lower() == "host"] == ["foo.example.com"]


def test_no_route_is_404_with_its_code_and_the_connection_stays_usable(meshproxy, origins):
    origin = origins()
    proxy = meshproxy(http_config([route("api", "up", prefix="/api")], [cluster("up", [origin])]))
    with RawClient(proxy.address()) as client:
        client.request("GET", "/nope", [("X-Request-Id", "req-42")])
        response = client.read_response()
        assert response.status == 404
        assert response.error_code == "no_route"
        assert response.header("x-request-id") == "req-42"
        # A GET without a body leaves the connection in a known state: it goes on.
        client.request("GET", "/api/ok")
        assert client.read_response().status == 200
    assert [r.target for r in origin.requests] == ["/api/ok"]
    with RawClient(proxy.address()) as client:
        client.request("POST", "/nope", body=b"a body nobody reads")
        response = client.read_response()
        assert response.status == 404 and response.error_code == "no_route"
        assert response.closes  # the unread body leaves no known message boundary
        assert client.wait_closed(5) in ("eof", "reset")
    assert [r.target for r in origin.requests] == ["/api/ok"]


# -- splits and weights ----------------------------------------------------------------------


def _hammer(address, target: str, total: int, clients: int, headers=()) -> Counter[bytes]:
    """`total` GETs over `clients` keep-alive connections in threads; counts the bodies."""
    counts: Counter[bytes] = Counter()
    errors: list[Exception] = []
    lock = threading.Lock()
    payload = build_request("GET", target, headers)

    def run(n: int) -> None:
        mine: Counter[bytes] = Counter()
        try:
            with RawClient(address, timeout=10) as client:
                for _ in range(n):
                    client.send(payload)
                    response = client.read_response()
                    assert response.status == 200, response
                    mine[response.body] += 1
        except Exception as exc:  # noqa: BLE001 - re-raised by the test thread
            errors.append(exc)
        with lock:
            counts.update(mine)

    threads = [threading.Thread(target=run, args=(total // clients,)) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors[0]
    assert sum(counts.values()) == total // clients * clients
    return counts


def test_split_10_90_holds_within_2_percent_over_10000_requests(meshproxy, origins):
    v1, v2 = origins("v1").on("/", respond(body=b"v1")), origins("v2").on("/", respond(body=b"v2"))
    config = http_config(
        [route("canary", split=[("v2", 10), ("v1", 90)], prefix="/")],
        [cluster("v1", [v1]), cluster("v2", [v2])],
    )
    proxy = meshproxy(config)
    started = time.monotonic()
    counts = _hammer(proxy.address(), "/", 10_000, clients=8)
    elapsed = time.monotonic() - started
    share = counts[b"v2"] / 10_000
    assert 0.08 <= share <= 0.12, counts
    assert v1.request_count + v2.request_count == 10_000
    assert elapsed < 30, f"10,000 keep-alive requests took {elapsed:.1f}s"


def test_three_way_split(meshproxy, origins):
    servers = {n: origins(n).on("/", respond(body=n.encode())) for n in ("a", "b", "c")}
    config = http_config(
        [route("ab", split=[("a", 50), ("b", 30), ("c", 20)], prefix="/")],
        [cluster(n, [o]) for n, o in servers.items()],
    )
    proxy = meshproxy(config)
    counts = _hammer(proxy.address(), "/", 4000, clients=4)
    for name, want in (("a", 0.5), ("b", 0.3), ("c", 0.2)):
        assert abs(counts[name.encode()] / 4000 - want) < 0.04, counts


def test_endpoint_weights_with_random_balancing(meshproxy, origins):
    light, heavy = origins("light").on("/", respond(body=b"light")), origins("heavy").on("/", respond(body=b"heavy"))
    config = http_config(
        [route("all", "up")],
        [cluster("up", [light.endpoint, {"address": heavy.endpoint, "weight": 3}], lb="random")],
    )
    proxy = meshproxy(config)
    counts = _hammer(proxy.address(), "/", 4000, clients=4)
    assert abs(counts[b"heavy"] / 4000 - 0.75) < 0.03, counts


# -- what goes upstream ----------------------------------------------------------------------


def test_hop_by_hop_request_fields_are_removed_and_the_rest_kept_in_order(site):
    origin, proxy = site.main, site.proxy
    headers = [
        ("Connection", "keep-alive, X-Secret, x-other-secret"),
        ("X-Secret", "s1"),
        ("X-Other-Secret", "s2"),
        ("Keep-Alive", "timeout=5"),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"),
        ("Trailer", "X-Checksum"),
        ("Upgrade", "h2c"),  # without "upgrade" in Connection: just a hop-by-hop field
        ("X-Dup", "first"),
        ("Accept", "*/*"),
        ("X-Dup", "second"),
        ("Cookie", "a=1"),
        ("Cookie", "b=2"),
    ]
    response = request(proxy.address(), "GET", "/h", headers)
    assert response.status == 200
    seen = origin.requests[-1]
    forwarded = names(seen.headers)
    assert not forwarded & (HOP_BY_HOP | {"x-secret", "x-other-secret"}), seen.headers
    end_to_end = [(n.lower(), v) for n, v in seen.headers if n.lower() in ("x-dup", "accept", "cookie")]
    assert end_to_end == [("x-dup", "first"), ("accept", "*/*"), ("x-dup", "second"),
                          ("cookie", "a=1"), ("cookie", "b=2")]
    assert seen.version == "HTTP/1.1"


def test_hop_by_hop_response_fields_are_removed(site):
    origin, proxy = site.main, site.proxy
    origin.on("/r", respond(body=b"ok", headers=[
        ("Connection", "X-Resp-Secret"),
        ("X-Resp-Secret", "1"),
        ("Keep-Alive", "timeout=5, max=100"),
        ("Proxy-Connection", "keep-alive"),
        ("TE", "trailers"),
        ("Trailer", "X-T"),
        ("Upgrade", "foo"),
        ("X-End", "kept"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
    ]))
    with RawClient(proxy.address()) as client:
        client.request("GET", "/r")
        response = client.read_response()
        assert response.status == 200 and response.body == b"ok"
        assert not names(response.headers) & (HOP_BY_HOP | {"x-resp-secret"}), response.headers
        assert response.header("x-end") == "kept"
        assert response.header_all("set-cookie") == ["a=1", "b=2"]
        # Keep-alive still holds on both sides.
        client.request("GET", "/r")
        assert client.read_response().body == b"ok"
    assert site.new_connections() <= 1


def test_forwarded_for_proto_and_request_id(site):
    proxy = site.proxy
    address = proxy.address()

    plain = request(address, "GET", "/a").json()
    assert [v for n, v in plain["headers"] if n.lower() == "x-forwarded-for"] == ["127.0.0.1"]
    assert [v for n, v in plain["headers"] if n.lower() == "x-forwarded-proto"] == ["http"]
    generated = [v for n, v in plain["headers"] if n.lower() == "x-request-id"]
    assert len(generated) == 1 and len(generated[0]) >= 16

    chained = request(address, "GET", "/b", [("X-Forwarded-For", "203.0.113.7"),
                                            ("X-Forwarded-Proto", "https"),
                                            ("X-Request-Id", "abc-123")]).json()
    headers = [(n.lower(), v) for n, v in chained["headers"]]
    assert [v for n, v in headers if n == "x-forwarded-for"] == ["203.0.113.7, 127.0.0.1"]
    assert [v for n, v in headers if n == "x-forwarded-proto"] == ["http"]  # ours, not the client's
    assert [v for n, v in headers if n == "x-request-id"] == ["abc-123"]

    again = request(address, "GET", "/c").json()
    other = [v for n, v in again["headers"] if n.lower() == "x-request-id"]
    assert other and other != generated


def test_forwarded_for_over_several_field_lines_keeps_every_hop(site):
    """RFC 9110 5.3: repeated field lines are one comma-separated list; appending the
    client must not drop the hops named on the later lines."""
    proxy = site.proxy
    seen = request(proxy.address(), "GET", "/", [("X-Forwarded-For", "198.51.100.1"),
                                                ("X-Forwarded-For", "198.51.100.2")]).json()
    values = [v for n, v in seen["headers"] if n.lower() == "x-forwarded-for"]
    hops = [h.strip() for v in values for h in v.split(",")]
    assert hops == ["198.51.100.1", "198.51.100.2", "127.0.0.1"], values


def test_forwarded_for_is_the_real_peer_address(site):
    seen = request(site.address(), "GET", "/peer", source="127.0.0.7").json()
    assert [v for n, v in seen["headers"] if n.lower() == "x-forwarded-for"] == ["127.0.0.7"]


def test_status_and_reason_pass_through(site):
    origin, proxy = site.main, site.proxy
    origin.on("/odd", respond(299, b"x", reason="Custom Thing")).on("/teapot", respond(418, b"t"))
    with RawClient(proxy.address()) as client:
        client.request("GET", "/odd")
        response = client.read_response()
        assert (response.status, response.reason, response.body) == (299, "Custom Thing", b"x")
        client.request("GET", "/teapot")
        response = client.read_response()
        assert (response.status, response.body) == (418, b"t")
        assert response.error_code is None  # the origin's error, not the proxy's


# -- bodies ----------------------------------------------------------------------------------


def test_post_1_mib_with_content_length_http_client(site):
    proxy = site.proxy
    body = pattern(MiB, seed=11)
    conn = http.client.HTTPConnection(*proxy.address(), timeout=10)
    try:
        conn.request("POST", "/upload", body=body, headers={"Content-Type": "application/octet-stream"})
        response = conn.getresponse()
        seen = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == 200
    assert seen["body_length"] == MiB
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert not seen["chunked"]
    assert [v for n, v in seen["headers"] if n.lower() == "content-length"] == [str(MiB)]


def test_post_chunked_upload_with_curl(site, tmp_path: Path):
    proxy = site.proxy
    body = pattern(MiB + 123, seed=12)
    (tmp_path / "body").write_bytes(body)
    host, port = proxy.address()
    done = curl("-H", "Transfer-Encoding: chunked", "--data-binary", f"@{tmp_path / 'body'}",
                f"http://{host}:{port}/chunked-upload")
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["chunked"] is True
    assert seen["body_length"] == len(body)
    assert seen["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert "content-length" not in names(seen["headers"])


def test_chunked_request_extensions_and_trailers_reach_the_origin(site):
    origin, proxy = site.main, site.proxy
    body = (b"5;name=value\r\nhello\r\n"
            b"6;quoted=\"a b;c\"\r\n world\r\n"
            b"0\r\nX-Checksum: 42\r\n\r\n")
    with RawClient(proxy.address()) as client:
        client.send(build_request("POST", "/t", [("Transfer-Encoding", "chunked")]) + body)
        response = client.read_response()
    assert response.status == 200
    seen = origin.requests[-1]
    assert seen.body == b"hello world"
    assert seen.chunk_lines == ["5;name=value", '6;quoted="a b;c"', "0"]
    assert seen.trailers == [("X-Checksum", "42")]


def test_request_body_streams_to_the_origin_before_it_is_complete(site):
    origin, proxy = site.main, site.proxy
    with RawClient(proxy.address()) as client:
        client.send(build_request("POST", "/s", [("Content-Length", str(2 * MiB))]) + b"a" * MiB)
        # The origin sees the head and the first half while the client holds the rest.
        wait_for(lambda: origin.bytes_received > MiB, timeout=5, what="the first half at the origin")
        assert origin.request_count == 0
        client.send(b"b" * MiB)
        response = client.read_response()
    assert response.status == 200
    assert response.json()["body_sha256"] == hashlib.sha256(b"a" * MiB + b"b" * MiB).hexdigest()


def test_response_body_streams_to_the_client_before_it_is_complete(site):
    body = pattern(64 * 1024, seed=3)
    origin, proxy = site.main, site.proxy
    origin.on("/slow", slow_body(body, pieces=8, interval=0.15))
    with RawClient(proxy.address()) as client:
        started = time.monotonic()
        client.request("GET", "/slow")
        head = client.read_head()
        head_after = time.monotonic() - started
        assert head.status == 200 and head.header("content-length") == str(len(body))
        rest, complete = client.take(len(body))
        total = time.monotonic() - started
    assert complete and rest == body
    assert head_after < 0.6 < total, (head_after, total)


def test_download_1_mib_content_length_http_client(site):
    body = pattern(MiB, seed=21)
    origin, proxy = site.main, site.proxy
    origin.on("/file", respond(body=body))
    conn = http.client.HTTPConnection(*proxy.address(), timeout=10)
    try:
        for _ in range(3):  # on one kept-alive connection
            conn.request("GET", "/file")
            response = conn.getresponse()
            assert response.status == 200
            assert response.read() == body
    finally:
        conn.close()
    assert site.new_connections() <= 1


def test_chunked_response_with_trailers_reaches_the_client_framed(site):
    origin, proxy = site.main, site.proxy
    origin.on("/chunked-trailers", chunked([b"hello", b" ", b"world" * 1000], trailers=[("X-Digest", "abc")],
                                        extensions=[";a=1", "", ""]))
    with RawClient(proxy.address()) as client:
        client.request("GET", "/chunked-trailers", [("TE", "trailers")])
        response = client.read_response()
        assert response.status == 200
        assert response.header("transfer-encoding") == "chunked"
        assert response.body == b"hello " + b"world" * 1000
        assert response.trailers == [("X-Digest", "abc")]
        assert response.chunk_lines[0] == b"5;a=1"
        assert response.complete
        client.request("GET", "/chunked-trailers")  # the connection is still in step
        assert client.read_response().trailers == [("X-Digest", "abc")]


def test_until_close_response_is_passed_on_and_the_client_connection_closed(site):
    body = pattern(300_000, seed=4)
    origin, proxy = site.main, site.proxy
    origin.on("/eof", until_close(body))
    with RawClient(proxy.address()) as client:
        client.request("GET", "/eof")
        response = client.read_response()
        assert response.status == 200
        assert response.closes, response.headers  # the only way the client can find the end
        assert response.body == body
        assert client.eof == "eof"


def test_100_mib_download_with_curl_is_byte_exact(site):
    size = 100 * MiB
    origin, proxy = site.main, site.proxy
    origin.on("/big", stream(size, seed=5)).on("/big-chunked", stream(size, seed=6, chunked_body=True))
    host, port = proxy.address()
    assert curl_sha256(f"http://{host}:{port}/big")[:2] == (size, blocks_sha256(size, 5))
    assert curl_sha256(f"http://{host}:{port}/big-chunked")[:2] == (size, blocks_sha256(size, 6))


def test_100_mib_upload_with_curl_is_byte_exact(site, tmp_path: Path):
    size = 100 * MiB
    proxy = site.proxy
    path = tmp_path / "upload"
    with open(path, "wb") as file:
        file.writelines(blocks(size, seed=7))
    host, port = proxy.address()
    done = curl("--data-binary", f"@{path}", "-H", "Content-Type: application/octet-stream",
                f"http://{host}:{port}/up", timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert (seen["body_length"], seen["body_sha256"]) == (size, blocks_sha256(size, 7))
    done = curl("-H", "Transfer-Encoding: chunked", "--data-binary", f"@{path}",
                f"http://{host}:{port}/up-chunked", timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert (seen["body_length"], seen["body_sha256"], seen["chunked"]) == (size, blocks_sha256(size, 7), True)


GiB = 1 << 30
RSS_GROWTH_LIMIT = 200 * MiB


@pytest.mark.slow
def test_1_gib_download_keeps_the_worker_rss_bounded(site):
    site.main.on("/huge", stream(GiB, seed=8))
    proxy = site.proxy
    watch = RssWatch(single_worker(proxy))
    host, port = proxy.address()
    received, digest, _ = curl_sha256(f"http://{host}:{port}/huge", timeout=120)
    growth = watch.stop()
    assert (received, digest) == (GiB, blocks_sha256(GiB, 8))
    assert growth < RSS_GROWTH_LIMIT, f"worker RSS grew {growth / MiB:.0f} MiB"


@pytest.mark.slow
def test_1_gib_upload_keeps_the_worker_rss_bounded(site):
    proxy = site.proxy
    watch = RssWatch(single_worker(proxy))
    with RawClient(proxy.address(), timeout=120) as client:
        client.send(build_request("POST", "/huge-up", [("Content-Length", str(GiB))]))
        for block in blocks(GiB, seed=9):
            client.send(block)
        response = client.read_response()
    growth = watch.stop()
    assert response.status == 200
    seen = response.json()
    assert (seen["body_length"], seen["body_sha256"]) == (GiB, blocks_sha256(GiB, 9))
    assert growth < RSS_GROWTH_LIMIT, f"worker RSS grew {growth / MiB:.0f} MiB"


# -- framing without a body ------------------------------------------------------------------


def test_head_204_and_304_carry_no_body_and_keep_the_connection_in_step(site):
    origin, proxy = site.main, site.proxy
    (origin.on("/head", no_body(200, [("Content-Length", "1000"), ("X-Kind", "head")]))
           .on("/empty", no_body(204, [("X-Kind", "204")]))
           .on("/cached", no_body(304, [("ETag", '"v1"'), ("Content-Length", "50")])))
    with RawClient(proxy.address()) as client:
        client.request("HEAD", "/head")
        response = client.read_response("HEAD")
        assert (response.status, response.header("content-length"), response.header("x-kind")) == (200, "1000", "head")
        client.request("GET", "/empty")
        assert client.read_response().status == 204
        client.request("GET", "/cached", [("If-None-Match", '"v1"')])
        response = client.read_response()
        assert (response.status, response.header("etag")) == (304, '"v1"')
        # Nothing stray follows any of them: the next response is the next request's.
        client.request("GET", "/after")
        response = client.read_response()
        assert response.status == 200 and response.json()["target"] == "/after"
        assert client.is_open()
    assert [r.method for r in origin.requests] == ["HEAD", "GET", "GET", "GET"]
    assert site.new_connections() <= 1


# -- keep-alive and pipelining ---------------------------------------------------------------


def test_curl_reuses_its_connection_with_next(site):
    origin, proxy = site.main, site.proxy
    host, port = proxy.address()
    done = curl("-o", "/dev/null", "-w", "%{num_connects}\n", f"http://{host}:{port}/one",
                "--next", "-o", "/dev/null", "-w", "%{num_connects}\n", f"http://{host}:{port}/two",
                "--next", "-o", "/dev/null", "-w", "%{num_connects}\n", f"http://{host}:{port}/three")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [b"1", b"0", b"0"]
    assert [r.target for r in origin.requests] == ["/one", "/two", "/three"]
    assert site.new_connections() <= 1  # the upstream side was kept alive too


def test_upstream_connections_are_pooled_across_client_connections(site):
    origin, proxy = site.main, site.proxy
    for i in range(20):
        assert request(proxy.address(), "GET", f"/{i}").status == 200
    assert origin.request_count == 20
    assert site.new_connections() <= 1


def test_http_client_keep_alive_many_requests_one_connection(site):
    proxy = site.proxy
    conn = http.client.HTTPConnection(*proxy.address(), timeout=10)
    try:
        conn.connect()
        sock = conn.sock
        for i in range(50):
            conn.request("POST" if i % 2 else "GET", f"/k{i}", body=b"x" * i if i % 2 else None)
            response = conn.getresponse()
            assert response.status == 200
            seen = json.loads(response.read())
            assert seen["target"] == f"/k{i}"
            assert conn.sock is sock  # never reconnected
    finally:
        conn.close()


def test_pipelined_requests_are_answered_in_order(site):
    origin, proxy = site.main, site.proxy
    origin.on("/pipe-slow", delay(0.2))
    batch = (build_request("GET", "/pipe-slow")
             + build_request("POST", "/p", body=b"hello")
             + build_request("POST", "/chunked", [("Transfer-Encoding", "chunked")]) + b"3\r\nabc\r\n0\r\n\r\n"
             + b"".join(build_request("GET", f"/g{i}") for i in range(30)))
    with RawClient(proxy.address()) as client:
        client.send(batch)
        first = client.read_response().json()
        assert first["target"] == "/pipe-slow"
        second = client.read_response().json()
        assert (second["target"], second["body"]) == ("/p", "hello")
        third = client.read_response().json()
        assert (third["target"], third["body"], third["chunked"]) == ("/chunked", "abc", True)
        for i in range(30):
            assert client.read_response().json()["target"] == f"/g{i}"
        assert client.is_open()


def test_client_connection_close_is_honoured(site):
    proxy = site.proxy
    with RawClient(proxy.address()) as client:
        client.request("GET", "/bye", [("Connection", "close")])
        response = client.read_response()
        assert response.status == 200 and response.closes
        assert client.wait_closed(5) in ("eof", "reset")
    # Connection: close is hop-by-hop: the pooled upstream connection is unaffected.
    assert request(proxy.address(), "GET", "/again").status == 200
    assert site.new_connections() <= 1


def test_http_1_0_clients(site):
    origin, proxy = site.main, site.proxy
    with RawClient(proxy.address()) as client:
        client.request("GET", "/old", version="HTTP/1.0")
        response = client.read_response()
        assert response.status == 200
        assert client.wait_closed(5) in ("eof", "reset")  # no keep-alive unless asked for
    with RawClient(proxy.address()) as client:
        for i in range(2):
            client.request("GET", f"/old-ka{i}", [("Connection", "keep-alive")], version="HTTP/1.0")
            response = client.read_response()
            assert response.status == 200
            assert "keep-alive" in (response.header("connection") or "").lower()
        assert client.is_open()
    assert all(r.version == "HTTP/1.1" for r in origin.requests)


# -- Expect: 100-continue ----------------------------------------------------------------------


def test_expect_100_continue_is_answered_by_the_proxy(site):
    proxy = site.proxy
    body = b"the body, sent after 100"
    with RawClient(proxy.address(), timeout=3) as client:
        client.send(build_request("POST", "/expect", [("Expect", "100-continue"),
                                                     ("Content-Length", str(len(body)))]))
        interim = client.read_head()  # times out (3s) if the proxy waits for the body
        assert interim.status == 100
        client.send(body)
        response = client.read_response()
    assert response.status == 200
    seen = response.json()
    assert seen["body"] == body.decode()
    assert "expect" not in names(seen["headers"])


def test_expect_100_continue_with_curl_does_not_stall(site, tmp_path: Path):
    """Told to wait up to 5 s for the 100, curl is done long before if the proxy sends it."""
    proxy = site.proxy
    (tmp_path / "body").write_bytes(b"z" * (2 * MiB))
    host, port = proxy.address()
    started = time.monotonic()
    done = curl("-H", "Expect: 100-continue", "--expect100-timeout", "5", "--data-binary",
                f"@{tmp_path / 'body'}", "-w", "\n%{http_code}", f"http://{host}:{port}/e")
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith(b"\n200")
    assert elapsed < 3, f"{elapsed:.2f}s: curl waited for a 100 Continue that did not come"


# -- upgrades and CONNECT ----------------------------------------------------------------------


def test_websocket_upgrade_becomes_a_tunnel_both_ways(site):
    origin, proxy = site.main, site.proxy
    origin.on("/ws", upgrade_echo("websocket"))
    payload = pattern(MiB, seed=13)
    with RawClient(proxy.address()) as client:
        client.request("GET", "/ws", [("Connection", "Upgrade"), ("Upgrade", "websocket"),
                                      ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                                      ("Sec-WebSocket-Version", "13")])
        head = client.read_head()
        assert head.status == 101
        assert (head.header("upgrade") or "").lower() == "websocket"
        assert "upgrade" in (head.header("connection") or "").lower()
        echoed = bytearray(client.buffer)
        client.buffer.clear()
        sender = threading.Thread(target=client.send, args=(payload,))
        sender.start()
        while len(echoed) < len(payload):
            chunk = client.sock.recv(MiB)
            assert chunk, f"tunnel closed after {len(echoed)} bytes"
            echoed += chunk
        sender.join(10)
        assert bytes(echoed) == payload
        client.sock.shutdown(socket.SHUT_WR)
        assert client.wait_closed(5) in ("eof", "reset")
    seen = origin.requests[0]
    assert seen.header("upgrade") == "websocket"
    assert "upgrade" in (seen.header("connection") or "").lower()


def test_declined_upgrade_is_an_ordinary_exchange(site):
    proxy = site.proxy
    with RawClient(proxy.address()) as client:
        client.request("GET", "/no-ws", [("Connection", "Upgrade"), ("Upgrade", "websocket")])
        response = client.read_response()
        assert response.status == 200 and response.json()["target"] == "/no-ws"
        client.request("GET", "/after")
        assert client.read_response().json()["target"] == "/after"


def test_connect_is_forwarded_and_tunnelled_on_2xx(site):
    origin, proxy = site.main, site.proxy
    origin.on("tunnel.example:443", connect_echo(200))
    with RawClient(proxy.address()) as client:
        client.send(b"CONNECT tunnel.example:443 HTTP/1.1\r\nHost: tunnel.example:443\r\n\r\n")
        head = client.read_head()
        assert head.status == 200, head
        client.send(b"raw bytes through the tunnel")
        got = bytearray(client.buffer)
        while len(got) < 28:
            chunk = client.sock.recv(65536)
            assert chunk
            got += chunk
        assert bytes(got) == b"raw bytes through the tunnel"
    assert origin.requests[0].method == "CONNECT"
    assert origin.requests[0].target == "tunnel.example:443"


# -- errors the client sees ------------------------------------------------------------------


def test_refused_endpoints_are_skipped_for_the_next_one(meshproxy, origins, upstreams):
    origin = origins()
    refused = [upstreams.refused(), upstreams.refused()]
    config = http_config([route("all", "up")],
                         [cluster("up", [refused[0].address, refused[1].address, origin])])
    proxy = meshproxy(config)
    for i in range(10):  # round robin lands on a refused endpoint two times in three
        response = request(proxy.address(), "GET", f"/{i}")
        assert response.status == 200, response
    assert origin.request_count == 10


def test_all_endpoints_refused_is_502_connect_refused(meshproxy, upstreams):
    a, b = upstreams.refused(), upstreams.refused()
    proxy = meshproxy(http_config([route("all", "up")], [cluster("up", [a.address, b.address])]))
    with RawClient(proxy.address()) as client:
        client.request("GET", "/", [("X-Request-Id", "r1")])
        response = client.read_response()
    assert response.status == 502
    assert response.error_code == "connect_refused"
    assert response.header("x-request-id") == "r1"


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_upstream_closing_before_responding_is_502_upstream_reset(site, reset):
    origin, proxy = site.main, site.proxy
    origin.on("/die", close_before_response(reset=reset))
    pid = single_worker(proxy)
    response = request(proxy.address(), "GET", "/die")
    assert response.status == 502
    assert response.error_code == "upstream_reset"
    assert request(proxy.address(), "GET", "/fine").status == 200
    assert proxy.worker_pids() == [pid]


def test_upstream_silent_past_the_route_timeout_is_504(site):
    proxy = site.proxy
    site.main.on("/short/silent", delay(5))
    pid = single_worker(proxy)
    started = time.monotonic()
    response = request(proxy.address(), "GET", "/short/silent", timeout=5)
    elapsed = time.monotonic() - started
    assert response.status == 504
    assert response.error_code == "upstream_timeout"
    assert 0.35 <= elapsed < 2.0, elapsed  # the route says 400ms
    assert proxy.worker_pids() == [pid], "the worker restarted"
    assert request(proxy.address(), "GET", "/fine").status == 200


def test_route_timeout_ends_when_the_response_starts(site):
    body = b"b" * 8000
    site.main.on("/short/trickle", slow_body(body, pieces=4, interval=0.25))  # 1 s in all
    response = request(site.address(), "GET", "/short/trickle", timeout=5)
    assert response.status == 200 and response.body == body and response.complete


MALFORMED_RESPONSES = {
    "head-over-64-kib": b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"v" * 70000 + b"\r\nContent-Length: 0\r\n\r\n",
    "101-header-fields": (b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101))
                          + b"Content-Length: 0\r\n\r\n"),
    "status-not-digits": b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n",
    "binary-garbage": b"\x00\x01\x02\x03garbage\r\n\r\n",
    "http-2-status": b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n",
    "bare-lf": b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
    "cl-and-te": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two-content-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    "bad-content-length": b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
    "header-without-colon": b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n",
    "space-before-colon": b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    "status-999": b"HTTP/1.1 999 Nine\r\nContent-Length: 0\r\n\r\n",
    "not-http": b"<html>hello</html>\r\n\r\n",
}


def test_malformed_upstream_responses_are_502_upstream_protocol_error(site):
    origin, proxy = site.main, site.proxy
    for name, data in MALFORMED_RESPONSES.items():
        origin.on(f"/{name}", raw(data))
    pid = single_worker(proxy)
    failures = []
    for name in MALFORMED_RESPONSES:
        with RawClient(proxy.address(), timeout=5) as client:
            client.request("GET", f"/{name}")
            try:
                response = client.read_response()
            except (AssertionError, OSError) as exc:
                failures.append(f"{name}: {exc}")
                continue
            if (response.status, response.error_code) != (502, "upstream_protocol_error"):
                failures.append(f"{name}: {response.status} {response.error_code} {response.body[:80]!r}")
    assert not failures, "\n".join(failures)
    assert proxy.worker_pids() == [pid]


@pytest.mark.parametrize(("chunked_body", "reset"), [(False, False), (True, False), (False, True)],
                         ids=["content-length", "chunked", "content-length-rst"])
def test_upstream_breaking_off_mid_body_is_passed_on_broken(site, chunked_body, reset):
    origin, proxy = site.main, site.proxy
    origin.on("/cut", break_mid_body(100_000, 30_000, chunked_body=chunked_body, reset=reset))
    with RawClient(proxy.address()) as client:
        client.request("GET", "/cut")
        response = client.read_response()
        assert response.status == 200
        assert not response.complete, "a broken-off body arrived as a complete one"
        assert len(response.body) <= 100_000
        assert client.eof in ("eof", "reset")


BAD_CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
BAD_CHUNKED_BODY = b"5\r\nhello\r\nZZ\r\nnot a chunk\r\n0\r\n\r\n"


def _bad_chunks_after_a_pause(r) -> None:
    r.send(BAD_CHUNKED_HEAD + b"5\r\nhello\r\n")
    time.sleep(0.2)
    r.send(b"ZZ\r\nnot a chunk\r\n0\r\n\r\n")


def test_bad_chunk_framing_mid_response_is_passed_on_broken(site):
    """The head and a good chunk went to the client; then the framing breaks."""
    origin, proxy = site.main, site.proxy
    origin.on("/badchunk-late", _bad_chunks_after_a_pause)
    with RawClient(proxy.address()) as client:
        client.request("GET", "/badchunk-late")
        response = client.read_response()
        assert response.status == 200
        assert not response.complete
        assert response.body.startswith(b"hello") and b"not a chunk" not in response.body
        assert client.eof in ("eof", "reset")


def test_bad_chunk_framing_in_the_first_read_is_not_a_silent_close(site):
    """The bad framing arrives together with the head: nothing reached the client yet,
    so a response is still possible (DESIGN, "Errors users see": never a silent close
    where a response is possible). Either a 502 or the head and a broken body will do."""
    origin, proxy = site.main, site.proxy
    origin.on("/badchunk-early", raw(BAD_CHUNKED_HEAD + BAD_CHUNKED_BODY, close=False))
    with RawClient(proxy.address()) as client:
        client.request("GET", "/badchunk-early")
        response = client.read_response()  # ConnectionEnded: closed without a byte
        if response.status == 502:
            assert response.error_code == "upstream_protocol_error"
        else:
            assert response.status == 200 and not response.complete
            assert b"not a chunk" not in response.body
        assert client.wait_closed(5) in ("eof", "reset")


def test_pooled_connection_the_upstream_closed_while_idle_is_not_used(site):
    origin, proxy = site.idle, site.proxy
    accepted = origin.accepted
    statuses = []
    for i in range(10):
        statuses.append(request(proxy.address(), "GET", f"/idle/g{i}").status)
        time.sleep(0.1)  # the origin closes the pooled connection meanwhile
        statuses.append(request(proxy.address(), "POST", f"/idle/p{i}", body=b"once").status)
        time.sleep(0.1)
    assert statuses == [200] * 20
    targets = [r.target for r in origin.requests]
    assert len(targets) == 20 and len(set(targets)) == 20, Counter(targets).most_common(3)
    assert origin.accepted - accepted >= 15  # it really did close them


def test_keep_alive_through_many_idle_closes_under_load(site):
    """Requests every ~idle_close: the pool must never hand out a connection the origin
    has closed (GET: zero client-visible errors)."""
    proxy = site.proxy
    errors = []
    with RawClient(proxy.address()) as client:
        for i in range(80):
            client.request("GET", f"/idle/r{i}")
            response = client.read_response()
            if response.status != 200:
                errors.append((i, response.status, response.error_code))
            time.sleep(0.03 if i % 2 else 0.025)
    assert not errors, errors


# -- failures while a request body is still arriving ---------------------------------------------
# The head went upstream, the rest of the body has not arrived yet: the proxy streams it in a
# second task. A failure then must still end in a local reply (nothing reached the client),
# and must never take the worker, and every other connection it serves, down with it.


def _post_head_and_part(address, total: int = 100, part: bytes = b"0123456789") -> RawClient:
    client = RawClient(address, timeout=5)
    client.send(build_request("POST", "/streaming", [("Content-Length", str(total))]) + part)
    return client


def _assert_worker_survived(proxy, pid: int, bystander: RawClient) -> None:
    assert proxy.worker_pids() == [pid], f"the worker died: {proxy.log()[-2000:]}"
    assert bystander.is_open(), "an unrelated kept-alive client connection was closed"


def test_upstream_refused_while_the_body_streams(meshproxy, origins, upstreams):
    origin, refused = origins(), upstreams.refused()
    config = http_config([route("ok", "ok", prefix="/ok"), route("all", "down")],
                         [cluster("ok", [origin]), cluster("down", [refused.address])])
    proxy = meshproxy(config)
    pid = single_worker(proxy)
    with RawClient(proxy.address()) as bystander:
        bystander.request("GET", "/ok")
        assert bystander.read_response().status == 200
        with _post_head_and_part(proxy.address()) as client:
            response = client.read_response()
            assert (response.status, response.error_code) == (502, "connect_refused")
        time.sleep(0.3)
        _assert_worker_survived(proxy, pid, bystander)


@pytest.mark.parametrize("failure", ["reset", "timeout"])
def test_upstream_failing_before_its_response_while_the_body_streams(meshproxy, origins, upstreams, failure):
    origin, acceptor = origins(), upstreams.acceptor(timeout=5)
    config = http_config([route("ok", "ok", prefix="/ok"), route("all", "down", timeout="300ms")],
                         [cluster("ok", [origin]), cluster("down", [acceptor.address])])
    proxy = meshproxy(config)
    pid = single_worker(proxy)
    with RawClient(proxy.address()) as bystander:
        bystander.request("GET", "/ok")
        assert bystander.read_response().status == 200
        with _post_head_and_part(proxy.address()) as client:
            upstream = acceptor.accept()
            assert upstream.recv(65536).startswith(b"POST /streaming HTTP/1.1\r\n")
            if failure == "reset":
                upstream.close()
            response = client.read_response()
            expected = (502, "upstream_reset") if failure == "reset" else (504, "upstream_timeout")
            assert (response.status, response.error_code) == expected
        time.sleep(0.3)
        _assert_worker_survived(proxy, pid, bystander)


def test_bad_chunk_framing_after_the_head_went_upstream(meshproxy, origins):
    """The framing error shows only once the head and a first chunk were forwarded: the
    client gets a 400 (nothing was answered yet), the origin a truncated body it never
    mistakes for a complete request, and the worker lives on."""
    origin = origins()
    proxy = meshproxy(simple_config(origin))
    pid = single_worker(proxy)
    with RawClient(proxy.address()) as bystander:
        bystander.request("GET", "/bystander")
        assert bystander.read_response().status == 200
        before = origin.bytes_received
        with RawClient(proxy.address(), timeout=5) as client:
            client.send(build_request("POST", "/late-bad-chunk", [("Transfer-Encoding", "chunked")])
                        + b"5\r\nhello\r\n")
            wait_for(lambda: origin.bytes_received > before, timeout=5, what="the head at the origin")
            client.send(b"ZZ\r\nsmuggled\r\n0\r\n\r\n")
            response = client.read_response()
            assert response.status == 400 and response.closes
            assert client.wait_closed(5) in ("eof", "reset")
        time.sleep(0.3)
        _assert_worker_survived(proxy, pid, bystander)
    assert [r.target for r in origin.requests] == ["/bystander"]
    assert b"smuggled" not in b"".join(bytes(c.raw) for c in origin.connections)


# -- clients that go away --------------------------------------------------------------------


def test_client_aborting_an_upload_leaves_the_worker_serving(meshproxy, origins):
    origin = origins()
    proxy = meshproxy(simple_config(origin))
    pid = single_worker(proxy)
    with RawClient(proxy.address()) as bystander:
        bystander.request("GET", "/bystander")
        assert bystander.read_response().status == 200
        before = origin.bytes_received
        client = RawClient(proxy.address(), timeout=5)
        client.send(build_request("POST", "/aborted-upload", [("Content-Length", str(MiB))]) + b"x" * 1000)
        wait_for(lambda: origin.bytes_received > before, timeout=5, what="the upload to start")
        client.close()
        time.sleep(0.3)
        _assert_worker_survived(proxy, pid, bystander)
        bystander.request("GET", "/still-here")
        assert bystander.read_response().status == 200
    assert [r.target for r in origin.requests] == ["/bystander", "/still-here"]


def test_client_leaving_mid_download_closes_that_upstream_connection(site):
    proxy = site.proxy
    site.main.on("/long-download", stream(64 * MiB, seed=14))
    client = RawClient(proxy.address(), timeout=5)
    client.request("GET", "/long-download")
    head = client.read_head()
    assert head.status == 200
    client.take(MiB)
    conn = site.main.connections[-1]
    client.close()
    # The upstream connection is mid-message: it must be closed, never pooled.
    assert conn.closed.wait(5), "the origin connection stayed open"
    assert proxy.worker_pids() == [site.pid]
    assert request(proxy.address(), "GET", "/after-abort").status == 200


def test_client_leaving_while_the_upstream_thinks(site):
    proxy = site.proxy
    site.main.on("/thinking", delay(0.5))
    client = RawClient(proxy.address(), timeout=5)
    client.request("GET", "/thinking")
    site.main.wait_requests(1)
    client.close()
    time.sleep(0.8)
    assert proxy.worker_pids() == [site.pid]
    assert request(proxy.address(), "GET", "/after-leave").status == 200


# -- what the upstream sends beyond its response ---------------------------------------------


UNSOLICITED = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-Evil: 1\r\n\r\nevil"


def _unsolicited_after(pause: float):
    """A response, then a second one nobody asked for: in the same write, or `pause`
    seconds later (when the proxy has put the connection back in its pool)."""
    def behave(r) -> None:
        response = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        if not pause:
            r.send(response + UNSOLICITED)
            return
        r.send(response)
        time.sleep(pause)
        r.send(UNSOLICITED)
    return behave


def _no_content_with_a_stray_body(r) -> None:
    """A common upstream bug: a 204 followed by body bytes (here a little later)."""
    r.send(b"HTTP/1.1 204 No Content\r\n\r\n")
    time.sleep(0.05)
    r.send(b"stray body bytes")


@pytest.mark.parametrize("method", ["GET", "POST"])
@pytest.mark.parametrize("pause", [0.0, 0.1], ids=["same-write", "while-pooled"])
def test_unsolicited_upstream_bytes_never_answer_another_request(meshproxy, origins, pause, method):
    """An upstream that sends a second response nobody asked for (Envoy's
    TestPipelinedResponses): the connection is unusable, and no later request, from
    this client or another, may receive those bytes as its response."""
    origin = origins().on("/poison", _unsolicited_after(pause))
    proxy = meshproxy(simple_config(origin))
    first = request(proxy.address(), "GET", "/poison")
    assert (first.status, first.body) == (200, b"ok")
    time.sleep(pause + 0.1)
    for target in ("/victim-1", "/victim-2", "/victim-3"):
        victim = request(proxy.address(), method, target, body=b"" if method == "POST" else None)
        assert victim.header("x-evil") is None and victim.body != b"evil", victim
        assert victim.json()["target"] == target, "another request's response"


def test_stray_body_after_a_204_never_reaches_the_next_request(meshproxy, origins):
    origin = origins().on("/nothing", _no_content_with_a_stray_body)
    proxy = meshproxy(simple_config(origin))
    assert request(proxy.address(), "GET", "/nothing").status == 204
    time.sleep(0.15)
    for target in ("/next-1", "/next-2"):
        response = request(proxy.address(), "GET", target)
        assert response.status == 200, response
        assert response.json()["target"] == target


def test_upstream_connection_close_is_respected(site):
    site.main.on("/one-shot", respond(body=b"once", headers=[("Connection", "close")]))
    with RawClient(site.address()) as client:
        for _ in range(3):
            client.request("GET", "/one-shot")
            response = client.read_response()
            assert (response.status, response.body) == (200, b"once")
            assert not response.closes  # hop-by-hop: the client connection goes on
    # The upstream said close each time: each request needed a connection of its own.
    connections = [r.connection for r in site.main.requests if r.target == "/one-shot"]
    assert len(connections) == 3 and len(set(connections)) == 3, connections


def test_interim_responses(site):
    """103 Early Hints goes through to an HTTP/1.1 client; the upstream's own 100 is not
    sent again after the one the proxy already gave."""
    site.main.on("/hints", raw(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
                               b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", close=False))
    site.main.on("/continue", raw(b"HTTP/1.1 100 Continue\r\n\r\n"
                                  b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n", close=False))
    with RawClient(site.address()) as client:
        client.request("GET", "/hints")
        early = client.read_response(interim=True)
        assert early.status == 103 and early.header("link") == "</style.css>; rel=preload"
        final = client.read_response()
        assert (final.status, final.body) == (200, b"hi")
        client.send(build_request("POST", "/continue", [("Expect", "100-continue"), ("Content-Length", "3")]))
        assert client.read_response(interim=True).status == 100
        client.send(b"abc")
        assert client.read_response(interim=True).status == 201


def test_many_concurrent_keep_alive_clients(site):
    errors: list[Exception] = []

    def run(i: int) -> None:
        try:
            with RawClient(site.address(), timeout=10) as client:
                for k in range(5):
                    body = f"{i}-{k}".encode()
                    client.request("POST", f"/c{i}/{k}", body=body)
                    seen = client.read_response().json()
                    assert (seen["target"], seen["body"]) == (f"/c{i}/{k}", body.decode())
        except Exception as exc:  # noqa: BLE001 - re-raised by the test thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(100)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors[:3]
    assert site.main.request_count == 500


def test_idle_client_connections_are_closed_after_idle_timeout(meshproxy, origins):
    origin = origins()
    proxy = meshproxy(simple_config(origin, idle_timeout="300ms"))
    with RawClient(proxy.address()) as silent, RawClient(proxy.address()) as kept:
        kept.request("GET", "/once")
        assert kept.read_response().status == 200
        started = time.monotonic()
        assert silent.wait_closed(3) in ("eof", "reset")
        assert kept.wait_closed(3) in ("eof", "reset")
        assert time.monotonic() - started < 2


# -- bytes in odd places -----------------------------------------------------------------------


def _dribble(sock: socket.socket, data: bytes, step: int = 1, pause: float = 0.001) -> None:
    """Send `data` a few bytes at a time, each piece its own segment."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for offset in range(0, len(data), step):
        sock.sendall(data[offset:offset + step])
        time.sleep(pause)


def test_request_dribbled_byte_by_byte(site):
    """Every CR, LF, chunk-size digit and trailer byte in a read of its own: the parser's
    state must carry across reads, and the origin must get the request intact."""
    body = (b"4;ext=\"q;v\"\r\nwiki\r\n"
            b"5\r\npedia\r\n"
            b"0\r\nX-Trailer: t\r\n\r\n")
    data = build_request("POST", "/dribble?x=1", [("Transfer-Encoding", "chunked"), ("X-Long", "v" * 50)]) + body
    with RawClient(site.address()) as client:
        _dribble(client.sock, data)
        response = client.read_response()
    assert response.status == 200
    seen = site.main.requests[-1]
    assert (seen.target, seen.body, seen.trailers) == ("/dribble?x=1", b"wikipedia", [("X-Trailer", "t")])
    assert seen.chunk_lines == ['4;ext="q;v"', "5", "0"]


def test_malformed_byte_late_in_a_dribbled_head_is_still_refused(site):
    before = site.main.bytes_received
    with RawClient(site.address()) as client:
        _dribble(client.sock, b"GET /late HTTP/1.1\r\nHost: example.com\r\nX-A: fine\r\n", step=7)
        time.sleep(0.1)
        client.send(b"X-B: bad\x00value\r\n\r\n")
        response = client.read_response()
        assert response.status == 400 and response.closes
    time.sleep(0.02)
    assert site.main.bytes_received == before


def _dribbled_chunked_response(r) -> None:
    r.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Head: h\r\n\r\n"
            b"3;e=1\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nX-Tail: t\r\n\r\n")
    for i in range(len(data)):
        r.send(data[i:i + 1])
        time.sleep(0.001)


def test_response_dribbled_byte_by_byte(site):
    site.main.on("/dribbled-response", _dribbled_chunked_response)
    with RawClient(site.address()) as client:
        client.request("GET", "/dribbled-response")
        response = client.read_response()
        assert (response.status, response.header("x-head")) == (200, "h")
        assert response.body == b"abc0123456789abcdef" and response.complete
        assert response.trailers == [("X-Tail", "t")]
        client.request("GET", "/after-dribble")
        assert client.read_response().json()["target"] == "/after-dribble"


def test_head_response_announcing_chunked_has_no_body(site):
    site.main.on("/head-chunked", no_body(200, [("Transfer-Encoding", "chunked")]))
    with RawClient(site.address(), timeout=3) as client:
        client.request("HEAD", "/head-chunked")
        response = client.read_response("HEAD")
        assert response.status == 200
        client.request("GET", "/after-head")
        assert client.read_response().json()["target"] == "/after-head"


def test_http_1_0_client_gets_a_chunked_response_unchunked(site):
    site.main.on("/chunked-for-old", chunked([b"old ", b"client"], trailers=[("X-T", "1")]))
    with RawClient(site.address()) as client:
        client.request("GET", "/chunked-for-old", version="HTTP/1.0")
        response = client.read_response()
        assert response.status == 200
        assert response.header("transfer-encoding") is None  # HTTP/1.0 has no chunking
        assert response.body == b"old client"
        assert client.eof in ("eof", "reset")


def test_many_pipelined_requests_beyond_one_read(site):
    """600 requests (~40 KiB) in one write: more than the proxy reads at once."""
    batch = b"".join(build_request("GET", f"/pipe/{i}", [("X-Pad", "p" * 20)]) for i in range(600))
    with RawClient(site.address(), timeout=20) as client:
        client.send(batch)
        for i in range(600):
            assert client.read_response().json()["target"] == f"/pipe/{i}"


# -- connects ------------------------------------------------------------------------------


def test_connect_timeout_is_502_connect_timeout(meshproxy, upstreams):
    hole = upstreams.blackhole()
    proxy = meshproxy(http_config([route("all", "up")],
                                  [cluster("up", [hole.address], connect_timeout="200ms")]))
    started = time.monotonic()
    response = request(proxy.address(), "GET", "/", timeout=5)
    elapsed = time.monotonic() - started
    assert (response.status, response.error_code) == (502, "connect_timeout")
    assert 0.15 < elapsed < 2.0, elapsed


def test_endpoint_that_never_accepts_is_skipped_after_connect_timeout(meshproxy, origins, upstreams):
    hole, origin = upstreams.blackhole(), origins()
    proxy = meshproxy(http_config([route("all", "up")],
                                  [cluster("up", [hole.address, origin], connect_timeout="200ms")]))
    for i in range(4):
        assert request(proxy.address(), "GET", f"/{i}", timeout=5).status == 200


def test_idle_upstream_connections_are_bounded(meshproxy, origins):
    """More requests at once than the pool keeps idle need as many upstream connections;
    afterwards the pool keeps at most its bound per endpoint and closes the rest."""
    count = MAX_IDLE_PER_ENDPOINT + 88
    origin = origins(timeout=10).on("/hold", delay(0.4))
    proxy = meshproxy(simple_config(origin))
    clients = [RawClient(proxy.address(), timeout=10) for _ in range(count)]
    try:
        for client in clients:
            client.request("GET", "/hold")
        for client in clients:
            assert client.read_response().status == 200
    finally:
        for client in clients:
            client.close()
    assert origin.accepted == count
    wait_for(lambda: sum(not c.closed.is_set() for c in origin.connections) <= MAX_IDLE_PER_ENDPOINT,
             timeout=5, what="the pool to close connections beyond its bound")


# -- tunnels and early answers -----------------------------------------------------------------


def _upgrade_and_speak_first(r) -> None:
    r.send(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: chat\r\nConnection: Upgrade\r\n\r\nserver first")
    r.tunnel_echo()


def test_upgrade_with_bytes_from_both_sides_before_the_tunnel(site):
    """The server speaks first in the 101's own write; the client sent bytes right
    behind its request: both reach the other side, in order."""
    site.main.on("/chat", _upgrade_and_speak_first)
    with RawClient(site.address()) as client:
        client.send(build_request("GET", "/chat", [("Connection", "Upgrade"), ("Upgrade", "chat")])
                    + b"client early|")
        head = client.read_head()
        assert head.status == 101
        client.send(b"client later")
        want = b"server first" + b"client early|client later"
        got, complete = client.take(len(want))
        assert complete and got == want, got


def test_connect_refused_by_the_upstream_is_an_ordinary_response(site):
    site.main.on("denied.example:443", connect_echo(403))
    with RawClient(site.address()) as client:
        client.send(b"CONNECT denied.example:443 HTTP/1.1\r\nHost: denied.example:443\r\n\r\n")
        response = client.read_response("CONNECT")
        assert response.status == 403
        client.request("GET", "/after-denied")
        assert client.read_response().json()["target"] == "/after-denied"


def test_upstream_answering_before_the_body_is_complete(meshproxy, upstreams):
    """An early final response (413 while the upload is still coming) reaches the client;
    then both connections close, since neither has a known message boundary."""
    acceptor = upstreams.acceptor(timeout=5)
    proxy = meshproxy(http_config([route("all", "up")], [cluster("up", [acceptor.address])]))
    with RawClient(proxy.address(), timeout=5) as client:
        client.send(build_request("POST", "/too-big", [("Content-Length", str(10 * MiB))]) + b"x" * 1000)
        upstream = acceptor.accept()
        assert upstream.recv(65536).startswith(b"POST /too-big HTTP/1.1\r\n")
        upstream.sendall(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big!")
        response = client.read_response()
        assert (response.status, response.body) == (413, b"too big!")
        assert client.wait_closed(5) in ("eof", "reset")
    upstream.settimeout(5)
    try:
        while upstream.recv(65536):
            pass
    except ConnectionResetError:
        pass  # closed either way: what matters is that it ends


# -- more than one worker, and draining ------------------------------------------------------


def test_two_workers_serve_http(meshproxy, origins):
    origin = origins()
    proxy = meshproxy(simple_config(origin, workers=2))
    assert len(proxy.worker_pids()) == 2
    clients = [RawClient(proxy.address()) for _ in range(40)]
    try:
        for i, client in enumerate(clients):
            client.request("GET", f"/w{i}")
        for i, client in enumerate(clients):
            assert client.read_response().json()["target"] == f"/w{i}"
    finally:
        for client in clients:
            client.close()


def test_drain_finishes_the_request_in_flight_and_closes_idle_connections(meshproxy, origins):
    origin = origins().on("/in-flight", delay(0.6))
    proxy = meshproxy(simple_config(origin))
    with RawClient(proxy.address()) as idle, RawClient(proxy.address()) as busy:
        idle.request("GET", "/warm")
        assert idle.read_response().status == 200
        busy.request("GET", "/in-flight")
        origin.wait_requests(2)
        proxy.send_signal(signal.SIGTERM)
        assert idle.wait_closed(2) in ("eof", "reset")  # kept alive but idle: closed at once
        response = busy.read_response()
        assert response.status == 200 and response.json()["target"] == "/in-flight"
        assert response.closes  # the last response on a draining connection says so
        assert busy.wait_closed(5) in ("eof", "reset")
    assert proxy.wait(10) == 0


def test_http_1_0_upstream_response(site):
    site.main.on("/old-upstream", raw(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", close=False))
    with RawClient(site.address()) as client:
        for _ in range(2):
            client.request("GET", "/old-upstream")
            response = client.read_response()
            assert (response.status, response.body, response.version) == (200, b"ok", "HTTP/1.1")
        client.request("GET", "/after-old")
        assert client.read_response().json()["target"] == "/after-old"
