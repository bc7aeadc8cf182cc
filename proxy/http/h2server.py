"""HTTP/2 from clients (cleartext, prior knowledge): one driver per connection, a pool of
worker tasks for its streams.

`Http1Proxy.serve` hands a connection here when its first bytes are the HTTP/2 preface
(`h2codec.is_h2_preface`). The connection's reader feeds the client's bytes to the
protocol state (`_core.h2conn.H2Conn`: frames, HPACK, stream states, flow control and the
flood watch, in C) and dispatches the events it returns. Each request takes
the same path as an HTTP/1 request — route → route policies → cluster (circuit breaker,
pick) → endpoint → upstream — with the listener's `Http1Proxy` for the route table,
clusters and stats of the config version in effect when the stream starts.

The common request (no body, an HTTP/1 cluster, no route policies, no access log or
tracing, an idle pooled connection) is sent upstream by the reader itself as it reads the
client's frames; after one yield for the whole batch the reader reads the answers, and
sends each one that is whole at once. Everything else, and the answers that are not in yet, go to a worker task
of the connection; a worker that finishes its stream waits for the next one, so a stream
costs a wake-up, not a task.

What the state queues for the client (responses, acknowledgements, window updates) is
written by the connection's writer task when it next runs, so what all streams produced
in one scheduler pass goes out in one send. Output is bounded: past `outbound_cap` bytes
queued, the reader stops reading and streams stop sending, so a client that does not
read slows only its own connection; one that reads nothing for `write_stall_timeout`
loses it.

Upstream is HTTP/1.1 through the endpoint's keep-alive pool (`EndpointPool`), or HTTP/2
through `upstream.h2pool` when the cluster says `protocol: http2` (gRPC needs that).
Bodies stream both ways under flow control: a request body is acknowledged to the client
(WINDOW_UPDATE) only once written upstream, and a response body is read from upstream
only as fast as the client's window takes it, so memory per connection stays bounded by
the windows and the outbound queue cap.

gRPC: trailers pass through (an HTTP/1 chunked trailer section becomes trailing HEADERS);
a proxy-made error on an `application/grpc` request is a trailers-only response with a
`grpc-status` (14 UNAVAILABLE, 4 DEADLINE_EXCEEDED, 12 UNIMPLEMENTED, ...); `grpc-timeout`
bounds the whole call.

Drain (`drain(proxy)`): every connection sends GOAWAY with the last stream id it took,
refuses newer streams, and closes once the open ones have finished.
"""

from __future__ import annotations

import errno
import logging
import random
import weakref
from collections import deque
from typing import TYPE_CHECKING, Any

import outcome
import trio

from .._core.h2conn import (
    CLOSED,
    EV_DATA,
    EV_GOAWAY,
    EV_REQUEST,
    EV_RESET,
    EV_TRAILERS,
    EV_WINDOW,
    HALF_CLOSED_LOCAL,
    H2Conn,
    StreamClosed,
)
from .._core.h2msg import H2Request, MalformedRequest, h1_request_head, parse_request
from .._core.http1 import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    ChunkedScanner,
    ProtocolError,
    ResponseHead,
    parse_response,
)
from .._core.iobuf import RecvBuffer, send_from
from .._core.splice import monotonic
from ..cluster.circuit import REQUESTS, RETRIES
from ..errors import (
    CircuitOpenError,
    NoHealthyUpstreamError,
    ProxyError,
    UpstreamConnectError,
)
from ..net.sched import yield_now
from ..policy.authz import decide_request
from ..policy.retry import IDEMPOTENT
from ..telemetry import UNROUTED, EndpointStats, record_request
from ..upstream import EndpointPool, UpstreamCluster, UpstreamConn
from ..upstream.h2pool import H2ClientStream, H2StreamError, H2Upstreams
from .h2codec import (
    INTERNAL_ERROR,
    NO_ERROR,
    PREFACE,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    H2Limits,
    TrailerDecoder,
    grpc_error_headers,
    h2_local_reply,
    h2_request_headers,
    h2_response_headers,
    h2_trailers,
    is_h2_preface,
    parse_grpc_timeout,
    parse_trailers,
)
from .h2transport import StreamGone
from .observe import Observer

if TYPE_CHECKING:
    from ..net.tls_bridge import DownstreamPeer
    from .h1proxy import Http1Proxy

log = logging.getLogger("meshproxy.http2")

__all__ = ["H2ServerConnection", "drain", "is_h2_preface", "read_preface", "serve_h2"]

READ_SIZE = 65536
GRPC_STATUS = b"grpc-status"
_STALLED: Any = object()  # no body piece came in time
_BODYLESS = frozenset({b"GET", b"HEAD", b"DELETE", b"OPTIONS", b"TRACE"})

# The live connections of each listener's proxy, for drain().
_live: weakref.WeakKeyDictionary[Any, set[H2ServerConnection]] = weakref.WeakKeyDictionary()


def drain(proxy: Any) -> None:
    """GOAWAY on every HTTP/2 connection `proxy` serves: each closes once its open streams
    have finished (new streams are refused). Called from `Http1Proxy.drain`."""
    for conn in list(_live.get(proxy, ())):
        conn.drain()


def connection_count(proxy: Any) -> int:
    return len(_live.get(proxy, ()))


async def read_preface(fd: int, buf: RecvBuffer, timeout: float) -> bool:
    """Read a new connection's first bytes into `buf` until they tell HTTP/2 (its
    connection preface) from anything else: True for HTTP/2. The bytes stay in `buf`
    either way. An HTTP/1 client is told apart on its first bytes ("PRI" starts no HTTP/1
    method), so it never waits here. False too when the client closes, or sends nothing
    for `timeout` seconds: the HTTP/1 path then finds the same."""
    while True:
        n = buf.recv(fd)
        if len(buf):
            verdict = is_h2_preface(buf.data[buf.start:min(buf.end, buf.start + len(PREFACE))])
            if verdict is not None:
                return verdict
        if n == 0:
            return False
        if n < 0:
            with trio.move_on_after(timeout) as wait:
                await trio.lowlevel.wait_readable(fd)
            if wait.cancelled_caught:
                return False


async def serve_h2(proxy: Http1Proxy, fd: int, already_read: bytes = b"", peer: bytes = b"", *,
                   limits: H2Limits | None = None, upstreams: H2Upstreams | None = None,
                   client: DownstreamPeer | None = None) -> None:
    """Serve one HTTP/2 connection until it ends. `already_read`: the bytes read from the
    client so far (the preface at least). The caller owns and closes `fd`.

    `upstreams`: the worker's HTTP/2 upstream pools (`proxy.h2_upstreams` when unset);
    without any, this connection keeps its own for its lifetime. `client`: the verified
    mTLS peer, for the listener's policy and `x-forwarded-client-cert`."""
    conn = H2ServerConnection(proxy, fd, peer, limits or getattr(proxy, "h2_limits", None) or H2Limits(),
                              upstreams or getattr(proxy, "h2_upstreams", None))
    conn.client = client
    await conn.run(already_read)


class _UpstreamFailed(Exception):
    """Nothing of a response was sent to the client yet: a local reply follows."""

    def __init__(self, status: int, code: str, *, retriable: bool = False) -> None:
        super().__init__(code)
        self.status = status
        self.code = code
        self.retriable = retriable


class _Stream:
    """One client stream: its request, the body as it arrives, what was answered."""

    __slots__ = ("body", "body_sent", "buffered", "bytes_out", "ended", "id", "received", "request", "reset",
                 "responded", "scope", "trailers", "upstream_fd", "wake")

    def __init__(self, stream_id: int, request: H2Request, ended: bool) -> None:
        self.id = stream_id
        self.request = request
        self.body: deque[bytes] = deque()
        self.buffered = 0  # body bytes received and not yet acknowledged
        self.received = 0  # body bytes received in all
        self.bytes_out = 0  # response body bytes sent
        self.body_sent = False  # some of the body went upstream: the request cannot be replayed
        self.ended = ended  # the client sent END_STREAM
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.reset = False  # the client reset it
        self.responded = False  # response headers went out
        # What a reset by the client interrupts (a cancel scope costs more than the rest of a
        # small request's bookkeeping, so the plain path has none): the wait of a worker on
        # its upstream connection, or the scope of a streaming exchange.
        self.upstream_fd = -1
        self.scope: trio.CancelScope | None = None
        self.wake: trio.Event | None = None  # set while the worker waits for more of the body


class _Observed:
    """An HTTP/2 request as the observer (access log, spans) reads an HTTP/1 head, with
    its observation."""

    __slots__ = ("get", "host", "method", "obs", "observer", "path", "target")
    version = 20

    def __init__(self, observer: Observer, request: H2Request) -> None:
        self.get = request.get
        self.host = request.authority
        self.method = request.method
        self.path = request.route_path
        self.target = request.path
        self.observer = observer
        self.obs = observer.begin(self)  # type: ignore[arg-type]  # read like a RequestHead


class _Decided:
    """Where a stream goes: its route and cluster, and what its upstream request carries."""

    __slots__ = ("cluster", "extra_id", "forwarded_for", "observed", "request_id", "route", "route_stats",
                 "started")

    def __init__(self, route: Any, cluster: UpstreamCluster, route_stats: Any, started: float, request_id: bytes,
                 extra_id: bool, forwarded_for: bytes, observed: _Observed | None = None) -> None:
        self.route = route
        self.cluster = cluster
        self.route_stats = route_stats
        self.started = started
        self.request_id = request_id
        self.extra_id = extra_id  # the request id is ours: it goes upstream as a field
        self.forwarded_for = forwarded_for
        self.observed = observed


class _Sent:
    """A plain request the reader already sent on a pooled connection (`_send_plain`)."""

    __slots__ = ("decided", "head", "offset", "pool", "sent_at", "stream", "up")

    def __init__(self, stream: _Stream, decided: _Decided, pool: EndpointPool, up: UpstreamConn, head: bytes,
                 offset: int, sent_at: float) -> None:
        self.stream = stream
        self.decided = decided
        self.pool = pool
        self.up = up
        self.head = head
        self.offset = offset  # bytes of `head` written
        self.sent_at = sent_at


class _Retrying:
    """A stream under its route's retry policy, as `Http1Proxy._may_retry` reads an HTTP/1
    exchange: the policy, the tries so far, whether the request may be sent again."""

    __slots__ = ("_deadline", "cluster", "head", "policies", "replayable", "retry_held", "tries")

    def __init__(self, policies: Any, cluster: UpstreamCluster, head: H2Request, deadline: float,
                 replayable: bool) -> None:
        self.policies = policies
        self.cluster = cluster
        self.head = head  # its method decides what may be replayed (RFC 9110 §9.2.2)
        self._deadline = deadline
        self.replayable = replayable
        self.tries = 1
        self.retry_held = False  # holds one of the cluster breaker's retry slots

    def route_deadline(self) -> float:
        return self._deadline

    def start_try(self) -> None:
        pass  # per-try timeouts are not applied to HTTP/2 streams


class _RetryNow(Exception):
    """The upstream answered with a status the retry policy retries: send it again."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Outcome:
    """How a stream's exchange ended, for telemetry."""

    __slots__ = ("address", "endpoint", "error", "status", "upstream_time")

    def __init__(self) -> None:
        self.status = 0
        self.error: str | None = None
        self.endpoint: EndpointStats | None = None
        self.address: str | None = None  # the endpoint's, for the access log
        self.upstream_time: float | None = None

    def count_at(self, pool: EndpointPool) -> None:
        """The exchange goes to `pool`'s endpoint now: active there (and no longer where a
        failed try went)."""
        if self.endpoint is not pool.stats:
            if self.endpoint is not None:
                self.endpoint.active -= 1
            self.endpoint = pool.stats
            self.address = pool.address_text
            pool.stats.active += 1


class H2ServerConnection:
    """One downstream HTTP/2 connection."""

    def __init__(self, proxy: Http1Proxy, fd: int, peer: bytes, limits: H2Limits,
                 upstreams: H2Upstreams | None) -> None:
        # Imported here, not with this module: h1proxy imports this module for its dispatch.
        from . import h1proxy

        self.proxy = proxy
        self.fd = fd
        self.peer = peer
        self.client: DownstreamPeer | None = None  # the verified mTLS peer, if any
        self.limits = limits
        self.upstreams = upstreams
        # As for HTTP/1 requests: the route timeout when a route sets none, connect attempts
        # per request, and request ids unique across processes.
        self.route_timeout = h1proxy.DEFAULT_ROUTE_TIMEOUT
        self.connect_attempts = h1proxy.MAX_CONNECT_ATTEMPTS
        self.request_ids = h1proxy._request_ids
        self.conn = H2Conn(limits, len(PREFACE))
        self.out = self.conn.out  # what the writer sends; the state appends to it
        self.streams: dict[int, _Stream] = {}
        self.sent: list[_Sent] = []  # plain requests sent upstream by the reader, answers not yet read
        self.goaway_last: int | None = None  # set once a GOAWAY went out: newer streams are refused
        self.peer_done = False  # the client sent GOAWAY: it opens no more streams
        self.closed_reason: str | None = None  # why the client was cut off, for the log
        self.cut_off_code: str | None = None  # ... and for metrics
        self.broken: str | None = None  # why the connection can no longer be written to
        self._nursery: trio.Nursery | None = None
        self._read_wait: trio.CancelScope | None = None
        self._idle_since = 0.0
        self._idle_workers: list[trio.lowlevel.Task] = []
        self._writer: trio.lowlevel.Task | None = None
        self._writer_parked = False
        self._closing: trio.Event | None = None  # set by the writer once all is sent, at the end
        self._room = trio.Event()  # set while the outbound queue is under its cap
        self._room.set()
        self._windows: dict[int, trio.Event] = {}  # streams waiting for send window

    # -- the connection ----------------------------------------------------------------
    async def run(self, already_read: bytes) -> None:
        live = _live.get(self.proxy)
        if live is None:
            live = _live[self.proxy] = set()
        live.add(self)
        self.proxy.stats.h2_connections += 1
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.upstreams is None:
                    self.upstreams = H2Upstreams(nursery, self.limits)
                self.conn.initiate()
                nursery.start_soon(self._run_writer)
                self._idle_since = trio.current_time()
                if self.proxy.draining:
                    self.drain()
                try:
                    await self._read_loop(already_read)
                finally:
                    self._drop_sent()
                # The writer sends what is left (a final GOAWAY), for a moment at most.
                with trio.move_on_after(1.0):
                    await self._finish_writing()
                nursery.cancel_scope.cancel()
        except Exception:  # a bug must cost one connection, not the worker
            log.exception("%s: HTTP/2 connection failed", self.proxy.listener.name)
        finally:
            live.discard(self)
            if self.cut_off_code is not None:
                counts = self.proxy.stats.h2_cut_off
                counts[self.cut_off_code] = counts.get(self.cut_off_code, 0) + 1
            if self.closed_reason is not None:
                log.info("%s: HTTP/2 client %s cut off: %s", self.proxy.listener.name,
                         self.peer.decode("latin-1"), self.closed_reason)

    def drain(self) -> None:
        """GOAWAY now; close once the streams taken so far have finished."""
        if self.goaway_last is None:
            self.goaway_last = self.conn.highest
            self.conn.goaway(self.conn.highest, NO_ERROR)
            self._flush()
        self._wake_reader()

    def _wake_reader(self) -> None:
        if self._read_wait is not None:
            self._read_wait.cancel()

    def _cut_off(self, error_code: int, reason: str) -> None:
        """End the connection at once: GOAWAY with `error_code`."""
        self.closed_reason = self.cut_off_code = reason
        if self.goaway_last is None:
            self.goaway_last = self.conn.highest
        self.conn.goaway(self.conn.highest, error_code, reason.encode()[:128])
        self._flush()

    async def _read_loop(self, data: bytes) -> None:
        fd = self.fd
        limits = self.limits
        conn = self.conn
        buf = RecvBuffer(READ_SIZE)
        while True:
            if data:
                if not self._receive(data):
                    return
                data = b""
                if self.sent:
                    await self._collect()
            if (self.goaway_last is not None or self.peer_done) and not self.streams:
                return
            if len(self.out) > limits.outbound_cap:
                # The client does not read what it asked for: read no more of its asks.
                await self._wait_room()
            try:
                n = buf.recv(fd)
            except OSError:
                return
            if n > 0:
                data = buf.take(len(buf))
                continue
            if n == 0:
                return
            now = trio.current_time()
            if conn.in_header_block:
                deadline = conn.block_started + limits.header_timeout
                why = "header_timeout"
            elif not self.streams:
                deadline = self._idle_since + limits.idle_timeout
                why = "idle_timeout"
            else:
                deadline = float("inf")
                why = ""
            if deadline <= now:
                if why == "idle_timeout":
                    self.drain()  # GOAWAY first, as for any graceful close
                    return
                self._cut_off(PROTOCOL_ERROR, why)
                return
            with trio.move_on_at(deadline) as wait:
                self._read_wait = wait
                await trio.lowlevel.wait_readable(fd)
            self._read_wait = None

    def _receive(self, data: bytes) -> bool:
        """Take bytes from the client; False when the connection must end."""
        conn = self.conn
        now = trio.current_time()
        events = conn.receive(data, now)
        ok = True
        for kind, stream_id, value, flag in events:
            if kind == EV_REQUEST:
                self._on_request(stream_id, value, flag, now)
            elif kind == EV_DATA:
                self._on_data(stream_id, value, flag)
            elif kind == EV_WINDOW:
                self._window_opened(stream_id)
            elif kind == EV_RESET:
                stream = self.streams.get(stream_id)
                if stream is not None:
                    self._abort(stream)
            elif kind == EV_TRAILERS:
                stream = self.streams.get(stream_id)
                if stream is not None:
                    try:
                        stream.trailers = parse_trailers(value)
                    except MalformedRequest:
                        conn.note_reset(now)
                        conn.reset(stream_id, PROTOCOL_ERROR)
                        self._abort(stream)
                        continue
                    stream.ended = True
                    if stream.wake is not None:
                        stream.wake.set()
            elif kind == EV_GOAWAY:
                self.peer_done = True
                if value != NO_ERROR:
                    ok = False
        if conn.error is not None:
            self.closed_reason = conn.violation or f"protocol error: {conn.error[1]}"
            self.cut_off_code = conn.violation or "protocol_error"
            ok = False
        self._flush()
        return ok

    def _on_data(self, stream_id: int, data: bytes, ended: bool) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or stream.reset:
            # Answered already, or refused: nobody reads it, the window opens at once.
            self.conn.ack(stream_id, len(data))
            return
        if data:
            stream.received += len(data)
            stream.body.append(data)
            stream.buffered += len(data)
        expected = stream.request.content_length
        if expected >= 0 and (stream.received > expected or ended and stream.received != expected):
            # Malformed (RFC 9113 §8.1.1): none of the body goes anywhere.
            log.debug("%s: stream %d: body of %d bytes against content-length %d", self.proxy.listener.name,
                      stream_id, stream.received, expected)
            self.conn.note_reset(trio.current_time())
            self.conn.reset(stream_id, PROTOCOL_ERROR)
            stream.body.clear()
            self._abort(stream)
            return
        if ended:
            stream.ended = True
        if stream.wake is not None:
            stream.wake.set()

    def _abort(self, stream: _Stream) -> None:
        """The stream was reset: stop its worker wherever it waits."""
        stream.reset = True
        if stream.scope is not None:
            stream.scope.cancel()
        if stream.upstream_fd >= 0:
            trio.lowlevel.notify_closing(stream.upstream_fd)  # a wait on it raises ClosedResourceError
        if stream.wake is not None:
            stream.wake.set()
        self._window_opened(stream.id)

    def _on_request(self, stream_id: int, headers: list[tuple[bytes, bytes]], ended: bool, now: float) -> None:
        conn = self.conn
        self.proxy.stats.h2_streams += 1
        if self.goaway_last is not None and stream_id > self.goaway_last:
            conn.reset(stream_id, REFUSED_STREAM)
            return
        # The limit binds once the client has acknowledged it; before that (a client may
        # open streams before it reads our SETTINGS) up to twice as many are taken. Streams
        # count as the protocol sees them (this one included), plus a margin for workers
        # still finishing.
        limit = self.limits.max_concurrent_streams
        if not conn.settings_acked:
            limit *= 2
        if len(self.streams) >= limit and (len(self.streams) >= 2 * limit or conn.open_streams > limit):
            conn.note_reset(now)  # past the advertised limit: counts as abuse
            conn.reset(stream_id, REFUSED_STREAM)
            return
        proxy = self.proxy
        limits = proxy.listener.limits
        try:
            if limits is None:
                request = parse_request(headers)
            else:
                request = parse_request(headers, limits.max_header_bytes, limits.max_headers)
        except MalformedRequest as exc:
            if exc.status is None:
                log.debug("%s: malformed HTTP/2 request: %s", proxy.listener.name, exc)
                conn.note_reset(now)
                conn.reset(stream_id, exc.error_code)
                record_request(proxy.route_stats[UNROUTED], None, None, 400, exc.code, 0.0, None)
                return
            self._start(_Stream(stream_id, _bare_request(headers), ended), self._refuse_stream, exc.status,
                        exc.code)
            return
        if ended and request.content_length > 0:
            log.debug("%s: stream %d: no body against content-length %d", proxy.listener.name, stream_id,
                      request.content_length)
            conn.note_reset(now)
            conn.reset(stream_id, PROTOCOL_ERROR)
            return
        stream = _Stream(stream_id, request, ended)
        if not (ended and self._send_plain(stream)):
            self._start(stream, self._serve_stream)

    # -- plain requests, answered by the reader -------------------------------------------
    def _send_plain(self, stream: _Stream) -> bool:
        """A request without a body, to an HTTP/1 cluster with no route policies and an idle
        pooled connection, on a listener with no observer: sent upstream right here by the
        reader, which reads the answers of all it sent in one pass after a yield
        (`_collect`). A stream costs no wake-up and no task then. False (nothing done) for
        anything else: a worker serves it."""
        proxy = self.proxy
        request = stream.request
        if request.grpc or stream.received or proxy.observer is not None:
            return False
        client = self.client
        if proxy.authz is not None and not decide_request(
                proxy.authz, client.identity if client is not None else None, request.method,
                request.route_path or b"/"):
            return False
        routes = proxy.routes
        route = routes.match(request.method, request.authority, request.route_path, request.get)
        if route is None or route.name in proxy.policies:
            return False
        cluster = proxy.clusters[route.cluster or routes.pick_cluster(route, random.random())]
        if cluster.http2 or cluster.load_aware:
            return False
        circuit = cluster.circuit
        if circuit is not None and not circuit.try_acquire(REQUESTS):
            return False
        try:
            pool = cluster.pick((), cluster.hash_key(request.get, self.peer) if cluster.hash_on is not None else None)
        except (CircuitOpenError, NoHealthyUpstreamError):
            pool = None
        up = pool.take_idle() if pool is not None else None
        if up is None:
            if circuit is not None:
                circuit.release(REQUESTS)
            return False
        request_id = request.get(b"x-request-id")
        extra_id = request_id is None
        if request_id is None:
            request_id = self.request_ids.next()
        decided = _Decided(route, cluster, proxy.route_stats[route.name], monotonic(), request_id, extra_id,
                           self._forwarded_for(request))
        framing = b"" if request.content_length < 0 and request.method in _BODYLESS else b"content-length: 0\r\n"
        head = h1_request_head(request, self._extra_fields(decided), framing)
        try:
            offset = send_from(up.fd, head, 0)
        except OSError:
            pool.discard(up)  # stale: nothing went out, a worker starts over
            offset = -1
        else:
            if offset < 0:
                pool.give_back(up)  # took nothing (its buffer is full): a worker starts over
        if offset < 0:
            if circuit is not None:
                circuit.release(REQUESTS)
            return False
        self.streams[stream.id] = stream
        self.sent.append(_Sent(stream, decided, pool, up, head, offset, monotonic()))
        return True

    async def _collect(self) -> None:
        """Read the answers to what `_send_plain` sent, after one yield (they cannot be
        here before): a whole one goes to its client at once; the rest go on in workers."""
        await yield_now()
        sent, self.sent = self.sent, []
        for plain in sent:
            if not self._answer_plain(plain):
                self._start(plain.stream, self._resume_plain, plain)

    def _answer_plain(self, plain: _Sent) -> bool:
        """Answer a plain request whose whole response is already here (a head, and the
        body the client's window takes at once); False to leave it to a worker."""
        stream, up = plain.stream, plain.up
        if stream.reset or plain.offset != len(plain.head):
            return False
        buf = up.buffer
        try:
            buf.recv(up.fd)
        except OSError:
            return False
        if not len(buf):
            return False
        try:
            response = parse_response(buf.data, buf.start, buf.end, self.proxy.limits, stream.request.method)
        except ProtocolError:
            return False
        if response is None or response.status < 200:
            return False
        kind = response.body
        length = response.content_length if kind == BODY_LENGTH else 0
        if (kind != BODY_NONE and kind != BODY_LENGTH) or len(buf) - response.size < length:
            return False
        conn = self.conn
        if length > conn.send_window(stream.id):
            return False
        buf.consume(response.size)
        body = buf.take(length) if length else b""
        headers = h2_response_headers(response.status, response.headers)
        try:
            conn.send_headers(stream.id, headers, not length)
            if length:
                conn.send_data(stream.id, body, True)
        except StreamClosed:
            pass  # reset meanwhile: the response was read whole, the connection is fine
        stream.responded = True
        decided = plain.decided
        cluster, pool = decided.cluster, plain.pool
        now = monotonic()
        if cluster.outlier is not None:
            cluster.record_outcome(pool, response.status, None)
        if response.keep_alive:
            pool.give_back(up)
        else:
            pool.discard(up)
        if cluster.circuit is not None:
            cluster.circuit.release(REQUESTS)
        record_request(decided.route_stats, cluster.stats, pool.stats, response.status, None, now - decided.started,
                       now - plain.sent_at)
        self._stream_done(stream)
        return True

    def _drop_sent(self) -> None:
        """The connection ends with plain requests in flight: their exchanges end here."""
        sent, self.sent = self.sent, []
        for plain in sent:
            plain.pool.discard(plain.up)
            cluster = plain.decided.cluster
            if cluster.circuit is not None:
                cluster.circuit.release(REQUESTS)
            record_request(plain.decided.route_stats, cluster.stats, plain.pool.stats, 0, None,
                           monotonic() - plain.decided.started, None)
            self.streams.pop(plain.stream.id, None)

    async def _resume_plain(self, stream: _Stream, plain: _Sent) -> None:
        """A worker carries on with a plain request the reader could not answer at once."""
        await self._proxy_stream(stream, plain.decided, plain)

    # -- the workers -----------------------------------------------------------------------
    def _start(self, stream: _Stream, handler: Any, *args: Any) -> None:
        """Serve `stream` in an idle worker, or in a new one when all are busy."""
        self.streams[stream.id] = stream
        job = (stream, handler, args)
        if self._idle_workers:
            trio.lowlevel.reschedule(self._idle_workers.pop(), outcome.Value(job))
        else:
            assert self._nursery is not None
            self._nursery.start_soon(self._worker, job)

    async def _worker(self, job: tuple[_Stream, Any, tuple[Any, ...]]) -> None:
        task = trio.lowlevel.current_task()
        idle = self._idle_workers

        def abort(_: Any) -> trio.lowlevel.Abort:
            idle.remove(task)
            return trio.lowlevel.Abort.SUCCEEDED

        while True:
            # The stream is served right here, not in a helper coroutine: every frame between
            # a task and the scheduler is paid again on each yield and resume.
            stream, handler, args = job
            try:
                await handler(stream, *args)
            except (StreamGone, OSError, TimeoutError, trio.ClosedResourceError) as exc:
                log.debug("%s: stream %d: %s", self.proxy.listener.name, stream.id, exc)
            except Exception:  # a bug must cost one stream, not the worker
                log.exception("%s: stream %d failed", self.proxy.listener.name, stream.id)
            finally:
                self._stream_done(stream)
            idle.append(task)
            job = await trio.lowlevel.wait_task_rescheduled(abort)

    def _stream_done(self, stream: _Stream) -> None:
        del self.streams[stream.id]
        self._window_opened(stream.id)
        self._close_stream(stream)
        if not self.streams:
            self._idle_since = trio.current_time()
            self._wake_reader()  # to time the idle connection, or to close a drained one

    def _close_stream(self, stream: _Stream) -> None:
        """After the handler: give back the connection window of body bytes nobody read,
        and reset the stream if it is still open: with NO_ERROR when the response is
        complete and only the client's body is still coming (RFC 9113 §8.1)."""
        if self.broken is not None:
            return
        conn = self.conn
        if stream.buffered:
            conn.ack(stream.id, stream.buffered)
            stream.buffered = 0
        state = conn.stream_state(stream.id)
        if state != CLOSED:
            conn.reset(stream.id, NO_ERROR if state == HALF_CLOSED_LOCAL else INTERNAL_ERROR)
        self._flush()

    # -- sending ---------------------------------------------------------------------------
    def _flush(self) -> None:
        """The state queued bytes: the writer sends them when it next runs."""
        if self._writer_parked and self.out:
            self._writer_parked = False
            trio.lowlevel.reschedule(self._writer)
        if len(self.out) > self.limits.outbound_cap and self._room.is_set():
            self._room = trio.Event()

    async def _run_writer(self) -> None:
        """Write what is queued as the socket takes it; on a write error, or a client that
        reads nothing for `write_stall_timeout`, mark the connection broken and end it."""
        self._writer = trio.lowlevel.current_task()
        fd = self.fd
        out = self.out
        limits = self.limits

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._writer_parked = False
            return trio.lowlevel.Abort.SUCCEEDED

        while True:
            if not out:
                if self._closing is not None:
                    self._closing.set()
                self._writer_parked = True
                await trio.lowlevel.wait_task_rescheduled(abort)
                continue
            try:
                sent = send_from(fd, out, 0)
            except OSError as exc:
                self._fail(f"send: {exc}")
                return
            if sent > 0:
                del out[:sent]
                if len(out) <= limits.outbound_cap // 2 and not self._room.is_set():
                    self._room.set()
                continue
            with trio.move_on_after(limits.write_stall_timeout):
                await trio.lowlevel.wait_writable(fd)
                continue
            self._fail(f"client read nothing for {limits.write_stall_timeout:g}s")
            return

    async def _finish_writing(self) -> None:
        """Wait until the writer has sent everything queued (only the writer touches the
        socket: two tasks may not wait on one fd)."""
        self._closing = trio.Event()
        self._flush()  # wakes a parked writer if anything waits
        if not self.out:
            return
        await self._closing.wait()

    def _fail(self, reason: str) -> None:
        if self.broken is None:
            self.broken = reason
            log.debug("h2 connection broken: %s", reason)
        self.out.clear()
        self._room.set()
        for event in self._windows.values():
            event.set()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _wait_room(self) -> None:
        """Wait while the client has more than `outbound_cap` bytes waiting for it."""
        while len(self.out) > self.limits.outbound_cap and self.broken is None:
            await self._room.wait()
        if self.broken is not None:
            raise StreamGone(self.broken)

    def _window_opened(self, stream_id: int) -> None:
        """The client opened send window on `stream_id` (0: the connection, or all
        streams), or the stream ended: wake who waits for it."""
        if stream_id:
            event = self._windows.get(stream_id)
            if event is not None:
                event.set()
        else:
            for event in self._windows.values():
                event.set()

    async def _wait_window(self, stream_id: int) -> None:
        event = self._windows.get(stream_id)
        if event is None or event.is_set():
            event = self._windows[stream_id] = trio.Event()
        idle = self.limits.stream_idle_timeout
        try:
            with trio.move_on_after(idle):
                await event.wait()
                return
            raise TimeoutError(errno.ETIMEDOUT, f"no send window for {idle:g}s")
        finally:
            if self._windows.get(stream_id) is event:
                del self._windows[stream_id]

    # -- one stream ------------------------------------------------------------------------
    async def _refuse_stream(self, stream: _Stream, status: int, code: str) -> None:
        observer = self.proxy.observer
        observed = _Observed(observer, stream.request) if observer is not None else None
        await self._answer_locally(stream, observed, self.proxy.route_stats[UNROUTED], None, None, status, code,
                                   monotonic(), None)

    async def _serve_stream(self, stream: _Stream) -> None:
        proxy = self.proxy
        request = stream.request
        started = monotonic()
        routes = proxy.routes
        route_stats_all = proxy.route_stats
        request_id = request.get(b"x-request-id")
        client = self.client
        # The observer this stream started with: a reload may replace or remove it meanwhile.
        observed = _Observed(proxy.observer, request) if proxy.observer is not None else None
        if proxy.authz is not None and not decide_request(
                proxy.authz, client.identity if client is not None else None, request.method,
                request.route_path or b"/"):
            await self._answer_locally(stream, observed, route_stats_all[UNROUTED], None, None, 403, "forbidden",
                                       started, request_id)
            return
        route = routes.match(request.method, request.authority, request.route_path, request.get)
        if route is None:
            await self._answer_locally(stream, observed, route_stats_all[UNROUTED], None, None, 404, "no_route",
                                       started, request_id)
            return
        cluster = proxy.clusters[route.cluster or routes.pick_cluster(route, random.random())]
        route_stats = route_stats_all[route.name]
        policies = proxy.policies.get(route.name)
        if policies is not None and (policies.rate_limit is not None or policies.fault is not None):
            refusal = await proxy._admit(policies)
            if refusal is not None:
                status, code = refusal
                await self._answer_locally(stream, observed, route_stats, route, cluster, status, code, started,
                                           request_id)
                return
        circuit = cluster.circuit
        if circuit is not None and not circuit.try_acquire(REQUESTS):
            await self._answer_locally(stream, observed, route_stats, route, cluster, 503, "circuit_open", started,
                                       request_id)
            return
        extra_id = request_id is None
        if request_id is None:
            request_id = self.request_ids.next()
        await self._proxy_stream(stream, _Decided(route, cluster, route_stats, started, request_id, extra_id,
                                                  self._forwarded_for(request), observed))

    async def _answer_locally(self, stream: _Stream, observed: _Observed | None, route_stats: Any, route: Any,
                              cluster: UpstreamCluster | None, status: int, code: str, started: float,
                              request_id: bytes | None) -> None:
        """A request answered before it went anywhere: counted, observed, replied to."""
        record_request(route_stats, cluster.stats if cluster is not None else None, None, status, code,
                       monotonic() - started, None)
        try:
            await self._local_reply(stream, status, code, request_id)
        finally:
            if observed is not None:
                self._observe(observed, stream, route, cluster, None, status, code, started, None, request_id)

    def _observe(self, observed: _Observed, stream: _Stream, route: Any, cluster: UpstreamCluster | None,
                 outcome: _Outcome | None, status: int, error: str | None, started: float,
                 upstream_time: float | None, request_id: bytes | None) -> None:
        """Hand a finished stream to the observer (its access log line, its spans)."""
        address = outcome.address if outcome is not None else None
        client = self.client
        observed.observer.end(
            observed.obs, observed, route.name if route is not None else None,  # type: ignore[arg-type]
            cluster.name if cluster is not None else None, address, status, error, stream.received,
            stream.bytes_out, monotonic() - started, upstream_time, 1 if address is not None else 0, request_id,
            self.peer, client.identity if client is not None else None,
            status if address is not None and error is None else 0)

    def _forwarded_for(self, request: H2Request) -> bytes:
        if request.get(b"x-forwarded-for") is None:
            return self.peer
        return b", ".join(request.get_all(b"x-forwarded-for")) + b", " + self.peer

    async def _proxy_stream(self, stream: _Stream, decided: _Decided, sent: _Sent | None = None) -> None:
        """Forward a routed stream (its circuit breaker slot taken) and count how it ended.
        `sent`: the request already went out on a pooled connection (`_send_plain`)."""
        request = stream.request
        cluster = decided.cluster
        circuit = cluster.circuit
        request_id = decided.request_id
        outcome = _Outcome()
        timeout = decided.route.timeout or self.route_timeout
        call_deadline = float("inf")
        if request.grpc:
            grpc_timeout = parse_grpc_timeout(request.get(b"grpc-timeout"))
            if grpc_timeout is not None:
                call_deadline = trio.current_time() + grpc_timeout
        try:
            if call_deadline == float("inf"):
                await self._forward(stream, decided, timeout, outcome, sent)
            else:
                with trio.move_on_at(call_deadline) as call:
                    await self._forward(stream, decided, timeout, outcome, sent)
                if call.cancelled_caught:
                    outcome.status, outcome.error = 504, "upstream_timeout"
                    await self._local_reply(stream, 504, "upstream_timeout", request_id)
        finally:
            if outcome.endpoint is not None:
                outcome.endpoint.active -= 1
            if circuit is not None:
                circuit.release(REQUESTS)
            record_request(decided.route_stats, cluster.stats, outcome.endpoint, outcome.status, outcome.error,
                           monotonic() - decided.started, outcome.upstream_time)
            if decided.observed is not None:
                self._observe(decided.observed, stream, decided.route, cluster, outcome, outcome.status, outcome.error,
                              decided.started, outcome.upstream_time, request_id)

    async def _forward(self, stream: _Stream, decided: _Decided, timeout: float, outcome: _Outcome,
                       sent: _Sent | None) -> None:
        """Send the request to `cluster` in its protocol and the response back; a failure
        before any response went out is answered locally."""
        request = stream.request
        cluster, request_id, extra_id, forwarded_for = (decided.cluster, decided.request_id, decided.extra_id,
                                                        decided.forwarded_for)
        try:
            client = self.client
            if cluster.http2:
                extra = [(b"x-forwarded-for", forwarded_for),
                         (b"x-forwarded-proto", b"http" if client is None else b"https")]
                if client is not None:
                    extra.append((b"x-forwarded-client-cert", client.xfcc))
                if extra_id:
                    extra.append((b"x-request-id", request_id))
                drop: tuple[bytes, ...] = ()
                observed = decided.observed
                if observed is not None:
                    # Trace context for the upstream, replacing the client's.
                    extra += [tuple(line.split(b": ", 1)) for line in observed.obs.fields.split(b"\r\n") if line]
                    drop = observed.observer.drop
                await self._forward_h2(stream, cluster, h2_request_headers(request, extra, drop=drop), timeout,
                                       outcome, request_id)
            else:
                await self._forward_h1(stream, cluster, self._extra_fields(decided), timeout, outcome, sent,
                                       decided.observed.observer.drop if decided.observed is not None else (),
                                       self.proxy.policies.get(decided.route.name))
        except _UpstreamFailed as exc:
            outcome.status, outcome.error = exc.status, exc.code
            log.info("%s: %s %s -> %d %s (HTTP/2)", self.proxy.listener.name, request.method.decode("latin-1"),
                     request.path[:200].decode("latin-1"), exc.status, exc.code)
            await self._local_reply(stream, exc.status, exc.code, request_id)

    def _extra_fields(self, decided: _Decided) -> bytes:
        """The field lines the proxy adds to a request to an HTTP/1 upstream."""
        client = self.client
        fields = [b"x-forwarded-for: ", decided.forwarded_for,
                  b"\r\nx-forwarded-proto: http\r\n" if client is None else
                  b"\r\nx-forwarded-proto: https\r\nx-forwarded-client-cert: " + client.xfcc + b"\r\n"]
        if decided.extra_id:
            fields += [b"x-request-id: ", decided.request_id, b"\r\n"]
        if decided.observed is not None:
            fields.append(decided.observed.obs.fields)  # trace context, replacing the client's
        return b"".join(fields)

    async def _local_reply(self, stream: _Stream, status: int, code: str, request_id: bytes | None) -> None:
        """A proxy-made answer: a gRPC status for gRPC requests, otherwise the same reply as
        HTTP/1 gets. After response headers went out only a gRPC status (as trailers) or a
        reset can still be said."""
        if stream.request.grpc:
            headers = grpc_error_headers(status, code, request_id=request_id)
            if stream.responded:
                headers = [h for h in headers if h[0] in (GRPC_STATUS, b"grpc-message", b"x-meshproxy-error")]
            self._send_headers(stream, headers, True)
            return
        if stream.responded:
            self.conn.reset(stream.id, INTERNAL_ERROR)
            self._flush()
            return
        headers, body = h2_local_reply(status, code, request_id=request_id)
        head_only = stream.request.method == b"HEAD"
        self._send_headers(stream, headers, head_only)
        if not head_only:
            await self._send_data(stream, body, True)

    def _send_headers(self, stream: _Stream, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        try:
            self.conn.send_headers(stream.id, headers, end_stream)
        except StreamClosed as exc:
            raise StreamGone(str(exc)) from exc
        stream.responded = True
        self._flush()

    async def _send_data(self, stream: _Stream, data: bytes, end_stream: bool) -> None:
        """Send `data` as the client's windows allow, waiting for window (up to
        `stream_idle_timeout` at a time) and for room in the outbound queue. StreamGone
        when the stream is reset or the connection ends."""
        conn = self.conn
        total = len(data)
        pos = 0
        while True:
            if len(self.out) > self.limits.outbound_cap:
                await self._wait_room()
            if self.broken is not None:
                raise StreamGone(self.broken)
            try:
                sent = conn.send_data(stream.id, data[pos:] if pos else data, end_stream)
            except StreamClosed as exc:
                raise StreamGone(str(exc)) from exc
            pos += sent
            stream.bytes_out += sent
            self._flush()
            if pos >= total:
                return
            await self._wait_window(stream.id)

    # -- the request body from the client ----------------------------------------------------
    async def _next_body_piece(self, stream: _Stream) -> bytes | None:
        """The next piece of the request body (None at its end), waiting for it."""
        while not stream.body:
            if stream.ended:
                return None
            if stream.reset:
                raise StreamGone("reset by the client")
            stream.wake = trio.Event()
            with trio.move_on_after(self.limits.stream_idle_timeout):
                await stream.wake.wait()
                continue
            raise TimeoutError("request body stalled")
        return stream.body.popleft()

    def _ack(self, stream: _Stream, n: int) -> None:
        """`n` body bytes were passed on: the client may send as many more."""
        stream.buffered -= n
        if self.broken is None:
            self.conn.ack(stream.id, n)
            self._flush()

    # -- HTTP/1.1 upstream -----------------------------------------------------------------
    async def _forward_h1(self, stream: _Stream, cluster: UpstreamCluster, extra: bytes, timeout: float,
                          outcome: _Outcome, sent: _Sent | None = None, drop: tuple[bytes, ...] = (),
                          policies: Any = None) -> None:
        request = stream.request
        # Framing: a body that is here whole goes with the head under its length.
        whole = stream.ended
        body = b""
        if whole:
            body = b"".join(stream.body)
            stream.body.clear()
            if stream.buffered:
                self._ack(stream, stream.buffered)  # held here now: the connection window reopens
            if body or request.content_length >= 0 or request.method not in _BODYLESS:
                framing = b"content-length: %d\r\n" % len(body)
            else:
                framing = b""
            chunked = False
        elif request.content_length >= 0:
            framing = b"content-length: %d\r\n" % request.content_length
            chunked = False
        else:
            framing = b"transfer-encoding: chunked\r\n"
            chunked = True
        head = h1_request_head(request, extra, framing, drop) + body if sent is None else sent.head
        replayable = whole and request.method in IDEMPOTENT
        deadline = trio.current_time() + timeout
        retrying = None
        if policies is not None and policies.retry is not None and policies.budget is not None:
            policies.budget.record_request(monotonic())
            retrying = _Retrying(policies, cluster, request, deadline,
                                 whole and len(body) <= policies.retry.max_body_bytes)
        try:
            await self._h1_tries(stream, cluster, head, chunked, whole, replayable, deadline, outcome, sent, retrying)
        finally:
            if retrying is not None and retrying.retry_held and cluster.circuit is not None:
                cluster.circuit.release(RETRIES)

    async def _h1_tries(self, stream: _Stream, cluster: UpstreamCluster, head: bytes, chunked: bool, whole: bool,
                        replayable: bool, deadline: float, outcome: _Outcome, sent: _Sent | None,
                        retrying: _Retrying | None) -> None:
        """Pick, connect and exchange until an answer, a failure to pass on, or the retries
        run out."""
        # What a hashing balancer hashes (the same request goes to the same endpoint).
        key = cluster.hash_key(stream.request.get, self.peer) if cluster.hash_on is not None else None
        tried: list[int] = []
        connect_failures = 0
        fresh_only = False
        retried = False
        while True:
            if sent is not None:
                pool, up, reused = sent.pool, sent.up, True
            else:
                try:
                    pool = cluster.pick(tried, key)
                except (CircuitOpenError, NoHealthyUpstreamError) as exc:
                    raise _UpstreamFailed(exc.status, exc.code) from exc
                up = None if fresh_only else pool.take_idle()
                reused = up is not None
            if up is None:
                try:
                    with trio.move_on_at(deadline):
                        up = await pool.open()
                except CircuitOpenError as exc:
                    raise _UpstreamFailed(exc.status, exc.code) from exc
                except UpstreamConnectError as exc:
                    cluster.record_outcome(pool, 0, exc.code)
                    tried.append(pool.index)
                    connect_failures += 1
                    if connect_failures < min(len(cluster.pools), self.connect_attempts):
                        continue
                    raise _UpstreamFailed(exc.status, exc.code) from exc
                if up is None:
                    raise _UpstreamFailed(504, "upstream_timeout")
            outcome.count_at(pool)
            try:
                keep = await self._h1_exchange(stream, up, head, chunked, not whole, reused, deadline, outcome,
                                               sent, retrying)
                sent = None
            except _RetryNow as exc:
                sent = None
                pool.discard(up)
                cluster.record_outcome(pool, exc.status, None)
                tried = [pool.index]  # another endpoint, if there is one
                continue
            except _UpstreamFailed as exc:
                sent = None
                pool.discard(up)
                if exc.retriable and replayable and not retried:
                    retried = True
                    fresh_only = True
                    cluster.stats.retries += 1
                    continue
                cluster.record_outcome(pool, 0, exc.code)
                if retrying is not None and await self.proxy._may_retry(retrying, 0, exc.code):
                    tried = [pool.index]
                    continue
                raise
            except BaseException:
                sent = None
                pool.discard(up)
                raise
            if cluster.outlier is not None:
                cluster.record_outcome(pool, outcome.status, None)
            if keep:
                pool.give_back(up)
            else:
                pool.discard(up)
            return

    async def _h1_exchange(self, stream: _Stream, up: UpstreamConn, head: bytes, chunked: bool, streaming: bool,
                           reused: bool, deadline: float, outcome: _Outcome, already: _Sent | None = None,
                           retrying: _Retrying | None = None) -> bool:
        """Send the request (the rest of it, when `already` sent), forward the response;
        True when `up` may be reused. _RetryNow when the answer is a status the route's
        retry policy (`retrying`) sends the request again for."""
        if stream.reset:
            raise StreamGone("reset by the client")
        stream.upstream_fd = up.fd
        try:
            try:
                sent = send_from(up.fd, head, 0) if already is None else already.offset
                if sent != len(head):
                    await _send_all(up.fd, head, max(sent, 0), self.limits.stream_idle_timeout)
            except OSError as exc:
                raise _UpstreamFailed(502, "upstream_reset", retriable=reused) from exc
            sent_at = monotonic() if already is None else already.sent_at
            if not streaming:
                # The reply cannot be here yet: yield once (from this frame, not a deeper
                # one), then try, then wait.
                if already is None:
                    await yield_now()
                response = await self._h1_response_head(stream, up, reused, deadline, yielded=True)
                outcome.upstream_time = monotonic() - sent_at
                if (response.status >= 500 and retrying is not None
                        and await self.proxy._may_retry(retrying, response.status, None)):
                    raise _RetryNow(response.status)
                return await self._h1_forward_response(stream, up, response, outcome)
            return await self._h1_streaming_exchange(stream, up, chunked, deadline, sent_at, outcome)
        finally:
            stream.upstream_fd = -1

    async def _h1_streaming_exchange(self, stream: _Stream, up: UpstreamConn, chunked: bool, deadline: float,
                                     sent_at: float, outcome: _Outcome) -> bool:
        # The body streams in a second task while this one waits for the response.
        body_done = [False]
        failure: BaseException | None = None
        keep = False
        async with trio.open_nursery() as nursery:
            stream.scope = nursery.cancel_scope
            nursery.start_soon(self._h1_request_body, stream, up.fd, chunked, body_done)
            try:
                response = await self._h1_response_head(stream, up, False, deadline)
                outcome.upstream_time = monotonic() - sent_at
                keep = await self._h1_forward_response(stream, up, response, outcome)
            except (_UpstreamFailed, StreamGone, OSError, TimeoutError, trio.ClosedResourceError) as exc:
                failure = exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            raise failure
        return keep and body_done[0]

    async def _h1_request_body(self, stream: _Stream, fd: int, chunked: bool, done: list[bool]) -> None:
        idle = self.limits.stream_idle_timeout
        try:
            while True:
                piece = await self._next_body_piece(stream)
                if piece is None:
                    break
                out = b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece
                await _send_all(fd, out, 0, idle)
                self._ack(stream, len(piece))
            if chunked:
                trailer = b"".join(b"%s: %s\r\n" % field for field in stream.trailers or ())
                await _send_all(fd, b"0\r\n" + trailer + b"\r\n", 0, idle)
            done[0] = True
        except (OSError, TimeoutError, trio.ClosedResourceError) as exc:
            log.debug("%s: request body to upstream: %s", self.proxy.listener.name, exc)

    async def _h1_response_head(self, stream: _Stream, up: UpstreamConn, reused: bool,
                                deadline: float, yielded: bool = False) -> ResponseHead:
        buf = up.buffer
        limits = self.proxy.limits
        method = stream.request.method
        got_any = False
        if not yielded:
            # The reply cannot be here yet: yield once, then try, then wait.
            await yield_now()
        while True:
            if len(buf):
                got_any = True
                try:
                    response = parse_response(buf.data, buf.start, buf.end, limits, method)
                except ProtocolError as exc:
                    raise _UpstreamFailed(502, "upstream_protocol_error") from exc
                if response is not None:
                    buf.consume(response.size)
                    if response.status < 200:
                        continue  # interim; a 101 cannot come (no Upgrade is sent)
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
            if stream.reset:
                raise StreamGone("reset by the client")
            with trio.move_on_at(deadline):
                await trio.lowlevel.wait_readable(up.fd)
                continue
            raise _UpstreamFailed(504, "upstream_timeout")

    async def _h1_forward_response(self, stream: _Stream, up: UpstreamConn, response: ResponseHead,
                                   outcome: _Outcome) -> bool:
        """Send an HTTP/1 response on as HTTP/2; True when the upstream connection may be
        reused. Reads the upstream no faster than the client's window takes it."""
        buf = up.buffer
        kind = response.body
        headers = h2_response_headers(response.status, response.headers)
        if kind == BODY_NONE or (kind == BODY_LENGTH and response.content_length == 0):
            outcome.status = response.status
            self._send_headers(stream, headers, True)
            return response.keep_alive
        if kind == BODY_LENGTH and len(buf) >= response.content_length:
            # The whole response is here: its frames go out together, as far as the
            # client's window lets the body.
            outcome.status = response.status
            body = buf.take(response.content_length)
            try:
                self.conn.send_headers(stream.id, headers, False)
                stream.responded = True
                sent = self.conn.send_data(stream.id, body, True)
            except StreamClosed as exc:
                raise StreamGone(str(exc)) from exc
            stream.bytes_out += sent
            self._flush()
            if sent < len(body):
                await self._send_data(stream, body[sent:], True)
            return response.keep_alive
        if kind == BODY_CHUNKED:
            # The first bytes are checked before anything goes out: bad framing is still a 502.
            scanner = ChunkedScanner(self.proxy.limits, response=True)
            try:
                first = scanner.scan(buf.data, buf.start, buf.end)
            except ProtocolError as exc:
                raise _UpstreamFailed(502, "upstream_protocol_error") from exc
            outcome.status = response.status
            self._send_headers(stream, headers, False)
            await self._h1_chunked_body(stream, up, scanner, first)
            return response.keep_alive
        outcome.status = response.status
        self._send_headers(stream, headers, False)
        idle = self.limits.stream_idle_timeout
        if kind == BODY_LENGTH:
            left = response.content_length
            while left:
                if not len(buf) and not await _recv_some(up, idle):
                    raise StreamGone("upstream broke off the response body")
                piece = buf.take(min(len(buf), left))
                left -= len(piece)
                await self._send_data(stream, piece, not left)
            return response.keep_alive
        # Until close.
        while True:
            if not len(buf) and not await _recv_some(up, idle):
                await self._send_data(stream, b"", True)
                return False
            await self._send_data(stream, buf.take(len(buf)), False)

    async def _h1_chunked_body(self, stream: _Stream, up: UpstreamConn, scanner: ChunkedScanner, count: int) -> None:
        buf = up.buffer
        decoder = TrailerDecoder()
        idle = self.limits.stream_idle_timeout
        while True:
            data = decoder.feed(buf.take(count)) if count else b""
            if scanner.done:
                trailers = h2_trailers(decoder.trailers)
                if trailers:
                    if data:
                        await self._send_data(stream, data, False)
                    self._send_headers(stream, trailers, True)
                else:
                    await self._send_data(stream, data, True)
                return
            if data:
                await self._send_data(stream, data, False)
            if not await _recv_some(up, idle):
                raise StreamGone("upstream broke off the chunked response body")
            try:
                count = scanner.scan(buf.data, buf.start, buf.end)
            except ProtocolError as exc:
                raise StreamGone(f"upstream chunked framing: {exc}") from exc

    # -- HTTP/2 upstream -----------------------------------------------------------------
    async def _forward_h2(self, stream: _Stream, cluster: UpstreamCluster, headers: list[tuple[bytes, bytes]],
                          timeout: float, outcome: _Outcome, request_id: bytes) -> None:
        assert self.upstreams is not None
        deadline = trio.current_time() + timeout
        retries = 0
        no_body = stream.ended and not stream.body
        while True:
            upstream: H2ClientStream | None = None
            try:
                with trio.move_on_at(deadline) as stream.scope:
                    pool, upstream = await self.upstreams.open_stream(
                        cluster, headers, no_body and stream.trailers is None, self.connect_attempts,
                        cluster.hash_key(stream.request.get, self.peer) if cluster.hash_on is not None else None)
            except ProxyError as exc:
                raise _UpstreamFailed(exc.status, exc.code) from exc
            if stream.reset:
                if upstream is not None:
                    upstream.cancel()
                raise StreamGone("reset by the client")
            if upstream is None:
                raise _UpstreamFailed(504, "upstream_timeout")
            outcome.count_at(pool)
            try:
                await self._h2_exchange(stream, upstream, no_body, deadline, outcome)
            except H2StreamError as exc:
                if exc.retriable and retries < 2 and not stream.body_sent:
                    retries += 1
                    cluster.stats.retries += 1
                    continue
                cluster.record_outcome(pool, 0, "upstream_reset")
                raise _UpstreamFailed(502, "upstream_reset") from exc
            finally:
                upstream.cancel()
            if cluster.outlier is not None:
                cluster.record_outcome(pool, outcome.status, None)
            return

    async def _h2_exchange(self, stream: _Stream, upstream: H2ClientStream, no_body: bool, deadline: float,
                           outcome: _Outcome) -> None:
        sent_at = monotonic()
        failure: BaseException | None = None
        async with trio.open_nursery() as nursery:
            stream.scope = nursery.cancel_scope
            if not no_body:
                nursery.start_soon(self._h2_request_body, stream, upstream)
            try:
                with trio.move_on_at(deadline):
                    status, fields = await upstream.response()
                if upstream.fields is None:
                    raise _UpstreamFailed(504, "upstream_timeout")
                outcome.upstream_time = monotonic() - sent_at
                outcome.status = status
                await self._h2_forward_response(stream, upstream, status, fields)
            except (H2StreamError, _UpstreamFailed, StreamGone, OSError, TimeoutError,
                    trio.ClosedResourceError) as exc:
                failure = exc
            nursery.cancel_scope.cancel()
        if failure is not None:
            if isinstance(failure, H2StreamError) and stream.responded:
                raise StreamGone(str(failure)) from failure
            raise failure

    async def _h2_request_body(self, stream: _Stream, upstream: H2ClientStream) -> None:
        idle = self.limits.stream_idle_timeout
        try:
            while True:
                piece = await self._next_body_piece(stream)
                if piece is None:
                    break
                stream.body_sent = True
                await upstream.send_data(piece, False, idle)
                self._ack(stream, len(piece))
            if stream.trailers:
                upstream.send_trailers(stream.trailers)
            else:
                await upstream.send_data(b"", True, idle)
        except (H2StreamError, OSError, TimeoutError, trio.ClosedResourceError) as exc:
            log.debug("%s: request body to HTTP/2 upstream: %s", self.proxy.listener.name, exc)

    async def _h2_forward_response(self, stream: _Stream, upstream: H2ClientStream, status: int,
                                   fields: list[tuple[bytes, bytes]]) -> None:
        if upstream.ended and not upstream.body:
            # Headers only (a gRPC trailers-only response among them).
            self._send_headers(stream, h2_response_headers(status, fields), True)
            return
        self._send_headers(stream, h2_response_headers(status, fields), False)
        idle = self.limits.stream_idle_timeout
        while True:
            piece = _STALLED
            with trio.move_on_after(idle):
                piece = await upstream.receive()
            if piece is _STALLED:
                raise TimeoutError(f"upstream sent nothing for {idle:g}s")
            if piece is None:
                break
            await self._send_data(stream, piece, False)
            upstream.ack(len(piece))
        if upstream.trailers:
            self._send_headers(stream, upstream.trailers, True)
        else:
            await self._send_data(stream, b"", True)


def _bare_request(headers: list[tuple[bytes, bytes]]) -> H2Request:
    """Enough of a refused request to answer it (its method, whether it is gRPC)."""
    method = b"GET"
    grpc = False
    for name, value in headers:
        if name == b":method":
            method = value
        elif name == b"content-type" and value.startswith(b"application/grpc"):
            grpc = True
    return H2Request(method, b"http", None, b"/", [], -1, grpc)


async def _send_all(fd: int, data: bytes, offset: int, idle: float) -> None:
    total = len(data)
    while offset < total:
        sent = send_from(fd, data, offset)
        if sent >= 0:
            offset += sent
            continue
        with trio.move_on_after(idle):
            await trio.lowlevel.wait_writable(fd)
            continue
        raise TimeoutError(f"upstream took nothing for {idle:g}s")


async def _recv_some(up: UpstreamConn, idle: float) -> bool:
    """Read more of a response into `up.buffer`; False at EOF."""
    buf = up.buffer
    while True:
        n = buf.recv(up.fd)
        if n > 0:
            return True
        if n == 0:
            return False
        if n == -2:
            raise StreamGone("upstream buffer full")  # only while a whole buffer waits unsent
        with trio.move_on_after(idle):
            await trio.lowlevel.wait_readable(up.fd)
            continue
        raise TimeoutError(f"upstream sent nothing for {idle:g}s")

