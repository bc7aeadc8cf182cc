"""Bootstrap tokens on disk, and the per-IP limit on failed attempts."""

from __future__ import annotations

import hashlib
import stat
import threading
from datetime import UTC, datetime, timedelta

import pytest

from proxy.ca.failures import FailureLimiter
from proxy.ca.tokens import TokenStore
from proxy.identity import SpiffeId

WEB = SpiffeId.parse("spiffe://mesh.local/ns/default/sa/web")
API = SpiffeId.parse("spiffe://mesh.local/ns/default/sa/api")
NOW = datetime.now(UTC)
HOUR = timedelta(hours=1)


@pytest.fixture
def store(tmp_path) -> TokenStore:
    return TokenStore(tmp_path / "tokens.json", tmp_path / "tokens.lock")


def test_a_token_grants_its_identity_as_often_as_minted(store):
    web = store.mint(WEB, HOUR, 2, NOW)
    api = store.mint(API, HOUR, 1, NOW)
    assert web != api
    assert store.redeem(api, NOW) == API
    assert store.redeem(web, NOW) == WEB
    assert store.redeem(web, NOW) == WEB
    assert store.redeem(web, NOW) is None
    assert store.redeem(api, NOW) is None


def test_an_expired_or_unknown_token_grants_nothing(store):
    token = store.mint(WEB, HOUR, 5, NOW)
    assert store.redeem(token, NOW + HOUR) is None
    assert store.redeem("no-such-token", NOW) is None
    assert store.redeem("x" * 10_000, NOW) is None


def test_only_a_hash_is_stored_in_an_owner_only_file(store):
    token = store.mint(WEB, HOUR, 1, NOW)
    text = store.path.read_text()
    assert token not in text
    assert hashlib.sha256(token.encode()).hexdigest() in text
    assert str(WEB) in text
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600


def test_spent_and_expired_entries_are_dropped_on_the_next_write(store):
    spent = store.mint(WEB, HOUR, 1, NOW)
    store.mint(API, timedelta(seconds=1), 1, NOW)
    store.redeem(spent, NOW)
    store.mint(API, HOUR, 1, NOW + timedelta(minutes=1))
    assert store.path.read_text().count("sha256") == 1


def _in_threads(count: int, work) -> list:
    results: list = [None] * count

    def run(index: int) -> None:
        results[index] = work(index)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return results


def test_concurrent_mints_lose_no_token(store):
    # Each call opens its own lock description, so threads exclude each other as processes do.
    tokens = _in_threads(16, lambda _: store.mint(WEB, HOUR, 1, NOW))
    assert all(store.redeem(token, NOW) == WEB for token in tokens)


def test_concurrent_redeems_never_spend_a_use_twice(store):
    token = store.mint(WEB, HOUR, 5, NOW)
    granted = _in_threads(12, lambda _: store.redeem(token, NOW))
    assert granted.count(WEB) == 5
    assert granted.count(None) == 7


# -- failed attempts -------------------------------------------------------------------------


def test_an_ip_waits_after_too_many_failures_in_the_window():
    limiter = FailureLimiter(limit=3, window=60.0)
    for t in (0.0, 10.0, 20.0):
        assert limiter.retry_after("10.0.0.1", t) == 0
        limiter.record("10.0.0.1", t)
    assert limiter.retry_after("10.0.0.1", 30.0) == 30.0  # until the failure at 0 is 60s old
    assert limiter.retry_after("10.0.0.2", 30.0) == 0
    assert limiter.retry_after("10.0.0.1", 60.0) == 0
    limiter.record("10.0.0.1", 60.0)  # failures at 10, 20, 60: blocked until 70
    assert limiter.retry_after("10.0.0.1", 61.0) == 9.0


def test_the_limiter_forgets_the_least_recently_failing_ip_first():
    limiter = FailureLimiter(limit=1, window=60.0, max_clients=2)
    limiter.record("a", 0.0)
    limiter.record("b", 1.0)
    limiter.record("a", 2.0)
    limiter.record("c", 3.0)  # evicts "b"
    assert limiter.retry_after("a", 4.0) > 0
    assert limiter.retry_after("b", 4.0) == 0
    assert limiter.retry_after("c", 4.0) > 0
