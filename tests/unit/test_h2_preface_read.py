"""`read_preface` on a real socket pair: HTTP/2 clients are recognised, HTTP/1 clients are
told apart on their first bytes (never made to wait), and the bytes stay in the buffer."""

from __future__ import annotations

import socket

import trio

from proxy._core.iobuf import RecvBuffer
from proxy.http.h2codec import PREFACE
from proxy.http.h2server import read_preface


async def _read(chunks: list[bytes], *, close: bool = False) -> tuple[bool, bytes, float]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    buf = RecvBuffer(1024)
    try:
        async with trio.open_nursery() as nursery:

            async def client() -> None:
                for chunk in chunks:
                    theirs.sendall(chunk)
                    await trio.sleep(0.05)
                if close:
                    theirs.shutdown(socket.SHUT_WR)

            nursery.start_soon(client)
            started = trio.current_time()
            verdict = await read_preface(ours.fileno(), buf, timeout=5.0)
            took = trio.current_time() - started
        return verdict, buf.take(len(buf)), took
    finally:
        ours.close()
        theirs.close()


async def test_http2_preface_even_in_pieces():
    verdict, data, _ = await _read([PREFACE[:3], PREFACE[3:10], PREFACE[10:] + b"\x00\x00\x00\x04\x00"])
    assert verdict is True
    assert data == PREFACE + b"\x00\x00\x00\x04\x00"


async def test_http1_is_told_apart_at_once():
    verdict, data, took = await _read([b"GET / HTTP/1.1\r\n"])
    assert verdict is False and data == b"GET / HTTP/1.1\r\n" and took < 0.04


async def test_a_p_method_waits_only_for_its_second_byte():
    verdict, data, _ = await _read([b"P", b"OST / HTTP/1.1\r\n"])
    assert verdict is False and data.startswith(b"POST")


async def test_a_client_that_closes_early():
    verdict, data, _ = await _read([b"PRI * HT"], close=True)
    assert verdict is False and data == b"PRI * HT"
