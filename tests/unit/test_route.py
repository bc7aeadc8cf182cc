"""Route matching: first match wins; prefix, path, host, method and headers all hold."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from proxy.config import Route, RouteMatch, WeightedCluster
from proxy.route import RouteTable


def route(name: str, cluster: str | None = None, split: tuple = (), **match) -> Route:
    """A route to `cluster` (by default the cluster named like the route) or a split."""
    cluster = cluster or (None if split else name)
    return Route(name=name, match=RouteMatch(**match), cluster=cluster, split=split)


def headers(**values: str):
    """A request's header lookup: lowercase name -> first value."""
    table = {name.replace("_", "-").encode(): value.encode() for name, value in values.items()}
    return table.get


NO_HEADERS = headers()


def name_of(table: RouteTable, path: bytes = b"/", method: bytes = b"GET", host: bytes | None = None,
            header=NO_HEADERS) -> str | None:
    found = table.match(method, host, path, header)
    return found.name if found else None


def test_first_match_wins():
    table = RouteTable.compile((route("api", prefix="/api"), route("api-v2", prefix="/api/v2"), route("all")))
    assert name_of(table, b"/api/v2/users") == "api"
    assert name_of(table, b"/other") == "all"


def test_no_match_is_none():
    table = RouteTable.compile((route("api", prefix="/api"), route("health", path="/healthz")))
    assert name_of(table, b"/web") is None
    assert RouteTable.compile(()).match(b"GET", None, b"/", NO_HEADERS) is None


@pytest.mark.parametrize(
    ("path", "matched"),
    [(b"/api", True), (b"/api/users", True), (b"/apis", True), (b"/ap", False), (b"/API", False)],
)
def test_prefix_is_a_plain_case_sensitive_string_prefix(path, matched):
    table = RouteTable.compile((route("api", prefix="/api"),))
    assert (name_of(table, path) == "api") is matched


@pytest.mark.parametrize(
    ("path", "matched"),
    [(b"/healthz", True), (b"/healthz/", False), (b"/healthz/x", False), (b"/health", False)],
)
def test_path_is_exact(path, matched):
    table = RouteTable.compile((route("health", path="/healthz"),))
    assert (name_of(table, path) == "health") is matched


def test_default_match_catches_every_path():
    table = RouteTable.compile((route("all"),))
    assert name_of(table, b"/") == name_of(table, b"/any/thing") == "all"


def test_methods_any_of_and_case_sensitive():
    table = RouteTable.compile((route("write", methods=["post", "PUT"]), route("read")))
    assert name_of(table, method=b"POST") == name_of(table, method=b"PUT") == "write"
    assert name_of(table, method=b"GET") == "read"
    assert name_of(table, method=b"post") == "read"  # methods are case-sensitive on the wire


def test_headers_must_all_hold_exactly():
    table = RouteTable.compile(
        (route("canary", headers={"X-Canary": "1", "x-team": "web"}), route("stable"))
    )
    assert name_of(table, header=headers(x_canary="1", x_team="web")) == "canary"
    assert name_of(table, header=headers(x_canary="1")) == "stable"
    assert name_of(table, header=headers(x_canary="1", x_team="Web")) == "stable"
    assert name_of(table, header=headers(x_canary="10", x_team="web")) == "stable"


def test_header_lookup_gets_lowercase_names():
    asked: list[bytes] = []
    table = RouteTable.compile((route("canary", headers={"X-Canary": "1"}),))
    table.match(b"GET", None, b"/", lambda name: asked.append(name))
    assert asked == [b"x-canary"]


@pytest.mark.parametrize(
    ("host", "matched"),
    [
        (b"api.example.com", True),
        (b"API.Example.COM", True),
        (b"api.example.com:8080", True),
        (b"API.example.com:443", True),
        (b"web.example.com", False),
        (b"api.example.com.evil", False),
        (b"", False),
        (None, False),
    ],
)
def test_exact_host_ignores_case_and_port(host, matched):
    table = RouteTable.compile((route("api", host="api.example.com"),))
    assert (name_of(table, host=host) == "api") is matched


@pytest.mark.parametrize(
    ("host", "matched"),
    [
        (b"api.example.com", True),
        (b"a.b.example.com:80", True),
        (b"X.EXAMPLE.COM", True),
        (b"example.com", False),
        (b".example.com", False),
        (b"badexample.com", False),
        (b"example.com.au", False),
        (b"[::1]:80", False),
    ],
)
def test_wildcard_host_matches_names_under_the_domain(host, matched):
    table = RouteTable.compile((route("any", host="*.Example.com"),))
    assert (name_of(table, host=host) == "any") is matched


def test_every_condition_must_hold():
    table = RouteTable.compile(
        (
            route("full", prefix="/api", host="api.example.com", methods=["GET"], headers={"x-canary": "1"}),
            route("fallback"),
        )
    )
    good = {"path": b"/api/x", "method": b"GET", "host": b"api.example.com", "header": headers(x_canary="1")}
    assert name_of(table, **good) == "full"
    wrong = {"path": b"/web", "method": b"POST", "host": b"web.example.com", "header": NO_HEADERS}
    for field, value in wrong.items():
        assert name_of(table, **{**good, field: value}) == "fallback", field


def test_host_routes_before_a_catch_all():
    table = RouteTable.compile(
        (route("api", host="api.example.com"), route("wild", host="*.example.com"), route("rest"))
    )
    assert name_of(table, host=b"api.example.com") == "api"
    assert name_of(table, host=b"www.example.com") == "wild"
    assert name_of(table, host=b"example.org") == "rest"
    assert name_of(table) == "rest"


def test_match_returns_the_configured_route_object():
    routes = (route("api", prefix="/api"),)
    assert RouteTable.compile(routes).match(b"GET", None, b"/api", NO_HEADERS) is routes[0]


def test_pick_cluster_of_a_single_cluster_route():
    api = route("api", cluster="api-v1")
    assert RouteTable.compile((api,)).pick_cluster(api, 0.99) == "api-v1"


def test_split_follows_the_weights():
    parts = (WeightedCluster(cluster="v2", weight=10), WeightedCluster(cluster="v1", weight=90))
    canary = route("canary", split=parts)
    table = RouteTable.compile((canary,))
    rng = random.Random(42)
    counts = Counter(table.pick_cluster(canary, rng.random()) for _ in range(10_000))
    assert counts["v2"] / 10_000 == pytest.approx(0.10, abs=0.02)
    assert counts["v1"] / 10_000 == pytest.approx(0.90, abs=0.02)


def test_split_boundaries():
    parts = tuple(WeightedCluster(cluster=f"c{i}", weight=w) for i, w in enumerate((1, 2, 1)))
    split = route("split", split=parts)
    table = RouteTable.compile((split,))
    picks = [table.pick_cluster(split, x) for x in (0.0, 0.2499, 0.25, 0.7499, 0.75, 0.9999, 1.0)]
    assert picks == ["c0", "c0", "c1", "c1", "c2", "c2", "c2"]
