"""The admin HTTP plane (h11 on Trio), served by the supervisor."""

from .server import (
    AdminApp,
    AdminRequest,
    AdminResponse,
    bind_listening_socket,
    serve_admin,
)

__all__ = ["AdminApp", "AdminRequest", "AdminResponse", "bind_listening_socket", "serve_admin"]
