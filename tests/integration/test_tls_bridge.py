"""The TLS bridge in one Trio loop over real loopback sockets: termination and origination
against each other and against plain `ssl` clients, half-close, backpressure, refusals."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
from collections.abc import Awaitable, Callable

import pytest
import trio

from integration.svid_certs import MemoryCa
from proxy.errors import UpstreamIdentityError, UpstreamTlsError
from proxy.identity.tls import TlsContexts
from proxy.net import tls_bridge
from proxy.net.tls_bridge import TlsBridges
from proxy.telemetry import ListenerStats

WEB = "spiffe://mesh.local/ns/default/sa/web"
API = "spiffe://mesh.local/ns/default/sa/api"
CA = MemoryCa("mesh.local")


def contexts(identity: str, ca: MemoryCa = CA) -> TlsContexts:
    chain, key = ca.svid(identity)
    return TlsContexts.build(chain, key, CA.bundle_pem, identity)


def fd_socket(fd: int) -> trio.socket.SocketType:
    return trio.socket.from_stdlib_socket(socket.socket(fileno=fd))


async def send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view):]


async def read_to_eof(sock: trio.socket.SocketType) -> bytes:
    data = bytearray()
    while chunk := await sock.recv(65536):
        data += chunk
    return bytes(data)


Driver = Callable[[int], Awaitable[None]]


class Server:
    """A listening socket whose connections go through `serve_downstream` to `driver`."""

    def __init__(self, tls: TlsBridges, mode: str, driver: Driver) -> None:
        self.tls = tls
        self.mode = mode
        self.driver = driver
        self.stats = ListenerStats("tcp")
        self.peers: list[object] = []
        self.listener = trio.socket.socket()

    async def run(self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        await self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        task_status.started(self.listener.getsockname())
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await self.listener.accept()
                self.stats.active += 1
                nursery.start_soon(self.tls.serve_downstream, conn.detach(), self.mode,
                                   self._serve, self.stats, 30.0)

    async def _serve(self, fd: int) -> None:
        self.peers.append(self.tls.peer(fd))
        try:
            await self.driver(fd)
        finally:
            self.stats.active -= 1


async def connected_fd(address: tuple[str, int]) -> int:
    sock = trio.socket.socket()
    await sock.connect(address)
    return sock.detach()


async def echo(fd: int) -> None:
    sock = fd_socket(fd)
    with sock:
        while data := await sock.recv(65536):
            await send_all(sock, data)
        sock.shutdown(socket.SHUT_WR)
        await trio.sleep(0.05)  # let the FIN go before the close


def counting_driver(seen: list[bytes]) -> Driver:
    """Reads to EOF, then answers with the byte count and closes (needs half-close)."""
    async def drive(fd: int) -> None:
        sock = fd_socket(fd)
        with sock:
            data = await read_to_eof(sock)
            seen.append(data)
            await send_all(sock, b"got %d bytes" % len(data))
    return drive


@pytest.fixture
async def bridges(nursery):
    server_tls, client_tls = TlsBridges(), TlsBridges()
    for tls in (server_tls, client_tls):
        await nursery.start(tls.run)
    server_tls.update(contexts(API))
    client_tls.update(contexts(WEB))
    return server_tls, client_tls


async def test_origination_meets_termination_with_half_close(nursery, bridges):
    server_tls, client_tls = bridges
    seen: list[bytes] = []
    server = Server(server_tls, "strict", counting_driver(seen))
    address = await nursery.start(server.run)
    inner = fd_socket(await client_tls.originate(await connected_fd(address), [API]))
    with inner, trio.fail_after(10):
        await send_all(inner, b"x" * 100_000)
        inner.shutdown(socket.SHUT_WR)  # becomes close_notify; the answer still comes back
        assert await read_to_eof(inner) == b"got 100000 bytes"
    assert seen == [b"x" * 100_000]
    peer = server.peers[0]
    assert peer.identity == WEB and peer.ip == "127.0.0.1"
    assert peer.xfcc.startswith(f"By={API};Hash=".encode()) and peer.xfcc.endswith(f";URI={WEB}".encode())
    assert server.stats.tls_handshakes == 1 and server.stats.tls_failures == 0
    with trio.fail_after(5):
        while not server.stats.bytes_from_clients:  # counted once the bridge has closed
            await trio.sleep(0.01)
    assert server.stats.bytes_from_clients > 100_000


async def test_megabytes_both_ways_at_once_arrive_intact(nursery, bridges):
    server_tls, client_tls = bridges
    server = Server(server_tls, "strict", echo)
    address = await nursery.start(server.run)
    payload = os.urandom(8 << 20)
    inner = fd_socket(await client_tls.originate(await connected_fd(address), [WEB, API]))
    received = bytearray()

    async def sender() -> None:
        await send_all(inner, payload)
        inner.shutdown(socket.SHUT_WR)

    with inner, trio.fail_after(30):
        async with trio.open_nursery() as both:
            both.start_soon(sender)
            received += await read_to_eof(inner)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()


async def test_the_bridge_ends_when_the_plaintext_side_closes(nursery, bridges):
    server_tls, client_tls = bridges
    server = Server(server_tls, "strict", echo)
    address = await nursery.start(server.run)
    fd = await client_tls.originate(await connected_fd(address), [API])
    inner = fd_socket(fd)
    with trio.fail_after(10):
        await send_all(inner, b"ping")
        assert await inner.recv(10) == b"ping"
        inner.close()  # the pool dropping a connection
        while server.stats.active:
            await trio.sleep(0.01)


async def test_an_unexpected_upstream_identity_is_refused_before_any_byte(nursery, bridges):
    server_tls, client_tls = bridges
    seen: list[bytes] = []
    server = Server(server_tls, "strict", counting_driver(seen))
    address = await nursery.start(server.run)
    with trio.fail_after(10):
        with pytest.raises(UpstreamIdentityError) as refused:
            await client_tls.originate(await connected_fd(address), [WEB])
        assert API in str(refused.value) and refused.value.status == 503
        while not seen:
            await trio.sleep(0.01)
    assert seen == [b""]  # the upstream's app never got a byte


@pytest.mark.parametrize("mode", ["strict", "permissive"])
async def test_tls_clients_need_an_svid_of_the_trust_bundle(nursery, bridges, mode):
    server_tls, _ = bridges
    server = Server(server_tls, mode, echo)
    address = await nursery.start(server.run)
    other = MemoryCa("mesh.local")
    refused = [
        TlsBridges(),  # no client certificate at all: a context without one
        TlsBridges(),  # a certificate from another CA with the same trust domain
    ]
    no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    no_cert.check_hostname = False
    no_cert.load_verify_locations(cadata=CA.bundle_pem.decode())
    good = contexts(WEB)
    refused[0].update(TlsContexts(WEB, "mesh.local", good.server, no_cert, good.http_server))
    chain, key = other.svid(WEB)
    refused[1].update(TlsContexts.build(chain, key, CA.bundle_pem, WEB))
    for tls in refused:
        await nursery.start(tls.run)
        with trio.fail_after(10):
            try:
                fd = await tls.originate(await connected_fd(address), [API])
            except UpstreamTlsError:
                continue  # TLS 1.2 style: the server's alert ends our handshake
            # TLS 1.3: our handshake ends first; the server's alert ends the connection.
            inner = fd_socket(fd)
            with inner:
                await send_all(inner, b"hello")
                assert await read_to_eof(inner) == b""
    while server.stats.tls_failures < 2:
        await trio.sleep(0.01)
    assert server.peers == []


async def test_strict_refuses_plaintext_and_permissive_passes_it_through(nursery, bridges):
    server_tls, _ = bridges
    strict = Server(server_tls, "strict", echo)
    permissive = Server(server_tls, "permissive", echo)
    strict_address = await nursery.start(strict.run)
    permissive_address = await nursery.start(permissive.run)
    with trio.fail_after(10):
        sock = fd_socket(await connected_fd(strict_address))
        with sock:
            await send_all(sock, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            try:
                answer = await read_to_eof(sock)
            except ConnectionResetError:
                answer = b""
            assert b"HTTP" not in answer
        assert strict.stats.tls_failures == 1 and strict.peers == []

        sock = fd_socket(await connected_fd(permissive_address))
        with sock:
            await send_all(sock, b"plain bytes")
            assert await sock.recv(100) == b"plain bytes"
        assert permissive.peers == [None]


async def test_a_silent_client_is_closed_after_the_handshake_timeout(nursery, bridges, monkeypatch):
    monkeypatch.setattr(tls_bridge, "HANDSHAKE_TIMEOUT", 0.3)
    server_tls, _ = bridges
    for mode in ("strict", "permissive"):
        server = Server(server_tls, mode, echo)
        address = await nursery.start(server.run)
        sock = fd_socket(await connected_fd(address))
        with sock, trio.fail_after(5):
            assert await read_to_eof(sock) == b""
        assert server.stats.tls_failures == 1 and server.stats.active == 0


async def test_new_connections_use_a_new_certificate(nursery, bridges):
    server_tls, client_tls = bridges
    server = Server(server_tls, "strict", echo)
    address = await nursery.start(server.run)
    first = fd_socket(await client_tls.originate(await connected_fd(address), [API]))
    server_tls.update(contexts(API))
    second = fd_socket(await client_tls.originate(await connected_fd(address), [API]))
    with first, second, trio.fail_after(10):
        for sock in (first, second):  # the open one goes on with the old certificate
            await send_all(sock, b"still here")
            assert await sock.recv(100) == b"still here"
