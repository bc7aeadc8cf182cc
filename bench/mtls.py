"""The TLS targets of `mtls-hop-keepalive` and `mtls-handshakes`.

Each target is a kind of proxy set up in two roles, both on the proxy core:

- **B** terminates mutual TLS (a client certificate is required and verified) and forwards
  plaintext HTTP/1.1 to the origin over kept-alive connections;
- **A** takes plaintext HTTP/1.1 from the load and forwards it to B over kept-alive mutual-TLS
  connections, checking B's certificate.

A scenario asks for one of two listeners:

- `hop` (HOP): the chain client -> A -> B -> origin, started by `bench/chain.py` (one process
  tree, so the CPU of both proxies is counted), B first, A once B is ready. The load goes to A.
- `tls` (TLS): B alone; the load (bench/tlsload.py) makes mTLS connections to it directly, with
  the client certificate the target registers for B's port.

Targets:

- `meshproxy-mtls`: a `meshproxy ca` in the run's work directory (`ca init`, a one-use token per
  identity, `ca serve` on the load core); A and B get their SVIDs from it (`identity:`), B's
  listener has `tls: {mode: strict}`, A's cluster `tls: {identity: B's SPIFFE ID}`. The load's
  client certificate is issued by the same CA through its API (`POST /v1/sign` with a token).
- `meshproxy-plain`: the same chain without identity or TLS (`hop` only).
- `nginx-tls`, `haproxy-tls`: a test PKI made with `cryptography` in the work directory, shaped
  like the mesh's (ECDSA P-256 root, intermediate, leaves with the SPIFFE ID as URI SAN, plus a
  DNS name, which nginx and HAProxy check where meshproxy checks the URI). B: `ssl_verify_client
  on` / `verify required`; A: `proxy_ssl_verify on` / `verify required verifyhost`, each
  presenting its own certificate. Upstream keep-alive on both hops. No session tickets or
  session cache on B (meshproxy has neither), so every new connection is a full handshake.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import shlex
import shutil
import ssl
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from . import BenchError, proc, tlsload, upstream

HOP = "hop"  # the listener of mtls-hop-keepalive: the chain A -> B, load into A
TLS = "tls"  # the listener of mtls-handshakes: B's mTLS listener, load into it

TRUST_DOMAIN = "bench.local"
IDS = {role: f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/{role}" for role in ("a", "b", "client")}
B_HOST = "b.bench.local"  # the DNS name in B's test certificate, checked by nginx and HAProxy
_CHAIN = Path(__file__).with_name("chain.py")
_CHAIN_TIMEOUT = 12.0  # all stages ready within this (bench.proc allows 15 s in all)
_CLI_TIMEOUT = 30.0


@dataclass(frozen=True)
class Credentials:
    """What a target's proxies and its load client need: trust roots, certificates or tokens."""

    trust: Path | None = None  # the roots (PEM)
    certs: dict[str, tuple[Path, Path]] = field(default_factory=dict)  # role -> (chain, key)
    tokens: dict[str, Path] = field(default_factory=dict)  # role -> token file (meshproxy)
    ca: str | None = None  # HOST:PORT of `meshproxy ca serve`

    def client(self) -> tlsload.ClientCert:
        chain, key = self.certs["client"]
        return tlsload.ClientCert(chain, key, self.trust)


@dataclass(frozen=True)
class Stage:
    """One proxy of a target: its command, its config and where it is ready."""

    role: str
    argv: list[str]
    port: int  # its listener
    config: Path
    ready_url: str | None = None
    admin_url: str | None = None


@dataclass(frozen=True)
class Started:
    port: int  # where the load goes
    process: subprocess.Popen  # the root of everything to account
    config: Path
    admin_url: str | None = None


# -- certificates ------------------------------------------------------------------------------


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _write_private(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def make_test_pki(directory: Path) -> Credentials:
    """A root, an intermediate and leaves for A, B and the client, in `directory`: `root.pem`,
    `ROLE.pem` (leaf then intermediate), `ROLE.key`, and `ROLE.bundle.pem` (chain and key, for
    HAProxy's `crt`). ECDSA P-256 and SHA-256 throughout, as the mesh CA issues them."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(mode=0o755)
    now = datetime.now(UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, TRUST_DOMAIN),
                          x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def usage(ca: bool) -> x509.KeyUsage:
        return x509.KeyUsage(digital_signature=not ca, content_commitment=False,
                             key_encipherment=False, data_encipherment=False,
                             key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                             encipher_only=False, decipher_only=False)

    def issue(subject: x509.Name, key, issuer: x509.Name, issuer_key, *, path_length=None,
              sans=None):
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=sans is None, path_length=path_length),
                           critical=True)
            .add_extension(usage(sans is None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
        )
        if sans is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=True)
            builder = builder.add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    root_key, inter_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(
        ec.SECP256R1())
    root = issue(name("bench test root"), root_key, name("bench test root"), root_key,
                 path_length=1)
    inter = issue(name("bench test intermediate"), inter_key, root.subject, root_key,
                  path_length=0)
    (directory / "root.pem").write_bytes(_cert_pem(root))
    certs = {}
    for role, spiffe_id in IDS.items():
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = issue(x509.Name([]), key, inter.subject, inter_key,
                     sans=[x509.UniformResourceIdentifier(spiffe_id),
                           x509.DNSName(f"{role}.{TRUST_DOMAIN}")])
        chain = _cert_pem(leaf) + _cert_pem(inter)
        (directory / f"{role}.pem").write_bytes(chain)
        _write_private(directory / f"{role}.bundle.pem", chain + _key_pem(key))
        certs[role] = (directory / f"{role}.pem",
                       _write_private(directory / f"{role}.key", _key_pem(key)))
    return Credentials(trust=directory / "root.pem", certs=certs)


def _svid_from_ca(ca: str, bundle: Path, token: str, directory: Path) -> tuple[Path, Path]:
    """A client SVID issued by `meshproxy ca serve` at `ca` (POST /v1/sign with `token`), as
    (chain file, key file) in `directory`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(
        key, hashes.SHA256())
    host, port = ca.rsplit(":", 1)
    connection = http.client.HTTPSConnection(
        host, int(port), timeout=10, context=ssl.create_default_context(cafile=str(bundle)))
    try:
        connection.request("POST", "/v1/sign", json.dumps({"csr": _cert_pem(csr).decode(),
                                                           "token": token}),
                           {"content-type": "application/json"})
        response = connection.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as e:
        raise BenchError(f"the mesh CA did not issue the client certificate: {e}") from e
    finally:
        connection.close()
    if response.status != 200:
        raise BenchError(f"the mesh CA answered {response.status}: {body[:300]!r}")
    issued = json.loads(body)
    chain = directory / "client.pem"
    chain.write_text(issued["certificate"] + "".join(issued["chain"]))
    return chain, _write_private(directory / "client.key", _key_pem(key))


def _cli(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_CLI_TIMEOUT,
                              check=False)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{shlex.join(argv)} took over {_CLI_TIMEOUT:.0f}s") from e
    if done.returncode != 0:
        raise BenchError(f"{shlex.join(argv)} exited with {done.returncode}: "
                         f"{done.stderr.strip()[-500:]}")
    return done.stdout


@contextmanager
def mesh_ca(meshproxy: list[str], workdir: Path, log: Path,
            cpu: int | None) -> Iterator[Credentials]:
    """`meshproxy ca init` in `workdir/ca`, a one-use token per role, `ca serve` pinned to `cpu`
    (the load core) until the block exits, and the client's SVID from it."""
    ca_dir = workdir / "ca"
    _cli([*meshproxy, "ca", "init", "--dir", str(ca_dir), "--trust-domain", TRUST_DOMAIN])
    tokens = {}
    for role, spiffe_id in IDS.items():
        token = _cli([*meshproxy, "ca", "token", "--dir", str(ca_dir), "--identity", spiffe_id,
                      "--ttl", "10m", "--uses", "1"]).strip()
        tokens[role] = _write_private(workdir / f"{role}.token", token.encode() + b"\n")
    port = proc.free_port()
    address = f"{proc.HOST}:{port}"
    bundle = ca_dir / "trust-bundle.pem"
    argv = [*meshproxy, "ca", "serve", "--dir", str(ca_dir), "--address", address]
    with proc.started(argv, cpu, log, port):
        client = _svid_from_ca(address, bundle, tokens.pop("client").read_text().strip(),
                               workdir)
        yield Credentials(trust=bundle, certs={"client": client}, tokens=tokens, ca=address)


# -- the proxies -------------------------------------------------------------------------------


class Kind:
    """How one kind of proxy is set up as A or B, and what it needs."""

    name: str
    tls = True

    def missing(self, meshproxy: list[str] | None) -> str | None:
        return None

    def credentials(self, meshproxy: list[str] | None, workdir: Path, log: Path,
                    cpu: int | None):
        """A context manager yielding the Credentials of one run (`cpu`: the load core)."""
        raise NotImplementedError

    def stage(self, role: str, creds: Credentials, workdir: Path, port: int, upstream_port: int,
              workers: int, meshproxy: list[str] | None) -> Stage:
        """Write the config of `role` ("a" or "b") listening on `port`, forwarding to
        `upstream_port` (A: B's port; B: the origin's)."""
        raise NotImplementedError


def _needs_cryptography() -> str | None:
    if importlib.util.find_spec("cryptography") is None:
        return "the cryptography package is not installed (pip install cryptography)"
    return None


_MESHPROXY = """\
node: {{id: bench-{role}}}
admin: {{address: {host}:{admin}}}
workers: {workers}
{identity}listeners:
  - name: {listener}
    address: {host}:{port}
    protocol: http
{tls_listener}    routes:
      - {{name: all, match: {{prefix: /}}, cluster: {cluster}}}
clusters:
  - name: {cluster}
    endpoints: [{host}:{upstream}]
    connect_timeout: 1s
{tls_cluster}"""


class Meshproxy(Kind):
    """meshproxy sidecars with SVIDs from a `meshproxy ca` (or, `tls=False`, without)."""

    def __init__(self, name: str, tls: bool) -> None:
        self.name, self.tls = name, tls

    def missing(self, meshproxy):
        if meshproxy is None:
            return "no `meshproxy` command and no importable proxy.cli (pip install -e .)"
        return _needs_cryptography() if self.tls else None

    @contextmanager
    def credentials(self, meshproxy, workdir, log, cpu):
        if not self.tls:
            yield Credentials()
            return
        with mesh_ca(meshproxy, workdir, log.with_name(f"{log.stem}-ca.log"), cpu) as creds:
            yield creds

    def stage(self, role, creds, workdir, port, upstream_port, workers, meshproxy):
        admin = proc.free_port()
        identity = tls_listener = tls_cluster = ""
        if self.tls:
            identity = (f"identity: {{ca: {creds.ca}, token_file: {creds.tokens[role]}, "
                        f"trust_bundle: {creds.trust}}}\n")
            if role == "b":
                tls_listener = "    tls: {mode: strict}\n"
            else:
                tls_cluster = f"    tls: {{identity: {IDS['b']}}}\n"
        config = workdir / f"meshproxy-{role}.yaml"
        config.write_text(_MESHPROXY.format(
            role=role, host=proc.HOST, admin=admin, workers=workers, identity=identity,
            listener="inbound" if role == "b" else "outbound", port=port,
            tls_listener=tls_listener, cluster="origin" if role == "b" else "b",
            upstream=upstream_port, tls_cluster=tls_cluster))
        admin_url = f"http://{proc.HOST}:{admin}"
        return Stage(role, [*meshproxy, "--config", str(config)], port, config,
                     ready_url=f"{admin_url}/ready", admin_url=admin_url)


class _TestPkiKind(Kind):
    def missing(self, meshproxy):
        if shutil.which(self.tool) is None:
            return f"{self.tool} is not installed (apt-get install -y {self.tool})"
        return _needs_cryptography()

    @contextmanager
    def credentials(self, meshproxy, workdir, log, cpu):
        yield make_test_pki(workdir / "pki")


# The reverse proxy of targets._NGINX_HTTP (perf-anchors.md), with TLS on one side. Upstream
# keepalive_requests is raised too (its default, 1000, would make A open a new TLS connection
# to B every 1000 requests per connection).
_NGINX = """\
http {{
  access_log off;
  keepalive_requests 10000000;
  upstream next {{
    server {host}:{upstream};
    keepalive 64;
    keepalive_requests 10000000;
  }}
  server {{
    listen {host}:{port}{ssl};
{server_tls}    location / {{
      proxy_pass {scheme}://next;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffers 16 64k;
      proxy_buffer_size 64k;
      proxy_max_temp_file_size 0;
{proxy_tls}    }}
  }}
}}"""


class Nginx(_TestPkiKind):
    """nginx, one worker per role: B `listen ... ssl` with `ssl_verify_client on`; A
    `proxy_pass https://` with its own certificate and `proxy_ssl_verify on`."""

    name, tool = "nginx-tls", "nginx"

    def stage(self, role, creds, workdir, port, upstream_port, workers, meshproxy):
        chain, key = creds.certs[role]
        server_tls = proxy_tls = ""
        if role == "b":
            server_tls = (f"    ssl_certificate {chain};\n    ssl_certificate_key {key};\n"
                          f"    ssl_client_certificate {creds.trust};\n"
                          "    ssl_verify_client on;\n    ssl_verify_depth 2;\n"
                          "    ssl_protocols TLSv1.2 TLSv1.3;\n"
                          "    ssl_session_tickets off;\n    ssl_session_cache off;\n")
        else:
            proxy_tls = (f"      proxy_ssl_certificate {chain};\n"
                         f"      proxy_ssl_certificate_key {key};\n"
                         f"      proxy_ssl_trusted_certificate {creds.trust};\n"
                         "      proxy_ssl_verify on;\n      proxy_ssl_verify_depth 2;\n"
                         f"      proxy_ssl_name {B_HOST};\n"
                         "      proxy_ssl_protocols TLSv1.2 TLSv1.3;\n")
        directory = workdir / f"nginx-{role}"
        directory.mkdir(mode=0o755)
        body = _NGINX.format(host=proc.HOST, port=port, upstream=upstream_port,
                             ssl=" ssl" if role == "b" else "", server_tls=server_tls,
                             scheme="https" if role == "a" else "http", proxy_tls=proxy_tls)
        argv = upstream.write_nginx_conf(directory, body)
        return Stage(role, argv, port, directory / "nginx.conf")


class Haproxy(_TestPkiKind):
    """HAProxy, one thread per role, `mode http` with keep-alive and `http-reuse always`: B
    `bind ... ssl crt ... ca-file ... verify required`; A's server line `ssl crt ... verify
    required verifyhost`. No TLS tickets and no session cache on B."""

    name, tool = "haproxy-tls", "haproxy"

    def stage(self, role, creds, workdir, port, upstream_port, workers, meshproxy):
        chain, _ = creds.certs[role]
        bundle = chain.with_name(f"{role}.bundle.pem")
        bind = f"  bind {proc.HOST}:{port}"
        server = f"  server next {proc.HOST}:{upstream_port}"
        if role == "b":
            bind += f" ssl crt {bundle} ca-file {creds.trust} verify required no-tls-tickets"
        else:
            server += (f" ssl crt {bundle} ca-file {creds.trust} verify required "
                       f"verifyhost {B_HOST}")
        config = workdir / f"haproxy-{role}.cfg"
        config.write_text(
            "global\n  nbthread 1\n  maxconn 8000\n  tune.ssl.cachesize 0\n"
            "defaults\n  mode http\n  option http-keep-alive\n"
            "  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n"
            f"frontend {role}-in\n{bind}\n  default_backend next\n"
            f"backend next\n  http-reuse always\n{server}\n"
        )
        return Stage(role, ["haproxy", "-db", "-f", str(config)], port, config)


KINDS: dict[str, Kind] = {k.name: k for k in (
    Meshproxy("meshproxy-mtls", tls=True), Meshproxy("meshproxy-plain", tls=False), Nginx(),
    Haproxy())}
LISTENERS = {"meshproxy-mtls": frozenset({HOP, TLS}), "meshproxy-plain": frozenset({HOP}),
             "nginx-tls": frozenset({HOP, TLS}), "haproxy-tls": frozenset({HOP, TLS})}


def missing(kind: str, meshproxy: list[str] | None) -> str | None:
    return KINDS[kind].missing(meshproxy)


def _describe(stages: list[Stage], path: Path) -> Path:
    """One file with every stage's command and config, kept with the results."""
    parts = []
    for stage in stages:
        parts.append(f"# {stage.role.upper()}: {shlex.join(stage.argv)}\n"
                     f"# listens on {proc.HOST}:{stage.port}\n{stage.config.read_text()}\n")
    path.write_text("\n".join(parts))
    return path


@contextmanager
def started(kind: str, listener: str, upstream_port: int, workers: int, workdir: Path,
            log: Path, cpu: int | None, meshproxy: list[str] | None) -> Iterator[Started]:
    """Run target `kind` for `listener` (HOP or TLS) on `cpu`, its CA (if any) on the load
    core; yield where the load goes and the process tree to account; stop it all on exit."""
    setup = KINDS[kind]
    load_cpu = None if cpu is None else proc.LOAD_CPU
    with setup.credentials(meshproxy, workdir, log, load_cpu) as creds:
        b = setup.stage("b", creds, workdir, proc.free_port(), upstream_port, workers, meshproxy)
        if listener == TLS:
            tlsload.register(b.port, creds.client())
            try:
                with proc.started(b.argv, cpu, log, b.port, b.ready_url) as process:
                    yield Started(b.port, process, b.config, b.admin_url)
            finally:
                tlsload.unregister(b.port)
            return
        a = setup.stage("a", creds, workdir, proc.free_port(), b.port, workers, meshproxy)
        spec = workdir / "chain.json"
        spec.write_text(json.dumps({"timeout": _CHAIN_TIMEOUT, "stages": [
            {"name": s.role.upper(), "argv": s.argv, "port": s.port, "ready_url": s.ready_url}
            for s in (b, a)]}, indent=2))
        described = _describe([a, b], workdir / "chain.txt")
        argv = [sys.executable, "-S", str(_CHAIN), str(spec)]
        with proc.started(argv, cpu, log, a.port, a.ready_url) as process:
            yield Started(a.port, process, described, a.admin_url)
