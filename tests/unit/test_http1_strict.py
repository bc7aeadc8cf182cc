"""proxy._core.http1: what the strict parser refuses, and the unusual input it must accept.

One table per class of malformed input. Vectors marked "Garden N" / "Garden T-N" are
HTTP Garden server / transducer trophies, rewritten; "Envoy" ones mirror Envoy's
integration tests (TestSmuggling, BadFirstline, MissingDelimiter, ...).
"""

from __future__ import annotations

import pickle

import pytest

from proxy._core.http1 import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    BODY_UNTIL_CLOSE,
    MAX_CHUNK_LINE,
    ChunkedScanner,
    Limits,
    ProtocolError,
    RequestHead,
    parse_request,
    parse_response,
)

LIMITS = Limits()
OK = b"GET / HTTP/1.1\r\nHost: a\r\n"


def req(data: bytes, limits: Limits = LIMITS) -> RequestHead | None:
    return parse_request(data, 0, len(data), limits)


def resp(data: bytes, method: bytes = b"GET", limits: Limits = LIMITS):
    return parse_response(data, 0, len(data), limits, method)


def refused(call, *args) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        call(*args)
    return info.value


def scan_all(body: bytes, limits: Limits = LIMITS, response: bool = False) -> tuple[int, bool]:
    scanner = ChunkedScanner(limits, response=response)
    return scanner.scan(body, 0, len(body)), scanner.done


def cases(table):
    return pytest.mark.parametrize("data,status,code", [row[1:] for row in table], ids=[row[0] for row in table])


# ---------------------------------------------------------------------------
# Request line

REQUEST_LINE = [
    ("double-space", b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    ("space-before-version-twice", b"GET /  HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    ("trailing-space", b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n", 400, "bad_request"),
    ("leading-space", b" GET / HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    ("tab-separator", b"GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    ("tab-before-version", b"GET /\tHTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    ("Envoy-InvalidCharacterInFirstline", b"GE(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    ("Envoy-BadFirstline", b"hello\r\n\r\n", 400, "bad_request"),
    ("http-0.9", b"GET /\r\n\r\n", 400, "bad_request"),
    ("missing-target", b"GET HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    ("Garden-6-method-prefix", b'G=":<>(e),[T];?" /get HTTP/1.1\r\n\r\n', 400, "bad_request"),
    ("Garden-7-bad-target", b"GET ! HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    ("Garden-9-lf-separator", b"GET /\nHTTP/1.1\r\n\r\n", 400, "bad_request"),
    ("Garden-40-nul-method", b"\x00 / HTTP/............0596.7407.\r\n\r\n", 400, "bad_request"),
    ("space-in-target", b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    ("del-in-target", b"GET /a\x7fb HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    ("nul-in-target", b"GET /a\x00b HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    ("obs-text-in-target", b"GET /caf\xc3\xa9 HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    ("fragment-in-target", b"GET /a#frag HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    ("asterisk-without-options", b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    ("connect-origin-form", b"CONNECT / HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    ("connect-without-port", b"CONNECT example.com HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    ("connect-empty-port", b"CONNECT example.com: HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    ("connect-absolute", b"CONNECT http://a:80 HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    ("connect-userinfo", b"CONNECT u@a:443 HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    ("authority-form-without-connect", b"GET example.com:80 HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    ("Envoy-UnknownSchemeRejected", b"GET hps://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    ("ftp-scheme", b"GET ftp://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    ("absolute-empty-host", b"GET http:///x HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    ("absolute-userinfo", b"GET http://user@a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    ("absolute-bad-port", b"GET http://a:8x/ HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    ("relative-target", b"GET foo HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    ("query-only-target", b"GET ?a=b HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    ("two-leading-empty-lines", b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    ("leading-bare-lf", b"\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    ("leading-bare-cr", b"\rGET / HTTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_request"),
    ("request-line-bare-lf", b"GET / HTTP/1.1\nHost: a\r\n\r\n", 400, "bad_request"),
    ("request-line-cr-cr-lf", b"GET / HTTP/1.1\r\r\nHost: a\r\n\r\n", 400, "bad_request"),
    ("Garden-T16-all-bare-lf", b"GET / HTTP/1.1\nHost: whatever\nConnection: close\n\n", 400, "bad_request"),
]

VERSION = [
    ("Envoy-InvalidVersion-1.01", b"GET / HTTP/1.01\r\nHost: a\r\n\r\n", 400, "bad_version"),
    ("version-too-long", b"GET / HTTP/1.1x\r\nHost: a\r\n\r\n", 400, "bad_version"),
    ("lowercase-http", b"GET / http/1.1\r\nHost: a\r\n\r\n", 400, "bad_version"),
    ("no-minor", b"GET / HTTP/1\r\nHost: a\r\n\r\n", 400, "bad_version"),
    ("no-dot", b"GET / HTTP/11\r\nHost: a\r\n\r\n", 400, "bad_version"),
    ("Garden-5-longest-prefix", b"GET /test HTTP/1.32\r\n\r\n", 400, "bad_version"),
    ("Garden-24-overflow", b"GET / HTTP/4294967295.255\r\n\r\n", 400, "bad_version"),
    ("Garden-15-cr-in-version", b"GET / HTTP/\r\r1.1\r\n\r\n", 400, "bad_request"),
    ("not-http", b"GET / FTP/1.1\r\nHost: a\r\n\r\n", 400, "bad_version"),
    ("http-2.0", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505, "bad_version"),
    ("http-1.2", b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 505, "bad_version"),
    ("http-0.9-versioned", b"GET / HTTP/0.9\r\nHost: a\r\n\r\n", 505, "bad_version"),
    ("http-3.0", b"GET / HTTP/3.0\r\nHost: a\r\n\r\n", 505, "bad_version"),
    ("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505, "bad_version"),
]


@cases(REQUEST_LINE + VERSION)
def test_request_line_refused(data, status, code):
    exc = refused(req, data)
    assert (exc.status, exc.code) == (status, code), str(exc)


def test_garbage_is_refused_before_the_line_ends():
    # A TLS ClientHello on a plaintext port: refused at once, not after a timeout.
    exc = refused(req, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    assert exc.status == 400
    assert refused(req, b"GET /\x00").status == 400
    assert req(b"GET / HTTP/1.") is None


# ---------------------------------------------------------------------------
# Field lines

FIELD_SYNTAX = [
    ("obs-fold-space", OK + b"X: 1\r\n 2\r\n\r\n"),
    ("obs-fold-tab", OK + b"X: 1\r\n\t2\r\n\r\n"),
    ("Garden-4-ws-before-first-field", b"GET / HTTP/1.1\r\n\tContent-Length: 1\r\nHost: a\r\n\r\nX"),
    ("Envoy-leading-tab-transfer-encoding", b"POST / HTTP/1.1\r\nHost: a\r\n\ttransfer-encoding: chunked\r\n\r\n"),
    ("space-before-first-field", b"GET / HTTP/1.1\r\n Host: a\r\n\r\n"),
    ("Garden-3-space-before-colon", OK + b"Content-Length : 34\r\n\r\n"),
    ("TE-space-before-colon", OK + b"Transfer-Encoding : chunked\r\n\r\n"),
    ("tab-before-colon", OK + b"X\t: y\r\n\r\n"),
    ("Garden-18-empty-name", b"GET / HTTP/1.1\r\n: ignored\r\nHost: whatever\r\n\r\n"),
    ("Garden-27-empty-name-and-value", b"GET / HTTP/1.1\r\n:\r\nI: am chopped off\r\n\r\n"),
    ("Garden-28-no-colon", b"GET / HTTP/1.1\r\nContent-Length 10\r\n\r\n0123456789"),
    ("Envoy-MissingDelimiter", OK + b"foo bar\r\n\r\n"),
    ("Garden-37-name-continued", OK + b"Transfer-\r\nEncoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"),
    ("Garden-8-high-bit-name", b"GET / HTTP/1.1\r\n\xefoo: bar\r\nHost: a\r\n\r\n"),
    ("Garden-20-x85-before-colon", OK + b"Content-Length\x85: 10\r\n\r\n0123456789"),
    ("Garden-T6-xa0-in-name", OK + b"Header\xa0: value\r\n\r\n"),
    ("Garden-14-nul-in-name", OK + b"\x00a: b\r\n\r\n"),
    ("ctl-in-name", OK + b"a\x01b: c\r\n\r\n"),
    ("paren-in-name", OK + b"a(b: c\r\n\r\n"),
    ("slash-in-name", OK + b"a/b: c\r\n\r\n"),
    ("at-in-name", OK + b"a@b: c\r\n\r\n"),
    ("quote-in-name", OK + b'a"b: c\r\n\r\n'),
    ("bracket-in-name", OK + b"[a]: c\r\n\r\n"),
    ("brace-in-name", OK + b"{a}: c\r\n\r\n"),
    ("equals-in-name", OK + b"a=b: c\r\n\r\n"),
    ("semicolon-in-name", OK + b"a;b: c\r\n\r\n"),
    ("comma-in-name", OK + b"a,b: c\r\n\r\n"),
    ("question-in-name", OK + b"a?b: c\r\n\r\n"),
    ("backslash-in-name", OK + b"a\\b: c\r\n\r\n"),
    ("del-in-name", OK + b"a\x7fb: c\r\n\r\n"),
    ("Garden-2-nul-and-cr-in-value", OK + b"Header: v\x00\ralue\r\n\r\n"),
    ("Garden-35-nul-in-value", OK + b"Test: test\x00THESE BYTES GET DROPPED\r\nConnection: close\r\n\r\n"),
    ("Garden-43-trailing-nul", OK + b"Evil: evil\x00\r\n\r\n"),
    ("Garden-T12-nul-in-host", b"GET / HTTP/1.1\r\nHost: google.com\x00.kallus.org\r\n\r\n"),
    ("Garden-34-bare-cr-in-value", OK + b"Header: va\rlue\r\n\r\n"),
    ("Garden-13-cr-as-terminator", OK + b"Visible: :/\rSmuggled: :)\r\n\r\n"),
    ("Garden-T10-crs-in-value", OK + b"Invalid-Header: this\rvalue\ris\rinvalid\r\n\r\n"),
    ("Garden-19-bare-lf-empty-value", OK + b"Useless:\n\nGET / HTTP/1.1\r\n\r\n"),
    ("Garden-T14-lf-in-name", OK + b"Te\nst: test\r\nConnection: close\r\n\r\n"),
    ("Garden-T20-nul-line", OK + b"a:b\r\nc\x00\r\n\r\n"),
    ("Garden-30-cr-x-after-section", OK + b"\rZGET /evil: HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("bare-lf-after-value", OK + b"X: y\n\r\n"),
    ("bare-lf-final-line", OK + b"X: y\r\n\n"),
    ("ctl-0x01-in-value", OK + b"X: a\x01b\r\n\r\n"),
    ("ctl-vt-in-value", OK + b"X: a\x0bb\r\n\r\n"),
    ("ctl-ff-in-value", OK + b"X: a\x0cb\r\n\r\n"),
    ("ctl-0x1f-in-value", OK + b"X: a\x1fb\r\n\r\n"),
    ("del-in-value", OK + b"X: a\x7fb\r\n\r\n"),
    ("esc-in-value", OK + b"X: \x1b[31m\r\n\r\n"),
]


@pytest.mark.parametrize("data", [row[1] for row in FIELD_SYNTAX], ids=[row[0] for row in FIELD_SYNTAX])
def test_field_syntax_refused(data):
    exc = refused(req, data)
    assert (exc.status, exc.code) == (400, "bad_request"), str(exc)


def test_field_errors_name_the_problem():
    assert "obs-fold" in str(refused(req, OK + b"X: 1\r\n 2\r\n\r\n"))
    assert "colon" in str(refused(req, OK + b"X : 1\r\n\r\n"))
    assert "NUL" in str(refused(req, OK + b"X: \x00\r\n\r\n"))
    assert "bare LF" in str(refused(req, OK + b"X: 1\n\r\n"))
    assert "empty header field name" in str(refused(req, OK + b": 1\r\n\r\n"))


# ---------------------------------------------------------------------------
# Content-Length

CONTENT_LENGTH = [
    ("plus", b"+1"),
    ("minus", b"-1"),
    ("Garden-26-negative", b"-48"),
    ("underscore", b"1_0"),
    ("Garden-10-plus-underscore", b"+1_0"),
    ("Garden-T1-hex", b"0x10"),
    ("Garden-29-trailing-garbage", b"1Z"),
    ("Garden-16-empty", b""),
    ("only-spaces", b"   "),
    ("space-inside", b"1 2"),
    ("decimal-point", b"1.0"),
    ("exponent", b"1e3"),
    ("arabic-digit", "\u0661".encode()),
    ("list-equal", b"5, 5"),
    ("list-no-space", b"5,5"),
    ("list-differing", b"5, 6"),
    ("list-trailing-comma", b"5,"),
    ("overflow-2**63", b"9223372036854775808"),
    ("overflow-huge", b"99999999999999999999999999"),
]


@pytest.mark.parametrize("value", [row[1] for row in CONTENT_LENGTH], ids=[row[0] for row in CONTENT_LENGTH])
def test_content_length_value_refused(value):
    exc = refused(req, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: " + value + b"\r\n\r\n")
    assert (exc.status, exc.code) == (400, "bad_request"), str(exc)


FRAMING = [
    ("Garden-23-duplicate-CL-1-0", b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 0\r\n\r\nZ"),
    ("Garden-33-duplicate-CL-0-1", b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nContent-Length: 1\r\n\r\nZ"),
    ("Garden-42-empty-then-CL", b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: \r\nContent-Length: 43\r\n\r\n"),
    ("duplicate-CL-equal", b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"),
    ("CL.TE", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG"),
    ("TE.CL", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n5c\r\n"),
    ("Garden-T23-CL-and-TE", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("Garden-21-comma-chunked-with-CL",
     b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: ,chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"),
    ("CL-and-obfuscated-TE", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: xchunked\r\n\r\n"),
    ("Garden-11-TE-twice", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ("Envoy-TE-split-over-two-fields",
     b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ("TE-on-HTTP/1.0", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
]


@pytest.mark.parametrize("data", [row[1] for row in FRAMING], ids=[row[0] for row in FRAMING])
def test_ambiguous_framing_refused(data):
    exc = refused(req, data)
    assert (exc.status, exc.code) == (400, "bad_request"), str(exc)


# ---------------------------------------------------------------------------
# Transfer-Encoding values (alone: no Content-Length)

TRANSFER_ENCODING = [
    ("xchunked", b"xchunked", 400, "bad_request"),
    ("chunked-identity", b"chunked, identity", 400, "bad_request"),
    ("chunked-gzip", b"chunked, gzip", 400, "bad_request"),
    ("gzip-alone", b"gzip", 400, "bad_request"),
    ("Garden-44-unknown-alone", b"blegh", 400, "bad_request"),
    ("chunked-twice-in-list", b"chunked, chunked", 400, "bad_request"),
    ("Garden-21-leading-comma", b",chunked", 400, "bad_request"),
    ("trailing-comma", b"chunked,", 400, "bad_request"),
    ("double-comma", b"gzip,,chunked", 400, "bad_request"),
    ("empty", b"", 400, "bad_request"),
    ("vt-prefix", b"\x0bchunked", 400, "bad_request"),
    ("vt-suffix", b"chunked\x0b", 400, "bad_request"),
    ("ff-prefix", b"\x0cchunked", 400, "bad_request"),
    ("nul-suffix", b"chunked\x00", 400, "bad_request"),
    ("cr-suffix", b"chunked\r", 400, "bad_request"),
    ("Garden-12-nbsp", b"\xa0chunked\xa0", 400, "bad_request"),
    ("Garden-46-xff", b"\xffchunked\xff", 400, "bad_request"),
    ("x85-prefix", b"\x85chunked", 400, "bad_request"),
    ("quoted", b'"chunked"', 400, "bad_request"),
    ("parameter", b"chunked;q=1", 400, "bad_request"),
    ("truncated", b"chunk", 400, "bad_request"),
    ("suffixed", b"chunkedx", 400, "bad_request"),
    ("inner-space", b"ch unked", 400, "bad_request"),
    ("Envoy-identity-chunked", b"identity, chunked", 501, "unsupported_transfer_coding"),
    ("gzip-chunked", b"gzip, chunked", 501, "unsupported_transfer_coding"),
    ("deflate-chunked", b"deflate,chunked", 501, "unsupported_transfer_coding"),
    ("unknown-then-chunked", b"foo, chunked", 501, "unsupported_transfer_coding"),
]


@cases(TRANSFER_ENCODING)
def test_transfer_encoding_refused(data, status, code):
    exc = refused(req, b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: " + data + b"\r\n\r\n")
    assert (exc.status, exc.code) == (status, code), str(exc)


@pytest.mark.parametrize("value", [b"chunked", b"Chunked", b"CHUNKED", b"cHuNkEd", b"  chunked  ", b"\tchunked\t"])
def test_transfer_encoding_is_a_case_insensitive_token(value):
    head = req(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:" + value + b"\r\n\r\n")
    assert head.chunked and head.content_length == -1


def test_transfer_encoding_lookalike_names_are_plain_fields():
    # Not framing: forwarded as ordinary fields, and the request has no body.
    for name in (b"Transfer_Encoding", b"Transfer-Encodings", b"XTransfer-Encoding", b"Content-Encoding"):
        head = req(b"POST / HTTP/1.1\r\nHost: a\r\n" + name + b": chunked\r\n\r\n")
        assert not head.chunked and head.content_length == -1


# ---------------------------------------------------------------------------
# Host

HOST = [
    ("Envoy-NoHost", b"GET / HTTP/1.1\r\n\r\n"),
    ("absolute-form-without-host", b"GET http://a/ HTTP/1.1\r\n\r\n"),
    ("duplicate-equal", b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n"),
    ("duplicate-differing", b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n"),
    ("space", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n"),
    ("slash", b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n"),
    ("userinfo", b"GET / HTTP/1.1\r\nHost: user@a\r\n\r\n"),
    ("port-letters", b"GET / HTTP/1.1\r\nHost: a:port\r\n\r\n"),
    ("port-too-long", b"GET / HTTP/1.1\r\nHost: a:123456\r\n\r\n"),
    ("two-ports", b"GET / HTTP/1.1\r\nHost: a:80:90\r\n\r\n"),
    ("unclosed-ipv6", b"GET / HTTP/1.1\r\nHost: [::1\r\n\r\n"),
    ("empty-ipv6", b"GET / HTTP/1.1\r\nHost: []\r\n\r\n"),
    ("port-only", b"GET / HTTP/1.1\r\nHost: :80\r\n\r\n"),
    ("obs-text", b"GET / HTTP/1.1\r\nHost: b\xc3\xbccher.example\r\n\r\n"),
    ("bad-pct", b"GET / HTTP/1.1\r\nHost: a%zz\r\n\r\n"),
    ("quote", b'GET / HTTP/1.1\r\nHost: "a"\r\n\r\n'),
]


@pytest.mark.parametrize("data", [row[1] for row in HOST], ids=[row[0] for row in HOST])
def test_host_refused(data):
    exc = refused(req, data)
    assert (exc.status, exc.code) == (400, "bad_request"), str(exc)


@pytest.mark.parametrize("value", [b"a", b"example.com:8080", b"127.0.0.1", b"[::1]:8080", b"[fe80::1%25eth0]",
                                   b"xn--bcher-kva.example", b"a_b.example", b"EXAMPLE.com", b"a:", b""])
def test_host_accepted(value):
    head = req(b"GET / HTTP/1.1\r\nHost: " + value + b"\r\n\r\n")
    assert head.host == value


def test_pipelined_request_without_host_refused_after_a_good_one():
    # Envoy's Pipeline test: the first request is served, the second refused.
    data = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\n\r\n"
    first = req(data)
    assert first is not None
    exc = refused(parse_request, data, first.size, len(data), LIMITS)
    assert exc.status == 400


# ---------------------------------------------------------------------------
# Limits: at the value and at value + 1

SMALL = Limits(max_request_line=64, max_header_bytes=128, max_headers=4)


def test_request_line_limit():
    prefix, suffix = b"GET /", b" HTTP/1.1"
    at_limit = prefix + b"a" * (64 - len(prefix) - len(suffix)) + suffix
    assert len(at_limit) == 64
    assert req(at_limit + b"\r\nHost: a\r\n\r\n", SMALL).target.startswith(b"/aaa")
    over = prefix + b"a" * (65 - len(prefix) - len(suffix)) + suffix
    exc = refused(req, over + b"\r\nHost: a\r\n\r\n", SMALL)
    assert (exc.status, exc.code) == (414, "request_line_too_long")


def test_request_line_limit_while_incomplete():
    assert req(b"GET /" + b"a" * 59, SMALL) is None            # 64 bytes, no CR yet: could still fit
    assert req(b"GET /" + b"a" * 50 + b" HTTP/1.1\r", SMALL) is None
    exc = refused(req, b"GET /" + b"a" * 60, SMALL)            # 65 bytes before any CR
    assert (exc.status, exc.code) == (414, "request_line_too_long")


def test_header_section_limit():
    line = b"GET / HTTP/1.1\r\n"
    fixed = len(b"Host: a\r\nX: \r\n\r\n")
    at_limit = b"Host: a\r\nX: " + b"v" * (128 - fixed) + b"\r\n\r\n"
    assert len(at_limit) == 128
    assert req(line + at_limit, SMALL) is not None
    over = b"Host: a\r\nX: " + b"v" * (129 - fixed) + b"\r\n\r\n"
    exc = refused(req, line + over, SMALL)
    assert (exc.status, exc.code) == (431, "headers_too_large")


def test_header_section_limit_while_incomplete():
    line = b"GET / HTTP/1.1\r\n"
    seen = b"Host: a\r\nX: "
    assert req(line + seen + b"v" * (127 - len(seen)), SMALL) is None     # 127 bytes: could still fit
    exc = refused(req, line + seen + b"v" * (128 - len(seen)), SMALL)     # 128 and more to come
    assert (exc.status, exc.code) == (431, "headers_too_large")


def test_header_count_limit():
    four = b"GET / HTTP/1.1\r\nHost: a\r\nA: 1\r\nB: 2\r\nC: 3\r\n"
    assert len(req(four + b"\r\n", SMALL).headers) == 4
    exc = refused(req, four + b"D: 4\r\n\r\n", SMALL)
    assert (exc.status, exc.code) == (431, "too_many_headers")
    exc = refused(req, four + b"D: 4\r\n", SMALL)          # raised before the head is complete
    assert (exc.status, exc.code) == (431, "too_many_headers")


def test_default_limits_are_envoys():
    limits = Limits()
    assert (limits.max_request_line, limits.max_header_bytes, limits.max_headers) == (8192, 61440, 100)
    assert pickle.loads(pickle.dumps(limits)).max_headers == 100
    with pytest.raises(ValueError):
        Limits(max_headers=0)


def test_limits_apply_to_responses_as_bad_response():
    exc = refused(resp, b"HTTP/1.1 200 " + b"x" * 100 + b"\r\n\r\n", b"GET", SMALL)
    assert (exc.status, exc.code) == (502, "bad_response")
    exc = refused(resp, b"HTTP/1.1 200 OK\r\n" + b"A: 1\r\n" * 5 + b"\r\n", b"GET", SMALL)
    assert (exc.status, exc.code) == (502, "bad_response")


# ---------------------------------------------------------------------------
# Valid but unusual requests

def test_tabs_and_spaces_around_values_are_trimmed():
    head = req(OK + b"X-A:\t v \t\r\nX-B:v\r\nX-C: a \t b\r\n\r\n")
    assert head.get(b"x-a") == b"v"
    assert head.get(b"x-b") == b"v"
    assert head.get(b"x-c") == b"a \t b"


def test_empty_values():
    head = req(OK + b"X-Empty:\r\nX-Blank: \t \r\n\r\n")
    assert head.get(b"x-empty") == b""
    assert head.get(b"x-blank") == b""
    assert head.get(b"x-missing") is None


def test_obs_text_in_values():
    head = req(OK + b"X-Name: caf\xc3\xa9 \x80\xff\r\nX-Nbsp: \xa0chunked\xa0\r\n\r\n")
    assert head.get(b"x-name") == b"caf\xc3\xa9 \x80\xff"
    assert head.get(b"x-nbsp") == b"\xa0chunked\xa0"
    assert not head.chunked


def test_many_headers_up_to_the_limit():
    fields = b"".join(b"X-%d: %d\r\n" % (i, i) for i in range(99))
    head = req(OK + fields + b"\r\n")
    assert len(head.headers) == 100
    assert head.get_all(b"x-98") == [b"98"]


def test_long_target_up_to_the_limit():
    target = b"/" + b"a/b?c=d&" * 1000
    line = b"GET " + target + b" HTTP/1.1"
    limits = Limits(max_request_line=len(line))
    head = req(line + b"\r\nHost: a\r\n\r\n", limits)
    assert head.target == target
    assert head.path == b"/a/b"


def test_legal_target_characters():
    target = b"/a-._~!$&'()*+,;=:@%20/?q=/?:@!$&'()*+,;=%7E[]{}|^`\"<>\\"
    head = req(b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert head.target == target


@pytest.mark.parametrize("method", [b"GET", b"M-SEARCH", b"PROPFIND", b"X_CUSTOM", b"get", b"A!#$%&'*+.^_`|~9"])
def test_token_methods(method):
    assert req(method + b" / HTTP/1.1\r\nHost: a\r\n\r\n").method == method


def test_underscore_and_symbol_header_names():
    head = req(OK + b"X_Foo: 1\r\n!#$%&'*+-.^_`|~: 2\r\n\r\n")
    assert head.get(b"x_foo") == b"1"
    assert head.get(b"!#$%&'*+-.^_`|~") == b"2"


def test_one_leading_empty_line_is_skipped():
    data = b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"
    head = req(data)
    assert head.size == len(data)
    assert head.method == b"GET"
    assert req(b"\r") is None
    assert req(b"\r\n") is None


def test_leading_zeros_in_content_length():
    head = req(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 007\r\n\r\n")
    assert head.content_length == 7
    assert head.get(b"content-length") == b"007"
    assert b"Content-Length: 7\r\n" in head.serialize()
    assert req(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0000\r\n\r\n").content_length == 0


def test_largest_content_length():
    head = req(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 9223372036854775807\r\n\r\n")
    assert head.content_length == 2**63 - 1


def test_absolute_form_authority_wins_over_host():
    head = req(b"GET http://Upstream.example:8080/p/q?x=1 HTTP/1.1\r\nHost: other.example\r\n\r\n")
    assert head.target == b"http://Upstream.example:8080/p/q?x=1"
    assert head.host == b"Upstream.example:8080"
    assert head.path == b"/p/q"
    assert head.get(b"host") == b"other.example"


@pytest.mark.parametrize("target,path", [(b"https://a", b"/"), (b"HTTP://a?x", b"/"), (b"http://[::1]:80/z", b"/z")])
def test_absolute_form_paths(target, path):
    assert req(b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n").path == path


def test_options_asterisk_and_connect():
    head = req(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (head.target, head.path, head.host) == (b"*", b"*", b"a")
    head = req(b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n")
    assert (head.method, head.target, head.path, head.host) == (b"CONNECT", b"db.internal:5432", b"", b"db.internal:5432")
    head = req(b"CONNECT [::1]:443 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert head.host == b"[::1]:443"


def test_http10_without_host():
    head = req(b"GET / HTTP/1.0\r\n\r\n")
    assert head.version == 10 and head.host is None and not head.keep_alive


@pytest.mark.parametrize("version,connection,keep_alive", [
    (b"1.1", None, True),
    (b"1.1", b"close", False),
    (b"1.1", b"Keep-Alive", True),
    (b"1.1", b"keep-alive, CLOSE", False),
    (b"1.0", None, False),
    (b"1.0", b"keep-alive", True),
    (b"1.0", b"Keep-Alive, close", False),
    (b"1.0", b"x-other", False),
])
def test_keep_alive(version, connection, keep_alive):
    data = b"GET / HTTP/" + version + b"\r\nHost: a\r\n"
    if connection is not None:
        data += b"Connection: " + connection + b"\r\n"
    assert req(data + b"\r\n").keep_alive is keep_alive


def test_connection_with_empty_elements_and_invalid_options():
    assert not req(OK + b"Connection: , close ,,\r\n\r\n").keep_alive
    assert refused(req, OK + b"Connection: close; x\r\n\r\n").status == 400
    assert refused(req, OK + b'Connection: "close"\r\n\r\n').status == 400


def test_expect_continue():
    assert req(OK + b"Expect: 100-continue\r\n\r\n").expect_continue
    assert req(OK + b"Expect: 100-Continue\r\n\r\n").expect_continue
    assert not req(OK + b"Expect: something-else\r\n\r\n").expect_continue
    assert not req(OK + b"\r\n").expect_continue
    assert not req(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n").expect_continue


def test_upgrade():
    head = req(OK + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert head.upgrade == b"websocket"
    assert req(OK + b"Upgrade: websocket\r\n\r\n").upgrade is None             # not a Connection option
    assert req(OK + b"Connection: upgrade\r\n\r\n").upgrade is None            # nothing offered
    assert req(b"GET / HTTP/1.0\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n").upgrade is None
    head = req(OK + b"Connection: keep-alive, upgrade\r\nUpgrade: a\r\nUpgrade: b/2\r\n\r\n")
    assert head.upgrade == b"a, b/2"


def test_get_is_case_insensitive_and_get_all_keeps_order():
    head = req(OK + b"X-Dup: 1\r\nx-dup: 2\r\nX-DUP: 3\r\n\r\n")
    assert head.get(b"x-dup") == b"1"
    assert head.get(b"X-Dup") == b"1"
    assert head.get_all(b"x-dup") == [b"1", b"2", b"3"]
    assert head.headers[1:] == [(b"X-Dup", b"1"), (b"x-dup", b"2"), (b"X-DUP", b"3")]


def test_pipelined_requests():
    first = b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
    second = b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n"
    third = b"POST /c HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    data = first + second + third + b"GET /d HTTP/1.1\r\nHost: a\r\n\r\n"
    pos, paths = 0, []
    while pos < len(data):
        head = parse_request(data, pos, len(data), LIMITS)
        paths.append(head.path)
        pos += head.size
        if head.chunked:
            scanner = ChunkedScanner(LIMITS)
            pos += scanner.scan(data, pos, len(data))
            assert scanner.done
        elif head.content_length > 0:
            pos += head.content_length
    assert paths == [b"/a", b"/b", b"/c", b"/d"]


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview, lambda b: memoryview(bytes(b)).toreadonly()])
def test_buffer_types_and_offsets(wrap):
    data = b"junk" + OK + b"X: y\r\n\r\n" + b"tail"
    head = parse_request(wrap(data), 4, len(data) - 4, LIMITS)
    assert head.size == len(data) - 8
    assert head.get(b"x") == b"y"
    with pytest.raises(ValueError):
        parse_request(wrap(data), 4, len(data) + 1, LIMITS)
    with pytest.raises(ValueError):
        parse_request(wrap(data), 5, 4, LIMITS)


def test_head_survives_buffer_reuse():
    buf = bytearray(OK + b"X-Keep: value\r\n\r\n")
    head = parse_request(buf, 0, len(buf), LIMITS)
    buf[:] = b"\x00" * len(buf)
    del buf[10:]
    assert head.get(b"x-keep") == b"value"
    assert head.method == b"GET" and head.host == b"a"
    assert head.serialize().startswith(b"GET / HTTP/1.1\r\nHost: a\r\n")


def test_incomplete_at_every_split_point():
    data = b"\r\nPOST /p?q HTTP/1.1\r\nHost: a\r\nX:\tv\r\nContent-Length: 3\r\n\r\n"
    for cut in range(len(data)):
        assert parse_request(data, 0, cut, LIMITS) is None, cut
    assert parse_request(data, 0, len(data), LIMITS).size == len(data)


def test_heads_are_made_by_the_parser_only():
    with pytest.raises(TypeError):
        RequestHead()


def test_protocol_error_pickles():
    exc = pickle.loads(pickle.dumps(ProtocolError("too big", 431, "headers_too_large")))
    assert (str(exc), exc.status, exc.code) == ("too big", 431, "headers_too_large")


# ---------------------------------------------------------------------------
# Responses

RESPONSES = [
    ("F6-letter-O-status", b"HTTP/1.1 2OO OK\r\n\r\n"),
    ("binary", b"\x00\x01\x02\x03\r\n\r\n"),
    ("two-digit-status", b"HTTP/1.1 20 OK\r\n\r\n"),
    ("four-digit-status", b"HTTP/1.1 2000 OK\r\n\r\n"),
    ("status-below-100", b"HTTP/1.1 099 Odd\r\n\r\n"),
    ("status-above-599", b"HTTP/1.1 600 Odd\r\n\r\n"),
    ("status-no-space-reason", b"HTTP/1.1 200OK\r\n\r\n"),
    ("double-space", b"HTTP/1.1  200 OK\r\n\r\n"),
    ("http-2.0", b"HTTP/2.0 200 OK\r\n\r\n"),
    ("http-1.2", b"HTTP/1.2 200 OK\r\n\r\n"),
    ("lowercase-http", b"http/1.1 200 OK\r\n\r\n"),
    ("nul-in-reason", b"HTTP/1.1 200 O\x00K\r\n\r\n"),
    ("bare-lf-status-line", b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n"),
    ("bare-lf-field", b"HTTP/1.1 200 OK\r\nContent-Length: 0\n\r\n"),
    ("obs-fold", b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n"),
    ("space-before-colon", b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n"),
    ("CL-and-TE", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ("duplicate-CL", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"),
    ("bad-CL", b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"),
    ("TE-gzip", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"),
    ("TE-gzip-chunked", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
    ("TE-twice", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ("TE-on-1.0", b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ("two-leading-empty-lines", b"\r\n\r\nHTTP/1.1 200 OK\r\n\r\n"),
    ("leading-space", b" HTTP/1.1 200 OK\r\n\r\n"),
]


@pytest.mark.parametrize("data", [row[1] for row in RESPONSES], ids=[row[0] for row in RESPONSES])
def test_response_refused(data):
    exc = refused(resp, data)
    assert (exc.status, exc.code) == (502, "bad_response"), str(exc)


@pytest.mark.parametrize("head,method,body,keep_alive", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n", b"GET", BODY_LENGTH, True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n", b"GET", BODY_CHUNKED, True),
    (b"HTTP/1.1 200 OK\r\n", b"GET", BODY_UNTIL_CLOSE, False),
    (b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n", b"POST", BODY_UNTIL_CLOSE, False),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n", b"HEAD", BODY_NONE, True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n", b"HEAD", BODY_NONE, True),
    (b"HTTP/1.1 200 OK\r\n", b"HEAD", BODY_NONE, True),
    (b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n", b"GET", BODY_NONE, True),
    (b"HTTP/1.1 204 No Content\r\n", b"DELETE", BODY_NONE, True),
    (b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n", b"GET", BODY_NONE, True),
    (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\n", b"GET", BODY_NONE, True),
    (b"HTTP/1.1 100 Continue\r\n", b"POST", BODY_NONE, True),
    (b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n", b"GET", BODY_NONE, True),
    (b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n", b"GET", BODY_NONE, False),
    (b"HTTP/1.1 200 Connection Established\r\n", b"CONNECT", BODY_NONE, False),
    (b"HTTP/1.1 407 Proxy Auth\r\nContent-Length: 0\r\n", b"CONNECT", BODY_LENGTH, True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n", b"GET", BODY_LENGTH, False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n", b"GET", BODY_LENGTH, False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n", b"GET", BODY_LENGTH, True),
    (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n", b"GET", BODY_UNTIL_CLOSE, False),
    (b"HTTP/1.1 599 Custom\r\nContent-Length: 0\r\n", b"GET", BODY_LENGTH, True),
])
def test_response_body_and_keep_alive(head, method, body, keep_alive):
    parsed = resp(head + b"\r\n", method)
    assert (parsed.body, parsed.keep_alive) == (body, keep_alive)


def test_response_fields():
    parsed = resp(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert parsed.upgrade == b"websocket"
    parsed = resp(b"HTTP/1.1 200 OK\r\nContent-Length: 0012\r\n\r\n", b"HEAD")
    assert (parsed.status, parsed.reason, parsed.version, parsed.content_length) == (200, b"OK", 11, 12)
    assert resp(b"HTTP/1.1 200\r\n\r\n").reason == b""
    assert resp(b"HTTP/1.1 200 \r\n\r\n").reason == b""
    assert resp(b"HTTP/1.1 404 Not\tFound \xe9t\xe9\r\n\r\n").reason == b"Not\tFound \xe9t\xe9"
    assert resp(b"\r\nHTTP/1.1 200 OK\r\n\r\n").status == 200


def test_response_incomplete_at_every_split_point():
    data = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n"
    for cut in range(len(data)):
        assert parse_response(data, 0, cut, LIMITS, b"GET") is None
    assert parse_response(data, 0, len(data), LIMITS, b"GET").size == len(data)


# ---------------------------------------------------------------------------
# Chunked bodies

CHUNKED_BAD = [
    ("0x-prefix", b"0x5\r\nhello\r\n0\r\n\r\n"),
    ("Garden-1-underscore", b"0_2e\r\n\r\n"),
    ("plus", b"+5\r\nhello\r\n0\r\n\r\n"),
    ("minus", b"-5\r\nhello\r\n0\r\n\r\n"),
    ("Garden-T19-minus-0x", b"-0x0\r\n\r\n"),
    ("leading-space", b" 5\r\nhello\r\n0\r\n\r\n"),
    ("Garden-T24-many-leading-spaces", b"           0\r\n\r\n"),
    ("trailing-space", b"5 \r\nhello\r\n0\r\n\r\n"),
    ("trailing-tab", b"5\t\r\nhello\r\n0\r\n\r\n"),
    ("Garden-17-empty-size", b"\r\n\r\n"),
    ("Garden-T2-letters", b"Z\r\nZZ\r\nZZZ\r\n\r\n"),
    ("Garden-47-invalid", b"INVALID!!!\r\n"),
    ("Garden-T7-trailing-garbage", b"1these-bytes-never-get-validated\r\nZ\r\n0\r\n\r\n"),
    ("17-hex-digits", b"00000000000000001\r\nZ\r\n0\r\n\r\n"),
    ("2**64", b"10000000000000000\r\n"),
    ("2**63", b"8000000000000000\r\n"),
    ("absurdly-long", b"f" * 100 + b"\r\n"),
    ("data-not-followed-by-crlf", b"5\r\nhelloX\r\n0\r\n\r\n"),
    ("data-followed-by-cr-only", b"5\r\nhello\r0\r\n\r\n"),
    ("Garden-T13-bare-lf-after-data", b"a\r\n0123456789\n0\r\n\r\n"),
    ("bare-lf-after-size", b"5\nhello\r\n0\r\n\r\n"),
    ("bare-lf-after-last-chunk", b"0\n\r\n"),
    ("Garden-31-cr-cr", b"5\r\r;ABCD\r\n34\r\nE\r\n0\r\n\r\n"),
    ("Garden-36-ext-cr-cr", b"41;a=b\r\rXXXX\r\n0\r\n\r\n"),
    ("Garden-T3-cr-before-ext", b"2\r\r;a\r\n02\r\n41\r\n0\r\n\r\n"),
    ("Garden-T4-cr-digit-lf", b"1\r0\n"),
    ("extra-crlf-between-chunks", b"5\r\nhello\r\n\r\n0\r\n\r\n"),
    ("Garden-T17-extra-crlf", b"17\r\n0\r\n\r\nGET / HTTP/1.1\r\n\r\n\r\n\r\n0\r\n\r\n"),
    ("ext-empty-name", b"5;\r\nhello\r\n0\r\n\r\n"),
    ("ext-no-name", b"5;=x\r\nhello\r\n0\r\n\r\n"),
    ("ext-empty-value", b"5;a=\r\nhello\r\n0\r\n\r\n"),
    ("ext-unterminated-quote", b'5;a="x\r\nhello\r\n0\r\n\r\n'),
    ("ext-after-quote", b'5;a="x"y\r\nhello\r\n0\r\n\r\n'),
    ("ext-space-in-name", b"5;a b\r\nhello\r\n0\r\n\r\n"),
    ("ext-space-in-value", b"5;a=b c\r\nhello\r\n0\r\n\r\n"),
    ("ext-trailing-space", b"5;a=b \r\nhello\r\n0\r\n\r\n"),
    ("ext-nul", b"5;a=\x00\r\nhello\r\n0\r\n\r\n"),
    ("ext-quoted-del", b'5;a="\x7f"\r\nhello\r\n0\r\n\r\n'),
    ("ext-quoted-pair-nul", b'5;a="\\\x00"\r\nhello\r\n0\r\n\r\n'),
    ("ext-quoted-cr", b'5;a="\r"\r\nhello\r\n0\r\n\r\n'),
    ("ext-obs-text-token", b"5;a=\xff\r\nhello\r\n0\r\n\r\n"),
    ("size-line-too-long", b"1;" + b"a" * MAX_CHUNK_LINE + b"\r\nZ\r\n0\r\n\r\n"),
    ("trailer-obs-fold", b"0\r\nX: a\r\n b\r\n\r\n"),
    ("trailer-space-before-colon", b"0\r\nX : a\r\n\r\n"),
    ("trailer-empty-name", b"0\r\n: a\r\n\r\n"),
    ("trailer-no-colon", b"0\r\nno colon here\r\n\r\n"),
    ("trailer-nul-in-name", b"0\r\nX\x00: a\r\n\r\n"),
    ("trailer-nul-in-value", b"0\r\nX: a\x00b\r\n\r\n"),
    ("trailer-cr-in-value", b"0\r\nX: a\rb\r\n\r\n"),
    ("trailer-bare-lf", b"0\r\nX: a\n\r\n"),
    ("trailer-high-bit-name", b"0\r\nX\xff: a\r\n\r\n"),
    ("trailer-content-length", b"0\r\nContent-Length: 5\r\n\r\n"),
    ("trailer-transfer-encoding", b"0\r\ntransfer-encoding: chunked\r\n\r\n"),
    ("trailer-host", b"0\r\nHOST: evil\r\n\r\n"),
    ("final-bare-cr", b"0\r\n\rX"),
]


@pytest.mark.parametrize("body", [row[1] for row in CHUNKED_BAD], ids=[row[0] for row in CHUNKED_BAD])
def test_chunked_refused(body):
    exc = refused(scan_all, body)
    assert (exc.status, exc.code) == (400, "bad_chunk"), str(exc)


@pytest.mark.parametrize("body", [row[1] for row in CHUNKED_BAD], ids=[row[0] for row in CHUNKED_BAD])
def test_chunked_refused_byte_by_byte(body):
    scanner = ChunkedScanner(LIMITS)
    with pytest.raises(ProtocolError):
        for i in range(len(body)):
            scanner.scan(body, i, i + 1)
    with pytest.raises(ProtocolError):      # stays failed
        scanner.scan(b"0\r\n\r\n", 0, 5)


def test_chunked_refused_in_a_response_is_502():
    exc = refused(scan_all, b"0x5\r\n", LIMITS, True)
    assert (exc.status, exc.code) == (502, "bad_chunk")


def test_trailer_limits():
    limits = Limits(max_header_bytes=32, max_headers=2)
    ok = b"0\r\nA: 1\r\nB: 2\r\n\r\n"
    assert scan_all(ok, limits) == (len(ok), True)
    assert refused(scan_all, b"0\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n", limits).code == "bad_chunk"
    at_limit = b"0\r\nA: " + b"v" * (32 - 7) + b"\r\n\r\n"
    assert scan_all(at_limit, limits) == (len(at_limit), True)
    over = b"0\r\nA: " + b"v" * (32 - 6) + b"\r\n\r\n"
    assert "too large" in str(refused(scan_all, over, limits))


CHUNKED_GOOD = [
    ("simple", b"5\r\nhello\r\n0\r\n\r\n"),
    ("uppercase-hex", b"A\r\n0123456789\r\n0\r\n\r\n"),
    ("lowercase-hex", b"a\r\n0123456789\r\n0\r\n\r\n"),
    ("leading-zeros-16-digits", b"0000000000000005\r\nhello\r\n0000000000000000\r\n\r\n"),
    ("ext-token", b"5;a=b\r\nhello\r\n0\r\n\r\n"),
    ("ext-name-only", b"5;a\r\nhello\r\n0;last\r\n\r\n"),
    ("ext-several", b"5;a;b=c;d=\"e\"\r\nhello\r\n0\r\n\r\n"),
    ("ext-bws-before-semicolon", b"5 ;a=b\r\nhello\r\n0\t;z\r\n\r\n"),
    ("ext-bws-everywhere", b"5 ; a = b ; c\r\nhello\r\n0\r\n\r\n"),
    ("ext-bws-after-quoted", b'5;a="b" ;c\r\nhello\r\n0\r\n\r\n'),
    ("ext-quoted-specials", b'5;a="x y \\" z;,=\xe9\t"\r\nhello\r\n0\r\n\r\n'),
    ("ext-empty-quoted", b'5;a=""\r\nhello\r\n0\r\n\r\n'),
    ("trailers", b"5\r\nhello\r\n0\r\nX-Checksum: abc\r\nX-Empty:\r\nX-Tab:\tv\t\r\n\r\n"),
    ("Garden-39-trailer-looks-like-request", b"0\r\nX:POST / HTTP/1.1\r\n\r\n"),
    ("trailer-obs-text", b"0\r\nX: \xa0\xff\r\n\r\n"),
    ("data-with-crlf-inside", b"4\r\n\r\n\r\n\r\n0\r\n\r\n"),
    ("last-chunk-only", b"0\r\n\r\n"),
]


@pytest.mark.parametrize("body", [row[1] for row in CHUNKED_GOOD], ids=[row[0] for row in CHUNKED_GOOD])
def test_chunked_accepted_at_every_split(body):
    tail = b"GET / HTTP/1.1\r\n"
    data = body + tail
    assert scan_all(data) == (len(body), True)
    for cut in range(len(body) + 1):
        scanner = ChunkedScanner(LIMITS)
        first = scanner.scan(data, 0, cut)
        assert first == cut and scanner.done is (cut == len(body))
        assert scanner.scan(data, cut, len(data)) == len(body) - cut
        assert scanner.done
        assert scanner.scan(data, len(body), len(data)) == 0


def test_chunked_byte_by_byte():
    body = b"3;x=\"1\"\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nT: v\r\n\r\n"
    scanner = ChunkedScanner(LIMITS)
    total = sum(scanner.scan(body, i, i + 1) for i in range(len(body)))
    assert total == len(body) and scanner.done


def test_largest_chunk_size_and_remaining():
    scanner = ChunkedScanner(LIMITS)
    head = b"7fffffffffffffff\r\n"
    assert scanner.scan(head + b"x" * 10, 0, len(head) + 10) == len(head) + 10
    assert scanner.remaining == 2**63 - 1 - 10
    assert not scanner.done


def test_scanner_reset_and_buffers():
    scanner = ChunkedScanner(LIMITS)
    body = b"1\r\nZ\r\n0\r\n\r\n"
    for wrap in (bytes, bytearray, memoryview):
        scanner.reset()
        assert scanner.scan(wrap(b"xx" + body), 2, len(body) + 2) == len(body)
        assert scanner.done


def test_stub_matches_the_module():
    import ast
    from pathlib import Path

    import proxy._core.http1 as module

    stub = Path(module.__file__).with_name("http1.pyi")
    tree = ast.parse(stub.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    names.discard("Buffer")
    assert names - set(dir(module)) == set()
    assert set(module.__all__) <= names
