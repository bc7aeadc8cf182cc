"""Spans a proxied request makes, and their OTLP encodings.

    span = server_span(server_ctx, start_ns, end_ns, method=b"GET", path=b"/api?q=1",
                       authority=b"web:8080", status=200, error=None, peer="10.0.0.9",
                       route="api", cluster="api-v1")
    client_span(client_ctx, start_ns, end_ns, method=b"GET", path=b"/api?q=1",
                endpoint="10.0.0.7:9001", status=200, error=None, route="api",
                cluster="api-v1", resend_count=0)
    encode_protobuf([span, ...], "web")     # an OTLP/HTTP body, application/x-protobuf
    encode_json([span, ...], "web")         # the same, application/json

The server span covers the request on the inbound side, a client span one upstream attempt.
Attributes follow the OpenTelemetry HTTP semantic conventions (`http.request.method`,
`url.path`, `server.address`, `http.response.status_code`, `network.peer.address`,
`error.type`, ...) plus `meshproxy.route`, `meshproxy.cluster` and `meshproxy.error` (the
x-meshproxy-error code). A span's status is ERROR for a 5xx, or for no response at all
with an error code (a failed connect); otherwise it is left unset, as the conventions say.

The JSON encoding follows the OTLP JSON mapping: ids in hex (not base64), camelCase keys,
enums as numbers, 64-bit integers as strings.

Pure: no trio, no sockets.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from json.encoder import encode_basestring_ascii as _quote
from typing import Any, NamedTuple

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as OtlpSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from .._version import __version__
from .context import SpanContext

SERVER = OtlpSpan.SpanKind.SPAN_KIND_SERVER
CLIENT = OtlpSpan.SpanKind.SPAN_KIND_CLIENT
STATUS_ERROR = Status.StatusCode.STATUS_CODE_ERROR

SCOPE_NAME = "meshproxy"
# Methods the conventions know by name; any other is reported as "_OTHER".
_KNOWN_METHODS = frozenset(["CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT",
                            "TRACE"])

AttributeValue = str | bool | int | float


class Span(NamedTuple):
    """One finished span. Ids are lowercase hex bytes, as `SpanContext` holds them."""

    trace_id: bytes
    span_id: bytes
    parent_span_id: bytes | None
    name: str
    kind: int  # SERVER | CLIENT
    start_ns: int  # unix time, nanoseconds
    end_ns: int
    attributes: dict[str, AttributeValue]
    failed: bool  # status ERROR
    tracestate: bytes | None = None


def server_span(ctx: SpanContext, start_ns: int, end_ns: int, *, method: bytes, path: bytes,
                authority: bytes | None, status: int, error: str | None, peer: str | None,
                route: str | None, cluster: str | None, protocol_version: str = "1.1") -> Span:
    """The span of one request as the proxy received it; `status` is what the client got
    (0: none), `error` the x-meshproxy-error code of a local reply."""
    attributes = _request_attributes(method, status, error, route, cluster)
    attributes["url.scheme"] = "http"
    _add_path(attributes, path)
    if authority:
        _add_server(attributes, _text(authority))
    if peer:
        attributes["client.address"] = attributes["network.peer.address"] = peer
    attributes["network.protocol.version"] = protocol_version
    return _span(ctx, SERVER, start_ns, end_ns, attributes, status, error)


def client_span(ctx: SpanContext, start_ns: int, end_ns: int, *, method: bytes, path: bytes,
                endpoint: str, status: int, error: str | None, route: str | None,
                cluster: str | None, resend_count: int = 0) -> Span:
    """The span of one attempt to send the request to `endpoint` (`host:port`); `status` is
    the upstream's answer (0: none)."""
    attributes = _request_attributes(method, status, error, route, cluster)
    attributes["url.full"] = f"http://{endpoint}{_text(path)}"
    _add_server(attributes, endpoint)
    attributes["network.peer.address"] = attributes["server.address"]
    if resend_count:
        attributes["http.request.resend_count"] = resend_count
    return _span(ctx, CLIENT, start_ns, end_ns, attributes, status, error)


def _request_attributes(method: bytes, status: int, error: str | None, route: str | None,
                        cluster: str | None) -> dict[str, AttributeValue]:
    name = method.decode("latin-1")
    attributes: dict[str, AttributeValue] = {}
    if name in _KNOWN_METHODS:
        attributes["http.request.method"] = name
    else:
        attributes["http.request.method"] = "_OTHER"
        attributes["http.request.method_original"] = name
    if status:
        attributes["http.response.status_code"] = status
    if _failed(status, error):
        attributes["error.type"] = error or str(status)
    if error is not None:
        attributes["meshproxy.error"] = error
    if route is not None:
        attributes["meshproxy.route"] = route
    if cluster is not None:
        attributes["meshproxy.cluster"] = cluster
    return attributes


def _span(ctx: SpanContext, kind: int, start_ns: int, end_ns: int,
          attributes: dict[str, AttributeValue], status: int, error: str | None) -> Span:
    method = attributes["http.request.method"]
    route = attributes.get("meshproxy.route")
    # "{method} {target}" with a low-cardinality target: the route's name, not the path.
    name = f"{method} {route}" if route else str(method)
    return Span(ctx.trace_id, ctx.span_id, ctx.parent_span_id, name, kind, start_ns, end_ns,
                attributes, _failed(status, error), ctx.tracestate)


def _failed(status: int, error: str | None) -> bool:
    return status >= 500 or (status == 0 and error is not None)


def _text(value: bytes) -> str:
    return value.decode("utf-8", "backslashreplace")


def _add_path(attributes: dict[str, AttributeValue], target: bytes) -> None:
    path, question, query = _text(target).partition("?")
    attributes["url.path"] = path or "/"
    if question:
        attributes["url.query"] = query


def _add_server(attributes: dict[str, AttributeValue], address: str) -> None:
    """`server.address` and `server.port` from `host[:port]` (IPv6 in brackets)."""
    host, colon, port = address.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if not colon or not port.isdigit() or (":" in host and not bracketed):
        host, port = address, ""  # no port, or a bare IPv6 address
    attributes["server.address"] = host.removeprefix("[").removesuffix("]")
    if port:
        attributes["server.port"] = int(port)


# -- OTLP protobuf --------------------------------------------------------------------------


def encode_protobuf(spans: Iterable[Span], service_name: str) -> bytes:
    """An OTLP `ExportTraceServiceRequest`, serialized: the body of an OTLP/HTTP POST.

    Filled in place (`add()`, field assignment): building each nested message with its
    constructor costs four times as much, ~35 µs a span instead of ~9.
    """
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    _proto_attributes(resource_spans.resource.attributes, {"service.name": service_name})
    scope_spans = resource_spans.scope_spans.add()
    scope_spans.scope.name = SCOPE_NAME
    scope_spans.scope.version = __version__
    add_span = scope_spans.spans.add
    for span in spans:
        out = add_span()
        out.trace_id = bytes.fromhex(span.trace_id.decode())
        out.span_id = bytes.fromhex(span.span_id.decode())
        if span.parent_span_id:
            out.parent_span_id = bytes.fromhex(span.parent_span_id.decode())
        if span.tracestate:
            out.trace_state = span.tracestate.decode()
        out.name = span.name
        out.kind = span.kind  # type: ignore[assignment]
        out.start_time_unix_nano = span.start_ns
        out.end_time_unix_nano = span.end_ns
        _proto_attributes(out.attributes, span.attributes)
        if span.failed:
            out.status.code = STATUS_ERROR
    return request.SerializeToString()


def _proto_attributes(out: Any, attributes: dict[str, AttributeValue]) -> None:
    add = out.add
    for key, value in attributes.items():
        pair = add()
        pair.key = key
        if isinstance(value, bool):  # before int: a bool is an int
            pair.value.bool_value = value
        elif isinstance(value, int):
            pair.value.int_value = value
        elif isinstance(value, float):
            pair.value.double_value = value
        else:
            pair.value.string_value = value


# -- OTLP JSON ------------------------------------------------------------------------------


def encode_json(spans: Iterable[Span], service_name: str) -> bytes:
    """The same request in OTLP's JSON mapping: the body of an OTLP/HTTP JSON POST.

    Written out as text: `json.dumps` of the nested dicts and lists costs twice as much.
    """
    resource = _json_attributes({"service.name": service_name})
    scope = f'{{"name":{_quote(SCOPE_NAME)},"version":{_quote(__version__)}}}'
    body = ",".join(map(_json_span, spans))
    return (f'{{"resourceSpans":[{{"resource":{{"attributes":{resource}}},'
            f'"scopeSpans":[{{"scope":{scope},"spans":[{body}]}}]}}]}}').encode()


def _json_span(span: Span) -> str:
    ids = f'"traceId":"{span.trace_id.decode()}","spanId":"{span.span_id.decode()}"'
    if span.parent_span_id:
        ids += f',"parentSpanId":"{span.parent_span_id.decode()}"'
    if span.tracestate:
        ids += f',"traceState":{_quote(span.tracestate.decode())}'
    status = f',"status":{{"code":{STATUS_ERROR}}}' if span.failed else ""  # unset: left out
    return (f'{{{ids},"name":{_quote(span.name)},"kind":{span.kind},'
            f'"startTimeUnixNano":"{span.start_ns}","endTimeUnixNano":"{span.end_ns}",'
            f'"attributes":{_json_attributes(span.attributes)}{status}}}')


def _json_attributes(attributes: dict[str, AttributeValue]) -> str:
    return "[" + ",".join([f'{{"key":{_quote(key)},"value":{_json_value(value)}}}'
                           for key, value in attributes.items()]) + "]"


def _json_value(value: AttributeValue) -> str:
    if isinstance(value, bool):
        return '{"boolValue":true}' if value else '{"boolValue":false}'
    if isinstance(value, int):
        return f'{{"intValue":"{value}"}}'  # int64: a string in OTLP JSON
    if isinstance(value, float):
        return f'{{"doubleValue":{json.dumps(value)}}}'
    return f'{{"stringValue":{_quote(value)}}}'
