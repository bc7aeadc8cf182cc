"""The demo's load generator: real HTTP/1.1 requests to the frontend at a fixed rate.

Open loop, like bench/openloop.py: request n is due at start + n/rate whatever happened to
the ones before, and its latency is measured from when it was due, so a stall shows in
every request scheduled during it instead of slowing the generator down. In-flight requests
are bounded (`max_in_flight`): one due while that many are open counts as failed
("overload") instead of queueing without bound. Each outcome goes to `record(now, status,
latency_us, version, caller, error)`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

from ..config import Address
from .http import HttpClient, HttpError
from .services import CALLER_HEADER, VERSION_HEADER

Record = Callable[[float, int, int, str, str, str], None]

REQUEST_TIMEOUT = 5.0
MAX_CATCH_UP = 1.0  # seconds; a generator further behind than this skips ahead


class LoadGenerator:
    def __init__(self, target: Address, rate: float, record: Record, max_in_flight: int = 256,
                 path: str = "/") -> None:
        self.target = target
        self.rate = rate
        self.record = record
        self.path = path
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.sent = 0
        self.skipped = 0  # due while the generator itself was too far behind (not the target's fault)
        self._client = HttpClient(target, max_connections=max_in_flight)

    async def run(self) -> None:
        """Send until cancelled."""
        interval = 1.0 / self.rate
        try:
            async with trio.open_nursery() as nursery:
                due = time.monotonic()
                while True:
                    now = time.monotonic()
                    if now - due > MAX_CATCH_UP:
                        missed = int((now - due) / interval)
                        self.skipped += missed
                        due += missed * interval
                    if due > now:
                        await trio.sleep(due - now)
                    if self.in_flight >= self.max_in_flight:
                        self.record(time.monotonic(), 0, 0, "", "", "overload")
                    else:
                        self.in_flight += 1
                        self.sent += 1
                        nursery.start_soon(self._one, due)
                    due += interval
        finally:
            with trio.CancelScope(shield=True):
                await self._client.aclose()

    async def _one(self, due: float) -> None:
        try:
            try:
                reply = await self._client.request("GET", self.path, timeout=REQUEST_TIMEOUT)
            except HttpError as exc:
                now = time.monotonic()
                self.record(now, 0, _us(now - due), "", "", exc.code)
                return
            now = time.monotonic()
            self.record(now, reply.status, _us(now - due), reply.headers.get(VERSION_HEADER, ""),
                        reply.headers.get(CALLER_HEADER, ""), reply.headers.get("x-meshproxy-error", ""))
        finally:
            self.in_flight -= 1


def _us(seconds: float) -> int:
    return max(1, int(seconds * 1_000_000))
