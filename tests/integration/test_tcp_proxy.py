"""The L4 proxy end to end: a client, meshproxy processes, upstreams started by the test.

Forwarding behaviour is checked over both data paths (`splice: true` and `splice: false`);
they must be indistinguishable from outside.
"""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
import trio

from .support import (
    Exchange,
    close_with_reset,
    connect,
    endpoint,
    fd_kinds,
    is_open,
    pattern,
    read_to_eof,
    recv_exactly,
    roundtrip,
    sha256,
    stopped,
    tcp_config,
    wait_closed,
    wait_for,
)

SPLICE = pytest.mark.parametrize("splice", [True, False], ids=["splice", "copy"])

BULK = 64 * 1024 * 1024
# Idle pipes the splice pump keeps per worker (PIPE_POOL_CAP in _core/splice.pyx), 2 fds each.
PIPE_POOL_FDS = 2 * 256


@pytest.fixture(scope="module")
def bulk_payloads() -> tuple[bytes, bytes]:
    """64 MiB for each direction, different from each other and never repeating."""
    return pattern(BULK, seed=1), pattern(BULK, seed=2)


def _served(client) -> bool:
    """Whether an echo round trip works on `client` (False when the proxy closed it)."""
    try:
        client.sendall(b"x")
        return client.recv(1) == b"x"
    except (ConnectionError, TimeoutError):
        return False


def roundtrip_pair(client, server) -> None:
    """One byte each way between a client and the upstream connection it reached."""
    client.sendall(b"c")
    assert recv_exactly(server, 1) == b"c"
    server.sendall(b"s")
    assert recv_exactly(client, 1) == b"s"


# -- bytes -----------------------------------------------------------------------------------


@pytest.mark.slow
@SPLICE
def test_64_mib_each_way_at_once_arrive_byte_exact(meshproxy, upstreams, splice, bulk_payloads):
    to_upstream, to_client = bulk_payloads
    acceptor = upstreams.acceptor(timeout=60)
    proxy = meshproxy(tcp_config([endpoint(acceptor.address)], splice=splice))

    client = connect(proxy.address(), timeout=60)
    server = acceptor.accept()
    upstream_side = Exchange(server, to_client, expect=BULK).start()
    client_side = Exchange(client, to_upstream, expect=BULK).start()

    assert client_side.result(timeout=90) == (BULK, sha256(to_client))
    assert upstream_side.result(timeout=30) == (BULK, sha256(to_upstream))
    # Nothing extra follows the payloads: each side's FIN arrives as a clean EOF.
    client.shutdown(socket.SHUT_WR)
    assert read_to_eof(server) == b""
    server.shutdown(socket.SHUT_WR)
    assert read_to_eof(client) == b""


@SPLICE
def test_a_slow_reader_slows_the_sender_and_loses_nothing(meshproxy, upstreams, splice):
    """Backpressure: while the client reads nothing the proxy holds only what the socket
    buffers and its pipe take, so the upstream's sends stall; then every byte arrives."""
    acceptor = upstreams.acceptor(timeout=30)
    proxy = meshproxy(tcp_config([endpoint(acceptor.address)], splice=splice))
    client = connect(proxy.address(), timeout=30)
    server = acceptor.accept()
    size = 64 * 1024 * 1024
    payload = pattern(size, seed=5)
    sent = [0]

    def send_all() -> None:
        view = memoryview(payload)
        for offset in range(0, size, 256 * 1024):
            server.sendall(view[offset:offset + 256 * 1024])
            sent[0] = offset + 256 * 1024

    sender = threading.Thread(target=send_all, daemon=True)
    sender.start()
    # Wait until the sender is stuck, i.e. its count stops moving.
    stalled = [-1]

    def stuck() -> bool:
        before = sent[0]
        time.sleep(0.3)
        stalled[0] = sent[0]
        return sent[0] == before

    wait_for(stuck, timeout=10, what="the upstream's sends to stall")
    assert stalled[0] < size // 2, f"{stalled[0]} bytes taken in while the client read nothing"

    assert sha256(recv_exactly(client, size)) == sha256(payload)
    sender.join(10)
    assert not sender.is_alive()


@pytest.mark.slow
@SPLICE
def test_sixteen_bulk_transfers_at_once_are_byte_exact(meshproxy, upstreams, splice):
    acceptor = upstreams.acceptor(timeout=60)
    proxy = meshproxy(tcp_config([endpoint(acceptor.address)], splice=splice))
    size = 4 * 1024 * 1024
    exchanges = []
    for i in range(16):
        client = connect(proxy.address(), timeout=60)
        server = acceptor.accept()
        up, down = pattern(size, seed=100 + 2 * i), pattern(size, seed=101 + 2 * i)
        exchanges.append((Exchange(client, up, expect=size).start(), sha256(down),
                          Exchange(server, down, expect=size).start(), sha256(up)))
    for client_side, down_hash, server_side, up_hash in exchanges:
        assert client_side.result(timeout=60) == (size, down_hash)
        assert server_side.result(timeout=60) == (size, up_hash)


@SPLICE
def test_many_small_segments_then_silence_are_all_delivered(meshproxy, upstreams, splice):
    """A client that pipelines many tiny writes and then waits (a database pipeline): the
    proxy must pass every byte on without more data arriving to wake it. One splice into a
    pipe can take fewer segments than the socket holds, so a short splice is no sign that
    the socket is empty."""
    acceptor = upstreams.acceptor(timeout=5)
    proxy = meshproxy(tcp_config([endpoint(acceptor.address)], splice=splice))
    client = connect(proxy.address(), timeout=5)
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    server = acceptor.accept()
    (worker,) = proxy.worker_pids()
    for round_ in range(3):
        writes = [pattern(50, seed=round_ * 1000 + i) for i in range(400)]
        # All segments queue up before the proxy looks: one wake-up must take them all.
        with stopped(worker):
            for piece in writes:
                client.send(piece)
            time.sleep(0.05)
        expected = b"".join(writes)
        assert recv_exactly(server, len(expected)) == expected  # recv_exactly times out on a stall
        server.sendall(b"ok")
        assert recv_exactly(client, 2) == b"ok"


# -- half-close ------------------------------------------------------------------------------


@SPLICE
def test_client_fin_reaches_upstream_and_the_reply_still_arrives(meshproxy, upstreams, splice):
    acceptor = upstreams.acceptor(timeout=5)
    proxy = meshproxy(tcp_config([endpoint(acceptor.address)], splice=splice))
    client = connect(proxy.address(), timeout=5)
    server = acceptor.accept()

    request = b"request: the whole of it"
    client.sendall(request)
    assert recv_exactly(server, len(request)) == request
    client.shutdown(socket.SHUT_WR)
    # The upstream sees the client's FIN as EOF...
    assert read_to_eof(server) == b""
    # ...and its reply, sent after that EOF, still reaches the client, then its FIN.
    reply = pattern(3 * 1024 * 1024, seed=3)
    server.sendall(reply)
    assert sha256(recv_exactly(client, len(reply))) == sha256(reply)
    server.shutdown(socket.SHUT_WR)
    assert read_to_eof(client) == b""


@SPLICE
def test_upstream_fin_reaches_client_and_the_client_can_still_send(meshproxy, upstreams, splice):
    acceptor = upstreams.acceptor(timeout=5)
    proxy = meshproxy(tcp_config([endpoint(acceptor.address)], splice=splice))
    client = connect(proxy.address(), timeout=5)
    server = acceptor.accept()

    banner = b"banner, then no more from me"
    server.sendall(banner)
    assert recv_exactly(client, len(banner)) == banner
    server.shutdown(socket.SHUT_WR)
    assert read_to_eof(client) == b""
    # The other direction is still open, through the proxy, for a lot of bytes.
    upload = pattern(3 * 1024 * 1024, seed=4)
    client.sendall(upload)
    assert sha256(recv_exactly(server, len(upload))) == sha256(upload)
    client.shutdown(socket.SHUT_WR)
    assert read_to_eof(server) == b""


@SPLICE
@pytest.mark.parametrize("sender", ["client", "upstream"])
def test_bytes_and_fin_arriving_together_are_both_passed_on(meshproxy, upstreams, splice, sender):
    """The last bytes and the FIN reach the proxy in one wake-up (the worker is held
    stopped while they are sent): both must be passed on, the FIN included."""
    acceptor = upstreams.acceptor(timeout=5)
    proxy = meshproxy(tcp_config([endpoint(acceptor.address)], splice=splice))
    client = connect(proxy.address(), timeout=5)
    server = acceptor.accept()
    roundtrip_pair(client, server)
    source, sink = (client, server) if sender == "client" else (server, client)

    (worker,) = proxy.worker_pids()
    with stopped(worker):
        source.sendall(b"last words")
        source.shutdown(socket.SHUT_WR)
    sink.settimeout(2)
    assert read_to_eof(sink) == b"last words"


# -- resets ----------------------------------------------------------------------------------


@SPLICE
def test_upstream_reset_reaches_client_as_reset(meshproxy, upstreams, splice):
    acceptor = upstreams.acceptor(timeout=5)
    proxy = meshproxy(tcp_config([endpoint(acceptor.address)], splice=splice))
    client = connect(proxy.address(), timeout=5)
    server = acceptor.accept()
    client.sendall(b"ping")
    assert recv_exactly(server, 4) == b"ping"
    server.sendall(b"partial answer")
    assert recv_exactly(client, 14) == b"partial answer"

    close_with_reset(server)
    # The reset is passed on: the client's next read fails with ECONNRESET, it does not
    # see an orderly EOF that would pass for a complete answer.
    assert wait_closed(client, timeout=2) == "reset"


@SPLICE
def test_client_reset_reaches_upstream_as_reset(meshproxy, upstreams, splice):
    acceptor = upstreams.acceptor(timeout=5)
    proxy = meshproxy(tcp_config([endpoint(acceptor.address)], splice=splice))
    client = connect(proxy.address(), timeout=5)
    server = acceptor.accept()
    server.sendall(b"hello")
    assert recv_exactly(client, 5) == b"hello"

    close_with_reset(client)
    assert wait_closed(server, timeout=2) == "reset"


@SPLICE
def test_bytes_and_reset_arriving_together_end_the_client_connection(meshproxy, upstreams, splice):
    """The upstream's last bytes and its RST reach the proxy in one wake-up: the client
    must not be left waiting on a connection whose upstream is gone."""
    acceptor = upstreams.acceptor(timeout=5)
    proxy = meshproxy(tcp_config([endpoint(acceptor.address)], splice=splice))
    client = connect(proxy.address(), timeout=5)
    server = acceptor.accept()
    roundtrip_pair(client, server)

    (worker,) = proxy.worker_pids()
    with stopped(worker):
        server.sendall(b"cut short")
        close_with_reset(server)
    # Whether the bytes that came with the reset are delivered is up to the kernel;
    # the connection must end, and not with a clean EOF.
    assert wait_closed(client, timeout=2) == "reset"


@SPLICE
def test_upstream_reset_with_bytes_still_queued_for_a_slow_client(meshproxy, upstreams, splice):
    """The upstream resets while the proxy still holds bytes the client has not taken:
    the client gets a prefix of the stream and then a reset, never a clean EOF."""
    acceptor = upstreams.acceptor(timeout=10)
    proxy = meshproxy(tcp_config([endpoint(acceptor.address)], splice=splice))
    client = connect(proxy.address(), timeout=10)
    server = acceptor.accept()
    payload = pattern(32 * 1024 * 1024, seed=6)
    server.settimeout(1)
    offset = 0
    try:
        while offset < len(payload):  # fill every buffer on the way to the client
            offset += server.send(payload[offset:offset + 65536])
    except TimeoutError:
        pass
    assert offset < len(payload), "nothing pushed back"
    close_with_reset(server)

    received = bytearray()
    client.settimeout(3)
    with pytest.raises(ConnectionResetError):
        while True:
            chunk = client.recv(1 << 20)
            assert chunk, f"clean EOF after {len(received)} bytes, the upstream reset"
            received += chunk
    assert bytes(received) == payload[:len(received)]


# -- upstream connect failures -----------------------------------------------------------------


def test_refused_endpoint_is_skipped_for_the_next_one(meshproxy, upstreams):
    dead = upstreams.refused()
    echo = upstreams.echo()
    proxy = meshproxy(tcp_config([endpoint(dead.address), endpoint(echo.address)]))
    for i in range(20):
        with connect(proxy.address(), timeout=3) as client:
            roundtrip(client, f"connection {i}".encode())
    assert echo.accepted == 20


def test_five_endpoints_are_tried_before_giving_up(meshproxy, upstreams):
    dead = [upstreams.refused() for _ in range(4)]
    echo = upstreams.echo()
    endpoints = [endpoint(d.address) for d in dead] + [endpoint(echo.address)]
    proxy = meshproxy(tcp_config(endpoints))
    for i in range(10):
        with connect(proxy.address(), timeout=3) as client:
            roundtrip(client, f"connection {i}".encode())
    assert echo.accepted == 10


@pytest.mark.parametrize("client_sends", [False, True], ids=["silent-client", "client-sent-data"])
def test_all_endpoints_refused_closes_the_client_promptly(meshproxy, upstreams, client_sends):
    dead = [upstreams.refused() for _ in range(3)]
    proxy = meshproxy(tcp_config([endpoint(d.address) for d in dead]))
    for _ in range(5):
        with connect(proxy.address(), timeout=3) as client:
            started = time.monotonic()
            if client_sends:
                client.sendall(b"anyone there?")
            # EOF, or a reset when the proxy closes with our bytes unread: either way closed.
            assert wait_closed(client, timeout=2) in ("eof", "reset")
            assert time.monotonic() - started < 1.0


def test_connect_timeout_closes_the_client(meshproxy, upstreams):
    blackhole = upstreams.blackhole()
    proxy = meshproxy(tcp_config([endpoint(blackhole.address)], connect_timeout="500ms"))
    with connect(proxy.address(), timeout=3) as client:
        started = time.monotonic()
        assert wait_closed(client, timeout=3) in ("eof", "reset")
        elapsed = time.monotonic() - started
    assert 0.45 <= elapsed < 1.5, f"closed after {elapsed:.3f}s, connect_timeout is 0.5s"


def test_connect_timeout_moves_on_to_the_next_endpoint(meshproxy, upstreams):
    blackhole = upstreams.blackhole()
    echo = upstreams.echo()
    proxy = meshproxy(
        tcp_config([endpoint(blackhole.address), endpoint(echo.address)], connect_timeout="300ms")
    )
    durations = []
    for i in range(4):
        started = time.monotonic()
        with connect(proxy.address(), timeout=3) as client:
            roundtrip(client, f"connection {i}".encode())
        durations.append(time.monotonic() - started)
    assert echo.accepted == 4
    # Round robin sends half the connections to the black hole first: those wait out
    # the connect timeout, then succeed on the echo server.
    assert max(durations) >= 0.28, durations
    assert max(durations) < 1.5, durations
    assert min(durations) < 0.2, durations


# -- idle timeout ----------------------------------------------------------------------------


@SPLICE
def test_idle_timeout_closes_both_sides_after_idle_not_before(meshproxy, upstreams, splice):
    acceptor = upstreams.acceptor(timeout=5)
    proxy = meshproxy(tcp_config([endpoint(acceptor.address)], splice=splice, idle_timeout="500ms"))
    client = connect(proxy.address(), timeout=5)
    server = acceptor.accept()
    client.sendall(b"q")
    assert recv_exactly(server, 1) == b"q"
    server.sendall(b"a")
    assert recv_exactly(client, 1) == b"a"
    last_activity = time.monotonic()

    time.sleep(0.35)
    assert is_open(client) and is_open(server), "closed before idle_timeout"

    assert wait_closed(client, timeout=3) in ("eof", "reset")
    idle = time.monotonic() - last_activity
    assert wait_closed(server, timeout=0.5) in ("eof", "reset")
    assert 0.45 <= idle < 1.5, f"closed after {idle:.3f}s idle, idle_timeout is 0.5s"


@SPLICE
@pytest.mark.parametrize("direction", ["client-to-upstream", "upstream-to-client"])
def test_traffic_either_way_resets_the_idle_timer(meshproxy, upstreams, splice, direction):
    acceptor = upstreams.acceptor(timeout=5)
    proxy = meshproxy(tcp_config([endpoint(acceptor.address)], splice=splice, idle_timeout="500ms"))
    client = connect(proxy.address(), timeout=5)
    server = acceptor.accept()
    sender, receiver = (client, server) if direction == "client-to-upstream" else (server, client)

    # Three idle timeouts' worth of traffic in one direction only, a byte every 150ms.
    started = time.monotonic()
    while time.monotonic() - started < 1.5:
        sender.sendall(b".")
        assert recv_exactly(receiver, 1) == b"."
        last_activity = time.monotonic()
        time.sleep(0.15)
    assert is_open(client) and is_open(server)

    assert wait_closed(client, timeout=3) in ("eof", "reset")
    idle = time.monotonic() - last_activity
    assert wait_closed(server, timeout=0.5) in ("eof", "reset")
    assert 0.45 <= idle < 1.5, f"closed after {idle:.3f}s idle, idle_timeout is 0.5s"


# -- max_connections -------------------------------------------------------------------------


def test_max_connections_closes_the_excess_at_once(meshproxy, upstreams):
    echo = upstreams.echo()
    proxy = meshproxy(tcp_config([endpoint(echo.address)], max_connections=2))
    first = connect(proxy.address(), timeout=3)
    second = connect(proxy.address(), timeout=3)
    roundtrip(first, b"one")
    roundtrip(second, b"two")

    for _ in range(3):
        with connect(proxy.address(), timeout=3) as excess:
            started = time.monotonic()
            assert wait_closed(excess, timeout=1) in ("eof", "reset")
            assert time.monotonic() - started < 0.5
    assert echo.accepted == 2, "an excess connection reached the upstream"

    # The connections under the cap were not disturbed.
    roundtrip(first, b"one, still")
    roundtrip(second, b"two, still")

    # Once one closes, there is room again.
    first.close()

    def served() -> bool:
        with connect(proxy.address(), timeout=3) as client:
            try:
                client.sendall(b"three")
                return recv_exactly(client, 5) == b"three"
            except (AssertionError, ConnectionError):
                return False

    wait_for(served, timeout=3, what="a connection to be served after one closed")
    second.close()


def test_max_connections_counts_a_burst_of_accepts(meshproxy, upstreams):
    """Connections queued while the worker was busy are accepted in one burst; the cap
    still holds for them."""
    echo = upstreams.echo()
    proxy = meshproxy(tcp_config([endpoint(echo.address)], max_connections=2))
    (worker,) = proxy.worker_pids()
    with stopped(worker):
        clients = [connect(proxy.address(), timeout=3) for _ in range(10)]
    try:
        served = sum(_served(client) for client in clients)
        assert served == 2, f"{served} connections served with max_connections: 2"
    finally:
        for client in clients:
            client.close()


def test_max_connections_is_split_between_workers_rounding_up(meshproxy, upstreams):
    echo = upstreams.echo()
    # 3 over 2 workers: 2 each, so at most 4 at once.
    proxy = meshproxy(tcp_config([endpoint(echo.address)], workers=2, max_connections=3))
    workers = proxy.worker_pids()
    before = {pid: fd_kinds(pid)["socket"] for pid in workers}

    # One at a time, each checked before the next: a worker's count is always current.
    clients = []
    served = 0
    try:
        for _ in range(16):
            client = connect(proxy.address(), timeout=3)
            clients.append(client)
            served += _served(client)
        held = {pid: fd_kinds(pid)["socket"] - before[pid] for pid in workers}
        # Each worker holds two sockets (client, upstream) per open connection.
        assert all(n <= 4 for n in held.values()), held
        # Fewer than 3 only if all 16 hashed to one worker: probability 2**-15.
        assert 3 <= served <= 4, (served, held)
    finally:
        for client in clients:
            client.close()


def test_connections_that_failed_to_connect_leave_the_cap(meshproxy, upstreams):
    dead = upstreams.refused()
    proxy = meshproxy(tcp_config([endpoint(dead.address)], max_connections=2))
    for _ in range(5):
        with connect(proxy.address(), timeout=3) as client:
            assert wait_closed(client, timeout=2) in ("eof", "reset")

    # The endpoint comes up on the same port: two connections fit under the cap again.
    dead.sock.listen(8)
    dead.sock.settimeout(5)
    opened = []
    try:
        for _ in range(2):
            client = connect(proxy.address(), timeout=5)
            opened.append(client)
            server = dead.sock.accept()[0]
            opened.append(server)
            server.settimeout(5)
            roundtrip_pair(client, server)
    finally:
        for sock in opened:
            sock.close()


# -- many connections, and no fd left behind ---------------------------------------------------


def _worker_fds(proxy) -> dict[int, dict[str, int]]:
    return {pid: dict(fd_kinds(pid)) for pid in proxy.worker_pids()}


def _assert_fds_back_to(proxy, baseline: dict[int, dict[str, int]], timeout: float) -> None:
    """Every kind of fd back to exactly the start, except pipes: up to the splice pool's worth more."""

    def settled_for(pid: int, now: dict[str, int]) -> bool:
        start = baseline[pid]
        kinds = (set(now) | set(start)) - {"pipe"}
        return all(now.get(kind, 0) == start.get(kind, 0) for kind in kinds) and (
            now.get("pipe", 0) <= start.get("pipe", 0) + PIPE_POOL_FDS
        )

    def settled() -> bool:
        now = _worker_fds(proxy)
        return now.keys() == baseline.keys() and all(settled_for(pid, fds) for pid, fds in now.items())

    try:
        wait_for(settled, timeout, "worker fds to return to where they started")
    except AssertionError:
        raise AssertionError(f"fds at start {baseline}, now {_worker_fds(proxy)}") from None


@pytest.mark.slow
@SPLICE
async def test_a_thousand_concurrent_connections_are_served_and_leave_no_fds(meshproxy, upstreams, splice):
    echo = upstreams.echo()
    proxy = meshproxy(tcp_config([endpoint(echo.address)], workers=2, splice=splice))
    baseline = _worker_fds(proxy)
    address = proxy.address()
    count = 1000
    served = 0
    all_served = trio.Event()
    release = trio.Event()
    connect_slots = trio.CapacityLimiter(200)

    async def one(i: int) -> None:
        nonlocal served
        sock = trio.socket.socket()
        try:
            async with connect_slots:
                await sock.connect(address)
            message = f"connection {i:04d} ".encode() * 8
            await sock.send(message)
            received = b""
            while len(received) < len(message):
                chunk = await sock.recv(65536)
                assert chunk, f"connection {i}: EOF after {len(received)} bytes"
                received += chunk
            assert received == message
            served += 1
            if served == count:
                all_served.set()
            await release.wait()  # hold every connection open until all are counted
        finally:
            sock.close()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for i in range(count):
                nursery.start_soon(one, i)
            await all_served.wait()
            # All 1000 open and proxied at this moment: two sockets each in the workers.
            held = sum(
                fds.get("socket", 0) - baseline[pid].get("socket", 0)
                for pid, fds in _worker_fds(proxy).items()
            )
            assert held == 2 * count, held
            release.set()
    assert served == count
    assert echo.accepted == count
    await trio.to_thread.run_sync(_assert_fds_back_to, proxy, baseline, 10.0)


@pytest.mark.slow
async def test_ten_thousand_connections_to_a_dead_endpoint_are_closed_and_leave_no_fds(
    meshproxy, upstreams
):
    dead = upstreams.refused()
    proxy = meshproxy(tcp_config([endpoint(dead.address)], workers=2))
    baseline = _worker_fds(proxy)
    address = proxy.address()
    count = 10_000
    outcomes = {"eof": 0, "reset": 0}
    slowest = 0.0
    slots = trio.CapacityLimiter(100)

    async def one() -> None:
        nonlocal slowest
        async with slots:
            sock = trio.socket.socket()
            try:
                started = trio.current_time()
                await sock.connect(address)
                with trio.fail_after(2):
                    try:
                        outcome = "eof" if await sock.recv(1) == b"" else "data"
                    except ConnectionResetError:
                        outcome = "reset"
                assert outcome != "data", "a dead endpoint produced bytes"
                outcomes[outcome] += 1
                slowest = max(slowest, trio.current_time() - started)
                # Close with a reset: the proxy closed first, so this leaves no TIME_WAIT.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            finally:
                sock.close()

    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(one)
    assert sum(outcomes.values()) == count, outcomes
    assert slowest < 2.0
    await trio.to_thread.run_sync(_assert_fds_back_to, proxy, baseline, 10.0)
