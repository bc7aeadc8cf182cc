"""What a route adds to plain forwarding: retries and their budget, fault injection, a
rate limit, mirroring. Compiled once per config version for the routes that have any
of them, so a plain route costs the request path one dictionary lookup.

The retry budget and the token bucket carry state across requests; a reload keeps
them when the route's setting is unchanged, so reloading cannot reset a limit.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..config import Fault, Mirror, Route
from ..policy.ratelimit import TokenBucket
from ..policy.retry import RetryBudget, RetryPolicy


class RoutePolicies:
    __slots__ = ("budget", "fault", "mirror", "rate_limit", "retry", "route")

    def __init__(self, route: Route, previous: RoutePolicies | None, now: float) -> None:
        self.route = route
        self.retry = RetryPolicy(route.retry) if route.retry is not None else None
        self.budget: RetryBudget | None = None
        if route.retry is not None:
            same = previous is not None and previous.route.retry == route.retry
            self.budget = previous.budget if same else RetryBudget.from_config(route.retry.budget)
        self.rate_limit: TokenBucket | None = None
        if route.rate_limit is not None:
            same = previous is not None and previous.route.rate_limit == route.rate_limit
            self.rate_limit = (previous.rate_limit if same
                               else TokenBucket.from_config(route.rate_limit, now))
        self.fault: Fault | None = route.fault
        self.mirror: Mirror | None = route.mirror


def compile_policies(routes: Iterable[Route], previous: dict[str, RoutePolicies],
                     now: float) -> dict[str, RoutePolicies]:
    """Route name -> its policies, for the routes that have any."""
    out = {}
    for route in routes:
        if route.retry or route.fault or route.rate_limit or route.mirror:
            out[route.name] = RoutePolicies(route, previous.get(route.name), now)
    return out
