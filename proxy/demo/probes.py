"""Calls the policy must refuse, and what the sidecars' metrics say about mTLS.

    await plaintext_call(backend.inbound, "backend-v1")    # refused: strict mTLS only
    context = await intruder_context(ca, bundle, token)     # an SVID the policy does not name
    await intruder_call(backend.inbound, "backend-v1", context, identity)   # 403 forbidden
    mtls_evidence(metrics_by_service, callers_seen)         # every mesh hop over mTLS?

The intruder is a workload the CA vouches for (a valid SVID of the trust domain) that the
backends' policy does not name: its TLS handshake succeeds, its request is denied.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import trio
from cryptography.hazmat.primitives import serialization

from ..config import Address
from ..identity.csr import SvidRequestError, generate_key, request_svid
from ..identity.tls import load_cert_chain
from .http import HttpError, fetch

PROBE_TIMEOUT = 12.0  # a strict listener gives a client 10s to complete its handshake


@dataclass(frozen=True)
class Probe:
    caller: str  # who called: "plaintext client", "spiffe://.../intruder"
    target: str  # which service
    outcome: str  # "refused", "403 forbidden", "200", ...
    refused: bool  # the call did not reach the app

    def as_dict(self) -> dict[str, Any]:
        return {"caller": self.caller, "target": self.target, "outcome": self.outcome,
                "refused": self.refused}


async def plaintext_call(address: Address, target: str) -> Probe:
    """A plain HTTP request to an mTLS-only listener: the connection must close unanswered."""
    caller = "plaintext client (no certificate)"
    try:
        reply = await fetch(address, "GET", "/", timeout=PROBE_TIMEOUT)
    except HttpError as exc:
        return Probe(caller, target, f"refused (connection closed: {exc.code})", True)
    return Probe(caller, target, f"{reply.status}", reply.status in (400, 403))


async def intruder_context(ca: Address, bundle_pem: bytes, token: str) -> ssl.SSLContext:
    """A client TLS context with an SVID the CA issues for `token`'s identity. Raises
    IntruderError when the CA gives none."""
    key = generate_key()
    try:
        with trio.fail_after(10):
            svid = await request_svid(ca, token, bundle_pem, key, ttl=600.0)
    except (OSError, trio.BrokenResourceError, trio.TooSlowError, SvidRequestError) as exc:
        raise IntruderError(f"no certificate from the CA: {exc}") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # peers are named by their SVID, not a host name
    context.load_verify_locations(cadata=bundle_pem.decode("ascii"))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    load_cert_chain(context, svid.cert_pem + b"".join(svid.chain_pems), key_pem)
    return context


class IntruderError(Exception):
    pass


async def intruder_call(address: Address, target: str, context: ssl.SSLContext, identity: str) -> Probe:
    """A request with a valid SVID for `identity` (in `context`), which the target's policy
    does not allow: the handshake succeeds, the request must get 403."""
    try:
        reply = await fetch(address, "GET", "/", timeout=PROBE_TIMEOUT, ssl_context=context)
    except HttpError as exc:
        return Probe(identity, target, f"refused ({exc.code})", True)
    error = reply.headers.get("x-meshproxy-error", "")
    return Probe(identity, target, f"{reply.status} {error}".strip(), reply.status == 403)


def mtls_evidence(handshakes_ok: Mapping[str, float], callers: Mapping[str, int], frontend_id: str,
                  backends: list[str]) -> dict[str, Any]:
    """Whether every hop between sidecars was mTLS, from two sides:

    - the backends' sidecars: their inbound listeners take TLS only (`tls: strict`), and
      counted accepted handshakes;
    - the backend apps: every answer the load generator got names the caller the backend
      saw, which its sidecar took from the caller's verified certificate; all must be the
      frontend's identity.

    `handshakes_ok`: backend sidecar -> TLS handshakes its inbound listener accepted;
    `callers`: identity the backend app saw the caller as -> answers.
    """
    handshakes = {name: handshakes_ok[name] for name in backends if name in handshakes_ok}
    answered = sum(callers.values())
    verified = callers.get(frontend_id, 0)
    every_hop = answered > 0 and verified == answered and all(n > 0 for n in handshakes.values()) \
        and len(handshakes) == len(backends)
    return {"every_hop": every_hop, "backend_answers": answered, "caller_verified_as_frontend": verified,
            "other_callers": {k or "(none)": v for k, v in callers.items() if k != frontend_id},
            "tls_handshakes_ok": handshakes}
