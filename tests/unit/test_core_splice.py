"""The one-direction pumps of proxy._core.splice, on real loopback TCP sockets.

Every test runs against both pumps: splice(2) through a pipe and recv/send.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct

import pytest

from proxy._core import sockops
from proxy._core.splice import (
    PUMP_BUDGET,
    PUMP_EOF,
    PUMP_READ_ERROR,
    PUMP_WANT_READ,
    PUMP_WANT_WRITE,
    PUMP_WRITE_ERROR,
    CopyPump,
    SplicePump,
    pooled_pipes,
)

PUMPS = [SplicePump, CopyPump]


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
    return client, peer


@pytest.fixture
def link():
    """writer -> [src] pump [dst] -> reader: two TCP connections joined by a pump."""
    writer, src = tcp_pair()
    dst, reader = tcp_pair()
    for sock in (src, dst):
        sock.setblocking(False)
    yield writer, src, dst, reader
    for sock in (writer, src, dst, reader):
        sock.close()


def run_until(pump, statuses, limit=10_000):
    for _ in range(limit):
        status = pump.pump()
        if status in statuses:
            return status
    raise AssertionError(f"pump never reached {statuses}")


@pytest.mark.parametrize("pump_type", PUMPS)
def test_moves_bytes_and_reports_short_read(link, pump_type):
    writer, src, dst, reader = link
    pump = pump_type(src.fileno(), dst.fileno())
    writer.sendall(b"hello")
    # A short read means the socket is drained: the pump says so without
    # spending a second read that would only get EAGAIN.
    assert pump.pump() == PUMP_WANT_READ
    assert reader.recv(100) == b"hello"
    assert pump.pump() == PUMP_WANT_READ
    assert pump.bytes == 5 and pump.pending() == 0
    pump.close()


@pytest.mark.parametrize("pump_type", PUMPS)
def test_eof_after_every_byte_is_delivered(link, pump_type):
    writer, src, dst, reader = link
    pump = pump_type(src.fileno(), dst.fileno())
    payload = os.urandom(300_000)
    writer.sendall(payload)
    writer.shutdown(socket.SHUT_WR)
    received = bytearray()
    reader.setblocking(False)
    while True:
        status = pump.pump()
        try:
            while chunk := reader.recv(1 << 20):
                received += chunk
        except BlockingIOError:
            pass
        if status == PUMP_EOF:
            break
    sockops.shutdown_write(dst.fileno())
    reader.setblocking(True)
    while chunk := reader.recv(1 << 20):
        received += chunk
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    assert pump.bytes == len(payload)


@pytest.mark.parametrize("pump_type", PUMPS)
def test_full_destination_asks_to_wait_for_writable(link, pump_type):
    writer, src, dst, reader = link
    dst.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    pump = pump_type(src.fileno(), dst.fileno())
    writer.setblocking(False)
    sent = 0
    try:
        while sent < 8 << 20:
            sent += writer.send(b"x" * 65536)
    except BlockingIOError:
        pass
    assert run_until(pump, {PUMP_WANT_WRITE}) == PUMP_WANT_WRITE
    assert pump.pending() > 0


@pytest.mark.parametrize("pump_type", PUMPS)
def test_budget_bounds_the_work_per_call(link, pump_type):
    writer, src, dst, reader = link
    pump = pump_type(src.fileno(), dst.fileno())
    writer.sendall(b"y" * 200_000)
    assert pump.pump(1) == PUMP_BUDGET
    assert 0 < pump.bytes < 200_000


@pytest.mark.parametrize("pump_type", PUMPS)
def test_reset_source_is_a_read_error(link, pump_type):
    writer, src, dst, reader = link
    pump = pump_type(src.fileno(), dst.fileno())
    writer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()
    assert run_until(pump, {PUMP_READ_ERROR, PUMP_EOF}) == PUMP_READ_ERROR
    assert pump.error == 104  # ECONNRESET


@pytest.mark.parametrize("pump_type", PUMPS)
def test_reset_destination_is_a_write_error(link, pump_type):
    writer, src, dst, reader = link
    pump = pump_type(src.fileno(), dst.fileno())
    reader.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    reader.close()
    writer.sendall(b"z" * 1000)
    status = run_until(pump, {PUMP_WRITE_ERROR})
    assert status == PUMP_WRITE_ERROR
    assert pump.error in (32, 104)  # EPIPE or ECONNRESET


def test_splice_pumps_hold_pipes_only_while_bytes_are_stuck(link):
    writer, src, dst, reader = link
    before = len(os.listdir("/proc/self/fd"))
    pumps = [SplicePump(src.fileno(), dst.fileno()) for _ in range(50)]
    assert len(os.listdir("/proc/self/fd")) == before  # no pipe until a pump runs
    assert all(p.pump() == PUMP_WANT_READ for p in pumps)
    # Each emptied pipe went back to the shared pool: at most one pair is new.
    assert len(os.listdir("/proc/self/fd")) <= before + 2
    for pump in pumps:
        pump.close()
    assert pooled_pipes() >= 1


def test_accept_and_connect_on_plain_fds():
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.setblocking(False)
        assert sockops.accept_nonblocking(server.fileno()) == -1
        fd, in_progress = sockops.connect_nonblocking("127.0.0.1", server.getsockname()[1])
        accepted = -1
        for _ in range(1000):
            accepted = sockops.accept_nonblocking(server.fileno(), True)
            if accepted >= 0:
                break
        assert accepted >= 0
        assert sockops.socket_error(fd) == 0
        sockops.close_fd(accepted)
        sockops.close_fd(fd)


def test_connect_refused_and_bad_host():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    try:
        fd, in_progress = sockops.connect_nonblocking("127.0.0.1", port)
    except ConnectionRefusedError:
        pass
    else:
        assert in_progress
        import select

        select.select([], [fd], [], 2)
        assert sockops.socket_error(fd) == 111  # ECONNREFUSED
        sockops.close_fd(fd)
    with pytest.raises(ValueError):
        sockops.connect_nonblocking("not-an-ip", 80)


# -- the relay engine -------------------------------------------------------

import select  # noqa: E402

from proxy._core.splice import Relay, RelayEngine  # noqa: E402


@pytest.fixture
def relayed(request):
    """client <-> [client_fd] relay [upstream_fd] <-> server, driven by an engine."""
    client, client_end = tcp_pair()
    upstream_end, server = tcp_pair()
    for sock in (client_end, upstream_end):
        sock.setblocking(False)
    engine = RelayEngine()
    relay = Relay(client_end.fileno(), upstream_end.fileno(), request.param)
    finished = []
    relay.on_finish = lambda: finished.append(True)
    engine.add(relay)
    yield engine, relay, client, server, finished
    engine.close()
    for sock in (client, client_end, upstream_end, server):
        sock.close()


def drive(engine, until, timeout=5.0):
    """Run the engine the way the worker's task does, until `until()` holds."""
    import time

    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "engine made no progress"
        if not engine.has_backlog:
            select.select([engine.fileno()], [], [], 0.05)
        engine.run()


def at_eof(sock):
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False


def recv_exactly(sock, n):
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "unexpected EOF"
        data += chunk
    return bytes(data)


@pytest.mark.parametrize("relayed", [True, False], ids=["splice", "copy"], indirect=True)
def test_engine_relays_both_ways_and_passes_half_close_on(relayed):
    engine, relay, client, server, finished = relayed
    client.sendall(b"ping")
    drive(engine, lambda: relay.bytes_from_client == 4)
    assert recv_exactly(server, 4) == b"ping"
    client.shutdown(socket.SHUT_WR)
    drive(engine, lambda: at_eof(server))
    # The other direction still flows after the client's FIN.
    server.sendall(b"pong")
    drive(engine, lambda: relay.bytes_to_client == 4)
    assert recv_exactly(client, 4) == b"pong"
    assert not finished
    server.shutdown(socket.SHUT_WR)
    drive(engine, lambda: bool(finished))
    assert client.recv(10) == b""
    assert relay.finished and relay.reset_fd == -1 and len(engine) == 0


@pytest.mark.parametrize("relayed", [True, False], ids=["splice", "copy"], indirect=True)
def test_engine_moves_bulk_both_ways_at_once(relayed):
    engine, relay, client, server, finished = relayed
    size = 8 << 20
    out_up, out_down = os.urandom(size), os.urandom(size)
    got_up, got_down = bytearray(), bytearray()
    for sock in (client, server):
        sock.setblocking(False)
    sent_up = sent_down = 0

    def step():
        nonlocal sent_up, sent_down
        for sock, out, sent in ((client, out_up, sent_up), (server, out_down, sent_down)):
            if sent < size:
                try:
                    n = sock.send(out[sent:sent + 262144])
                except BlockingIOError:
                    n = 0
                if sock is client:
                    sent_up += n
                else:
                    sent_down += n
        for sock, got in ((server, got_up), (client, got_down)):
            try:
                got += sock.recv(1 << 20)
            except BlockingIOError:
                pass
        return len(got_up) == size and len(got_down) == size

    drive(engine, step, timeout=20)
    assert hashlib.sha256(got_up).digest() == hashlib.sha256(out_up).digest()
    assert hashlib.sha256(got_down).digest() == hashlib.sha256(out_down).digest()


@pytest.mark.parametrize("relayed", [True, False], ids=["splice", "copy"], indirect=True)
def test_engine_turns_an_upstream_reset_into_a_client_reset(relayed):
    engine, relay, client, server, finished = relayed
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    server.close()
    drive(engine, lambda: bool(finished))
    assert relay.reset_fd == relay.client_fd
    assert relay.error == 104  # ECONNRESET


@pytest.mark.parametrize("relayed", [True], ids=["splice"], indirect=True)
def test_discarded_relay_gets_no_more_service(relayed):
    engine, relay, client, server, finished = relayed
    engine.discard(relay)
    client.sendall(b"late")
    engine.run()
    assert relay.bytes_from_client == 0 and not finished and len(engine) == 0


@pytest.mark.parametrize("pump_type", PUMPS)
def test_limit_stops_at_a_message_boundary(link, pump_type):
    writer, src, dst, reader = link
    pump = pump_type(src.fileno(), dst.fileno())
    pump.limit = 100_000
    writer.sendall(b"a" * 100_000 + b"NEXT")
    assert run_until(pump, {PUMP_EOF}) == PUMP_EOF
    assert pump.bytes == 100_000
    assert recv_exactly(reader, 100_000) == b"a" * 100_000
    # The bytes after the limit stay in the source for whoever reads next.
    assert src.recv(10) == b"NEXT"
