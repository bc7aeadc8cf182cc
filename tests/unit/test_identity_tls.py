"""TLS contexts from an SVID, and the checks that make a peer certificate an SVID."""

from __future__ import annotations

import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from integration.svid_certs import MemoryCa, pem

from proxy.identity.tls import PeerSvidError, TlsContexts, check_peer_svid, svid_id

WEB = "spiffe://mesh.local/ns/default/sa/web"
API = "spiffe://mesh.local/ns/default/sa/api"
CA = MemoryCa("mesh.local")


def der_of(chain_pem: bytes) -> bytes:
    return x509.load_pem_x509_certificate(chain_pem).public_bytes(Encoding.DER)


def test_a_workload_svid_names_its_identity():
    chain, _ = CA.svid(WEB)
    peer = check_peer_svid(der_of(chain), "mesh.local")
    assert peer.spiffe_id == WEB and len(peer.cert_sha256) == 64


@pytest.mark.parametrize(("make", "message"), [
    (lambda: CA.svid(WEB, uris=[WEB, API])[0], "2 URI SANs"),
    (lambda: CA.svid(WEB, ca=True)[0], "CA:true"),
    (lambda: CA.svid(WEB, uris=["https://web.example"])[0], "not a SPIFFE ID"),
    (lambda: CA.svid(WEB, uris=["spiffe://mesh.local"])[0], "trust domain, not a workload"),
    (lambda: CA.svid("spiffe://other.local/ns/default/sa/web")[0], "not in the trust domain"),
], ids=["two-uris", "ca-true", "not-spiffe", "domain-only", "other-domain"])
def test_certificates_that_are_not_workload_svids_are_refused(make, message):
    with pytest.raises(PeerSvidError, match=message):
        check_peer_svid(der_of(make()), "mesh.local")


def test_no_certificate_or_no_san_is_refused():
    with pytest.raises(PeerSvidError, match="no certificate"):
        check_peer_svid(None, "mesh.local")
    key = ec.generate_private_key(ec.SECP256R1())
    bare = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(x509.Name([]))
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(CA.intermediate.cert.not_valid_before_utc)
            .not_valid_after(CA.intermediate.cert.not_valid_after_utc)
            .sign(key, hashes.SHA256()))
    with pytest.raises(PeerSvidError, match="no URI SAN"):
        svid_id(bare, "mesh.local")


def test_contexts_allow_tls12_and_up_aead_only_and_require_a_peer_certificate():
    chain, key = CA.svid(WEB)
    contexts = TlsContexts.build(chain, key, CA.bundle_pem, WEB)
    assert contexts.trust_domain == "mesh.local"
    for context in (contexts.server, contexts.client):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.options & ssl.OP_NO_COMPRESSION
        assert context.options & ssl.OP_NO_RENEGOTIATION
        names = [cipher["name"] for cipher in context.get_ciphers()]
        assert names and all("GCM" in n or "CHACHA20" in n for n in names), names
    assert contexts.client.check_hostname is False


def _handshake(client: ssl.SSLContext, server: ssl.SSLContext) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    bios = [ssl.MemoryBIO() for _ in range(4)]
    c = client.wrap_bio(bios[0], bios[1], server_side=False)
    s = server.wrap_bio(bios[2], bios[3], server_side=True)
    for _ in range(6):
        for side in (c, s):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        bios[2].write(bios[1].read())
        bios[0].write(bios[3].read())
    return c, s


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_two_sidecars_see_each_others_identity(version):
    web = TlsContexts.build(*CA.svid(WEB), CA.bundle_pem, WEB)
    api = TlsContexts.build(*CA.svid(API), CA.bundle_pem, API)
    web.client.maximum_version = version
    client, server = _handshake(web.client, api.server)
    assert client.version() == server.version() == version.name.replace("v1_", "v1.")
    assert check_peer_svid(server.getpeercert(True), "mesh.local").spiffe_id == WEB
    assert check_peer_svid(client.getpeercert(True), "mesh.local").spiffe_id == API
    if version == ssl.TLSVersion.TLSv1_2:
        name = client.cipher()[0]
        assert name.startswith("ECDHE-ECDSA-") and ("GCM" in name or "CHACHA20" in name), name


def test_a_client_offering_only_cbc_suites_is_refused():
    api = TlsContexts.build(*CA.svid(API), CA.bundle_pem, API)
    weak = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    weak.check_hostname = False
    weak.verify_mode = ssl.CERT_NONE
    weak.maximum_version = ssl.TLSVersion.TLSv1_2
    weak.set_ciphers("ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA")
    with pytest.raises(ssl.SSLError):
        _handshake(weak, api.server)


def test_a_mismatched_key_does_not_build():
    chain, _ = CA.svid(WEB)
    _, other_key = CA.svid(WEB)
    with pytest.raises(ssl.SSLError):
        TlsContexts.build(chain, other_key, CA.bundle_pem, WEB)


def test_the_bundle_must_hold_certificates():
    chain, key = CA.svid(WEB)
    with pytest.raises(ssl.SSLError):
        TlsContexts.build(chain, key, pem(CA.intermediate.cert)[:40], WEB)
