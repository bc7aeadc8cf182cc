"""`meshproxy ca init | token | serve`: what each command does once its flags are parsed.

User mistakes raise UsageError (the CLI exits 1 with the message).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import trio
from cryptography.hazmat.primitives import serialization

from ..admin.server import bind_listening_socket
from ..config import Address
from ..errors import UsageError
from ..identity.spiffe import SpiffeId, check_trust_domain
from . import directory
from .api import CaApi
from .certs import make_serving_cert
from .failures import FailureLimiter
from .server import serve_ca, server_context

log = logging.getLogger("meshproxy.ca")

LOOPBACK_NAMES = ["127.0.0.1", "localhost"]
WILDCARD_HOSTS = {"0.0.0.0", "::"}  # not a name a client can verify


def init(path: Path, trust_domain: str) -> None:
    try:
        check_trust_domain(trust_domain)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    directory.create_ca(path, trust_domain, datetime.now(UTC))
    log.info("CA for spiffe://%s created in %s; give sidecars %s", trust_domain, path,
             path / directory.TRUST_BUNDLE)


def token(path: Path, identity: str, ttl: float, uses: int) -> str:
    if uses < 1:
        raise UsageError(f"--uses must be at least 1, got {uses}")
    if ttl <= 0:
        raise UsageError("--ttl must be positive")
    store = directory.token_store(path)
    try:
        spiffe_id = SpiffeId.parse_workload(identity, directory.read_trust_domain(path))
    except ValueError as exc:
        raise UsageError(f"--identity: {exc}") from None
    return store.mint(spiffe_id, timedelta(seconds=ttl), uses, datetime.now(UTC))


def serve(path: Path, address: Address) -> None:
    directory.check_key_permissions(path)
    ca = directory.load_signing_ca(path)
    now = datetime.now(UTC)
    if ca.intermediate.cert.not_valid_after_utc <= now:
        raise UsageError(f"the intermediate CA in {path} expired at "
                         f"{ca.intermediate.cert.not_valid_after_utc.isoformat()}")
    hosts = LOOPBACK_NAMES + ([address.host] if address.host not in WILDCARD_HOSTS else [])
    serving = make_serving_cert(ca.intermediate, hosts, now)
    chain = b"".join(cert.public_bytes(serialization.Encoding.PEM)
                     for cert in (serving.cert, ca.intermediate.cert))
    key_pem = serving.key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
    context = server_context(chain, key_pem, client_ca_pem=ca.trust_bundle_pem)
    sock = bind_listening_socket(address, "CA")
    api = CaApi(ca, directory.token_store(path), FailureLimiter())
    host, port = sock.getsockname()[:2]
    log.info("CA for spiffe://%s listening on https://%s", ca.trust_domain, Address(host, port))
    try:
        trio.run(serve_ca, api, sock, context)
    except KeyboardInterrupt:
        pass
