"""`meshproxy ca init | token | serve` as users run them: files, modes, output, exit codes."""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from .support import HOST, free_port, run_cli

DOMAIN = "mesh.local"
WEB = f"spiffe://{DOMAIN}/ns/default/sa/web"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stdout + result.stderr, result.stderr


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca"
    result = run_cli("ca", "init", "--dir", str(path), "--trust-domain", DOMAIN)
    assert result.returncode == 0, result.stderr
    return path


def test_init_makes_an_owner_only_directory_with_owner_only_keys(ca_dir):
    assert _mode(ca_dir) == 0o700
    keys = sorted(ca_dir.glob("*.key"))
    assert [key.name for key in keys] == ["intermediate.key", "root.key"]
    assert all(_mode(key) == 0o600 for key in keys)
    root = x509.load_pem_x509_certificate((ca_dir / "trust-bundle.pem").read_bytes())
    intermediate = x509.load_pem_x509_certificate((ca_dir / "intermediate.pem").read_bytes())
    assert root.subject == root.issuer
    intermediate.verify_directly_issued_by(root)


def test_init_refuses_to_overwrite_a_ca(ca_dir):
    before = {path.name: path.read_bytes() for path in ca_dir.iterdir()}
    result = run_cli("ca", "init", "--dir", str(ca_dir), "--trust-domain", DOMAIN)
    assert result.returncode == 1
    assert "refusing to overwrite" in result.stderr
    _no_traceback(result)
    assert {path.name: path.read_bytes() for path in ca_dir.iterdir()} == before


def test_init_refuses_a_bad_trust_domain(tmp_path):
    result = run_cli("ca", "init", "--dir", str(tmp_path / "ca"), "--trust-domain", "Mesh.Local:80")
    assert result.returncode == 1
    assert "trust domain" in result.stderr
    assert not (tmp_path / "ca").exists()


def test_token_prints_the_token_alone_and_stores_only_its_hash(ca_dir):
    result = run_cli("ca", "token", "--dir", str(ca_dir), "--identity", WEB, "--ttl", "10m", "--uses", "2")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}\n", result.stdout)
    token = result.stdout.strip()
    stored = (ca_dir / "tokens.json").read_text()
    assert token not in stored
    assert hashlib.sha256(token.encode()).hexdigest() in stored
    assert _mode(ca_dir / "tokens.json") == 0o600


@pytest.mark.parametrize(("identity", "message"), [
    ("web", "spiffe://"),
    ("spiffe://other.local/ns/default/sa/web", "trust domain"),
    (f"spiffe://{DOMAIN}", "add a path"),
    (f"spiffe://{DOMAIN}/ns/../sa/web", "path segments"),
], ids=["not-spiffe", "other-domain", "no-path", "dot-dot"])
def test_token_refuses_an_identity_outside_the_trust_domain(ca_dir, identity, message):
    result = run_cli("ca", "token", "--dir", str(ca_dir), "--identity", identity)
    assert result.returncode == 1
    assert message in result.stderr
    assert result.stdout == ""
    _no_traceback(result)


def test_token_needs_a_ca_directory(tmp_path):
    result = run_cli("ca", "token", "--dir", str(tmp_path / "nowhere"), "--identity", WEB)
    assert result.returncode == 1
    assert "ca init" in result.stderr
    _no_traceback(result)


@pytest.mark.parametrize(("key", "mode"), [("intermediate.key", 0o640), ("root.key", 0o604)],
                         ids=["intermediate-group", "root-others"])
def test_serve_refuses_keys_others_can_read(tmp_path, key, mode):
    path = tmp_path / "ca"
    assert run_cli("ca", "init", "--dir", str(path), "--trust-domain", DOMAIN).returncode == 0
    (path / key).chmod(mode)
    result = run_cli("ca", "serve", "--dir", str(path), "--address", f"{HOST}:{free_port()}", timeout=10)
    assert result.returncode == 1
    assert key in result.stderr and "group or others" in result.stderr
    _no_traceback(result)


@pytest.mark.parametrize("args", [
    ["ca"],
    ["ca", "init", "--dir", "x"],
    ["ca", "token", "--identity", WEB],
    ["ca", "token", "--dir", "x", "--identity", WEB, "--ttl", "10"],
    ["ca", "serve", "--dir", "x", "--address", "nowhere"],
    ["ca", "sign"],
], ids=["no-subcommand", "init-no-domain", "token-no-dir", "ttl-no-unit", "bad-address", "unknown"])
def test_ca_usage_errors_exit_2(args):
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    assert "usage:" in result.stderr
    _no_traceback(result)


@pytest.mark.parametrize("command", [["ca"], ["ca", "init"], ["ca", "token"], ["ca", "serve"]],
                         ids=["ca", "init", "token", "serve"])
def test_ca_help_and_version(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(" ".join(["usage: meshproxy", *command]))
    assert "--dir" in result.stdout or "init" in result.stdout
    version = run_cli(*command, "--version")
    assert version.stdout.strip() == f"meshproxy {importlib.metadata.version('meshproxy')}"
