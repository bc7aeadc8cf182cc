"""The span exporter against a real OTLP/HTTP receiver on 127.0.0.1, and against dead and
silent ones: batches decode with the OpenTelemetry definitions, the submitter never waits."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest
import trio
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
)

from proxy.tracing.context import SpanContext, continue_trace
from proxy.tracing.exporter import SpanExporter
from proxy.tracing.spans import Span, client_span, server_span

from .otlp_receiver import OtlpReceiver
from .support import HOST

TRACE = b"4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = b"00f067aa0ba902b7"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver()
    yield server
    server.close()


def proxied_request(status: int = 200) -> tuple[Span, Span]:
    """The spans one proxied request makes: server (child of the caller's), client (its child)."""
    server_ctx = continue_trace(SpanContext(TRACE, CALLER, True), True)
    client_ctx = continue_trace(server_ctx, True)
    now = time.time_ns()
    common = {"method": b"GET", "path": b"/api", "status": status, "error": None, "route": "api",
              "cluster": "api-v1"}
    return (server_span(server_ctx, now, now + 2_000_000, authority=b"web", peer="10.0.0.9", **common),
            client_span(client_ctx, now + 100_000, now + 1_900_000, endpoint="127.0.0.1:9001", **common))


async def wait_until(predicate, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def submit_many(exporter: SpanExporter, n: int) -> float:
    """Submit `n` spans; the seconds it took."""
    span = proxied_request()[0]
    started = time.perf_counter()
    for _ in range(n):
        exporter.submit(span)
    return time.perf_counter() - started


async def test_spans_arrive_in_batches_that_decode_with_parents_intact(receiver):
    exporter = SpanExporter(receiver.url, "web", interval=0.05)
    pairs = [proxied_request(status) for status in (200, 503, 200)]
    async with trio.open_nursery() as nursery:
        await nursery.start(exporter.run)
        for pair in pairs:
            for span in pair:
                exporter.submit(span)
        await wait_until(lambda: exporter.exported == 6)
        nursery.cancel_scope.cancel()
    assert {(r.path, r.content_type) for r in receiver.requests} == {("/v1/traces", "application/x-protobuf")}
    request = ExportTraceServiceRequest.FromString(receiver.requests[0].body)
    assert request.resource_spans[0].resource.attributes[0].key == "service.name"
    assert request.resource_spans[0].resource.attributes[0].value.string_value == "web"
    got = {span.span_id.hex(): span for span in receiver.spans()}
    assert len(got) == 6
    for server, client in pairs:
        got_server, got_client = got[server.span_id.decode()], got[client.span_id.decode()]
        assert got_server.trace_id.hex() == got_client.trace_id.hex() == TRACE.decode()
        assert got_server.parent_span_id.hex() == CALLER.decode()
        assert got_client.parent_span_id == got_server.span_id
    assert (exporter.sent, exporter.failed, exporter.dropped) == (len(receiver.requests), 0, 0)


async def test_json_encoding(receiver):
    exporter = SpanExporter(receiver.url, "web", encoding="json", interval=0.05)
    server, client = proxied_request()
    async with trio.open_nursery() as nursery:
        await nursery.start(exporter.run)
        exporter.submit(server)
        exporter.submit(client)
        await wait_until(lambda: exporter.exported == 2)
        nursery.cancel_scope.cancel()
    (received,) = receiver.requests
    assert received.content_type == "application/json"
    spans = json.loads(received.body)["resourceSpans"][0]["scopeSpans"][0]["spans"]
    assert [(s["traceId"], s["spanId"], s.get("parentSpanId")) for s in spans] == [
        (TRACE.decode(), server.span_id.decode(), CALLER.decode()),
        (TRACE.decode(), client.span_id.decode(), server.span_id.decode())]


async def test_a_full_batch_goes_at_once_over_one_kept_alive_connection(receiver):
    exporter = SpanExporter(receiver.url, "web", max_batch=10, interval=30.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(exporter.run)
        for _ in range(3):
            submit_many(exporter, 10)
            await wait_until(lambda: exporter.queued == 0, timeout=2.0)
        await wait_until(lambda: exporter.exported == 30, timeout=2.0)
        nursery.cancel_scope.cancel()
    assert [len(ExportTraceServiceRequest.FromString(r.body).resource_spans[0].scope_spans[0].spans)
            for r in receiver.requests] == [10, 10, 10]
    assert len({r.client_port for r in receiver.requests}) == 1


async def test_a_connection_the_collector_closed_while_idle_is_replaced():
    receiver = OtlpReceiver(drop_idle=True)
    try:
        exporter = SpanExporter(receiver.url, "web", max_batch=5, interval=30.0)
        async with trio.open_nursery() as nursery:
            await nursery.start(exporter.run)
            for n in (5, 10, 15):
                submit_many(exporter, 5)
                await wait_until(lambda n=n: exporter.exported == n, timeout=2.0)
                await trio.sleep(0.05)  # the collector's close arrives meanwhile
            nursery.cancel_scope.cancel()
    finally:
        receiver.close()
    assert (exporter.failed, exporter.dropped) == (0, 0)
    assert len({r.client_port for r in receiver.requests}) == 3


async def test_what_is_queued_is_sent_when_the_exporter_stops(receiver):
    exporter = SpanExporter(receiver.url, "web", interval=30.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(exporter.run)
        submit_many(exporter, 7)
        await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert (exporter.exported, len(receiver.spans())) == (7, 7)


async def test_a_dead_collector_costs_the_submitter_nothing(upstreams):
    port = upstreams.refused().address[1]
    exporter = SpanExporter(f"http://{HOST}:{port}/v1/traces", "web", max_queue=1000, max_batch=100,
                            interval=0.02, timeout=0.5)
    async with trio.open_nursery() as nursery:
        await nursery.start(exporter.run)
        assert submit_many(exporter, 10_000) < 0.05
        assert exporter.dropped >= 9000 and exporter.queued <= 1000
        await wait_until(lambda: exporter.failed >= 2, timeout=3.0)
        assert submit_many(exporter, 10_000) < 0.05
        nursery.cancel_scope.cancel()
    assert exporter.exported == 0
    assert exporter.dropped + exporter.queued == 20_000
    assert exporter.failed == exporter.sent


async def test_a_collector_that_never_answers_times_out():
    silent = socket.create_server((HOST, 0))  # connects complete in the backlog; nothing is read
    try:
        url = f"http://{HOST}:{silent.getsockname()[1]}/v1/traces"
        exporter = SpanExporter(url, "web", max_queue=500, max_batch=100, interval=0.02, timeout=0.2)
        async with trio.open_nursery() as nursery:
            await nursery.start(exporter.run)
            assert submit_many(exporter, 10_000) < 0.05
            started = trio.current_time()
            await wait_until(lambda: exporter.failed >= 1, timeout=3.0)
            assert trio.current_time() - started < 1.0
            assert submit_many(exporter, 10_000) < 0.05
            nursery.cancel_scope.cancel()
    finally:
        silent.close()
    assert exporter.exported == 0 and exporter.dropped >= 19_000
    assert exporter.dropped + exporter.queued == 20_000


async def test_failures_back_off_and_recover(receiver):
    receiver.status = 503
    exporter = SpanExporter(receiver.url, "web", interval=0.02, timeout=0.5, max_backoff=0.32)
    async with trio.open_nursery() as nursery:
        await nursery.start(exporter.run)
        # For one second a span every 10 ms: without backoff, ~50 tries.
        for _ in range(100):
            exporter.submit(proxied_request()[0])
            await trio.sleep(0.01)
        assert 3 <= len(receiver.requests) <= 8
        assert exporter.failed == exporter.sent == len(receiver.requests) and exporter.exported == 0
        receiver.status = 200
        exporter.submit(proxied_request()[0])
        await wait_until(lambda: exporter.exported >= 1, timeout=2.0)
        nursery.cancel_scope.cancel()
    assert exporter.exported + exporter.dropped + exporter.queued == 101
