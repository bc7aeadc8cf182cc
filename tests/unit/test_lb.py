"""The compiled balancers: what each algorithm promises, checked on the algorithm itself."""

from __future__ import annotations

import heapq
from collections import Counter

import pytest

from proxy._core import lb
from proxy.config import Address, Endpoint

KEYS = [b"user-%d" % i for i in range(10_000)]


def endpoints(*weights: int, first: int = 0) -> list[Endpoint]:
    return [
        Endpoint(address=Address(f"10.0.0.{first + i + 1}", 8080), weight=w) for i, w in enumerate(weights)
    ]


def addresses_picked(balancer: lb.LoadBalancer, keys: list[bytes]) -> list[Address]:
    return [balancer.endpoints[balancer.pick(key=key)].address for key in keys]


# -- the hash ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "seed", "expected"),
    [  # values from the reference implementation (the xxhash package)
        (b"", 0, 0xEF46DB3751D8E999),
        (b"a", 0, 0xD24EC4F1A98C6E5B),
        (b"abc", 0, 0x44BC2CF5AD770999),
        (b"Nobody inspects the spammish repetition", 0, 0xFBCEA83C8A378BF1),
        (bytes(range(100)), 0, 0x6AC1E58032166597),
        (b"", 1, 0xD5AFBA1336A3BE4B),
        (bytes(range(100)), 1, 0x3D19A3A2098A7023),
    ],
)
def test_xxh64_matches_the_reference(data, seed, expected):
    assert lb.xxh64(data, seed) == expected


# -- least request ----------------------------------------------------------------------------


def test_least_request_avoids_an_endpoint_with_many_requests_in_flight():
    balancer = lb.LeastRequest(endpoints(1, 1, 1), seed=5)
    for _ in range(50):
        balancer.on_request_start(1)
    counts = Counter(balancer.pick() for _ in range(3_000))
    assert counts[1] < 3_000 / 3 / 10
    assert counts[0] > 1_000 and counts[2] > 1_000


def test_least_request_follows_the_weights_while_idle():
    balancer = lb.LeastRequest(endpoints(1, 3), seed=5)
    counts = Counter(balancer.pick() for _ in range(20_000))
    assert counts[1] / 20_000 == pytest.approx(0.75, abs=0.02)


def test_least_request_compares_requests_per_unit_of_weight():
    balancer = lb.LeastRequest(endpoints(1, 4), seed=5)
    for _ in range(3):
        balancer.on_request_start(1)  # 3 / 4 per weight
    balancer.on_request_start(0)  # 1 / 1
    assert {balancer.pick() for _ in range(100)} == {1}


def test_least_request_spreads_a_steady_load():
    balancer = lb.LeastRequest(endpoints(1, 1, 1, 1), seed=5)
    for _ in range(400):  # requests that never finish: each goes to a less loaded endpoint
        balancer.on_request_start(balancer.pick())
    loads = [balancer.active(i) for i in range(4)]
    assert max(loads) - min(loads) <= 10


# -- peak EWMA --------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def serve(balancer: lb.PeakEwma, clock: FakeClock, latency: list[float], seconds: float) -> Counter:
    """A request every 0.2 ms for `seconds`; endpoint i answers after latency[i]."""
    in_flight: list[tuple[float, int, float]] = []
    picks: Counter = Counter()
    end = clock.now + seconds
    while clock.now < end:
        while in_flight and in_flight[0][0] <= clock.now:
            done, index, sent = heapq.heappop(in_flight)
            balancer.on_request_end(index, done - sent)
        index = balancer.pick()
        balancer.on_request_start(index)
        picks[index] += 1
        heapq.heappush(in_flight, (clock.now + latency[index], index, clock.now))
        clock.now += 0.0002
    return picks


def test_peak_ewma_moves_traffic_away_from_a_slow_endpoint_and_back():
    clock = FakeClock()
    # A one-second time constant keeps the simulation short; the shape is the same at 10 s.
    balancer = lb.PeakEwma(endpoints(1, 1, 1), seed=9, decay=1.0, clock=clock)
    serve(balancer, clock, [0.001, 0.001, 0.001], 3.0)  # settle on the real latencies

    slow = serve(balancer, clock, [0.001, 0.001, 0.010], 1.0)
    assert slow[2] / sum(slow.values()) < 0.05  # a fair share is 0.33

    serve(balancer, clock, [0.001, 0.001, 0.001], 3.0)  # recovered: trusted again gradually
    back = serve(balancer, clock, [0.001, 0.001, 0.001], 1.0)
    assert back[2] / sum(back.values()) > 0.15


def test_peak_ewma_jumps_up_at_once_and_comes_down_gradually():
    clock = FakeClock()
    balancer = lb.PeakEwma(endpoints(1), default_rtt=0.005, decay=10.0, clock=clock)
    assert balancer.estimate(0) == pytest.approx(0.005)  # a new endpoint starts at the default
    balancer.on_request_end(0, 0.050)
    assert balancer.estimate(0) == pytest.approx(0.050)
    clock.now += 0.001
    balancer.on_request_end(0, 0.001)  # right after the peak: barely moves
    assert balancer.estimate(0) == pytest.approx(0.050, rel=0.001)
    clock.now += 10.0
    balancer.on_request_end(0, 0.001)  # one time constant later: 63% of the way down
    assert balancer.estimate(0) == pytest.approx(0.001 + 0.049 * 0.3679, rel=0.01)


def test_peak_ewma_estimate_of_an_unused_endpoint_fades():
    clock = FakeClock()
    balancer = lb.PeakEwma(endpoints(1, 1), decay=10.0, clock=clock)
    balancer.on_request_end(1, 0.100)
    clock.now += 30.0
    assert balancer.estimate(1) == pytest.approx(0.100 * 0.0498, rel=0.01)


def test_peak_ewma_prefers_the_idle_endpoint_at_equal_latency():
    balancer = lb.PeakEwma(endpoints(1, 1), seed=2)
    balancer.on_request_start(0)
    assert {balancer.pick() for _ in range(100)} == {1}


# -- consistent hashing -----------------------------------------------------------------------

HASHES = [lb.RingHash, lb.Maglev]


@pytest.mark.parametrize("algorithm", HASHES)
def test_same_key_same_endpoint_in_every_proxy(algorithm):
    # Built from the config alone: two proxies (different seeds) agree on every key.
    first, second = algorithm(endpoints(1, 1, 1, 1), seed=1), algorithm(endpoints(1, 1, 1, 1), seed=2)
    assert addresses_picked(first, KEYS[:1000]) == addresses_picked(second, KEYS[:1000])
    assert len(set(addresses_picked(first, KEYS[:1000]))) == 4


@pytest.mark.parametrize("algorithm", HASHES)
@pytest.mark.parametrize("n", [3, 5, 10])
def test_adding_an_endpoint_moves_only_its_share(algorithm, n):
    before = addresses_picked(algorithm(endpoints(*[1] * n)), KEYS)
    grown = algorithm(endpoints(*[1] * n) + endpoints(1, first=n))
    after = addresses_picked(grown, KEYS)
    moved = [new for old, new in zip(before, after) if old != new]
    assert len(moved) / len(KEYS) <= 1 / (n + 1) + 0.02
    newcomer = grown.endpoints[-1].address
    assert sum(address != newcomer for address in moved) <= 0.01 * len(KEYS)


@pytest.mark.parametrize("algorithm", HASHES)
@pytest.mark.parametrize("n", [3, 5, 10])
def test_removing_an_endpoint_moves_only_its_keys(algorithm, n):
    full = endpoints(*[1] * n)
    before = addresses_picked(algorithm(full), KEYS)
    after = addresses_picked(algorithm(full[:1] + full[2:]), KEYS)
    gone = full[1].address
    others_moved = sum(old != new and old != gone for old, new in zip(before, after))
    # The ring moves none; Maglev rebuilds its table and moves a few more (the paper's
    # "minimal disruption" is near-minimal, not minimal).
    assert others_moved <= (0 if algorithm is lb.RingHash else 0.01 * len(KEYS))


def test_ring_failover_goes_where_removal_would():
    full = endpoints(1, 1, 1, 1)
    ring, without = lb.RingHash(full), lb.RingHash(full[:2] + full[3:])
    for key in KEYS[:2000]:
        assert full[ring.pick([2], key)].address == without.endpoints[without.pick(key=key)].address


def test_ring_points_follow_the_weights():
    ring = lb.RingHash(endpoints(1, 2, 3))
    assert Counter(ring.owners()) == {0: lb.RING_VNODES, 1: 2 * lb.RING_VNODES, 2: 3 * lb.RING_VNODES}
    shares = Counter(ring.pick(key=key) for key in KEYS * 5)  # 10,000 keys, picked five times
    for index, weight in enumerate((1, 2, 3)):
        assert shares[index] / 50_000 == pytest.approx(weight / 6, abs=0.03)


def test_ring_size_is_capped_for_extreme_weights():
    ring = lb.RingHash(endpoints(1, 10_000_000))
    owners = Counter(ring.owners())
    assert sum(owners.values()) <= lb.MAX_RING + 1 and owners[0] >= 1


def test_maglev_table_is_balanced_for_equal_weights():
    table = lb.Maglev(endpoints(1, 1, 1, 1, 1, 1, 1))
    slots = Counter(table.owners())
    assert sum(slots.values()) == lb.MAGLEV_SIZE
    assert max(slots.values()) - min(slots.values()) <= 1
    keys = Counter(table.pick(key=b"k%d" % i) for i in range(70_000))
    assert all(count == pytest.approx(10_000, rel=0.05) for count in keys.values())


def test_maglev_honours_weights():
    slots = Counter(lb.Maglev(endpoints(1, 2, 3, 10)).owners())
    for index, weight in enumerate((1, 2, 3, 10)):
        assert slots[index] / lb.MAGLEV_SIZE == pytest.approx(weight / 16, abs=0.002)


@pytest.mark.parametrize("algorithm", HASHES)
def test_hash_failover_walks_to_the_next_endpoint_not_tried(algorithm):
    balancer = algorithm(endpoints(1, 1, 1))
    for key in KEYS[:500]:
        first = balancer.pick(key=key)
        second = balancer.pick([first], key)
        third = balancer.pick([first, second], key)
        assert len({first, second, third}) == 3
        assert balancer.pick([first], key) == second  # failover is as sticky as the key
