"""The demo's two tiny services, each run as its own process behind its own sidecar.

    python -m proxy.demo.services backend --version v1 --address 127.0.0.1:9101
    python -m proxy.demo.services frontend --address 127.0.0.1:9100 --backend 127.0.0.1:15001

- `backend` answers every request with its name and version, and with the identity of its
  caller as its sidecar vouched for it (the URI of `x-forwarded-client-cert`, which the
  sidecar sets from the caller's mTLS certificate and removes when a client sends it).
- `frontend` answers every request by calling the backend once through its own sidecar's
  outbound listener (which picks v1 or v2, speaks mTLS and retries), and passes on who
  answered: `x-demo-version` (v1 or v2) and `x-demo-caller` (the identity the backend saw).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

import trio

from ..admin import AdminRequest, AdminResponse, bind_listening_socket, serve_admin
from ..config import Address
from ..config.model import parse_address
from .http import HttpClient, HttpError

log = logging.getLogger("meshproxy.demo")

VERSION_HEADER = "x-demo-version"
CALLER_HEADER = "x-demo-caller"
BACKEND_TIMEOUT = 5.0


def caller_identity(xfcc: str | None) -> str:
    """The URI of the last element of an `x-forwarded-client-cert` value ("" if none):
    the element the sidecar in front of this app appended."""
    if not xfcc:
        return ""
    last = xfcc.split(",")[-1]
    for part in last.split(";"):
        key, _, value = part.strip().partition("=")
        if key.lower() == "uri":
            return value.strip().strip('"')
    return ""


class Backend:
    def __init__(self, name: str, version: str) -> None:
        self.name = name
        self.version = version

    async def dispatch(self, request: AdminRequest) -> AdminResponse:
        caller = caller_identity(request.headers.get("x-forwarded-client-cert"))
        body = {"service": self.name, "version": self.version, "caller": caller or None,
                "path": request.path}
        return AdminResponse(200, json.dumps(body).encode() + b"\n", "application/json",
                             headers=((VERSION_HEADER, self.version), (CALLER_HEADER, caller)))


class Frontend:
    def __init__(self, backend: HttpClient) -> None:
        self.backend = backend

    async def dispatch(self, request: AdminRequest) -> AdminResponse:
        try:
            reply = await self.backend.request("GET", "/hello", timeout=BACKEND_TIMEOUT)
        except HttpError as exc:
            return AdminResponse.text(502, f"frontend: backend unreachable through the sidecar ({exc})\n")
        version = reply.headers.get(VERSION_HEADER, "")
        caller = reply.headers.get(CALLER_HEADER, "")
        error = reply.headers.get("x-meshproxy-error", "")
        if reply.status == 200 and version:
            text = f"frontend -> backend {version} (it saw the caller as {caller or 'nobody'})\n"
        else:
            text = f"frontend: the backend call got {reply.status} {error}\n".replace(" \n", "\n")
        return AdminResponse(reply.status, text.encode(),
                             headers=((VERSION_HEADER, version), (CALLER_HEADER, caller)))


async def _serve(app: object, address: Address, name: str) -> None:
    sock = bind_listening_socket(address)
    bound = sock.getsockname()
    log.info("%s listening on %s:%d", name, bound[0], bound[1])
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_admin, app, [sock])
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


async def _main(args: argparse.Namespace) -> None:
    if args.role == "backend":
        await _serve(Backend(args.name, args.version), args.address, f"{args.name} {args.version}")
        return
    client = HttpClient(args.backend, max_connections=128)
    try:
        await _serve(Frontend(client), args.address, "frontend")
    finally:
        await client.aclose()


def _address(text: str) -> Address:
    try:
        return parse_address(text, min_port=1)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m proxy.demo.services",
                                     description="The demo's frontend and backend apps.")
    parser.add_argument("role", choices=["frontend", "backend"])
    parser.add_argument("--address", type=_address, required=True, help="host:port to listen on")
    parser.add_argument("--name", default="backend", help="backend: the name it answers with")
    parser.add_argument("--version", default="v1", help="backend: the version it answers with")
    parser.add_argument("--backend", type=_address, help="frontend: the sidecar's outbound listener")
    args = parser.parse_args(argv)
    if args.role == "frontend" and args.backend is None:
        parser.error("frontend needs --backend")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {args.role} %(levelname)s %(message)s")
    trio.run(_main, args)


if __name__ == "__main__":
    main()
