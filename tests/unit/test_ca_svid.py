"""The CA's certificates: the root/intermediate chain and the fixed X.509-SVID profile."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store

from proxy.ca.certs import Issuer, make_intermediate, make_root, trust_domain_of
from proxy.ca.svid import (
    DEFAULT_TTL,
    MAX_TTL,
    CsrError,
    checked_public_key,
    issue_svid,
    svid_lifetime,
)
from proxy.identity import SpiffeId, build_csr, generate_key

DOMAIN = "mesh.local"
WEB = SpiffeId.parse(f"spiffe://{DOMAIN}/ns/default/sa/web")
NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture(scope="module")
def chain() -> tuple[Issuer, Issuer]:
    root = make_root(DOMAIN, NOW)
    return root, make_intermediate(root, NOW)


def _csr(key, *, sans: tuple[str, ...] = (), ca: bool = False) -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "asks-for-more")]))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(uri) for uri in sans]), critical=False)
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM).decode()


def _ext(cert: x509.Certificate, kind: type) -> x509.Extension:
    return cert.extensions.get_extension_for_class(kind)


# -- the CA chain ----------------------------------------------------------------------------


def test_root_and_intermediate_are_cas_for_the_trust_domain(chain):
    root, intermediate = chain
    assert _ext(root.cert, x509.BasicConstraints).value.path_length == 1
    assert _ext(intermediate.cert, x509.BasicConstraints).value.path_length == 0
    for cert in (root.cert, intermediate.cert):
        assert _ext(cert, x509.BasicConstraints).critical
        assert _ext(cert, x509.KeyUsage).value.key_cert_sign
        assert trust_domain_of(cert) == DOMAIN
        assert isinstance(cert.public_key().curve, ec.SECP256R1)
    intermediate.cert.verify_directly_issued_by(root.cert)
    assert intermediate.cert.not_valid_after_utc <= root.cert.not_valid_after_utc


# -- the SVID profile ------------------------------------------------------------------------


def test_an_svid_has_the_fixed_profile_and_chains_to_the_root(chain):
    root, intermediate = chain
    key = generate_key()
    cert = issue_svid(intermediate, checked_public_key(build_csr(key).decode()), WEB,
                      svid_lifetime(None), NOW)

    san = _ext(cert, x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [str(WEB)]
    assert len(list(san.value)) == 1
    assert san.critical  # the subject is empty
    assert cert.subject == x509.Name([])
    assert _ext(cert, x509.BasicConstraints).critical
    assert _ext(cert, x509.BasicConstraints).value.ca is False
    usage = _ext(cert, x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not (usage.value.key_encipherment or usage.value.key_cert_sign)
    assert set(_ext(cert, x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert _ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == \
        _ext(intermediate.cert, x509.SubjectKeyIdentifier).value.key_identifier
    assert _ext(cert, x509.SubjectKeyIdentifier).value == \
        x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    assert cert.public_key() == key.public_key()
    assert cert.not_valid_before_utc == NOW - timedelta(minutes=1)
    assert cert.not_valid_after_utc == NOW + DEFAULT_TTL

    verifier = PolicyBuilder().store(Store([root.cert])).time(NOW).build_client_verifier()
    verified = verifier.verify(cert, [intermediate.cert])
    assert verified.subjects == [x509.UniformResourceIdentifier(str(WEB))]


def test_serials_are_random_positive_and_large(chain):
    _, intermediate = chain
    key = checked_public_key(build_csr(generate_key()).decode())
    serials = {issue_svid(intermediate, key, WEB, DEFAULT_TTL, NOW).serial_number for _ in range(8)}
    assert len(serials) == 8
    assert all(serial > 2**100 for serial in serials)


def test_what_the_csr_asks_for_is_ignored(chain):
    _, intermediate = chain
    greedy = _csr(generate_key(), sans=(f"spiffe://{DOMAIN}/ns/kube-system/sa/admin",), ca=True)
    cert = issue_svid(intermediate, checked_public_key(greedy), WEB, DEFAULT_TTL, NOW)
    assert _ext(cert, x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier) == [str(WEB)]
    assert _ext(cert, x509.BasicConstraints).value.ca is False
    assert cert.subject == x509.Name([])


def test_rsa_keys_also_get_key_encipherment(chain):
    _, intermediate = chain
    key = rsa.generate_private_key(65537, 2048)
    cert = issue_svid(intermediate, checked_public_key(_csr(key)), WEB, DEFAULT_TTL, NOW)
    assert _ext(cert, x509.KeyUsage).value.key_encipherment


def test_p384_is_accepted():
    assert isinstance(checked_public_key(_csr(ec.generate_private_key(ec.SECP384R1()))).curve,
                      ec.SECP384R1)


@pytest.mark.parametrize(("make_key", "message"), [
    (lambda: rsa.generate_private_key(65537, 1024), "at least 2048"),
    (lambda: ec.generate_private_key(ec.SECP521R1()), "secp521r1"),
    (ed25519.Ed25519PrivateKey.generate, "Ed25519"),
], ids=["rsa-1024", "p-521", "ed25519"])
def test_weak_or_unexpected_keys_are_refused(make_key, message):
    with pytest.raises(CsrError, match=message):
        checked_public_key(_csr(make_key()))


def _with_broken_signature(pem: str) -> str:
    der = bytearray(x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the signature's s
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()


def test_a_csr_whose_signature_does_not_verify_is_refused():
    with pytest.raises(CsrError, match="signature"):
        checked_public_key(_with_broken_signature(build_csr(generate_key()).decode()))


NOT_DER = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"


@pytest.mark.parametrize("text", ["", "not pem", NOT_DER, "\u00e9"])
def test_garbage_is_not_a_csr(text):
    with pytest.raises(CsrError):
        checked_public_key(text)


# -- lifetimes -------------------------------------------------------------------------------


def test_ttl_defaults_to_a_day_and_is_capped_at_a_week():
    assert svid_lifetime(None) == timedelta(hours=24)
    assert svid_lifetime(timedelta(hours=1)) == timedelta(hours=1)
    assert svid_lifetime(timedelta(days=30)) == MAX_TTL == timedelta(days=7)


def test_an_svid_never_outlives_its_issuer(chain):
    _, intermediate = chain
    late = intermediate.cert.not_valid_after_utc - timedelta(hours=1)
    key = checked_public_key(build_csr(generate_key()).decode())
    cert = issue_svid(intermediate, key, WEB, MAX_TTL, late)
    assert cert.not_valid_after_utc == intermediate.cert.not_valid_after_utc


def test_an_svid_never_starts_before_its_issuer(chain):
    _, intermediate = chain
    key = checked_public_key(build_csr(generate_key()).decode())
    cert = issue_svid(intermediate, key, WEB, DEFAULT_TTL, intermediate.cert.not_valid_before_utc)
    assert cert.not_valid_before_utc == intermediate.cert.not_valid_before_utc


# -- SPIFFE IDs ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "spiffe://mesh.local/ns/default/sa/web",
    "spiffe://mesh.local",
    "spiffe://a_b-c.d/A.b_c-9",
])
def test_valid_spiffe_ids_round_trip(text):
    assert str(SpiffeId.parse(text)) == text


@pytest.mark.parametrize("text", [
    "http://mesh.local/ns/a",
    "SPIFFE://mesh.local/ns/a",
    "spiffe://Mesh.local/ns/a",
    "spiffe://mesh.local:8443/ns/a",
    "spiffe://user@mesh.local/ns/a",
    "spiffe:///ns/a",
    "spiffe://mesh.local/",
    "spiffe://mesh.local/ns//a",
    "spiffe://mesh.local/ns/../a",
    "spiffe://mesh.local/ns/a?x=1",
    "spiffe://mesh.local/ns/a#f",
    "spiffe://mesh.local/ns/%41",
    "spiffe://mesh.local/" + "a" * 2048,
])
def test_invalid_spiffe_ids_are_refused(text):
    with pytest.raises(ValueError):
        SpiffeId.parse(text)


def test_a_workload_id_has_a_path_in_the_trust_domain():
    assert SpiffeId.parse_workload(str(WEB), DOMAIN) == WEB
    with pytest.raises(ValueError, match="trust domain"):
        SpiffeId.parse_workload("spiffe://other.local/ns/a", DOMAIN)
    with pytest.raises(ValueError, match="path"):
        SpiffeId.parse_workload(f"spiffe://{DOMAIN}", DOMAIN)
