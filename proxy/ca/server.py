"""The CA's HTTPS server: h11 over Trio's SSLStream, one request at a time per connection.

Bounded: connections past MAX_CONNECTIONS are closed at once, bodies past MAX_BODY get 413,
and each connection has REQUEST_TIMEOUT for its handshake and for each request.
"""

from __future__ import annotations

import logging
import socket
import ssl

import h11
import trio

from .. import __version__
from ..identity.tls import load_cert_chain
from .api import ApiRequest, ApiResponse, CaApi

log = logging.getLogger("meshproxy.ca")

MAX_BODY = 64 * 1024
# After refusing a request early, its body is read away for up to this long and this much.
LINGER_TIME = 2.0
LINGER_BYTES = 4 * MAX_BODY
MAX_CONNECTIONS = 256
REQUEST_TIMEOUT = 10.0


def server_context(cert_chain_pem: bytes, key_pem: bytes, client_ca_pem: bytes | None = None) -> ssl.SSLContext:
    """TLS 1.2 or later with the given chain (loaded without the key touching a disk).

    With `client_ca_pem`, a client may present a certificate (a sidecar renewing its SVID);
    one that does not chain to those roots, or has expired, fails the handshake."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if client_ca_pem is not None:
        context.verify_mode = ssl.CERT_OPTIONAL
        context.load_verify_locations(cadata=client_ca_pem.decode("ascii"))
    load_cert_chain(context, cert_chain_pem, key_pem)
    return context


class _TooLarge(Exception):
    pass


async def _read_request(conn: h11.Connection, stream: trio.SSLStream[trio.SocketStream],
                        client: tuple[str, int], client_cert: bytes | None) -> ApiRequest | None:
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(16384))
        elif isinstance(event, h11.Request):
            head = event
            length = dict(event.headers).get(b"content-length", b"0")
            if int(length) > MAX_BODY:  # h11 has checked it is digits
                raise _TooLarge
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise _TooLarge
        elif isinstance(event, h11.EndOfMessage) and head is not None:
            path = head.target.decode("ascii", "replace").partition("?")[0]
            return ApiRequest(head.method.decode("ascii"), path, bytes(body), client, client_cert)
        elif isinstance(event, h11.ConnectionClosed):
            return None


async def _send(conn: h11.Connection, stream: trio.SSLStream[trio.SocketStream],
                response: ApiResponse) -> None:
    headers = [
        ("content-type", response.content_type),
        ("content-length", str(len(response.body))),
        ("server", f"meshproxy-ca/{__version__}"),
        *response.headers,
    ]
    data = conn.send(h11.Response(status_code=response.status, headers=headers))
    data += conn.send(h11.Data(data=response.body)) if response.body else b""
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)


async def _linger(stream: trio.SSLStream[trio.SocketStream]) -> None:
    """After an early error reply: read away what the client is still sending (bounded in
    bytes and time), so that closing does not reset the connection before it reads the reply."""
    received = 0
    with trio.move_on_after(LINGER_TIME):
        try:
            while received < LINGER_BYTES:
                data = await stream.receive_some(16384)
                if not data:
                    return
                received += len(data)
        except trio.BrokenResourceError:
            return


async def _serve_requests(api: CaApi, stream: trio.SSLStream[trio.SocketStream],
                          client: tuple[str, int]) -> None:
    client_cert = stream.getpeercert(binary_form=True)  # verified in the handshake, or None
    conn = h11.Connection(h11.SERVER)
    while True:
        with trio.move_on_after(REQUEST_TIMEOUT) as timer:
            try:
                request = await _read_request(conn, stream, client, client_cert)
            except (h11.RemoteProtocolError, _TooLarge) as exc:
                status, code = ((413, "too_large") if isinstance(exc, _TooLarge)
                                else (exc.error_status_hint, "bad_http"))
                message = f"bodies are limited to {MAX_BODY} bytes" if status == 413 else str(exc)
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    await _send(conn, stream, ApiResponse.error(status, code, message,
                                                                (("connection", "close"),)))
                    await _linger(stream)
                return
            if request is None:
                return
            try:
                response = await api.dispatch(request)
            except Exception:
                log.exception("CA %s %s failed", request.method, request.path)
                response = ApiResponse.error(500, "internal", "internal error, see the CA log")
            await _send(conn, stream, response)
        if timer.cancelled_caught or h11.MUST_CLOSE in (conn.our_state, conn.their_state):
            return
        conn.start_next_cycle()


async def _serve_connection(api: CaApi, context: ssl.SSLContext, limiter: trio.CapacityLimiter,
                            tcp: trio.SocketStream) -> None:
    try:
        limiter.acquire_nowait()
    except trio.WouldBlock:
        await tcp.aclose()
        return
    try:
        client = tcp.socket.getpeername()[:2]
        stream = trio.SSLStream(tcp, context, server_side=True, https_compatible=True)
        with trio.move_on_after(REQUEST_TIMEOUT) as handshake:
            await stream.do_handshake()
        if handshake.cancelled_caught:
            return
        await _serve_requests(api, stream, client)
        await stream.aclose()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError,
            OSError) as exc:
        log.debug("CA connection ended: %r", exc)
    finally:
        limiter.release()
        await tcp.aclose()


async def serve_ca(api: CaApi, sock: socket.socket, context: ssl.SSLContext, *,
                   task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the API on a bound, listening socket until cancelled."""
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    limiter = trio.CapacityLimiter(MAX_CONNECTIONS)
    await trio.serve_listeners(lambda tcp: _serve_connection(api, context, limiter, tcp),
                               [listener], task_status=task_status)
