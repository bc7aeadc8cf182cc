"""Request smuggling and parser strictness, against a real listener with raw bytes.

Every malformed or ambiguous request must get its status (400; 414 for a long request
line, 431 for too large or too many header fields, 501 for an unknown transfer coding,
505 for an unsupported version) with `Connection: close`, then the close, and the origin
behind the proxy must receive nothing at all: not a byte, not a connection.

Sources of the cases: RFC 9112 (2.2, 3, 5, 6.1-6.3, 7.1, 11), RFC 9110 (5.5, 7.6.1),
PortSwigger's CL.TE / TE.CL / TE.TE obfuscations, defparam/smuggler's byte mutations
around Transfer-Encoding, HTTP Garden findings and Envoy's HTTP/1 integration tests.

Then the other side: valid requests that look unusual must pass and reach the origin intact.
"""

from __future__ import annotations

import time

import pytest

from .http_support import (
    Origin,
    RawClient,
    build_request,
    simple_config,
    start_shared_proxy,
)

HOST = b"Host: example.com"


def req(*fields: bytes, body: bytes = b"", line: bytes = b"POST / HTTP/1.1", host: bool = True) -> bytes:
    """A request from its parts: request line, field lines (Host first unless told not to), body."""
    lines = [line, *([HOST] if host else []), *fields]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def get(*fields: bytes, target: bytes = b"/", host: bool = True) -> bytes:
    return req(*fields, line=b"GET " + target + b" HTTP/1.1", host=host)


def chunked(body: bytes) -> bytes:
    return req(b"Transfer-Encoding: chunked", body=body)


# -- the cases -------------------------------------------------------------------------------

REJECTED: list[tuple[str, bytes, int]] = [
    # Request line (RFC 9112 3, 2.2)
    ("bare-lf-after-request-line", b"GET / HTTP/1.1\nHost: example.com\r\n\r\n", 400),
    ("bare-lf-everywhere", b"GET / HTTP/1.1\nHost: example.com\n\n", 400),
    ("bare-cr-after-request-line", b"GET / HTTP/1.1\rHost: example.com\r\n\r\n", 400),
    ("two-empty-lines-before", b"\r\n\r\n" + get(), 400),
    ("bare-lf-before", b"\n" + get(), 400),
    ("space-before-request-line", b" " + get(), 400),
    ("two-spaces-after-method", b"GET  / HTTP/1.1\r\n" + HOST + b"\r\n\r\n", 400),
    ("two-spaces-after-target", b"GET /  HTTP/1.1\r\n" + HOST + b"\r\n\r\n", 400),
    ("tab-as-separator", b"GET\t/ HTTP/1.1\r\n" + HOST + b"\r\n\r\n", 400),
    ("space-after-version", b"GET / HTTP/1.1 \r\n" + HOST + b"\r\n\r\n", 400),
    ("no-version-http-0.9", b"GET /\r\n" + HOST + b"\r\n\r\n", 400),
    ("lowercase-version", b"GET / http/1.1\r\n" + HOST + b"\r\n\r\n", 400),
    ("version-1.01", b"GET / HTTP/1.01\r\n" + HOST + b"\r\n\r\n", 400),
    ("version-1.1.1", b"GET / HTTP/1.1.1\r\n" + HOST + b"\r\n\r\n", 400),
    ("version-11", b"GET / HTTP/11\r\n" + HOST + b"\r\n\r\n", 400),
    ("version-2.0", b"GET / HTTP/2.0\r\n" + HOST + b"\r\n\r\n", 505),
    ("version-3.0", b"GET / HTTP/3.0\r\n" + HOST + b"\r\n\r\n", 505),
    ("version-0.9", b"GET / HTTP/0.9\r\n" + HOST + b"\r\n\r\n", 505),
    ("h2-preface-line-only", b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n", 505),  # not HTTP/2's preface
    ("nul-in-method", b"G\x00ET / HTTP/1.1\r\n" + HOST + b"\r\n\r\n", 400),
    ("paren-in-method", b"GE(T / HTTP/1.1\r\n" + HOST + b"\r\n\r\n", 400),
    ("nul-in-target", get(target=b"/a\x00b"), 400),
    ("space-in-target", get(target=b"/a b"), 400),
    ("fragment-in-target", get(target=b"/a#frag"), 400),
    ("obs-text-in-target", get(target=b"/caf\xe9"), 400),
    ("del-in-target", get(target=b"/a\x7f"), 400),
    ("unknown-scheme", get(target=b"hps://example.com/"), 400),
    ("relative-target", get(target=b"index.html"), 400),
    ("userinfo-in-absolute-form", get(target=b"http://user@example.com/"), 400),
    ("empty-authority-absolute-form", get(target=b"http:///x"), 400),
    ("asterisk-with-get", get(target=b"*"), 400),
    ("connect-with-origin-form", b"CONNECT / HTTP/1.1\r\n" + HOST + b"\r\n\r\n", 400),
    ("connect-without-port", b"CONNECT example.com HTTP/1.1\r\n" + HOST + b"\r\n\r\n", 400),
    ("garbage-first-line", b"hello\r\n\r\n", 400),
    ("tls-client-hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)) + b"\r\n\r\n", 400),
    ("request-line-8193-bytes", b"GET /" + b"a" * (8193 - 14) + b" HTTP/1.1\r\n" + HOST + b"\r\n\r\n", 414),
    ("request-line-64-kib", b"GET /" + b"a" * 65536 + b" HTTP/1.1\r\n" + HOST + b"\r\n\r\n", 414),
    # Host (RFC 9112 3.2, RFC 9110 7.2)
    ("missing-host", get(host=False), 400),
    ("two-hosts-differing", get(b"Host: evil.example"), 400),
    ("two-hosts-equal", get(HOST), 400),
    ("host-with-space", get(b"Host: a b", host=False), 400),
    ("host-with-slash", get(b"Host: a/b", host=False), 400),
    ("host-with-userinfo", get(b"Host: user@example.com", host=False), 400),
    ("host-bad-port", get(b"Host: example.com:http", host=False), 400),
    ("host-long-port", get(b"Host: example.com:123456", host=False), 400),
    ("host-obs-text", get(b"Host: caf\xe9.example", host=False), 400),
    ("host-list", get(b"Host: a.example, b.example", host=False), 400),
    ("host-unclosed-ipv6", get(b"Host: [::1", host=False), 400),
    # Field lines (RFC 9112 5, 5.2; RFC 9110 5.5)
    ("nul-in-value", get(b"X: a\x00b"), 400),
    ("ctl-in-value", get(b"X: a\x01b"), 400),
    ("del-in-value", get(b"X: a\x7fb"), 400),
    ("bare-cr-in-value", get(b"X: a\rb"), 400),
    ("bare-lf-in-value", get(b"X: a\nY: b"), 400),
    ("bare-lf-ending-fields", b"GET / HTTP/1.1\r\nHost: example.com\n\r\n", 400),
    ("obs-fold-space", get(b"X: a", b" b"), 400),
    ("obs-fold-tab", get(b"X: a", b"\tb"), 400),
    ("space-before-first-field", b"GET / HTTP/1.1\r\n Host: example.com\r\n\r\n", 400),
    ("space-before-colon", get(b"X : a"), 400),
    ("tab-before-colon", get(b"X\t: a"), 400),
    ("space-before-colon-host", get(b"Host : example.com", host=False), 400),
    ("empty-field-name", get(b": a"), 400),
    ("line-without-colon", get(b"Foo bar"), 400),
    ("space-in-name", get(b"X Y: a"), 400),
    *((f"name-with-{c:#04x}", get(b"X" + bytes([c]) + b"Y: a"), 400)
      for c in b'()<>@,;\\"/[]?={}\x00\x01\x7f\x80\xff'),
    ("101-field-lines", get(*(b"X-%d: v" % i for i in range(100))), 431),
    ("header-section-over-60-kib", get(*(b"X-%d: %s" % (i, b"v" * 4000) for i in range(16))), 431),
    ("one-64-kib-field", get(b"X-Big: " + b"v" * 65536), 431),
    ("invalid-connection-option", get(b"Connection: close keep"), 400),
    ("quoted-connection-option", get(b'Connection: "close"'), 400),
    # Content-Length (RFC 9112 6.3, RFC 9110 8.6)
    *((f"content-length-{name}", req(b"Content-Length: " + value, body=b"hello"), 400) for name, value in [
        ("plus", b"+5"), ("minus", b"-5"), ("space-inside", b"5 5"), ("hex", b"0x5"),
        ("list-differing", b"5,6"), ("list-equal", b"5, 5"), ("decimal", b"5.0"), ("exponent", b"5e0"),
        ("empty", b""), ("letters", b"five"), ("fullwidth-digit", "\uff15".encode()),
        ("overflow", b"99999999999999999999"), ("two-to-the-63", b"9223372036854775808"),
        ("nul", b"5\x00"), ("vertical-tab", b"\x0b5"), ("trailing-comma", b"5,"),
    ]),
    ("content-length-twice-differing", req(b"Content-Length: 5", b"Content-Length: 6", body=b"hello!"), 400),
    ("content-length-twice-equal", req(b"Content-Length: 5", b"Content-Length: 5", body=b"hello"), 400),
    # Content-Length with Transfer-Encoding (RFC 9112 6.1, 6.3 item 3; PortSwigger CL.TE / TE.CL)
    ("cl-te", req(b"Content-Length: 6", b"Transfer-Encoding: chunked", body=b"0\r\n\r\nG"), 400),
    ("te-cl", req(b"Transfer-Encoding: chunked", b"Content-Length: 6", body=b"0\r\n\r\nG"), 400),
    ("te-cl-smuggled-post", req(b"Content-Length: 4", b"Transfer-Encoding: chunked",
                                body=b"5c\r\nGPOST / HTTP/1.1\r\nContent-Type: x\r\nContent-Length: 15\r\n\r\n"
                                     b"x=1\r\n0\r\n\r\n"), 400),
    ("cl-zero-te", req(b"Content-Length: 0", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"), 400),
    # Transfer-Encoding (RFC 9112 6.1, 7; TE.TE obfuscations)
    *((f"te-{name}", req(b"Transfer-Encoding: " + value, body=b"0\r\n\r\n"), status) for name, value, status in [
        ("chunked-identity", b"chunked, identity", 400), ("identity", b"identity", 400),
        ("gzip", b"gzip", 400), ("chunked-chunked", b"chunked, chunked", 400),
        ("xchunked", b"xchunked", 400), ("chunkedx", b"chunkedx", 400), ("chunk", b"chunk", 400),
        ("quoted", b'"chunked"', 400), ("parameter", b"chunked;q=1", 400), ("empty", b"", 400),
        ("trailing-comma", b"chunked,", 400), ("leading-comma", b", chunked", 400),
        ("nul", b"chunked\x00", 400), ("vertical-tab", b"\x0bchunked", 400),
        ("form-feed", b"chunked\x0c", 400), ("nbsp", b"\xa0chunked", 400),
        ("gzip-chunked", b"gzip, chunked", 501), ("identity-chunked", b"identity, chunked", 501),
        ("unknown-chunked", b"foo, chunked", 501), ("compress-deflate-chunked", b"compress, deflate, chunked", 501),
    ]),
    ("te-two-lines", req(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"), 400),
    ("te-split-over-lines", req(b"Transfer-Encoding: identity", b"Transfer-Encoding: chunked",
                                body=b"0\r\n\r\n"), 400),
    ("te-space-before-colon", req(b"Transfer-Encoding : chunked", body=b"0\r\n\r\n"), 400),
    ("te-leading-space-line", req(b"X: y", b" Transfer-Encoding: chunked", body=b"0\r\n\r\n"), 400),
    ("te-leading-tab-line", req(b"X: y", b"\tTransfer-Encoding: chunked", body=b"0\r\n\r\n"), 400),
    ("te-value-on-next-line", req(b"Transfer-Encoding:", b" chunked", body=b"0\r\n\r\n"), 400),
    ("te-bare-lf-before", req(b"X: y\nTransfer-Encoding: chunked", body=b"0\r\n\r\n"), 400),
    ("te-on-http-1.0", req(b"Transfer-Encoding: chunked", body=b"0\r\n\r\n", line=b"POST / HTTP/1.0"), 400),
    # Chunked framing (RFC 9112 7.1)
    *((f"chunk-{name}", chunked(body), 400) for name, body in [
        ("size-not-hex", b"g\r\nhello\r\n0\r\n\r\n"),
        ("size-negative", b"-5\r\nhello\r\n0\r\n\r\n"),
        ("size-0x", b"0x5\r\nhello\r\n0\r\n\r\n"),
        ("size-17-digits", b"00000000000000005\r\nhello\r\n0\r\n\r\n"),
        ("size-2-to-the-63", b"8000000000000000\r\nhello\r\n0\r\n\r\n"),
        ("size-leading-space", b" 5\r\nhello\r\n0\r\n\r\n"),
        ("size-trailing-space", b"5 \r\nhello\r\n0\r\n\r\n"),
        ("size-empty", b"\r\nhello\r\n0\r\n\r\n"),
        ("size-plus", b"+5\r\nhello\r\n0\r\n\r\n"),
        ("size-nul", b"5\x00\r\nhello\r\n0\r\n\r\n"),
        ("size-line-over-4-kib", b"5;a=" + b"b" * 5000 + b"\r\nhello\r\n0\r\n\r\n"),
        ("extension-empty", b"5;\r\nhello\r\n0\r\n\r\n"),
        ("extension-two-words", b"5;a b\r\nhello\r\n0\r\n\r\n"),
        ("extension-bare-lf", b"5;a\nhello\r\n0\r\n\r\n"),
        ("extension-bare-cr", b"5;a\rhello\r\n0\r\n\r\n"),
        ("extension-open-quote", b'5;a="b\r\nhello\r\n0\r\n\r\n'),
        ("extension-nul", b"5;a=\x00\r\nhello\r\n0\r\n\r\n"),
        ("extension-equals-only", b"5;=b\r\nhello\r\n0\r\n\r\n"),
        ("data-longer-than-size", b"3\r\nhello\r\n0\r\n\r\n"),
        ("data-shorter-than-size", b"7\r\nhello\r\n0\r\n\r\n"),
        ("data-without-crlf", b"5\r\nhello0\r\n\r\n"),
        ("bare-lf-after-size", b"5\nhello\r\n0\r\n\r\n"),
        ("bare-lf-after-data", b"5\r\nhello\n0\r\n\r\n"),
        ("bare-cr-after-data", b"5\r\nhello\r0\r\n\r\n"),
        ("last-chunk-bare-lf", b"0\n\n"),
        ("end-bare-cr", b"0\r\n\rX"),
        ("trailer-obs-fold", b"0\r\nX: a\r\n b\r\n\r\n"),
        ("trailer-without-colon", b"0\r\nX\r\n\r\n"),
        ("trailer-space-before-colon", b"0\r\nX : a\r\n\r\n"),
        ("trailer-bare-lf", b"0\r\nX: a\n\r\n"),
        ("trailer-nul", b"0\r\nX: a\x00\r\n\r\n"),
        ("trailer-content-length", b"0\r\nContent-Length: 5\r\n\r\n"),
        ("trailer-transfer-encoding", b"0\r\nTransfer-Encoding: chunked\r\n\r\n"),
        ("trailer-host", b"0\r\nHost: evil.example\r\n\r\n"),
    ]),
]

# defparam/smuggler: bytes around Transfer-Encoding, with a Content-Length beside it. Each
# is either an invalid field line, a Transfer-Encoding that is not `chunked`, or (for the
# valid OWS bytes) a Content-Length + Transfer-Encoding pair: 400 in every case.
SMUGGLER_BYTES = b"\x01\x04\x08\x09\x0a\x0b\x0c\x0d\x1f\x20\x7f\xa0\xff"
for _c in SMUGGLER_BYTES:
    _b = bytes([_c])
    for _where, _line in [("name-prefix", _b + b"Transfer-Encoding: chunked"),
                          ("name-suffix", b"Transfer-Encoding" + _b + b": chunked"),
                          ("value-prefix", b"Transfer-Encoding:" + _b + b"chunked"),
                          ("value-suffix", b"Transfer-Encoding: chunked" + _b)]:
        REJECTED.append((f"smuggler-{_where}-{_c:#04x}",
                         req(b"Content-Length: 4", _line, body=b"1\r\nZ\r\nQ\r\n\r\n"), 400))


def _names(headers):
    return [n.lower() for n, _ in headers]


def _value(request, name):
    values = request.header_all(name)
    assert len(values) == 1, (name, request.headers)
    return values[0]


# (id, request bytes, check(origin request)) -- each must be answered 200 by the origin.
ACCEPTED = [
    ("tab-around-value", get(b"X-Tab:\t v a l \t"), lambda r: _value(r, "x-tab") == "v a l"),
    ("no-space-after-colon", get(b"X-Tight:value"), lambda r: _value(r, "x-tight") == "value"),
    ("empty-value", get(b"X-Empty:"), lambda r: _value(r, "x-empty") == ""),
    ("empty-value-with-spaces", get(b"X-Empty:   "), lambda r: _value(r, "x-empty") == ""),
    ("obs-text-in-value", get(b"X-Obs: caf\xe9 \x80\xff"),
     lambda r: _value(r, "x-obs").encode("latin-1") == b"caf\xe9 \x80\xff"),
    ("every-tchar-in-name", get(b"X-!#$%&'*+.^_`|~09az: v"), lambda r: _value(r, "x-!#$%&'*+.^_`|~09az") == "v"),
    ("lowercase-names", b"GET /lower HTTP/1.1\r\nhost: example.com\r\nx-low: v\r\n\r\n",
     lambda r: r.target == "/lower" and _value(r, "x-low") == "v"),
    ("same-field-twice-kept-in-order", get(b"X-A: 1", b"X-B: 2", b"X-A: 3"),
     lambda r: [v for n, v in r.headers if n.lower() in ("x-a", "x-b")] == ["1", "2", "3"]),
    ("long-target-8000", get(target=b"/" + b"t" * 7999), lambda r: r.target == "/" + "t" * 7999),
    ("request-line-exactly-8192", b"GET /" + b"a" * (8192 - 14) + b" HTTP/1.1\r\n" + HOST + b"\r\n\r\n",
     lambda r: len(r.target) == 8192 - 13),
    ("odd-but-legal-query", get(target=b"/p?a=b&c=%20&d=/?:@!$'()*+,;=~"),
     lambda r: r.target == "/p?a=b&c=%20&d=/?:@!$'()*+,;=~"),
    ("absolute-form", b"GET http://Other.Example:8080/abs?q=1 HTTP/1.1\r\nHost: ignored.example\r\n\r\n",
     lambda r: r.target == "/abs?q=1" and r.header_all("host") == ["Other.Example:8080"]),
    ("absolute-form-empty-path", b"GET http://other.example HTTP/1.1\r\nHost: other.example\r\n\r\n",
     lambda r: r.target == "/"),
    ("one-empty-line-before", b"\r\n" + get(target=b"/after-crlf"), lambda r: r.target == "/after-crlf"),
    ("custom-method", b"PURGE /cache HTTP/1.1\r\n" + HOST + b"\r\n\r\n", lambda r: r.method == "PURGE"),
    ("host-empty", get(b"Host:", host=False), lambda r: r.header_all("host") in (["", ], [])),
    ("host-ipv6-literal", get(b"Host: [::1]:8080", host=False), lambda r: _value(r, "host") == "[::1]:8080"),
    ("100-field-lines", get(*(b"X-%d: v" % i for i in range(99))), lambda r: _value(r, "x-98") == "v"),
    ("header-section-near-60-kib", get(*(b"X-%d: %s" % (i, b"v" * 4000) for i in range(14))),
     lambda r: len(_value(r, "x-13")) == 4000),
    ("content-length-leading-zeros", req(b"Content-Length: 0005", body=b"hello"),
     lambda r: r.body == b"hello" and _value(r, "content-length") == "5"),
    ("content-length-ows", req(b"Content-Length: \t5 ", body=b"hello"), lambda r: r.body == b"hello"),
    ("content-length-zero", req(b"Content-Length: 0"), lambda r: r.body == b"" and r.method == "POST"),
    ("te-mixed-case", req(b"Transfer-Encoding: Chunked", body=b"5\r\nhello\r\n0\r\n\r\n"),
     lambda r: r.body == b"hello" and r.chunked),
    ("te-tab-ows", req(b"Transfer-Encoding:\tchunked\t", body=b"5\r\nhello\r\n0\r\n\r\n"),
     lambda r: r.body == b"hello"),
    ("chunk-extensions", chunked(b'5;name=value;q="quoted \\" str";flag\r\nhello\r\n0;last=1\r\n\r\n'),
     lambda r: r.body == b"hello" and r.chunk_lines == ['5;name=value;q="quoted \\" str";flag', "0;last=1"]),
    ("chunk-extension-bws", chunked(b"5 ; a = b\r\nhello\r\n0\r\n\r\n"), lambda r: r.body == b"hello"),
    ("chunk-size-leading-zeros-uppercase", chunked(b"000A\r\n0123456789\r\n0\r\n\r\n"),
     lambda r: r.body == b"0123456789"),
    ("chunk-trailers", chunked(b"5\r\nhello\r\n0\r\nX-Sum: 42\r\nX-Other: y\r\n\r\n"),
     lambda r: r.body == b"hello" and r.trailers == [("X-Sum", "42"), ("X-Other", "y")]),
    ("many-small-chunks", chunked(b"".join(b"1\r\n%c\r\n" % c for c in b"abcdefghij") + b"0\r\n\r\n"),
     lambda r: r.body == b"abcdefghij"),
    ("http-1.0-without-host", b"GET /old HTTP/1.0\r\n\r\n", lambda r: r.target == "/old"),
    ("http-1.0-expect-ignored", req(b"Expect: 100-continue", b"Content-Length: 5", body=b"hello",
                                    line=b"POST / HTTP/1.0"), lambda r: r.body == b"hello"),
    ("expect-with-body-already-sent", req(b"Expect: 100-continue", b"Content-Length: 5", body=b"hello"),
     lambda r: r.body == b"hello" and "expect" not in _names(r.headers)),
    ("connection-options-case", get(b"Connection: Keep-Alive, X-Hop", b"X-Hop: 1", b"X-End: 2"),
     lambda r: "x-hop" not in _names(r.headers) and _value(r, "x-end") == "2"),
]


# -- fixtures --------------------------------------------------------------------------------


class Guarded:
    """One proxy for the module, in front of an origin that must see nothing malformed."""

    def __init__(self, proxy, origin: Origin) -> None:
        self.proxy = proxy
        self.origin = origin
        self.pid = proxy.worker_pids()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    origin = Origin("guarded")
    proxy = start_shared_proxy(simple_config(origin), tmp_path_factory.mktemp("smuggling"))
    yield Guarded(proxy, origin)
    proxy.kill()
    origin.close()


@pytest.fixture
def guard(guarded):
    """The shared proxy; fails the test during which its worker died or it logged a traceback."""
    log_at = len(guarded.proxy.log())
    yield guarded
    pids = guarded.proxy.worker_pids()
    if pids != guarded.pid:
        before = guarded.pid
        guarded.proxy.wait_ready(workers=1)
        guarded.pid = guarded.proxy.worker_pids()
        pytest.fail(f"the worker died during this test (pids {before}, now {pids})")
    logged = guarded.proxy.log()[log_at:]
    if "Traceback" in logged:
        pytest.fail(f"the proxy logged a traceback during this test:\n{logged[-3000:]}")


def _settle(origin: Origin, before: int) -> int:
    """Bytes the origin received since `before`, after letting in-flight bytes land."""
    time.sleep(0.02)
    return origin.bytes_received - before


# -- tests -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "status"), [(d, s) for _, d, s in REJECTED], ids=[i for i, _, _ in REJECTED])
def test_rejected_and_nothing_reaches_the_origin(guard, data, status):
    origin = guard.origin
    bytes_before, accepted_before = origin.bytes_received, origin.accepted
    with RawClient(guard.proxy.address(), timeout=5) as client:
        client.send(data)
        response = client.read_response()
        assert response.status == status, response
        assert response.error_code, "a proxy-made error names its cause in x-meshproxy-error"
        assert response.closes, f"no Connection: close in {response.headers}"
        assert client.wait_closed(5) in ("eof", "reset")
    assert _settle(origin, bytes_before) == 0, f"the origin received: {bytes(origin.connections[-1].raw)[-300:]!r}"
    assert origin.accepted == accepted_before


@pytest.mark.parametrize(("data", "check"), [(d, c) for _, d, c in ACCEPTED], ids=[i for i, _, _ in ACCEPTED])
def test_unusual_but_valid_requests_reach_the_origin_intact(guard, data, check):
    origin = guard.origin
    origin.reset()
    with RawClient(guard.proxy.address(), timeout=5) as client:
        client.send(data)
        response = client.read_response()
        assert response.status == 200, response
    requests = origin.requests
    assert len(requests) == 1, [r.target for r in requests]
    assert not origin.errors, origin.errors
    seen = requests[0]
    assert seen.version == "HTTP/1.1"
    assert check(seen), seen


def test_pipelined_valid_then_malformed_answers_the_first_and_forwards_only_it(guard):
    origin = guard.origin
    origin.reset()
    before = origin.bytes_received
    first = build_request("POST", "/first", body=b"hello")
    with RawClient(guard.proxy.address(), timeout=5) as client:
        client.send(first + b"GET /second HTTP/1.1\r\n\r\n")  # no Host
        assert client.read_response().json()["target"] == "/first"
        response = client.read_response()
        assert response.status == 400 and response.closes
        assert client.wait_closed(5) in ("eof", "reset")
    time.sleep(0.02)
    assert [r.target for r in origin.requests] == ["/first"]
    assert b"/second" not in b"".join(bytes(c.raw) for c in origin.connections)
    assert origin.bytes_received - before < 2 * len(first) + 200


def test_body_bytes_after_a_content_length_are_the_next_request(guard):
    """CL says 5: what follows is parsed as a request of its own (and refused here),
    never forwarded as part of the first one."""
    origin = guard.origin
    origin.reset()
    data = req(b"Content-Length: 5", body=b"helloGET /smuggled HTTP/1.1\r\nX: y\r\n\r\n")
    with RawClient(guard.proxy.address(), timeout=5) as client:
        client.send(data)
        first = client.read_response().json()
        assert first["body"] == "hello"
        second = client.read_response()
        assert second.status == 400  # the second request has no Host
        assert client.wait_closed(5) in ("eof", "reset")
    time.sleep(0.02)
    assert [r.target for r in origin.requests] == ["/"]
    assert b"smuggled" not in b"".join(bytes(c.raw) for c in origin.connections)


def test_chunked_body_ends_at_the_last_chunk(guard):
    """After `0\\r\\n\\r\\n` the next bytes are a new request, whatever a CL-reading
    hop would have thought."""
    origin = guard.origin
    origin.reset()
    data = (chunked(b"5\r\nhello\r\n0\r\n\r\n")
            + b"GET /next HTTP/1.1\r\nHost: example.com\r\n\r\n")
    with RawClient(guard.proxy.address(), timeout=5) as client:
        client.send(data)
        assert client.read_response().json()["body"] == "hello"
        assert client.read_response().json()["target"] == "/next"
    assert [r.target for r in origin.requests] == ["/", "/next"]
    assert [r.body for r in origin.requests] == [b"hello", b""]


def test_nothing_after_a_connection_close_request_is_served(guard):
    """A request that says Connection: close is the last one: bytes behind it on the same
    connection are neither answered nor forwarded."""
    origin = guard.origin
    origin.reset()
    data = (get(b"Connection: close", target=b"/last")
            + get(target=b"/ignored") + req(b"Content-Length: 5", body=b"hello"))
    with RawClient(guard.proxy.address(), timeout=5) as client:
        client.send(data)
        response = client.read_response()
        assert response.json()["target"] == "/last" and response.closes
        assert client.wait_closed(5) in ("eof", "reset")
        assert b"HTTP/1.1" not in client.buffer  # no second response
    time.sleep(0.02)
    assert [r.target for r in origin.requests] == ["/last"]
    assert b"/ignored" not in b"".join(bytes(c.raw) for c in origin.connections)
