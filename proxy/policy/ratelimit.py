"""A token bucket: `rps` tokens a second, at most `burst` saved up (pure: `now` is given).

Each worker holds its own buckets (`routes[].rate_limit` is per worker), so N workers admit
up to N x rps between them.

    bucket = TokenBucket.from_config(route.rate_limit, now)
    if not bucket.allow(now):
        ...answer 429 `rate_limited`, Retry-After: ceil(bucket.retry_after(now))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import RateLimit


# Refills are float arithmetic on clock readings: 10 ms at 100/s may add 0.9999999999 of a
# token. A token short by less than this counts as whole.
_ROUNDING = 1e-9


class TokenBucket:
    __slots__ = ("burst", "rate", "rejected", "tokens", "updated")

    def __init__(self, rps: float, burst: int, now: float) -> None:
        if rps <= 0 or burst < 1:
            raise ValueError("rps must be positive and burst at least 1")
        self.rate = rps
        self.burst = burst
        self.tokens = float(burst)  # starts full
        self.updated = now
        self.rejected = 0  # requests refused, ever (for metrics)

    @classmethod
    def from_config(cls, limit: RateLimit, now: float) -> TokenBucket:
        return cls(limit.rps, limit.burst, now)

    def _refill(self, now: float) -> None:
        if now > self.updated:  # a clock that steps back adds nothing
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def allow(self, now: float) -> bool:
        """Take a token if there is one."""
        self._refill(now)
        if self.tokens >= 1.0 - _ROUNDING:
            self.tokens = max(0.0, self.tokens - 1.0)
            return True
        self.rejected += 1
        return False

    def retry_after(self, now: float) -> float:
        """Seconds until the next token (0 when one is there)."""
        self._refill(now)
        missing = 1.0 - self.tokens
        return missing / self.rate if missing > _ROUNDING else 0.0
