"""HTTP/2 to upstream endpoints: a few multiplexed connections per endpoint.

For a cluster with `protocol: http2`, each endpoint gets an `H2EndpointPool`: up to
`max_connections` HTTP/2 connections (prior knowledge, cleartext), each carrying up to
min(the peer's SETTINGS_MAX_CONCURRENT_STREAMS, `max_streams`) streams at once. A stream
goes on the least busy connection with room; a new connection is opened only when all
are full, and while one is being opened other requests wait for it rather than open
more. Connections are opened with the endpoint's `EndpointPool.open()`, so the cluster's
circuit breaker, connect timeout and connection stats apply as for HTTP/1.

Each connection is driven by one task (its reader, plus its writer) started in the
nursery given to `H2Upstreams`: connections outlive the requests that opened them. A
connection closes when the peer sends GOAWAY and its last stream ends (streams the
GOAWAY did not cover fail as refused: safe to retry), when it breaks, or after
`IDLE_TIMEOUT` without streams.

    upstreams = H2Upstreams(nursery)                      # one per worker
    endpoint = upstreams.endpoint(cluster, pool)          # pool: cluster.pick(...)
    stream = await endpoint.open_stream(headers, end_stream=False)
    await stream.send_data(b"...", end_stream=True)
    status, fields = await stream.response()
    while (chunk := await stream.receive()) is not None:
        ...; stream.ack(len(chunk))
    stream.trailers                                       # list, or None
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable

import trio
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError as H2ProtocolError
from h2.exceptions import StreamClosedError
from h2.settings import SettingCodes, Settings
from hpack.exceptions import HPACKError, OversizedHeaderListError

from .._core import hpack as hpack_core
from .._core.iobuf import RecvBuffer
from ..errors import UpstreamConnectError
from ..http.h2codec import (
    CANCEL,
    NO_ERROR,
    REFUSED_STREAM,
    GoawayTap,
    H2Limits,
    h2_response_from_upstream,
)
from ..http.h2transport import H2Transport, StreamGone
from .pool import EndpointPool, UpstreamCluster, UpstreamConn

log = logging.getLogger("meshproxy.upstream")

MAX_STREAMS = 100  # per connection, whatever the peer allows
MAX_CONNECTIONS = 8  # per endpoint
IDLE_TIMEOUT = 50.0  # a connection without streams for this long is closed
READ_SIZE = 65536


class H2StreamError(Exception):
    """An upstream stream failed. `retriable`: the upstream provably did not process it
    (REFUSED_STREAM, or above a GOAWAY's last stream id)."""

    def __init__(self, reason: str, *, retriable: bool = False) -> None:
        super().__init__(reason)
        self.retriable = retriable


class H2ClientStream:
    """One request on an upstream HTTP/2 connection."""

    __slots__ = ("_wake", "body", "conn", "ended", "fields", "id", "reset", "retriable", "status", "trailers")

    def __init__(self, conn: H2ClientConnection, stream_id: int) -> None:
        self.conn = conn
        self.id = stream_id
        self.status = 0
        self.fields: list[tuple[bytes, bytes]] | None = None  # response fields once they arrive
        self.body: deque[bytes] = deque()
        self.ended = False  # the response is complete
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.reset: str | None = None  # why the stream failed
        self.retriable = False
        self._wake = trio.Event()

    def _notify(self) -> None:
        self._wake.set()

    async def _wait(self) -> None:
        if self.reset is not None:
            raise H2StreamError(self.reset, retriable=self.retriable)
        self._wake = trio.Event()
        await self._wake.wait()

    async def response(self) -> tuple[int, list[tuple[bytes, bytes]]]:
        """The response status and fields (waits for them; timeouts are the caller's)."""
        while self.fields is None:
            await self._wait()
        return self.status, self.fields

    async def receive(self) -> bytes | None:
        """The next piece of the response body, None at its end. Call `ack` once a piece
        has been passed on, so the upstream may send more."""
        while not self.body:
            if self.ended:
                return None
            await self._wait()
        return self.body.popleft()

    def ack(self, n: int) -> None:
        self.conn.ack(self.id, n)

    async def send_data(self, data: bytes, end_stream: bool, idle: float = 300.0) -> None:
        try:
            await self.conn.transport.send_data(self.id, data, end_stream, idle)
        except StreamGone as exc:
            raise H2StreamError(self.reset or str(exc)) from exc

    def send_trailers(self, headers: list[tuple[bytes, bytes]]) -> None:
        try:
            self.conn.state.send_headers(self.id, headers, end_stream=True)
        except (StreamClosedError, H2ProtocolError) as exc:
            raise H2StreamError(str(exc)) from exc
        self.conn.transport.flush()

    def cancel(self) -> None:
        """Reset the stream (CANCEL) unless it already ended both ways."""
        self.conn.cancel(self)


class H2ClientConnection:
    """One HTTP/2 connection to an endpoint, driven by its `run` task."""

    def __init__(self, up: UpstreamConn, pool: EndpointPool, limits: H2Limits, owner: H2EndpointPool) -> None:
        self.up = up
        self.pool = pool
        self.owner = owner
        self.limits = limits
        config = H2Configuration(client_side=True, header_encoding=None, validate_inbound_headers=False,
                                 normalize_inbound_headers=False, validate_outbound_headers=False,
                                 normalize_outbound_headers=False)
        self.state = H2Connection(config)
        # h2 frames and tracks the streams; HPACK is ours, in C (the pure-Python one cost
        # tens of microseconds per header block).
        self.state.encoder = _FastEncoder()
        self.state.decoder = _FastDecoder(limits.max_header_list_size)
        self.state.local_settings = Settings(client=True, initial_values={
            SettingCodes.ENABLE_PUSH: 0,
            SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window,
            SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list_size,
        })
        self.transport = H2Transport(up.fd, self.state, limits)
        self.frames = GoawayTap()
        self.streams: dict[int, H2ClientStream] = {}
        self.closing = False  # no new streams (GOAWAY received or sent, or broken)
        self.closed = False
        self.idle_since = trio.current_time()
        self._scope: trio.CancelScope | None = None
        self._read_wait: trio.CancelScope | None = None

    @property
    def capacity(self) -> int:
        """How many more streams this connection takes now."""
        if self.closing:
            return 0
        peer = self.state.remote_settings.max_concurrent_streams
        return min(peer, MAX_STREAMS) - len(self.streams)

    # -- streams ---------------------------------------------------------------------------
    def start_stream(self, headers: list[tuple[bytes, bytes]], end_stream: bool) -> H2ClientStream:
        stream_id = self.state.get_next_available_stream_id()
        self.state.send_headers(stream_id, headers, end_stream=end_stream)
        stream = H2ClientStream(self, stream_id)
        self.streams[stream_id] = stream
        self.transport.flush()
        return stream

    def ack(self, stream_id: int, n: int) -> None:
        if n and not self.closed:
            self.state.acknowledge_received_data(n, stream_id)
            self.transport.flush()

    def cancel(self, stream: H2ClientStream) -> None:
        if self.streams.get(stream.id) is not stream:
            return
        self._end_stream(stream)
        if self.closed:
            return
        try:
            self.state.reset_stream(stream.id, CANCEL)
        except (StreamClosedError, H2ProtocolError):
            pass
        self.transport.flush()

    def finished(self, stream: H2ClientStream) -> None:
        """The caller is done with a stream that ended normally."""
        if self.streams.get(stream.id) is stream:
            self._end_stream(stream)

    def _end_stream(self, stream: H2ClientStream) -> None:
        del self.streams[stream.id]
        self.transport.forget(stream.id)
        if not self.streams:
            self.idle_since = trio.current_time()
            if self.closing and self._read_wait is not None:
                self._read_wait.cancel()
        self.owner.changed()

    def _fail_stream(self, stream: H2ClientStream, reason: str, retriable: bool) -> None:
        if stream.reset is None:
            stream.reset = reason
            stream.retriable = retriable and stream.fields is None
        stream._notify()
        self.transport.forget(stream.id)

    # -- the connection --------------------------------------------------------------------
    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                self.transport.cancel_scope = nursery.cancel_scope
                self.state.initiate_connection()
                self.state.increment_flow_control_window(self.limits.connection_window - 65535)
                self.transport.flush()
                nursery.start_soon(self.transport.run_writer)
                task_status.started()
                await self._read_loop()
                nursery.cancel_scope.cancel()
        finally:
            self.closing = self.closed = True
            reason = self.transport.broken or "upstream connection closed"
            for stream in list(self.streams.values()):
                self._fail_stream(stream, reason, retriable=False)
            self.owner.remove(self)
            self.pool.discard(self.up)

    def close(self) -> None:
        """Stop taking streams; close once the open ones end (GOAWAY NO_ERROR)."""
        if not self.closing:
            self.closing = True
            if not self.closed:
                self.transport.send_goaway(0, NO_ERROR)
        if not self.streams and self._read_wait is not None:
            self._read_wait.cancel()

    async def _read_loop(self) -> None:
        fd = self.up.fd
        buf = RecvBuffer(READ_SIZE)
        while True:
            if self.closing and not self.streams:
                await self.transport.drain_output(1.0)
                return
            if self.transport.queued > self.limits.outbound_cap:
                await self.transport.wait_room()
            try:
                n = buf.recv(fd)
            except OSError as exc:
                self.transport.broken = self.transport.broken or f"recv: {exc}"
                return
            if n > 0:
                if not self._receive(buf.take(len(buf))):
                    return
                continue
            if n == 0:
                return
            deadline = self.idle_since + IDLE_TIMEOUT if not self.streams else float("inf")
            with trio.move_on_at(deadline) as wait:
                self._read_wait = wait
                await trio.lowlevel.wait_readable(fd)
            self._read_wait = None
            if wait.cancelled_caught and not self.streams and trio.current_time() >= deadline:
                self.close()

    def _receive(self, data: bytes) -> bool:
        frames = self.frames
        data = frames.feed(data)
        if frames.goaways:
            for last_stream_id, code, _ in frames.goaways:
                self._goaway(last_stream_id, code)
            frames.goaways.clear()
        if not data:
            return not (self.closing and not self.streams)
        try:
            events = self.state.receive_data(data)
        except H2ProtocolError as exc:
            log.info("%s: HTTP/2 protocol error from upstream: %s", self.pool.address, exc)
            self.transport.flush()
            return False
        for event in events:
            self._dispatch(event)
        self.transport.flush()
        return True

    def _goaway(self, last_stream_id: int, code: int) -> None:
        self.closing = True
        self.owner.changed()
        for stream_id, stream in list(self.streams.items()):
            if stream_id > last_stream_id:
                self._fail_stream(stream, "upstream sent GOAWAY", retriable=True)
                self._end_stream(stream)
        if code != NO_ERROR:
            for stream in list(self.streams.values()):
                self._fail_stream(stream, f"upstream GOAWAY error {code}", retriable=False)

    def _dispatch(self, event: object) -> None:
        streams = self.streams
        if isinstance(event, DataReceived):
            stream = streams.get(event.stream_id)
            padding = event.flow_controlled_length - len(event.data)
            if stream is None:
                self.state.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                return
            if padding:
                self.state.acknowledge_received_data(padding, event.stream_id)
            if event.data:
                stream.body.append(event.data)
            if event.stream_ended is not None:
                stream.ended = True
            stream._notify()
        elif isinstance(event, ResponseReceived):
            stream = streams.get(event.stream_id)
            if stream is None:
                return
            try:
                stream.status, stream.fields = h2_response_from_upstream(event.headers)
            except ValueError as exc:
                self._fail_stream(stream, f"malformed response: {exc}", retriable=False)
                self.cancel(stream)
                return
            if event.stream_ended is not None:
                stream.ended = True
            stream._notify()
        elif isinstance(event, TrailersReceived):
            stream = streams.get(event.stream_id)
            if stream is not None:
                stream.trailers = [(n, v) for n, v in event.headers if n[:1] != b":"]
                stream.ended = True
                stream._notify()
        elif isinstance(event, StreamEnded):
            stream = streams.get(event.stream_id)
            if stream is not None:
                stream.ended = True
                stream._notify()
        elif isinstance(event, StreamReset):
            stream = streams.get(event.stream_id)
            if stream is not None:
                self._fail_stream(stream, f"upstream reset the stream ({event.error_code})",
                                  retriable=event.error_code == REFUSED_STREAM)
                self._end_stream(stream)
        elif isinstance(event, WindowUpdated):
            self.transport.window_opened(event.stream_id)
        elif isinstance(event, RemoteSettingsChanged):
            self.transport.window_opened(0)
            self.owner.changed()
        elif isinstance(event, ConnectionTerminated):  # pragma: no cover - GOAWAY is taken out first
            self._goaway(event.last_stream_id or 0, event.error_code or 0)


class _FastEncoder:
    """`_core.hpack.Encoder` as h2 drives an `hpack.Encoder`."""

    __slots__ = ("_encoder",)

    def __init__(self) -> None:
        self._encoder = hpack_core.Encoder()

    @property
    def header_table_size(self) -> int:
        return 4096

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self._encoder.set_max_table_size(min(value, 65536))

    def encode(self, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
        return self._encoder.encode([(name, value) for name, value in headers])


class _FastDecoder:
    """`_core.hpack.Decoder` as h2 drives an `hpack.Decoder`: our errors become the
    hpack package's, which h2 turns into a connection error."""

    __slots__ = ("_decoder", "max_allowed_table_size", "max_header_list_size")

    def __init__(self, max_header_list_size: int) -> None:
        self._decoder = hpack_core.Decoder(4096, max_header_list_size, max(max_header_list_size // 32, 1))
        self.max_header_list_size = max_header_list_size  # set by h2; ours is fixed at the start
        self.max_allowed_table_size = 4096  # we never advertise another

    def decode(self, data: bytes, raw: bool = True) -> list[tuple[bytes, bytes]]:
        try:
            return self._decoder.decode(data)
        except hpack_core.HeaderListTooLarge as exc:
            raise OversizedHeaderListError(str(exc)) from exc
        except hpack_core.HPACKError as exc:
            raise HPACKError(str(exc)) from exc


class H2EndpointPool:
    """The HTTP/2 connections to one endpoint."""

    def __init__(self, pool: EndpointPool, nursery: trio.Nursery, limits: H2Limits,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.pool = pool
        self.nursery = nursery
        self.limits = limits
        self.max_connections = max_connections
        self.connections: list[H2ClientConnection] = []
        self._opening = False
        self._changed = trio.Event()
        self.retired = False

    def changed(self) -> None:
        """Something that may free a slot happened (a stream ended, settings changed)."""
        self._changed.set()

    def remove(self, conn: H2ClientConnection) -> None:
        if conn in self.connections:
            self.connections.remove(conn)
        self.changed()

    async def open_stream(self, headers: list[tuple[bytes, bytes]], end_stream: bool) -> H2ClientStream:
        """A new stream with its request headers sent; waits for a free slot or a new
        connection. Raises what `EndpointPool.open` raises when a connect fails."""
        while True:
            best = None
            for conn in self.connections:
                room = conn.capacity
                if room > 0 and (best is None or room > best.capacity):
                    best = conn
            if best is not None:
                self.pool.cluster_stats.pool_hits += 1
                return best.start_stream(headers, end_stream)
            if self._opening or len(self.connections) >= self.max_connections:
                if self._changed.is_set():
                    self._changed = trio.Event()  # one event for all the waiters
                await self._changed.wait()
                continue
            self._opening = True
            try:
                up = await self.pool.open()
                self.pool.cluster_stats.pool_misses += 1
                conn = H2ClientConnection(up, self.pool, self.limits, self)
                await self.nursery.start(conn.run)
                # Taken for streams only now: its preface is queued before any request.
                self.connections.append(conn)
            finally:
                self._opening = False
                self.changed()

    def close(self) -> None:
        """GOAWAY every connection: they close as their streams end."""
        self.retired = True
        for conn in list(self.connections):
            conn.close()


class H2Upstreams:
    """The HTTP/2 endpoint pools of one worker, keyed by the `EndpointPool` they open
    connections with (so a cluster replaced by a reload gets new ones)."""

    def __init__(self, nursery: trio.Nursery, limits: H2Limits | None = None) -> None:
        self.nursery = nursery
        self.limits = limits or H2Limits()
        self._pools: dict[int, tuple[UpstreamCluster, EndpointPool, H2EndpointPool]] = {}

    def endpoint(self, cluster: UpstreamCluster, pool: EndpointPool) -> H2EndpointPool:
        entry = self._pools.get(id(pool))
        if entry is None or entry[1] is not pool:
            entry = (cluster, pool, H2EndpointPool(pool, self.nursery, self.limits))
            self._pools[id(pool)] = entry
        return entry[2]

    async def open_stream(self, cluster: UpstreamCluster, headers: list[tuple[bytes, bytes]], end_stream: bool,
                          attempts: int, key: bytes | None = None) -> tuple[EndpointPool, H2ClientStream]:
        """A new stream to an endpoint of `cluster`, its request headers sent. A connect
        that fails (counted for outlier detection) moves on to another endpoint, up to
        `attempts` of them. Raises what ends the search: CircuitOpenError,
        NoHealthyUpstreamError, UpstreamConnectError. Timeouts are the caller's."""
        tried: list[int] = []
        while True:
            pool = cluster.pick(tried, key)
            try:
                return pool, await self.endpoint(cluster, pool).open_stream(headers, end_stream)
            except UpstreamConnectError as exc:
                cluster.record_outcome(pool, 0, exc.code)
                tried.append(pool.index)
                if len(tried) >= min(len(cluster.pools), attempts):
                    raise

    def retain(self, clusters: Iterable[UpstreamCluster]) -> None:
        """Keep the pools of `clusters` (the current config's); close the others."""
        keep = {id(cluster) for cluster in clusters}
        for key, (cluster, _, h2pool) in list(self._pools.items()):
            if id(cluster) not in keep:
                h2pool.close()
                del self._pools[key]

    def close(self) -> None:
        for _, _, h2pool in self._pools.values():
            h2pool.close()
        self._pools.clear()
