"""Endpoint selection through `make_balancer`: every algorithm honours the interface the
request path relies on (failover exclusion, in-flight counts, repeatable seeds)."""

from __future__ import annotations

from collections import Counter

import pytest

from proxy.cluster import Balancer, make_balancer
from proxy.config import Address, Cluster, Endpoint, HashOn

ALGORITHMS = ["round_robin", "random", "least_request", "peak_ewma", "ring_hash", "maglev"]
HASHING = ("ring_hash", "maglev")


def cluster(*weights: int, lb: str = "round_robin") -> Cluster:
    endpoints = tuple(
        Endpoint(address=Address("127.0.0.1", 9000 + i), weight=w) for i, w in enumerate(weights)
    )
    hash_on = HashOn(header="x-user") if lb in HASHING else None
    return Cluster(name="c", endpoints=endpoints, lb=lb, hash_on=hash_on)


def test_round_robin_gives_each_endpoint_its_weight_in_every_window():
    balancer = make_balancer(cluster(5, 1, 1))
    for _ in range(10):
        window = [balancer.pick() for _ in range(7)]
        assert Counter(window) == {0: 5, 1: 1, 2: 1}


def test_round_robin_interleaves_rather_than_bunches():
    balancer = make_balancer(cluster(5, 1, 1))
    assert [balancer.pick() for _ in range(7)] == [0, 0, 1, 0, 2, 0, 0]


def test_round_robin_equal_weights_rotate():
    balancer = make_balancer(cluster(1, 1, 1))
    assert [balancer.pick() for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_round_robin_failover_keeps_the_rotation_of_the_others():
    balancer = make_balancer(cluster(1, 1, 1))
    assert [balancer.pick([1]) for _ in range(4)] == [0, 2, 0, 2]


def test_random_follows_the_weights():
    balancer = make_balancer(cluster(1, 3, lb="random"), rng_seed=7)
    counts = Counter(balancer.pick() for _ in range(20_000))
    assert counts[1] / 20_000 == pytest.approx(0.75, abs=0.02)


@pytest.mark.parametrize("lb", ALGORITHMS)
def test_every_algorithm_is_a_balancer_over_the_cluster_endpoints(lb):
    c = cluster(1, 2, lb=lb)
    balancer: Balancer = make_balancer(c)
    assert tuple(balancer.endpoints) == c.endpoints
    assert all(balancer.pick() in (0, 1) for _ in range(100))


@pytest.mark.parametrize("lb", ALGORITHMS)
@pytest.mark.parametrize("key", [None, b"user-7"])
def test_failover_never_picks_an_excluded_endpoint(lb, key):
    balancer = make_balancer(cluster(1, 3, 1, 2, lb=lb), rng_seed=1)
    for _ in range(200):
        tried: list[int] = []
        for _ in range(4):
            index = balancer.pick(tried, key)
            assert index not in tried
            tried.append(index)
        assert sorted(tried) == [0, 1, 2, 3]


@pytest.mark.parametrize("lb", ALGORITHMS)
def test_everything_excluded_still_picks_something(lb):
    balancer = make_balancer(cluster(1, 1, lb=lb))
    assert balancer.pick([0, 1]) in (0, 1)
    assert balancer.pick((1, 0, 1), b"k") in (0, 1)


@pytest.mark.parametrize("lb", ALGORITHMS)
def test_exclusion_lasts_one_pick(lb):
    balancer = make_balancer(cluster(1, 1, lb=lb), rng_seed=3)
    balancer.pick([0])
    assert {balancer.pick() for _ in range(100)} == {0, 1}


@pytest.mark.parametrize("lb", ALGORITHMS)
def test_a_bad_exclude_list_leaves_no_trace(lb):
    balancer = make_balancer(cluster(1, 1, lb=lb), rng_seed=3)
    with pytest.raises(TypeError):
        balancer.pick([0, "one"])
    assert balancer.pick([99, -1]) in (0, 1)  # indices out of range are ignored
    assert {balancer.pick() for _ in range(100)} == {0, 1}


@pytest.mark.parametrize("lb", ALGORITHMS)
def test_active_counts_requests_in_flight(lb):
    balancer = make_balancer(cluster(1, 1, lb=lb))
    balancer.on_request_start(1)
    balancer.on_request_start(1)
    assert (balancer.active(0), balancer.active(1)) == (0, 2)
    balancer.on_request_end(1, 0.002)
    assert balancer.active(1) == 1
    balancer.on_request_end(0, 0.002)  # an end without a start does not go negative
    assert balancer.active(0) == 0
    with pytest.raises(IndexError):
        balancer.on_request_start(2)


@pytest.mark.parametrize("lb", ALGORITHMS)
def test_a_seed_makes_picks_repeatable(lb):
    first, second = (make_balancer(cluster(1, 2, 3, lb=lb), rng_seed=11) for _ in range(2))
    assert [first.pick() for _ in range(50)] == [second.pick() for _ in range(50)]


@pytest.mark.parametrize("lb", HASHING)
def test_hash_balancers_follow_the_key(lb):
    balancer = make_balancer(cluster(1, 1, 1, lb=lb))
    assert len({balancer.pick(key=b"user-42") for _ in range(50)}) == 1
    assert {balancer.pick() for _ in range(200)} == {0, 1, 2}  # no key: random
    with pytest.raises(TypeError):
        balancer.pick(key="user-42")
