"""An upstream that answers before reading the request body: the client still gets the
response (no reset from closing over unread bytes), marked `connection: close`."""

from __future__ import annotations

import socket
import threading
import time

from .support import HOST, free_port


def early_origin() -> socket.socket:
    """Answers 200 "early" as soon as a request head arrives, then reads nothing more
    for a while: a large body stays stuck between the client and the proxy."""
    server = socket.create_server((HOST, 0), backlog=64)

    def serve(conn: socket.socket) -> None:
        with conn:
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    data += chunk
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nearly")
                time.sleep(1.0)
            except OSError:
                return

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server


def test_uploads_get_the_early_response(meshproxy):
    origin = early_origin()
    try:
        proxy = meshproxy({
            "listeners": [{"name": "in", "address": f"{HOST}:{free_port()}", "protocol": "http",
                           "routes": [{"name": "all", "match": {"prefix": "/"}, "cluster": "up"}]}],
            "clusters": [{"name": "up", "endpoints": [f"{HOST}:{origin.getsockname()[1]}"]}],
        })
        size = 4 << 20  # more than the socket buffers on the way can hold
        for _ in range(3):
            with socket.create_connection(proxy.address(), timeout=10) as client:
                client.sendall(b"POST /upload HTTP/1.1\r\nHost: x\r\ncontent-length: %d\r\n\r\n" % size)
                client.sendall(b"x" * 65536)
                response = b""
                while b"early" not in response:
                    chunk = client.recv(65536)
                    assert chunk, response
                    response += chunk
                assert response.startswith(b"HTTP/1.1 200 ")
                assert b"connection: close" in response.lower()
                # The client goes on sending the body it started: the proxy reads it
                # away (lingering close) instead of resetting the connection under it.
                sent = 65536
                while sent < size:
                    sent += client.send(b"x" * min(262144, size - sent))
                client.shutdown(socket.SHUT_WR)
                assert client.recv(1) == b""  # a FIN, not a reset
    finally:
        origin.close()
