"""Responses the proxy makes itself (errors, no route, 100 Continue).

Every proxy-made error says who failed and why: a status, an
`x-meshproxy-error` code (the same code the logs and metrics use) and a one
line body. Pure: bytes out, nothing else.
"""

from __future__ import annotations

from http import HTTPStatus

from .. import __version__

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"

_DESCRIPTIONS = {
    "no_route": "no route matches this request",
    "connect_refused": "upstream refused the connection",
    "connect_timeout": "upstream did not accept the connection in time",
    "connect_failed": "upstream connection failed",
    "dns_failed": "upstream name did not resolve",
    "upstream_reset": "upstream closed the connection before responding",
    "upstream_timeout": "upstream did not respond in time",
    "upstream_protocol_error": "upstream sent a malformed response",
    "circuit_open": "too many requests to the upstream cluster: shed by its circuit breaker",
    "no_healthy_upstream": "no healthy upstream endpoint",
    "rate_limited": "request rate limit exceeded",
    "fault_abort": "request aborted by fault injection",
    "upstream_protocol_unsupported": "the cluster speaks HTTP/2 only, where this request (a tunnel) has no form",
}


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase for `status` (b"Error" for a code it does not know)."""
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Error"


def local_reply(status: int, code: str, detail: str = "", *, close: bool = False,
                request_id: bytes | None = None) -> bytes:
    """A complete HTTP/1.1 response with an `x-meshproxy-error` code."""
    text = detail or _DESCRIPTIONS.get(code, code.replace("_", " "))
    body = f"meshproxy: {text}\n".encode()
    lines = [
        b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status)),
        b"content-type: text/plain; charset=utf-8\r\n",
        b"content-length: %d\r\n" % len(body),
        b"x-meshproxy-error: " + code.encode() + b"\r\n",
        b"server: meshproxy/" + __version__.encode() + b"\r\n",
    ]
    if request_id:
        lines.append(b"x-request-id: " + request_id + b"\r\n")
    if close:
        lines.append(b"connection: close\r\n")
    lines.append(b"\r\n")
    lines.append(body)
    return b"".join(lines)
