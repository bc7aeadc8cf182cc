"""HTTP/1.0 clients get bodies they can read: a chunked upstream response is sent
as its data alone, ended by closing the connection."""

from __future__ import annotations

import socket
import threading

from .support import HOST, free_port, read_to_eof

CHUNKED = (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
           b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-trailer: 1\r\n\r\n")


def chunked_origin() -> socket.socket:
    server = socket.create_server((HOST, 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                conn.sendall(CHUNKED)

    threading.Thread(target=serve, daemon=True).start()
    return server


def test_chunked_response_is_dechunked_for_an_http10_client(meshproxy):
    origin = chunked_origin()
    try:
        proxy = meshproxy({
            "listeners": [{"name": "in", "address": f"{HOST}:{free_port()}", "protocol": "http",
                           "routes": [{"name": "all", "match": {"prefix": "/"}, "cluster": "up"}]}],
            "clusters": [{"name": "up", "endpoints": [f"{HOST}:{origin.getsockname()[1]}"]}],
        })
        with socket.create_connection(proxy.address(), timeout=5) as client:
            client.sendall(b"GET /old HTTP/1.0\r\n\r\n")
            response = read_to_eof(client)
        head, _, body = response.partition(b"\r\n\r\n")
        assert body == b"hello world"
        assert b"transfer-encoding" not in head.lower()
        assert b"connection: close" in head.lower()

        # An HTTP/1.1 client still gets the framing (and trailers) verbatim.
        with socket.create_connection(proxy.address(), timeout=5) as client:
            client.sendall(b"GET /new HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while not data.endswith(b"0\r\nx-trailer: 1\r\n\r\n"):
                chunk = client.recv(65536)
                assert chunk, data
                data += chunk
        assert data.partition(b"\r\n\r\n")[2] == CHUNKED.partition(b"\r\n\r\n")[2]
    finally:
        origin.close()
