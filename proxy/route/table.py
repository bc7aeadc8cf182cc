"""Route matching: the routes of one listener, compiled once per config version.

    table = RouteTable.compile(listener.routes)
    route = table.match(b"GET", b"api.example.com:8080", b"/api/users", header)
    cluster = table.pick_cluster(route, rng.random()) if route else None

Everything a request is compared against is bytes prepared at compile time, so a match
encodes nothing, builds no regex and allocates nothing, except a lowercased copy of the
Host without its port, made once per request and only when a route matches on the host.

Routes are tried in order; the first whose conditions all hold wins:

- `prefix`: a plain string prefix, as in Envoy: "/api" matches "/api/x" and also "/apis".
- `path`: the whole path, without the query string (the caller passes the path part only).
- `host`: the request's authority without its port, ignoring case; "*.example.com" matches
  any name ending in ".example.com" (not "example.com" itself).
- `methods`: any of them, compared exactly (methods are case-sensitive, RFC 9110).
- `headers`: every named header's first value equals the configured value exactly.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence

from ..config import Route

HeaderLookup = Callable[[bytes], bytes | None]  # lowercase name -> first value or None


class _CompiledRoute:
    __slots__ = ("headers", "host", "methods", "path", "prefix", "route", "wildcard")

    def __init__(self, route: Route) -> None:
        match = route.match
        self.route = route
        self.prefix = match.prefix.encode() if match.prefix is not None else None
        self.path = match.path.encode() if match.path is not None else None
        host = match.host.encode() if match.host is not None else None
        self.wildcard = host is not None and host.startswith(b"*.")
        self.host = host[1:] if self.wildcard else host  # a wildcard keeps b".example.com"
        self.methods = frozenset(m.encode() for m in match.methods)
        self.headers = tuple((name.encode(), value.encode()) for name, value in match.headers)


class RouteTable:
    """The routes of one listener in match order, with split weights made cumulative."""

    __slots__ = ("_routes", "_splits")

    def __init__(
        self, routes: Sequence[_CompiledRoute], splits: dict[int, tuple[list[float], list[str]]]
    ) -> None:
        self._routes = tuple(routes)
        self._splits = splits  # id(route) -> (cumulative share ending at 1.0, cluster names)

    @classmethod
    def compile(cls, routes: Sequence[Route]) -> RouteTable:
        splits = {}
        for route in routes:
            if route.split:
                total = sum(part.weight for part in route.split)
                bounds, running = [], 0
                for part in route.split:
                    running += part.weight
                    bounds.append(running / total)
                splits[id(route)] = (bounds, [part.cluster for part in route.split])
        return cls([_CompiledRoute(route) for route in routes], splits)

    def match(
        self, method: bytes, host: bytes | None, path: bytes, header: HeaderLookup
    ) -> Route | None:
        """The first route whose every condition holds for this request, or None."""
        bare_host: bytes | None = None  # lowercase, port removed; computed when first needed
        for r in self._routes:
            if r.path is not None:
                if path != r.path:
                    continue
            elif not path.startswith(r.prefix):
                continue
            if r.methods and method not in r.methods:
                continue
            if r.host is not None:
                if host is None:
                    continue
                if bare_host is None:
                    bare_host = _bare_host(host)
                if r.wildcard:
                    if not (bare_host.endswith(r.host) and len(bare_host) > len(r.host)):
                        continue
                elif bare_host != r.host:
                    continue
            if r.headers and not _headers_hold(r.headers, header):
                continue
            return r.route
        return None

    def pick_cluster(self, route: Route, rng_value: float) -> str:
        """The cluster for one request to `route` (a route this table matched).

        `rng_value` is uniform in [0, 1); for a split it lands in a part with probability
        weight / total weight.
        """
        if route.cluster is not None:
            return route.cluster
        bounds, clusters = self._splits[id(route)]
        return clusters[min(bisect_right(bounds, rng_value), len(clusters) - 1)]


def _bare_host(host: bytes) -> bytes:
    """b"API.example.com:8080" -> b"api.example.com". An IPv6 literal ("[::1]:80") comes out
    mangled, which is harmless: host patterns cannot name one."""
    colon = host.find(b":")
    return (host[:colon] if colon >= 0 else host).lower()


def _headers_hold(expected: tuple[tuple[bytes, bytes], ...], header: HeaderLookup) -> bool:
    for name, value in expected:
        if header(name) != value:
            return False
    return True
