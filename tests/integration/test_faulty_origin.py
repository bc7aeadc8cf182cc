"""The faulty origin does what it is told, per path or for everything, counts what reached
it per method, and recovers when healed."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator

import pytest

from .faulty_origin import GARBAGE, PROMISED_BODY, Fault, FaultyOrigin


@pytest.fixture
def origin() -> Iterator[FaultyOrigin]:
    with FaultyOrigin("a") as server:
        yield server


def client(origin: FaultyOrigin, timeout: float = 5.0) -> http.client.HTTPConnection:
    return http.client.HTTPConnection(*origin.address, timeout=timeout)


def get(origin: FaultyOrigin, path: str = "/", method: str = "GET", body: bytes | None = None,
        timeout: float = 5.0) -> tuple[int, bytes]:
    conn = client(origin, timeout)
    try:
        conn.request(method, path, body=body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def raw_exchange(origin: FaultyOrigin, request: bytes, timeout: float = 5.0) -> tuple[bytes, str]:
    """Send `request` on a fresh connection; what came back and how it ended."""
    with socket.create_connection(origin.address, timeout=timeout) as sock:
        sock.sendall(request)
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return received, "reset"
            if not chunk:
                return received, "eof"
            received += chunk


def test_answers_200_with_who_and_what(origin):
    status, body = get(origin, "/x?q=1", "POST", b"hello")
    assert status == 200
    assert json.loads(body) == {"origin": "a", "method": "POST", "path": "/x", "n": 1}
    assert origin.requests[0].body_length == 5


def test_keep_alive_and_counts_per_method(origin):
    conn = client(origin)
    for method in ["GET", "GET", "POST", "PUT"]:
        conn.request(method, "/k", body=b"" if method != "GET" else None)
        assert conn.getresponse().read()
    conn.close()
    assert origin.accepted == 1
    assert origin.counts == {"GET": 2, "POST": 1, "PUT": 1}
    assert origin.count("GET", "/k") == 2 and origin.count(path="/other") == 0


def test_503_keeps_the_connection(origin):
    origin.set_mode(Fault.ANSWER_503)
    conn = client(origin)
    for _ in range(2):
        conn.request("GET", "/")
        response = conn.getresponse()
        assert (response.status, response.read()) == (503, b"unavailable\n")
    conn.close()
    assert origin.accepted == 1


def test_reset_before_headers_after_reading_the_request(origin):
    origin.fail("/pay", Fault.RESET_BEFORE_HEADERS)
    request = b"POST /pay HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nabc"
    assert raw_exchange(origin, request) == (b"", "reset")
    assert origin.count("POST", "/pay") == 1  # it arrived: a retry would be a replay


def test_reset_after_headers(origin):
    origin.set_mode(Fault.RESET_AFTER_HEADERS)
    received, how = raw_exchange(origin, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
    assert how == "reset"
    assert received.startswith(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % PROMISED_BODY)


def test_garbage(origin):
    origin.set_mode(Fault.GARBAGE)
    assert raw_exchange(origin, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n") == (GARBAGE, "eof")


def test_hang_answers_nothing_until_the_client_leaves(origin):
    origin.set_mode(Fault.HANG)
    with pytest.raises(TimeoutError):
        get(origin, timeout=0.3)
    assert origin.count() == 1


def test_slow(origin):
    origin.set_mode(Fault.SLOW, delay=0.3)
    started = time.monotonic()
    assert get(origin)[0] == 200
    assert 0.3 <= time.monotonic() - started < 2.0


def test_refuse_and_come_back_on_the_same_port(origin):
    origin.set_mode(Fault.REFUSE)
    with pytest.raises(ConnectionRefusedError):
        get(origin)
    # While refusing, the port is held: nobody else can listen on it.
    other = socket.socket()
    with pytest.raises(OSError):
        other.bind(origin.address)
    other.close()
    origin.heal()
    assert get(origin)[0] == 200


def test_refusing_drops_open_connections(origin):
    conn = client(origin)
    conn.request("GET", "/")
    conn.getresponse().read()
    origin.set_mode(Fault.REFUSE)
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        conn.request("GET", "/")
        conn.getresponse()
    conn.close()


def test_a_path_fails_a_number_of_times_then_answers(origin):
    origin.set_mode(Fault.ANSWER_503).fail("/flaky", Fault.GARBAGE, times=2)
    origin.fail("/fine", Fault.OK)
    assert raw_exchange(origin, b"GET /flaky HTTP/1.1\r\nhost: a\r\n\r\n")[0] == GARBAGE
    assert raw_exchange(origin, b"GET /flaky HTTP/1.1\r\nhost: a\r\n\r\n")[0] == GARBAGE
    assert get(origin, "/flaky")[0] == 503  # the rule is used up: the mode applies
    assert get(origin, "/fine")[0] == 200
    origin.heal()
    assert get(origin, "/flaky")[0] == 200 and get(origin, "/other")[0] == 200


def test_malformed_requests_get_400(origin):
    received, how = raw_exchange(origin, b"GET / HTTP/1.1\r\nbad header\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 400 ") and how == "eof"
    assert origin.count() == 0


def test_head_gets_no_body(origin):
    conn = client(origin)
    conn.request("HEAD", "/")
    response = conn.getresponse()
    assert response.status == 200 and response.read() == b""
    conn.request("GET", "/")
    assert json.loads(conn.getresponse().read())["n"] == 2  # the connection stayed in step
    conn.close()


def test_wait_requests_and_forget(origin):
    get(origin)
    assert len(origin.wait_requests(1, timeout=1)) == 1
    with pytest.raises(AssertionError, match="1 requests after"):
        origin.wait_requests(2, timeout=0.1)
    origin.forget()
    assert origin.count() == 0


def test_refuse_is_for_the_whole_origin(origin):
    with pytest.raises(ValueError):
        origin.fail("/x", Fault.REFUSE)


def test_close_ends_a_hanging_connection_promptly():
    origin = FaultyOrigin("h").set_mode(Fault.HANG)
    sock = socket.create_connection(origin.address, timeout=5)
    sock.sendall(b"GET / HTTP/1.1\r\nhost: h\r\n\r\n")
    origin.wait_requests(1)
    started = time.monotonic()
    origin.close()
    assert time.monotonic() - started < 2
    sock.close()
