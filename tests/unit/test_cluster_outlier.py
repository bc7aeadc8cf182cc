"""Outlier detection: consecutive failures eject an endpoint for base x times ejected, it
comes back when that time is over, and never more than max_ejection_percent go at once."""

import pytest

from proxy.cluster import OutlierDetector
from proxy.config import OutlierDetection


def detector(endpoints: int = 10, **fields) -> OutlierDetector:
    config = {"consecutive_5xx": 3, "consecutive_gateway_errors": 2, "interval": 10.0,
              "base_ejection_time": 30.0, "max_ejection_percent": 100, **fields}
    return OutlierDetector(OutlierDetection(**config), endpoints, now=0.0)


def fail(d: OutlierDetector, index: int, now: float, status: int = 500, times: int = 1) -> bool:
    """Record `times` answers with `status`; True when one of them ejected the endpoint."""
    ejected = False
    for _ in range(times):
        ejected |= d.record_response(index, status, now)
    return ejected


def test_consecutive_5xx_eject_and_the_endpoint_comes_back():
    d = detector()
    assert not fail(d, 0, 1.0, times=2)
    assert fail(d, 0, 1.0)
    assert d.ejected(0) and d.ejected_count == 1 and d.ejections[0] == 1
    assert d.ejected_until(0) == 31.0
    assert d.refresh(30.9) == [] and d.ejected(0)
    assert d.refresh(31.0) == [0]
    assert not d.ejected(0) and d.ejected_count == 0 and d.ejected_until(0) is None


def test_a_success_breaks_the_run():
    d = detector()
    fail(d, 0, 1.0, times=2)
    d.record_response(0, 200, 1.0)
    fail(d, 0, 1.0, times=2)
    d.record_response(0, 404, 1.0)  # a 4xx is the client's problem, not the endpoint's
    assert not fail(d, 0, 1.0, times=2)
    assert not d.ejected(0)


def test_gateway_errors_and_local_failures_count_toward_the_gateway_detector():
    d = detector(consecutive_5xx=10, consecutive_gateway_errors=2)
    assert not d.record_response(1, 502, 0.0)
    assert d.record_local_failure(1, 0.0)  # connect failure, reset, timeout: a gateway error
    d = detector(consecutive_5xx=10, consecutive_gateway_errors=2)
    d.record_response(1, 503, 0.0)
    d.record_response(1, 500, 0.0)  # a 5xx that is not a gateway error ends that run
    assert not d.record_response(1, 504, 0.0)
    assert d.record_response(1, 504, 0.0)


def test_runs_of_any_5xx_count_toward_the_5xx_detector():
    d = detector(consecutive_5xx=3, consecutive_gateway_errors=10)
    assert [d.record_response(0, s, 0.0) for s in (500, 503, 501)] == [False, False, True]


def test_a_detector_set_to_zero_is_off():
    d = detector(consecutive_5xx=0, consecutive_gateway_errors=0)
    fail(d, 0, 0.0, status=503, times=100)
    assert not d.ejected(0)
    d = detector(consecutive_5xx=0, consecutive_gateway_errors=2)
    fail(d, 0, 0.0, status=500, times=100)
    assert not d.ejected(0)
    assert fail(d, 0, 0.0, status=503, times=2)


def test_ejection_time_grows_with_each_ejection_and_is_capped():
    d = detector(base_ejection_time=100.0)
    now = 0.0
    durations = []
    for _ in range(5):
        fail(d, 0, now, times=3)
        until = d.ejected_until(0)
        durations.append(until - now)
        now = until
        assert d.refresh(now) == [0]
    assert durations == [100.0, 200.0, 300.0, 300.0, 300.0]  # max_ejection_time 300 s
    assert d.ejections[0] == 5


def test_long_base_time_is_its_own_cap():
    d = detector(base_ejection_time=600.0)
    fail(d, 0, 0.0, times=3)
    assert d.ejected_until(0) == 600.0
    d.refresh(600.0)
    fail(d, 0, 600.0, times=3)
    assert d.ejected_until(0) == 1200.0


def test_multiplier_falls_by_one_for_each_interval_spent_back_in():
    d = detector(base_ejection_time=30.0, interval=10.0)
    fail(d, 0, 0.0, times=3)
    d.refresh(30.0)
    fail(d, 0, 30.0, times=3)
    assert d.ejected_until(0) == 90.0  # second ejection: 2 x 30 s
    assert d.refresh(90.0) == [0] and d.multiplier(0) == 2
    d.refresh(99.0)
    assert d.multiplier(0) == 2
    d.refresh(100.0)  # an interval tick, a full interval after its return
    assert d.multiplier(0) == 1
    d.refresh(110.0)
    assert d.multiplier(0) == 0
    fail(d, 0, 110.0, times=3)
    assert d.ejected_until(0) == 140.0  # back to base


def test_a_part_interval_back_in_does_not_count():
    d = detector(base_ejection_time=25.0, interval=10.0)
    fail(d, 0, 0.0, times=3)
    d.refresh(25.0)
    d.refresh(30.0)  # a tick only 5 s after its return
    assert d.multiplier(0) == 1
    d.refresh(40.0)
    assert d.multiplier(0) == 0


def test_late_refresh_catches_up_on_missed_ticks():
    d = detector(base_ejection_time=30.0, interval=10.0)
    for start in (0.0, 30.0, 90.0):
        fail(d, 0, start, times=3)
        d.refresh(d.ejected_until(0))
    assert d.multiplier(0) == 3  # returned at 180 s
    d.refresh(205.0)  # ticks at 190 and 200 were missed, 2 full intervals back in
    assert d.multiplier(0) == 1


def test_results_while_ejected_are_ignored():
    d = detector()
    fail(d, 0, 0.0, times=3)
    assert not fail(d, 0, 1.0, times=10)
    assert d.ejections[0] == 1 and d.ejected_until(0) == 30.0
    d.refresh(30.0)
    assert not fail(d, 0, 30.0, times=2)  # its run starts over once back


def test_never_beyond_max_ejection_percent():
    d = detector(endpoints=10, max_ejection_percent=20)
    for i in range(5):
        fail(d, i, 0.0, times=3)
    assert [d.ejected(i) for i in range(5)] == [True, True, False, False, False]
    assert d.ejected_count == 2 and d.overflows == 3
    d.refresh(30.0)  # the two come back: room again
    assert fail(d, 2, 30.0)  # its failures were kept: one more ejects it at once
    assert d.ejected(2)


def test_one_endpoint_may_always_be_ejected():
    d = detector(endpoints=3, max_ejection_percent=10)  # 10% of 3 is less than one
    assert fail(d, 0, 0.0, times=3)
    assert not fail(d, 1, 0.0, times=3)
    assert d.overflows == 1


def test_refresh_is_idle_until_something_is_due():
    d = detector()
    fail(d, 0, 0.0, times=3)
    version = d.version
    assert d.refresh(5.0) == [] and d.version == version
    assert d.refresh(30.0) == [0] and d.version == version + 1


@pytest.mark.parametrize("status", [100, 200, 302, 404, 499, 600])
def test_only_5xx_counts(status):
    d = detector()
    fail(d, 0, 0.0, status=status, times=10)
    assert not d.ejected(0)
