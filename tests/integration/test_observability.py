"""Access logs and distributed tracing seen from outside (`telemetry:`), with meshproxy as
real processes between real clients, origins and an OTLP/HTTP receiver on 127.0.0.1.

Access log lines are read from the file meshproxy writes and parsed as JSON; what an origin
received (request ids, trace headers) is read at the origin; spans are decoded from what
the receiver was sent with the OpenTelemetry protobuf definitions. Waits poll with
deadlines: the log sink flushes every 0.25 s, the span exporter every second.
"""

from __future__ import annotations

import calendar
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from .faulty_origin import Fault, FaultyOrigin
from .h2_support import H2Client
from .http_support import (
    RawClient,
    Response,
    build_request,
    cluster,
    http_config,
    request,
    route,
)
from .otlp_receiver import OtlpReceiver, ReceivedSpan
from .support import HOST, endpoint, recv_exactly, tcp_config, wait_for

Address = tuple[str, int]

# How long a line may take to reach the file: the sink flushes every 0.25 s.
LINE_WAIT = 1.5
# How long spans may take to reach the receiver: the exporter sends every second.
SPAN_WAIT = 5.0
QUICK_BACKOFF = {"base": "1ms", "max": "5ms"}

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = "00f067aa0ba902b7"
TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")

SERVER_KIND = 2  # opentelemetry.proto.trace.v1.Span.SPAN_KIND_SERVER
CLIENT_KIND = 3  # SPAN_KIND_CLIENT


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def faulty() -> Iterator[Callable[[str], FaultyOrigin]]:
    """`faulty("name")` starts a FaultyOrigin; all are closed after the test."""
    started: list[FaultyOrigin] = []

    def start(name: str) -> FaultyOrigin:
        origin = FaultyOrigin(name)
        started.append(origin)
        return origin

    yield start
    for origin in started:
        origin.close()


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver()
    yield server
    server.close()


# -- helpers ---------------------------------------------------------------------------------


def with_telemetry(config: dict[str, Any], *, access_log: dict[str, Any] | None = None,
                   tracing: dict[str, Any] | None = None) -> dict[str, Any]:
    telemetry: dict[str, Any] = {}
    if access_log is not None:
        telemetry["access_log"] = access_log
    if tracing is not None:
        telemetry["tracing"] = tracing
    return {**config, "telemetry": telemetry}


def to_origin(origin: FaultyOrigin) -> dict[str, Any]:
    """Route `all` (prefix /) to cluster `up` holding `origin`."""
    return http_config([route("all", "up")], [cluster("up", [origin.endpoint])])


def lines_of(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    assert not text or text.endswith("\n"), f"a partial line in {path}: {text[-200:]!r}"
    return text.splitlines()


def wait_lines(path: Path, n: int, timeout: float = LINE_WAIT) -> list[str]:
    """The file's lines once it holds `n`; fails if it holds more, or fewer after `timeout`."""
    lines = wait_for(lambda: len(lines_of(path)) >= n and lines_of(path), timeout,
                     f"{n} lines in {path} (has {len(lines_of(path))})")
    assert len(lines) == n, f"wanted {n} lines, got {len(lines)}:\n" + "\n".join(lines)
    return lines


def wait_records(path: Path, n: int, timeout: float = LINE_WAIT) -> list[dict[str, Any]]:
    return [json.loads(line) for line in wait_lines(path, n, timeout)]


def stays(path: Path, n: int, seconds: float = 0.6) -> None:
    """No further line arrives for `seconds` (more than two flush intervals)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert len(lines_of(path)) == n, "\n".join(lines_of(path))
        time.sleep(0.05)


def get(address: Address, target: str = "/", headers: list[tuple[str, str]] | None = None,
        host: str = "example.com") -> Response:
    return request(address, "GET", target, headers or [], host=host)


def admin_post(proxy: Any, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection(*proxy.admin, timeout=5)
    try:
        conn.request("POST", path)
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


def spans_of_trace(receiver: OtlpReceiver, trace_id: str, n: int,
                   timeout: float = SPAN_WAIT) -> list[ReceivedSpan]:
    """The `n` spans of trace `trace_id` once all arrived (fails on more, or fewer in time)."""
    def of_trace() -> list[ReceivedSpan]:
        return [s for s in receiver.resource_spans() if s.span.trace_id.hex() == trace_id]

    wait_for(lambda: len(of_trace()) >= n, timeout,
             f"{n} spans of trace {trace_id} (got {len(of_trace())}: {describe(of_trace())})", interval=0.05)
    spans = of_trace()
    assert len(spans) == n, describe(spans)
    return spans


def describe(spans: list[ReceivedSpan]) -> str:
    return "; ".join(f"{s.service} kind={s.span.kind} span={s.span.span_id.hex()} "
                     f"parent={s.span.parent_span_id.hex()}" for s in spans)


def one(spans: list[ReceivedSpan], service: str, kind: int) -> ReceivedSpan:
    found = [s for s in spans if s.service == service and s.span.kind == kind]
    assert len(found) == 1, f"one {service} span of kind {kind} wanted: {describe(spans)}"
    return found[0]


def attributes(span: ReceivedSpan) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in span.span.attributes:
        value = kv.value
        out[kv.key] = getattr(value, value.WhichOneof("value"))
    return out


def traceparent(origin: FaultyOrigin, index: int = -1) -> tuple[str, str, str]:
    """(trace id, parent span id, flags) of the traceparent the origin's request carried."""
    seen = origin.requests[index]
    values = [v for n, v in seen.headers if n == "traceparent"]
    assert len(values) == 1, f"one traceparent wanted, origin got {seen.headers}"
    match = TRACEPARENT.fullmatch(values[0])
    assert match, values[0]
    return match.group(1), match.group(2), match.group(3)


# -- access log: what a line says ------------------------------------------------------------


def test_a_proxied_request_makes_one_json_line_with_its_fields(meshproxy, faulty, tmp_path):
    origin = faulty("good")
    log = tmp_path / "access.log"
    proxy = meshproxy(with_telemetry(
        http_config([route("api", "up", prefix="/api")], [cluster("up", [origin.endpoint])]),
        access_log={"path": str(log)}))
    sent = time.time()
    bytes_sent = [build_request("GET", "/api/items", host="shop.example"),
                  build_request("GET", "/api/other", [("x-request-id", "client-id-1")], host="shop.example")]
    responses = []
    for data in bytes_sent:
        with RawClient(proxy.address()) as client:
            client.send(data)
            responses.append(client.read_response())
    assert [r.status for r in responses] == [200, 200]
    records = wait_records(log, 2)
    seen = origin.wait_requests(2)
    generated = seen[0].header("x-request-id")
    assert generated, "the proxy made no x-request-id for a request without one"
    assert seen[1].header("x-request-id") == "client-id-1"

    for record, data, response, path, request_id in zip(
            records, bytes_sent, responses, ["/api/items", "/api/other"], [generated, "client-id-1"], strict=True):
        assert {k: record[k] for k in ("listener", "route", "cluster", "endpoint", "method", "authority",
                                       "path", "protocol", "status", "error", "attempts", "request_id",
                                       "trace_id", "peer_identity")} == {
            "listener": "in", "route": "api", "cluster": "up", "endpoint": origin.endpoint,
            "method": "GET", "authority": "shop.example", "path": path, "protocol": "HTTP/1.1",
            "status": 200, "error": None, "attempts": 1, "request_id": request_id, "trace_id": None,
            "peer_identity": None}, record
        assert record["duration_ms"] > 0
        assert record["upstream_ms"] is not None and 0 < record["upstream_ms"] <= record["duration_ms"]
        assert record["bytes_in"] == len(data), (record, len(data))
        assert record["bytes_out"] == len(response.head) + len(response.body), record
        assert record["peer"] == HOST, record
        stamp = calendar.timegm(time.strptime(record["time"][:19], "%Y-%m-%dT%H:%M:%S"))
        assert record["time"].endswith("Z") and abs(stamp - sent) < 10, record["time"]


def test_proxy_made_errors_are_logged_with_their_error_code(meshproxy, faulty, upstreams, tmp_path):
    origin = faulty("good")
    refused = upstreams.refused()
    log = tmp_path / "access.log"
    proxy = meshproxy(with_telemetry(
        http_config([route("api", "up", prefix="/api"), route("dead", "down", prefix="/dead")],
                    [cluster("up", [origin.endpoint]), cluster("down", [endpoint(refused.address)])]),
        access_log={"path": str(log)}))

    no_route = get(proxy.address(), "/nowhere")
    dead = get(proxy.address(), "/dead/x", [("x-request-id", "dead-1")])
    with RawClient(proxy.address()) as client:
        client.send(b"GET /api HTTP/1.1\r\nHost: example.com\r\nthis is no header\r\n\r\n")
        malformed = client.read_response()
    assert (no_route.status, no_route.error_code) == (404, "no_route")
    assert dead.status in (502, 503) and dead.error_code == "connect_refused", dead.head
    assert malformed.status == 400, malformed.head
    records = wait_records(log, 3)

    no_route_line, dead_line, malformed_line = records
    assert {k: no_route_line[k] for k in ("route", "cluster", "endpoint", "method", "path", "status", "error",
                                          "attempts", "upstream_ms")} == {
        "route": None, "cluster": None, "endpoint": None, "method": "GET", "path": "/nowhere",
        "status": 404, "error": "no_route", "attempts": 0, "upstream_ms": None}, no_route_line
    assert no_route_line["request_id"] == no_route.header("x-request-id")

    assert {k: dead_line[k] for k in ("route", "cluster", "path", "status", "error", "request_id")} == {
        "route": "dead", "cluster": "down", "path": "/dead/x", "status": dead.status,
        "error": "connect_refused", "request_id": "dead-1"}, dead_line
    assert dead_line["upstream_ms"] is None, dead_line  # no response head came from upstream
    assert dead_line["duration_ms"] > 0

    assert malformed_line["status"] == 400 and malformed_line["protocol"] == "HTTP/1.1", malformed_line
    assert malformed_line["error"] == malformed.error_code and malformed_line["error"], malformed_line
    assert malformed_line["route"] is None and malformed_line["attempts"] == 0, malformed_line


def test_a_refused_connect_names_the_endpoint_that_refused(meshproxy, upstreams, tmp_path):
    """The line of a connect_refused 5xx says which endpoint refused (the one a user has to
    look at; with several, the last one tried) and that the request was tried."""
    refused = [endpoint(upstreams.refused().address) for _ in range(2)]
    log = tmp_path / "access.log"
    proxy = meshproxy(with_telemetry(http_config([route("all", "down")], [cluster("down", refused)]),
                                     access_log={"path": str(log)}))
    response = get(proxy.address(), "/x")
    assert response.status in (502, 503) and response.error_code == "connect_refused", response.head
    (record,) = wait_records(log, 1)
    assert record["error"] == "connect_refused", record
    assert record["endpoint"] in refused, record
    assert record["attempts"] >= 1, record


def test_a_retried_request_logs_its_attempts(meshproxy, faulty, tmp_path):
    good, bad, flaky = faulty("good"), faulty("bad"), faulty("flaky")
    bad.set_mode(Fault.ANSWER_503)
    flaky.fail("/flaky", Fault.ANSWER_503, times=1)
    log = tmp_path / "access.log"
    retry = {"attempts": 2, "on": ["5xx"], "backoff": QUICK_BACKOFF}
    config = http_config(
        [{**route("flaky", "one", prefix="/flaky"), "retry": retry}, {**route("all", "two"), "retry": retry}],
        [cluster("one", [flaky.endpoint]), cluster("two", [bad.endpoint, good.endpoint])])
    proxy = meshproxy(with_telemetry(config, access_log={"path": str(log)}))

    # One endpoint, whose first answer is a 503: the retry gets the 200.
    response = get(proxy.address(), "/flaky")
    assert response.status == 200 and response.header("x-origin") == "flaky"
    assert flaky.count("GET", "/flaky") == 2
    (record,) = wait_records(log, 1)
    assert {k: record[k] for k in ("route", "cluster", "endpoint", "status", "error", "attempts")} == {
        "route": "flaky", "cluster": "one", "endpoint": flaky.endpoint, "status": 200, "error": None,
        "attempts": 2}, record

    # Two endpoints, one answering 503: round robin sends it every other first try, and
    # the retry goes to the other one.
    responses = [get(proxy.address(), "/x") for _ in range(4)]
    assert [(r.status, r.header("x-origin")) for r in responses] == [(200, "good")] * 4
    records = wait_records(log, 5)[1:]
    assert {(r["route"], r["cluster"], r["endpoint"], r["status"], r["error"]) for r in records} == {
        ("all", "two", good.endpoint, 200, None)}, records
    attempts = [r["attempts"] for r in records]
    assert set(attempts) <= {1, 2} and 2 in attempts, records
    # Each second attempt is one request the failing endpoint answered with its 503.
    assert attempts.count(2) == bad.count("GET", "/x"), (attempts, bad.count("GET", "/x"))


def test_a_tcp_connection_makes_one_line(meshproxy, upstreams, tmp_path):
    echo = upstreams.echo()
    log = tmp_path / "access.log"
    proxy = meshproxy(with_telemetry(tcp_config([endpoint(echo.address)]), access_log={"path": str(log)}))
    started = time.monotonic()
    with socket.create_connection(proxy.address(), timeout=10) as sock:
        sock.sendall(b"x" * 1000)
        assert recv_exactly(sock, 1000) == b"x" * 1000
        sock.sendall(b"y" * 234)
        assert recv_exactly(sock, 234) == b"y" * 234
        time.sleep(0.2)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(10) == b""
    held_ms = (time.monotonic() - started) * 1e3
    (record,) = wait_records(log, 1)
    assert {k: record.get(k) for k in ("listener", "cluster", "endpoint", "protocol", "error", "bytes_in",
                                       "bytes_out", "peer_identity")} == {
        "listener": "in", "cluster": "up", "endpoint": endpoint(echo.address), "protocol": "tcp",
        "error": None, "bytes_in": 1234, "bytes_out": 1234, "peer_identity": None}, record
    assert 200 <= record["duration_ms"] <= held_ms + 500, (record, held_ms)
    assert "status" not in record and "method" not in record, record
    # The client's address, known from the accept on (the connection is closed by now).
    assert record["peer"] == HOST, record


# -- access log: format and filter -----------------------------------------------------------


def test_a_format_string_gives_exactly_that_line(meshproxy, faulty, tmp_path):
    origin = faulty("good")
    log = tmp_path / "access.log"
    proxy = meshproxy(with_telemetry(
        http_config([route("api", "up", prefix="/api")], [cluster("up", [origin.endpoint])]),
        access_log={"path": str(log), "format": "{method} {path} {status}"}))
    assert get(proxy.address(), "/api/hello").status == 200
    assert request(proxy.address(), "POST", "/nope", body=b"abc").status == 404
    assert wait_lines(log, 2) == ["GET /api/hello 200", "POST /nope 404"]


@pytest.mark.parametrize("fmt", ["{method} {nonsense} {status}", "json-ish {"])
def test_check_rejects_a_bad_format_naming_the_field(faulty, tmp_path, fmt):
    origin = faulty("good")
    config = with_telemetry(to_origin(origin), access_log={"path": str(tmp_path / "a.log"), "format": fmt})
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = subprocess.run([sys.executable, "-m", "proxy.cli", "check", "--config", str(path)],
                            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL, check=False)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "telemetry.access_log.format" in result.stderr, result.stderr
    if "nonsense" in fmt:
        assert "nonsense" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    # The same config with a good format passes.
    config["telemetry"]["access_log"]["format"] = "{method} {path} {status}"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = subprocess.run([sys.executable, "-m", "proxy.cli", "check", "--config", str(path)],
                            capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL, check=False)
    assert result.returncode == 0, result.stderr


def test_only_errors_logs_only_the_failing_requests(meshproxy, faulty, upstreams, tmp_path):
    origin = faulty("good")
    refused = upstreams.refused()
    log = tmp_path / "access.log"
    proxy = meshproxy(with_telemetry(
        http_config([route("api", "up", prefix="/api"), route("dead", "down", prefix="/dead")],
                    [cluster("up", [origin.endpoint]), cluster("down", [endpoint(refused.address)])]),
        access_log={"path": str(log), "only": "errors"}))
    statuses = [get(proxy.address(), target).status for target in ("/api/1", "/nowhere", "/api/2", "/dead", "/api/3")]
    assert statuses[0::2] == [200, 200, 200] and statuses[1] == 404 and statuses[3] in (502, 503)
    records = wait_records(log, 2)
    assert [(r["path"], r["status"], r["error"]) for r in records] == [
        ("/nowhere", 404, "no_route"), ("/dead", statuses[3], "connect_refused")]
    stays(log, 2)


# -- access log: rotation --------------------------------------------------------------------


def rotate_and_count(proxy: Any, log: Path, reopen: Callable[[], None], n: int = 30, m: int = 20) -> None:
    """N requests, the file renamed, `reopen()`, M more: the two files hold each line once."""
    ids = [f"req-{i}" for i in range(n + m)]
    for request_id in ids[:n]:
        assert get(proxy.address(), "/", [("x-request-id", request_id)]).status == 200
    wait_lines(log, n)
    rotated = log.with_name(log.name + ".1")
    os.rename(log, rotated)
    reopen()
    # The worker(s) open a new file at the path; lines go there once it exists.
    wait_for(log.exists, 2.0, f"a new {log} after the reopen")
    time.sleep(0.3)  # every worker got its signal and reopened by now
    for request_id in ids[n:]:
        assert get(proxy.address(), "/", [("x-request-id", request_id)]).status == 200
    new = wait_lines(log, m)
    stays(log, m, 0.4)
    old = lines_of(rotated)
    got = [json.loads(line)["request_id"] for line in old + new]
    assert sorted(got) == sorted(ids), f"lost: {set(ids) - set(got)}; extra/duplicated: {len(got) - len(set(got))}"
    # Lines written before the rename stay in the renamed file, the rest go to the new one.
    assert sorted(json.loads(line)["request_id"] for line in old) == sorted(ids[:n]), old
    assert sorted(json.loads(line)["request_id"] for line in new) == sorted(ids[n:]), new


def test_rotation_with_post_logs_reopen_loses_no_line(meshproxy, faulty, tmp_path):
    origin = faulty("good")
    log = tmp_path / "access.log"
    proxy = meshproxy(with_telemetry({**to_origin(origin), "workers": 2}, access_log={"path": str(log)}))

    def reopen() -> None:
        status, body = admin_post(proxy, "/logs/reopen")
        assert status == 200, body
        assert json.loads(body) == {"workers": 2}, body

    rotate_and_count(proxy, log, reopen)


def test_rotation_with_sigusr1_loses_no_line(meshproxy, faulty, tmp_path):
    origin = faulty("good")
    log = tmp_path / "access.log"
    proxy = meshproxy(with_telemetry(to_origin(origin), access_log={"path": str(log)}))
    rotate_and_count(proxy, log, lambda: proxy.send_signal(signal.SIGUSR1))
    assert proxy.returncode is None, proxy.log()


# -- tracing ---------------------------------------------------------------------------------


def tracing(receiver: OtlpReceiver, service: str, **fields: Any) -> dict[str, Any]:
    return {"propagation": ["w3c"], "otlp_endpoint": receiver.url, "sample_rate": 1.0,
            "service_name": service, **fields}


def test_a_trace_continues_through_two_hops_with_linked_spans(meshproxy, faulty, receiver, tmp_path):
    origin = faulty("origin")
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    b = meshproxy(with_telemetry(to_origin(origin), access_log={"path": str(log_b)},
                                 tracing=tracing(receiver, "svc-b")))
    a = meshproxy(with_telemetry(
        http_config([route("all", "hop")], [cluster("hop", [endpoint(b.address())])]),
        access_log={"path": str(log_a)}, tracing=tracing(receiver, "svc-a")))

    response = get(a.address(), "/api/orders", [("traceparent", f"00-{TRACE}-{CALLER}-01"),
                                                 ("tracestate", "vendor=abc")])
    assert response.status == 200 and response.header("x-origin") == "origin"
    trace_id, parent, flags = traceparent(origin)
    assert (trace_id, flags) == (TRACE, "01")
    assert parent != CALLER
    assert origin.requests[0].header("tracestate") == "vendor=abc"

    spans = spans_of_trace(receiver, TRACE, 4)
    a_server, a_client = one(spans, "svc-a", SERVER_KIND), one(spans, "svc-a", CLIENT_KIND)
    b_server, b_client = one(spans, "svc-b", SERVER_KIND), one(spans, "svc-b", CLIENT_KIND)
    assert a_server.span.parent_span_id.hex() == CALLER
    assert a_client.span.parent_span_id == a_server.span.span_id
    assert b_server.span.parent_span_id == a_client.span.span_id
    assert b_client.span.parent_span_id == b_server.span.span_id
    assert b_client.span.span_id.hex() == parent  # the origin's parent is B's client span
    assert len({s.span.span_id for s in spans}) == 4
    for span in spans:
        attrs = attributes(span)
        assert attrs.get("http.request.method") == "GET", attrs
        assert attrs.get("http.response.status_code") == 200, attrs
        assert span.span.start_time_unix_nano <= span.span.end_time_unix_nano
    assert attributes(a_server).get("url.path") == "/api/orders"
    # B's request started while A's was in flight (one host, one clock).
    assert a_server.span.start_time_unix_nano <= b_server.span.start_time_unix_nano

    (line_a,) = wait_records(log_a, 1)
    (line_b,) = wait_records(log_b, 1)
    assert line_a["trace_id"] == line_b["trace_id"] == TRACE, (line_a, line_b)
    assert line_a["request_id"] == line_b["request_id"] == origin.requests[0].header("x-request-id")


def test_a_request_without_context_starts_a_sampled_trace(meshproxy, faulty, receiver):
    origin = faulty("origin")
    proxy = meshproxy(with_telemetry(to_origin(origin), tracing=tracing(receiver, "web")))
    assert get(proxy.address(), "/new").status == 200
    trace_id, parent, flags = traceparent(origin)
    assert flags == "01" and trace_id != "0" * 32
    spans = spans_of_trace(receiver, trace_id, 2)
    server, client = one(spans, "web", SERVER_KIND), one(spans, "web", CLIENT_KIND)
    assert server.span.parent_span_id == b"", describe(spans)  # a root span
    assert client.span.parent_span_id == server.span.span_id
    assert client.span.span_id.hex() == parent
    # Another request: another trace.
    assert get(proxy.address(), "/new").status == 200
    assert traceparent(origin)[0] != trace_id


def test_sample_rate_zero_propagates_unsampled_and_exports_nothing(meshproxy, faulty, receiver):
    origin = faulty("origin")
    proxy = meshproxy(with_telemetry(to_origin(origin), tracing=tracing(receiver, "web", sample_rate=0.0)))
    for _ in range(5):
        assert get(proxy.address(), "/quiet").status == 200
    contexts = [traceparent(origin, i) for i in range(5)]
    assert all(flags == "00" for _, _, flags in contexts), contexts
    assert len({trace for trace, _, _ in contexts}) == 5, contexts
    # A caller's sampled decision is kept: this one is exported (so the exporter works).
    assert get(proxy.address(), "/kept", [("traceparent", f"00-{TRACE}-{CALLER}-01")]).status == 200
    assert traceparent(origin)[0::2] == (TRACE, "01")
    spans_of_trace(receiver, TRACE, 2)
    time.sleep(1.2)  # one more export interval: nothing of the unsampled requests comes
    assert {s.span.trace_id.hex() for s in receiver.resource_spans()} == {TRACE}


B3_SPAN = "a2fb4a1d1a96d312"


@pytest.mark.parametrize("propagation", ["b3", "b3multi"])
def test_b3_in_b3_out(meshproxy, faulty, receiver, propagation):
    origin = faulty("origin")
    proxy = meshproxy(with_telemetry(to_origin(origin),
                                     tracing=tracing(receiver, "web", propagation=[propagation])))
    if propagation == "b3":
        incoming = [("b3", f"{TRACE}-{B3_SPAN}-1")]
    else:
        incoming = [("X-B3-TraceId", TRACE), ("X-B3-SpanId", B3_SPAN), ("X-B3-Sampled", "1")]
    assert get(proxy.address(), "/b3", incoming).status == 200
    seen = origin.requests[0]
    assert seen.header("traceparent") is None, seen.headers
    fields: list[str] = []
    if propagation == "b3":
        values = [v for n, v in seen.headers if n == "b3"]
        assert len(values) == 1, seen.headers
        fields = values[0].split("-")
        assert fields[0] == TRACE and fields[2] == "1", values
        span_id = fields[1]
        assert len(fields) in (3, 4), values
        assert not any(n.startswith("x-b3-") for n, _ in seen.headers), seen.headers
    else:
        for name in ("x-b3-traceid", "x-b3-spanid", "x-b3-sampled"):
            assert len([v for n, v in seen.headers if n == name]) == 1, seen.headers
        assert seen.header("x-b3-traceid") == TRACE and seen.header("x-b3-sampled") == "1", seen.headers
        span_id = seen.header("x-b3-spanid")
        assert seen.header("b3") is None, seen.headers
    assert re.fullmatch(r"[0-9a-f]{16}", span_id) and span_id != B3_SPAN, span_id
    spans = spans_of_trace(receiver, TRACE, 2)
    server, client = one(spans, "web", SERVER_KIND), one(spans, "web", CLIENT_KIND)
    assert server.span.parent_span_id.hex() == B3_SPAN
    assert client.span.span_id.hex() == span_id and client.span.parent_span_id == server.span.span_id
    # The parent span id B3 passes on, when it does, is the proxy's server span.
    parent = fields[3] if propagation == "b3" and len(fields) > 3 else seen.header("x-b3-parentspanid")
    assert parent in (None, server.span.span_id.hex()), (parent, describe(spans))


def test_a_dead_collector_does_not_slow_requests(meshproxy, faulty, upstreams):
    origin = faulty("origin")
    dead = upstreams.refused()
    traced = meshproxy(with_telemetry(to_origin(origin), tracing={
        "propagation": ["w3c"], "otlp_endpoint": f"http://{HOST}:{dead.address[1]}/v1/traces",
        "sample_rate": 1.0, "service_name": "web"}))
    plain = meshproxy(to_origin(origin))

    def run(proxy: Any, n: int) -> float:
        with RawClient(proxy.address()) as client:
            started = time.monotonic()
            for _ in range(n):
                client.request("GET", "/")
                assert client.read_response().status == 200
            return time.monotonic() - started

    run(traced, 20)
    run(plain, 20)
    plain_time = run(plain, 200)
    traced_time = run(traced, 200)
    assert traced_time < 2 * plain_time + 0.5, (traced_time, plain_time)
    assert traceparent(origin)[2] == "01"  # the traced proxy did make sampled spans
    assert traced.returncode is None, traced.log()


# -- HTTP/2 streams ----------------------------------------------------------------------------


def test_http2_streams_are_logged_and_traced(meshproxy, faulty, receiver, tmp_path):
    origin = faulty("origin")
    log = tmp_path / "access.log"
    proxy = meshproxy(with_telemetry(to_origin(origin), access_log={"path": str(log)},
                                     tracing=tracing(receiver, "h2")))
    client = H2Client(proxy.address())
    try:
        response = client.get("/api/h2?q=1", headers=[(b"traceparent", f"00-{TRACE}-{CALLER}-01".encode())],
                              authority="shop.example")
    finally:
        client.close()
    assert response.status == 200
    trace_id, parent, flags = traceparent(origin)
    assert (trace_id, flags) == (TRACE, "01") and parent != CALLER  # ours replaced the client's
    (record,) = wait_records(log, 1)
    assert {k: record[k] for k in ("route", "cluster", "endpoint", "method", "authority", "path", "protocol",
                                   "status", "error", "attempts", "trace_id")} == {
        "route": "all", "cluster": "up", "endpoint": origin.endpoint, "method": "GET",
        "authority": "shop.example", "path": "/api/h2", "protocol": "HTTP/2", "status": 200, "error": None,
        "attempts": 1, "trace_id": TRACE}, record
    assert record["bytes_out"] == len(response.body) and record["upstream_ms"] is not None
    spans = spans_of_trace(receiver, TRACE, 2)
    server, client_span = one(spans, "h2", SERVER_KIND), one(spans, "h2", CLIENT_KIND)
    assert server.span.parent_span_id.hex() == CALLER
    assert client_span.span.span_id.hex() == parent
    assert attributes(server).get("network.protocol.version") == "2", attributes(server)
