"""`meshproxy demo-upstream`: a tiny HTTP/1.1 origin for the quickstart.

It answers every request with a short text naming itself, the method, the path
and the body size, so a user can see which upstream served a request.
"""

from __future__ import annotations

import logging

from ..admin import AdminRequest, AdminResponse, bind_listening_socket, serve_admin
from ..config import Address

log = logging.getLogger("meshproxy.demo")


class HelloApp:
    def __init__(self, name: str) -> None:
        self.name = name

    async def dispatch(self, request: AdminRequest) -> AdminResponse:
        return AdminResponse.text(
            200,
            f"hello from {self.name}: {request.method} {request.path} ({len(request.body)} bytes)\n",
        )


async def serve(address: Address, name: str) -> None:
    sock = bind_listening_socket(address)
    bound = sock.getsockname()
    log.info("demo upstream %s listening on %s:%d", name, bound[0], bound[1])
    await serve_admin(HelloApp(name), [sock])
