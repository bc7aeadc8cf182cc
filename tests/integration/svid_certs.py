"""Certificates for mTLS tests: SVIDs from an in-memory CA or a real CA directory's
intermediate, including the malformed ones a sidecar must refuse.

    ca = MemoryCa("mesh.local")              # or MemoryCa.from_dir(path) for `ca init`'s CA
    chain_pem, key_pem = ca.svid("spiffe://mesh.local/ns/default/sa/web")
    ca.svid(ID, uris=[ID, OTHER])            # two URI SANs
    ca.svid(ID, ca=True)                     # CA:true
    ca.svid(ID, expired=True)
    ca.bundle_pem                            # the root, for trust bundles
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from proxy.ca.certs import Issuer, make_intermediate, make_root
from proxy.ca.directory import load_signing_ca


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class MemoryCa:
    def __init__(self, trust_domain: str = "mesh.local", *, intermediate: Issuer | None = None,
                 bundle_pem: bytes | None = None) -> None:
        now = datetime.now(UTC)
        if intermediate is None:
            root = make_root(trust_domain, now)
            intermediate = make_intermediate(root, now)
            bundle_pem = pem(root.cert)
        assert bundle_pem is not None
        self.intermediate = intermediate
        self.bundle_pem = bundle_pem

    @classmethod
    def from_dir(cls, path: Path) -> MemoryCa:
        """The CA that `meshproxy ca init` made in `path` (its intermediate signs)."""
        ca = load_signing_ca(path)
        return cls(ca.trust_domain, intermediate=ca.intermediate, bundle_pem=ca.trust_bundle_pem)

    def svid(self, identity: str, *, uris: list[str] | None = None, ca: bool = False,
             expired: bool = False, ttl: timedelta = timedelta(hours=1)) -> tuple[bytes, bytes]:
        """(chain PEM: leaf then intermediate, key PEM), signed by the intermediate."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self.leaf(identity, key.public_key(), uris=uris, ca=ca, expired=expired, ttl=ttl)
        return pem(cert) + pem(self.intermediate.cert), key_pem(key)

    def leaf(self, identity: str, public_key: ec.EllipticCurvePublicKey, *, uris: list[str] | None = None,
             ca: bool = False, expired: bool = False, ttl: timedelta = timedelta(hours=1),
             now: datetime | None = None) -> x509.Certificate:
        now = now or datetime.now(UTC)
        if expired:
            not_before, not_after = now - timedelta(hours=2), now - timedelta(hours=1)
        else:
            not_before, not_after = now - timedelta(minutes=1), now + ttl
        names = [x509.UniformResourceIdentifier(uri) for uri in (uris or [identity])]
        issuer = self.intermediate
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(issuer.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(names), critical=True)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=False,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value),
                critical=False)
        )
        return builder.sign(issuer.key, hashes.SHA256())
