"""A sidecar's identity: SPIFFE IDs, its in-memory key and CSR, SVID requests to the CA."""

from .csr import Svid, SvidRequestError, build_csr, generate_key, request_svid
from .spiffe import SpiffeId, check_trust_domain

__all__ = [
    "SpiffeId",
    "Svid",
    "SvidRequestError",
    "build_csr",
    "check_trust_domain",
    "generate_key",
    "request_svid",
]
