"""Endpoint selection for one cluster.

Pure decision code: a balancer holds per-endpoint state and answers "which
endpoint next?". Callers that retry on another endpoint pass the indices they
already tried, so a failover never lands twice on the same endpoint.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from typing import Protocol

from ..config import Cluster, Endpoint


class Balancer(Protocol):
    endpoints: Sequence[Endpoint]

    def pick(self, exclude: Collection[int] = ()) -> int:
        """Index of the endpoint to use, never one in `exclude` unless all are."""
        ...


class WeightedRoundRobin:
    """Smooth weighted round robin (the nginx algorithm).

    Each pick adds every endpoint's weight to its running score, takes the
    highest score and subtracts the total weight from it. Over any window of
    sum(weights) picks each endpoint is chosen exactly `weight` times, and the
    picks are interleaved rather than bunched (5,1,1 gives a a b a c a a).
    """

    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        self.endpoints = endpoints
        self._weights = [e.weight for e in endpoints]
        self._scores = [0] * len(endpoints)
        self._total = sum(self._weights)

    def pick(self, exclude: Collection[int] = ()) -> int:
        scores = self._scores
        weights = self._weights
        if len(scores) == 1:
            return 0
        best = -1
        total = 0
        for i, weight in enumerate(weights):
            if i in exclude:
                continue
            scores[i] += weight
            total += weight
            if best < 0 or scores[i] > scores[best]:
                best = i
        if best < 0:  # everything excluded: fall back to the plain rotation
            return self.pick()
        scores[best] -= total
        return best


class WeightedRandom:
    """Independent picks in proportion to the endpoint weights."""

    def __init__(self, endpoints: Sequence[Endpoint], rng: random.Random | None = None) -> None:
        self.endpoints = endpoints
        self._weights = [e.weight for e in endpoints]
        self._rng = rng or random.Random()

    def pick(self, exclude: Collection[int] = ()) -> int:
        if not exclude or len(exclude) >= len(self._weights):
            candidates = range(len(self._weights))
        else:
            candidates = [i for i in range(len(self._weights)) if i not in exclude]
        return self._rng.choices(candidates, [self._weights[i] for i in candidates])[0]


_BALANCERS = {"round_robin": WeightedRoundRobin, "random": WeightedRandom}


def make_balancer(cluster: Cluster) -> Balancer:
    return _BALANCERS[cluster.lb](cluster.endpoints)
