"""Distributed tracing: trace context on the wire, the spans a request makes, their export.

- `context`: W3C `traceparent`/`tracestate` and B3 (single and multi header) read,
  continued and written; the sampling decision.                                   [pure]
- `spans`: server and client spans with the HTTP semantic-convention attributes, encoded
  as OTLP (protobuf or JSON).                                                      [pure]
- `endpoint`: the `otlp_endpoint` URL, checked at config time.                     [pure]
- `exporter`: `SpanExporter`, batches to an OTLP/HTTP collector in the background. [edge]

This package re-exports the pure parts only: importing it loads no Trio. The worker
imports `proxy.tracing.exporter` itself.
"""

from .context import (
    FORMATS,
    PROPAGATION_HEADERS,
    SpanContext,
    continue_trace,
    decide_sampled,
    extract,
    inject,
    validate_propagation,
)
from .endpoint import ENCODINGS, OtlpEndpoint, parse_otlp_endpoint
from .spans import (
    CLIENT,
    SERVER,
    Span,
    client_span,
    encode_json,
    encode_protobuf,
    server_span,
)

__all__ = [
    "CLIENT",
    "ENCODINGS",
    "FORMATS",
    "PROPAGATION_HEADERS",
    "SERVER",
    "OtlpEndpoint",
    "Span",
    "SpanContext",
    "client_span",
    "continue_trace",
    "decide_sampled",
    "encode_json",
    "encode_protobuf",
    "extract",
    "inject",
    "parse_otlp_endpoint",
    "server_span",
    "validate_propagation",
]
