"""The demo mesh on paper (pure): who runs where, and each sidecar's config.

    plan = loopback_plan(free_ports())                 # or netns_plan(prefix, subnet)
    config = sidecar_config(plan, "frontend", files, weights={"v1": 90, "v2": 10})
    config = sidecar_config(plan, "backend-v2", files, broken=True)   # fault: abort 100%

The mesh: the CA; `frontend` and `backend` v1 and v2, each app behind its own sidecar.
Clients (the load generator) call the frontend sidecar's `inbound` listener, the mesh's edge.
The frontend app calls the backend through its sidecar's `outbound` listener, which splits
requests between the clusters backend-v1 and backend-v2 and speaks mTLS to the backends'
sidecars, accepting only their identities. A backend sidecar takes mTLS only (`tls: strict`)
and only from the frontend's identity (`policy`). Retries and outlier detection on the
frontend side absorb a broken v2: the backend-v2 cluster lists v1 as a fallback endpoint
with a tiny weight, so a request v2 failed is retried on v1, and once v2 is ejected its
share goes to v1 until it recovers.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..config import Address

DOMAIN = "mesh.local"
FRONTEND = "frontend"
BACKENDS = {"v1": "backend-v1", "v2": "backend-v2"}
SERVICES = (FRONTEND, *BACKENDS.values())
INTRUDER = "intruder"  # an identity the CA vouches for but the policy does not allow

# The canary steps `s` cycles through.
CANARY_STEPS: tuple[dict[str, int], ...] = ({"v1": 90, "v2": 10}, {"v1": 50, "v2": 50}, {"v1": 0, "v2": 100})
CERT_TTL = "20s"  # short, so certificates rotate (at about half of it) while you watch
FALLBACK_WEIGHT = (1000, 1)  # backend-v2 cluster: v2's sidecar, then v1's as a fallback

ADMIN_PORT, INBOUND_PORT, OUTBOUND_PORT, APP_PORT, CA_PORT = 15000, 15006, 15001, 9000, 15012


def spiffe_id(name: str) -> str:
    return f"spiffe://{DOMAIN}/ns/demo/sa/{name}"


@dataclass(frozen=True)
class Service:
    name: str  # frontend, backend-v1, backend-v2
    netns: str | None  # the network namespace it runs in (None: the host's)
    admin: Address  # its sidecar's admin plane
    inbound: Address  # its sidecar's inbound listener
    app: Address  # the app, on its namespace's loopback
    outbound: Address | None = None  # frontend: the listener its app calls the backend through

    @property
    def identity(self) -> str:
        return spiffe_id(self.name)


@dataclass(frozen=True)
class MeshPlan:
    ca: Address
    ca_netns: str | None
    services: dict[str, Service]
    admin_token: bool = False  # admin planes off loopback need a bearer token

    @property
    def netns(self) -> bool:
        return self.ca_netns is not None

    def backend(self, version: str) -> Service:
        return self.services[BACKENDS[version]]


def loopback_plan(ports: Iterator[int]) -> MeshPlan:
    """Everything on 127.0.0.1, on the ports `ports` yields."""
    def here() -> Address:
        return Address("127.0.0.1", next(ports))

    services = {FRONTEND: Service(FRONTEND, None, here(), here(), here(), here())}
    for name in BACKENDS.values():
        services[name] = Service(name, None, here(), here(), here())
    return MeshPlan(here(), None, services)


def netns_plan(namespaces: Mapping[str, str], hosts: Mapping[str, str]) -> MeshPlan:
    """Each service (and the CA, named "ca") in its own namespace `namespaces[name]`,
    reachable at `hosts[name]`; the same well-known ports in every namespace."""
    loopback = "127.0.0.1"
    services = {}
    for name in SERVICES:
        host = hosts[name]
        outbound = Address(loopback, OUTBOUND_PORT) if name == FRONTEND else None
        services[name] = Service(name, namespaces[name], Address(host, ADMIN_PORT),
                                 Address(host, INBOUND_PORT), Address(loopback, APP_PORT), outbound)
    return MeshPlan(Address(hosts["ca"], CA_PORT), namespaces["ca"], services, admin_token=True)


@dataclass(frozen=True)
class Files:
    """Paths a sidecar config names (per service: its token; shared: the bundle)."""

    trust_bundle: str
    tokens: Mapping[str, str]  # service -> token file
    admin_token: str | None = None


def sidecar_config(plan: MeshPlan, name: str, files: Files, *,
                   weights: Mapping[str, int] = CANARY_STEPS[0], broken: bool = False) -> dict[str, Any]:
    """The config of `name`'s sidecar. `weights` is the frontend's split between v1 and v2;
    `broken` makes a backend's sidecar answer every request 503 (fault injection)."""
    service = plan.services[name]
    admin: dict[str, Any] = {"address": str(service.admin)}
    if plan.admin_token and files.admin_token is not None:
        admin["token_file"] = files.admin_token
    config: dict[str, Any] = {
        "node": {"id": name},
        "admin": admin,
        "workers": 1,
        "drain_timeout": "5s",
        "identity": {"ca": str(plan.ca), "token_file": files.tokens[name],
                     "trust_bundle": files.trust_bundle, "ttl": CERT_TTL},
    }
    if name == FRONTEND:
        config.update(_frontend(plan, service, weights))
    else:
        config.update(_backend(plan, service, broken))
    return config


def _frontend(plan: MeshPlan, service: Service, weights: Mapping[str, int]) -> dict[str, Any]:
    assert service.outbound is not None
    backend_route: dict[str, Any] = {
        "name": "backend",
        "match": {"prefix": "/"},
        "timeout": "3s",
        "retry": {"attempts": 2, "on": ["5xx", "connect-failure", "reset", "gateway-error"],
                  "per_try_timeout": "1s", "backoff": {"base": "5ms", "max": "50ms"}},
    }
    backend_route.update(split_target(weights))
    outlier = {"consecutive_5xx": 3, "consecutive_gateway_errors": 3, "interval": "1s",
               "base_ejection_time": "3s", "max_ejection_percent": 50}
    v1, v2 = plan.backend("v1"), plan.backend("v2")
    return {
        "listeners": [
            # The mesh's edge: clients outside the mesh (the load generator) come in here.
            {"name": "inbound", "address": str(service.inbound), "protocol": "http",
             "routes": [{"name": "app", "match": {"prefix": "/"}, "cluster": "frontend-app"}]},
            # The app's way out: plaintext on its own loopback, mTLS from here on.
            {"name": "outbound", "address": str(service.outbound), "protocol": "http",
             "routes": [backend_route]},
        ],
        "clusters": [
            {"name": "frontend-app", "endpoints": [str(service.app)]},
            {"name": "backend-v1", "endpoints": [str(v1.inbound)],
             "tls": {"identity": [v1.identity]}, "outlier_detection": outlier},
            {"name": "backend-v2",
             "endpoints": [{"address": str(v2.inbound), "weight": FALLBACK_WEIGHT[0]},
                           {"address": str(v1.inbound), "weight": FALLBACK_WEIGHT[1]}],
             "tls": {"identity": [v2.identity, v1.identity]}, "outlier_detection": outlier},
        ],
    }


def split_target(weights: Mapping[str, int]) -> dict[str, Any]:
    """The route's target for a v1/v2 split: `split` with the non-zero weights, or `cluster`
    when one version takes everything."""
    parts = [{"cluster": BACKENDS[version], "weight": weight} for version, weight in weights.items() if weight > 0]
    if not parts:
        raise ValueError("a split needs a positive weight")
    if len(parts) == 1:
        return {"cluster": parts[0]["cluster"]}
    return {"split": parts}


def _backend(plan: MeshPlan, service: Service, broken: bool) -> dict[str, Any]:
    route: dict[str, Any] = {"name": "app", "match": {"prefix": "/"}, "cluster": "app"}
    if broken:
        route["fault"] = {"abort": {"percent": 100, "status": 503}}
    return {
        "listeners": [
            {"name": "inbound", "address": str(service.inbound), "protocol": "http",
             "tls": {"mode": "strict"},
             "policy": [{"allow": {"from": [plan.services[FRONTEND].identity]}}],
             "routes": [route]},
        ],
        "clusters": [{"name": "app", "endpoints": [str(service.app)]}],
    }


def next_canary(weights: Mapping[str, int]) -> dict[str, int]:
    """The canary step after `weights` (90/10 -> 50/50 -> 0/100 -> 90/10)."""
    for i, step in enumerate(CANARY_STEPS):
        if dict(weights) == step:
            return dict(CANARY_STEPS[(i + 1) % len(CANARY_STEPS)])
    return dict(CANARY_STEPS[0])


def weights_text(weights: Mapping[str, int]) -> str:
    return "/".join(str(weights.get(version, 0)) for version in BACKENDS)
