"""Trace context on the wire: W3C and B3 read strictly, continued, and written back."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from proxy.tracing.context import (
    PROPAGATION_HEADERS,
    SpanContext,
    continue_trace,
    decide_sampled,
    extract,
    inject,
    new_span_id,
    new_trace_id,
    parse_b3,
    parse_traceparent,
    validate_propagation,
)

TRACE = b"4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = b"00f067aa0ba902b7"
PARENT = b"e457b5a2e4d86bd1"
TRACEPARENT = b"00-" + TRACE + b"-" + SPAN + b"-01"


def headers(**values: bytes | str):
    """A request's header lookup: lowercase name -> value, as RequestHead.get answers."""
    table = {name.replace("_", "-").lower().encode(): value if isinstance(value, bytes) else value.encode()
             for name, value in values.items()}
    return table.get


# -- W3C ------------------------------------------------------------------------------------


def test_traceparent_round_trips():
    ctx = parse_traceparent(TRACEPARENT, b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
    assert ctx == SpanContext(TRACE, SPAN, True, None, b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
    assert inject(ctx, ["w3c"]) == [(b"traceparent", TRACEPARENT),
                                    (b"tracestate", b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")]
    unsampled = parse_traceparent(TRACEPARENT[:-2] + b"00")
    assert unsampled is not None and unsampled.sampled is False
    assert inject(unsampled, ["w3c"]) == [(b"traceparent", TRACEPARENT[:-2] + b"00")]


def test_only_the_sampled_bit_of_the_flags_counts():
    assert parse_traceparent(TRACEPARENT[:-2] + b"03").sampled is True
    assert parse_traceparent(TRACEPARENT[:-2] + b"fe").sampled is False


@pytest.mark.parametrize("value", [
    b"ff-" + TRACE + b"-" + SPAN + b"-01",  # version ff is invalid
    b"0g-" + TRACE + b"-" + SPAN + b"-01",
    b"0-" + TRACE + b"-" + SPAN + b"-01",
    TRACEPARENT.upper(),
    b"00-" + TRACE.upper() + b"-" + SPAN + b"-01",
    b"00-" + TRACE + b"-" + SPAN.upper() + b"-01",
    b"00-" + TRACE + b"-" + SPAN + b"-0A",
    b"00-" + b"0" * 32 + b"-" + SPAN + b"-01",  # all-zero ids
    b"00-" + TRACE + b"-" + b"0" * 16 + b"-01",
    b"00-" + TRACE[:-1] + b"-" + SPAN + b"-01",  # wrong lengths
    b"00-" + TRACE + b"0-" + SPAN + b"-01",
    b"00-" + TRACE + b"-" + SPAN[:-1] + b"-01",
    b"00-" + TRACE + b"-" + SPAN + b"-1",
    b"00-" + TRACE + b"-" + SPAN + b"-01-",  # version 00 has exactly four fields
    b"00-" + TRACE + b"-" + SPAN + b"-01-extra",
    b"00_" + TRACE + b"_" + SPAN + b"_01",
    b" " + TRACEPARENT,
    b"",
])
def test_invalid_traceparents_are_no_context(value):
    assert parse_traceparent(value) is None
    assert extract(headers(traceparent=value), ["w3c"]) is None


def test_a_later_version_may_append_fields():
    ctx = parse_traceparent(b"01-" + TRACE + b"-" + SPAN + b"-01-what-comes-next")
    assert ctx is not None and (ctx.trace_id, ctx.span_id, ctx.sampled) == (TRACE, SPAN, True)
    assert parse_traceparent(b"01-" + TRACE + b"-" + SPAN + b"-01") is not None
    assert parse_traceparent(b"01-" + TRACE + b"-" + SPAN + b"-01x") is None


@pytest.mark.parametrize("tracestate, kept", [
    (b"a=1", b"a=1"),
    (b" a=1 , b=2\t", b"a=1 , b=2"),  # passed on as it came, less the outer whitespace
    (b",".join(b"k%d=v" % i for i in range(32)), b",".join(b"k%d=v" % i for i in range(32))),
    (b",".join(b"k%d=v" % i for i in range(33)), None),  # over 32 members
    (b"k=" + b"v" * 600, None),  # over 512 bytes
    (b"a=1\x00", None),
    (b"a=\xc3\xa9", None),
    (b"", None),
])
def test_tracestate_is_passed_on_within_bounds(tracestate, kept):
    ctx = extract(headers(traceparent=TRACEPARENT, tracestate=tracestate), ["w3c"])
    assert ctx is not None and ctx.tracestate == kept


def test_tracestate_without_a_valid_traceparent_is_ignored():
    assert extract(headers(traceparent=b"00-zz", tracestate=b"a=1"), ["w3c"]) is None
    assert extract(headers(tracestate=b"a=1"), ["w3c", "b3"]) is None


# -- B3 -------------------------------------------------------------------------------------


def test_b3_single_header_in_all_its_forms():
    assert parse_b3(TRACE + b"-" + SPAN) == SpanContext(TRACE, SPAN, None)  # decision deferred
    assert parse_b3(TRACE + b"-" + SPAN + b"-1") == SpanContext(TRACE, SPAN, True)
    assert parse_b3(TRACE + b"-" + SPAN + b"-0") == SpanContext(TRACE, SPAN, False)
    assert parse_b3(TRACE + b"-" + SPAN + b"-d") == SpanContext(TRACE, SPAN, True)  # debug
    assert parse_b3(TRACE + b"-" + SPAN + b"-1-" + PARENT) == SpanContext(TRACE, SPAN, True, PARENT)


def test_a_64_bit_b3_trace_id_is_padded_to_128_bits():
    ctx = parse_b3(b"a3ce929d0e0e4736-" + SPAN + b"-1")
    assert ctx is not None and ctx.trace_id == b"0000000000000000a3ce929d0e0e4736"
    assert inject(ctx, ["w3c"]) == [(b"traceparent", b"00-0000000000000000a3ce929d0e0e4736-" + SPAN + b"-01")]
    multi = extract(headers(x_b3_traceid=b"a3ce929d0e0e4736", x_b3_spanid=SPAN), ["b3multi"])
    assert multi is not None and multi.trace_id == b"0000000000000000a3ce929d0e0e4736"


@pytest.mark.parametrize("value", [
    b"0", b"1", b"d",  # a sampling decision alone carries no ids
    TRACE.upper() + b"-" + SPAN + b"-1",
    TRACE + b"-" + SPAN.upper(),
    b"0" * 32 + b"-" + SPAN + b"-1",
    TRACE + b"-" + b"0" * 16,
    TRACE + b"-" + SPAN + b"-1-" + b"0" * 16,
    TRACE[:20] + b"-" + SPAN,  # neither 64 nor 128 bits
    TRACE + b"-" + SPAN[:15],
    TRACE + b"-" + SPAN + b"-2",
    TRACE + b"-" + SPAN + b"-true",
    TRACE + b"-" + SPAN + b"-1-" + PARENT[:8],
    TRACE + b"-" + SPAN + b"-1-" + PARENT + b"-x",
])
def test_invalid_b3_headers_are_no_context(value):
    assert parse_b3(value) is None
    assert extract(headers(b3=value), ["b3"]) is None


def test_b3_multi_headers():
    lookup = headers(x_b3_traceid=TRACE, x_b3_spanid=SPAN, x_b3_parentspanid=PARENT, x_b3_sampled="1")
    assert extract(lookup, ["b3multi"]) == SpanContext(TRACE, SPAN, True, PARENT)
    assert extract(headers(x_b3_traceid=TRACE, x_b3_spanid=SPAN), ["b3"]).sampled is None
    assert extract(headers(x_b3_traceid=TRACE, x_b3_spanid=SPAN, x_b3_sampled="false"), ["b3"]).sampled is False
    assert extract(headers(x_b3_traceid=TRACE, x_b3_spanid=SPAN, x_b3_sampled="true"), ["b3"]).sampled is True
    debug = extract(headers(x_b3_traceid=TRACE, x_b3_spanid=SPAN, x_b3_sampled="0", x_b3_flags="1"), ["b3"])
    assert debug.sampled is True
    # An optional parent that is malformed is left out; the context stands.
    assert extract(headers(x_b3_traceid=TRACE, x_b3_spanid=SPAN, x_b3_parentspanid="xyz"),
                   ["b3"]).parent_span_id is None


@pytest.mark.parametrize("lookup", [
    headers(x_b3_traceid=TRACE),
    headers(x_b3_spanid=SPAN),
    headers(x_b3_traceid=TRACE.upper(), x_b3_spanid=SPAN),
    headers(x_b3_traceid=TRACE, x_b3_spanid=b"0" * 16),
    headers(x_b3_traceid=TRACE, x_b3_spanid=SPAN + b"0"),
])
def test_invalid_b3_multi_headers_are_no_context(lookup):
    assert extract(lookup, ["b3multi"]) is None


def test_b3_in_b3_out():
    ctx = extract(headers(b3=TRACE + b"-" + SPAN + b"-1-" + PARENT), ["b3"])
    child = continue_trace(ctx, True)
    assert inject(child, ["b3"]) == [(b"b3", TRACE + b"-" + child.span_id + b"-1-" + SPAN)]
    assert inject(child, ["b3multi"]) == [(b"x-b3-traceid", TRACE), (b"x-b3-spanid", child.span_id),
                                          (b"x-b3-sampled", b"1"), (b"x-b3-parentspanid", SPAN)]
    root = continue_trace(None, False)
    assert inject(root, ["b3"]) == [(b"b3", root.trace_id + b"-" + root.span_id + b"-0")]


# -- order, continuation, sampling ----------------------------------------------------------


def test_the_first_valid_format_in_the_configured_order_wins():
    other = b"11111111111111111111111111111111"
    both = headers(traceparent=TRACEPARENT, b3=other + b"-" + SPAN + b"-0")
    assert extract(both, ["w3c", "b3"]).trace_id == TRACE
    assert extract(both, ["b3", "w3c"]).trace_id == other
    broken_w3c = headers(traceparent=TRACEPARENT.upper(), b3=other + b"-" + SPAN)
    assert extract(broken_w3c, ["w3c", "b3"]).trace_id == other
    assert extract(both, []) is None
    assert extract(headers(), ["w3c", "b3"]) is None


def test_continuing_a_trace_keeps_the_trace_and_makes_a_child_span():
    parent = SpanContext(TRACE, SPAN, True, None, b"a=1")
    server = continue_trace(parent, True)
    assert (server.trace_id, server.parent_span_id, server.tracestate) == (TRACE, SPAN, b"a=1")
    assert server.span_id != SPAN
    client = continue_trace(server, True)
    assert (client.trace_id, client.parent_span_id) == (TRACE, server.span_id)
    assert client.span_id not in (SPAN, server.span_id)
    # What the origin receives names the proxy's span as its parent, in the same trace.
    sent = inject(client, ["w3c"])[0][1]
    assert sent == b"00-" + TRACE + b"-" + client.span_id + b"-01"


def test_a_request_without_context_starts_a_trace():
    root = continue_trace(None, True)
    assert root.parent_span_id is None and root.tracestate is None and root.sampled is True
    assert re.fullmatch(rb"[0-9a-f]{32}", root.trace_id) and re.fullmatch(rb"[0-9a-f]{16}", root.span_id)


def test_new_ids_are_lowercase_hex_nonzero_and_distinct():
    traces = {new_trace_id() for _ in range(10000)}
    spans = {new_span_id() for _ in range(10000)}
    assert len(traces) == len(spans) == 10000
    assert all(re.fullmatch(rb"[0-9a-f]{32}", t) and t != b"0" * 32 for t in traces)
    assert all(re.fullmatch(rb"[0-9a-f]{16}", s) and s != b"0" * 16 for s in spans)


def test_the_parents_sampling_decision_wins():
    assert decide_sampled(SpanContext(TRACE, SPAN, True), 0.0, 0.99) is True
    assert decide_sampled(SpanContext(TRACE, SPAN, False), 1.0, 0.0) is False
    deferred = SpanContext(TRACE, SPAN, None)
    assert decide_sampled(deferred, 0.5, 0.4) is True and decide_sampled(deferred, 0.5, 0.6) is False
    assert decide_sampled(None, 0.01, 0.005) is True and decide_sampled(None, 0.01, 0.5) is False
    assert decide_sampled(None, 0.0, 0.0) is False and decide_sampled(None, 1.0, 0.999999) is True


def test_injected_headers_are_the_ones_a_proxy_replaces():
    ctx = continue_trace(SpanContext(TRACE, SPAN, True, None, b"a=1"), True)
    names = {name for name, _ in inject(ctx, ["w3c", "b3", "b3multi"])}
    assert names <= set(PROPAGATION_HEADERS)
    assert len(names) == len(PROPAGATION_HEADERS) - 1  # all but x-b3-flags, which we never send


def test_propagation_lists_are_checked():
    assert validate_propagation(["w3c", "b3", "b3multi"]) == []
    assert validate_propagation(["w3c", "zipkin"]) == ["unknown format 'zipkin'; formats: w3c, b3, b3multi"]
    assert validate_propagation(["b3", "b3"]) == ["a format is listed twice"]


def test_the_pure_tracing_and_access_log_modules_load_no_trio():
    code = ("import sys, proxy.tracing, proxy.tracing.context, proxy.tracing.spans, "
            "proxy.tracing.endpoint, proxy.telemetry.access_log; print('trio' in sys.modules)")
    result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_server_and_client_spans_drawn_at_once_chain_like_continue_trace():
    from proxy.tracing.context import server_and_client

    for parent in (None, SpanContext(b"4bf92f3577b34da6a3ce929d0e0e4736", b"00f067aa0ba902b7", True,
                                     None, b"congo=t61rcWkgMzE")):
        server, client = server_and_client(parent, True)
        if parent is None:
            assert len(server.trace_id) == 32 and server.parent_span_id is None
        else:
            assert (server.trace_id, server.parent_span_id, server.tracestate) == (
                parent.trace_id, parent.span_id, parent.tracestate)
        assert client.trace_id == server.trace_id and client.parent_span_id == server.span_id
        assert len(server.span_id) == len(client.span_id) == 16 and server.span_id != client.span_id
        assert server.sampled is client.sampled is True
