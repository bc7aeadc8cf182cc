"""`meshproxy ca serve` as a real process on 127.0.0.1, driven over real TLS connections.

One CA process serves the whole module. Tokens are minted into its directory by this
process (the file is shared under a lock, as with `meshproxy ca token`). Tests that need
failed attempts of their own connect from another loopback address, since the CA limits
failures per client IP.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store

from proxy.ca.directory import token_store
from proxy.config import Address
from proxy.identity import (
    SpiffeId,
    SvidRequestError,
    build_csr,
    generate_key,
    renew_svid,
    request_svid,
)

from .support import HOST, free_port, meshproxy_command, run_cli, wait_for
from .svid_certs import MemoryCa

DOMAIN = "mesh.local"
WEB = f"spiffe://{DOMAIN}/ns/default/sa/web"
API = f"spiffe://{DOMAIN}/ns/default/sa/api"


@dataclass(frozen=True)
class RunningCa:
    dir: Path
    address: tuple[str, int]
    log: Path

    @property
    def bundle(self) -> Path:
        return self.dir / "trust-bundle.pem"

    def token(self, identity: str, uses: int = 1, ttl: timedelta = timedelta(minutes=10),
              now: datetime | None = None) -> str:
        return token_store(self.dir).mint(SpiffeId.parse(identity), ttl, uses, now or datetime.now(UTC))

    def request(self, method: str, path: str, body: bytes | None = None,
                source: str = HOST) -> tuple[int, dict[str, str], bytes]:
        context = ssl.create_default_context(cafile=self.bundle)
        conn = http.client.HTTPSConnection(*self.address, context=context, timeout=5,
                                           source_address=(source, 0))
        try:
            conn.request(method, path, body=body, headers={"content-type": "application/json"})
            response = conn.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            conn.close()

    def sign(self, csr: str, token: str, source: str = HOST, **extra: str) -> tuple[int, dict]:
        status, _, body = self.request("POST", "/v1/sign",
                                       json.dumps({"csr": csr, "token": token, **extra}).encode(), source)
        return status, json.loads(body)


def _tls_up(address: tuple[str, int], bundle: Path) -> bool:
    context = ssl.create_default_context(cafile=bundle)
    try:
        with socket.create_connection(address, timeout=1) as sock, \
                context.wrap_socket(sock, server_hostname=address[0]):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def ca(tmp_path_factory) -> Iterator[RunningCa]:
    path = tmp_path_factory.mktemp("ca") / "ca"
    init = run_cli("ca", "init", "--dir", str(path), "--trust-domain", DOMAIN)
    assert init.returncode == 0, init.stderr
    running = RunningCa(path, (HOST, free_port()), path.parent / "ca.log")
    with open(running.log, "wb") as log:
        process = subprocess.Popen(
            [*meshproxy_command(), "ca", "serve", "--dir", str(path), "--address", f"{HOST}:{running.address[1]}"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: process.poll() is not None or _tls_up(running.address, running.bundle), 10,
                 "the CA to serve")
        assert process.poll() is None, running.log.read_text()
        yield running
    finally:
        process.kill()
        process.wait(5)


def _csr(key=None, *, sans: tuple[str, ...] = (), ca: bool = False) -> str:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "api")]))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(uri) for uri in sans]), critical=False)
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    csr = builder.sign(key or generate_key(), hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _verified(ca: RunningCa, reply: dict) -> x509.Certificate:
    """The issued leaf, once it verifies through the reply's chain to the CA's root."""
    root = x509.load_pem_x509_certificate(ca.bundle.read_bytes())
    assert reply["trust_bundle"] == ca.bundle.read_text()
    leaf = x509.load_pem_x509_certificate(reply["certificate"].encode())
    chain = [x509.load_pem_x509_certificate(pem.encode()) for pem in reply["chain"]]
    verifier = PolicyBuilder().store(Store([root])).build_client_verifier()
    verifier.verify(leaf, chain)
    return leaf


def _uris(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert len(list(san)) == 1, list(san)
    return san.get_values_for_type(x509.UniformResourceIdentifier)


# -- issuing ---------------------------------------------------------------------------------


def test_a_token_and_a_csr_get_an_svid_for_the_tokens_identity(ca):
    key = generate_key()
    before = datetime.now(UTC)
    status, reply = ca.sign(build_csr(key).decode(), ca.token(WEB), ttl="2h")
    assert status == 200, reply
    cert = _verified(ca, reply)
    assert _uris(cert) == [WEB]
    assert cert.public_key() == key.public_key()
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    skew = timedelta(seconds=5)
    assert before - timedelta(minutes=1) - skew <= cert.not_valid_before_utc <= before
    assert abs(cert.not_valid_after_utc - (before + timedelta(hours=2))) < skew
    assert reply["expires"] == cert.not_valid_after_utc.isoformat().replace("+00:00", "Z")
    log = ca.log.read_text()
    assert f"issued {WEB} serial={cert.serial_number:x}" in log
    assert "caller=127.0.0.1:" in log


def test_serials_are_large_and_distinct_and_ttls_are_capped(ca):
    token = ca.token(WEB, uses=4)
    certs = []
    for ttl in ("24h", "1000h", None, "1m"):
        extra = {"ttl": ttl} if ttl else {}
        status, reply = ca.sign(build_csr(generate_key()).decode(), token, **extra)
        assert status == 200, reply
        certs.append(_verified(ca, reply))
    assert len({cert.serial_number for cert in certs}) == 4
    assert all(cert.serial_number >= 2**100 for cert in certs)
    lifetimes = [cert.not_valid_after_utc - cert.not_valid_before_utc - timedelta(minutes=1) for cert in certs]
    assert [round(life.total_seconds() / 60) for life in lifetimes] == [24 * 60, 7 * 24 * 60, 24 * 60, 1]


def test_a_csr_asking_for_another_name_or_a_ca_still_gets_the_tokens_identity(ca):
    greedy = _csr(sans=(API, f"spiffe://{DOMAIN}/ns/kube-system/sa/admin"), ca=True)
    status, reply = ca.sign(greedy, ca.token(WEB))
    assert status == 200, reply
    cert = _verified(ca, reply)
    assert _uris(cert) == [WEB]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.subject == x509.Name([])


def test_an_rsa_2048_key_is_certified_for_key_encipherment_too(ca):
    status, reply = ca.sign(_csr(rsa.generate_private_key(65537, 2048)), ca.token(API))
    assert status == 200, reply
    cert = _verified(ca, reply)
    assert _uris(cert) == [API]
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_encipherment


# -- refusing --------------------------------------------------------------------------------


def test_a_one_use_token_replayed_is_refused(ca):
    token = ca.token(WEB)
    assert ca.sign(build_csr(generate_key()).decode(), token)[0] == 200
    status, reply = ca.sign(build_csr(generate_key()).decode(), token)
    assert status == 401
    assert reply["error"] == "bad_token"


def test_expired_and_unknown_tokens_are_refused(ca):
    expired = ca.token(WEB, ttl=timedelta(minutes=1), now=datetime.now(UTC) - timedelta(minutes=2))
    for token in (expired, "not-a-token-we-minted"):
        status, reply = ca.sign(build_csr(generate_key()).decode(), token)
        assert status == 401, reply
        assert "certificate" not in reply


def _broken_signature(pem: str) -> str:
    der = bytearray(x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    return x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize(("csr", "message"), [
    (lambda: _broken_signature(build_csr(generate_key()).decode()), "signature"),
    (lambda: _csr(rsa.generate_private_key(65537, 1024)), "2048"),
    (lambda: _csr(ec.generate_private_key(ec.SECP256K1())), "curve"),
    (lambda: "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n", "PEM"),
], ids=["bad-signature", "rsa-1024", "secp256k1", "garbage"])
def test_a_bad_csr_is_refused_without_spending_the_token(ca, csr, message):
    token = ca.token(WEB)
    status, reply = ca.sign(csr(), token)
    assert status == 400, reply
    assert reply["error"] == "bad_csr" and message in reply["message"]
    assert ca.sign(build_csr(generate_key()).decode(), token)[0] == 200


@pytest.mark.parametrize(("body", "message"), [
    (b"{not json", "not JSON"),
    (b"[]", "JSON object"),
    (b'{"csr": "x"}', "'token'"),
    (b'{"csr": 1, "token": "t"}', "'csr'"),
    (b'{"csr": "x", "token": "t", "ttl": 60}', "'ttl'"),
    (b'{"csr": "x", "token": "t", "ttl": "0s"}', "'ttl'"),
    (b'{"csr": "x", "token": "t", "identity": "spiffe://mesh.local/x"}', "identity"),
], ids=["broken", "array", "no-token", "csr-number", "ttl-number", "ttl-zero", "unknown-field"])
def test_a_malformed_request_gets_400_with_a_json_error(ca, body, message):
    status, headers, reply = ca.request("POST", "/v1/sign", body)
    assert status == 400
    assert headers["content-type"] == "application/json"
    error = json.loads(reply)
    assert error["error"] == "bad_request" and message in error["message"]


def test_unknown_paths_wrong_methods_and_big_bodies(ca):
    assert ca.request("GET", "/v1/nothing")[0] == 404
    status, headers, _ = ca.request("GET", "/v1/sign")
    assert (status, headers["allow"]) == (405, "POST")
    assert ca.request("POST", "/v1/bundle")[0] == 405
    status, _, body = ca.request("POST", "/v1/sign", b"{" + b" " * (64 * 1024) + b"}")
    assert status == 413 and json.loads(body)["error"] == "too_large"


def test_the_bundle_endpoint_serves_the_trust_bundle(ca):
    status, headers, body = ca.request("GET", "/v1/bundle")
    assert status == 200
    assert headers["content-type"] == "application/x-pem-file"
    assert body == ca.bundle.read_bytes()


def test_repeated_failures_from_one_ip_get_429_while_other_ips_go_on(ca):
    guesser = "127.0.0.2"
    csr = build_csr(generate_key()).decode()
    statuses = [ca.sign(csr, f"guess-{n}", source=guesser)[0] for n in range(11)]
    assert statuses == [401] * 10 + [429]
    status, headers, _ = ca.request("POST", "/v1/sign", json.dumps(
        {"csr": csr, "token": ca.token(WEB)}).encode(), source=guesser)
    assert status == 429 and int(headers["retry-after"]) > 0
    assert ca.sign(csr, ca.token(WEB))[0] == 200


# -- TLS -------------------------------------------------------------------------------------


def test_openssl_verifies_the_ca_against_the_trust_bundle(ca, tmp_path):
    def s_client(cafile: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["openssl", "s_client", "-connect", f"{HOST}:{ca.address[1]}", "-CAfile", str(cafile),
             "-verify_return_error", "-verify_ip", HOST, "-tls1_2"],
            input="", capture_output=True, text=True, timeout=10, check=False)

    ok = s_client(ca.bundle)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "Verify return code: 0 (ok)" in ok.stdout

    other = tmp_path / "other"
    assert run_cli("ca", "init", "--dir", str(other), "--trust-domain", "other.local").returncode == 0
    refused = s_client(other / "trust-bundle.pem")
    assert refused.returncode != 0
    assert "certificate verify failed" in refused.stdout + refused.stderr


async def test_request_svid_gets_a_verified_svid_and_reports_refusals(ca):
    key = generate_key()
    token = ca.token(API)
    bundle = ca.bundle.read_bytes()
    address = Address(*ca.address)
    with trio.fail_after(10):
        svid = await request_svid(address, token, bundle, key, ttl=3600)
    cert = _verified(ca, {"certificate": svid.cert_pem.decode(),
                          "chain": [pem.decode() for pem in svid.chain_pems],
                          "trust_bundle": svid.bundle_pem.decode()})
    assert _uris(cert) == [API]
    assert cert.public_key() == key.public_key()
    assert svid.not_after == cert.not_valid_after_utc
    assert timedelta(minutes=59) < svid.not_after - datetime.now(UTC) <= timedelta(hours=1)

    with trio.fail_after(10), pytest.raises(SvidRequestError) as refused:
        await request_svid(address, token, bundle, key)
    assert refused.value.status == 401

    # Trusting anything else than the CA's root (here the leaf itself) fails the handshake.
    with trio.fail_after(10), pytest.raises(trio.BrokenResourceError) as broken:
        await request_svid(address, ca.token(API), svid.cert_pem, key)
    assert isinstance(broken.value.__cause__, ssl.SSLCertVerificationError)


# -- renewal ---------------------------------------------------------------------------------


async def test_renew_svid_trades_the_current_svid_for_a_new_one_without_a_token(ca):
    bundle = ca.bundle.read_bytes()
    address = Address(*ca.address)
    first_key = generate_key()
    with trio.fail_after(10):
        first = await request_svid(address, ca.token(WEB), bundle, first_key, ttl=600)
    chain = first.cert_pem + b"".join(first.chain_pems)
    second_key = generate_key()
    with trio.fail_after(10):
        second = await renew_svid(address, bundle, chain, first_key, second_key, ttl=1200)
    cert = _verified(ca, {"certificate": second.cert_pem.decode(),
                          "chain": [pem.decode() for pem in second.chain_pems],
                          "trust_bundle": second.bundle_pem.decode()})
    assert _uris(cert) == [WEB]
    assert cert.public_key() == second_key.public_key()
    assert timedelta(minutes=19) < second.not_after - datetime.now(UTC) <= timedelta(minutes=20)
    assert f"issued {WEB} serial={cert.serial_number:x}" in ca.log.read_text()
    assert "(renewal)" in ca.log.read_text()


def test_renewal_needs_a_client_certificate_that_is_a_workload_svid(ca, tmp_path):
    csr = build_csr(generate_key()).decode()
    status, _, body = ca.request("POST", "/v1/renew", json.dumps({"csr": csr}).encode())
    assert status == 401 and json.loads(body)["error"] == "no_client_certificate"

    signer = MemoryCa.from_dir(ca.dir)

    def renew_with(chain: bytes, key: bytes) -> tuple[int, dict]:
        (tmp_path / "chain.pem").write_bytes(chain)
        (tmp_path / "key.pem").write_bytes(key)
        context = ssl.create_default_context(cafile=ca.bundle)
        context.load_cert_chain(tmp_path / "chain.pem", tmp_path / "key.pem")
        conn = http.client.HTTPSConnection(*ca.address, context=context, timeout=5)
        try:
            conn.request("POST", "/v1/renew", body=json.dumps({"csr": csr, "token": "x"}).encode())
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    status, reply = renew_with(*signer.svid(WEB))
    assert status == 400 and "token" in reply["message"]  # renewals take no token
    status, reply = renew_with(*signer.svid(WEB, uris=[WEB, API]))
    assert status == 401 and reply["error"] == "bad_client_certificate"
    status, reply = renew_with(*signer.svid(WEB, ca=True))
    assert status == 401 and "CA" in reply["message"]
    # An expired SVID, or one from another CA, does not get through the handshake.
    for chain, key in (signer.svid(WEB, expired=True), MemoryCa("mesh.local").svid(WEB)):
        with pytest.raises(OSError):  # the handshake's alert: an SSLError, or a reset
            renew_with(chain, key)
