"""The supervisor and its workers: spreading load, restarts, draining on signals."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from .support import (
    Exchange,
    connect,
    endpoint,
    fd_kinds,
    pattern,
    process_state,
    read_to_eof,
    recv_exactly,
    roundtrip,
    sha256,
    stopped,
    tcp_config,
    wait_closed,
    wait_for,
)

SIGNALS = pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])


def _gone(pid: int) -> bool:
    return process_state(pid) in ("", "Z", "X")


def _draining(proxy) -> bool:
    """/ready no longer says 200: it answers 503, or the admin plane is gone."""
    return proxy.ready_status() != 200


def test_two_workers_both_serve(meshproxy, upstreams):
    echo = upstreams.echo()
    proxy = meshproxy(tcp_config([endpoint(echo.address)], workers=2))
    workers = proxy.worker_pids()
    assert len(workers) == 2
    before = {pid: fd_kinds(pid)["socket"] for pid in workers}

    clients = [connect(proxy.address(), timeout=5) for _ in range(64)]
    try:
        for i, client in enumerate(clients):
            roundtrip(client, f"client {i}".encode())
        held = {pid: fd_kinds(pid)["socket"] - before[pid] for pid in workers}
        # Every open connection is two sockets (client, upstream) in exactly one worker;
        # 64 connections all landing on one worker has probability 2**-63.
        assert sum(held.values()) == 2 * len(clients), held
        assert all(n > 0 for n in held.values()), held
    finally:
        for client in clients:
            client.close()


def test_a_killed_worker_is_restarted_and_service_goes_on(meshproxy, upstreams):
    echo = upstreams.echo()
    proxy = meshproxy(tcp_config([endpoint(echo.address)], workers=2))
    victim, survivor = proxy.worker_pids()

    os.kill(victim, signal.SIGKILL)
    # Connections made while the worker is down wait in its listening socket's queue
    # (the supervisor keeps it open) and are served once the new worker runs.
    for i in range(20):
        with connect(proxy.address(), timeout=5) as client:
            roundtrip(client, f"during restart {i}".encode())

    def replaced() -> list[int] | None:
        pids = proxy.worker_pids()
        return pids if len(pids) == 2 and victim not in pids and survivor in pids else None

    pids = wait_for(replaced, timeout=5, what="a new worker in place of the killed one")
    wait_for(lambda: proxy.ready_status() == 200, timeout=5, what="/ready 200 again")
    for i in range(20):
        with connect(proxy.address(), timeout=5) as client:
            roundtrip(client, f"after restart {i}".encode())
    assert proxy.returncode is None
    assert proxy.worker_pids() == pids
    assert "restarting" in proxy.log()


def test_workers_of_a_killed_supervisor_exit_and_free_the_port(meshproxy, upstreams):
    echo = upstreams.echo()
    proxy = meshproxy(tcp_config([endpoint(echo.address)], workers=2, drain_timeout="20s"))
    workers = proxy.worker_pids()
    with connect(proxy.address(), timeout=5) as client:
        roundtrip(client, b"before")

    os.kill(proxy.pid, signal.SIGKILL)
    # Orphaned, with nothing open, they drain at once rather than serve on unsupervised.
    wait_for(lambda: all(_gone(pid) for pid in workers), timeout=5, what="the orphaned workers to exit")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(proxy.address(), timeout=2)


@pytest.mark.slow
@SIGNALS
def test_signal_lets_an_open_transfer_finish_then_exits_0(meshproxy, upstreams, sig):
    acceptor = upstreams.acceptor(timeout=20)
    proxy = meshproxy(tcp_config([endpoint(acceptor.address)], workers=2, drain_timeout="20s"))
    client = connect(proxy.address(), timeout=20)
    server = acceptor.accept()
    size = 16 * 1024 * 1024

    # Bytes are in flight both ways when the signal arrives...
    up, down = pattern(size, seed=11), pattern(size, seed=12)
    upstream_side = Exchange(server, down, expect=size).start()
    client_side = Exchange(client, up, expect=size).start()
    proxy.send_signal(sig)
    assert client_side.result(timeout=30) == (size, sha256(down))
    assert upstream_side.result(timeout=30) == (size, sha256(up))

    # ...and the connection keeps working while the proxy drains.
    wait_for(lambda: _draining(proxy), timeout=3, what="/ready to stop answering 200")
    up, down = pattern(size, seed=13), pattern(size, seed=14)
    upstream_side = Exchange(server, down, expect=size).start()
    client_side = Exchange(client, up, expect=size).start()
    assert client_side.result(timeout=30) == (size, sha256(down))
    assert upstream_side.result(timeout=30) == (size, sha256(up))
    assert proxy.returncode is None, "exited before its open connection finished"

    client.shutdown(socket.SHUT_WR)
    assert read_to_eof(server) == b""
    server.shutdown(socket.SHUT_WR)
    assert read_to_eof(client) == b""
    closed = time.monotonic()
    # Once the last connection is done it exits 0, without waiting out drain_timeout.
    assert proxy.wait(timeout=10) == 0
    assert time.monotonic() - closed < 5
    assert "Traceback" not in proxy.log()


def test_draining_is_not_ready_while_open_connections_finish(meshproxy, upstreams):
    echo = upstreams.echo()
    proxy = meshproxy(tcp_config([endpoint(echo.address)], workers=2, drain_timeout="20s"))
    held = connect(proxy.address(), timeout=5)
    roundtrip(held, b"keeps the proxy draining")

    proxy.send_signal(signal.SIGTERM)
    wait_for(lambda: _draining(proxy), timeout=3, what="/ready to stop answering 200")
    time.sleep(0.2)
    assert proxy.ready_status() in (503, None)
    assert proxy.get("/live")[0] == 200
    # The open connection is still served, and the proxy is still there for it.
    roundtrip(held, b"still here")
    assert proxy.returncode is None
    held.close()
    assert proxy.wait(timeout=10) == 0


def test_draining_refuses_new_connections(meshproxy, upstreams):
    echo = upstreams.echo()
    proxy = meshproxy(tcp_config([endpoint(echo.address)], drain_timeout="20s"))
    held = connect(proxy.address(), timeout=5)
    roundtrip(held, b"keeps the proxy draining")

    proxy.send_signal(signal.SIGTERM)
    wait_for(lambda: _draining(proxy), timeout=3, what="/ready to stop answering 200")

    def refused() -> bool:
        try:
            probe = socket.create_connection(proxy.address(), timeout=0.5)
        except ConnectionRefusedError:
            return True
        probe.close()
        return False

    try:
        wait_for(refused, timeout=2, what="new connections to be refused while draining")
    finally:
        held.close()
    assert proxy.wait(timeout=10) == 0


def test_draining_closes_what_is_left_at_drain_timeout(meshproxy, upstreams):
    echo = upstreams.echo()
    proxy = meshproxy(tcp_config([endpoint(echo.address)], drain_timeout="1s"))
    held = connect(proxy.address(), timeout=5)
    roundtrip(held, b"idle from now on")

    started = time.monotonic()
    proxy.send_signal(signal.SIGTERM)
    assert wait_closed(held, timeout=5) in ("eof", "reset")
    closed_after = time.monotonic() - started
    assert proxy.wait(timeout=10) == 0
    exited_after = time.monotonic() - started
    assert 0.9 <= closed_after < 3, closed_after
    assert exited_after < 4, exited_after


@SIGNALS
def test_a_second_signal_exits_at_once(meshproxy, upstreams, sig):
    echo = upstreams.echo()
    proxy = meshproxy(tcp_config([endpoint(echo.address)], workers=2, drain_timeout="30s"))
    workers = proxy.worker_pids()
    held = connect(proxy.address(), timeout=5)
    roundtrip(held, b"keeps the proxy draining")

    proxy.send_signal(sig)
    wait_for(lambda: _draining(proxy), timeout=3, what="/ready to stop answering 200")
    time.sleep(0.2)
    assert proxy.returncode is None, "exited with a connection open, drain_timeout is 30s"

    started = time.monotonic()
    proxy.send_signal(sig)
    assert proxy.wait(timeout=5) == 1
    assert time.monotonic() - started < 2
    wait_for(lambda: all(_gone(pid) for pid in workers), timeout=2, what="the workers to be gone")
    assert wait_closed(held, timeout=2) in ("eof", "reset")


@SIGNALS
def test_a_signal_with_nothing_open_exits_0_promptly(meshproxy, upstreams, sig):
    echo = upstreams.echo()
    proxy = meshproxy(tcp_config([endpoint(echo.address)], workers=2))
    workers = proxy.worker_pids()
    with connect(proxy.address(), timeout=5) as client:
        roundtrip(client, b"one, then closed")
    started = time.monotonic()
    assert proxy.stop(sig, timeout=10) == 0
    assert time.monotonic() - started < 3
    assert all(_gone(pid) for pid in workers)
    log = proxy.log()
    assert "Traceback" not in log
    assert "killed by" not in log, log


def test_sigterm_reaching_a_draining_worker_does_not_cut_its_connections(meshproxy, upstreams):
    """`kill -TERM -PGID`, a shell's `kill %1` and systemd's default stop signal every
    process of the group at once: each worker gets the supervisor's Drain message and
    a SIGTERM of its own, in either order. This fixes the order (the worker is held
    stopped until the supervisor has asked it to drain, then gets its SIGTERM): the
    open connection must still finish."""
    acceptor = upstreams.acceptor(timeout=10)
    proxy = meshproxy(tcp_config([endpoint(acceptor.address)], drain_timeout="20s"))
    client = connect(proxy.address(), timeout=10)
    server = acceptor.accept()
    client.sendall(b"c")
    assert recv_exactly(server, 1) == b"c"
    (worker,) = proxy.worker_pids()

    with stopped(worker):
        proxy.send_signal(signal.SIGTERM)
        wait_for(lambda: _draining(proxy), timeout=3, what="/ready to stop answering 200")
        time.sleep(0.2)  # the Drain message is on its way to the worker
    time.sleep(0.5)  # the worker reads it and starts draining
    os.kill(worker, signal.SIGTERM)
    time.sleep(0.2)

    size = 1024 * 1024
    up, down = pattern(size, seed=21), pattern(size, seed=22)
    upstream_side = Exchange(server, down, expect=size).start()
    client_side = Exchange(client, up, expect=size).start()
    assert client_side.result(timeout=10) == (size, sha256(down))
    assert upstream_side.result(timeout=10) == (size, sha256(up))
    client.shutdown(socket.SHUT_WR)
    assert read_to_eof(server) == b""
    server.shutdown(socket.SHUT_WR)
    assert read_to_eof(client) == b""
    assert proxy.wait(timeout=10) == 0
    assert "killed by" not in proxy.log()
