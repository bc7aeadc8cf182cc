"""Spans: semantic-convention attributes, status, and the OTLP protobuf and JSON encodings."""

from __future__ import annotations

import base64
import json

import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as OtlpSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from proxy.tracing.context import SpanContext, continue_trace
from proxy.tracing.endpoint import OtlpEndpoint, parse_otlp_endpoint
from proxy.tracing.spans import (
    CLIENT,
    SERVER,
    Span,
    client_span,
    encode_json,
    encode_protobuf,
    server_span,
)

TRACE = b"4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = b"00f067aa0ba902b7"
START = 1_714_564_800_250_000_000


def request_spans(status: int = 200, error: str | None = None, upstream_status: int = 200,
                  upstream_error: str | None = None) -> tuple[Span, Span]:
    """The server span of one proxied request and the client span of its upstream attempt."""
    server_ctx = continue_trace(SpanContext(TRACE, CALLER, True, None, b"vendor=1"), True)
    client_ctx = continue_trace(server_ctx, True)
    server = server_span(server_ctx, START, START + 2_500_000, method=b"GET", path=b"/api/users?id=7",
                         authority=b"web.local:8080", status=status, error=error, peer="10.1.2.3",
                         route="api", cluster="api-v1")
    client = client_span(client_ctx, START + 100_000, START + 2_400_000, method=b"GET",
                         path=b"/api/users?id=7", endpoint="127.0.0.1:9001", status=upstream_status,
                         error=upstream_error, route="api", cluster="api-v1")
    return server, client


def test_a_server_span_has_the_http_server_attributes():
    server, _ = request_spans()
    assert (server.kind, server.name, server.failed) == (SERVER, "GET api", False)
    assert server.attributes == {
        "http.request.method": "GET", "http.response.status_code": 200, "meshproxy.route": "api",
        "meshproxy.cluster": "api-v1", "url.scheme": "http", "url.path": "/api/users", "url.query": "id=7",
        "server.address": "web.local", "server.port": 8080, "client.address": "10.1.2.3",
        "network.peer.address": "10.1.2.3", "network.protocol.version": "1.1",
    }
    assert (server.trace_id, server.parent_span_id, server.tracestate) == (TRACE, CALLER, b"vendor=1")


def test_a_client_span_names_the_endpoint_and_is_the_server_spans_child():
    server, client = request_spans()
    assert (client.kind, client.trace_id, client.parent_span_id) == (CLIENT, TRACE, server.span_id)
    assert client.attributes == {
        "http.request.method": "GET", "http.response.status_code": 200, "meshproxy.route": "api",
        "meshproxy.cluster": "api-v1", "url.full": "http://127.0.0.1:9001/api/users?id=7",
        "server.address": "127.0.0.1", "server.port": 9001, "network.peer.address": "127.0.0.1",
    }
    retry = client_span(continue_trace(server, True), 0, 1, method=b"GET", path=b"/", endpoint="[::1]:9002",
                        status=200, error=None, route=None, cluster="c", resend_count=1)
    assert retry.attributes["http.request.resend_count"] == 1
    assert (retry.attributes["server.address"], retry.attributes["server.port"]) == ("::1", 9002)


def test_5xx_and_failed_connects_are_errors_4xx_on_the_server_side_are_not():
    server, client = request_spans(502, "connect_refused", 0, "connect_refused")
    assert server.failed and client.failed
    assert server.attributes["error.type"] == client.attributes["error.type"] == "connect_refused"
    assert "http.response.status_code" not in client.attributes  # no answer came
    upstream_500, _ = request_spans(500)
    assert upstream_500.failed and upstream_500.attributes["error.type"] == "500"
    no_route = server_span(continue_trace(None, True), 0, 1, method=b"GET", path=b"/x", authority=None,
                           status=404, error="no_route", peer=None, route=None, cluster=None)
    assert not no_route.failed and "error.type" not in no_route.attributes
    assert no_route.attributes["meshproxy.error"] == "no_route" and no_route.name == "GET"


def test_unknown_methods_are_reported_as_other():
    span = server_span(continue_trace(None, True), 0, 1, method=b"PURGE", path=b"/", authority=b"h",
                       status=200, error=None, peer=None, route=None, cluster=None)
    assert span.attributes["http.request.method"] == "_OTHER"
    assert span.attributes["http.request.method_original"] == "PURGE"
    assert "server.port" not in span.attributes


def test_protobuf_encoding_decodes_with_the_opentelemetry_definitions():
    server, client = request_spans(503, "upstream_timeout", 0, "upstream_timeout")
    request = ExportTraceServiceRequest.FromString(encode_protobuf([server, client], "web"))
    (resource_spans,) = request.resource_spans
    assert [(a.key, a.value.string_value) for a in resource_spans.resource.attributes] == [("service.name", "web")]
    (scope_spans,) = resource_spans.scope_spans
    assert scope_spans.scope.name == "meshproxy"
    got_server, got_client = scope_spans.spans
    assert got_server.trace_id == got_client.trace_id == bytes.fromhex(TRACE.decode())
    assert got_server.parent_span_id == bytes.fromhex(CALLER.decode())
    assert got_client.parent_span_id == got_server.span_id == bytes.fromhex(server.span_id.decode())
    assert got_server.kind == OtlpSpan.SPAN_KIND_SERVER and got_client.kind == OtlpSpan.SPAN_KIND_CLIENT
    assert (got_server.start_time_unix_nano, got_server.end_time_unix_nano) == (START, START + 2_500_000)
    assert got_server.trace_state == "vendor=1" and got_server.name == "GET api"
    assert got_server.status.code == Status.STATUS_CODE_ERROR
    attributes = {a.key: a.value for a in got_server.attributes}
    assert attributes["http.response.status_code"].int_value == 503
    assert attributes["url.path"].string_value == "/api/users"
    assert attributes["error.type"].string_value == "upstream_timeout"


def test_a_root_span_has_no_parent_and_an_ok_one_no_status():
    root = server_span(continue_trace(None, True), 0, 1, method=b"GET", path=b"/", authority=None,
                       status=200, error=None, peer=None, route=None, cluster=None)
    (span,) = ExportTraceServiceRequest.FromString(encode_protobuf([root], "web")).resource_spans[0] \
        .scope_spans[0].spans
    assert span.parent_span_id == b"" and not span.HasField("status")


def test_json_encoding_follows_the_otlp_json_mapping():
    server, client = request_spans(503, "upstream_reset", 0, "upstream_reset")
    body = json.loads(encode_json([server, client], "web"))
    scope_spans = body["resourceSpans"][0]["scopeSpans"][0]
    got_server, got_client = scope_spans["spans"]
    assert got_server["traceId"] == TRACE.decode() and got_server["parentSpanId"] == CALLER.decode()
    assert got_client["parentSpanId"] == got_server["spanId"] == server.span_id.decode()
    assert got_server["startTimeUnixNano"] == str(START)  # int64 as a string
    assert got_server["kind"] == 2 and got_client["kind"] == 3 and got_server["status"] == {"code": 2}
    assert {"key": "http.response.status_code", "value": {"intValue": "503"}} in got_server["attributes"]
    assert body["resourceSpans"][0]["resource"]["attributes"] == [
        {"key": "service.name", "value": {"stringValue": "web"}}]


def _hex_ids_to_base64(node):
    """OTLP JSON writes ids in hex where protobuf's own JSON mapping has base64."""
    if isinstance(node, list):
        return [_hex_ids_to_base64(item) for item in node]
    if isinstance(node, dict):
        return {key: base64.b64encode(bytes.fromhex(value)).decode()
                if key in ("traceId", "spanId", "parentSpanId") else _hex_ids_to_base64(value)
                for key, value in node.items()}
    return node


@pytest.mark.parametrize("status", [200, 503])
def test_json_and_protobuf_encode_the_same_request(status):
    spans = request_spans(status, "upstream_reset" if status == 503 else None)
    from_json = json_format.ParseDict(_hex_ids_to_base64(json.loads(encode_json(spans, "web \"x\""))),
                                      ExportTraceServiceRequest())  # unknown keys would raise
    assert from_json == ExportTraceServiceRequest.FromString(encode_protobuf(spans, "web \"x\""))


def test_an_empty_batch_encodes():
    assert ExportTraceServiceRequest.FromString(encode_protobuf([], "web")).resource_spans[0].scope_spans[0].spans == []
    assert json.loads(encode_json([], "web"))["resourceSpans"][0]["scopeSpans"][0]["spans"] == []


# -- the collector's URL --------------------------------------------------------------------


@pytest.mark.parametrize("url, endpoint, authority", [
    ("http://127.0.0.1:4318/v1/traces", OtlpEndpoint("127.0.0.1", 4318, "/v1/traces"), "127.0.0.1:4318"),
    ("http://collector/v1/traces?x=1", OtlpEndpoint("collector", 80, "/v1/traces?x=1"), "collector:80"),
    ("http://[::1]:4318", OtlpEndpoint("::1", 4318, "/"), "[::1]:4318"),
])
def test_otlp_endpoints(url, endpoint, authority):
    assert parse_otlp_endpoint(url) == endpoint
    assert endpoint.authority == authority


@pytest.mark.parametrize("url, message", [
    ("https://collector:4318/v1/traces", "must be an http:// URL"),
    ("collector:4318", "must be an http:// URL"),
    ("http:///v1/traces", "names no host"),
    ("http://collector:99999/", "not a URL"),
    ("http://collector:x/", "not a URL"),
    ("http://user:pw@collector/", "credentials"),
])
def test_bad_otlp_endpoints_say_why(url, message):
    with pytest.raises(ValueError, match=message):
        parse_otlp_endpoint(url)
