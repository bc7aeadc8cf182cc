"""Outlier detection: endpoints that fail in a row are ejected for a while (pure: `now` is
an argument), Envoy's consecutive-5xx and consecutive-gateway-error detectors.

    detector = OutlierDetector(cluster.outlier_detection, len(cluster.endpoints), now)
    detector.record_response(index, status, now)      # the upstream answered
    detector.record_local_failure(index, now)         # connect failure, reset, timeout
    detector.refresh(now)                              # cheap; returns the endpoints back
    detector.ejected(index)

An endpoint is ejected for base_ejection_time x its multiplier (1 on the first ejection, +1
on each one after), at most max(base_ejection_time, 300 s) (Envoy's max_ejection_time). The
multiplier falls by one for each `interval` the endpoint then stays in. Ejections never take
more than max_ejection_percent of the endpoints, except that one may always be ejected
when none is (as in Envoy). Results for an endpoint while it is ejected are ignored.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import OutlierDetection

MAX_EJECTION_TIME = 300.0


class OutlierDetector:
    __slots__ = ("_consecutive_5xx", "_consecutive_gateway", "_ejected", "_multiplier",
                 "_next_review", "_next_tick", "_returned_at", "_until", "base_ejection_time",
                 "ejected_count", "ejections", "gateway_threshold", "interval",
                 "max_ejection_percent", "max_ejection_time", "overflows", "threshold_5xx",
                 "version")

    def __init__(self, config: OutlierDetection, endpoints: int, now: float) -> None:
        self.threshold_5xx = config.consecutive_5xx  # 0: off
        self.gateway_threshold = config.consecutive_gateway_errors  # 0: off
        self.interval = config.interval
        self.base_ejection_time = config.base_ejection_time
        self.max_ejection_time = max(config.base_ejection_time, MAX_EJECTION_TIME)
        self.max_ejection_percent = config.max_ejection_percent
        self._consecutive_5xx = [0] * endpoints
        self._consecutive_gateway = [0] * endpoints
        self._ejected = [False] * endpoints
        self._until = [0.0] * endpoints  # when an ejected endpoint comes back
        self._multiplier = [0] * endpoints
        self._returned_at = [-math.inf] * endpoints
        self.ejections = [0] * endpoints  # per endpoint, ever (for /clusters and metrics)
        self.ejected_count = 0  # ejected now
        self.overflows = 0  # ejections not made because of max_ejection_percent
        self.version = 0  # changes whenever an endpoint is ejected or comes back
        self._next_tick = now + self.interval
        self._next_review = self._next_tick

    # -- results

    def record_response(self, index: int, status: int, now: float) -> bool:
        """The upstream `index` answered `status`; True when that ejected it."""
        if self._ejected[index]:
            return False
        if status < 500 or status > 599:
            self._consecutive_5xx[index] = 0
            self._consecutive_gateway[index] = 0
            return False
        self._consecutive_5xx[index] += 1
        if 502 <= status <= 504:
            self._consecutive_gateway[index] += 1
        else:
            self._consecutive_gateway[index] = 0
        return self._consider(index, now)

    def record_local_failure(self, index: int, now: float) -> bool:
        """A try to `index` got no answer (connect failure, reset, timeout): it counts as a
        gateway error (and so as a 5xx). True when that ejected it."""
        if self._ejected[index]:
            return False
        self._consecutive_5xx[index] += 1
        self._consecutive_gateway[index] += 1
        return self._consider(index, now)

    def _consider(self, index: int, now: float) -> bool:
        failed_5xx = self.threshold_5xx and self._consecutive_5xx[index] >= self.threshold_5xx
        failed_gateway = (self.gateway_threshold
                          and self._consecutive_gateway[index] >= self.gateway_threshold)
        if not (failed_5xx or failed_gateway):
            return False
        if not self._room_for_one_more():
            self.overflows += 1  # the counts stay: it goes as soon as there is room
            return False
        self._eject(index, now)
        return True

    def _room_for_one_more(self) -> bool:
        active = self.ejected_count
        return active == 0 or 100 * (active + 1) <= self.max_ejection_percent * len(self._ejected)

    def _eject(self, index: int, now: float) -> None:
        if self.base_ejection_time * self._multiplier[index] < self.max_ejection_time:
            self._multiplier[index] += 1
        duration = min(self.base_ejection_time * self._multiplier[index], self.max_ejection_time)
        self._ejected[index] = True
        self._until[index] = now + duration
        self._consecutive_5xx[index] = 0
        self._consecutive_gateway[index] = 0
        self.ejections[index] += 1
        self.ejected_count += 1
        self.version += 1
        self._next_review = min(self._next_review, self._until[index])

    # -- time

    def refresh(self, now: float) -> list[int]:
        """Bring back endpoints whose ejection is over and let multipliers decay; returns the
        endpoints that came back. Does nothing (cheaply) until something is due."""
        if now < self._next_review:
            return []
        back = []
        for index, ejected in enumerate(self._ejected):
            if ejected and now >= self._until[index]:
                self._ejected[index] = False
                self._returned_at[index] = now
                self.ejected_count -= 1
                back.append(index)
        if back:
            self.version += 1
        if now >= self._next_tick:
            ticks = int((now - self._next_tick) // self.interval) + 1
            self._next_tick += ticks * self.interval
            for index, multiplier in enumerate(self._multiplier):
                if multiplier and not self._ejected[index]:
                    stayed = int((now - self._returned_at[index]) // self.interval)
                    self._multiplier[index] = max(0, multiplier - min(ticks, stayed))
        pending = [until for until, ejected in zip(self._until, self._ejected, strict=True)
                   if ejected]
        self._next_review = min([self._next_tick, *pending])
        return back

    # -- state

    def ejected(self, index: int) -> bool:
        return self._ejected[index]

    def ejected_until(self, index: int) -> float | None:
        """When an ejected endpoint comes back (at the first refresh from then), else None."""
        return self._until[index] if self._ejected[index] else None

    def multiplier(self, index: int) -> int:
        """What the endpoint's next ejection multiplies base_ejection_time by, minus one."""
        return self._multiplier[index]
