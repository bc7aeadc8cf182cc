"""POST /drain stops the data plane and answers when it is done; POST /shutdown exits 0;
mutations need POST (405 otherwise)."""

from __future__ import annotations

import http.client
import socket

from .support import HOST, free_port, tcp_config


def admin(proxy, method: str, path: str, timeout: float = 15.0) -> tuple[int, str]:
    conn = http.client.HTTPConnection(*proxy.admin, timeout=timeout)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


def test_drain_then_shutdown(meshproxy, upstreams):
    echo = upstreams.echo()
    proxy = meshproxy(tcp_config([f"{echo.address[0]}:{echo.address[1]}"], drain_timeout="5s"))
    with socket.create_connection(proxy.address(), timeout=5) as client:
        client.sendall(b"ping")
        assert client.recv(4) == b"ping"

    assert admin(proxy, "GET", "/drain")[0] == 405
    assert admin(proxy, "POST", "/drain") == (200, '{\n  "drained": true\n}\n')
    assert proxy.ready_status() == 503
    assert admin(proxy, "GET", "/live")[0] == 200  # the admin plane stays up
    try:
        socket.create_connection(proxy.address(), timeout=2).close()
        refused = False
    except ConnectionRefusedError:
        refused = True
    assert refused, "a drained listener still accepted"
    assert proxy.worker_pids() == []

    status, _ = admin(proxy, "POST", "/shutdown")
    assert status == 202
    assert proxy.wait(timeout=10) == 0


def test_shutdown_drains_open_connections_first(meshproxy, upstreams):
    echo = upstreams.echo()
    proxy = meshproxy(tcp_config([f"{echo.address[0]}:{echo.address[1]}"], drain_timeout="10s"))
    client = socket.create_connection(proxy.address(), timeout=5)
    client.sendall(b"a")
    assert client.recv(1) == b"a"
    assert admin(proxy, "POST", "/shutdown")[0] == 202
    client.sendall(b"still here")  # the open connection keeps working while draining
    assert client.recv(10) == b"still here"
    client.close()
    assert proxy.wait(timeout=10) == 0


def test_bearer_token_guards_every_endpoint(meshproxy, upstreams, tmp_path):
    import time

    token_file = tmp_path / "admin-token"
    token_file.write_text("s3cret-token\n")
    echo = upstreams.echo()
    config = tcp_config([f"{echo.address[0]}:{echo.address[1]}"])
    config["admin"] = {"address": f"{HOST}:{free_port()}", "token_file": str(token_file)}
    proxy = meshproxy(config, wait_ready=False)

    def call(path: str, token: str | None) -> int:
        conn = http.client.HTTPConnection(*proxy.admin, timeout=5)
        try:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            conn.request("GET", path, headers=headers)
            return conn.getresponse().status
        finally:
            conn.close()

    deadline = time.monotonic() + 15
    while True:
        try:
            if call("/ready", "s3cret-token") == 200:
                break
        except OSError:
            pass
        assert time.monotonic() < deadline, proxy.log()
        time.sleep(0.1)
    for path in ("/ready", "/live", "/config", "/metrics"):
        assert call(path, None) == 401
        assert call(path, "wrong") == 401
        assert call(path, "s3cret-token") == 200
