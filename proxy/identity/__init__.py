"""A sidecar's identity: SPIFFE IDs, its in-memory key and CSR, SVID requests to the CA,
the TLS contexts built from its SVID and the checks on a peer's SVID.

`spiffe` is pure and imported by the config; the CSR client (which needs trio) is loaded
on first use of one of its names, so importing the config never imports trio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .spiffe import SpiffeId, check_trust_domain

if TYPE_CHECKING:
    from .csr import (
        Svid,
        SvidRequestError,
        build_csr,
        generate_key,
        renew_svid,
        request_svid,
    )

_FROM_CSR = {"Svid", "SvidRequestError", "build_csr", "generate_key", "renew_svid", "request_svid"}

__all__ = [
    "SpiffeId",
    "Svid",
    "SvidRequestError",
    "build_csr",
    "check_trust_domain",
    "generate_key",
    "renew_svid",
    "request_svid",
]


def __getattr__(name: str) -> Any:
    if name in _FROM_CSR:
        from . import csr

        return getattr(csr, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
