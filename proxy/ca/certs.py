"""The CA's own certificates: the root, the intermediate that signs, the API's serving cert.

Every key is ECDSA P-256. CA certificates carry the trust domain's SPIFFE ID as their one
URI SAN (the X.509-SVID spec allows it), so the chain itself says which domain it serves.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ROOT_LIFETIME = timedelta(days=3650)
INTERMEDIATE_LIFETIME = timedelta(days=365)
SERVING_LIFETIME = timedelta(days=30)  # made afresh at every start of `ca serve`
BACKDATE = timedelta(minutes=1)  # tolerate peers whose clocks run a little behind ours


@dataclass(frozen=True)
class Issuer:
    """A certificate with its private key: it can sign."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(trust_domain: str, common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _key_ids(builder: x509.CertificateBuilder, key: ec.EllipticCurvePublicKey,
             issuer: Issuer | None) -> x509.CertificateBuilder:
    builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)
    if issuer is None:
        return builder
    issuer_ski = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski)
    return builder.add_extension(aki, critical=False)


def _ca_cert(trust_domain: str, common_name: str, key: ec.EllipticCurvePrivateKey,
             issuer: Issuer | None, path_length: int, now: datetime,
             lifetime: timedelta) -> Issuer:
    subject = _name(trust_domain, common_name)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if issuer is None else issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]), critical=False)
    )
    builder = _key_ids(builder, key.public_key(), issuer)
    signer = key if issuer is None else issuer.key
    return Issuer(builder.sign(signer, hashes.SHA256()), key)


def make_root(trust_domain: str, now: datetime) -> Issuer:
    return _ca_cert(trust_domain, "meshproxy root CA", new_key(), None, 1, now, ROOT_LIFETIME)


def make_intermediate(root: Issuer, now: datetime) -> Issuer:
    trust_domain = trust_domain_of(root.cert)
    lifetime = min(INTERMEDIATE_LIFETIME, root.cert.not_valid_after_utc - now)
    return _ca_cert(trust_domain, "meshproxy intermediate CA", new_key(), root, 0, now, lifetime)


def trust_domain_of(cert: x509.Certificate) -> str:
    """The trust domain a CA certificate of ours names in its URI SAN."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise ValueError("the CA certificate has no SPIFFE ID") from None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://"):
            return uri.removeprefix("spiffe://").rstrip("/")
    raise ValueError("the CA certificate has no SPIFFE ID")


def _host_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_serving_cert(issuer: Issuer, hosts: list[str], now: datetime) -> Issuer:
    """A TLS server certificate for the CA's API, valid for `hosts` (IPs or DNS names)."""
    key = new_key()
    not_after = min(now + SERVING_LIFETIME, issuer.cert.not_valid_after_utc)
    names = list(dict.fromkeys(_host_name(host) for host in hosts))
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "meshproxy CA API")]))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(max(now - BACKDATE, issuer.cert.not_valid_before_utc))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
    )
    builder = _key_ids(builder, key.public_key(), issuer)
    return Issuer(builder.sign(issuer.key, hashes.SHA256()), key)
