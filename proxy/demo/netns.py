"""`meshproxy demo --netns`: one network namespace per service, joined by veth pairs.

    topology = Topology.create(["ca", "frontend", "backend-v1", "backend-v2"])
    topology.namespaces["frontend"], topology.hosts["frontend"]    # name, 10.x.y.z
    topology.exec_prefix("frontend")                               # ["ip", "netns", "exec", ...]
    topology.destroy()                                              # idempotent

Each member gets a namespace `mpd<pid>-<member>` with its own loopback and an `eth0`, the
far end of a veth pair whose near end is enslaved to a bridge `mpd<pid>br` in the host's
namespace. The bridge carries 10.x.y.1/24 so this process (the load generator, the admin
polls) reaches every member; members reach each other through the bridge, so traffic
between services really crosses interfaces. x.y is a /24 no route of the host uses.
Only `ip` (iproute2) is needed; everything made is removed by `destroy()`, also after a
failure half-way through `create()`.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field

IP_TIMEOUT = 10.0


class NetnsError(Exception):
    """Network namespaces cannot be used here; the message says why."""


def unavailable_reason() -> str | None:
    """Why `--netns` cannot run here, or None when it can (root and `ip` are there)."""
    if os.geteuid() != 0:
        return "--netns needs root (network namespaces and veth pairs are privileged); run it with sudo"
    if shutil.which("ip") is None:
        return "--netns needs the `ip` command (iproute2: apt-get install iproute2)"
    return None


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT,
                          stdin=subprocess.DEVNULL, check=False)
    if done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip() or f'exit {done.returncode}'}")
    return done


def pick_subnet(used: Sequence[ipaddress.IPv4Network], seed: int) -> ipaddress.IPv4Network:
    """A 10.x.y.0/24 that overlaps none of `used`, starting the search at `seed`."""
    for step in range(60000):
        n = (seed + step) % 60000
        candidate = ipaddress.IPv4Network(f"10.{200 + n // 1000 % 50}.{n % 250}.0/24")
        if not any(candidate.overlaps(net) for net in used):
            return candidate
    raise NetnsError("no free 10.x.y.0/24 for the demo's bridge")


def _used_networks() -> list[ipaddress.IPv4Network]:
    networks = []
    for args in (("-4", "-o", "addr", "show"), ("-4", "route", "show", "table", "all")):
        for line in _ip(*args).stdout.splitlines():
            for word in line.split():
                if "/" in word or word[:1].isdigit():
                    try:
                        networks.append(ipaddress.IPv4Network(word, strict=False))
                    except ValueError:
                        continue
    return [net for net in networks if net.prefixlen > 0]


@dataclass
class Topology:
    prefix: str
    subnet: ipaddress.IPv4Network
    members: list[str]
    namespaces: dict[str, str] = field(default_factory=dict)
    hosts: dict[str, str] = field(default_factory=dict)
    _links: list[str] = field(default_factory=list)  # host-side links this made

    @property
    def bridge(self) -> str:
        return f"{self.prefix}br"

    @classmethod
    def create(cls, members: Sequence[str]) -> Topology:
        reason = unavailable_reason()
        if reason is not None:
            raise NetnsError(reason)
        prefix = f"mpd{os.getpid() % 10_000_000}"
        topology = cls(prefix, pick_subnet(_used_networks(), os.getpid()), list(members))
        try:
            topology._build()
        except BaseException:
            topology.destroy()
            raise
        return topology

    def _build(self) -> None:
        gateway = self.subnet.network_address + 1
        _ip("link", "add", self.bridge, "type", "bridge")
        self._links.append(self.bridge)
        _ip("addr", "add", f"{gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for index, member in enumerate(self.members):
            namespace = f"{self.prefix}-{member}"
            _ip("netns", "add", namespace)
            self.namespaces[member] = namespace
            near = f"{self.prefix}h{index}"
            _ip("link", "add", near, "type", "veth", "peer", "name", "eth0", "netns", namespace)
            self._links.append(near)
            _ip("link", "set", near, "master", self.bridge, "up")
            address = gateway + 1 + index
            _ip("-n", namespace, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", "eth0")
            _ip("-n", namespace, "link", "set", "eth0", "up")
            _ip("-n", namespace, "link", "set", "lo", "up")
            self.hosts[member] = str(address)

    def exec_prefix(self, member: str) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[member]]

    def destroy(self) -> list[str]:
        """Remove the namespaces and links made; returns what could not be removed."""
        left = []
        for namespace in self.namespaces.values():
            try:
                _ip("netns", "del", namespace)
            except (NetnsError, OSError, subprocess.SubprocessError) as exc:
                left.append(str(exc))
        self.namespaces.clear()
        for link in reversed(self._links):
            try:
                _ip("link", "del", link)
            except (NetnsError, OSError, subprocess.SubprocessError) as exc:
                # A veth pair goes with the namespace holding its far end: gone already.
                if "Cannot find device" not in str(exc):
                    left.append(str(exc))
        self._links.clear()
        return left

    def describe(self) -> str:
        return (f"bridge {self.bridge} {self.subnet.network_address + 1}/{self.subnet.prefixlen}; "
                + ", ".join(f"{m} {self.hosts[m]} (netns {self.namespaces[m]})" for m in self.members))
