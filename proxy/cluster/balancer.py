"""Endpoint selection for one cluster: the config's `lb` name -> a balancer.

Pure decision code: a balancer holds per-endpoint state and answers "which endpoint
next?". The algorithms live in the compiled `proxy._core.lb` (a pick is on every request);
this module names the interface the request path relies on and picks the algorithm.

The caller tells the balancer about each request: `on_request_start` when it is sent,
`on_request_end` with its latency when it is done, whatever the outcome (least_request and
peak_ewma steer by these). Callers that retry on another endpoint pass the indices they
already tried, so a failover never lands twice on the same endpoint.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol

from .._core import lb
from ..config import Cluster, Endpoint


class Balancer(Protocol):
    endpoints: Sequence[Endpoint]

    def pick(self, exclude: Collection[int] = (), key: bytes | None = None) -> int:
        """Index of the endpoint to use, never one in `exclude` unless all are.

        `key` is what ring_hash and maglev hash (the `hash_on` header, cookie or source IP);
        without one they pick at random. The other algorithms ignore it.
        """
        ...

    def on_request_start(self, index: int) -> None:
        """One more request in flight to `index`."""
        ...

    def on_request_end(self, index: int, latency: float) -> None:
        """A request to `index` finished after `latency` seconds."""
        ...

    def active(self, index: int) -> int:
        """Requests in flight to `index`."""
        ...


_ALGORITHMS: dict[str, type[lb.LoadBalancer]] = {
    "round_robin": lb.RoundRobin,
    "random": lb.WeightedRandom,
    "least_request": lb.LeastRequest,
    "peak_ewma": lb.PeakEwma,
    "ring_hash": lb.RingHash,
    "maglev": lb.Maglev,
}


def make_balancer(cluster: Cluster, rng_seed: int | None = None) -> Balancer:
    """A fresh balancer for `cluster`; `rng_seed` makes its random choices repeatable."""
    return _ALGORITHMS[cluster.lb](cluster.endpoints, rng_seed)
