"""The gRPC origin of `grpc-unary`: a grpcio server (``python -m bench.grpcorigin --port P``),
pinned to the load core by upstream.py.

It serves one unary method, `/bench.Echo/Unary`, through a generic handler with raw-bytes
(identity) serializers, so no .proto file or protoc is needed: the answer is the request
reversed, with the trailing metadata `x-bench: kept`, so the client can check that body, status
and trailers came through the proxy intact. Each message is a few bytes, like `GET /hello`.

grpcio's thread-pool server: on this machine it costs about 150 µs of CPU per call, against
about 270 µs for the `grpc.aio` server. It runs until SIGTERM (the default action ends it).
"""

from __future__ import annotations

import argparse
import sys
from concurrent import futures

SERVICE = "bench.Echo"
METHOD = "Unary"
PATH = f"/{SERVICE}/{METHOD}"
TRAILER = ("x-bench", "kept")
_THREADS = 8  # handler threads; the calls are short, more only add switching


def _identity(data: bytes) -> bytes:
    return data


def _unary(request: bytes, context) -> bytes:
    context.set_trailing_metadata((TRAILER,))
    return request[::-1]


def main(argv: list[str]) -> None:
    import grpc  # here, so that the harness imports this module without needing grpcio

    parser = argparse.ArgumentParser(prog="python -m bench.grpcorigin")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    handler = grpc.unary_unary_rpc_method_handler(
        _unary, request_deserializer=_identity, response_serializer=_identity)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=_THREADS),
                         options=(("grpc.so_reuseport", 0),))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler}),))
    if server.add_insecure_port(f"{args.host}:{args.port}") != args.port:
        raise SystemExit(f"cannot listen on {args.host}:{args.port}")
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main(sys.argv[1:])
