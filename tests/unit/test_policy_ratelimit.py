"""The token bucket: a burst up front, then `rps` a second, refilled with time and never
beyond `burst`."""

import pytest

from proxy.config import RateLimit
from proxy.policy import TokenBucket


def test_burst_then_limited_then_refilled():
    bucket = TokenBucket(rps=10, burst=5, now=100.0)
    assert [bucket.allow(100.0) for _ in range(6)] == [True] * 5 + [False]
    assert bucket.rejected == 1
    assert not bucket.allow(100.05)  # half a token
    assert bucket.allow(100.1)  # one token after 1/rps
    assert not bucket.allow(100.1)


def test_steady_rate_over_time():
    bucket = TokenBucket(rps=100, burst=1, now=0.0)
    allowed = sum(bucket.allow(ms / 1000) for ms in range(10_000))  # asked 1000/s for 10 s
    assert allowed == pytest.approx(1000, abs=2)


def test_refill_never_exceeds_burst():
    bucket = TokenBucket(rps=1000, burst=3, now=0.0)
    assert sum(bucket.allow(3600.0) for _ in range(10)) == 3


def test_fractional_rate():
    bucket = TokenBucket(rps=0.5, burst=1, now=0.0)
    assert bucket.allow(0.0)
    assert not bucket.allow(1.9)
    assert bucket.retry_after(1.9) == pytest.approx(0.1)
    assert bucket.allow(2.0)


def test_retry_after_is_zero_with_a_token():
    bucket = TokenBucket(rps=2, burst=2, now=0.0)
    assert bucket.retry_after(0.0) == 0.0
    bucket.allow(0.0)
    bucket.allow(0.0)
    assert bucket.retry_after(0.0) == pytest.approx(0.5)


def test_clock_stepping_back_adds_nothing():
    bucket = TokenBucket(rps=10, burst=1, now=10.0)
    assert bucket.allow(10.0)
    assert not bucket.allow(5.0)
    assert not bucket.allow(10.05)
    assert bucket.allow(10.1)


def test_from_config_and_bad_values():
    bucket = TokenBucket.from_config(RateLimit(rps=2.5), now=0.0)
    assert (bucket.rate, bucket.burst) == (2.5, 3)
    with pytest.raises(ValueError):
        TokenBucket(rps=0, burst=1, now=0.0)
    with pytest.raises(ValueError):
        TokenBucket(rps=1, burst=0, now=0.0)
