"""A small HTTP/1.1 client on h11 and Trio, for the demo: its load generator, its apps' calls
through their sidecars, and the admin plane. Keep-alive connections to one address, a
bounded number of them; every request has a deadline.

    client = HttpClient(Address("127.0.0.1", 8080), max_connections=64)
    reply = await client.request("GET", "/", timeout=5)        # Reply(status, headers, body)
    await client.aclose()
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import h11
import trio

from ..config import Address

MAX_BODY = 16 * 1024 * 1024


class HttpError(Exception):
    """No usable answer: refused, reset, closed early, broken HTTP or too slow.
    `code` is short and stable ("refused", "reset", "timeout", "protocol")."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code


@dataclass(frozen=True)
class Reply:
    status: int
    headers: dict[str, str]  # lowercase names; a repeated header keeps its last value
    body: bytes


class _Connection:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.answered = False  # a byte of the current response has arrived

    async def exchange(self, request: h11.Request, body: bytes) -> Reply:
        data = self.h11.send(request)
        if body:
            data += self.h11.send(h11.Data(data=body))
        data += self.h11.send(h11.EndOfMessage())
        self.answered = False
        await self.stream.send_all(data)
        status, headers, received = 0, {}, bytearray()
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                chunk = await self.stream.receive_some(65536)
                self.answered = self.answered or bool(chunk)
                self.h11.receive_data(chunk)
            elif isinstance(event, h11.Response):
                status = event.status_code
                headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in event.headers}
            elif isinstance(event, h11.Data):
                received += event.data
                if len(received) > MAX_BODY:
                    raise HttpError("protocol", "response body too large")
            elif isinstance(event, h11.EndOfMessage):
                return Reply(status, headers, bytes(received))
            elif isinstance(event, h11.ConnectionClosed):
                raise HttpError("reset", "closed before the response ended")

    @property
    def reusable(self) -> bool:
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    async def aclose(self) -> None:
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await self.stream.aclose()


class HttpClient:
    """Keep-alive connections to one `address`; at most `max_connections` at once (further
    requests wait for one, within their timeout)."""

    def __init__(self, address: Address, max_connections: int = 16,
                 headers: tuple[tuple[str, str], ...] = (), ssl_context: ssl.SSLContext | None = None) -> None:
        self.address = address
        self._ssl = ssl_context
        self._idle: list[_Connection] = []
        self._slots = trio.Semaphore(max_connections)
        self._headers = headers
        self._host = str(address)

    async def request(self, method: str, target: str, *, body: bytes = b"", timeout: float = 5.0,
                      headers: tuple[tuple[str, str], ...] = ()) -> Reply:
        """Send one request; HttpError when there is no complete answer within `timeout`."""
        fields = [("host", self._host), *self._headers, *headers]
        if body or method in ("POST", "PUT"):
            fields.append(("content-length", str(len(body))))
        request = h11.Request(method=method, target=target, headers=fields)
        with trio.move_on_after(timeout) as scope:
            async with self._slots:
                while True:
                    conn = self._idle.pop() if self._idle else None
                    reused = conn is not None
                    if conn is None:
                        conn = await self._open()
                    try:
                        reply = await conn.exchange(request, body)
                    except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, HttpError,
                            h11.ProtocolError) as exc:
                        await conn.aclose()
                        if reused and method == "GET" and not conn.answered:
                            continue  # a kept-alive connection closed while idle: try a new one
                        if isinstance(exc, HttpError):
                            raise
                        code = "protocol" if isinstance(exc, h11.ProtocolError) and conn.answered else "reset"
                        raise HttpError(code, str(exc) or type(exc).__name__) from None
                    except BaseException:
                        await conn.aclose()
                        raise
                    if conn.reusable:
                        conn.h11.start_next_cycle()
                        self._idle.append(conn)
                    else:
                        await conn.aclose()
                    return reply
        assert scope.cancelled_caught
        raise HttpError("timeout", f"no answer within {timeout:g}s")

    async def _open(self) -> _Connection:
        try:
            stream: trio.abc.Stream = await trio.open_tcp_stream(self.address.host, self.address.port)
        except OSError as exc:
            raise HttpError("refused", exc.strerror or str(exc)) from None
        if self._ssl is not None:
            tls = trio.SSLStream(stream, self._ssl, server_hostname=self.address.host,
                                 https_compatible=True)
            try:
                await tls.do_handshake()
            except (trio.BrokenResourceError, ssl.SSLError) as exc:
                await stream.aclose()
                cause = exc.__cause__ or exc
                raise HttpError("tls", str(cause)) from None
            stream = tls
        return _Connection(stream)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.aclose()


async def fetch(address: Address, method: str, target: str, *, body: bytes = b"", timeout: float = 5.0,
                headers: tuple[tuple[str, str], ...] = (), ssl_context: ssl.SSLContext | None = None) -> Reply:
    """One request on a connection of its own."""
    client = HttpClient(address, 1, ssl_context=ssl_context)
    try:
        return await client.request(method, target, body=body, timeout=timeout,
                                    headers=(*headers, ("connection", "close")))
    finally:
        await client.aclose()
