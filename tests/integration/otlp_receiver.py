"""An OTLP/HTTP collector on 127.0.0.1 for tests: records every export it is sent and
decodes protobuf bodies with the OpenTelemetry definitions (opentelemetry-proto)."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from .support import HOST


@dataclass
class Received:
    path: str
    content_type: str
    body: bytes
    client_port: int


@dataclass
class ReceivedSpan:
    """One exported span with the `service.name` of the resource it came under."""

    service: str | None
    span: Span


class OtlpReceiver:
    """An OTLP/HTTP collector in a thread: records every POST and answers `status`.

    With `drop_idle`, it closes each connection after answering without saying so, as a
    collector closing idle keep-alive connections does.
    """

    def __init__(self, drop_idle: bool = False) -> None:
        self.requests: list[Received] = []
        self.status = 200
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with receiver._lock:
                    receiver.requests.append(Received(self.path, self.headers["Content-Type"], body,
                                                      self.client_address[1]))
                self.send_response(receiver.status)
                self.send_header("Content-Type", self.headers["Content-Type"])
                self.send_header("Content-Length", "0")
                self.end_headers()
                self.close_connection = drop_idle

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{HOST}:{self.server.server_address[1]}/v1/traces"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def received(self) -> list[Received]:
        with self._lock:
            return list(self.requests)

    def spans(self) -> list[Span]:
        """Every span of every protobuf export so far."""
        return [received.span for received in self.resource_spans()]

    def resource_spans(self) -> list[ReceivedSpan]:
        """Every span of every protobuf export so far, with its resource's service.name."""
        out = []
        for received in self.received():
            request = ExportTraceServiceRequest.FromString(received.body)
            for resource_spans in request.resource_spans:
                service = next((a.value.string_value for a in resource_spans.resource.attributes
                                if a.key == "service.name"), None)
                out += [ReceivedSpan(service, span)
                        for scope_spans in resource_spans.scope_spans for span in scope_spans.spans]
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
