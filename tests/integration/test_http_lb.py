"""Load balancing seen from outside: which endpoint answers, for every `lb` algorithm.

Each endpoint is an origin that answers with its own name, so the client counts where
its requests went. The algorithms themselves are unit-tested in tests/unit/test_lb.py;
here the point is that the proxy drives them: it tells least_request and peak_ewma when
requests start and end, and hands ring_hash and maglev the `hash_on` key.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter, defaultdict

import pytest

from .h2_support import H2Client
from .http_support import (
    Origins,
    RawClient,
    build_request,
    cluster,
    delay,
    http_config,
    respond,
    route,
)


@pytest.fixture
def origins():
    """`origins("name", idle_close=...)` starts an Origin; all are closed after the test."""
    factory = Origins()
    yield factory
    factory.close()


def named_origins(origins, *names: str, slow: dict[str, float] | None = None):
    """Origins answering their own name, `slow[name]` seconds late for the slow ones."""
    slow = slow or {}
    servers = []
    for name in names:
        answer = respond(body=name.encode())
        servers.append(origins(name).on("/", delay(slow[name], answer) if name in slow else answer))
    return servers


def lb_config(servers, lb: str, weights: dict[str, int] | None = None, **fields) -> dict:
    weights = weights or {}
    endpoints = [{"address": s.endpoint, "weight": weights.get(s.name, 1)} for s in servers]
    return http_config([route("all", "up")], [cluster("up", endpoints, lb=lb, **fields)])


def sequential(address, count: int, headers=()) -> list[str]:
    """`count` GETs one after another on one kept-alive connection: who answered each."""
    answers = []
    payload = build_request("GET", "/", headers)
    with RawClient(address, timeout=10) as client:
        for _ in range(count):
            client.send(payload)
            response = client.read_response()
            assert response.status == 200, response
            answers.append(response.body.decode())
    return answers


def concurrent(address, clients: int, seconds: float) -> Counter[str]:
    """`clients` threads each sending GETs back to back for `seconds`: who answered."""
    counts: Counter[str] = Counter()
    errors: list[Exception] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    payload = build_request("GET", "/")

    def run() -> None:
        mine: Counter[str] = Counter()
        try:
            with RawClient(address, timeout=10) as client:
                while time.monotonic() < deadline:
                    client.send(payload)
                    response = client.read_response()
                    assert response.status == 200, response
                    mine[response.body.decode()] += 1
        except Exception as exc:  # noqa: BLE001 - re-raised by the test thread
            errors.append(exc)
        with lock:
            counts.update(mine)

    threads = [threading.Thread(target=run) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 20)
    assert not errors, errors[0]
    return counts


# -- round robin -----------------------------------------------------------------------------


def test_round_robin_takes_turns(meshproxy, origins):
    servers = named_origins(origins, "a", "b", "c")
    proxy = meshproxy(lb_config(servers, "round_robin"))
    answers = sequential(proxy.address(), 300)
    assert Counter(answers) == {"a": 100, "b": 100, "c": 100}
    # Turns, not runs: every three requests in a row went to three different endpoints.
    assert all(len(set(answers[i:i + 3])) == 3 for i in range(0, 300, 3))


def test_round_robin_weights(meshproxy, origins):
    servers = named_origins(origins, "light", "heavy")
    proxy = meshproxy(lb_config(servers, "round_robin", weights={"heavy": 3}))
    answers = sequential(proxy.address(), 400)
    counts = Counter(answers)
    assert abs(counts["light"] - 100) <= 2 and abs(counts["heavy"] - 300) <= 2, counts
    # Interleaved: the light endpoint never waits long for its turn.
    light = [k for k, a in enumerate(answers) if a == "light"]
    gaps = [b - a for a, b in itertools.pairwise(light)]
    assert max(gaps) <= 8, gaps


def test_random_spreads_by_weight(meshproxy, origins):
    servers = named_origins(origins, "one", "two")
    proxy = meshproxy(lb_config(servers, "random", weights={"two": 2}))
    counts = Counter(sequential(proxy.address(), 1500))
    assert abs(counts["two"] / 1500 - 2 / 3) < 0.05, counts


# -- load aware ------------------------------------------------------------------------------


def test_least_request_sends_less_to_a_slow_endpoint_under_concurrency(meshproxy, origins):
    """A slow endpoint holds its requests longer, so it has more in flight whenever the
    balancer compares: with 8 clients it should get a small share (random gives ~1/2)."""
    servers = named_origins(origins, "fast", "slow", slow={"slow": 0.15})
    proxy = meshproxy(lb_config(servers, "least_request"))
    counts = concurrent(proxy.address(), clients=8, seconds=2.0)
    total = sum(counts.values())
    assert counts["slow"] / total < 0.15, counts
    assert total > 100, counts


def test_peak_ewma_steers_away_from_a_slow_endpoint(meshproxy, origins):
    """Once the slow endpoint's latency is observed, it costs far more than the fast one."""
    servers = named_origins(origins, "fast", "slow", slow={"slow": 0.1})
    proxy = meshproxy(lb_config(servers, "peak_ewma"))
    counts = concurrent(proxy.address(), clients=2, seconds=2.0)
    total = sum(counts.values())
    assert counts["slow"] / total < 0.1, counts
    assert total > 100, counts


# -- consistent hashing ----------------------------------------------------------------------

HASHING = pytest.mark.parametrize("lb", ["ring_hash", "maglev"])


def _users_to_endpoints(address, users: list[str], header) -> dict[str, set[str]]:
    """Each user's requests, three per user on separate connections, interleaved."""
    seen: dict[str, set[str]] = defaultdict(set)
    for _ in range(3):
        for user in users:
            with RawClient(address, timeout=10) as client:
                client.send(build_request("GET", "/", [header(user)]))
                response = client.read_response()
                assert response.status == 200, response
                seen[user].add(response.body.decode())
    return seen


def _assert_sticky_and_spread(seen: dict[str, set[str]], endpoints: int) -> None:
    moved = {user: sorted(where) for user, where in seen.items() if len(where) != 1}
    assert not moved, f"users answered by more than one endpoint: {moved}"
    per_endpoint = Counter(next(iter(where)) for where in seen.values())
    assert len(per_endpoint) == endpoints, per_endpoint  # 40 users over 3: all get some
    assert max(per_endpoint.values()) < 0.7 * len(seen), per_endpoint


@HASHING
def test_hash_on_header_keeps_each_user_on_one_endpoint(meshproxy, origins, lb):
    servers = named_origins(origins, "e0", "e1", "e2")
    proxy = meshproxy(lb_config(servers, lb, hash_on={"header": "x-user"}))
    users = [f"user-{i}" for i in range(40)]
    seen = _users_to_endpoints(proxy.address(), users, lambda u: ("X-User", u))
    _assert_sticky_and_spread(seen, 3)


@HASHING
def test_hash_on_header_holds_for_http2_streams(meshproxy, origins, lb):
    servers = named_origins(origins, "e0", "e1", "e2")
    proxy = meshproxy(lb_config(servers, lb, hash_on={"header": "x-user"}))
    users = [f"user-{i}" for i in range(40)]
    seen: dict[str, set[str]] = defaultdict(set)
    client = H2Client(proxy.address())
    try:
        for _ in range(3):
            for user in users:
                response = client.get("/", headers=[(b"x-user", user.encode())])
                assert response.status == 200, response.headers
                seen[user].add(bytes(response.body).decode())
    finally:
        client.close()
    _assert_sticky_and_spread(seen, 3)


@HASHING
def test_hash_on_cookie_keeps_each_session_on_one_endpoint(meshproxy, origins, lb):
    servers = named_origins(origins, "e0", "e1", "e2")
    proxy = meshproxy(lb_config(servers, lb, hash_on={"cookie": "session"}))
    users = [f"s{i:03d}" for i in range(40)]
    seen = _users_to_endpoints(proxy.address(), users, lambda u: ("Cookie", f"theme=dark; session={u}; x=1"))
    _assert_sticky_and_spread(seen, 3)


def test_hash_on_source_ip_keeps_each_client_address_on_one_endpoint(meshproxy, origins):
    servers = named_origins(origins, "e0", "e1", "e2")
    proxy = meshproxy(lb_config(servers, "ring_hash", hash_on={"source_ip": True}))
    seen: dict[str, set[str]] = defaultdict(set)
    for _ in range(3):
        for i in range(10, 50):
            source = f"127.0.0.{i}"
            with RawClient(proxy.address(), timeout=10, source=source) as client:
                client.send(build_request("GET", "/"))
                seen[source].add(client.read_response().body.decode())
    _assert_sticky_and_spread(seen, 3)
