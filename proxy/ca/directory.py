"""The CA directory: what `ca init` writes, with which modes, and what the other commands read.

    DIR/                 0700
      root.key           0600  root key; `ca serve` never reads it, so it can be moved offline
      trust-bundle.pem         the root certificate, for sidecars
      intermediate.key   0600  signs every SVID
      intermediate.pem
      tokens.json        0600  token hashes (tokens.py)
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..errors import UsageError
from .certs import Issuer, make_intermediate, make_root, trust_domain_of
from .tokens import TokenStore

ROOT_KEY = "root.key"
TRUST_BUNDLE = "trust-bundle.pem"
INTERMEDIATE_KEY = "intermediate.key"
INTERMEDIATE_CERT = "intermediate.pem"
TOKENS = "tokens.json"
TOKENS_LOCK = "tokens.lock"
KEY_FILES = (ROOT_KEY, INTERMEDIATE_KEY)


@dataclass(frozen=True)
class SigningCa:
    """What `ca serve` needs: the intermediate that signs and the root sidecars trust."""

    intermediate: Issuer
    trust_bundle_pem: bytes
    trust_domain: str


def _write(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: never follow or reuse something already there; the mode is set before any byte.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as file:
        os.fchmod(file.fileno(), mode)  # the umask may have taken bits off
        file.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def create_ca(path: Path, trust_domain: str, now: datetime) -> None:
    """Make a new CA in `path`, which must not exist or be empty."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"{path} already exists and is not an empty directory; "
                         "refusing to overwrite it (choose a new --dir)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir(mode=0o700, exist_ok=True)
    path.chmod(0o700)
    root = make_root(trust_domain, now)
    intermediate = make_intermediate(root, now)
    _write(path / ROOT_KEY, _key_pem(root.key), 0o600)
    _write(path / INTERMEDIATE_KEY, _key_pem(intermediate.key), 0o600)
    _write(path / INTERMEDIATE_CERT, _cert_pem(intermediate.cert), 0o644)
    _write(path / TRUST_BUNDLE, _cert_pem(root.cert), 0o644)


def check_key_permissions(path: Path) -> None:
    """Refuse key files that anyone but their owner can read or write."""
    exposed = []
    for name in KEY_FILES:
        try:
            mode = (path / name).stat().st_mode
        except FileNotFoundError:
            continue  # the root key may have been taken offline
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            exposed.append(f"{path / name} (mode {stat.S_IMODE(mode):04o})")
    if exposed:
        raise UsageError(f"key files open to group or others: {', '.join(exposed)}; "
                         "run chmod 600 on them")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{path} is missing; is {path.parent} a CA directory (`meshproxy ca init`)?") from None


def read_trust_domain(path: Path) -> str:
    return trust_domain_of(x509.load_pem_x509_certificate(_read(path / INTERMEDIATE_CERT)))


def load_signing_ca(path: Path) -> SigningCa:
    cert = x509.load_pem_x509_certificate(_read(path / INTERMEDIATE_CERT))
    key = serialization.load_pem_private_key(_read(path / INTERMEDIATE_KEY), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UsageError(f"{path / INTERMEDIATE_KEY}: expected an EC private key")
    return SigningCa(Issuer(cert, key), _read(path / TRUST_BUNDLE), trust_domain_of(cert))


def token_store(path: Path) -> TokenStore:
    if not path.is_dir():
        raise UsageError(f"{path} is not a CA directory (`meshproxy ca init` makes one)")
    return TokenStore(path / TOKENS, path / TOKENS_LOCK)
