"""Endpoint health: thresholds flip an endpoint both ways, outlier ejections keep traffic
away too, and below the panic threshold every endpoint takes traffic again."""

import pytest

from proxy.cluster import EndpointAvailability, HealthState, OutlierDetector
from proxy.cluster.health import HEALTHY, PENDING, UNHEALTHY
from proxy.config import Address, Cluster, Endpoint, HealthCheck, OutlierDetection


def test_endpoints_start_pending_and_the_first_check_decides():
    health = HealthState(3, healthy_threshold=2, unhealthy_threshold=3)
    assert [health.status(i) for i in range(3)] == [PENDING] * 3
    assert not health.healthy(0)
    assert health.record(0, True) and health.healthy(0)
    assert health.record(1, False) and health.status(1) == UNHEALTHY
    assert health.version == 2


def test_thresholds_flip_both_ways():
    health = HealthState(1, healthy_threshold=2, unhealthy_threshold=3)
    health.record(0, True)
    assert [health.record(0, False) for _ in range(3)] == [False, False, True]
    assert health.status(0) == UNHEALTHY
    assert [health.record(0, True) for _ in range(2)] == [False, True]
    assert health.status(0) == HEALTHY


def test_a_run_must_be_unbroken():
    health = HealthState(1, healthy_threshold=1, unhealthy_threshold=2)
    health.record(0, True)
    for _ in range(5):
        assert not health.record(0, False)
        assert not health.record(0, True)  # resets the run of failures
    assert health.healthy(0)


def test_bad_thresholds():
    with pytest.raises(ValueError):
        HealthState(1, healthy_threshold=0)


def availability(n: int, panic: float = 50.0, outlier: OutlierDetector | None = None) -> EndpointAvailability:
    health = HealthState(n, healthy_threshold=1, unhealthy_threshold=1)
    for i in range(n):
        health.record(i, True)
    return EndpointAvailability(n, health, outlier, panic)


def test_unhealthy_endpoints_get_no_traffic_and_come_back():
    a = availability(4)
    a.health.record(1, False)
    assert a.excluded(0.0) == {1} and a.available(0.0) == [0, 2, 3]
    a.health.record(1, True)
    assert a.excluded(0.0) == frozenset() and not a.panic


def test_panic_below_the_threshold_uses_every_endpoint():
    a = availability(4, panic=50.0)
    a.health.record(0, False)
    a.health.record(1, False)
    assert a.excluded(0.0) == {0, 1} and not a.panic  # 50% usable: not below 50%
    a.health.record(2, False)
    assert a.excluded(0.0) == frozenset() and a.panic  # 25% usable: spread over all
    assert a.available(0.0) == [0, 1, 2, 3]
    a.health.record(2, True)
    assert a.excluded(0.0) == {0, 1} and not a.panic  # panic ends


def test_panic_threshold_zero_never_panics():
    a = availability(2, panic=0.0)
    a.health.record(0, False)
    a.health.record(1, False)
    assert a.excluded(0.0) == {0, 1} and a.available(0.0) == [] and not a.panic


def test_all_pending_is_panic():
    # Before any check has answered, nothing is known healthy: traffic goes everywhere.
    a = EndpointAvailability(2, HealthState(2))
    assert a.available(0.0) == [0, 1] and a.panic
    a.health.record(1, True)
    assert a.available(0.0) == [1] and not a.panic


def test_ejected_endpoints_are_excluded_until_they_return():
    detection = OutlierDetection(consecutive_5xx=1, base_ejection_time=10.0, max_ejection_percent=50)
    outlier = OutlierDetector(detection, 4, now=0.0)
    a = availability(4, outlier=outlier)
    outlier.record_response(3, 500, 1.0)
    assert a.excluded(1.0) == {3}
    assert a.excluded(10.9) == {3}
    assert a.excluded(11.0) == frozenset()  # excluded() refreshes the detector
    assert a.usable(3)


def test_health_and_ejection_together_reach_panic():
    detection = OutlierDetection(consecutive_5xx=1, max_ejection_percent=100)
    outlier = OutlierDetector(detection, 4, now=0.0)
    a = availability(4, panic=50.0, outlier=outlier)
    a.health.record(0, False)
    outlier.record_response(1, 503, 0.0)
    assert a.excluded(0.0) == {0, 1}
    outlier.record_response(2, 503, 0.0)
    assert a.excluded(0.0) == frozenset() and a.panic
    assert not a.usable(2) and a.usable(3)


def test_without_health_checks_or_detection_everything_is_available():
    a = EndpointAvailability(3)
    assert a.available(0.0) == [0, 1, 2] and not a.panic


def test_for_cluster_builds_what_the_cluster_configures():
    endpoints = [Endpoint(address=Address("127.0.0.1", 9000 + i)) for i in range(3)]
    plain = EndpointAvailability.for_cluster(Cluster(name="c", endpoints=endpoints), now=0.0)
    assert (plain.health, plain.outlier, plain.panic_threshold) == (None, None, 50.0)
    cluster = Cluster(name="c", endpoints=endpoints, outlier_detection=OutlierDetection(),
                      health_check=HealthCheck(tcp=True, healthy_threshold=4, panic_threshold=10))
    full = EndpointAvailability.for_cluster(cluster, now=0.0)
    assert full.health.healthy_threshold == 4 and full.panic_threshold == 10
    assert full.outlier.base_ejection_time == 30.0 and full.endpoints == 3
