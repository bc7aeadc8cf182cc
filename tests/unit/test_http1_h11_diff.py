"""proxy._core.http1 against h11, the reference HTTP/1.1 implementation.

Valid messages (hypothesis-generated, with tabs, obs-text, chunk extensions,
trailers and every fragmentation) must parse the same in both; a message h11
refuses must be refused here too. This parser is deliberately stricter than h11
in these ways (each is pinned by a test below, so the list stays true):

- bare LF line endings (h11 accepts LF alone);
- obs-fold (h11 unfolds it);
- CTLs other than HTAB, and DEL, in field values (h11 only refuses NUL and
  whitespace CTLs);
- `#`, or a target that is not origin-, absolute-, authority- (CONNECT only)
  or asterisk-form (OPTIONS only); http/https absolute-form only;
- Host values that are not `host[:port]`;
- a second Content-Length, even an equal one, and "5, 5" lists (h11 merges);
- Content-Length together with Transfer-Encoding (h11 lets TE win);
- Transfer-Encoding on HTTP/1.0;
- versions other than 1.0/1.1 (h11 accepts any `HTTP/d.d`), status codes
  outside 100..599;
- chunk extensions that do not match RFC 9112 7.1.1 and whitespace after a
  chunk size (h11 accepts anything after ';' and trailing OWS); chunk sizes
  over 16 hex digits (h11: 20).

And more lenient, both as RFC 9112 allows:
- one empty line before the request line is skipped (RFC 9112 2.2; h11 0.16
  refuses it);
- BWS before ';' in a chunk extension (RFC 9112 7.1.1; h11 refuses it).
"""

from __future__ import annotations

import h11
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from proxy._core.http1 import (
    BODY_CHUNKED,
    BODY_LENGTH,
    BODY_NONE,
    BODY_UNTIL_CLOSE,
    ChunkedScanner,
    Limits,
    ProtocolError,
    parse_request,
    parse_response,
)

LIMITS = Limits()
SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------
# Generators of valid messages

TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
SPECIAL = {"host", "content-length", "transfer-encoding", "connection", "upgrade", "expect", "te",
           "trailer", "keep-alive", "proxy-connection"}

token = st.text(TCHAR, min_size=1, max_size=12)
field_name = token.filter(lambda s: s.lower() not in SPECIAL).map(str.encode)
trailer_name = field_name
VALUE_BYTES = [bytes([c]) for c in [*range(0x21, 0x7F), *range(0x80, 0x100)]]
OWS = st.sampled_from([b"", b" ", b"\t", b"  ", b" \t", b"\t \t"])


@st.composite
def field_value(draw) -> tuple[bytes, bytes]:
    """(raw value with its surrounding OWS, the trimmed value)."""
    parts = draw(st.lists(st.one_of(st.sampled_from(VALUE_BYTES), st.sampled_from([b" ", b"\t"])), max_size=24))
    value = b"".join(parts).strip(b" \t")
    return draw(OWS) + value + draw(OWS), value


TARGET_CHARS = "".join(chr(c) for c in range(0x21, 0x7F) if c != 0x23)
origin_target = st.text(TARGET_CHARS, max_size=40).map(lambda s: b"/" + s.encode())
absolute_target = st.builds(
    lambda scheme, host, port, path: scheme + b"://" + host + port + path,
    st.sampled_from([b"http", b"https", b"HTTP"]),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789-.", min_size=1, max_size=12).map(str.encode),
    st.sampled_from([b"", b":80", b":8443"]),
    st.one_of(st.just(b""), origin_target),
)
METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD", b"OPTIONS", b"TRACE"]


@st.composite
def chunked_body(draw) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
    """(wire bytes, payload, trailers) of a chunked body, extensions without BWS."""
    ext_value = st.one_of(
        token.map(str.encode),
        st.lists(st.sampled_from([b" ", b"\t", b"!", b"#", b"a", b"\xe9", b"\\\"", b"\\\\", b";", b",", b"="]),
                 max_size=6).map(lambda parts: b'"' + b"".join(parts) + b'"'),
    )
    ext = st.lists(st.tuples(token.map(str.encode), st.one_of(st.none(), ext_value)), max_size=3).map(
        lambda items: b"".join(b";" + n + (b"" if v is None else b"=" + v) for n, v in items))
    wire, payload = [], []
    for data in draw(st.lists(st.binary(min_size=1, max_size=40), max_size=5)):
        size = b"%x" % len(data)
        if draw(st.booleans()):
            size = size.upper()
        size = b"0" * draw(st.integers(0, 16 - len(size))) + size
        wire.append(size + draw(ext) + b"\r\n" + data + b"\r\n")
        payload.append(data)
    trailers = []
    trailer_lines = b""
    for name in draw(st.lists(trailer_name, max_size=3)):
        raw, value = draw(field_value())
        trailers.append((name, value))
        trailer_lines += name + b":" + raw + b"\r\n"
    wire.append(b"0" + draw(ext) + b"\r\n" + trailer_lines + b"\r\n")
    return b"".join(wire), b"".join(payload), trailers


@st.composite
def request(draw) -> dict:
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.0"]))
    method = draw(st.one_of(st.sampled_from(METHODS), token.map(str.encode).filter(lambda m: m != b"CONNECT")))
    form = draw(st.sampled_from(["origin", "origin", "absolute", "asterisk"]))
    if form == "asterisk":
        method, target = b"OPTIONS", b"*"
    else:
        target = draw(origin_target if form == "origin" else absolute_target)
    fields = []
    for name in draw(st.lists(field_name, max_size=8)):
        raw, value = draw(field_value())
        fields.append((name, raw, value))
    if version == b"1.1" or draw(st.booleans()):
        host = draw(st.sampled_from([b"a", b"svc.local:8080", b"[::1]", b""]))
        fields.insert(draw(st.integers(0, len(fields))), (draw(st.sampled_from([b"Host", b"host", b"HOST"])), host, host))
    kind = draw(st.sampled_from(["none", "length", "chunked"] if version == b"1.1" else ["none", "length"]))
    body, payload, trailers = b"", b"", []
    if kind == "length":
        payload = body = draw(st.binary(max_size=64))
        fields.insert(draw(st.integers(0, len(fields))), (b"Content-Length", b"%d" % len(body), b"%d" % len(body)))
    elif kind == "chunked":
        body, payload, trailers = draw(chunked_body())
        te = draw(st.sampled_from([b"chunked", b"Chunked", b"CHUNKED"]))
        fields.insert(draw(st.integers(0, len(fields))), (b"Transfer-Encoding", te, te))
    head = method + b" " + target + b" HTTP/" + version + b"\r\n"
    head += b"".join(name + b":" + raw + b"\r\n" for name, raw, _ in fields) + b"\r\n"
    return dict(method=method, target=target, version=version, head=head, body=body, payload=payload,
                headers=[(name, value) for name, _, value in fields], trailers=trailers, kind=kind)


# ---------------------------------------------------------------------------
# Running both parsers

def h11_request(data: bytes, pieces: int = 1):
    """("ok", (method, target, version, headers, payload, trailers)) | ("error", msg) | ("incomplete", None)."""
    conn = h11.Connection(h11.SERVER)
    step = max(1, len(data) // pieces)
    chunks = [data[i:i + step] for i in range(0, len(data), step)] or [b""]
    request, payload = None, []
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    break
                if isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    payload.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    return "ok", (request.method, request.target, request.http_version,
                                  list(request.headers.raw_items()), b"".join(payload),
                                  list(event.headers.raw_items()))
                else:   # PAUSED and the like: not produced by the generators
                    return "other", event
    except h11.RemoteProtocolError as exc:
        return "error", str(exc)
    return "incomplete", None


def dechunk(wire: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Payload and trailers of a chunked body already validated by ChunkedScanner."""
    payload, pos = [], 0
    while True:
        eol = wire.index(b"\r\n", pos)
        size = int(wire[pos:eol].split(b";")[0].strip(b" \t"), 16)
        pos = eol + 2
        if size == 0:
            break
        payload.append(wire[pos:pos + size])
        pos += size + 2
    trailers = []
    while wire[pos:pos + 2] != b"\r\n":
        eol = wire.index(b"\r\n", pos)
        name, _, value = wire[pos:eol].partition(b":")
        trailers.append((name, value.strip(b" \t")))
        pos = eol + 2
    return b"".join(payload), trailers


def ours_request(data: bytes):
    """The same outcome shape as h11_request, from proxy._core.http1."""
    try:
        head = parse_request(data, 0, len(data), LIMITS)
        if head is None:
            return "incomplete", None
        rest = len(data) - head.size
        if head.chunked:
            scanner = ChunkedScanner(LIMITS)
            used = scanner.scan(data, head.size, len(data))
            if not scanner.done:
                return "incomplete", None
            payload, trailers = dechunk(data[head.size:head.size + used])
        else:
            length = max(head.content_length, 0)
            if rest < length:
                return "incomplete", None
            payload, trailers = data[head.size:head.size + length], []
    except ProtocolError as exc:
        return "error", str(exc)
    version = b"%d.%d" % divmod(head.version, 10)
    headers = [(n, v.lower() if n.lower() == b"transfer-encoding" else v) for n, v in head.headers]
    return "ok", (head.method, head.target, version, headers, payload, trailers)


def h11_view(message: dict):
    headers = [(n, v.lower() if n.lower() == b"transfer-encoding" else v) for n, v in message["headers"]]
    return (message["method"], message["target"], message["version"], headers, message["payload"],
            message["trailers"])


# ---------------------------------------------------------------------------
# Valid requests: same result in both, whatever the fragmentation

@SETTINGS
@given(message=request(), pieces=st.integers(1, 6))
def test_valid_requests_agree(message, pieces):
    data = message["head"] + message["body"]
    expected = h11_view(message)
    assert h11_request(data, pieces) == ("ok", expected)
    assert ours_request(data) == ("ok", expected)


@SETTINGS
@given(message=request())
def test_valid_requests_at_every_split_point(message):
    head, body = message["head"], message["body"]
    data = head + body + b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
    for cut in range(len(head)):
        assert parse_request(data, 0, cut, LIMITS) is None
    parsed = parse_request(data, 0, len(data), LIMITS)
    assert parsed.size == len(head)
    if message["kind"] == "chunked":
        for cut in range(len(head), len(head) + len(body) + 1):
            scanner = ChunkedScanner(LIMITS)
            first = scanner.scan(data, len(head), cut)
            second = scanner.scan(data, cut, len(data))
            assert first + second == len(body) and scanner.done
    following = parse_request(data, len(head) + len(body), len(data), LIMITS)
    assert following.target == b"/next"


@SETTINGS
@given(message=request())
def test_round_trip_through_serialize_agrees_with_h11(message):
    parsed = parse_request(message["head"], 0, len(message["head"]), LIMITS)
    outcome, result = h11_request(parsed.serialize() + message["body"])
    assert outcome == "ok"
    assert result[0] == message["method"]
    assert result[4] == message["payload"]


# ---------------------------------------------------------------------------
# Mutated requests: whatever h11 refuses is refused here too

INTERESTING = [0x00, 0x01, 0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20, 0x22, 0x23, 0x2C, 0x2D, 0x2F, 0x30, 0x3A, 0x3B,
               0x3D, 0x41, 0x5F, 0x61, 0x7F, 0x80, 0x85, 0xA0, 0xFF]


@st.composite
def mutated(draw, base) -> bytes:
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(1, 2))):
        pos = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["insert", "replace", "delete"]))
        byte = draw(st.sampled_from(INTERESTING))
        if op == "insert" or pos == len(data):
            data.insert(pos, byte)
        elif op == "replace":
            data[pos] = byte
        else:
            del data[pos]
    return bytes(data)


def _plain_request(message: dict) -> bytes:
    return message["head"] + message["body"]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=mutated(request().filter(lambda m: b";" not in m["body"]).map(_plain_request)))
def test_mutated_requests_refused_when_h11_refuses(data):
    theirs = h11_request(data)
    assume(theirs[0] != "other")
    ours = ours_request(data)
    if theirs[0] == "error":
        assert ours[0] == "error", (data, theirs)
    if theirs[0] == "ok" and ours[0] == "ok":
        assert ours == theirs, data


# ---------------------------------------------------------------------------
# Responses

@st.composite
def response(draw) -> dict:
    method = draw(st.sampled_from([b"GET", b"GET", b"POST", b"HEAD"]))
    status = draw(st.one_of(st.integers(200, 599), st.sampled_from([200, 204, 304])))
    reason = b"".join(draw(st.lists(st.one_of(st.sampled_from(VALUE_BYTES), st.just(b" "), st.just(b"\t")),
                                    max_size=20)))
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.0"]))
    fields = []
    for name in draw(st.lists(field_name, max_size=6)):
        raw, value = draw(field_value())
        fields.append((name, raw, value))
    no_body = method == b"HEAD" or status in (204, 304)
    kinds = ["length", "until_close"] + (["chunked"] if version == b"1.1" else [])
    kind = draw(st.sampled_from(kinds))
    body, payload, trailers = b"", b"", []
    if kind == "length":
        length = draw(st.binary(max_size=64))
        if not no_body:
            payload = body = length
        fields.insert(draw(st.integers(0, len(fields))), (b"Content-Length", b"%d" % len(length), b"%d" % len(length)))
    elif kind == "chunked":
        wire, chunk_payload, chunk_trailers = draw(chunked_body())
        if not no_body:
            body, payload, trailers = wire, chunk_payload, chunk_trailers
        fields.insert(draw(st.integers(0, len(fields))), (b"Transfer-Encoding", b"chunked", b"chunked"))
    elif not no_body:
        payload = body = draw(st.binary(max_size=64))
    if reason:
        line = b"HTTP/" + version + b" %d " % status + reason
    else:
        line = b"HTTP/" + version + b" %d" % status + draw(st.sampled_from([b"", b" "]))
    head = line + b"\r\n" + b"".join(n + b":" + raw + b"\r\n" for n, raw, _ in fields) + b"\r\n"
    return dict(method=method, status=status, reason=reason, version=version, head=head, body=body,
                payload=payload, trailers=trailers, headers=[(n, v) for n, _, v in fields],
                kind="none" if no_body else kind)


def h11_response(method: bytes, data: bytes, eof: bool):
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method=method, target="/", headers=[("Host", "a")]))
    conn.send(h11.EndOfMessage())
    response, payload = None, []
    try:
        conn.receive_data(data)
        if eof:
            conn.receive_data(b"")
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                return "incomplete", None
            if isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                payload.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return "ok", (response.status_code, response.reason, response.http_version,
                              list(response.headers.raw_items()), b"".join(payload), list(event.headers.raw_items()))
            else:
                return "other", event
    except h11.RemoteProtocolError as exc:
        return "error", str(exc)


def ours_response(method: bytes, data: bytes):
    """Outcome of parsing a response that ends where `data` ends: the connection
    closes there, so an incomplete message is an error (as h11 says on EOF)."""
    try:
        head = parse_response(data, 0, len(data), LIMITS, method)
        if head is None:
            return "error", "closed before the end of the head"
        trailers = []
        if head.body == BODY_NONE:
            payload = b""
        elif head.body == BODY_LENGTH:
            if len(data) - head.size < head.content_length:
                return "error", "closed before the end of the body"
            payload = data[head.size:head.size + head.content_length]
        elif head.body == BODY_CHUNKED:
            scanner = ChunkedScanner(LIMITS, response=True)
            used = scanner.scan(data, head.size, len(data))
            if not scanner.done:
                return "error", "closed before the end of the chunked body"
            payload, trailers = dechunk(data[head.size:head.size + used])
        else:
            assert head.body == BODY_UNTIL_CLOSE and not head.keep_alive
            payload = data[head.size:]
    except ProtocolError as exc:
        assert (exc.status, exc.code) in ((502, "bad_response"), (502, "bad_chunk"))
        return "error", str(exc)
    return "ok", (head.status, head.reason, b"%d.%d" % divmod(head.version, 10), head.headers, payload, trailers)


@SETTINGS
@given(message=response())
def test_valid_responses_agree(message):
    data = message["head"] + message["body"]
    expected = (message["status"], message["reason"], message["version"], message["headers"],
                message["payload"], message["trailers"])
    assert h11_response(message["method"], data, eof=True) == ("ok", expected)
    assert ours_response(message["method"], data) == ("ok", expected)
    head = parse_response(data, 0, len(data), LIMITS, message["method"])
    assert head.body == {"none": BODY_NONE, "length": BODY_LENGTH, "chunked": BODY_CHUNKED,
                         "until_close": BODY_UNTIL_CLOSE}[message["kind"]]
    for cut in range(len(message["head"])):
        assert parse_response(data, 0, cut, LIMITS, message["method"]) is None


def _plain_response(message: dict) -> tuple[bytes, bytes]:
    return message["method"], message["head"] + message["body"]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=response().filter(lambda m: b";" not in m["body"]), data=st.data())
def test_mutated_responses_refused_when_h11_refuses(message, data):
    method = message["method"]
    wire = data.draw(mutated(st.just(message["head"] + message["body"])))
    theirs = h11_response(method, wire, eof=True)
    assume(theirs[0] != "other")
    ours = ours_response(method, wire)
    if theirs[0] == "error":
        assert ours[0] == "error", (wire, theirs)
    if theirs[0] == "ok" and ours[0] == "ok":
        assert ours == theirs, wire


# ---------------------------------------------------------------------------
# The documented differences, pinned

STRICTER = [
    ("bare-lf", b"GET / HTTP/1.1\nHost: a\n\n"),
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n 2\r\n\r\n"),
    ("ctl-in-value", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n"),
    ("del-in-value", b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x7f\r\n\r\n"),
    ("fragment", b"GET /#x HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("relative-target", b"GET x HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("bad-host", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n"),
    ("equal-duplicate-CL", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx"),
    ("CL-list", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\nx"),
    ("CL-and-TE", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("http-2.0", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n"),
    ("chunk-trailing-ows", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1 \r\nx\r\n0\r\n\r\n"),
    ("chunk-ext-garbage", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1;a b\r\nx\r\n0\r\n\r\n"),
    ("chunk-size-17-digits",
     b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n00000000000000001\r\nx\r\n0\r\n\r\n"),
]


@pytest.mark.parametrize("data", [row[1] for row in STRICTER], ids=[row[0] for row in STRICTER])
def test_stricter_than_h11(data):
    assert h11_request(data)[0] == "ok"
    assert ours_request(data)[0] == "error"


def test_stricter_than_h11_on_status_codes():
    assert h11_response(b"GET", b"HTTP/1.1 600 X\r\nContent-Length: 0\r\n\r\n", eof=False)[0] == "ok"
    assert ours_response(b"GET", b"HTTP/1.1 600 X\r\nContent-Length: 0\r\n\r\n")[0] == "error"


LENIENT = [
    ("leading-empty-line", b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n"),
    ("chunk-ext-bws", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n1 ;a=b\r\nx\r\n0\r\n\r\n"),
]


@pytest.mark.parametrize("data", [row[1] for row in LENIENT], ids=[row[0] for row in LENIENT])
def test_more_lenient_than_h11_as_the_rfc_allows(data):
    assert h11_request(data)[0] == "error"
    assert ours_request(data)[0] == "ok"
