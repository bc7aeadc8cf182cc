"""Fault injection and mirroring decide from the rolls they are given: the configured share
of requests, independently for delay and abort."""

import pytest

from proxy.config import Fault, FaultAbort, FaultDelay, Mirror
from proxy.policy import NO_FAULT, FaultAction, fault_action, mirror_cluster, sampled

ROLLS = [i / 1000 for i in range(1000)]


def test_no_fault_config_means_no_fault():
    assert fault_action(None, 0.0, 0.0) is NO_FAULT
    assert NO_FAULT == FaultAction(0.0, None)


def test_delay_for_its_share():
    fault = Fault(delay=FaultDelay(percent=25, duration=0.5))
    actions = [fault_action(fault, roll, 0.0) for roll in ROLLS]
    assert actions.count(FaultAction(0.5, None)) == 250
    assert actions.count(NO_FAULT) == 750


def test_abort_for_its_share():
    fault = Fault(abort=FaultAbort(percent=0.5, status=503))
    aborted = [fault_action(fault, 0.0, roll).abort for roll in ROLLS]
    assert aborted.count(503) == 5 and aborted.count(None) == 995


def test_delay_and_abort_are_independent():
    fault = Fault(delay=FaultDelay(percent=50, duration=1.0), abort=FaultAbort(percent=50, status=500))
    assert fault_action(fault, 0.1, 0.1) == FaultAction(1.0, 500)
    assert fault_action(fault, 0.1, 0.9) == FaultAction(1.0, None)
    assert fault_action(fault, 0.9, 0.1) == FaultAction(0.0, 500)
    assert fault_action(fault, 0.9, 0.9) is NO_FAULT


def test_percent_defaults_to_every_request():
    fault = Fault(abort=FaultAbort(status=429))
    assert all(fault_action(fault, 0.0, roll).abort == 429 for roll in [0.0, 0.5, 0.999999])


@pytest.mark.parametrize(("percent", "expected"), [(0, 0), (0.1, 1), (10, 100), (99.9, 999), (100, 1000)])
def test_sampled_share(percent, expected):
    assert sum(sampled(percent, roll) for roll in ROLLS) == expected


def test_mirror_cluster():
    mirror = Mirror(cluster="shadow", percent=30)
    assert [mirror_cluster(mirror, roll) for roll in (0.0, 0.29, 0.3, 0.99)] == ["shadow", "shadow", None, None]
    assert mirror_cluster(None, 0.0) is None
    assert mirror_cluster(Mirror(cluster="s"), 0.999999) == "s"
