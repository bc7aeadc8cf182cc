"""Retries: which failed tries go again, how long to wait first, and how many a route can
afford. Pure decision code: the clock and the random rolls are arguments.

    policy = RetryPolicy(route.retry)              # once per config version
    budget = RetryBudget.from_config(route.retry.budget)   # per route, per worker
    budget.record_request(now)                     # each request (not each retry)
    ...
    # try `n` (1-based) ended with the upstream's `status`, or with our error `code`:
    if (n <= policy.attempts and policy.retriable(status, code)
            and may_replay(method, code) and body_fits and budget.try_spend(now)):
        await trio.sleep(policy.backoff(n, random()))

A try ends either with a response from the upstream (`status`, `error` None) or without
one, named by the `x-meshproxy-error` code the request path already uses for it
(`connect_refused`, `connect_timeout`, `connect_failed`, `dns_failed`, `upstream_reset`,
`upstream_timeout`, `upstream_protocol_error`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Retry
    from ..config import RetryBudget as BudgetConfig

# The `retry.on` conditions, one bit each.
CONNECT_FAILURE = 1 << 0  # any connect failure: refused, timed out, unreachable, unresolved
REFUSED = 1 << 1  # the connect was refused
RESET = 1 << 2  # no response: connect failure, reset or close, per-try timeout, garbage
STATUS_5XX = 1 << 3  # a 5xx answer, or no response at all (as RESET)
GATEWAY_ERROR = 1 << 4  # a 502, 503 or 504 answer, or no response at all (as RESET)
STATUS_503 = 1 << 5  # a 503 answer
LISTED_STATUS = 1 << 6  # an answer in retriable_status_codes

CONDITIONS = {
    "connect-failure": CONNECT_FAILURE,
    "refused": REFUSED,
    "reset": RESET,
    "5xx": STATUS_5XX,
    "gateway-error": GATEWAY_ERROR,
    "503": STATUS_503,
    "retriable-status-codes": LISTED_STATUS,
}

# What each way of getting no response counts as (Envoy's reading: `5xx`, `gateway-error`
# and `reset` also retry a try that got no answer at all).
_NO_RESPONSE = RESET | STATUS_5XX | GATEWAY_ERROR
FAILURES = {
    "connect_refused": _NO_RESPONSE | CONNECT_FAILURE | REFUSED,
    "connect_timeout": _NO_RESPONSE | CONNECT_FAILURE,
    "connect_failed": _NO_RESPONSE | CONNECT_FAILURE,
    "dns_failed": _NO_RESPONSE | CONNECT_FAILURE,
    "upstream_reset": _NO_RESPONSE,
    "upstream_timeout": _NO_RESPONSE,  # the per-try timeout
    "upstream_protocol_error": _NO_RESPONSE,
}

# Failures that provably happened before a byte of the request left: nothing was delivered.
NOT_DELIVERED = frozenset({"connect_refused", "connect_timeout", "connect_failed", "dns_failed"})

# RFC 9110 9.2.2: methods whose effect is the same whether sent once or several times.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


def may_replay(method: bytes, error: str | None) -> bool:
    """Whether a request may be sent again after a try that ended with `error` (None: the
    upstream answered). RFC 9110 9.2.2: an idempotent request may; any other only when
    the failed try provably never reached the upstream (its connect failed)."""
    return method in IDEMPOTENT or error in NOT_DELIVERED


class RetryPolicy:
    """A route's `retry` config compiled for the request path."""

    __slots__ = ("attempts", "backoff_base", "backoff_max", "codes", "max_body_bytes",
                 "on", "per_try_timeout")

    def __init__(self, retry: Retry) -> None:
        self.attempts = retry.attempts  # retries after the first try
        self.on = 0
        for name in retry.on:
            self.on |= CONDITIONS[name]
        self.codes = frozenset(retry.retriable_status_codes)
        self.per_try_timeout = retry.per_try_timeout
        self.backoff_base = retry.backoff.base
        self.backoff_max = retry.backoff.max
        self.max_body_bytes = retry.max_body_bytes  # bodies longer than this are not replayed

    def retriable(self, status: int, error: str | None = None) -> bool:
        """Whether a try that got `status` from the upstream, or failed with `error`
        without a response, meets one of the route's `on` conditions."""
        if error is not None:
            return bool(FAILURES.get(error, 0) & self.on)
        return bool(status_conditions(status, self.codes) & self.on)

    def backoff(self, retry: int, roll: float) -> float:
        """Seconds to wait before retry number `retry` (1 for the first), given a uniform
        `roll` in [0, 1): full jitter below min(base x (2^retry - 1), max), as Envoy does
        (with the defaults: under 25 ms, then 75 ms, 175 ms, and 250 ms from then on)."""
        ceiling = self.backoff_base * ((1 << min(max(retry, 1), 32)) - 1)
        return roll * min(ceiling, self.backoff_max)


def status_conditions(status: int, codes: frozenset[int] = frozenset()) -> int:
    """The `on` conditions an upstream answer with `status` meets."""
    found = LISTED_STATUS if status in codes else 0
    if 500 <= status <= 599:
        found |= STATUS_5XX
        if 502 <= status <= 504:
            found |= GATEWAY_ERROR
            if status == 503:
                found |= STATUS_503
    return found


class RetryBudget:
    """Retries a route may send: over a sliding window (10 one-second slots by default),
    fewer than `min_per_second` x window + `percent` of the requests, Linkerd's budget
    (20% + 10/s by default). Under a total outage retries then add at most that much
    load, instead of multiplying it by the number of attempts."""

    __slots__ = ("_requests", "_retries", "_slot", "_slot_width", "denied", "percent",
                 "requests", "reserve", "retries")

    def __init__(self, percent: float, min_per_second: float, window: float = 10.0,
                 slots: int = 10) -> None:
        if window <= 0 or slots < 1:
            raise ValueError("window must be positive and slots at least 1")
        self.percent = percent
        self.reserve = min_per_second * window  # retries allowed with no requests at all
        self._slot_width = window / slots
        self._requests = [0] * slots
        self._retries = [0] * slots
        self._slot = 0  # absolute number of the current slot
        self.requests = 0  # in the window
        self.retries = 0  # in the window
        self.denied = 0  # retries refused, ever (for metrics)

    @classmethod
    def from_config(cls, budget: BudgetConfig) -> RetryBudget:
        return cls(budget.percent, budget.min_per_second)

    def record_request(self, now: float) -> None:
        """A request arrived (count each once, however many tries it takes)."""
        index = self._advance(now)
        self._requests[index] += 1
        self.requests += 1

    def can_retry(self, now: float) -> bool:
        self._advance(now)
        return self.retries < self.reserve + self.percent / 100 * self.requests

    def try_spend(self, now: float) -> bool:
        """Take one retry from the budget if it has one; False (and counted) if not."""
        index = self._advance(now)
        if self.retries < self.reserve + self.percent / 100 * self.requests:
            self._retries[index] += 1
            self.retries += 1
            return True
        self.denied += 1
        return False

    def _advance(self, now: float) -> int:
        """Move the window to `now`, dropping the slots that slid out; the slot index."""
        slot = int(now // self._slot_width)
        size = len(self._requests)
        if slot > self._slot:
            for old in range(max(self._slot + 1, slot - size + 1), slot + 1):
                index = old % size
                self.requests -= self._requests[index]
                self.retries -= self._retries[index]
                self._requests[index] = self._retries[index] = 0
            self._slot = slot
        return self._slot % size  # a clock that steps back counts in the current slot
