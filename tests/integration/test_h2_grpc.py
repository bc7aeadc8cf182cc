"""gRPC through meshproxy: a grpcio client and server, unary and streaming calls, through
one and two proxy hops (`clusters[].protocol: http2`); trailers (status, trailing
metadata) arrive intact, and proxy-made errors are gRPC statuses.
"""

from __future__ import annotations

import time
from concurrent import futures

import pytest

from .h2_support import H2Client, InProcessProxy
from .http_support import cluster, http_config, route

grpc = pytest.importorskip("grpc")

SERVICE = "test.Echo"


def _unary(request: bytes, context) -> bytes:
    context.set_trailing_metadata((("x-trailer", "kept"),))
    return request[::-1]


def _server_stream(request: bytes, context):
    for i in range(int(request)):
        yield b"%d" % i


def _client_stream(requests, context) -> bytes:
    return b"|".join(requests)


def _bidi(requests, context):
    for item in requests:
        yield item.upper()


def _slow(request: bytes, context) -> bytes:
    time.sleep(2)
    return b"late"


def _fail(request: bytes, context) -> bytes:
    context.abort(grpc.StatusCode.NOT_FOUND, "nothing here")


def _big(request: bytes, context) -> bytes:
    return b"b" * int(request)


@pytest.fixture(scope="module")
def grpc_server():
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "Big": grpc.unary_unary_rpc_method_handler(_big),
        "ServerStream": grpc.unary_stream_rpc_method_handler(_server_stream),
        "ClientStream": grpc.stream_unary_rpc_method_handler(_client_stream),
        "Bidi": grpc.stream_stream_rpc_method_handler(_bidi),
        "Slow": grpc.unary_unary_rpc_method_handler(_slow),
        "Fail": grpc.unary_unary_rpc_method_handler(_fail),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def _grpc_config(endpoint: str, **route_fields):
    return http_config([route("grpc", "backend", prefix=f"/{SERVICE}/", **route_fields)],
                       [cluster("backend", [endpoint], protocol="http2")])


@pytest.fixture(scope="module")
def two_hops(grpc_server):
    """client → proxy A → proxy B → grpc server, both hops HTTP/2."""
    inner = InProcessProxy(_grpc_config(grpc_server))
    outer = InProcessProxy(_grpc_config(f"{inner.address[0]}:{inner.address[1]}"))
    yield outer, inner
    outer.close()
    inner.close()


def _channel(proxy: InProcessProxy):
    return grpc.insecure_channel(f"{proxy.address[0]}:{proxy.address[1]}")


def test_unary_and_streaming_calls_through_two_hops(two_hops):
    outer, inner = two_hops
    with _channel(outer) as channel:
        unary = channel.unary_unary(f"/{SERVICE}/Unary")
        response, call = unary.with_call(b"hello", timeout=10)
        assert response == b"olleh"
        assert ("x-trailer", "kept") in call.trailing_metadata()
        assert call.code() == grpc.StatusCode.OK

        server_stream = channel.unary_stream(f"/{SERVICE}/ServerStream")
        assert list(server_stream(b"50", timeout=10)) == [b"%d" % i for i in range(50)]

        client_stream = channel.stream_unary(f"/{SERVICE}/ClientStream")
        assert client_stream(iter([b"a", b"b", b"c"]), timeout=10) == b"a|b|c"

        bidi = channel.stream_stream(f"/{SERVICE}/Bidi")
        assert list(bidi(iter([b"x", b"y"]), timeout=10)) == [b"X", b"Y"]

        big = channel.unary_unary(f"/{SERVICE}/Big")
        assert big(b"3000000", timeout=20) == b"b" * 3000000
    assert inner.stats.listeners["in"].routes["grpc"].requests[2] >= 5


def test_many_unary_calls_share_upstream_connections(two_hops):
    outer, _ = two_hops
    with _channel(outer) as channel:
        unary = channel.unary_unary(f"/{SERVICE}/Unary")
        calls = [unary.future(b"%d" % i, timeout=20) for i in range(200)]
        assert [c.result() for c in calls] == [(b"%d" % i)[::-1] for i in range(200)]


def test_server_errors_pass_through_as_grpc_status(two_hops):
    outer, _ = two_hops
    with _channel(outer) as channel, pytest.raises(grpc.RpcError) as failed:
        channel.unary_unary(f"/{SERVICE}/Fail")(b"", timeout=10)
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    assert failed.value.details() == "nothing here"


def test_no_route_is_unimplemented(two_hops):
    outer, _ = two_hops
    with _channel(outer) as channel, pytest.raises(grpc.RpcError) as failed:
        channel.unary_unary("/other.Service/Call")(b"", timeout=10)
    assert failed.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "no_route" in failed.value.details() or "no route" in failed.value.details()


def test_unreachable_backend_is_unavailable(upstreams):
    refused = upstreams.refused()
    proxy = InProcessProxy(_grpc_config(f"{refused.address[0]}:{refused.address[1]}"))
    try:
        with _channel(proxy) as channel, pytest.raises(grpc.RpcError) as failed:
            channel.unary_unary(f"/{SERVICE}/Unary")(b"x", timeout=10)
    finally:
        proxy.close()
    assert failed.value.code() == grpc.StatusCode.UNAVAILABLE


def _grpc_request(path: str, timeout: bytes | None = None) -> list[tuple[bytes, bytes]]:
    fields = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
    if timeout is not None:
        fields.append((b"grpc-timeout", timeout))
    return fields


def test_grpc_timeout_is_the_deadline(grpc_server):
    proxy = InProcessProxy(_grpc_config(grpc_server))
    client = H2Client(proxy.address)
    try:
        started = time.monotonic()
        response = client.get(f"/{SERVICE}/Slow", method="POST", headers=_grpc_request("", b"300m"),
                              body=b"\x00\x00\x00\x00\x00")
        elapsed = time.monotonic() - started
    finally:
        client.close()
        proxy.close()
    assert elapsed < 1.5
    assert response.status == 200
    # Trailers-only: the status is in the response headers.
    assert response.header(b"grpc-status") == b"4"
    assert response.header(b"x-meshproxy-error") == b"upstream_timeout"


def test_proxy_errors_on_grpc_requests_are_trailers_only(grpc_server):
    proxy = InProcessProxy(_grpc_config(grpc_server))
    client = H2Client(proxy.address)
    try:
        response = client.get("/nowhere/Call", method="POST", headers=_grpc_request(""), body=b"\x00" * 5)
    finally:
        client.close()
        proxy.close()
    assert response.status == 200 and response.header(b"content-type") == b"application/grpc"
    assert response.header(b"grpc-status") == b"12"
    assert not response.body
