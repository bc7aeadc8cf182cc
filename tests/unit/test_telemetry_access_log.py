"""Access log lines: JSON and template rendering, template checks, and which requests are logged."""

from __future__ import annotations

import datetime
import json
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.telemetry.access_log import (
    FIELDS,
    TCP_FIELDS,
    AccessLogFilter,
    AccessRecord,
    compile_format,
    json_line,
    rfc3339_ms,
    validate_format,
)

START = 1714564800.25  # 2024-05-01T12:00:00.250Z


def served(**changes) -> AccessRecord:
    """A request proxied to an upstream that answered 200."""
    record = AccessRecord(START, "http-in", "api", "web", "127.0.0.1:9001", b"GET", b"example.com",
                          b"/api/users?id=7", "HTTP/1.1", 200, None, 84, 1500, 2.5, 1.75, 1,
                          b"5f1c0de9aa01b2c3-00000001", b"4bf92f3577b34da6a3ce929d0e0e4736",
                          b"10.1.2.3", "spiffe://mesh.local/ns/default/sa/web")
    return record._replace(**changes)


def parsed(line: str) -> dict:
    assert "\n" not in line and "\r" not in line
    return json.loads(line)


# -- JSON -----------------------------------------------------------------------------------


def test_a_served_request_has_every_field_in_order():
    line = json_line(served())
    entry = parsed(line)
    assert list(entry) == list(FIELDS)
    assert entry == {
        "time": "2024-05-01T12:00:00.250Z", "listener": "http-in", "route": "api", "cluster": "web",
        "endpoint": "127.0.0.1:9001", "method": "GET", "authority": "example.com",
        "path": "/api/users?id=7", "protocol": "HTTP/1.1", "status": 200, "error": None,
        "bytes_in": 84, "bytes_out": 1500, "duration_ms": 2.5, "upstream_ms": 1.75, "attempts": 1,
        "request_id": "5f1c0de9aa01b2c3-00000001", "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "peer": "10.1.2.3", "peer_identity": "spiffe://mesh.local/ns/default/sa/web",
    }
    assert " " not in line  # compact


def test_a_local_reply_carries_its_error_code_and_no_upstream():
    entry = parsed(json_line(AccessRecord(START, "http-in", method=b"GET", path=b"/nowhere",
                                          status=404, error="no_route", duration_ms=0.04)))
    assert list(entry) == list(FIELDS)
    assert (entry["status"], entry["error"], entry["attempts"]) == (404, "no_route", 0)
    assert entry["route"] is entry["cluster"] is entry["endpoint"] is entry["upstream_ms"] is None


def test_a_retried_request_counts_its_attempts():
    entry = parsed(json_line(served(status=503, error="connect_refused", attempts=3, upstream_ms=None)))
    assert (entry["status"], entry["error"], entry["attempts"], entry["upstream_ms"]) == \
        (503, "connect_refused", 3, None)


def test_a_tcp_connection_has_only_the_fields_of_a_connection():
    record = AccessRecord(START, "db", cluster="pg", endpoint="127.0.0.1:5432", protocol="tcp",
                          bytes_in=10, bytes_out=20, duration_ms=1500.0, peer=b"10.1.2.3")
    entry = parsed(json_line(record))
    assert list(entry) == list(TCP_FIELDS)
    assert entry == {"time": "2024-05-01T12:00:00.250Z", "listener": "db", "cluster": "pg",
                     "endpoint": "127.0.0.1:5432", "protocol": "tcp", "error": None, "bytes_in": 10,
                     "bytes_out": 20, "duration_ms": 1500.0, "peer": "10.1.2.3", "peer_identity": None}
    failed = parsed(json_line(record._replace(endpoint=None, error="connect_refused", bytes_out=0)))
    assert (failed["endpoint"], failed["error"]) == (None, "connect_refused")


def test_hostile_bytes_stay_on_one_valid_line():
    path = b'/a"b\\c\nd\re\x00f\x7f\xff\xfe/\xc3\xa9'
    line = json_line(served(path=path, authority="h\u2028\u00e9".encode()))
    line.encode("ascii")  # everything beyond ASCII is escaped: valid UTF-8 whatever came in
    entry = parsed(line)
    assert entry["path"] == '/a"b\\c\nd\re\x00f\x7f\\xff\\xfe/é'
    assert entry["authority"] == "h\u2028é"


@given(st.lists(st.one_of(st.binary(max_size=40), st.text(max_size=40)), min_size=6, max_size=6))
def test_any_text_makes_one_json_line(values):
    method, authority, path, request_id, trace_id, peer = values
    line = json_line(served(method=method, authority=authority, path=path, request_id=request_id,
                            trace_id=trace_id, peer=peer))
    entry = parsed(line)
    assert list(entry) == list(FIELDS)
    if isinstance(path, str):
        assert entry["path"] == path


def test_times_are_rfc3339_utc_with_milliseconds():
    assert rfc3339_ms(0.0) == "1970-01-01T00:00:00.000Z"
    assert rfc3339_ms(1.9996) == "1970-01-01T00:00:02.000Z"  # rounds, into the next second
    rng = random.Random(9)
    for _ in range(1000):
        t = rng.uniform(0, 4e9)
        expected = datetime.datetime.fromtimestamp(round(t, 3), datetime.UTC)
        assert rfc3339_ms(t) == expected.strftime("%Y-%m-%dT%H:%M:%S.") + f"{expected.microsecond // 1000:03d}Z"


# -- templates ------------------------------------------------------------------------------


def test_a_template_renders_fields_and_literals():
    render = compile_format('{time} {method} {path} {status} {duration_ms}ms "{error}" {{id={request_id}}} 100%')
    assert render(served()) == ('2024-05-01T12:00:00.250Z GET /api/users?id=7 200 2.500ms "-" '
                                "{id=5f1c0de9aa01b2c3-00000001} 100%")


def test_a_template_line_stays_one_line():
    render = compile_format("{method}\t{authority}\t{path}")
    assert render(served(authority=b"a\tb", path=b"/x\r\nforged 200\xff")) == \
        "GET\ta\\x09b\t/x\\x0d\\x0aforged 200\\xff"


def test_a_template_renders_a_tcp_connection():
    render = compile_format("{listener} {protocol} {endpoint} {bytes_in}/{bytes_out} {route}")
    assert render(AccessRecord(START, "db", endpoint="127.0.0.1:5432", protocol="tcp",
                               bytes_in=3, bytes_out=4)) == "db tcp 127.0.0.1:5432 3/4 -"


@pytest.mark.parametrize("spec, error", [
    ("{status} {statsu}", "unknown field {statsu}"),
    ("{duration_ms:.1f}", "{duration_ms}: only plain {name} fields"),
    ("{path!r}", "{path}: only plain {name} fields"),
    ("{path.upper}", "unknown field {path.upper}"),
    ("{0}", "unknown field {0}"),
    ("{}", "unknown field {}"),
    ("status {status", "expected '}' before end of string"),
    ("status } {status}", "Single '}' encountered"),
    ("no fields at all", "names no field"),
    ("{status}\n{path}", "a line break in the template"),
])
def test_template_mistakes_are_named(spec, error):
    errors = validate_format(spec)
    assert len(errors) == 1 and error in errors[0], errors
    with pytest.raises(ValueError, match="."):
        compile_format(spec)


def test_unknown_fields_are_listed_with_the_known_ones():
    assert validate_format("{a} {status} {b}") == [
        f"unknown field {{{name}}}; fields: {', '.join(FIELDS)}" for name in ("a", "b")]


def test_json_and_every_field_are_valid():
    assert validate_format("json") == []
    assert validate_format(" ".join(f"{{{name}}}" for name in FIELDS)) == []


# -- which requests are logged --------------------------------------------------------------


def test_sampling_keeps_a_share():
    assert AccessLogFilter().wants(200, None, 0.999999)
    assert not AccessLogFilter(sample_rate=0.0).wants(500, "upstream_reset", 0.0)
    keep = AccessLogFilter(sample_rate=0.25)
    rng = random.Random(3)
    kept = sum(keep.wants(200, None, rng.random()) for _ in range(20000))
    assert 4600 < kept < 5400


@pytest.mark.parametrize("status, error, logged", [
    (200, None, False), (404, None, False), (499, None, False),
    (404, "no_route", True), (500, None, True), (503, "circuit_open", True),
    (0, None, True),  # no response at all
])
def test_only_errors(status, error, logged):
    assert AccessLogFilter(only="errors").wants(status, error, 0.0) is logged


@pytest.mark.parametrize("status, logged", [(200, False), (399, False), (400, True), (503, True), (0, True)])
def test_min_status(status, logged):
    assert AccessLogFilter(min_status=400).wants(status, None, 0.0) is logged


@pytest.mark.parametrize("keep", [AccessLogFilter(only="errors"), AccessLogFilter(min_status=400)])
def test_a_filtered_tcp_connection_is_kept_for_its_error(keep):
    assert keep.wants(None, "connect_refused", 0.0)
    assert not keep.wants(None, None, 0.0)
    assert AccessLogFilter().wants(None, None, 0.0)


def test_the_filter_comes_before_sampling():
    keep = AccessLogFilter(sample_rate=0.5, only="errors")
    assert keep.wants(502, None, 0.4) and not keep.wants(502, None, 0.6)
    assert not keep.wants(200, None, 0.0)


@pytest.mark.parametrize("changes", [{"sample_rate": 1.5}, {"sample_rate": -0.1}, {"only": "slow"}])
def test_a_bad_filter_is_refused(changes):
    with pytest.raises(ValueError):
        AccessLogFilter(**changes)


@pytest.mark.parametrize("record", [
    served(),
    served(status=503, error="connect_refused", attempts=3, upstream_ms=None),
    served(path="/caf\u00e9?q=\"x\"\\".encode(), authority="h\u2028\u00e9".encode()),
    served(path=b"/a\x00b\x1f\x7f\xff", request_id=None, trace_id="4bf92f3577b34da6a3ce929d0e0e4736"),
    served(peer_identity="spiffe://mesh.local/ns/default/sa/web", duration_ms=0.0004999, upstream_ms=12345.6785),
    served(time=1_700_000_000.9995, route=None, cluster=None, endpoint=None, status=0),
    AccessRecord(START, "tcp-in", None, "db", "127.0.0.1:5432", protocol="tcp", error="idle_timeout",
                 bytes_in=10, bytes_out=20, duration_ms=1.5, peer="127.0.0.1"),
    served(path=b"/" + b"x" * 9000),  # over the C buffer: formatted in Python
])
def test_the_compiled_json_line_is_the_same_line(record):
    from proxy._core.jsonlog import json_line as c_json_line
    from proxy.telemetry.access_log import json_text

    fast = c_json_line(record, json_text)
    assert fast is None or fast == json_line(record)
    assert fast is not None or len(json_line(record)) > 8000
