"""Spans to an OTLP/HTTP collector, in batches, in the background.

    exporter = SpanExporter("http://127.0.0.1:4318/v1/traces", "web")
    await nursery.start(exporter.run)      # one per worker, owned by the worker's nursery
    exporter.submit(span)                  # on the request path: O(1), never waits

`submit` appends to a bounded queue, or counts the span as dropped when the queue is full.
`run` sends a batch when `max_batch` spans wait or every `interval` seconds, over one
kept-alive HTTP/1.1 connection (h11 over a Trio stream). Each POST has `timeout` seconds
from connect to the end of the answer; after a failure the next try waits, doubling up to
`max_backoff`. So a dead or stuck collector costs the request path nothing but the queue's
memory: spans that cannot be sent are dropped and counted, never waited for.

Counters: `sent` POSTs made, `failed` those that got no 2xx, `exported` spans in the ones
that did, `dropped` spans lost (queue full, or in a failed POST). Every submitted span ends
up exported, dropped, or still queued.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import h11
import trio

from .._version import __version__
from .endpoint import ENCODINGS, parse_otlp_endpoint
from .spans import Span, encode_json, encode_protobuf

log = logging.getLogger("meshproxy.tracing")

MAX_RESPONSE_BYTES = 1 << 20  # more than any collector's answer: a peer that streams is cut off
_ENCODERS: dict[str, Callable[[Iterable[Span], str], bytes]] = {
    "protobuf": encode_protobuf, "json": encode_json}


class _Stale(Exception):
    """A kept-alive connection turned out closed before any answer: try a fresh one."""


class SpanExporter:
    def __init__(self, endpoint_url: str, service_name: str, *, encoding: str = "protobuf",
                 max_queue: int = 2048, max_batch: int = 512, interval: float = 1.0,
                 timeout: float = 2.0, max_backoff: float = 30.0) -> None:
        self.endpoint = parse_otlp_endpoint(endpoint_url)
        self.service_name = service_name
        self._encode = _ENCODERS[encoding]
        self._headers = [("Host", self.endpoint.authority), ("Content-Type", ENCODINGS[encoding]),
                         ("User-Agent", f"meshproxy/{__version__}")]
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.interval = interval
        self.timeout = timeout
        self.max_backoff = max_backoff
        self._queue: list[Span] = []
        self._batch_ready = trio.Event()
        self._stream: trio.SocketStream | None = None
        self._http: h11.Connection | None = None
        self._failures = 0  # in a row: how long to back off
        self.sent = 0
        self.failed = 0
        self.exported = 0
        self.dropped = 0

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(self, span: Span) -> None:
        """Queue a finished span for export; never waits."""
        queue = self._queue
        if len(queue) >= self.max_queue:
            self.dropped += 1
            return
        queue.append(span)
        if len(queue) == self.max_batch:
            self._batch_ready.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Export until cancelled; then one last try, within `timeout`, for what is queued."""
        task_status.started()
        try:
            while True:
                if self._failures:
                    await trio.sleep(min(self.interval * 2 ** min(self._failures, 16), self.max_backoff))
                else:
                    with trio.move_on_after(self.interval):
                        await self._batch_ready.wait()
                self._batch_ready = trio.Event()
                while self._queue and await self._export_batch():
                    pass
        finally:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + self.timeout):
                while self._queue and await self._export_batch():
                    pass
            self._close()

    async def _export_batch(self) -> bool:
        """POST the oldest `max_batch` spans; False when that failed (they are dropped)."""
        batch = self._queue[:self.max_batch]
        del self._queue[:self.max_batch]
        body = self._encode(batch, self.service_name)
        self.sent += 1
        status = 0
        problem = "cancelled"
        try:
            with trio.move_on_after(self.timeout) as scope:
                try:
                    status = await self._post(body)
                    problem = f"answered {status}"
                except (OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
                    problem = str(exc) or type(exc).__name__
            if scope.cancelled_caught:
                problem = f"no answer within {self.timeout:g}s"
        finally:
            ok = 200 <= status < 300
            self._count(ok, len(batch), problem)
        return ok

    def _count(self, ok: bool, spans: int, problem: str) -> None:
        if ok:
            self.exported += spans
            if self._failures:
                log.info("OTLP export to %s works again", self.endpoint.authority)
            self._failures = 0
            return
        self._close()
        self.failed += 1
        self.dropped += spans
        # Once per outage: the counters tell the rest.
        log.log(logging.DEBUG if self._failures else logging.WARNING,
                "OTLP export to %s failed: %s; %d spans dropped", self.endpoint.authority, problem,
                spans)
        self._failures += 1

    async def _post(self, body: bytes) -> int:
        """POST one body and read the answer; returns its status."""
        if self._stream is not None:
            try:
                return await self._exchange(body)
            except _Stale:
                self._close()
        host, port, _ = self.endpoint
        self._stream = await trio.open_tcp_stream(host, port)
        self._http = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
        try:
            return await self._exchange(body)
        except _Stale as exc:
            raise trio.BrokenResourceError("collector closed the connection") from exc

    async def _exchange(self, body: bytes) -> int:
        stream, http = self._stream, self._http
        assert stream is not None and http is not None
        headers = [*self._headers, ("Content-Length", str(len(body)))]
        request = b"".join([http.send(h11.Request(method="POST", target=self.endpoint.target,  # type: ignore[list-item]
                                                  headers=headers)),
                            http.send(h11.Data(data=body)), http.send(h11.EndOfMessage())])
        try:
            await stream.send_all(request)
        except (OSError, trio.BrokenResourceError) as exc:
            raise _Stale() from exc
        status = 0
        received = 0
        while True:
            event = http.next_event()
            if event is h11.NEED_DATA:
                try:
                    data = await stream.receive_some(65536)
                except (OSError, trio.BrokenResourceError) as exc:
                    if received:
                        raise
                    raise _Stale() from exc
                if not data and not received:
                    raise _Stale()
                received += len(data)
                if received > MAX_RESPONSE_BYTES:
                    raise h11.RemoteProtocolError("answer too long")
                http.receive_data(data)
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.EndOfMessage):
                break
        if http.our_state is h11.DONE and http.their_state is h11.DONE:
            http.start_next_cycle()  # kept alive for the next batch
        else:
            self._close()
        return status

    def _close(self) -> None:
        if self._stream is not None:
            self._stream.socket.close()  # no await: also runs where cancelled
        self._stream = None
        self._http = None
