"""proxy._core.iobuf: receive buffers and resumable sends on plain fds."""

from __future__ import annotations

import socket
import struct

import pytest

from proxy._core.iobuf import RecvBuffer, peer_closed, send_from


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    yield a, b
    a.close()
    b.close()


def test_recv_appends_and_consume_drops_from_the_front(pair):
    a, b = pair
    buf = RecvBuffer(16)
    assert buf.recv(a.fileno()) == -1  # nothing yet
    b.send(b"hello world")
    assert buf.recv(a.fileno()) == 11
    assert bytes(buf.data[buf.start:buf.end]) == b"hello world"
    buf.consume(6)
    assert buf.take(100) == b"world"
    assert len(buf) == 0 and buf.start == 0


def test_full_buffer_compacts_then_reports_full(pair):
    a, b = pair
    buf = RecvBuffer(8)
    b.send(b"12345678")
    assert buf.recv(a.fileno()) == 8
    assert buf.recv(a.fileno()) == -2  # full, nothing consumed
    buf.consume(5)
    b.send(b"abcdefgh")
    assert buf.recv(a.fileno()) == 5  # compacted: "678" moved to the front
    assert bytes(buf.data[buf.start:buf.end]) == b"678abcde"


def test_eof_and_reset(pair):
    a, b = pair
    buf = RecvBuffer()
    b.close()
    assert buf.recv(a.fileno()) == 0
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        peer, _ = server.accept()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        peer.setblocking(False)
        with pytest.raises(ConnectionResetError):
            while buf.recv(peer.fileno()) != 0:
                pass
        peer.close()


def test_send_from_resumes_at_the_offset(pair):
    a, b = pair
    data = memoryview(b"x" * 5_000_000)
    offset = 0
    received = 0
    while offset < len(data):
        n = send_from(a.fileno(), data, offset)
        if n > 0:
            offset += n
        try:
            while chunk := b.recv(1 << 20):
                received += len(chunk)
        except BlockingIOError:
            pass
    while received < len(data):
        received += len(b.recv(1 << 20))
    assert received == len(data)


def test_send_to_forwards_buffered_bytes(pair):
    a, b = pair
    buf = RecvBuffer()
    b.send(b"forward me")
    buf.recv(a.fileno())
    assert buf.send_to(a.fileno(), 7) == 7
    assert b.recv(100) == b"forward"
    assert buf.take(100) == b" me"


def test_peer_closed_sees_eof_but_not_an_idle_peer(pair):
    a, b = pair
    assert not peer_closed(a.fileno())
    b.close()
    assert peer_closed(a.fileno())
