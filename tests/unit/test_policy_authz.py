"""Authorization policy: rules compiled from config, decisions by identity, method and path."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config import PolicyRule
from proxy.policy import DecisionCounts, Policy

WEB = "spiffe://mesh.local/ns/default/sa/web"
API = "spiffe://mesh.local/ns/default/sa/api"
ADMIN = "spiffe://mesh.local/ns/ops/sa/admin"
OTHER_DOMAIN = "spiffe://other.local/ns/default/sa/web"


def policy(*rules: dict, counts: DecisionCounts | None = None) -> Policy:
    return Policy.compile([PolicyRule.model_validate(rule) for rule in rules], counts)


def test_no_rules_allows_everything_and_counts_nothing():
    empty = policy()
    assert empty.empty
    assert empty.decide(None) and empty.decide(WEB, b"DELETE", b"/admin")
    assert (empty.counts.authz_allowed, empty.counts.authz_denied) == (0, 0)


def test_once_an_allow_rule_exists_everything_else_is_denied():
    rules = policy({"allow": {"from": [WEB]}})
    assert rules.decide(WEB)
    assert not rules.decide(API)
    assert not rules.decide(None)
    assert (rules.counts.authz_allowed, rules.counts.authz_denied) == (1, 2)


def test_deny_rules_win_over_allow_rules():
    rules = policy({"allow": {"from": ["*"]}}, {"deny": {"from": [ADMIN]}})
    assert rules.decide(WEB) and rules.decide(API)
    assert not rules.decide(ADMIN)
    deny_first = policy({"deny": {"from": [ADMIN]}}, {"allow": {"from": [ADMIN]}})
    assert not deny_first.decide(ADMIN)


def test_only_deny_rules_allow_the_rest():
    rules = policy({"deny": {"from": ["spiffe://mesh.local/ns/ops/*"]}})
    assert not rules.decide(ADMIN)
    assert rules.decide(WEB) and rules.decide(None)


@pytest.mark.parametrize(("principal", "identity", "expected"), [
    (WEB, WEB, True),
    (WEB, WEB + "2", False),
    ("spiffe://mesh.local/ns/default/*", WEB, True),
    ("spiffe://mesh.local/ns/default/*", ADMIN, False),
    ("spiffe://mesh.local/ns/default/*", "spiffe://mesh.local/ns/defaultx/sa/a", False),
    ("spiffe://mesh.local/*", ADMIN, True),
    ("spiffe://mesh.local/*", OTHER_DOMAIN, False),
    ("*", OTHER_DOMAIN, True),
    ("*", None, False),
    (WEB, None, False),
])
def test_sources_exact_prefix_and_any(principal, identity, expected):
    assert policy({"allow": {"from": [principal]}}).decide(identity) is expected


def test_methods_and_path_prefix_all_must_match():
    rules = policy({"allow": {"from": [WEB], "methods": ["GET", "head"], "prefix": "/api"}})
    assert rules.decide(WEB, b"GET", b"/api/users")
    assert rules.decide(WEB, b"HEAD", b"/api")
    assert rules.decide(WEB, b"GET", b"/apis")  # a plain prefix, as in routes
    assert not rules.decide(WEB, b"POST", b"/api/users")
    assert not rules.decide(WEB, b"GET", b"/admin")
    assert not rules.decide(API, b"GET", b"/api")
    assert not rules.decide(WEB, None, None)  # a tcp-style question never matches a method rule


def test_the_query_is_not_part_of_the_path():
    rules = policy({"deny": {"prefix": "/admin"}})
    assert not rules.decide(None, b"GET", b"/admin?x=1")
    assert rules.decide(None, b"GET", b"/?next=/admin")


def test_a_rule_without_fields_matches_everything():
    assert not policy({"deny": {}}).decide(WEB, b"GET", b"/")
    assert policy({"allow": {}}).decide(None, b"GET", b"/")


def test_decisions_count_on_the_given_object():
    counts = DecisionCounts()
    rules = policy({"allow": {"from": [WEB]}}, counts=counts)
    for identity in (WEB, WEB, API):
        rules.decide(identity)
    assert (counts.authz_allowed, counts.authz_denied) == (2, 1)


identities = st.sampled_from([None, WEB, API, ADMIN, OTHER_DOMAIN])
methods = st.sampled_from([None, b"GET", b"POST"])
paths = st.sampled_from([None, b"/", b"/api/x", b"/admin"])
rule_bodies = st.fixed_dictionaries({}, optional={
    "from": st.lists(st.sampled_from([WEB, API, "*", "spiffe://mesh.local/ns/default/*"]),
                     min_size=1, max_size=2, unique=True),
    "methods": st.lists(st.sampled_from(["GET", "POST"]), min_size=1, max_size=2, unique=True),
    "prefix": st.sampled_from(["/", "/api", "/admin"]),
})
rules = st.lists(st.one_of(st.builds(lambda b: {"allow": b}, rule_bodies),
                           st.builds(lambda b: {"deny": b}, rule_bodies)), max_size=4)


def _reference(rules: list[dict], identity, method, path) -> bool:
    """The rules as the config docs state them, written out naively."""
    def matches(body: dict) -> bool:
        if "from" in body:
            if identity is None:
                return False
            if not any(p == "*" or p == identity or (p.endswith("/*") and identity.startswith(p[:-1]))
                       for p in body["from"]):
                return False
        if "methods" in body and (method is None or method.decode() not in body["methods"]):
            return False
        return "prefix" not in body or (path is not None and path.decode().startswith(body["prefix"]))

    if any("deny" in rule and matches(rule["deny"]) for rule in rules):
        return False
    allows = [rule["allow"] for rule in rules if "allow" in rule]
    return not allows or any(matches(body) for body in allows)


@given(rules, identities, methods, paths)
def test_decisions_agree_with_the_written_rules(rule_list, identity, method, path):
    assert policy(*rule_list).decide(identity, method, path) == _reference(rule_list, identity, method, path)
