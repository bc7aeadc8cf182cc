"""proxy._core.http1: the heads the proxy re-sends (serialize) and their round trip."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy._core.http1 import Limits, parse_request, parse_response

LIMITS = Limits()


def req(data: bytes):
    return parse_request(data, 0, len(data), LIMITS)


def resp(data: bytes, method: bytes = b"GET"):
    return parse_response(data, 0, len(data), LIMITS, method)


def names(head_bytes: bytes) -> list[bytes]:
    lines = head_bytes.split(b"\r\n")[1:-2]
    return [line.split(b":", 1)[0] for line in lines]


HOP_BY_HOP = (b"Connection: keep-alive\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n"
              b"TE: trailers\r\nTrailer: X-Sum\r\nUpgrade: websocket\r\n")


def test_request_hop_by_hop_fields_removed():
    head = req(b"GET /p HTTP/1.1\r\nHost: a\r\n" + HOP_BY_HOP + b"X-End: 1\r\n\r\n")
    assert head.serialize() == b"GET /p HTTP/1.1\r\nHost: a\r\nX-End: 1\r\n\r\n"


def test_response_hop_by_hop_fields_removed():
    head = resp(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n" + HOP_BY_HOP + b"\r\n")
    assert head.serialize() == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n"


def test_connection_named_fields_removed():
    head = req(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close, X-Secret\r\nx-secret: 1\r\n"
               b"X-Kept: 2\r\nconnection: X-OTHER ,, \r\nX-Other: 3\r\nX-SECRET: 4\r\n\r\n")
    assert names(head.serialize()) == [b"Host", b"X-Kept"]
    assert not head.keep_alive


def test_connection_cannot_remove_framing_or_host():
    head = req(b"POST / HTTP/1.1\r\nHost: a\r\nConnection: Content-Length, Host, Transfer-Encoding\r\n"
               b"Content-Length: 3\r\n\r\n")
    assert names(head.serialize()) == [b"Host", b"Content-Length"]
    head = req(b"POST / HTTP/1.1\r\nHost: a\r\nConnection: transfer-encoding\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")
    assert names(head.serialize()) == [b"Host", b"Transfer-Encoding"]


def test_extra_lines_go_last():
    head = req(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n\r\n")
    out = head.serialize(b"x-forwarded-for: 10.0.0.1\r\nx-request-id: 7\r\n")
    assert out == b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nx-forwarded-for: 10.0.0.1\r\nx-request-id: 7\r\n\r\n"
    assert head.serialize(bytearray(b"x: y\r\n")).endswith(b"x: y\r\n\r\n")


def test_drop_names_removed_case_insensitively():
    head = req(b"POST / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.2.3.4\r\nExpect: 100-continue\r\n"
               b"x-forwarded-proto: https\r\nContent-Length: 0\r\n\r\n")
    out = head.serialize(b"x-forwarded-for: 5.6.7.8\r\n", drop=(b"x-forwarded-for", b"x-forwarded-proto", b"expect"))
    assert out == b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nx-forwarded-for: 5.6.7.8\r\n\r\n"
    assert head.serialize(drop=[b"X-FORWARDED-FOR"]).count(b"1.2.3.4") == 0


def test_keep_upgrade():
    head = req(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, keep-alive\r\nUpgrade: websocket\r\n"
               b"Sec-WebSocket-Key: k\r\n\r\n")
    assert b"Upgrade" not in head.serialize()
    assert head.serialize(keep_upgrade=True) == (b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n"
                                                b"Sec-WebSocket-Key: k\r\nConnection: upgrade\r\n\r\n")
    # Not an upgrade request: nothing to keep, no Connection: upgrade invented.
    head = req(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n")
    assert head.serialize(keep_upgrade=True) == b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    head = resp(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert head.serialize(keep_upgrade=True) == (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                                b"Connection: upgrade\r\n\r\n")


def test_own_version_is_sent():
    head = req(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\nHost: a\r\n\r\n")
    assert head.serialize() == b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    assert resp(b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").serialize().startswith(b"HTTP/1.1 200 OK\r\n")


def test_http10_without_host_gets_an_empty_one():
    head = req(b"GET / HTTP/1.0\r\nX: 1\r\n\r\n")
    assert head.host is None
    assert head.serialize() == b"GET / HTTP/1.1\r\nHost: \r\nX: 1\r\n\r\n"
    assert head.serialize(b"Host: svc\r\n", drop=(b"host",)) == b"GET / HTTP/1.1\r\nX: 1\r\nHost: svc\r\n\r\n"
    assert req(b"GET http://a/ HTTP/1.0\r\n\r\n").serialize() == b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


def test_absolute_form_becomes_origin_form_with_its_authority_as_host():
    head = req(b"GET http://Svc.example:8080/a/b?c=d HTTP/1.1\r\nX: 1\r\nHost: other\r\n\r\n")
    assert head.serialize() == b"GET /a/b?c=d HTTP/1.1\r\nHost: Svc.example:8080\r\nX: 1\r\n\r\n"
    assert req(b"GET http://a?q HTTP/1.1\r\nHost: a\r\n\r\n").serialize().startswith(b"GET /?q HTTP/1.1\r\n")
    assert req(b"GET https://a HTTP/1.1\r\nHost: a\r\n\r\n").serialize().startswith(b"GET / HTTP/1.1\r\n")
    assert req(b"OPTIONS http://a:81 HTTP/1.1\r\nHost: a\r\n\r\n").serialize() == (
        b"OPTIONS * HTTP/1.1\r\nHost: a:81\r\n\r\n")


def test_connect_sends_its_target_as_host():
    head = req(b"CONNECT db:5432 HTTP/1.1\r\nHost: elsewhere\r\n\r\n")
    assert head.serialize() == b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n"


def test_values_are_sent_trimmed_with_one_space():
    head = req(b"GET / HTTP/1.1\r\nHost:a\r\nX:\t\tv  w\t \r\nY:\r\n\r\n")
    assert head.serialize() == b"GET / HTTP/1.1\r\nHost: a\r\nX: v  w\r\nY: \r\n\r\n"


def test_response_reason_kept_or_empty():
    assert resp(b"HTTP/1.1 404\r\n\r\n").serialize() == b"HTTP/1.1 404 \r\n\r\n"
    assert resp(b"HTTP/1.1 503 Service Unavailable\r\n\r\n").serialize() == (
        b"HTTP/1.1 503 Service Unavailable\r\n\r\n")


# ---------------------------------------------------------------------------
# Round trip: serialize() re-parses to the same request, minus hop-by-hop fields

TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade", b"host",
       b"content-length", b"transfer-encoding"}

names_st = st.text(TCHAR, min_size=1, max_size=12).map(str.encode).filter(lambda n: n.lower() not in HOP)
value_st = st.binary(max_size=30).map(
    lambda b: bytes(c for c in b if c in (9, 32) or 0x21 <= c <= 0x7E or c >= 0x80).strip(b" \t"))
path_st = st.text("abcxyz019-._~!$&'()*+,;=:@%/", max_size=20).map(lambda s: b"/" + s.encode())


@settings(max_examples=200, deadline=None)
@given(method=st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"X-CUSTOM"]),
       path=path_st, query=st.one_of(st.just(b""), path_st.map(lambda p: b"?" + p[1:])),
       fields=st.lists(st.tuples(names_st, value_st), max_size=10),
       hop=st.lists(st.sampled_from([b"Keep-Alive: 300", b"TE: trailers", b"Trailer: X",
                                     b"Proxy-Connection: close"]), max_size=3),
       nominated=st.lists(names_st, max_size=2),
       length=st.one_of(st.none(), st.integers(0, 10**12)))
def test_round_trip(method, path, query, fields, hop, nominated, length):
    lines = [method + b" " + path + query + b" HTTP/1.1", b"Host: svc.local"]
    lines += [n + b": " + v for n, v in fields]
    lines += hop
    if nominated:
        lines.append(b"Connection: " + b", ".join(nominated))
    if length is not None:
        lines.append(b"Content-Length: %d" % length)
    head = req(b"\r\n".join(lines) + b"\r\n\r\n")
    again = req(head.serialize())
    assert again.method == method and again.target == path + query
    assert again.host == b"svc.local" and again.content_length == (-1 if length is None else length)
    gone = {n.lower() for n in nominated}
    expected = [(b"Host", b"svc.local")] + [(n, v) for n, v in fields if n.lower() not in gone]
    if length is not None:
        expected.append((b"Content-Length", b"%d" % length))
    assert again.headers == expected
    assert again.serialize() == head.serialize()


@settings(max_examples=100, deadline=None)
@given(status=st.integers(100, 599), reason=value_st, fields=st.lists(st.tuples(names_st, value_st), max_size=8))
def test_response_round_trip(status, reason, fields):
    data = b"HTTP/1.1 %d %s\r\n" % (status, reason) + b"".join(n + b": " + v + b"\r\n" for n, v in fields)
    head = resp(data + b"\r\n")
    again = resp(head.serialize())
    assert (again.status, again.reason, again.headers) == (status, reason, fields)


@pytest.mark.parametrize("extra", [b"", b"via: 1.1 meshproxy\r\n"])
def test_serialize_is_repeatable(extra):
    head = req(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: x\r\nX: 1\r\n\r\n")
    assert head.serialize(extra) == head.serialize(extra)
