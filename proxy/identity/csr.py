"""A sidecar's side of identity issuance: a key that never leaves memory, its CSR, and the
requests that trade a CSR for an X.509-SVID from `meshproxy ca serve`: the first with the
bootstrap token (`request_svid`), later ones with the current SVID as the TLS client
certificate (`renew_svid`), so a one-use token is enough for a sidecar's whole life.

The CSR carries only the public key: the CA takes the identity from the token or from the
current SVID. Timeouts are the caller's (wrap the requests in `trio.fail_after`).
"""

from __future__ import annotations

import json
import ssl
from datetime import datetime
from typing import NamedTuple

import h11
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..config import Address
from ..config.model import format_duration
from .tls import load_cert_chain

MAX_REPLY = 256 * 1024


class Svid(NamedTuple):
    cert_pem: bytes
    chain_pems: list[bytes]  # intermediates, leaf's issuer first
    bundle_pem: bytes  # the trust domain's roots
    not_after: datetime


class SvidRequestError(Exception):
    """The CA refused the request or answered with something that is not an SVID for us."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def generate_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def build_csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A PEM CSR with an empty subject: its signature proves we hold `key`, nothing more."""
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def _client_context(trust_bundle_pem: bytes) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=trust_bundle_pem.decode("ascii"))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


async def _post(ca: Address, context: ssl.SSLContext, path: str, body: bytes) -> tuple[int, bytes]:
    stream = await trio.open_ssl_over_tcp_stream(ca.host, ca.port, ssl_context=context,
                                                 https_compatible=True)
    async with stream:
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(method="POST", target=path, headers=[
            ("host", str(ca)), ("content-type", "application/json"),
            ("content-length", str(len(body))), ("connection", "close")])
        await stream.send_all(conn.send(request) + conn.send(h11.Data(data=body))
                              + conn.send(h11.EndOfMessage()))
        status, reply = 0, bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(16384))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                reply += event.data
                if len(reply) > MAX_REPLY:
                    raise SvidRequestError(f"the CA's reply exceeds {MAX_REPLY} bytes")
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                return status, bytes(reply)


async def request_svid(ca: Address, token: str, trust_bundle_pem: bytes,
                       key: ec.EllipticCurvePrivateKey, ttl: float | None = None) -> Svid:
    """POST a CSR for `key` with `token` to the CA, verified against `trust_bundle_pem`.

    Raises SvidRequestError when the CA says no or replies with a certificate for another
    key. Connection failures raise OSError, or trio.BrokenResourceError whose __cause__ says
    why (ssl.SSLCertVerificationError when the CA's certificate does not chain to the bundle).
    """
    request: dict[str, str] = {"csr": build_csr(key).decode("ascii"), "token": token}
    return await _exchange(ca, _client_context(trust_bundle_pem), "/v1/sign", request, key, ttl)


async def renew_svid(ca: Address, trust_bundle_pem: bytes, current_chain_pem: bytes,
                     current_key: ec.EllipticCurvePrivateKey, key: ec.EllipticCurvePrivateKey,
                     ttl: float | None = None) -> Svid:
    """A new SVID for `key`, for the identity of the current one (`current_chain_pem`, leaf
    first, with its `current_key`), which authenticates the request as the TLS client
    certificate. Raises like `request_svid`; an expired current SVID fails the handshake."""
    context = _client_context(trust_bundle_pem)
    load_cert_chain(context, current_chain_pem, _key_pem(current_key))
    request = {"csr": build_csr(key).decode("ascii")}
    return await _exchange(ca, context, "/v1/renew", request, key, ttl)


async def _exchange(ca: Address, context: ssl.SSLContext, path: str, request: dict[str, str],
                    key: ec.EllipticCurvePrivateKey, ttl: float | None) -> Svid:
    if ttl is not None:
        request["ttl"] = format_duration(ttl)
    try:
        status, body = await _post(ca, context, path, json.dumps(request).encode())
    except h11.ProtocolError as exc:
        raise SvidRequestError(f"the CA spoke broken HTTP: {exc}") from None
    try:
        reply = json.loads(body)
    except ValueError:
        raise SvidRequestError(f"the CA answered {status} with a body that is not JSON", status) from None
    if status != 200:
        message = reply.get("message", "") if isinstance(reply, dict) else ""
        raise SvidRequestError(f"the CA refused: {status} {message}".rstrip(), status)
    try:
        cert = x509.load_pem_x509_certificate(reply["certificate"].encode())
        chain = [pem.encode() for pem in reply["chain"]]
        bundle = reply["trust_bundle"].encode()
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise SvidRequestError(f"the CA's reply is not an SVID: {exc!r}") from None
    if cert.public_key() != key.public_key():
        raise SvidRequestError("the CA issued a certificate for another key")
    return Svid(cert.public_bytes(serialization.Encoding.PEM), chain, bundle, cert.not_valid_after_utc)
