"""Fault injection: whether to delay or abort one request, from a route's `fault` config
and uniform random rolls (pure: the caller draws the rolls).

    action = fault_action(route.fault, random(), random())
    if action.delay:
        await trio.sleep(action.delay)
    if action.abort is not None:
        ...answer action.abort locally, `x-meshproxy-error: fault_abort`

Delay and abort are decided independently, as in Envoy: a request can be delayed, then
aborted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from .sampling import sampled

if TYPE_CHECKING:
    from ..config import Fault


class FaultAction(NamedTuple):
    delay: float  # seconds to wait before going on; 0.0 for none
    abort: int | None  # the status to answer instead of forwarding; None to forward


NO_FAULT = FaultAction(0.0, None)


def fault_action(fault: Fault | None, delay_roll: float, abort_roll: float) -> FaultAction:
    """What to do to one request; each roll is uniform in [0, 1)."""
    if fault is None:
        return NO_FAULT
    delay = fault.delay
    abort = fault.abort
    seconds = delay.duration if delay is not None and sampled(delay.percent, delay_roll) else 0.0
    status = abort.status if abort is not None and sampled(abort.percent, abort_roll) else None
    if not seconds and status is None:
        return NO_FAULT
    return FaultAction(seconds, status)
