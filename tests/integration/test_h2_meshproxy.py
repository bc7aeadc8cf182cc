"""HTTP/2 through real meshproxy processes: h2load to an HTTP/1.1 origin, and a grpcio client
through two sidecars to a grpcio server.

These need the listener's HTTP/2 dispatch (the preface check in `Http1Proxy.serve`) and, for
gRPC, `clusters[].protocol`; until a build has them the tests skip, saying which is missing.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from concurrent import futures

import pytest
import yaml

from proxy.config import ConfigError, parse_config
from proxy.http.h2codec import PREFACE

from .http_support import Origin, cluster, http_config, respond, route
from .support import wait_for
from .test_admin_metrics import samples

H2LOAD = shutil.which("h2load")


def _speaks_h2(address: tuple[str, int]) -> bool:
    """Whether the listener answers the HTTP/2 preface with a SETTINGS frame."""
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(PREFACE + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        data = sock.recv(9)
    return len(data) == 9 and data[3] == 0x4


def _require_dispatch(proxy) -> None:
    if not _speaks_h2(proxy.address()):
        pytest.skip("this build's http listeners do not dispatch HTTP/2 yet")


@pytest.mark.skipif(H2LOAD is None, reason="h2load (nghttp2-client) not installed")
def test_h2load_through_a_meshproxy_process(meshproxy):
    origin = Origin("h1")
    origin.on("/small", respond(200, b"x" * 100))
    try:
        proxy = meshproxy(http_config([route("all", "up")], [cluster("up", [origin])]))
        _require_dispatch(proxy)
        before = _h2_counts(proxy)
        host, port = proxy.address()
        result = subprocess.run([H2LOAD, "-n", "5000", "-c", "10", "-m", "10", f"http://{host}:{port}/small"],
                                capture_output=True, text=True, timeout=60, check=False)
    finally:
        origin.close()
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"requests: 5000 total, 5000 started, 5000 done, 5000 succeeded, 0 failed", result.stdout), \
        result.stdout
    # Counted per protocol: h2load's 10 connections and 5000 streams.
    wait_for(lambda: _h2_counts(proxy) == (before[0] + 10, before[1] + 5000), timeout=10,
             what="the HTTP/2 counters")


def _h2_counts(proxy) -> tuple[float, float]:
    found = samples(proxy)
    listener = frozenset({"listener": "in"}.items())
    return (found.get(("meshproxy_downstream_http2_connections_total", listener), 0.0),
            found.get(("meshproxy_downstream_http2_streams_total", listener), 0.0))


def test_grpc_through_two_meshproxy_processes(meshproxy):
    grpc = pytest.importorskip("grpc")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))

    def unary(request: bytes, context) -> bytes:
        context.set_trailing_metadata((("x-trailer", "kept"),))
        return request[::-1]

    def stream(request: bytes, context):
        for i in range(int(request)):
            yield b"%d" % i

    handlers = {"Unary": grpc.unary_unary_rpc_method_handler(unary),
                "Stream": grpc.unary_stream_rpc_method_handler(stream)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        inner_config = http_config([route("grpc", "backend", prefix="/test.Echo/")],
                                   [cluster("backend", [f"127.0.0.1:{port}"], protocol="http2")])
        try:
            parse_config(yaml.safe_dump(inner_config))
        except ConfigError:
            pytest.skip("this build's config has no clusters[].protocol yet")
        inner = meshproxy(inner_config)
        _require_dispatch(inner)
        inner_host, inner_port = inner.address()
        outer = meshproxy(http_config([route("grpc", "next", prefix="/test.Echo/")],
                                      [cluster("next", [f"{inner_host}:{inner_port}"], protocol="http2")]))
        host, outer_port = outer.address()
        with grpc.insecure_channel(f"{host}:{outer_port}") as channel:
            response, call = channel.unary_unary("/test.Echo/Unary").with_call(b"hello", timeout=10)
            assert response == b"olleh"
            assert ("x-trailer", "kept") in call.trailing_metadata()
            assert list(channel.unary_stream("/test.Echo/Stream")(b"20", timeout=10)) == \
                [b"%d" % i for i in range(20)]
            with pytest.raises(grpc.RpcError) as failed:
                channel.unary_unary("/other.Service/Call")(b"", timeout=10)
            assert failed.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(0)
