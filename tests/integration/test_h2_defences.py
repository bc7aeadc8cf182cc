"""HTTP/2 attacks on meshproxy (../shared/reference/hardening.md §3): raw frames from the
`h2` library and hand-built ones. Each test checks that the attacker is cut off (GOAWAY
with ENHANCE_YOUR_CALM, or the limit's own answer), that the limit holds, and that a
well-behaved client on another connection keeps getting its answers meanwhile.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import hpack
import pytest

from proxy.http.h2codec import PREFACE, H2Limits

from .h2_support import H2Client, InProcessProxy, Response, frame
from .http_support import Origin, cluster, delay, http_config, respond, route

ENHANCE_YOUR_CALM = 0xB
REFUSED_STREAM = 0x7
HEADERS, PRIORITY, RST_STREAM, SETTINGS, PING, CONTINUATION, DATA = 1, 2, 3, 4, 6, 9, 0
END_STREAM, END_HEADERS = 0x1, 0x4
REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"test"), (b":path", b"/")]


@pytest.fixture
def site():
    origin = Origin("h1")
    origin.on("/slow", delay(0.5, respond(200, b"slow")))
    limits = H2Limits(idle_timeout=30.0, header_timeout=1.0, write_stall_timeout=2.0)
    proxy = InProcessProxy(http_config([route("all", "up")], [cluster("up", [origin])]), limits=limits)
    yield proxy, origin
    proxy.close()
    origin.close()


class Bystander:
    """A well-behaved client on its own connection, asking for `/` in a loop."""

    def __init__(self, proxy: InProcessProxy) -> None:
        self.proxy = proxy
        self.statuses: list[int] = []
        self.latencies: list[float] = []
        self.failure: BaseException | None = None
        self._stop = threading.Event()
        self._serving = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._serving.wait(5), "the bystander got no first answer"

    def _run(self) -> None:
        client = H2Client(self.proxy.address)
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                self.statuses.append(client.get("/bystander").status)
                self.latencies.append(time.monotonic() - started)
                self._serving.set()
                time.sleep(0.01)
        except BaseException as exc:  # noqa: BLE001 - reported by stop()
            self.failure = exc
        finally:
            client.close()

    def stop(self) -> None:
        served = len(self.statuses)
        deadline = time.monotonic() + 5
        while len(self.statuses) < served + 3 and time.monotonic() < deadline and self.failure is None:
            time.sleep(0.01)  # still answered after the attack
        self._stop.set()
        self._thread.join(15)
        assert self.failure is None, self.failure
        assert self.statuses and set(self.statuses) == {200}, self.statuses[:20]
        assert max(self.latencies) < 2.0, max(self.latencies)


def _unlimit(client: H2Client) -> None:
    """Lift the client's own stream limit (the proxy's SETTINGS), to send past it."""
    client.conn.remote_settings.max_concurrent_streams = 1 << 20
    client.conn.remote_settings.acknowledge()


def _cut_off(client: H2Client, code: int = ENHANCE_YOUR_CALM) -> None:
    assert client.wait_closed(10), "the attacker's connection stayed open"
    assert client.goaway is not None, "closed without GOAWAY"
    assert client.goaway.error_code == code, client.goaway


def test_rapid_reset_is_cut_off(site):
    proxy, origin = site
    bystander = Bystander(proxy)
    attacker = H2Client(proxy.address)
    opened = 0
    try:
        with contextlib.suppress(OSError):
            for _ in range(100):
                for _ in range(100):
                    sid = attacker.conn.get_next_available_stream_id()
                    attacker.conn.send_headers(sid, REQUEST, end_stream=True)
                    attacker.conn.reset_stream(sid, 8)
                    opened += 1
                attacker.flush()
                if not attacker.pump(0.01):
                    break
        _cut_off(attacker)
    finally:
        attacker.close()
        bystander.stop()
    assert opened <= 2000, f"{opened} streams before the cut"
    attacked = [r for r in origin.requests if r.path == "/"]
    assert len(attacked) < 500
    assert proxy.stats.listeners["in"].h2_cut_off == {"rapid_reset": 1}  # counted for /metrics


def test_malformed_request_resets_count_as_resets(site):
    proxy, origin = site
    attacker = H2Client(proxy.address)
    try:
        attacker.pump(0.2)  # the proxy's SETTINGS, then no client-side stream limit
        _unlimit(attacker)
        with contextlib.suppress(OSError):
            for _ in range(50):
                for _ in range(20):
                    sid = attacker.conn.get_next_available_stream_id()
                    attacker.conn.send_headers(sid, [*REQUEST, (b"connection", b"x")], end_stream=True)
                attacker.flush()
                if not attacker.pump(0.01):
                    break
        _cut_off(attacker)
    finally:
        attacker.close()
    assert not [r for r in origin.requests if r.path == "/"]


@pytest.mark.parametrize("flood", ["settings", "ping", "empty_data", "priority"])
def test_control_frame_floods_are_cut_off(site, flood):
    proxy, _ = site
    bystander = Bystander(proxy)
    attacker = H2Client(proxy.address)
    if flood == "settings":
        one = frame(SETTINGS, 0, 0)
    elif flood == "ping":
        one = frame(PING, 0, 0, b"12345678")
    elif flood == "priority":
        one = frame(PRIORITY, 0, 1, b"\x00\x00\x00\x00\x10")
    else:
        attacker.request("/slow", end=False)
        one = frame(DATA, 0, 1)
    try:
        with contextlib.suppress(OSError):
            for _ in range(100):
                attacker.send_raw(one * 1000)  # never reading the ACKs
        _cut_off(attacker)
    finally:
        attacker.close()
        bystander.stop()


def test_continuation_flood_is_cut_off(site):
    proxy, _ = site
    bystander = Bystander(proxy)
    attacker = H2Client(proxy.address, raw=True)
    block = hpack.Encoder().encode(REQUEST)
    sent = 0
    try:
        with contextlib.suppress(OSError):
            attacker.send_raw(frame(HEADERS, END_STREAM, 1, block))
            filler = b"\x40\x01a\x01b" * 3000  # literal "a: b" fields, 15 KiB
            while sent < 10 << 20:
                attacker.send_raw(frame(CONTINUATION, 0, 1, filler))
                sent += len(filler)
        _cut_off(attacker)
    finally:
        attacker.close()
        bystander.stop()
    # Cut off long before the 10 MiB were taken (what was sent sat in socket buffers).
    assert sent < 10 << 20, "the whole flood was taken"


def test_empty_continuation_frames_are_cut_off(site):
    proxy, _ = site
    attacker = H2Client(proxy.address, raw=True)
    try:
        with contextlib.suppress(OSError):
            attacker.send_raw(frame(HEADERS, END_STREAM, 1, hpack.Encoder().encode(REQUEST)))
            attacker.send_raw(frame(CONTINUATION, 0, 1) * 10000)
        _cut_off(attacker)
    finally:
        attacker.close()


def test_unfinished_header_block_times_out(site):
    proxy, _ = site
    attacker = H2Client(proxy.address, raw=True)
    try:
        attacker.send_raw(frame(HEADERS, END_STREAM, 1, hpack.Encoder().encode(REQUEST)))
        started = time.monotonic()
        assert attacker.wait_closed(5)
        assert time.monotonic() - started < 4
    finally:
        attacker.close()


def test_hpack_bomb_is_refused(site):
    proxy, origin = site
    bystander = Bystander(proxy)
    attacker = H2Client(proxy.address, raw=True)
    try:
        # One 4 KiB entry into the dynamic table, then referenced a thousand times.
        encoder = hpack.Encoder()
        first = encoder.encode([*REQUEST, (b"x-big", b"v" * 4000)])
        again = encoder.encode([*REQUEST] + [(b"x-big", b"v" * 4000)] * 1000)
        with contextlib.suppress(OSError):
            attacker.send_raw(frame(HEADERS, END_STREAM | END_HEADERS, 1, first))
            attacker.send_raw(frame(HEADERS, END_STREAM | END_HEADERS, 3, again))
        assert attacker.wait_closed(10)
        assert attacker.goaway is not None
    finally:
        attacker.close()
        bystander.stop()
    assert len([r for r in origin.requests if r.path == "/"]) <= 1


def test_too_many_header_fields_is_431(site):
    proxy, origin = site
    client = H2Client(proxy.address)
    try:
        crumbs = [(b"cookie", b"c%d=1" % i) for i in range(150)]  # cookie crumbs count too
        many = client.get("/", headers=crumbs)
        large = client.get("/", headers=[(b"x-large", b"v" * 62000)])
        after = client.get("/fine")
    finally:
        client.close()
    assert many.status == 431 and many.header(b"x-meshproxy-error") == b"headers_too_large"
    assert large.status == 431
    assert after.status == 200
    assert [r.path for r in origin.requests] == ["/fine"]


def test_streams_over_the_limit_are_refused(site):
    proxy, _ = site
    client = H2Client(proxy.address)
    try:
        client.pump(0.2)  # the proxy's SETTINGS, acknowledged: its limit binds from now on
        time.sleep(0.1)
        ids = []
        for _ in range(101):  # the limit is 100; h2 would not let us send one more
            sid = client.conn.get_next_available_stream_id()
            _unlimit(client)
            client.conn.send_headers(sid, [*REQUEST[:3], (b":path", b"/slow")], end_stream=True)
            client.responses[sid] = Response()
            ids.append(sid)
        client.flush()
        results = [client.wait(sid, 20) for sid in ids]
    finally:
        client.close()
    refused = [r for r in results if r.reset == REFUSED_STREAM]
    assert len(refused) == 1
    assert sum(r.status == 200 for r in results) == 100


def test_idle_connection_gets_goaway():
    origin = Origin("h1")
    proxy = InProcessProxy(http_config([route("all", "up")], [cluster("up", [origin])]),
                           limits=H2Limits(idle_timeout=0.5))
    client = H2Client(proxy.address)
    try:
        assert client.get("/").status == 200
        started = time.monotonic()
        assert client.wait_closed(5)
        assert 0.3 < time.monotonic() - started < 3
        assert client.goaway is not None and client.goaway.error_code == 0
    finally:
        client.close()
        proxy.close()
        origin.close()


def test_client_that_reads_nothing_loses_its_connection():
    origin = Origin("h1")
    origin.on("/big", respond(200, b"z" * (16 << 20)))
    limits = H2Limits(write_stall_timeout=1.0, outbound_cap=256 * 1024)
    proxy = InProcessProxy(http_config([route("all", "up")], [cluster("up", [origin])]), limits=limits)
    attacker = H2Client(proxy.address)
    try:
        attacker.sock.setsockopt(__import__("socket").SOL_SOCKET, __import__("socket").SO_RCVBUF, 4096)
        attacker.conn.update_settings({4: 2**31 - 1})  # INITIAL_WINDOW_SIZE: all it can take
        attacker.conn.increment_flow_control_window(2**31 - 1 - 65535)
        attacker.request("/big")
        time.sleep(3)  # never reading
        assert attacker.wait_closed(10)
        assert proxy.stats.listeners["in"].active == 0
    finally:
        attacker.close()
        proxy.close()
        origin.close()


def test_a_client_that_stops_reading_and_hangs_up_costs_only_its_connection(site):
    """Half a megabyte queued for a client that reads nothing, then its half-close: the
    final GOAWAY waits behind it, and the listener goes on serving everyone else."""
    proxy, origin = site
    origin.on("/big", respond(200, b"x" * 65536))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(proxy.address)
    encoder = hpack.Encoder()
    try:
        data = PREFACE + frame(4, 0, 0, b"\x00\x04\x7f\xff\xff\xff") + frame(8, 0, 0, b"\x10\x00\x00\x00")
        for sid in range(1, 100, 2):
            data += frame(HEADERS, END_STREAM | END_HEADERS, sid, encoder.encode([*REQUEST[:3], (b":path", b"/big")]))
        sock.sendall(data)
        time.sleep(1.0)
        sock.shutdown(socket.SHUT_WR)
        time.sleep(1.5)
        client = H2Client(proxy.address)
        try:
            assert client.get("/after").status == 200
        finally:
            client.close()
    finally:
        sock.close()
    assert proxy.error is None
