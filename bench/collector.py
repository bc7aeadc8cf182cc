"""A stand-in OTLP/HTTP collector for the tracing benchmarks: it answers every POST with 200
and counts the bytes, so the proxy's exporter pays for real sends without a collector
installed. One thread, on the harness's CPU, alive until the harness exits."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from . import proc


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    received = 0

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        _Handler.received += len(self.rfile.read(length))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


_server: ThreadingHTTPServer | None = None


def url() -> str:
    """The collector's traces URL, starting it on first use."""
    global _server
    if _server is None:
        _server = ThreadingHTTPServer((proc.HOST, proc.free_port()), _Handler)
        _server.daemon_threads = True
        threading.Thread(target=_server.serve_forever, daemon=True).start()
    host, port = _server.server_address[:2]
    return f"http://{host}:{port}/v1/traces"
