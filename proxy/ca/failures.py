"""Failed token attempts per client IP, so guessing tokens is slow. Pure: `now` is given."""

from __future__ import annotations

from collections import deque


class FailureLimiter:
    """At most `limit` failures per IP in any `window` seconds; then the IP must wait.

    Memory is bounded: each IP keeps at most `limit` timestamps and at most `max_clients`
    IPs are tracked, the least recently failing forgotten first.
    """

    def __init__(self, limit: int = 10, window: float = 60.0, max_clients: int = 4096) -> None:
        self.limit = limit
        self.window = window
        self.max_clients = max_clients
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, ip: str, now: float) -> float:
        """0 when `ip` may try, else the seconds until its oldest counted failure expires."""
        failures = self._failures.get(ip)
        if failures is None or len(failures) < self.limit:
            return 0.0
        return max(0.0, failures[0] + self.window - now)

    def record(self, ip: str, now: float) -> None:
        failures = self._failures.pop(ip, None) or deque(maxlen=self.limit)
        failures.append(now)
        self._failures[ip] = failures  # re-inserted: dict order is least recent first
        while len(self._failures) > self.max_clients:
            del self._failures[next(iter(self._failures))]
