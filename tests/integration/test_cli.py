"""The `meshproxy` command as users run it: exit codes, messages, help and version."""

from __future__ import annotations

import importlib.metadata
import socket
import subprocess
import time

import pytest
import yaml

from .support import HOST, free_port, meshproxy_command, run_cli


def _valid_config() -> dict:
    return {
        "node": {"id": "cli-test"},
        "admin": {"address": f"{HOST}:{free_port()}"},
        "workers": 1,
        "drain_timeout": "2s",
        "listeners": [
            {"name": "in", "address": f"{HOST}:{free_port()}", "protocol": "tcp", "cluster": "up",
             "idle_timeout": "1h", "max_connections": 100, "splice": True},
        ],
        "clusters": [
            {"name": "up", "endpoints": [f"{HOST}:9001", {"address": f"{HOST}:9002", "weight": 2}],
             "connect_timeout": "1s"},
        ],
    }


# Three independent mistakes, each reported with its own field path.
INVALID = {
    "listeners": [
        {"name": "in", "address": f"{HOST}:8080", "protocol": "tcp", "cluster": "nope", "bogus": 1},
    ],
    "clusters": [
        {"name": "up", "endpoints": [f"{HOST}:9001"], "connect_timeout": 5},
    ],
}
INVALID_PATHS = ["listeners[0].bogus", "listeners[0].cluster", "clusters[0].connect_timeout"]


@pytest.fixture
def write_config(tmp_path):
    def write(config: dict | str, name: str = "config.yaml") -> str:
        path = tmp_path / name
        path.write_text(config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False))
        return str(path)

    return write


def _assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr


# -- check -----------------------------------------------------------------------------------


def test_check_accepts_a_valid_config(write_config):
    result = run_cli("check", "--config", write_config(_valid_config()))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_check_rejects_an_invalid_config_naming_every_field(write_config):
    result = run_cli("check", "--config", write_config(INVALID))
    assert result.returncode == 1
    for path in INVALID_PATHS:
        assert path in result.stderr, f"{path} missing from:\n{result.stderr}"
    _assert_no_traceback(result)


@pytest.mark.parametrize(
    "text",
    ["listeners: [\n", "", "just a string\n"],
    ids=["broken-yaml", "empty", "not-a-mapping"],
)
def test_check_rejects_a_file_that_is_no_config(write_config, text):
    result = run_cli("check", "--config", write_config(text))
    assert result.returncode == 1
    assert result.stderr.strip(), "no error message"
    _assert_no_traceback(result)


def test_check_reports_a_missing_file(tmp_path):
    missing = tmp_path / "nowhere.yaml"
    result = run_cli("check", "--config", str(missing))
    assert result.returncode == 1
    assert "nowhere.yaml" in result.stderr
    _assert_no_traceback(result)


# -- usage -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["check"],
        ["run"],
        ["check", "--config"],
        ["--no-such-flag"],
        ["check", "--config", "x.yaml", "--no-such-flag"],
        ["run", "--config", "x.yaml", "--log-level", "loud"],
    ],
    ids=["nothing", "check-no-config", "run-no-config", "config-no-value", "unknown-flag",
         "check-unknown-flag", "bad-log-level"],
)
def test_usage_errors_exit_2(args):
    result = run_cli(*args)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "usage:" in result.stderr
    _assert_no_traceback(result)


@pytest.mark.parametrize("command", [[], ["run"], ["check"]], ids=["meshproxy", "run", "check"])
def test_version(command):
    result = run_cli(*command, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"meshproxy {importlib.metadata.version('meshproxy')}"


@pytest.mark.parametrize("command", [[], ["run"], ["check"]], ids=["meshproxy", "run", "check"])
def test_help(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(" ".join(["usage: meshproxy", *command]))
    if command:
        assert "--config" in result.stdout
    else:
        assert "run" in result.stdout and "check" in result.stdout


# -- run -------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["run"]], ids=["meshproxy", "run"])
def test_run_with_an_invalid_config_exits_1_with_the_errors(write_config, command):
    result = run_cli(*command, "--config", write_config(INVALID))
    assert result.returncode == 1
    for path in INVALID_PATHS:
        assert path in result.stderr, f"{path} missing from:\n{result.stderr}"
    _assert_no_traceback(result)


@pytest.mark.parametrize("taken", ["listener", "admin"])
def test_an_address_in_use_exits_1_with_a_clear_message(write_config, taken):
    with socket.create_server((HOST, 0)) as occupant:
        port = occupant.getsockname()[1]
        config = _valid_config()
        if taken == "listener":
            config["listeners"][0]["address"] = f"{HOST}:{port}"
        else:
            config["admin"]["address"] = f"{HOST}:{port}"
        started = time.monotonic()
        result = subprocess.run(
            [*meshproxy_command(), "--config", write_config(config)],
            capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL,
        )
    assert result.returncode == 1, result.stderr
    assert time.monotonic() - started < 10
    assert "in use" in result.stderr, result.stderr
    # The message says which address: with several listeners and an admin plane,
    # "address already in use" alone does not tell the user what to change.
    assert f"{HOST}:{port}" in result.stderr, result.stderr
    _assert_no_traceback(result)
