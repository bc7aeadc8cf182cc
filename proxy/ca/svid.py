"""X.509-SVID issuance: a checked CSR's public key plus a token's identity, in a fixed profile.

Only the CSR's key is used. Its subject, requested SANs and extensions are ignored: the
identity comes from the bootstrap token, so a caller cannot ask for a name it was not given.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from ..identity.spiffe import SpiffeId
from .certs import BACKDATE, Issuer

DEFAULT_TTL = timedelta(hours=24)
MAX_TTL = timedelta(days=7)
MIN_RSA_BITS = 2048
ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)

SvidPublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


class CsrError(ValueError):
    """The CSR is unreadable, not signed by its own key, or names a key we do not certify."""


def checked_public_key(csr_pem: str) -> SvidPublicKey:
    """The CSR's public key, once its signature proves the caller holds the private key."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        key = csr.public_key()
        signed = csr.is_signature_valid
    except (ValueError, UnicodeEncodeError):
        raise CsrError("'csr' is not a PEM certificate signing request") from None
    except UnsupportedAlgorithm as exc:
        raise CsrError(f"unsupported key or signature algorithm: {exc}") from None
    if not signed:
        raise CsrError("the CSR signature does not verify with its public key")
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ALLOWED_CURVES):
            raise CsrError(f"EC curve {key.curve.name} is not allowed; use P-256 or P-384")
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise CsrError(f"RSA key of {key.key_size} bits; at least {MIN_RSA_BITS} are required")
        return key
    raise CsrError(f"{type(key).__name__} keys are not allowed; use EC P-256/P-384 or RSA")


def svid_lifetime(requested: timedelta | None) -> timedelta:
    """The requested TTL (default 24h), capped at MAX_TTL."""
    return min(DEFAULT_TTL if requested is None else requested, MAX_TTL)


def issue_svid(issuer: Issuer, key: SvidPublicKey, identity: SpiffeId, ttl: timedelta,
               now: datetime) -> x509.Certificate:
    """Sign an X.509-SVID for `identity`; it never outlives `issuer`."""
    not_before = max(now - BACKDATE, issuer.cert.not_valid_before_utc)
    not_after = min(now + ttl, issuer.cert.not_valid_after_utc)
    issuer_ski = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    is_rsa = isinstance(key, rsa.RSAPublicKey)
    builder = (
        x509.CertificateBuilder()
        # An empty subject is what the SVID spec suggests; RFC 5280 then wants the SAN critical.
        .subject_name(x509.Name([]))
        .issuer_name(issuer.cert.subject)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(str(identity))]), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=is_rsa,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski),
                       critical=False)
    )
    return builder.sign(issuer.key, hashes.SHA256())
