"""Upstream name resolution: IP literals pass through, names are cached, then looked up again."""

from __future__ import annotations

import socket

import pytest
import trio

from proxy.config import Address
from proxy.errors import UpstreamConnectError
from proxy.net import connect as connect_module


async def test_ip_literals_are_not_looked_up():
    assert await connect_module.resolve(Address("127.0.0.1", 80)) == "127.0.0.1"
    assert await connect_module.resolve(Address("::1", 80)) == "::1"


async def test_names_are_cached_then_refreshed(monkeypatch, autojump_clock):
    answers = iter(["127.0.0.2", "127.0.0.3"])
    calls = []

    async def fake_getaddrinfo(host, port, **kwargs):
        calls.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))]

    monkeypatch.setattr(trio.socket, "getaddrinfo", fake_getaddrinfo)
    monkeypatch.setattr(connect_module, "_resolved", {})
    address = Address("svc.internal", 9000)
    assert await connect_module.resolve(address) == "127.0.0.2"
    assert await connect_module.resolve(address) == "127.0.0.2"
    assert calls == ["svc.internal"]
    await trio.sleep(connect_module.DNS_TTL + 1)
    assert await connect_module.resolve(address) == "127.0.0.3"
    assert len(calls) == 2


async def test_a_failing_resolver_keeps_the_last_answer(monkeypatch, autojump_clock):
    async def ok(host, port, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.4", port))]

    async def failing(host, port, **kwargs):
        raise socket.gaierror(socket.EAI_AGAIN, "temporary failure")

    monkeypatch.setattr(connect_module, "_resolved", {})
    monkeypatch.setattr(trio.socket, "getaddrinfo", ok)
    address = Address("svc.internal", 9000)
    assert await connect_module.resolve(address) == "127.0.0.4"
    await trio.sleep(connect_module.DNS_TTL + 1)
    monkeypatch.setattr(trio.socket, "getaddrinfo", failing)
    assert await connect_module.resolve(address) == "127.0.0.4"
    with pytest.raises(UpstreamConnectError) as info:
        await connect_module.resolve(Address("never.resolved", 1))
    assert info.value.code == "dns_failed"


async def test_localhost_resolves_for_real():
    assert await connect_module.resolve(Address("localhost", 80)) in ("127.0.0.1", "::1")
