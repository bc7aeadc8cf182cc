"""Endpoint selection: weights are honoured, failover never repeats an endpoint."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from proxy.cluster import make_balancer
from proxy.cluster.balancer import WeightedRandom, WeightedRoundRobin
from proxy.config import Address, Cluster, Endpoint


def cluster(*weights: int, lb: str = "round_robin") -> Cluster:
    endpoints = tuple(Endpoint(address=Address("127.0.0.1", 9000 + i), weight=w) for i, w in enumerate(weights))
    return Cluster(name="c", endpoints=endpoints, lb=lb)


def test_round_robin_gives_each_endpoint_its_weight_in_every_window():
    balancer = WeightedRoundRobin(cluster(5, 1, 1).endpoints)
    for _ in range(10):
        window = [balancer.pick() for _ in range(7)]
        assert Counter(window) == {0: 5, 1: 1, 2: 1}


def test_round_robin_interleaves_rather_than_bunches():
    balancer = WeightedRoundRobin(cluster(5, 1, 1).endpoints)
    assert [balancer.pick() for _ in range(7)] == [0, 0, 1, 0, 2, 0, 0]


def test_round_robin_equal_weights_rotate():
    balancer = WeightedRoundRobin(cluster(1, 1, 1).endpoints)
    assert [balancer.pick() for _ in range(6)] == [0, 1, 2, 0, 1, 2]


@pytest.mark.parametrize("lb", ["round_robin", "random"])
def test_failover_never_picks_an_excluded_endpoint(lb):
    balancer = make_balancer(cluster(1, 3, 1, lb=lb))
    for _ in range(200):
        tried: list[int] = []
        for _ in range(3):
            index = balancer.pick(tried)
            assert index not in tried
            tried.append(index)
        assert sorted(tried) == [0, 1, 2]


@pytest.mark.parametrize("lb", ["round_robin", "random"])
def test_everything_excluded_still_picks_something(lb):
    balancer = make_balancer(cluster(1, 1, lb=lb))
    assert balancer.pick([0, 1]) in (0, 1)


def test_random_follows_the_weights():
    balancer = WeightedRandom(cluster(1, 3).endpoints, rng=random.Random(7))
    counts = Counter(balancer.pick() for _ in range(20_000))
    assert counts[1] / 20_000 == pytest.approx(0.75, abs=0.02)
