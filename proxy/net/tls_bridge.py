"""mTLS at the worker's edge, kept out of the plaintext drivers by a bridge.

A TLS connection is handshaken here (`ssl.SSLObject` over memory BIOs on the raw,
non-blocking fd), its peer's SVID checked, and then bridged to a plaintext connection: a
non-blocking AF_UNIX socketpair whose one end goes to an unchanged driver (`Http1Proxy.serve`,
`TcpProxy.serve`, or a pooled upstream connection) while a bridge pumps bytes between the
other end and the TLS connection, both ways, until both directions are done.

    tls = TlsBridges()                       # one per worker; `await nursery.start(tls.run)`
    tls.update(TlsContexts.build(...))       # each new SVID: new connections use it
    await tls.serve_downstream(fd, "strict", proxy.serve, stats)    # a listener with tls
    tls.peer(inner_fd)                       # -> DownstreamPeer, while `serve` runs
    inner_fd = await tls.originate(fd, expected_ids)                 # a cluster with tls

The pump is half-close aware: EOF on the plaintext side becomes close_notify and a FIN on
the TLS side, close_notify (or EOF) from the TLS peer becomes a FIN on the plaintext side,
and each direction goes on until its own end. A reset on one side is passed on as a close
(a reset where the other side is TCP). Each direction holds at most one buffer of bytes:
it reads again only once what it read is written, so a slow reader slows its writer.

Downstream bridges run in the connection's own task (its nursery), so they drain with the
listener; an originated bridge outlives the request that opened it (the connection is pooled)
and runs in the nursery `TlsBridges.run` owns for the worker's life.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from .._core import sockops
from ..errors import UpstreamIdentityError, UpstreamTlsError
from ..identity.tls import PeerSvidError, TlsContexts, check_peer_svid

if TYPE_CHECKING:
    from ..telemetry import ListenerStats

log = logging.getLogger("meshproxy.tls")

HANDSHAKE_TIMEOUT = 10.0  # from accept (or connect) to a verified peer
TLS_RECORD = 16384 + 256  # one record of ciphertext, the most OpenSSL needs at once
CIPHER_BUFFER = 2 * TLS_RECORD
PLAIN_BUFFER = 16384  # one record of plaintext
FAIR_SHARE = 256 * 1024  # bytes a direction moves before it lets other tasks run
HANGUP_POLL = 1.0  # while only the TLS side still sends: how often to see if the reader left
CLOSE_LINGER = 30.0  # after the driver closed its end: time left to deliver what it wrote
UPSTREAM_STALL_TIMEOUT = 300.0  # an originated connection's peer reads nothing for this long
_HANDSHAKE_RECORD = 0x16  # the first byte of every TLS ClientHello
_RESET = struct.pack("ii", 1, 0)


@dataclass(frozen=True, slots=True)
class DownstreamPeer:
    """The verified client behind a bridged (plaintext) fd."""

    identity: str  # its SPIFFE ID
    ip: str  # its address (the bridged fd is AF_UNIX and has none)
    cert_sha256: str  # hex
    xfcc: bytes  # an x-forwarded-client-cert value, Envoy's format: By=us;Hash=..;Subject="";URI=peer


class TlsRefused(Exception):
    """A downstream TLS connection that is closed without being served."""


class TlsBridges:
    """One per worker: the TLS contexts of the current SVID, the peers of bridged downstream
    connections, and the nursery that owns originated bridges."""

    def __init__(self) -> None:
        self.contexts: TlsContexts | None = None
        self._have_contexts = trio.Event()
        self._peers: dict[int, DownstreamPeer] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own originated bridges until cancelled (then they are cut)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    def update(self, contexts: TlsContexts) -> None:
        """A new SVID (or trust bundle): connections from now on use it; open ones keep theirs."""
        self.contexts = contexts
        self._have_contexts.set()

    @property
    def spiffe_id(self) -> str | None:
        """This sidecar's identity, once it has one."""
        return self.contexts.spiffe_id if self.contexts is not None else None

    def peer(self, fd: int) -> DownstreamPeer | None:
        """The verified client of a bridged fd handed to a driver; None for a plaintext one."""
        return self._peers.get(fd)

    async def _current_contexts(self) -> TlsContexts:
        """The contexts, waiting (under the caller's deadline) for the first SVID."""
        if self.contexts is None:
            await self._have_contexts.wait()
        assert self.contexts is not None
        return self.contexts

    # -- termination ------------------------------------------------------------------------
    async def serve_downstream(self, fd: int, mode: str, serve: Callable[[int], Awaitable[None]],
                               stats: ListenerStats, idle_timeout: float, *,
                               count_bytes: bool = True, http: bool = False) -> None:
        """Serve one accepted connection of a listener with `tls`; always closes `fd`.

        `mode` "strict" takes TLS only; "permissive" hands a client whose first byte is not
        a TLS handshake record to `serve` as it is. A TLS client must complete the handshake
        with an SVID of our trust domain within HANDSHAKE_TIMEOUT; then `serve` gets the
        plaintext end of a bridge, whose peer `peer(fd)` names while `serve` runs.
        The connection was counted in `stats.active` by the acceptor: `serve` uncounts it,
        or this does when the client is refused. A client that reads nothing for
        `idle_timeout` while bytes wait for it is cut. `count_bytes` adds the bytes on the wire
        to the listener's (a driver counting the plaintext itself passes False). `http`: an
        HTTP listener, which offers h2 and http/1.1 by ALPN.
        """
        sock = socket.socket(fileno=fd)  # owns fd from here
        plaintext = False
        try:
            with trio.move_on_after(HANDSHAKE_TIMEOUT) as timer:
                plaintext = mode == "permissive" and not await _starts_with_tls(sock)
                if not plaintext:
                    contexts = await self._current_contexts()
                    conn = _TlsConnection(sock, contexts.http_server if http else contexts.server, server_side=True,
                                          stall_timeout=idle_timeout)
                    await conn.handshake()
                    svid = check_peer_svid(conn.ssl.getpeercert(True), contexts.trust_domain)
            if timer.cancelled_caught:
                raise TlsRefused(f"no TLS handshake within {HANDSHAKE_TIMEOUT:g}s")
        except (TlsRefused, PeerSvidError, ssl.SSLError, OSError) as exc:
            stats.tls_failures += 1
            stats.active -= 1
            log.debug("tls: refused %s: %s", sockops.peer_ip(fd) or "a client", _reason(exc))
            _close(sock)
            return
        except BaseException:  # cancelled: the worker is stopping
            stats.active -= 1
            _close(sock)
            raise
        if plaintext:
            await serve(sock.detach())
            return
        stats.tls_handshakes += 1
        try:
            inner, outer = _socketpair()
        except OSError as exc:
            stats.active -= 1
            log.warning("tls: cannot bridge a connection: %s", exc)
            _close(sock)
            return
        inner_fd = inner.detach()
        ip = sockops.peer_ip(fd)
        self._peers[inner_fd] = DownstreamPeer(svid.spiffe_id, ip, svid.cert_sha256, _xfcc(
            contexts.spiffe_id, svid.cert_sha256, svid.spiffe_id))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_Bridge(conn, outer).run)
                try:
                    await serve(inner_fd)  # closes inner_fd
                finally:
                    del self._peers[inner_fd]
                # Nothing more can reach the driver; what it wrote gets a while to go out.
                nursery.cancel_scope.deadline = trio.current_time() + CLOSE_LINGER
        finally:
            if count_bytes:
                stats.bytes_from_clients += conn.bytes_in
                stats.bytes_to_clients += conn.bytes_out

    # -- origination ------------------------------------------------------------------------
    async def originate(self, fd: int, expected: Collection[str]) -> int:
        """mTLS as a client on a connected upstream `fd`, which this takes over: returns the
        plaintext fd to use instead (the caller owns it; closing it ends the TLS connection).

        The upstream's SVID must name one of `expected`, else UpstreamIdentityError (503)
        and the connection is closed before a byte of application data; a failed or timed-out
        handshake (or no SVID of our own within HANDSHAKE_TIMEOUT) raises UpstreamTlsError.
        """
        sock = socket.socket(fileno=fd)
        try:
            with trio.move_on_after(HANDSHAKE_TIMEOUT) as timer:
                contexts = await self._current_contexts()
                conn = _TlsConnection(sock, contexts.client, server_side=False,
                                      stall_timeout=UPSTREAM_STALL_TIMEOUT)
                await conn.handshake()
            if timer.cancelled_caught:
                what = "handshake" if self.contexts is not None else "certificate of our own"
                raise UpstreamTlsError(f"no TLS {what} within {HANDSHAKE_TIMEOUT:g}s")
            try:
                svid = check_peer_svid(conn.ssl.getpeercert(True), contexts.trust_domain)
            except PeerSvidError as exc:
                raise UpstreamIdentityError(f"upstream certificate refused: {exc}") from None
            if svid.spiffe_id not in expected:
                raise UpstreamIdentityError(f"upstream is {svid.spiffe_id}, expected "
                                            f"{' or '.join(sorted(expected))}")
            inner, outer = _socketpair()
        except (ssl.SSLError, OSError) as exc:
            _close(sock)
            raise UpstreamTlsError(f"TLS to upstream failed: {_reason(exc)}") from None
        except BaseException:
            _close(sock)
            raise
        if self._nursery is None:
            for end in (inner, outer):
                end.close()
            _close(sock)
            raise UpstreamTlsError("the worker is stopping")
        self._nursery.start_soon(_Bridge(conn, outer).run)
        return inner.detach()


def _xfcc(ours: str, cert_sha256: str, peer: str) -> bytes:
    return f'By={ours};Hash={cert_sha256};Subject="";URI={peer}'.encode()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return exc.reason.lower().replace("_", " ")
    return str(exc) or type(exc).__name__


def _socketpair() -> tuple[socket.socket, socket.socket]:
    inner, outer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    inner.setblocking(False)
    outer.setblocking(False)
    return inner, outer


def _close(sock: socket.socket, *, reset: bool = False) -> None:
    if sock.fileno() < 0:
        return
    trio.lowlevel.notify_closing(sock)
    if reset:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        except OSError:
            pass
    sock.close()


def _hung_up(sock: socket.socket) -> bool:
    """True once nothing more can be written to `sock`: its peer closed."""
    poller = select.poll()
    poller.register(sock, select.POLLHUP | select.POLLERR)
    return bool(poller.poll(0))


async def _starts_with_tls(sock: socket.socket) -> bool:
    """Whether the client's first byte opens a TLS handshake record (peeked, not consumed).
    A client that closes without a byte is refused."""
    while True:
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
            continue
        if not first:
            raise TlsRefused("closed before its first byte")
        return first[0] == _HANDSHAKE_RECORD


class _TlsConnection:
    """The TLS side of a bridge: the raw socket and an SSLObject over two memory BIOs. Bytes
    sent go out in the order the TLS engine wrote them, whichever task flushes."""

    __slots__ = ("_rbuf", "_rview", "_send_lock", "bytes_in", "bytes_out", "incoming",
                 "outgoing", "sock", "ssl", "stall_timeout")

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, *, server_side: bool,
                 stall_timeout: float) -> None:
        self.sock = sock
        self.stall_timeout = stall_timeout
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.ssl = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side)
        self._send_lock = trio.Lock()
        self._rbuf = bytearray(CIPHER_BUFFER)
        self._rview = memoryview(self._rbuf)
        self.bytes_in = 0
        self.bytes_out = 0

    async def handshake(self) -> None:
        try:
            while True:
                try:
                    self.ssl.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await self.flush()
                    await self.receive()
        except ssl.SSLError:
            self._send_alert()
            raise
        await self.flush()

    def _send_alert(self) -> None:
        """Best effort, never waiting: the alert that tells the peer why."""
        if self.outgoing.pending:
            try:
                self.sock.send(self.outgoing.read())
            except OSError:
                pass

    async def receive(self) -> None:
        """Move what the socket has (at least a byte, or EOF) into the TLS engine."""
        while True:
            try:
                n = self.sock.recv_into(self._rbuf)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self.sock)
                continue
            break
        if n:
            self.incoming.write(self._rview[:n])
            self.bytes_in += n
        else:
            self.incoming.write_eof()

    async def flush(self) -> None:
        """Send everything the TLS engine has written so far (TimeoutError if the peer
        takes nothing for `stall_timeout`)."""
        async with self._send_lock:
            while self.outgoing.pending:
                view = memoryview(self.outgoing.read())
                while view:
                    try:
                        n = self.sock.send(view)
                    except BlockingIOError:
                        with trio.move_on_after(self.stall_timeout) as stalled:
                            await trio.lowlevel.wait_writable(self.sock)
                        if stalled.cancelled_caught:
                            raise TimeoutError(f"the peer read nothing for {self.stall_timeout:g}s") from None
                        continue
                    view = view[n:]
                    self.bytes_out += n

    def close_notify(self) -> None:
        """Queue our close_notify (flush to send it). Only while the incoming BIO is empty:
        OpenSSL would otherwise read (and refuse) the application data waiting there."""
        try:
            self.ssl.unwrap()
        except ssl.SSLWantReadError:
            pass  # sent; the peer's close_notify is read by the other direction
        except ssl.SSLError as exc:
            log.debug("tls: no close_notify: %s", _reason(exc))


class _Bridge:
    """Pumps between a TLS connection and the plaintext end of a socketpair until both
    directions are done or one side breaks; closes both sockets."""

    __slots__ = ("_close_notify_due", "_reader_done", "_reset_tls", "_scope", "plain", "tls")

    def __init__(self, tls: _TlsConnection, plain: socket.socket) -> None:
        self.tls = tls
        self.plain = plain
        self._reader_done = trio.Event()
        self._close_notify_due = False  # the plaintext side ended while records were half-read
        self._reset_tls = False
        self._scope: trio.CancelScope | None = None

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                nursery.start_soon(self._tls_to_plain)
                await self._plain_to_tls()
                # The plaintext side ended its half. Until the TLS side ends its own, its bytes
                # still go to the plaintext side, unless that has closed altogether.
                while not self._reader_done.is_set():
                    if _hung_up(self.plain):
                        nursery.cancel_scope.cancel()
                        break
                    with trio.move_on_after(HANGUP_POLL):
                        await self._reader_done.wait()
        finally:
            _close(self.plain)
            _close(self.tls.sock, reset=self._reset_tls)

    def _broken(self, direction: str, exc: BaseException, *, reset_tls: bool = False) -> None:
        log.debug("tls: bridge %s ended: %s", direction, _reason(exc))
        self._reset_tls = self._reset_tls or reset_tls
        assert self._scope is not None
        self._scope.cancel()

    async def _plain_to_tls(self) -> None:
        tls, plain = self.tls, self.plain
        buffer = bytearray(PLAIN_BUFFER)
        view = memoryview(buffer)
        moved = 0
        try:
            while True:
                try:
                    n = plain.recv_into(buffer)
                except BlockingIOError:
                    moved = 0
                    await trio.lowlevel.wait_readable(plain)
                    continue
                if not n:
                    break
                tls.ssl.write(view[:n])
                await tls.flush()
                moved += n
                if moved >= FAIR_SHARE:
                    moved = 0
                    await trio.lowlevel.checkpoint()
            if tls.incoming.pending and not self._reader_done.is_set():
                self._close_notify_due = True  # the reader sends it between records
            else:
                await self._end_tls_half()
        except ConnectionResetError as exc:
            self._broken("to TLS", exc, reset_tls=True)
        except (OSError, ssl.SSLError) as exc:
            self._broken("to TLS", exc)

    async def _end_tls_half(self) -> None:
        self._close_notify_due = False
        self.tls.close_notify()
        await self.tls.flush()
        try:
            self.tls.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    async def _tls_to_plain(self) -> None:
        tls, plain = self.tls, self.plain
        buffer = bytearray(PLAIN_BUFFER)
        view = memoryview(buffer)
        moved = 0
        try:
            while True:
                try:
                    n = tls.ssl.read(PLAIN_BUFFER, buffer)
                except ssl.SSLWantReadError:
                    if tls.outgoing.pending:  # e.g. a TLS 1.3 KeyUpdate answer
                        await tls.flush()
                    if self._close_notify_due:
                        await self._end_tls_half()
                    moved = 0
                    await tls.receive()
                    continue
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    break  # close_notify, or the TCP connection ended without one
                if not n:
                    break
                await _send_all(plain, view[:n])
                moved += n
                if moved >= FAIR_SHARE:
                    moved = 0
                    await trio.lowlevel.checkpoint()
            if self._close_notify_due:
                await self._end_tls_half()
            try:
                plain.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        except (OSError, ssl.SSLError) as exc:
            self._broken("from TLS", exc)
        finally:
            self._reader_done.set()


async def _send_all(sock: socket.socket, data: memoryview) -> None:
    while data:
        try:
            n = sock.send(data)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        data = data[n:]
