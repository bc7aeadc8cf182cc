"""Authorization: a listener's `policy` rules, compiled once per config version, deciding
whether a peer identity (and for HTTP a method and path) may pass.

    policy = Policy.compile(listener.policy, counts=listener_stats)
    policy.decide("spiffe://mesh.local/ns/default/sa/web", b"GET", b"/api/users")  # -> bool

Rules, in the file's words:
- a rule matches when every field it sets matches: `from` (an exact SPIFFE ID, a prefix
  ending in "/*", or "*" for any verified identity; a peer without an identity matches no
  `from`), `methods` (exact, uppercase), `prefix` (a plain prefix of the path, query left out);
- any matching deny rule denies; then, once at least one allow rule exists, only what an
  allow rule matches passes; a listener without rules lets everything pass.

Decisions are counted on `counts` (anything with `authz_allowed` and `authz_denied` integer
attributes, such as the listener's stats); a policy without rules decides without counting.
Pure: no I/O, no trio.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

from ..config import PolicyRule


class AuthzCounts(Protocol):
    authz_allowed: int
    authz_denied: int


class DecisionCounts:
    """Counts of its own, for a policy compiled without a stats object."""

    __slots__ = ("authz_allowed", "authz_denied")

    def __init__(self) -> None:
        self.authz_allowed = 0
        self.authz_denied = 0


class _Rule:
    """One compiled rule; None for a field that the rule leaves open."""

    __slots__ = ("any_identity", "exact", "methods", "path_prefix", "prefixes", "sources")

    def __init__(self, rule: PolicyRule) -> None:
        match = rule.match
        self.sources = match.from_ is not None
        principals = match.from_ or ()
        self.any_identity = "*" in principals
        self.exact = frozenset(p for p in principals if not p.endswith("*"))
        # "spiffe://d/ns/x/*" matches every ID below spiffe://d/ns/x/ (not the prefix itself).
        self.prefixes = tuple(p[:-1] for p in principals if p.endswith("/*"))
        self.methods = None if match.methods is None else frozenset(m.encode() for m in match.methods)
        self.path_prefix = None if match.prefix is None else match.prefix.encode()

    def matches(self, identity: str | None, method: bytes | None, path: bytes | None) -> bool:
        if self.sources and not (identity is not None and (
                self.any_identity or identity in self.exact or identity.startswith(self.prefixes))):
            return False
        if self.methods is not None and method not in self.methods:
            return False
        if self.path_prefix is not None:
            if path is None:
                return False
            return path.partition(b"?")[0].startswith(self.path_prefix)
        return True


class Policy:
    """A listener's compiled rules. `decide` allocates nothing."""

    __slots__ = ("_allows", "_denies", "counts")

    def __init__(self, allows: tuple[_Rule, ...], denies: tuple[_Rule, ...],
                 counts: AuthzCounts) -> None:
        self._allows = allows
        self._denies = denies
        self.counts = counts

    @classmethod
    def compile(cls, rules: Sequence[PolicyRule], counts: AuthzCounts | None = None) -> Policy:
        allows = tuple(_Rule(rule) for rule in rules if rule.allow is not None)
        denies = tuple(_Rule(rule) for rule in rules if rule.deny is not None)
        return cls(allows, denies, counts if counts is not None else DecisionCounts())

    @property
    def empty(self) -> bool:
        """No rules: every decision is "allow" (callers may skip asking)."""
        return not (self._allows or self._denies)

    def decide(self, identity: str | None, method: bytes | None = None, path: bytes | None = None) -> bool:
        """May a peer with `identity` (None: not authenticated) send `method` to `path`?
        A tcp listener asks with method and path None."""
        if not (self._allows or self._denies):
            return True
        allowed = self._allowed(identity, method, path)
        if allowed:
            self.counts.authz_allowed += 1
        else:
            self.counts.authz_denied += 1
        return allowed

    def _allowed(self, identity: str | None, method: bytes | None, path: bytes | None) -> bool:
        for rule in self._denies:
            if rule.matches(identity, method, path):
                return False
        if not self._allows:
            return True
        for rule in self._allows:
            if rule.matches(identity, method, path):
                return True
        return False


# "/." or "/.." as a whole segment, or a percent-encoded ".", "/" or "\\".
_AMBIGUOUS_PATH = re.compile(rb"/\.\.?(?:/|$)|%2[eEfF]|%5[cC]")


def decide_request(policy: Policy, identity: str | None, method: bytes, path: bytes) -> bool:
    """The policy's verdict on an HTTP request (`path` without its query). A path with dot
    segments or encoded dots or slashes is refused outright: the upstream may resolve it to
    a path the policy never saw (`/api/../admin`)."""
    if _AMBIGUOUS_PATH.search(path):
        return False
    return policy.decide(identity, method, path)
