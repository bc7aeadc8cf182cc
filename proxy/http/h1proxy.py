"""The HTTP/1.1 reverse proxy: one task per client connection.

For each request: read and parse the head (`proxy._core.http1`, strict), match
a route, pick a cluster (weighted split) and an endpoint, take a pooled
upstream connection or open one, write the re-serialized head and the body,
read the response head and stream the response back. Bodies stream with
backpressure: a length-delimited body moves with splice(2) socket to socket,
a chunked one through the connection's buffer with its framing checked.

How it meets Trio (DESIGN, "How the hot path meets Trio"): the fds are plain
ints driven from Cython; a read that is expected to be empty (the upstream's
reply right after the request, the next request on a kept-alive connection) is
"yield, then try, then wait"; a read likely to succeed is tried first.
"""

from __future__ import annotations

import errno
import functools
import logging
import random
from collections.abc import Awaitable, Callable

import trio

from .._core import sockops
from .._core.http1 import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    BODY_UNTIL_CLOSE,
    ChunkedScanner,
    Limits,
    ProtocolError,
    RequestHead,
    ResponseHead,
    parse_request,
    parse_response,
)
from .._core.iobuf import RecvBuffer, send_from, tcp_bytes
from .._core.splice import (
    PUMP_BUDGET,
    PUMP_EOF,
    PUMP_READ_ERROR,
    PUMP_WANT_READ,
    PUMP_WANT_WRITE,
    Relay,
    RelayEngine,
    SplicePump,
    monotonic,
)
from ..cluster.circuit import REQUESTS, RETRIES
from ..config import HttpLimits, Listener
from ..errors import (
    CircuitOpenError,
    NoHealthyUpstreamError,
    ProxyError,
    UpstreamConnectError,
)
from ..net.sched import yield_now
from ..net.tcp_proxy import relay_until_done
from ..net.tls_bridge import DownstreamPeer, TlsBridges
from ..policy.authz import Policy, decide_request
from ..policy.fault import fault_action
from ..policy.retry import IDEMPOTENT, may_replay
from ..policy.sampling import mirror_cluster
from ..route import RouteTable
from ..telemetry import UNROUTED, EndpointStats, ListenerStats, record_request
from ..tracing import PROPAGATION_HEADERS
from ..upstream import EndpointPool, UpstreamCluster, UpstreamConn
from ..upstream.h2pool import H2StreamError, H2Upstreams
from . import h1_to_h2
from .dechunk import ChunkedDecoder
from .h2codec import PREFACE
from .h2server import drain as drain_h2
from .h2server import read_preface, serve_h2
from .local_reply import CONTINUE, local_reply
from .observe import Observation, Observer
from .policies import RoutePolicies, compile_policies

log = logging.getLogger("meshproxy.http")

CLIENT_BUFFER = 16384
# Route timeout when the route sets none (Envoy's default): how long the
# upstream has to start its response, connect and request body included.
DEFAULT_ROUTE_TIMEOUT = 15.0
MAX_CONNECT_ATTEMPTS = 5
# A body transfer that makes no progress for this long is abandoned (Envoy's
# stream_idle_timeout default).
STREAM_IDLE_TIMEOUT = 300.0
# Lingering close after a final error reply: how long and how much of an
# unwanted request body is read away so the reply is not lost to an RST.
LINGER_TIME = 2.0
LINGER_BYTES = 4 << 20
# A mirrored copy of a request gets this long to be answered, and at most this many
# copies are in flight per listener and worker (more are not sent: a mirror must never
# cost the primary traffic).
MIRROR_TIMEOUT = 5.0
MAX_MIRRORS_IN_FLIGHT = 64
# Request headers the proxy sets itself (hop-by-hop ones go in serialize()); a client
# certificate header is never taken from the client.
REPLACED_HEADERS = (b"x-forwarded-for", b"x-forwarded-proto", b"expect", b"x-forwarded-client-cert")
# ... and, with tracing on, the client's trace context, which ours replaces.
REPLACED_AND_TRACE_HEADERS = REPLACED_HEADERS + tuple(sorted(PROPAGATION_HEADERS))


class _RequestIds:
    """Request ids unique across processes and restarts: a random 64-bit
    prefix per process and a counter (cheaper than a UUID per request)."""

    def __init__(self) -> None:
        self._prefix = b"%016x" % random.getrandbits(64)
        self._count = 0

    def next(self) -> bytes:
        self._count += 1
        return b"%s-%08x" % (self._prefix, self._count)


_request_ids = _RequestIds()


class _ClientGone(Exception):
    """The client closed or reset its connection: stop without a reply."""


class _UpstreamFailed(Exception):
    """The upstream broke before a response head: a local reply follows."""

    def __init__(self, status: int, code: str, *, retriable: bool = False) -> None:
        super().__init__(code)
        self.status = status
        self.code = code
        self.retriable = retriable  # nothing of a response arrived on a reused connection


async def _send_all(fd: int, data: bytes, idle: float = STREAM_IDLE_TIMEOUT, offset: int = 0) -> None:
    """Write all of `data`; OSError when the peer is gone or stops reading for `idle`.

    Hot paths try `send_from` first and call this only for what is left.
    """
    total = len(data)
    while offset < total:
        sent = send_from(fd, data, offset)
        if sent >= 0:
            offset += sent
        else:
            await _wait(trio.lowlevel.wait_writable, fd, idle)


async def _wait(wait: Callable[[int], Awaitable[None]], fd: int, idle: float) -> None:
    """Wait for readiness; TimeoutError after `idle` seconds without it."""
    with trio.move_on_after(idle):
        await wait(fd)
        return
    raise TimeoutError(errno.ETIMEDOUT, f"no progress for {idle:g}s")


async def _drive(pump: SplicePump, idle: float = STREAM_IDLE_TIMEOUT) -> None:
    """Run a one-direction pump to its end; errors and stalls raise OSError."""
    wait_readable = trio.lowlevel.wait_readable
    wait_writable = trio.lowlevel.wait_writable
    while True:
        status = pump.pump()
        if status == PUMP_WANT_READ:
            await _wait(wait_readable, pump.src, idle)
        elif status == PUMP_WANT_WRITE:
            await _wait(wait_writable, pump.dst, idle)
        elif status == PUMP_BUDGET:
            await trio.lowlevel.checkpoint()
        elif status == PUMP_EOF:
            return
        else:
            side = "read" if status == PUMP_READ_ERROR else "write"
            raise _PumpError(side, pump.error)


class _PumpError(OSError):
    def __init__(self, side: str, err: int) -> None:
        super().__init__(err, f"{side} failed")
        self.side = side


class Http1Proxy:
    """Serves the connections of one http listener in one worker."""

    def __init__(self, listener: Listener, clusters: dict[str, UpstreamCluster], engine: RelayEngine,
                 stats: ListenerStats) -> None:
        self.engine = engine
        self.stats = stats
        # Draining: finish the request in flight, then close; idle kept-alive
        # connections (waiting in these scopes) close at once.
        self.draining = False
        self._idle_waits: set[trio.CancelScope] = set()
        self.policies: dict[str, RoutePolicies] = {}
        self.mirrors_in_flight = 0
        # Access log and tracing, when `telemetry` asks for either (set by the worker).
        self.observer: Observer | None = None
        # The worker's mTLS bridges: who the client of a bridged connection is (`tls`).
        self.tls: TlsBridges | None = None
        # The worker's HTTP/2 upstream pools (set by the worker), for HTTP/2 clients.
        self.h2_upstreams: H2Upstreams | None = None
        self.update(listener, clusters)

    def update(self, listener: Listener, clusters: dict[str, UpstreamCluster]) -> None:
        """Take a new config version: every request that starts from now on uses it.

        A request reads the route table and the clusters once, when it starts, so
        one in flight finishes on the version it started with.
        """
        self.listener = listener
        self.routes = RouteTable.compile(listener.routes)
        authz = Policy.compile(listener.policy, self.stats)
        self.authz: Policy | None = None if authz.empty else authz  # None: everyone is allowed
        self.policies = compile_policies(listener.routes, self.policies, monotonic())
        self.clusters = clusters
        limits = listener.limits or HttpLimits()
        self.limits = Limits(limits.max_request_line, limits.max_header_bytes, limits.max_headers)
        # Room for a whole head at its limits; the parser refuses more first.
        self.max_head = limits.max_request_line + limits.max_header_bytes + 1024
        self.idle_timeout = listener.idle_timeout
        self.route_stats = self.stats.routes  # route name -> RouteStats (UNROUTED: answered before routing)

    def drain(self) -> None:
        self.draining = True
        for scope in self._idle_waits:
            scope.cancel()
        drain_h2(self)  # GOAWAY on HTTP/2 connections

    # -- one client connection -------------------------------------------
    async def serve(self, client_fd: int) -> None:
        """Serve one accepted connection (counted active by the acceptor); closes it."""
        stats = self.stats
        try:
            await self._serve_requests(client_fd)
        except (_ClientGone, OSError) as exc:
            log.debug("%s: client connection ended: %s", self.listener.name, exc)
        finally:
            stats.active -= 1
            received, sent = tcp_bytes(client_fd)
            stats.bytes_from_clients += received
            stats.bytes_to_clients += sent
            sockops.close_fd(client_fd)

    async def _serve_requests(self, fd: int) -> None:
        buf = RecvBuffer(CLIENT_BUFFER)
        client = self.tls.peer(fd) if self.tls is not None else None
        # A bridged (mTLS) connection is a socketpair: the bridge knows the client's address.
        peer = (client.ip if client is not None else sockops.peer_ip(fd)).encode()
        first = True
        served = 0
        while True:
            try:
                if first:
                    pass  # a new connection's first request is likely here: try first
                elif not len(buf):
                    # Kept-alive client: its next request is rarely here yet. Yield
                    # once, then try, and only then pay for a wait. The yield is no
                    # cancel point; every wait is, and so is every 64th request here
                    # (a drain ends a busy connection by its flag, not by cancelling).
                    await yield_now()
                    served += 1
                    if not served & 63:
                        await trio.lowlevel.checkpoint_if_cancelled()
                else:
                    # A pipelined request is already here: no yield, but a client that
                    # pipelines without end must still see a drain deadline.
                    await trio.lowlevel.checkpoint_if_cancelled()
                head = self._request_head_now(fd, buf)
                if head is None:
                    head = await self._read_request_head(fd, buf, first)
            except ProtocolError as exc:
                # "PRI * HTTP/2.0": an HTTP/2 client with prior knowledge. Told apart here,
                # where HTTP/1 refuses it, so HTTP/1 clients pay nothing for it.
                if (first and buf.data[buf.start:buf.start + 4] == PREFACE[:4]
                        and await read_preface(fd, buf, self.idle_timeout)):
                    await serve_h2(self, fd, buf.take(len(buf)), peer, client=client)
                    return
                record_request(self.route_stats[UNROUTED], None, None, exc.status, exc.code, 0.0, None)
                reply = local_reply(exc.status, exc.code, str(exc), close=True)
                if self.observer is not None:
                    self.observer.end(self.observer.begin(None), None, route=None, cluster=None,
                                      endpoint=None, status=exc.status, error=exc.code, bytes_in=len(buf),
                                      bytes_out=len(reply), duration=0.0, upstream=None, attempts=0,
                                      request_id=None, peer=peer)
                await self._reply_and_close(fd, reply)
                return
            if head is None:
                return
            first = False
            if not await self._exchange(fd, buf, head, peer, client):
                return

    def _request_head_now(self, fd: int, buf: RecvBuffer) -> RequestHead | None:
        """The next request head if it is buffered or one recv brings it whole, else None.

        Nothing is lost on None: `_read_request_head` goes on from the same buffer.
        """
        if not len(buf) and buf.recv(fd) <= 0:
            return None
        head = parse_request(buf.data, buf.start, buf.end, self.limits)
        if head is not None:
            buf.consume(head.size)
        return head

    async def _read_request_head(self, fd: int, buf: RecvBuffer, first: bool) -> RequestHead | None:
        """Read until a whole request head is buffered, waiting as needed; None when the
        client closes (or idles out, or the listener drains) before one arrives."""
        limits = self.limits
        while True:
            if len(buf):
                head = parse_request(buf.data, buf.start, buf.end, limits)
                if head is not None:
                    buf.consume(head.size)
                    return head
            n = buf.recv(fd)
            if n > 0:
                continue
            if n == 0:
                return None  # closed between requests, or mid-head: nothing to answer
            if n == -2:
                # The parser refuses heads over the limits before this size.
                buf.grow(self.max_head)
                continue
            if first:
                # A new connection's first request may still be on its way: it is
                # served even while draining (up to the drain deadline).
                with trio.move_on_after(self.idle_timeout) as scope:
                    await trio.lowlevel.wait_readable(fd)
            else:
                if self.draining and not len(buf):
                    return None
                with trio.move_on_after(self.idle_timeout) as scope:
                    self._idle_waits.add(scope)
                    try:
                        await trio.lowlevel.wait_readable(fd)
                    finally:
                        self._idle_waits.discard(scope)
            if scope.cancelled_caught:
                return None

    async def _reply(self, fd: int, data: bytes) -> None:
        try:
            await _send_all(fd, data)
        except OSError as exc:
            raise _ClientGone(str(exc)) from exc

    async def _reply_and_close(self, fd: int, data: bytes) -> bool:
        """Send a final reply, then close gracefully; returns False (the connection is done).

        The client may still be sending (a body nobody will read). Closing a
        socket with unread bytes sends an RST, which can destroy the reply
        before the client reads it; so send FIN first and read the rest away
        for a bounded time, as nginx's lingering close does.
        """
        await self._reply(fd, data)
        await self._linger(fd)
        return False

    async def _linger(self, fd: int) -> None:
        """Close gracefully a connection whose client may still be sending."""
        sockops.shutdown_write(fd)
        drain = RecvBuffer(65536)
        left = LINGER_BYTES
        with trio.move_on_after(LINGER_TIME):
            while left > 0:
                try:
                    n = drain.recv(fd)
                except OSError:
                    break
                if n == 0:
                    break
                if n > 0:
                    left -= n
                    drain.clear()
                else:
                    await trio.lowlevel.wait_readable(fd)

    # -- one request -------------------------------------------------------
    async def _exchange(self, fd: int, buf: RecvBuffer, head: RequestHead, peer: bytes,
                        client: DownstreamPeer | None) -> bool:
        """Proxy one request; True when the client connection stays open. `client` is the
        verified mTLS peer, None on a plaintext connection."""
        started = monotonic()
        # The observer this request started with: a reload may replace or remove it meanwhile.
        observer = self.observer
        obs = observer.begin(head) if observer is not None else None
        authz = self.authz
        if authz is not None and not _authorized(authz, client, head):
            request_id = head.get(b"x-request-id")
            record_request(self.route_stats[UNROUTED], None, None, 403, "forbidden", monotonic() - started, None)
            if obs is not None:
                self._observed(observer, obs, head, None, None, None, 403, "forbidden", started, request_id, peer,
                               client)
            return await self._refuse(fd, head, 403, "forbidden", request_id)
        # A CONNECT target has no path; it matches routes as "/" would.
        route = self.routes.match(head.method, head.host, head.path or b"/", head.get)
        request_id = head.get(b"x-request-id")
        if route is None:
            record_request(self.route_stats[UNROUTED], None, None, 404, "no_route", monotonic() - started, None)
            if obs is not None:
                self._observed(observer, obs, head, None, None, None, 404, "no_route", started, request_id, peer, client)
            return await self._refuse(fd, head, 404, "no_route", request_id)
        cluster = self.clusters[route.cluster or self.routes.pick_cluster(route, random.random())]
        # Looked up now: a reload during the request may drop the route's name.
        route_stats = self.route_stats[route.name]
        policies = self.policies.get(route.name)
        if policies is not None and (policies.rate_limit is not None or policies.fault is not None):
            refusal = await self._admit(policies)
            if refusal is not None:
                status, code = refusal
                record_request(route_stats, cluster.stats, None, status, code, monotonic() - started, None)
                if obs is not None:
                    self._observed(observer, obs, head, route.name, cluster.name, None, status, code, started,
                                   request_id, peer, client)
                return await self._refuse(fd, head, status, code, request_id)
        if cluster.http2 and (head.upgrade is not None or head.method == b"CONNECT" or self.h2_upstreams is None):
            # A tunnel has no HTTP/2 form here (RFC 8441 is not spoken upstream).
            record_request(route_stats, cluster.stats, None, 502, "upstream_protocol_unsupported",
                           monotonic() - started, None)
            if obs is not None:
                self._observed(observer, obs, head, route.name, cluster.name, None, 502,
                               "upstream_protocol_unsupported", started, request_id, peer, client)
            return await self._refuse(fd, head, 502, "upstream_protocol_unsupported", request_id)

        forwarded_for = head.get(b"x-forwarded-for")
        if forwarded_for is not None:
            # Every hop of every field line, then ours (field lines combine with ", ").
            forwarded_for = b", ".join(head.get_all(b"x-forwarded-for")) + b", " + peer
        extra = [b"x-forwarded-for: ", forwarded_for or peer,
                 b"\r\nx-forwarded-proto: http\r\n" if client is None else
                 b"\r\nx-forwarded-proto: https\r\nx-forwarded-client-cert: " + client.xfcc + b"\r\n"]
        if request_id is None:
            request_id = _request_ids.next()
            extra += [b"x-request-id: ", request_id, b"\r\n"]
        tunnel = head.upgrade is not None or head.method == b"CONNECT"
        if obs is not None and obs.fields:
            extra.append(obs.fields)  # trace context for the upstream, replacing the client's
            drop = REPLACED_AND_TRACE_HEADERS
        else:
            drop = REPLACED_HEADERS
        extra_fields = b"".join(extra)
        request = head.serialize(extra_fields, tunnel, drop)

        if head.expect_continue and head.version == 11:
            # Answer 100 Continue ourselves (as Envoy does by default) so the
            # client sends its body without waiting on the upstream.
            await self._reply(fd, CONTINUE)

        body_len = 0  # of the body bytes that go out with the head
        if head.chunked or head.content_length > 0:
            # Whatever of the body is already buffered goes out with the head.
            body = _RequestBody(head, self.limits)
            try:
                buffered = body.take_buffered(buf)
                body_len = len(buffered)
                request += buffered
            except ProtocolError as exc:
                record_request(route_stats, cluster.stats, None, exc.status, exc.code,
                               monotonic() - started, None)
                if obs is not None:
                    self._observed(observer, obs, head, route.name, cluster.name, None, exc.status, exc.code, started,
                                   request_id, peer, client)
                return await self._reply_and_close(fd, local_reply(exc.status, exc.code, str(exc), close=True))
        else:
            body = _NO_BODY

        # Taken here, with no wait before the `try` that gives it back.
        circuit = cluster.circuit
        if circuit is not None and not circuit.try_acquire(REQUESTS):
            record_request(route_stats, cluster.stats, None, 503, "circuit_open", monotonic() - started, None)
            if obs is not None:
                self._observed(observer, obs, head, route.name, cluster.name, None, 503, "circuit_open",
                               started, request_id, peer, client)
            return await self._refuse(fd, head, 503, "circuit_open", request_id)
        ex = _Exchange(head, cluster, request, body, tunnel,
                       timeout=route.timeout or DEFAULT_ROUTE_TIMEOUT,
                       key=cluster.hash_key(head.get, peer) if cluster.hash_on is not None else None,
                       request_id=request_id)
        if policies is not None:
            ex.policies = policies
            retry = policies.retry
            if retry is not None:
                ex.per_try = retry.per_try_timeout
                assert policies.budget is not None
                policies.budget.record_request(started)
                # Replayable: the whole body came with the head, within the retry buffer.
                ex.replayable = body.complete and body_len <= retry.max_body_bytes
            if policies.mirror is not None and body.complete and not tunnel:
                self._mirror(policies, head, extra_fields, drop,
                             request[len(request) - body_len:] if body_len else b"")
        try:
            if cluster.http2:
                return await self._exchange_h2(fd, buf, ex, request[len(request) - body_len:] if body_len else b"",
                                               extra_fields, drop)
            if body is _NO_BODY and not tunnel and not cluster.load_aware:
                try:
                    pool = cluster.pick((), ex.key)
                except NoHealthyUpstreamError as exc:
                    return await self._fail(fd, ex, _UpstreamFailed(exc.status, exc.code))
                up = pool.take_idle()
                if up is None:
                    # None idle: the slow path opens one to the endpoint picked.
                    return await self._run_exchange(fd, buf, ex, pool, fresh_only=True)
            else:
                return await self._run_exchange(fd, buf, ex)

            # The common case, a request without a body on a kept-alive upstream
            # connection, goes straight through here: each coroutine between a task
            # and the scheduler makes every yield dearer, so the steps the general
            # path spreads over helpers are inline. Anything unusual goes on in
            # those helpers from where this stopped.
            ex.endpoint = pool.stats
            ex.address = pool.address_text
            pool.stats.active += 1
            try:
                try:
                    sent = send_from(up.fd, request, 0)
                    if sent != len(request):
                        await _send_all(up.fd, request, offset=max(sent, 0))
                except OSError as exc:
                    raise _UpstreamFailed(502, "upstream_reset", retriable=True) from exc
                sent_at = monotonic()
                # The reply cannot be here yet: yield once, then try, then wait.
                # The yield is no cancel point: the wait is, and so is the one
                # before the client's next request.
                await yield_now()
                response = self._parsed_response(up, head)
                if response is None:
                    response = await self._read_response_head(fd, up, head, True, ex)
                ex.upstream_time = monotonic() - sent_at
            except _UpstreamFailed as exc:
                pool.discard(up)
                if exc.retriable and head.method in IDEMPOTENT:
                    cluster.stats.retries += 1
                    ex.retried = True
                    return await self._run_exchange(fd, buf, ex, fresh_only=True)
                cluster.record_outcome(pool, 0, exc.code)
                if ex.policies is not None and await self._may_retry(ex, 0, exc.code):
                    return await self._run_exchange(fd, buf, ex, exclude=pool.index)
                return await self._fail(fd, ex, exc)
            except BaseException:
                pool.discard(up)
                raise

            ex.upstream_status = response.status
            if cluster.outlier is not None:
                cluster.record_outcome(pool, response.status, None)
            if (response.status >= 500 and ex.policies is not None
                    and await self._may_retry(ex, response.status, None)):
                pool.discard(up)
                return await self._run_exchange(fd, buf, ex, exclude=pool.index)
            ex.responded = True
            ex.status = response.status
            try:
                kind = response.body
                length = response.content_length
                upbuf = up.buffer
                if kind == BODY_NONE or (kind == BODY_LENGTH and len(upbuf) >= length):
                    # The whole response is here: one write.
                    client_keep = head.keep_alive and not self.draining
                    out = response.serialize(b"" if client_keep and head.version == 11
                                             else b"connection: keep-alive\r\n" if client_keep
                                             else b"connection: close\r\n")
                    if kind == BODY_LENGTH and length:
                        out += upbuf.take(length)
                    ex.bytes_out = len(out)
                    sent = send_from(fd, out, 0)
                    if sent != len(out):
                        await self._reply(fd, out[max(sent, 0):])
                else:
                    ex.bytes_out = response.size + max(response.content_length, 0)
                    client_keep = await self._forward_response(fd, head, response, up, True)
            except _UpstreamFailed as exc:
                pool.discard(up)
                ex.responded = False  # nothing went to the client: it still gets a reply
                return await self._fail(fd, ex, exc)
            except BaseException:
                if up.fd >= 0:
                    pool.discard(up)
                raise
            # Only now, with the response fully written to the client, may the
            # upstream connection serve another request.
            if response.keep_alive:
                pool.give_back(up)
            else:
                pool.discard(up)
            return client_keep
        finally:
            endpoint = ex.endpoint
            if endpoint is not None:
                endpoint.active -= 1
            if circuit is not None:
                circuit.release(REQUESTS)
                if ex.retry_held:
                    circuit.release(RETRIES)
            record_request(route_stats, cluster.stats, endpoint, ex.status, ex.error,
                           monotonic() - started, ex.upstream_time)
            if obs is not None:
                self._observed(observer, obs, head, route.name, cluster.name, ex, ex.status, ex.error, started,
                               request_id, peer, client)

    async def _exchange_h2(self, fd: int, buf: RecvBuffer, ex: _Exchange, first: bytes, extra_fields: bytes,
                           drop: tuple[bytes, ...]) -> bool:
        """A request to a `protocol: http2` cluster, as one stream on its multiplexed
        connections (`h1_to_h2`); True when the client connection stays open."""
        head, cluster, body = ex.head, ex.cluster, ex.body
        assert self.h2_upstreams is not None
        extra = [tuple(line.split(b": ", 1)) for line in extra_fields.split(b"\r\n") if line]
        headers = h1_to_h2.h2_headers_of(head, extra, drop)
        has_body = head.chunked or head.content_length > 0
        deadline = ex.route_deadline()
        stream = None
        try:
            with trio.move_on_at(deadline):
                pool, stream = await self.h2_upstreams.open_stream(cluster, headers, not has_body,
                                                                   MAX_CONNECT_ATTEMPTS, ex.key)
        except ProxyError as exc:
            return await self._fail(fd, ex, _UpstreamFailed(exc.status, exc.code))
        if stream is None:
            return await self._fail(fd, ex, _UpstreamFailed(504, "upstream_timeout"))
        ex.endpoint = pool.stats
        ex.address = pool.address_text
        pool.stats.active += 1
        idle = STREAM_IDLE_TIMEOUT
        try:
            sent_at = monotonic()
            try:
                if has_body:
                    scanner = body.scanner if isinstance(body, _RequestBody) else None
                    await h1_to_h2.send_request_body(stream, fd, buf, first, scanner,
                                                     body.remaining if scanner is None else 0, idle)
                    body.complete = True
                with trio.move_on_at(deadline):
                    status, fields = await stream.response()
            except ProtocolError as exc:
                ex.status, ex.error = exc.status, exc.code
                return await self._reply_and_close(fd, local_reply(exc.status, exc.code, str(exc), close=True))
            except h1_to_h2.ClientGone as exc:
                log.debug("%s: client gone mid-request: %s", self.listener.name, exc)
                return False
            except H2StreamError:
                cluster.record_outcome(pool, 0, "upstream_reset")
                return await self._fail(fd, ex, _UpstreamFailed(502, "upstream_reset"))
            if stream.fields is None:
                return await self._fail(fd, ex, _UpstreamFailed(504, "upstream_timeout"))
            ex.upstream_time = monotonic() - sent_at
            ex.upstream_status = ex.status = status
            if cluster.outlier is not None:
                cluster.record_outcome(pool, status, None)
            ex.responded = True
            bodyless = head.method == b"HEAD" or status in (204, 304)
            length_known = any(name == b"content-length" for name, _ in fields)
            # An HTTP/1.0 client cannot read chunked framing: its body ends with the connection.
            chunked = not bodyless and not length_known and head.version == 11
            keep = (head.keep_alive and body.complete and not self.draining
                    and (bodyless or length_known or chunked))
            out = h1_to_h2.response_head(status, fields, chunked, not keep)
            ex.bytes_out = len(out)
            try:
                await self._reply(fd, out)
                if not bodyless:
                    await h1_to_h2.send_response_body(stream, functools.partial(self._reply, fd), chunked, idle)
            except (H2StreamError, TimeoutError, _ClientGone) as exc:
                log.debug("%s: response from HTTP/2 upstream broke off: %s", self.listener.name, exc)
                return False
            return keep
        finally:
            stream.cancel()

    @staticmethod
    def _observed(observer: Observer | None, obs: Observation, head: RequestHead, route: str | None,
                  cluster: str | None, ex: _Exchange | None, status: int, error: str | None,
                  started: float, request_id: bytes | None, peer: bytes,
                  client: DownstreamPeer | None) -> None:
        """Hand a finished request to the observer (access log line, spans)."""
        assert observer is not None
        attempts = (ex.tries + ex.retried) if ex is not None and ex.address is not None else 0
        observer.end(
            obs, head, route, cluster, ex.address if ex is not None else None, status, error,
            head.size + max(head.content_length, 0), ex.bytes_out if ex is not None else 0,
            monotonic() - started, ex.upstream_time if ex is not None else None, attempts, request_id,
            peer, client.identity if client is not None else None,
            ex.upstream_status if ex is not None else 0)

    async def _run_exchange(self, fd: int, buf: RecvBuffer, ex: _Exchange,
                            pool: EndpointPool | None = None, *, fresh_only: bool = False,
                            exclude: int | None = None) -> bool:
        """Proxy one request the general way (bodies that stream, tunnels, retries).

        `pool` is the endpoint already picked, if any; `fresh_only`: do not take a pooled
        connection (none was idle, or the one taken turned out dead); `exclude`: an
        endpoint a failed try went to, avoided if any other will do.
        """
        body = ex.body
        try:
            if body.complete:
                # The common case needs no second task and no cancel scope:
                # timeouts apply where the driver actually waits.
                return await self._proxy(fd, buf, ex, None, pool, fresh_only, exclude)
            # The body streams in a second task while this one awaits the
            # response. Failures are caught inside the nursery, so they arrive
            # here as themselves rather than wrapped in an exception group.
            keep = False
            failure: _UpstreamFailed | _ClientGone | OSError | None = None
            async with trio.open_nursery() as nursery:
                try:
                    keep = await self._proxy(fd, buf, ex, nursery, pool, fresh_only, exclude)
                except (_UpstreamFailed, _ClientGone, OSError) as exc:
                    failure = exc
                if not body.complete:
                    # The upstream answered (or failed) before the whole body
                    # went up: neither connection has a known boundary now.
                    nursery.cancel_scope.cancel()
                    keep = False
            if failure is not None:
                raise failure
            if not body.complete and ex.responded:
                # The response went out while the client was still sending: read
                # the rest away before closing, or the close would reset the
                # connection and could destroy the response before it is read.
                await self._linger(fd)
                return False
            if body.failure is not None and not ex.responded:
                # The client's body broke its framing before any response.
                error = body.failure
                ex.status, ex.error = error.status, error.code
                return await self._reply_and_close(fd, local_reply(error.status, error.code, str(error),
                                                                   close=True))
            return keep
        except _UpstreamFailed as exc:
            return await self._fail(fd, ex, exc)

    async def _refuse(self, fd: int, head: RequestHead, status: int, code: str,
                      request_id: bytes | None) -> bool:
        """Answer a request locally without forwarding it; True when the connection stays
        open (it cannot when an unread body may follow, or the client asked to close)."""
        if head.chunked or head.content_length > 0 or not head.keep_alive or self.draining:
            return await self._reply_and_close(fd, local_reply(status, code, close=True,
                                                               request_id=request_id))
        await self._reply(fd, local_reply(status, code, request_id=request_id))
        return True

    async def _admit(self, policies: RoutePolicies) -> tuple[int, str] | None:
        """The route's rate limit and fault injection: (status, code) to answer locally
        instead of forwarding, or None to go on (after any injected delay)."""
        bucket = policies.rate_limit
        if bucket is not None and not bucket.allow(monotonic()):
            return 429, "rate_limited"
        if policies.fault is not None:
            action = fault_action(policies.fault, random.random(), random.random())
            if action.delay > 0:
                await trio.sleep(action.delay)
            if action.abort is not None:
                return action.abort, "fault_abort"
        return None

    async def _may_retry(self, ex: _Exchange, status: int, code: str | None) -> bool:
        """After a try that failed before anything went to the client (the upstream's
        `status`, or our `code` when it gave no answer): True, once the backoff has passed,
        when the route's retry policy sends the request again.

        Only within the route timeout, the attempts, the retry budget and the cluster's
        max_retries; a non-idempotent request only when the try provably never reached
        the upstream (RFC 9110 9.2.2); a body only when it is buffered whole.
        """
        policies = ex.policies
        assert policies is not None
        retry, budget = policies.retry, policies.budget
        if retry is None or budget is None or ex.tries > retry.attempts or not ex.replayable:
            return False
        if not retry.retriable(status, code) or not may_replay(ex.head.method, code):
            return False
        deadline = ex.route_deadline()
        if trio.current_time() >= deadline or not budget.can_retry(monotonic()):
            return False
        circuit = ex.cluster.circuit
        if circuit is not None:
            # max_retries bounds retries in flight: the previous retry (if any) is over.
            if ex.retry_held:
                circuit.release(RETRIES)
                ex.retry_held = False
            if not circuit.try_acquire(RETRIES):
                return False
            ex.retry_held = True  # until the next retry, or the end of the exchange
        if not budget.try_spend(monotonic()):
            return False  # the window moved since can_retry: the budget decides
        ex.tries += 1
        ex.cluster.stats.retries += 1
        delay = retry.backoff(ex.tries - 1, random.random())
        if delay > 0:
            await trio.sleep_until(min(trio.current_time() + delay, deadline))
        ex.start_try()
        return True

    def _mirror(self, policies: RoutePolicies, head: RequestHead, extra: bytes, drop: tuple[bytes, ...],
                body: bytes) -> None:
        """Shadow a copy of the request to the mirror cluster, in a task of its own beside
        the connections' (so a drain waits for it, up to MIRROR_TIMEOUT)."""
        target = mirror_cluster(policies.mirror, random.random())
        cluster = self.clusters.get(target) if target is not None else None
        nursery = trio.lowlevel.current_task().parent_nursery
        if cluster is None or nursery is None or self.mirrors_in_flight >= MAX_MIRRORS_IN_FLIGHT:
            return
        request = head.serialize(extra + b"x-meshproxy-shadow: 1\r\n", False, drop) + body
        self.mirrors_in_flight += 1
        nursery.start_soon(self._send_mirror, cluster, request, head.method)

    async def _send_mirror(self, cluster: UpstreamCluster, request: bytes, method: bytes) -> None:
        """Send a mirrored request and wait for its response head, which is dropped with the
        connection. Whatever happens stays here: the primary request never sees it."""
        try:
            with trio.move_on_after(MIRROR_TIMEOUT):
                pool = cluster.pick()
                up = pool.take_idle() or await pool.open()
                try:
                    await _send_all(up.fd, request, MIRROR_TIMEOUT)
                    upbuf = up.buffer
                    while parse_response(upbuf.data, upbuf.start, upbuf.end, self.limits, method) is None:
                        n = upbuf.recv(up.fd)
                        if n == 0 or n == -2:
                            break
                        if n == -1:
                            await trio.lowlevel.wait_readable(up.fd)
                finally:
                    pool.discard(up)
        except Exception as exc:  # noqa: BLE001 - a mirror's failure is only logged
            log.debug("%s: mirror to %s: %s", self.listener.name, cluster.name, exc)
        finally:
            self.mirrors_in_flight -= 1

    async def _fail(self, fd: int, ex: _Exchange, exc: _UpstreamFailed) -> bool:
        """Answer a request whose upstream failed before any response byte went to the
        client; then close (whatever of the request body is still coming has nowhere to go)."""
        head = ex.head
        log.info("%s: %s %s -> %d %s", self.listener.name, head.method.decode("latin-1"),
                 head.path[:200].decode("latin-1"), exc.status, exc.code)
        ex.status, ex.error = exc.status, exc.code
        reply = local_reply(exc.status, exc.code, close=True, request_id=ex.request_id)
        ex.bytes_out = len(reply)
        return await self._reply_and_close(fd, reply)

    async def _proxy(self, fd: int, buf: RecvBuffer, ex: _Exchange, nursery: trio.Nursery | None,
                     picked: EndpointPool | None, fresh_only: bool, exclude: int | None) -> bool:
        head = ex.head
        up, pool, response = await self._send_and_await_head(fd, buf, ex, nursery, picked, fresh_only,
                                                             exclude)
        try:
            ex.responded = True
            ex.status = response.status
            ex.bytes_out = response.size + max(response.content_length, 0)
            if ex.tunnel and _switches_protocol(head, response):
                try:
                    await self._tunnel(fd, buf, up, response)
                finally:
                    pool.discard(up)  # a tunnelled connection is never pooled
                return False
            client_keep = await self._forward_response(fd, head, response, up, ex.body.complete)
        except BaseException:
            if up.fd >= 0:
                pool.discard(up)
            raise
        # Only now, with the response fully written to the client, may the
        # upstream connection serve another request.
        if response.keep_alive and ex.body.complete:
            pool.give_back(up)
        else:
            pool.discard(up)
        return client_keep

    async def _send_and_await_head(self, fd: int, buf: RecvBuffer, ex: _Exchange,
                                   nursery: trio.Nursery | None, picked: EndpointPool | None,
                                   fresh_only: bool, exclude: int | None
                                   ) -> tuple[UpstreamConn, EndpointPool, ResponseHead]:
        """Connect (or reuse), send the request, return the response head.

        A connect that fails goes on to another endpoint. A reused connection that
        turns out dead before any response byte is retried once on a fresh connection
        when the request is safe to replay. Beyond that, the route's retry policy
        decides (`_may_retry`).
        """
        head, cluster, request, body = ex.head, ex.cluster, ex.request, ex.body
        tried: list[int] = [] if exclude is None else [exclude]
        connect_failures = 0
        replayable = body.complete and head.method in IDEMPOTENT and not ex.retried
        while True:
            try:
                if picked is not None:
                    pool, picked = picked, None
                else:
                    pool = cluster.pick(tried, ex.key)
                ex.start_try()
                up = None if fresh_only else pool.take_idle()
                reused = up is not None
                if up is None:
                    try:
                        with trio.move_on_at(ex.deadline()):
                            up = await pool.open()
                    except UpstreamConnectError as exc:
                        ex.address = pool.address_text  # what the access log names for the failure
                        cluster.record_outcome(pool, 0, exc.code)
                        tried.append(pool.index)
                        connect_failures += 1
                        if connect_failures < min(len(cluster.pools), MAX_CONNECT_ATTEMPTS):
                            continue
                        if ex.policies is not None and await self._may_retry(ex, 0, exc.code):
                            connect_failures = 0
                            continue
                        raise _UpstreamFailed(exc.status, exc.code) from exc
                    if up is None:  # the try's deadline passed while connecting
                        cluster.record_outcome(pool, 0, "upstream_timeout")
                        if ex.policies is not None and await self._may_retry(ex, 0, "upstream_timeout"):
                            tried.append(pool.index)
                            continue
                        raise _UpstreamFailed(504, "upstream_timeout")
            except (CircuitOpenError, NoHealthyUpstreamError) as exc:
                raise _UpstreamFailed(exc.status, exc.code) from exc
            try:
                try:
                    sent = send_from(up.fd, request, 0)
                    if sent != len(request):
                        await _send_all(up.fd, request, offset=max(sent, 0))
                except OSError as exc:
                    raise _UpstreamFailed(502, "upstream_reset", retriable=reused) from exc
                sent_at = monotonic()
                if ex.endpoint is not pool.stats:  # first send, or a retry elsewhere
                    if ex.endpoint is not None:
                        ex.endpoint.active -= 1
                    ex.endpoint = pool.stats
                    ex.address = pool.address_text
                    pool.stats.active += 1
                if not body.complete:
                    assert nursery is not None
                    nursery.start_soon(self._stream_request_body, fd, buf, up.fd, body, nursery.cancel_scope)
                if cluster.load_aware:
                    response = await self._await_head_counted(fd, up, head, reused, ex, pool)
                else:
                    # The reply cannot be here yet: yield once, then try, then wait.
                    await yield_now()
                    response = self._parsed_response(up, head)
                    if response is None:
                        response = await self._read_response_head(fd, up, head, reused, ex)
                ex.upstream_time = monotonic() - sent_at
            except _UpstreamFailed as exc:
                pool.discard(up)
                if exc.retriable and replayable:
                    cluster.stats.retries += 1
                    ex.retried = True
                    replayable = False
                    fresh_only = True
                    continue
                cluster.record_outcome(pool, 0, exc.code)
                if body.complete and ex.policies is not None and await self._may_retry(ex, 0, exc.code):
                    tried.append(pool.index)
                    fresh_only = False
                    continue
                raise
            except BaseException:
                pool.discard(up)
                raise
            ex.upstream_status = response.status
            if cluster.outlier is not None:
                cluster.record_outcome(pool, response.status, None)
            if (response.status >= 500 and body.complete and ex.policies is not None
                    and await self._may_retry(ex, response.status, None)):
                pool.discard(up)  # its body unread: the connection has no boundary now
                tried.append(pool.index)
                fresh_only = False
                continue
            return up, pool, response

    async def _await_head_counted(self, fd: int, up: UpstreamConn, head: RequestHead, reused: bool,
                                  ex: _Exchange, pool: EndpointPool
                                  ) -> ResponseHead:
        """The response head, with the request counted in flight and timed for the balancer."""
        balancer = ex.cluster.balancer
        balancer.on_request_start(pool.index)
        sent_at = monotonic()
        try:
            await trio.lowlevel.checkpoint()
            response = self._parsed_response(up, head)
            if response is None:
                response = await self._read_response_head(fd, up, head, reused, ex)
        finally:
            # Time to the response head: what peak_ewma steers by.
            balancer.on_request_end(pool.index, monotonic() - sent_at)
        return response

    def _parsed_response(self, up: UpstreamConn, head: RequestHead) -> ResponseHead | None:
        """The final response head if one recv brings it whole, else None (no state changed).

        The fast path: one read, one parse. Anything else (nothing yet, a
        partial head, an interim 1xx, errors) is left to `_read_response_head`.
        """
        buf = up.buffer
        try:
            if buf.recv(up.fd) <= 0:
                return None
            response = parse_response(buf.data, buf.start, buf.end, self.limits, head.method)
        except (OSError, ProtocolError):
            return None  # the slow path reads the same state again and reports it
        if response is None or response.status < 200:
            return None
        buf.consume(response.size)
        return response

    async def _read_response_head(self, fd: int, up: UpstreamConn, head: RequestHead,
                                  reused: bool, ex: _Exchange) -> ResponseHead:
        buf = up.buffer
        limits = self.limits
        got_any = False
        while True:
            if len(buf):
                got_any = True
                try:
                    response = parse_response(buf.data, buf.start, buf.end, limits, head.method)
                except ProtocolError as exc:
                    log.info("%s: bad response from upstream: %s", self.listener.name, exc)
                    raise _UpstreamFailed(502, "upstream_protocol_error") from exc
                if response is not None:
                    buf.consume(response.size)
                    if 100 <= response.status < 200 and response.status != 101:
                        if head.version == 11 and response.status != 100:
                            await self._reply(fd, response.serialize())
                        continue  # interim response; 100 we answered ourselves
                    return response
            try:
                n = buf.recv(up.fd)
            except OSError as exc:
                raise _UpstreamFailed(502, "upstream_reset", retriable=reused and not got_any) from exc
            if n > 0:
                continue
            if n == 0:
                raise _UpstreamFailed(502, "upstream_reset", retriable=reused and not got_any)
            if n == -2:
                raise _UpstreamFailed(502, "upstream_protocol_error")
            with trio.move_on_at(ex.deadline()):
                await trio.lowlevel.wait_readable(up.fd)
                continue
            raise _UpstreamFailed(504, "upstream_timeout")

    async def _stream_request_body(self, fd: int, buf: RecvBuffer, up_fd: int, body: _RequestBody,
                                   exchange: trio.CancelScope) -> None:
        """Forward the rest of a request body that was not buffered with the head.

        If the client breaks off, or the upstream stops taking the body, the
        whole exchange ends (`exchange` is cancelled) and both connections close.
        """
        try:
            await self._forward_request_body(fd, buf, up_fd, body)
        except ProtocolError as exc:
            body.failure = exc
            exchange.cancel()
        except (_ClientGone, OSError) as exc:
            log.debug("%s: request body: %s", self.listener.name, exc)
            exchange.cancel()

    async def _forward_request_body(self, fd: int, buf: RecvBuffer, up_fd: int, body: _RequestBody) -> None:
        try:
            if body.scanner is None:
                pump = SplicePump(fd, up_fd)
                pump.limit = body.remaining
                try:
                    await _drive(pump)
                finally:
                    pump.close()
                if pump.bytes < pump.limit:
                    raise _ClientGone("client closed mid-body")
            elif not await self._stream_chunked(fd, buf, up_fd, body.scanner):
                raise _ClientGone("client closed mid-body")
        except _PumpError as exc:
            raise _ClientGone(f"request body: {exc}") from exc
        body.complete = True

    async def _stream_chunked(self, src: int, buf: RecvBuffer, dst: int, scanner: ChunkedScanner,
                              decoder: ChunkedDecoder | None = None) -> bool:
        """Forward a chunked body, checking its framing; False if src ended early.

        The bytes go verbatim, or through `decoder` (data only) for a client
        that cannot read chunked framing.
        """
        while not scanner.done:
            n = buf.recv(src)
            if n == 0:
                return False
            if n == -1:
                await _wait(trio.lowlevel.wait_readable, src, STREAM_IDLE_TIMEOUT)
                continue
            count = scanner.scan(buf.data, buf.start, buf.end)
            if decoder is not None:
                await _send_all(dst, decoder.feed(buf.take(count)))
                continue
            while count:
                sent = buf.send_to(dst, count)
                if sent < 0:
                    await _wait(trio.lowlevel.wait_writable, dst, STREAM_IDLE_TIMEOUT)
                else:
                    count -= sent
        return True

    async def _forward_response(self, fd: int, head: RequestHead, response: ResponseHead,
                                up: UpstreamConn, body_complete: bool) -> bool:
        """Send the response head and body; True when the client connection may be reused.

        A response the upstream breaks off is passed on broken (truncated,
        then the connection closes), never completed.
        """
        buf = up.buffer
        kind = response.body
        client_keep = (head.keep_alive and kind != BODY_UNTIL_CLOSE and not self.draining
                       and body_complete)
        if not client_keep:
            extra = b"connection: close\r\n"
        elif head.version == 10:
            extra = b"connection: keep-alive\r\n"
        else:
            extra = b""
        out = response.serialize(extra)
        try:
            if kind == BODY_NONE:
                await _send_all(fd, out)
            elif kind == BODY_LENGTH:
                length = response.content_length
                have = min(len(buf), length)
                if have:
                    out += buf.take(have)
                sent = send_from(fd, out, 0)
                if sent != len(out):
                    await _send_all(fd, out, offset=max(sent, 0))
                if have < length:
                    await _pump_exactly(up.fd, fd, length - have)
            elif kind == BODY_CHUNKED:
                scanner = ChunkedScanner(self.limits, response=True)
                try:
                    first = scanner.scan(buf.data, buf.start, buf.end)
                except ProtocolError as exc:
                    # Nothing went to the client yet: it still gets a reply.
                    raise _UpstreamFailed(502, "upstream_protocol_error") from exc
                decoder = None
                if head.version == 10:
                    # HTTP/1.0 has no chunked framing: send the data alone and
                    # mark its end by closing the connection.
                    client_keep = False
                    decoder = ChunkedDecoder()
                    out = response.serialize(b"connection: close\r\n", drop=(b"transfer-encoding",))
                    await _send_all(fd, out + decoder.feed(buf.take(first)))
                else:
                    await _send_all(fd, out + buf.take(first))
                if not await self._stream_chunked(up.fd, buf, fd, scanner, decoder):
                    raise _ClientGone("upstream broke off the response body")
            else:  # until close: the body ends when the upstream closes
                await _send_all(fd, out + buf.take(len(buf)))
                pump = SplicePump(up.fd, fd)
                try:
                    await _drive(pump)
                finally:
                    pump.close()
        except _PumpError as exc:
            raise _ClientGone(f"response body: {exc}") from exc
        except ProtocolError as exc:
            raise _ClientGone(f"upstream chunked framing: {exc}") from exc
        except OSError as exc:
            raise _ClientGone(f"response: {exc}") from exc
        return client_keep

    async def _tunnel(self, fd: int, buf: RecvBuffer, up: UpstreamConn, response: ResponseHead) -> None:
        """After 101 Switching Protocols (or a CONNECT 2xx): relay bytes both ways."""
        try:
            await _send_all(fd, response.serialize(keep_upgrade=True) + up.buffer.take(len(up.buffer)))
            if len(buf):
                await _send_all(up.fd, buf.take(len(buf)))
        except OSError as exc:
            raise _ClientGone(f"tunnel: {exc}") from exc
        reset_fd = await relay_until_done(self.engine, Relay(fd, up.fd, True), self.idle_timeout)
        if reset_fd is not None and reset_fd >= 0:
            sockops.reset_on_close(reset_fd)


class _RequestBody:
    """Where a request body stands: buffered with the head, or still streaming."""

    __slots__ = ("complete", "failure", "remaining", "scanner")

    def __init__(self, head: RequestHead, limits: Limits) -> None:
        self.scanner = ChunkedScanner(limits) if head.chunked else None
        self.remaining = max(head.content_length, 0)  # length-delimited bytes still to come
        self.complete = self.scanner is None and self.remaining == 0
        self.failure: ProtocolError | None = None  # bad chunked framing found while streaming

    def take_buffered(self, buf: RecvBuffer) -> bytes:
        """The part of the body already in `buf` (consumed from it)."""
        if self.complete:
            return b""
        if self.scanner is not None:
            data = buf.take(self.scanner.scan(buf.data, buf.start, buf.end))
            self.complete = self.scanner.done
            return data
        data = buf.take(min(len(buf), self.remaining))
        self.remaining -= len(data)
        self.complete = self.remaining == 0
        return data


class _Exchange:
    """One request on its way upstream: what `_proxy` needs to carry it through."""

    __slots__ = (
        "_deadline",
        "_try_deadline",
        "address",
        "body",
        "bytes_out",
        "cluster",
        "endpoint",
        "error",
        "head",
        "key",
        "per_try",
        "policies",
        "replayable",
        "request",
        "request_id",
        "responded",
        "retried",
        "retry_held",
        "status",
        "timeout",
        "tries",
        "tunnel",
        "upstream_status",
        "upstream_time",
    )

    def __init__(self, head: RequestHead, cluster: UpstreamCluster, request: bytes,
                 body: _RequestBody | _NoBody, tunnel: bool, *, timeout: float, key: bytes | None,
                 request_id: bytes) -> None:
        self.head = head
        self.cluster = cluster
        self.request = request  # the upstream head, and the body bytes that came with it
        self.body = body
        self.tunnel = tunnel
        self.timeout = timeout  # the route timeout: until the response head arrives
        self._deadline: float | None = None
        self.key = key  # what a hashing balancer hashes, if the cluster hashes
        self.responded = False  # response bytes went to the client: no local reply now
        self.retried = False  # sent again on a fresh connection: never a second time
        self.policies: RoutePolicies | None = None  # the route's retry, fault, rate limit, mirror
        self.replayable = False  # may be sent again by the retry policy (body buffered whole)
        self.tries = 1  # tries the retry policy made (the access log's attempts)
        self.retry_held = False  # holds one of the cluster breaker's retry slots
        self.per_try: float | None = None  # the retry policy's per-try timeout
        self._try_deadline: float | None = None
        self.request_id = request_id
        # What the request counts as when it ends (telemetry):
        self.status = 0  # the status the client got (0: none)
        self.error: str | None = None  # x-meshproxy-error code of a local reply
        self.endpoint: EndpointStats | None = None  # where it was sent
        self.address: str | None = None  # and that endpoint's address
        self.upstream_status = 0  # the last answer from upstream (0: none)
        self.bytes_out = 0  # to the client, as far as known (bodies that stream: as framed)
        self.upstream_time: float | None = None  # seconds from sending to the response head

    def deadline(self) -> float:
        """When the current try must have its response head: the route deadline, or the
        per-try timeout's if sooner. Both are fixed the first time a wait needs them: the
        fast path never waits, so it never pays for reading the clock."""
        if self._deadline is None:
            self._deadline = trio.current_time() + self.timeout
        if self.per_try is not None:
            if self._try_deadline is None:
                self._try_deadline = trio.current_time() + self.per_try
            return min(self._deadline, self._try_deadline)
        return self._deadline

    def route_deadline(self) -> float:
        """The route timeout as a deadline: the whole request, retries included."""
        if self._deadline is None:
            self._deadline = trio.current_time() + self.timeout
        return self._deadline

    def start_try(self) -> None:
        """A new try begins: its per-try timeout starts when it first waits."""
        self._try_deadline = None


class _NoBody:
    """The body of a request without one: complete from the start, never streamed."""

    __slots__ = ()
    complete = True
    failure = None


_NO_BODY = _NoBody()


def _authorized(authz: Policy, client: DownstreamPeer | None, head: RequestHead) -> bool:
    return decide_request(authz, client.identity if client is not None else None, head.method,
                          head.path or b"/")


def _switches_protocol(head: RequestHead, response: ResponseHead) -> bool:
    if head.method == b"CONNECT":
        return 200 <= response.status < 300
    return response.status == 101


async def _pump_exactly(src: int, dst: int, length: int) -> None:
    """Splice exactly `length` bytes src -> dst; _ClientGone if src ends early."""
    pump = SplicePump(src, dst)
    pump.limit = length
    try:
        await _drive(pump)
    finally:
        pump.close()
    if pump.bytes < length:
        raise _ClientGone("upstream broke off the response body")
