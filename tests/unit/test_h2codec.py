"""The pure HTTP/2 helpers: preface detection, request checks (RFC 9113 §8, `_core.h2msg`), translation
to and from HTTP/1.1, chunked trailers, gRPC statuses, and GOAWAY taken out of an upstream's bytes."""

from __future__ import annotations

import ast
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy._core.h2msg import MalformedRequest, h1_request_head, parse_request
from proxy.http import h2codec
from proxy.http.h2codec import (
    PREFACE,
    GoawayTap,
    TrailerDecoder,
    grpc_error_headers,
    grpc_status_for,
    h2_local_reply,
    h2_request_headers,
    h2_response_from_upstream,
    h2_response_headers,
    h2_trailers,
    is_h2_preface,
    parse_grpc_timeout,
    parse_trailers,
)

BASE = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"api.test:8080"), (b":path", b"/a?b=1")]


def test_h2codec_is_pure():
    tree = ast.parse(Path(h2codec.__file__).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add((node.module or "").split(".")[0])
    assert not names & {"trio", "socket", "select", "selectors", "asyncio"}


# -- preface -------------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "verdict"), [
    (PREFACE, True),
    (PREFACE + b"\x00\x00\x00\x04", True),
    (PREFACE[:1], None),
    (PREFACE[:10], None),
    (PREFACE[:23], None),
    (b"", None),
    (b"GET / HTTP/1.1\r\n", False),
    (b"POST", False),
    (b"PUT ", False),
    (b"PATCH", False),
    (b"PRI * HTTP/1.1\r\n", False),
    (b"\x16\x03\x01", False),
])
def test_preface_is_told_apart_without_waiting_for_http1(data, verdict):
    assert is_h2_preface(data) is verdict


# -- requests ------------------------------------------------------------------------------


def test_a_valid_request():
    request = parse_request([*BASE, (b"x-a", b"1"), (b"cookie", b"a=1"), (b"cookie", b"b=2"),
                             (b"content-type", b"application/grpc+proto"), (b"te", b"trailers"),
                             (b"content-length", b"5")])
    assert request.method == b"GET" and request.scheme == b"http"
    assert request.authority == b"api.test:8080" and request.path == b"/a?b=1" and request.route_path == b"/a"
    assert request.get(b"x-a") == b"1" and request.get(b"cookie") == b"a=1; b=2"
    assert request.grpc and request.content_length == 5
    assert request.get(b"te") is None  # not forwarded as a field


def test_host_stands_in_for_a_missing_authority():
    request = parse_request([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"host", b"h")])
    assert request.authority == b"h"


@pytest.mark.parametrize("headers", [
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"x", b"1"), (b":authority", b"a")],
    [*BASE, (b":status", b"200")],
    [*BASE, (b":method", b"POST")],
    [*BASE, (b":path", b"/b")],
    [(b":scheme", b"http"), (b":path", b"/")],
    [(b":method", b"GET"), (b":path", b"/")],
    [(b":method", b"GET"), (b":scheme", b"http")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"noslash")],
    [(b":method", b"G T"), (b":scheme", b"http"), (b":path", b"/")],
    [*BASE, (b"X-Upper", b"1")],
    [*BASE, (b"", b"1")],
    [*BASE, (b"bad name", b"1")],
    [*BASE, (b"connection", b"close")],
    [*BASE, (b"keep-alive", b"1")],
    [*BASE, (b"proxy-connection", b"1")],
    [*BASE, (b"transfer-encoding", b"chunked")],
    [*BASE, (b"upgrade", b"h2c")],
    [*BASE, (b"te", b"gzip")],
    [*BASE, (b"x", b"a\r\nb: c")],
    [*BASE, (b"x", b"a\nb")],
    [*BASE, (b"x", b"a\x00")],
    [*BASE, (b"x", b" a")],
    [*BASE, (b"x", b"a\t")],
    [*BASE, (b"host", b"other")],
    [*BASE, (b"host", b"api.test:8080"), (b"host", b"api.test:8080")],
    [*BASE, (b"content-length", b"-1")],
    [*BASE, (b"content-length", b"1"), (b"content-length", b"2")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/x\r\nHost: y")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/a b HTTP/1.1")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/a\tb")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/a\x7f")],
])
def test_malformed_requests_are_refused(headers):
    with pytest.raises(MalformedRequest) as refused:
        parse_request(headers)
    assert refused.value.status is None and refused.value.error_code == h2codec.PROTOCOL_ERROR


def test_header_limits_answer_431_cookie_crumbs_included():
    with pytest.raises(MalformedRequest) as many:
        parse_request([*BASE] + [(b"cookie", b"c=%d" % i) for i in range(100)], max_fields=100)
    assert many.value.status == 431 and many.value.code == "headers_too_large"
    with pytest.raises(MalformedRequest) as large:
        parse_request([*BASE, (b"x", b"v" * 2000)], max_list_size=2000)
    assert large.value.status == 431


def test_connect_is_answered_not_reset():
    with pytest.raises(MalformedRequest) as refused:
        parse_request([(b":method", b"CONNECT"), (b":authority", b"a:443")])
    assert refused.value.status == 501


def test_trailers_are_checked():
    assert parse_trailers([(b"grpc-status", b"0")]) == [(b"grpc-status", b"0")]
    for bad in ([(b":path", b"/")], [(b"x", b"a\r\nb")], [(b"Upper", b"1")], [(b"transfer-encoding", b"x")]):
        with pytest.raises(MalformedRequest):
            parse_trailers(bad)


# -- translation ---------------------------------------------------------------------------


def test_http1_request_head():
    request = parse_request([*BASE, (b"x-a", b"1"), (b"x-forwarded-for", b"1.2.3.4"), (b"cookie", b"a=1"),
                             (b"content-length", b"3"), (b"expect", b"100-continue")])
    head = h1_request_head(request, b"x-forwarded-for: 1.2.3.4, 5.6.7.8\r\n", b"content-length: 3\r\n")
    assert head == (b"GET /a?b=1 HTTP/1.1\r\nhost: api.test:8080\r\nx-a: 1\r\ncookie: a=1\r\n"
                    b"content-length: 3\r\nx-forwarded-for: 1.2.3.4, 5.6.7.8\r\n\r\n")


def test_h2_request_headers_for_an_h2_upstream():
    request = parse_request([*BASE, (b"content-type", b"application/grpc"), (b"te", b"trailers"),
                             (b"x-forwarded-for", b"9.9.9.9")])
    headers = h2_request_headers(request, [(b"x-forwarded-for", b"9.9.9.9, 1.1.1.1")])
    assert headers[:4] == [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/a?b=1"),
                           (b":authority", b"api.test:8080")]
    assert (b"te", b"trailers") in headers
    assert [v for n, v in headers if n == b"x-forwarded-for"] == [b"9.9.9.9, 1.1.1.1"]


def test_response_fields_lose_hop_by_hop_ones():
    fields = [(b"Content-Type", b"text/plain"), (b"Connection", b"keep-alive, X-Hop"), (b"X-Hop", b"1"),
              (b"Keep-Alive", b"timeout=5"), (b"Transfer-Encoding", b"chunked"), (b"Trailer", b"x"),
              (b"Upgrade", b"h2c"), (b"X-Kept", b"2")]
    assert h2_response_headers(200, fields) == [(b":status", b"200"), (b"content-type", b"text/plain"),
                                                (b"x-kept", b"2")]
    assert h2_trailers([(b"Grpc-Status", b"0"), (b"content-length", b"1")]) == [(b"grpc-status", b"0")]


def test_upstream_responses_are_checked():
    assert h2_response_from_upstream([(b":status", b"204"), (b"x", b"1")]) == (204, [(b"x", b"1")])
    for bad in ([(b"x", b"1")], [(b":status", b"2000")], [(b"x", b"1"), (b":status", b"200")],
                [(b":status", b"200"), (b":path", b"/")], [(b":status", b"200"), (b"connection", b"x")],
                [(b":status", b"200"), (b"x", b"a\r\nb")]):
        with pytest.raises(ValueError):
            h2_response_from_upstream(bad)


def test_local_reply_over_h2_says_what_http1_says():
    headers, body = h2_local_reply(502, "connect_refused", request_id=b"abc")
    fields = dict(headers)
    assert fields[b":status"] == b"502" and fields[b"x-meshproxy-error"] == b"connect_refused"
    assert fields[b"x-request-id"] == b"abc" and int(fields[b"content-length"]) == len(body)
    assert b"connection" not in fields and body.startswith(b"meshproxy: ")


# -- chunked bodies with trailers ----------------------------------------------------------

CHUNKED = b"3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\nGrpc-Status: 0\r\nx-sum:  7 \r\n\r\n"


@given(st.lists(st.integers(min_value=1, max_value=len(CHUNKED)), max_size=10))
def test_trailer_decoder_any_split(cuts):
    decoder = TrailerDecoder()
    points = sorted(set(cuts))
    data = b""
    start = 0
    for point in [*points, len(CHUNKED)]:
        data += decoder.feed(CHUNKED[start:point])
        start = point
    assert data == b"abcdefg"
    assert decoder.done
    assert decoder.trailers == [(b"grpc-status", b"0"), (b"x-sum", b"7")]


# -- gRPC ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "seconds"), [
    (b"1S", 1.0), (b"100m", 0.1), (b"5M", 300.0), (b"2H", 7200.0), (b"250u", 0.00025), (b"7n", 7e-9),
    (b"99999999S", 99999999.0), (None, None), (b"", None), (b"S", None), (b"1x", None), (b"123456789S", None),
    (b"-1S", None),
])
def test_grpc_timeout(value, seconds):
    assert parse_grpc_timeout(value) == (pytest.approx(seconds) if seconds is not None else None)


@pytest.mark.parametrize(("status", "code", "grpc"), [
    (404, "no_route", 12), (503, "connect_refused", 14), (502, "connect_refused", 14), (502, "upstream_reset", 14),
    (504, "upstream_timeout", 4), (503, "circuit_open", 14), (429, "rate_limited", 14), (500, "whatever", 14),
])
def test_grpc_status_of_proxy_errors(status, code, grpc):
    assert grpc_status_for(status, code) == grpc


def test_grpc_error_is_trailers_only_and_percent_encoded():
    headers = dict(grpc_error_headers(503, "circuit_open", "100% full, naïve"))
    assert headers[b":status"] == b"200" and headers[b"content-type"] == b"application/grpc"
    assert headers[b"grpc-status"] == b"14" and headers[b"x-meshproxy-error"] == b"circuit_open"
    assert headers[b"grpc-message"] == b"100%25 full, na%C3%AFve"


# -- the inbound frame watch ---------------------------------------------------------------


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">HBBBL", len(payload) >> 8, len(payload) & 0xFF, kind, flags, stream) + payload


GOAWAY = frame(7, 0, 0, struct.pack(">LL", 5, 0) + b"bye")
BEFORE = frame(4, 0, 0, b"\x00\x03\x00\x00\x00\x64") + frame(1, 5, 1, b"\x82")
AFTER = frame(6, 0, 0, b"12345678") + frame(0, 1, 1, b"data")


@given(st.lists(st.integers(min_value=0, max_value=len(BEFORE + GOAWAY + AFTER)), max_size=8))
def test_goaway_is_taken_out_at_any_split(cuts):
    stream = BEFORE + GOAWAY + AFTER
    frames = GoawayTap()
    out = b""
    start = 0
    for point in [*sorted(cuts), len(stream)]:
        out += frames.feed(stream[start:point])
        start = point
    assert out == BEFORE + AFTER
    assert frames.goaways == [(5, 0, b"bye")]


def test_the_preface_passes_unlooked_at():
    frames = GoawayTap(preface=len(PREFACE))
    data = PREFACE + BEFORE
    assert frames.feed(data) is data


def test_without_goaway_the_bytes_are_not_copied():
    frames = GoawayTap()
    data = BEFORE + AFTER
    assert frames.feed(data) is data
