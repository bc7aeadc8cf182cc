"""HTTP/2 test helpers: meshproxy's HTTP/2 driver in-process, an HTTP/2 origin, a client.

`InProcessProxy` runs the real request path of one http listener — `Http1Proxy` with its
`RouteTable`, `UpstreamCluster`s and `WorkerStats`, built from a config dict by
`parse_config` — in a Trio loop on a thread of the test process, and dispatches each
accepted connection the way `Http1Proxy.serve` does once it checks for the HTTP/2
preface: HTTP/2 clients go to `h2server.serve_h2`, the rest to `Http1Proxy.serve`.

`H2Origin` is a threaded HTTP/2 server (prior knowledge) on the `h2` library, answering
by path (echo as JSON, trailers, large bodies, slow answers), that records what it got.

`H2Client` is a blocking HTTP/2 client on the `h2` library for tests that need to see
frames (resets, GOAWAY) or send bad ones; `frame()` builds raw frames.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import select
import socket
import struct
import threading
import time
from collections.abc import Iterable
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trio
import yaml

from proxy._core import sockops
from proxy._core.splice import RelayEngine
from proxy.config import ConfigError, parse_config
from proxy.http.h1proxy import Http1Proxy
from proxy.http.h2codec import GoawayTap, H2Limits, is_h2_preface
from proxy.http.h2server import drain, serve_h2
from proxy.net.accept import accept_loop
from proxy.net.tcp_proxy import run_engine
from proxy.telemetry import WorkerStats
from proxy.upstream import UpstreamCluster
from proxy.upstream.h2pool import H2Upstreams

from .support import HOST

Headers = list[tuple[bytes, bytes]]


# -- meshproxy in-process ------------------------------------------------------------------


async def _sniff(fd: int, timeout: float = 10.0) -> bool:
    """Whether the client on `fd` speaks HTTP/2 (peeked, nothing consumed)."""
    sock = socket.socket(fileno=fd)
    try:
        with trio.move_on_after(timeout):
            while True:
                try:
                    data = sock.recv(24, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except BlockingIOError:
                    data = None
                except OSError:
                    return False
                if data == b"":
                    return False
                if data:
                    verdict = is_h2_preface(data)
                    if verdict is not None:
                        return verdict
                await trio.lowlevel.wait_readable(fd)
        return False
    finally:
        sock.detach()


class InProcessProxy:
    """One http listener of meshproxy, served from a thread of the test process.

    `config`: a config dict with one http listener (its address gets port 0 and is
    replaced by the bound one). `http2_clusters`: names of clusters spoken to in HTTP/2
    (`clusters[].protocol: http2`) — set on the parsed model when the config schema does
    not know the field yet.
    """

    def __init__(self, config: dict[str, Any], *, http2_clusters: Iterable[str] = (),
                 limits: H2Limits | None = None) -> None:
        config = json.loads(json.dumps(config))
        h2_names = set(http2_clusters)
        for cluster in config["clusters"]:
            if cluster.get("protocol") == "http2":
                h2_names.add(cluster["name"])
        self.listen = socket.create_server((HOST, 0), backlog=1024)
        self.listen.setblocking(False)
        self.address: tuple[str, int] = self.listen.getsockname()
        config["listeners"][0]["address"] = f"{HOST}:{self.address[1]}"
        try:
            parsed = parse_config(yaml.safe_dump(config))
        except ConfigError:  # a schema without clusters[].protocol yet
            for cluster in config["clusters"]:
                cluster.pop("protocol", None)
            parsed = parse_config(yaml.safe_dump(config))
        self.config = parsed
        self.stats = WorkerStats(parsed)
        self.clusters: dict[str, UpstreamCluster] = {}
        for cluster in parsed.clusters:
            upstream = UpstreamCluster(cluster, self.stats.clusters[cluster.name])
            if cluster.name in h2_names and getattr(cluster, "protocol", None) != "http2":
                upstream.config = cluster.model_copy(update={"protocol": "http2"})
            self.clusters[cluster.name] = upstream
        self.listener = parsed.listeners[0]
        self.limits = limits or H2Limits()
        self.proxy: Http1Proxy | None = None
        self.h2_connections = 0
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._ready = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="meshproxy-h2", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise AssertionError("in-process proxy did not start")
        if self.error is not None:
            raise self.error

    @property
    def url(self) -> str:
        return f"http://{self.address[0]}:{self.address[1]}"

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            self.error = exc
            self._ready.set()

    async def _main(self) -> None:
        engine = RelayEngine()
        stats = self.stats.listeners[self.listener.name]
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as background:
            self._scope = background.cancel_scope
            background.start_soon(run_engine, engine)
            proxy = Http1Proxy(self.listener, self.clusters, engine, stats)
            upstreams = H2Upstreams(background, self.limits)
            proxy.h2_upstreams = upstreams  # for HTTP/1 clients of `protocol: http2` clusters
            self.proxy = proxy
            async with trio.open_nursery() as connections:

                def on_accept(fd: int) -> None:
                    stats.accepted += 1
                    stats.active += 1
                    connections.start_soon(self._serve, proxy, upstreams, fd)

                connections.start_soon(functools.partial(accept_loop, self.listen.fileno(), on_accept, nodelay=True))
                self._ready.set()
                await trio.sleep_forever()

    async def _serve(self, proxy: Http1Proxy, upstreams: H2Upstreams, fd: int) -> None:
        # What Http1Proxy.serve does once it checks for the preface.
        if not await _sniff(fd):
            await proxy.serve(fd)
            return
        self.h2_connections += 1
        try:
            peer = sockops.peer_ip(fd).encode()
            await serve_h2(proxy, fd, b"", peer, limits=self.limits, upstreams=upstreams)
        finally:
            proxy.stats.active -= 1
            sockops.close_fd(fd)

    def call(self, fn: Any, *args: Any) -> Any:
        """Run `fn(*args)` in the proxy's Trio loop (synchronously)."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def drain(self) -> None:
        def go() -> None:
            assert self.proxy is not None
            self.proxy.drain()
            drain(self.proxy)

        self.call(go)

    def close(self) -> None:
        if self._scope is not None and self._thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):
                self.call(self._scope.cancel)
        self._thread.join(10)
        self.listen.close()
        for cluster in self.clusters.values():
            cluster.close()


# -- an HTTP/2 origin ------------------------------------------------------------------------


def pattern(n: int) -> bytes:
    """`n` bytes of a fixed pattern (large response bodies)."""
    block = bytes(range(256)) * 256
    return (block * (n // len(block) + 1))[:n]


class H2Origin:
    """A threaded HTTP/2 (prior knowledge) server. Paths: `/trailers` (a body and
    trailers), `/big/N` (N bytes), `/slow/S` (answers after S seconds), `/reset` (resets
    the stream), anything else: the request as JSON."""

    def __init__(self, max_streams: int = 100) -> None:
        self.listener = socket.create_server((HOST, 0), backlog=1024)
        self.address = self.listener.getsockname()
        self.max_streams = max_streams
        self.requests: list[dict[str, Any]] = []
        self.connections = 0
        self.max_concurrent = 0
        self._closing = False
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self._closing:
            try:
                sock, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                self._socks.append(sock)
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams})
        conn.initiate_connection()
        streams: dict[int, dict[str, Any]] = {}
        outgoing: dict[int, list[Any]] = {}  # stream -> [data, offset, trailers]
        timers: list[tuple[float, int]] = []
        active = 0
        try:
            sock.sendall(conn.data_to_send())
            while not self._closing:
                timeout = 0.1
                ready, _, _ = select.select([sock], [], [], timeout)
                if ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    try:
                        events = conn.receive_data(data)
                    except h2.exceptions.ProtocolError:
                        sock.sendall(conn.data_to_send())
                        return
                    for event in events:
                        if isinstance(event, h2.events.RequestReceived):
                            streams[event.stream_id] = {"headers": event.headers, "body": bytearray()}
                            active += 1
                            with self._lock:
                                self.max_concurrent = max(self.max_concurrent, active)
                        elif isinstance(event, h2.events.DataReceived):
                            streams[event.stream_id]["body"] += event.data
                            conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                        elif isinstance(event, h2.events.TrailersReceived):
                            streams[event.stream_id]["trailers"] = event.headers
                        elif isinstance(event, h2.events.StreamReset):
                            outgoing.pop(event.stream_id, None)
                            if event.stream_id in streams:
                                streams.pop(event.stream_id)
                                active -= 1
                        if isinstance(event, h2.events.StreamEnded) or getattr(event, "stream_ended", None):
                            sid = event.stream_id
                            if sid in streams and not streams[sid].get("answered"):
                                streams[sid]["answered"] = True
                                path = dict(streams[sid]["headers"]).get(b":path", b"/")
                                if path.startswith(b"/slow/"):
                                    seconds = float(path[6:].split(b"?")[0])
                                    timers.append((time.monotonic() + seconds, sid))
                                else:
                                    self._answer(conn, sid, streams[sid], outgoing)
                now = time.monotonic()
                for due, sid in [t for t in timers if t[0] <= now]:
                    timers.remove((due, sid))
                    if sid in streams:
                        self._answer(conn, sid, streams[sid], outgoing)
                for sid in list(outgoing):
                    data, offset, trailers = outgoing[sid]
                    try:
                        while offset < len(data):
                            window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
                            if window <= 0:
                                break
                            piece = data[offset:offset + window]
                            offset += len(piece)
                            conn.send_data(sid, piece, end_stream=offset >= len(data) and not trailers)
                        outgoing[sid][1] = offset
                        if offset >= len(data):
                            if trailers:
                                conn.send_headers(sid, trailers, end_stream=True)
                            del outgoing[sid]
                            streams.pop(sid, None)
                            active -= 1
                    except h2.exceptions.StreamClosedError:
                        del outgoing[sid]
                sock.sendall(conn.data_to_send())
        except OSError:
            return
        finally:
            sock.close()

    def _answer(self, conn: h2.connection.H2Connection, sid: int, stream: dict[str, Any],
                outgoing: dict[int, list[Any]]) -> None:
        headers = stream["headers"]
        fields = dict(headers)
        path = fields.get(b":path", b"/")
        body = bytes(stream["body"])
        record = {"headers": [(n.decode(), v.decode("latin-1")) for n, v in headers], "path": path.decode(),
                  "body_length": len(body), "body_sha256": hashlib.sha256(body).hexdigest(),
                  "trailers": [(n.decode(), v.decode()) for n, v in stream.get("trailers", [])]}
        with self._lock:
            self.requests.append(record)
        if path == b"/reset":
            conn.reset_stream(sid, 2)
            return
        trailers: Headers = []
        if path == b"/trailers":
            payload = b"hello"
            trailers = [(b"x-checksum", b"abc"), (b"grpc-status", b"0")]
        elif path.startswith(b"/big/"):
            payload = pattern(int(path[5:]))
        else:
            payload = json.dumps(record).encode()
        conn.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/json"),
                                (b"x-origin", b"h2")])
        outgoing[sid] = [payload, 0, trailers]

    def close(self) -> None:
        self._closing = True
        self.listener.close()
        with self._lock:
            for sock in self._socks:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


# -- a client ------------------------------------------------------------------------------


class Response:
    def __init__(self) -> None:
        self.headers: Headers = []
        self.body = bytearray()
        self.trailers: Headers = []
        self.reset: int | None = None
        self.ended = False

    @property
    def status(self) -> int:
        return int(dict(self.headers).get(b":status", b"0"))

    def header(self, name: bytes) -> bytes | None:
        return dict(self.headers).get(name)


class H2Client:
    """A blocking HTTP/2 client (prior knowledge) that keeps every event it saw.

    `raw`: the test writes frames by hand (`send_raw`), so what comes back is not fed to
    the client's state machine, only watched for GOAWAY."""

    def __init__(self, address: tuple[str, int], timeout: float = 10.0, *, raw: bool = False) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.timeout = timeout
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None,
                                                                         validate_outbound_headers=False,
                                                                         normalize_outbound_headers=False,
                                                                         validate_inbound_headers=False))
        self.responses: dict[int, Response] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.frames = GoawayTap()
        self.raw = raw  # only frames sent by hand: what comes back is only watched for GOAWAY
        self.closed = False
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, path: str = "/", method: str = "GET", headers: Headers = (), body: bytes | None = None,
                authority: str = "test", end: bool = True) -> int:
        sid = self.conn.get_next_available_stream_id()
        fields = [(b":method", method.encode()), (b":scheme", b"http"), (b":authority", authority.encode()),
                  (b":path", path.encode()), *headers]
        self.conn.send_headers(sid, fields, end_stream=body is None and end)
        self.responses[sid] = Response()
        if body is not None:
            self.send_body(sid, body, end)
        self.flush()
        return sid

    def send_body(self, sid: int, body: bytes, end: bool = True) -> None:
        offset = 0
        while True:
            window = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if window <= 0 and offset < len(body):
                self.flush()
                self.pump(0.5)
                continue
            piece = body[offset:offset + window]
            offset += len(piece)
            last = offset >= len(body)
            self.conn.send_data(sid, piece, end_stream=end and last)
            if last:
                break
        self.flush()

    def pump(self, timeout: float) -> bool:
        """Read and handle what arrives within `timeout`; False once the connection closed."""
        if self.closed:
            return False
        ready, _, _ = select.select([self.sock], [], [], timeout)
        if not ready:
            return True
        try:
            data = self.sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self.closed = True
            return False
        # GOAWAY is taken out and reported (h2 would refuse the rest of open streams).
        data = self.frames.feed(data)
        for last, code, debug in self.frames.goaways:
            self.goaway = h2.events.ConnectionTerminated()
            self.goaway.last_stream_id, self.goaway.error_code, self.goaway.additional_data = last, code, debug
        self.frames.goaways.clear()
        if self.raw:
            return True
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.closed = True
            return False
        for event in events:
            sid = getattr(event, "stream_id", None)
            response = self.responses.get(sid) if sid else None
            if isinstance(event, h2.events.ResponseReceived) and response is not None:
                response.headers = event.headers
            elif isinstance(event, h2.events.DataReceived):
                if response is not None:
                    response.body += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived) and response is not None:
                response.trailers = event.headers
            elif isinstance(event, h2.events.StreamReset) and response is not None:
                response.reset = event.error_code
                response.ended = True
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = event
            if isinstance(event, h2.events.StreamEnded) and response is not None:
                response.ended = True
        with contextlib.suppress(OSError):
            self.flush()
        return True

    def wait(self, sid: int, timeout: float | None = None) -> Response:
        deadline = time.monotonic() + (timeout or self.timeout)
        response = self.responses[sid]
        while not response.ended:
            if time.monotonic() > deadline:
                raise AssertionError(f"stream {sid}: no complete response")
            if not self.pump(0.1):
                raise AssertionError(f"stream {sid}: connection closed (GOAWAY {self.goaway})")
        return response

    def get(self, path: str = "/", timeout: float | None = None, **kwargs: Any) -> Response:
        return self.wait(self.request(path, **kwargs), timeout)

    def wait_closed(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.pump(0.1):
                return True
        return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """One raw HTTP/2 frame."""
    return struct.pack(">HBBBL", len(payload) >> 8, len(payload) & 0xFF, kind, flags, stream) + payload
