"""The demo mesh as running processes: the CA, the apps and their sidecars.

    with Mesh.on_loopback(workdir) as mesh:       # or Mesh.in_namespaces(workdir)
        mesh.prepare()                             # ca init, tokens, configs
        mesh.start()                               # every process, each in its own session
        await mesh.wait_ready(timeout)             # (in Trio) every sidecar answers /ready
        ...
    # leaving the block stops every process by its PID (SIGTERM, then SIGKILL of its process
    # group) and removes the namespaces

Every process is `python -m proxy ...` (or `python -m proxy.demo.services ...`) of this
interpreter, started in a new session (Ctrl-C in the terminal reaches only the demo, which
stops them in order) and with a parent-death signal, so none outlives the demo even when
the demo is killed. Their output goes to `workdir/logs/NAME.log`.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import trio
import yaml

from ..config import Address, ConfigError, parse_config
from .http import HttpError, fetch
from .netns import Topology
from .plan import (
    BACKENDS,
    DOMAIN,
    FRONTEND,
    INTRUDER,
    SERVICES,
    Files,
    MeshPlan,
    loopback_plan,
    netns_plan,
    sidecar_config,
    spiffe_id,
)

log = logging.getLogger("meshproxy.demo")

STOP_TIMEOUT = 10.0  # SIGTERM, then this long for every process to exit, then SIGKILL
CLI_TIMEOUT = 30.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the demo process dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def free_ports() -> Iterator[int]:
    """Loopback ports nothing listens on now, below the kernel's ephemeral range (so an
    outgoing connection cannot take one before its listener binds it), never the same twice."""
    given: set[int] = set()
    while True:
        port = random.randrange(20000, 32000)
        if port in given:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        given.add(port)
        yield port


@dataclass
class Process:
    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class Mesh:
    plan: MeshPlan
    workdir: Path
    topology: Topology | None = None
    processes: dict[str, Process] = field(default_factory=dict)
    configs: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: Files | None = None
    admin_token: str | None = None

    # -- making one ----------------------------------------------------------------------
    @classmethod
    def on_loopback(cls, workdir: Path) -> Mesh:
        return cls(loopback_plan(free_ports()), workdir)

    @classmethod
    def in_namespaces(cls, workdir: Path) -> Mesh:
        topology = Topology.create(["ca", *SERVICES])
        return cls(netns_plan(topology.namespaces, topology.hosts), workdir, topology)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    @property
    def ca_dir(self) -> Path:
        return self.workdir / "ca"

    @property
    def trust_bundle(self) -> Path:
        return self.ca_dir / "trust-bundle.pem"

    # -- files ---------------------------------------------------------------------------
    def prepare(self) -> None:
        """The CA directory, a one-use token per sidecar, and every config file."""
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self._cli("ca", "init", "--dir", str(self.ca_dir), "--trust-domain", DOMAIN)
        tokens = {}
        for name in SERVICES:
            path = self.workdir / f"{name}.token"
            path.write_text(self.mint_token(spiffe_id(name)) + "\n")
            path.chmod(0o600)
            tokens[name] = str(path)
        admin_token_file = None
        if self.plan.admin_token:
            self.admin_token = secrets.token_urlsafe(24)
            token_path = self.workdir / "admin.token"
            token_path.write_text(self.admin_token + "\n")
            token_path.chmod(0o600)
            admin_token_file = str(token_path)
        self.files = Files(str(self.trust_bundle), tokens, admin_token_file)
        for name in SERVICES:
            self.write_config(name, sidecar_config(self.plan, name, self.files))

    def mint_token(self, identity: str, ttl: str = "1h") -> str:
        return self._cli("ca", "token", "--dir", str(self.ca_dir), "--identity", identity,
                         "--ttl", ttl).strip()

    def config_path(self, name: str) -> Path:
        return self.workdir / f"{name}.yaml"

    def write_config(self, name: str, config: dict[str, Any]) -> None:
        """Validate `config` (a bug here should say which field) and write it as YAML."""
        text = yaml.safe_dump(config, sort_keys=False)
        try:
            parse_config(text, f"{name}.yaml")
        except ConfigError as exc:
            raise RuntimeError(f"the demo made an invalid config for {name}:\n{exc}") from None
        self.config_path(name).write_text(f"# The {name} sidecar of `meshproxy demo`.\n" + text)
        self.configs[name] = config

    def intruder_token(self) -> str:
        return self.mint_token(spiffe_id(INTRUDER), "10m")

    def _cli(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True,
                              timeout=CLI_TIMEOUT, stdin=subprocess.DEVNULL, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"meshproxy {' '.join(args[:2])} failed: {done.stderr.strip()}")
        return done.stdout

    # -- processes -----------------------------------------------------------------------
    def start(self) -> None:
        """The CA first (sidecars ask it for certificates as they start), then the apps and
        the sidecars. Call from the main thread, before any other thread exists."""
        self._spawn("ca", self.plan.ca_netns,
                    ["-m", "proxy", "ca", "serve", "--dir", str(self.ca_dir), "--address", str(self.plan.ca)])
        self._wait_listening("ca", self.plan.ca, 15.0)
        frontend = self.plan.services[FRONTEND]
        assert frontend.outbound is not None
        self._spawn("frontend-app", frontend.netns,
                    ["-m", "proxy.demo.services", "frontend", "--address", str(frontend.app),
                     "--backend", str(frontend.outbound)])
        for version, name in BACKENDS.items():
            backend = self.plan.services[name]
            self._spawn(f"{name}-app", backend.netns,
                        ["-m", "proxy.demo.services", "backend", "--name", "backend", "--version", version,
                         "--address", str(backend.app)])
        for name in SERVICES:
            self._spawn(name, self.plan.services[name].netns,
                        ["-m", "proxy", "--config", str(self.config_path(name))])

    def _spawn(self, name: str, netns: str | None, args: list[str]) -> None:
        argv = [sys.executable, *args]
        if netns is not None:
            argv = ["ip", "netns", "exec", netns, *argv]
        log_path = self.workdir / "logs" / f"{name}.log"
        process = Process(name, argv, log_path)
        self.processes[name] = process
        with open(log_path, "ab") as out:
            process.popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent)  # noqa: PLW1509 - no threads yet

    def _wait_listening(self, name: str, address: Address, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        process = self.processes[name]
        while time.monotonic() < deadline:
            if not process.alive():
                raise RuntimeError(f"{name} exited at start:\n{process.log_tail()}")
            try:
                with socket.create_connection(address, timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{name} did not listen on {address} within {timeout:g}s:\n{process.log_tail()}")

    async def wait_ready(self, timeout: float) -> None:
        """Until every sidecar's /ready is 200 (its first certificate is in) and the apps run."""
        pending = list(SERVICES)
        with trio.move_on_after(timeout):
            while pending:
                for name, process in self.processes.items():
                    if not process.alive():
                        raise RuntimeError(f"{name} exited at start:\n{process.log_tail()}")
                for name in list(pending):
                    try:
                        reply = await self.admin(name, "GET", "/ready", timeout=1.0)
                    except HttpError:
                        continue
                    if reply.status == 200:
                        pending.remove(name)
                await trio.sleep(0.1)
        if pending:
            tails = "\n".join(f"--- {name}:\n{self.processes[name].log_tail()}" for name in pending)
            raise RuntimeError(f"not ready within {timeout:g}s: {', '.join(pending)}\n{tails}")

    async def admin(self, name: str, method: str, target: str, body: bytes = b"",
                    timeout: float = 3.0) -> Any:
        headers: tuple[tuple[str, str], ...] = ()
        if self.admin_token is not None:
            headers = (("authorization", f"Bearer {self.admin_token}"),)
        if body:
            headers = (*headers, ("content-type", "application/json"))
        return await fetch(self.plan.services[name].admin, method, target, body=body, timeout=timeout,
                           headers=headers)

    async def reload(self, name: str, config: dict[str, Any]) -> int:
        """PUT /config on `name`'s sidecar; returns the new config version."""
        reply = await self.admin(name, "PUT", "/config", json.dumps(config).encode(), timeout=10.0)
        if reply.status != 200:
            raise RuntimeError(f"PUT /config on {name}: {reply.status} {reply.body.decode(errors='replace')}")
        self.configs[name] = config
        return int(json.loads(reply.body)["version"])

    def stop(self) -> list[str]:
        """SIGTERM every process, wait up to STOP_TIMEOUT, SIGKILL the process group of any
        left; then remove the namespaces. Returns what went wrong (for the summary)."""
        problems = []
        running = [p for p in self.processes.values() if p.alive()]
        # The load has stopped by now; sidecars drain (drain_timeout 5s), the rest exit at once.
        order = sorted(running, key=lambda p: (p.name not in SERVICES, p.name == "ca"))
        for process in order:
            assert process.popen is not None
            try:
                process.popen.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_TIMEOUT
        for process in order:
            assert process.popen is not None
            try:
                process.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                problems.append(f"{process.name} (pid {process.pid}) did not stop within "
                                f"{STOP_TIMEOUT:g}s: killed")
        for process in order:
            # Its own session: the process group holds the sidecar's workers too.
            assert process.popen is not None and process.pid is not None
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                process.popen.wait(5)
            except subprocess.TimeoutExpired:
                problems.append(f"{process.name} (pid {process.pid}) survived SIGKILL")
        if self.topology is not None:
            problems += self.topology.destroy()
            self.topology = None
        return problems

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.processes.items() if p.pid is not None}
