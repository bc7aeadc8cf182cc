"""TLS for the data path: `ssl` contexts made from this sidecar's SVID, and the checks a
peer's certificate must pass to count as an X.509-SVID of our trust domain.

    contexts = TlsContexts.build(chain_pem, key_pem, bundle_pem, "spiffe://mesh.local/ns/a/sa/b")
    contexts.server, contexts.client          # ssl.SSLContext, for SSLObject/MemoryBIO use
    peer = check_peer_svid(der, contexts.trust_domain)   # PeerSvidError unless acceptable

Both contexts: TLS 1.2 or later (1.3 preferred), AEAD cipher suites only (ECDHE with AES-GCM
or ChaCha20-Poly1305 for 1.2; 1.3 has nothing else), no compression, renegotiation or session
tickets, and a certificate required from the peer, verified against the trust bundle. Host
names are not checked: a peer is named by the URI SAN of its SVID, which `check_peer_svid`
reads once OpenSSL has verified the chain and the validity period.

The ssl module loads keys only from files, so the PEMs pass through memfd files (never on
disk) opened by path and closed when loaded; without memfd, a private temporary directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import ssl
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtensionOID

from .spiffe import SpiffeId

TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


class PeerSvidError(ValueError):
    """A peer's certificate chained to the trust bundle but is not a workload SVID of our
    trust domain (more or fewer than one URI SAN, a CA certificate, another domain, ...)."""


@dataclass(frozen=True)
class PeerSvid:
    """A verified peer: its SPIFFE ID and the SHA-256 of its certificate (hex)."""

    spiffe_id: str
    cert_sha256: str


def check_peer_svid(der: bytes | None, trust_domain: str) -> PeerSvid:
    """The peer's identity from its leaf certificate (DER, as `getpeercert(True)` returns it)."""
    if not der:
        raise PeerSvidError("the peer presented no certificate")
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise PeerSvidError(f"the peer's certificate does not parse: {exc}") from None
    return PeerSvid(svid_id(cert, trust_domain), hashlib.sha256(der).hexdigest())


def svid_id(cert: x509.Certificate, trust_domain: str | None) -> str:
    """The SPIFFE ID of a workload X.509-SVID, checked per the SPIFFE spec: exactly one URI
    SAN naming a workload (in `trust_domain` unless None), not a CA, not a certificate signer."""
    try:
        extensions = cert.extensions
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise PeerSvidError(f"the certificate's extensions do not parse: {exc}") from None
    try:
        constraints = extensions.get_extension_for_oid(ExtensionOID.BASIC_CONSTRAINTS).value
    except x509.ExtensionNotFound:
        constraints = None
    if isinstance(constraints, x509.BasicConstraints) and constraints.ca:
        raise PeerSvidError("the certificate is a CA (CA:true), not a workload SVID")
    try:
        usage = extensions.get_extension_for_oid(ExtensionOID.KEY_USAGE).value
    except x509.ExtensionNotFound:
        usage = None
    if isinstance(usage, x509.KeyUsage) and (usage.key_cert_sign or usage.crl_sign):
        raise PeerSvidError("the certificate may sign certificates; a workload SVID may not")
    try:
        names = extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        raise PeerSvidError("the certificate has no URI SAN; an SVID has exactly one") from None
    uris = names.get_values_for_type(x509.UniformResourceIdentifier) \
        if isinstance(names, x509.SubjectAlternativeName) else []
    if len(uris) != 1:
        raise PeerSvidError(f"the certificate has {len(uris)} URI SANs; an SVID has exactly one")
    try:
        spiffe_id = SpiffeId.parse(uris[0])
    except ValueError as exc:
        raise PeerSvidError(f"the URI SAN is not a SPIFFE ID: {exc}") from None
    if not spiffe_id.path:
        raise PeerSvidError(f"{uris[0]!r} names a trust domain, not a workload")
    if trust_domain is not None and spiffe_id.trust_domain != trust_domain:
        raise PeerSvidError(f"{uris[0]!r} is not in the trust domain {trust_domain!r}")
    return uris[0]


@dataclass(frozen=True)
class TlsContexts:
    """What one SVID gives the data path: contexts to accept and to originate mTLS."""

    spiffe_id: str
    trust_domain: str
    server: ssl.SSLContext
    client: ssl.SSLContext
    http_server: ssl.SSLContext  # `server` offering HTTP/2 and HTTP/1.1 by ALPN, for HTTP listeners

    @classmethod
    def build(cls, cert_chain_pem: bytes, key_pem: bytes, bundle_pem: bytes, spiffe_id: str) -> TlsContexts:
        """Raises ssl.SSLError or ValueError when the PEMs do not make a usable pair."""
        trust_domain = SpiffeId.parse(spiffe_id).trust_domain
        http_server = server_context(cert_chain_pem, key_pem, bundle_pem)
        # The HTTP driver tells the protocols apart by the first bytes (the HTTP/2 preface),
        # so ALPN only has to let a client that asks for h2 speak it.
        http_server.set_alpn_protocols(["h2", "http/1.1"])
        return cls(spiffe_id, trust_domain,
                   server_context(cert_chain_pem, key_pem, bundle_pem),
                   client_context(cert_chain_pem, key_pem, bundle_pem),
                   http_server)


def server_context(cert_chain_pem: bytes, key_pem: bytes, bundle_pem: bytes) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context, cert_chain_pem, key_pem, bundle_pem)
    context.num_tickets = 0  # TLS 1.3: no session tickets either
    return context


def client_context(cert_chain_pem: bytes, key_pem: bytes, bundle_pem: bytes) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # peers are named by their SVID, checked after the handshake
    _harden(context, cert_chain_pem, key_pem, bundle_pem)
    return context


def _harden(context: ssl.SSLContext, cert_chain_pem: bytes, key_pem: bytes, bundle_pem: bytes) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.load_verify_locations(cadata=bundle_pem.decode("ascii"))
    load_cert_chain(context, cert_chain_pem, key_pem)


def load_cert_chain(context: ssl.SSLContext, cert_chain_pem: bytes, key_pem: bytes) -> None:
    """`context.load_cert_chain` from PEM bytes, without the key touching a disk."""
    with _pem_files(cert_chain_pem, key_pem) as (cert_path, key_path):
        context.load_cert_chain(cert_path, key_path)


@contextlib.contextmanager
def _pem_files(*blobs: bytes) -> Iterator[list[str]]:
    fds: list[int] = []
    try:
        for blob in blobs:
            fds.append(_memfd(blob))
    except (AttributeError, OSError):  # no memfd_create: a private directory, gone at once
        for fd in fds:
            os.close(fd)
        with tempfile.TemporaryDirectory(prefix="meshproxy-tls-") as temp:  # mode 0700
            paths = []
            for i, blob in enumerate(blobs):
                path = Path(temp, f"{i}.pem")
                path.touch(0o600)
                path.write_bytes(blob)
                paths.append(str(path))
            yield paths
        return
    try:
        yield [f"/proc/self/fd/{fd}" for fd in fds]
    finally:
        for fd in fds:
            os.close(fd)


def _memfd(blob: bytes) -> int:
    fd = os.memfd_create("meshproxy-pem", os.MFD_CLOEXEC)
    try:
        view = memoryview(blob)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:
        os.close(fd)
        raise
    return fd
