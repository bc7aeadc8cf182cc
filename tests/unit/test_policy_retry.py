"""Retries: which failures a route retries, RFC 9110's replay rule, jittered backoff within
its bounds, and a budget that caps retries under a total outage and refills after it."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import Backoff, Retry
from proxy.policy import RetryBudget, RetryPolicy, may_replay

NO_ANSWER = ["connect_refused", "connect_timeout", "connect_failed", "dns_failed", "upstream_reset",
             "upstream_timeout", "upstream_protocol_error"]


def policy(*on: str, codes: tuple[int, ...] = (), **fields) -> RetryPolicy:
    return RetryPolicy(Retry(on=on, retriable_status_codes=codes, **fields))


# -- what is retried ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("on", "retried"),
    [
        ("connect-failure", {"connect_refused", "connect_timeout", "connect_failed", "dns_failed"}),
        ("refused", {"connect_refused"}),
        ("reset", set(NO_ANSWER)),
        ("5xx", set(NO_ANSWER)),
        ("gateway-error", set(NO_ANSWER)),
        ("503", set()),
        ("retriable-status-codes", set()),
    ],
)
def test_failures_without_an_answer(on, retried):
    rule = policy(on, codes=(429,) if on == "retriable-status-codes" else ())
    assert {code for code in NO_ANSWER if rule.retriable(502, code)} == retried


@pytest.mark.parametrize(
    ("on", "retried"),
    [
        ("connect-failure", set()),
        ("refused", set()),
        ("reset", set()),
        ("5xx", {500, 501, 502, 503, 504, 599}),
        ("gateway-error", {502, 503, 504}),
        ("503", {503}),
        ("retriable-status-codes", {409, 429}),
    ],
)
def test_answers(on, retried):
    rule = policy(on, codes=(409, 429) if on == "retriable-status-codes" else ())
    statuses = [200, 204, 301, 404, 409, 429, 499, 500, 501, 502, 503, 504, 599]
    assert {status for status in statuses if rule.retriable(status)} == retried


def test_conditions_add_up_and_unknown_errors_are_never_retried():
    rule = policy("refused", "503")
    assert rule.retriable(0, "connect_refused") and rule.retriable(503)
    assert not rule.retriable(0, "connect_timeout") and not rule.retriable(502)
    assert not policy("5xx").retriable(503, "circuit_open")


def test_the_default_conditions():
    rule = RetryPolicy(Retry())
    assert all(rule.retriable(0, code) for code in NO_ANSWER)
    assert [s for s in (500, 502, 503, 504, 429) if rule.retriable(s)] == [502, 503, 504]
    assert (rule.attempts, rule.max_body_bytes, rule.per_try_timeout) == (1, 65536, None)


# -- RFC 9110 9.2.2 ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", [b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"])
def test_idempotent_requests_may_be_replayed_after_any_failure(method):
    assert all(may_replay(method, code) for code in [*NO_ANSWER, None])


@pytest.mark.parametrize("method", [b"POST", b"PATCH", b"CONNECT", b"LOCK"])
def test_other_requests_only_when_they_never_left(method):
    replayable = {code for code in [*NO_ANSWER, None] if may_replay(method, code)}
    assert replayable == {"connect_refused", "connect_timeout", "connect_failed", "dns_failed"}


# -- backoff ----------------------------------------------------------------------------------


def test_backoff_ceilings_follow_envoy():
    rule = RetryPolicy(Retry())  # base 25ms, max 250ms
    just_below_one = 1 - 1e-12
    ceilings = [rule.backoff(n, just_below_one) for n in range(1, 7)]
    assert ceilings == pytest.approx([0.025, 0.075, 0.175, 0.25, 0.25, 0.25])
    assert [rule.backoff(n, 0.0) for n in range(1, 7)] == [0.0] * 6


@given(st.integers(min_value=1, max_value=1000), st.floats(min_value=0, max_value=1, exclude_max=True))
def test_backoff_is_always_within_bounds(retry, roll):
    rule = policy("5xx", backoff=Backoff(base=0.01, max=2.0))
    assert 0 <= rule.backoff(retry, roll) < min(0.01 * (2 ** min(retry, 60) - 1), 2.0)


def test_backoff_is_jittered_over_its_whole_range():
    rule = RetryPolicy(Retry())
    delays = [rule.backoff(2, i / 100) for i in range(100)]
    assert min(delays) == 0 and max(delays) == pytest.approx(0.075 * 0.99)
    assert len(set(delays)) == 100


# -- the budget -------------------------------------------------------------------------------


def test_budget_allows_the_reserve_without_traffic():
    budget = RetryBudget(percent=20, min_per_second=10)  # 10 s window: 100 retries in reserve
    assert sum(budget.try_spend(0.0) for _ in range(150)) == 100
    assert budget.denied == 50


def test_budget_caps_retries_under_a_total_outage():
    # 1000 requests a second, every try fails, each request would retry 3 times.
    budget = RetryBudget(percent=20, min_per_second=10)
    retries = 0
    for ms in range(30_000):  # 30 s of outage
        now = ms / 1000
        budget.record_request(now)
        for _ in range(3):
            if budget.try_spend(now):
                retries += 1
            else:
                break
    # At most 20% of 1000/s + 10/s = 210/s, and the budget never lets more through.
    assert retries <= 210 * 30 + 100
    assert retries >= 200 * 30  # it does let that much through: retries still help
    assert budget.denied > 0


def test_budget_refills_as_the_window_slides():
    budget = RetryBudget(percent=0, min_per_second=1)  # 10 retries per 10 s window
    assert sum(budget.try_spend(0.5) for _ in range(20)) == 10
    assert not budget.try_spend(9.9)
    assert budget.try_spend(10.5)  # the slot of 0.5 s slid out
    assert sum(budget.try_spend(10.6) for _ in range(20)) == 9
    assert sum(budget.try_spend(40.0) for _ in range(20)) == 10  # long after: all slots clear


def test_budget_grows_with_requests_and_forgets_them():
    budget = RetryBudget(percent=50, min_per_second=0)
    assert not budget.can_retry(0.0)
    for _ in range(10):
        budget.record_request(0.0)
    assert budget.requests == 10 and budget.can_retry(0.0)
    assert sum(budget.try_spend(0.0) for _ in range(10)) == 5
    assert budget.retries == 5
    assert not budget.can_retry(5.0) and budget.requests == 10
    budget.try_spend(10.0)  # the requests at 0 s slid out: nothing to spend
    assert (budget.requests, budget.retries) == (0, 0)
    assert not budget.can_retry(10.0)


def test_budget_tolerates_a_clock_that_steps_back():
    budget = RetryBudget(percent=100, min_per_second=0)
    budget.record_request(5.0)
    budget.record_request(4.0)
    assert budget.requests == 2
    assert budget.try_spend(4.0) and budget.try_spend(3.0) and not budget.try_spend(5.0)


def test_budget_from_config():
    budget = RetryBudget.from_config(Retry().budget)
    assert (budget.percent, budget.reserve) == (20.0, 100.0)
