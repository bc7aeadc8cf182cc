"""Where spans go: the `otlp_endpoint` URL, checked once at config time.

Pure: the config check uses it without loading the exporter.
"""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import urlsplit

ENCODINGS = {"protobuf": "application/x-protobuf", "json": "application/json"}  # -> Content-Type


class OtlpEndpoint(NamedTuple):
    host: str
    port: int
    target: str  # the request target: path and query

    @property
    def authority(self) -> str:
        """The `Host` header's value."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_otlp_endpoint(url: str) -> OtlpEndpoint:
    """`http://host[:port]/path` (the full OTLP/HTTP traces URL, e.g. `.../v1/traces`).

    Raises ValueError saying what is wrong: only plain http is spoken (a collector on the
    same host or reached through the mesh), and the URL is used as written.
    """
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"not a URL: {exc}") from None
    if parts.scheme != "http":
        raise ValueError(f"must be an http:// URL, not {parts.scheme or 'no'} scheme")
    if not parts.hostname:
        raise ValueError("names no host")
    if parts.username is not None or parts.fragment:
        raise ValueError("must not hold credentials or a #fragment")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return OtlpEndpoint(parts.hostname, port or 80, target)
