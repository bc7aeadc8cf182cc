"""Access log lines and trace spans for the requests of one worker (`telemetry:`).

The request path asks `begin` when a request arrives and `end` when it is answered; with
neither an access log nor tracing configured the worker has no Observer and the request
path pays one `is None` test. The sink and the exporter only queue: writing and exporting
happen in their own tasks, so a slow disk or a dead collector never holds a request up.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

from .._core.http1 import RequestHead
from .._core.jsonlog import json_line as c_json_line
from ..log_sink import AccessLogSink
from ..telemetry.access_log import (
    AccessLogFilter,
    AccessRecord,
    LineFormat,
    json_line,
    json_text,
)
from ..tracing import (
    PROPAGATION_HEADERS,
    SpanContext,
    client_span,
    decide_sampled,
    extract,
    inject,
    server_span,
)
from ..tracing.context import server_and_client
from ..tracing.exporter import SpanExporter

_PROTOCOLS = {10: "HTTP/1.0", 11: "HTTP/1.1", 20: "HTTP/2"}
_SPAN_VERSIONS = {10: "1.0", 11: "1.1", 20: "2"}  # network.protocol.version


class Tracing:
    """What tracing needs per request: where context is read and written, and how much is
    sampled without a parent's decision."""

    __slots__ = ("exporter", "propagation", "sample_rate")

    def __init__(self, propagation: Sequence[str], sample_rate: float, exporter: SpanExporter) -> None:
        self.propagation = tuple(propagation)
        self.sample_rate = sample_rate
        self.exporter = exporter


class Observation:
    """One request being observed: when it started, and its spans' contexts."""

    __slots__ = ("client", "fields", "server", "started_ns", "started_wall")

    def __init__(self) -> None:
        self.started_ns = time.time_ns()
        self.started_wall = self.started_ns / 1e9
        self.server: SpanContext | None = None  # the proxy's server span (trace id for the log)
        self.client: SpanContext | None = None  # the span the upstream sees as its parent
        self.fields = b""  # trace context header lines for the upstream request


class Observer:
    def __init__(self, listener: str, sink: AccessLogSink | None, line_format: LineFormat,
                 keep: AccessLogFilter, tracing: Tracing | None) -> None:
        self.listener = listener
        self.sink = sink
        self.line_format = line_format
        self.c_json = line_format is json_line  # the same line, formatted in C
        self.keep = keep
        # The default filter keeps every line: no need to ask it, or to roll a die, per request.
        self.keep_all = keep.sample_rate >= 1.0 and keep.only is None and not keep.min_status
        self.tracing = tracing
        # W3C alone and no vendor state (the usual case): one header line, formatted directly.
        self.w3c_only = tracing is not None and tracing.propagation == ("w3c",)
        # Incoming trace headers are replaced by ours, never passed on as they came.
        self.drop: tuple[bytes, ...] = tuple(PROPAGATION_HEADERS) if tracing is not None else ()

    def begin(self, head: RequestHead | None) -> Observation:
        obs = Observation()
        tracing = self.tracing
        if tracing is not None and head is not None:
            parent = extract(head.get, tracing.propagation)
            sampled = decide_sampled(parent, tracing.sample_rate, random.random())
            obs.server, obs.client = client_parent = server_and_client(parent, sampled)
            client = client_parent[1]
            if self.w3c_only and client.tracestate is None:
                obs.fields = b"traceparent: 00-%s-%s-%s\r\n" % (client.trace_id, client.span_id,
                                                                 b"01" if sampled else b"00")
            else:
                obs.fields = b"".join([b"%s: %s\r\n" % pair for pair in inject(client, tracing.propagation)])
        return obs

    def end(self, obs: Observation, head: RequestHead | None, route: str | None, cluster: str | None,
            endpoint: str | None, status: int, error: str | None, bytes_in: int, bytes_out: int,
            duration: float, upstream: float | None, attempts: int, request_id: bytes | None,
            peer: bytes | None, peer_identity: str | None = None,
            upstream_status: int = 0) -> None:
        """The request was answered (or given up): its access log line and its spans."""
        server = obs.server
        sink = self.sink
        if sink is not None and (self.keep_all or self.keep.wants(status, error, random.random())):
            record = AccessRecord(
                obs.started_wall, self.listener, route, cluster, endpoint,
                head.method if head is not None else None, head.host if head is not None else None,
                head.path if head is not None else None,
                _PROTOCOLS.get(head.version, "HTTP/1.1") if head is not None else "HTTP/1.1",
                status, error, bytes_in, bytes_out, duration * 1e3,
                upstream * 1e3 if upstream is not None else None, attempts, request_id,
                server.trace_id if server is not None else None, peer, peer_identity)
            line = c_json_line(record, json_text) if self.c_json else None
            sink.write(line if line is not None else self.line_format(record))
        if server is None or not server.sampled or self.tracing is None or head is None:
            return
        authority = head.host
        end_ns = obs.started_ns + int(duration * 1e9)
        exporter = self.tracing.exporter
        exporter.submit(server_span(
            server, obs.started_ns, end_ns, method=head.method, path=head.target, authority=authority,
            status=status, error=error, peer=peer.decode() if peer else None, route=route, cluster=cluster,
            protocol_version=_SPAN_VERSIONS.get(head.version, "1.1")))
        if endpoint is not None and obs.client is not None:
            exporter.submit(client_span(
                obs.client, obs.started_ns, end_ns, method=head.method, path=head.target,
                endpoint=endpoint, status=upstream_status, error=error if not upstream_status else None,
                route=route, cluster=cluster, resend_count=max(attempts - 1, 0)))

    def end_tcp(self, started_wall: float, *, cluster: str, endpoint: str | None, error: str | None,
                bytes_in: int, bytes_out: int, duration: float, peer: str,
                peer_identity: str | None) -> None:
        """A TCP connection ended: its access log line (connections make no spans)."""
        sink = self.sink
        if sink is not None and self.keep.wants(None, error, random.random()):
            record = AccessRecord(
                started_wall, self.listener, None, cluster, endpoint, protocol="tcp", error=error,
                bytes_in=bytes_in, bytes_out=bytes_out, duration_ms=duration * 1e3, peer=peer,
                peer_identity=peer_identity)
            line = c_json_line(record, json_text) if self.c_json else None
            sink.write(line if line is not None else self.line_format(record))
