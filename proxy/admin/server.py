"""The admin HTTP plane: h11 on Trio, served by the supervisor.

Handlers are plain functions from an `AdminRequest` to an `AdminResponse`
registered per (method, path); the server does the HTTP. Reads are GET, changes
are POST or PUT. Bodies are bounded; each connection has a time limit per
request so a stuck client cannot hold the admin plane.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

import h11
import trio

from .. import __version__
from ..config import Address
from ..errors import UsageError

log = logging.getLogger("meshproxy.admin")

MAX_BODY = 16 * 1024 * 1024
REQUEST_TIMEOUT = 30.0


@dataclass(frozen=True)
class AdminRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class AdminResponse:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = field(default=())

    @classmethod
    def json(cls, status: int, value: object) -> AdminResponse:
        return cls(status, json.dumps(value, indent=2).encode() + b"\n", "application/json")

    @classmethod
    def text(cls, status: int, text: str) -> AdminResponse:
        return cls(status, text.encode())


Handler = Callable[[AdminRequest], Awaitable[AdminResponse]]


class HttpApp(Protocol):
    async def dispatch(self, request: AdminRequest) -> AdminResponse: ...


class AdminApp:
    """The route table of the admin plane, behind an optional bearer token."""

    def __init__(self, token: bytes | None = None) -> None:
        self._routes: dict[str, dict[str, Handler]] = {}
        self._token = token

    def route(self, method: str, path: str, handler: Handler) -> None:
        self._routes.setdefault(path, {})[method] = handler

    def _authorized(self, request: AdminRequest) -> bool:
        if self._token is None:
            return True
        scheme, _, credential = request.headers.get("authorization", "").partition(" ")
        # Compare in constant time: the answer must not leak how much of a guess was right.
        return scheme.lower() == "bearer" and hmac.compare_digest(credential.strip().encode(), self._token)

    async def dispatch(self, request: AdminRequest) -> AdminResponse:
        if not self._authorized(request):
            return AdminResponse(401, b"a valid bearer token is required\n",
                                 headers=(("www-authenticate", 'Bearer realm="meshproxy-admin"'),))
        methods = self._routes.get(request.path)
        if methods is None:
            return AdminResponse.text(404, f"no admin endpoint {request.path}\n")
        handler = methods.get(request.method)
        if handler is None:
            allowed = ", ".join(sorted(methods))
            return AdminResponse(405, f"use {allowed}\n".encode(), headers=(("allow", allowed),))
        return await handler(request)


async def _read_request(conn: h11.Connection, stream: trio.SocketStream) -> AdminRequest | None:
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(65536)
            conn.receive_data(data)
            continue
        if isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise h11.RemoteProtocolError("request body too large", error_status_hint=413)
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            target = urlsplit(head.target.decode("ascii", "replace"))
            return AdminRequest(
                method=head.method.decode("ascii"),
                path=target.path,
                query=parse_qs(target.query),
                headers={k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers},
                body=bytes(body),
            )
        elif isinstance(event, h11.ConnectionClosed):
            return None


async def _send(conn: h11.Connection, stream: trio.SocketStream, response: AdminResponse) -> None:
    headers = [
        ("content-type", response.content_type),
        ("content-length", str(len(response.body))),
        ("server", f"meshproxy/{__version__}"),
        *response.headers,
    ]
    data = conn.send(h11.Response(status_code=response.status, headers=headers))
    data += conn.send(h11.Data(data=response.body)) if response.body else b""
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)


async def _serve_connection(app: HttpApp, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            with trio.move_on_after(REQUEST_TIMEOUT):
                try:
                    request = await _read_request(conn, stream)
                except h11.RemoteProtocolError as exc:
                    if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        await _send(conn, stream, AdminResponse.text(exc.error_status_hint, f"{exc}\n"))
                    return
                if request is None:
                    return
                try:
                    response = await app.dispatch(request)
                except Exception:
                    log.exception("admin %s %s failed", request.method, request.path)
                    response = AdminResponse.text(500, "internal error, see the log\n")
                await _send(conn, stream, response)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError):
        return
    finally:
        await stream.aclose()


async def serve_admin(
    app: HttpApp,
    sockets: list[socket.socket],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` on already-bound listening sockets until cancelled."""
    listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(sock)) for sock in sockets]
    await trio.serve_listeners(lambda stream: _serve_connection(app, stream), listeners,
                               task_status=task_status)


def bind_listening_socket(address: Address, what: str = "admin") -> socket.socket:
    """Bind and listen on `address` (port 0 picks one), for a small h11 server: the admin
    plane, the CA, the demo services. Failures are UsageErrors naming `what` address."""
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, kind, proto, _, sockaddr = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise UsageError(f"{what} address {address}: {exc}") from exc
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {what} address {address}: {exc.strerror}") from exc
    return sock
