"""The cheapest schedule point Trio offers, for the per-request hot path.

`trio.lowlevel.cancel_shielded_checkpoint()` is an async function that awaits a
generator that yields Trio's "reschedule me at once" message, then unwraps the
outcome sent back. A task nested under a few coroutines pays for every frame
between it and the scheduler on each yield and resume, so `yield_now` yields
that same message from a single generator frame: same semantics (a schedule
point, not a cancel point), one frame and one call less. If Trio ever stops
exporting the message under this name, the public function is used instead.
"""

from __future__ import annotations

import types
from collections.abc import Awaitable, Callable, Generator
from typing import Any

import trio

try:
    from trio._core._traps import CancelShieldedCheckpoint
except ImportError:  # pragma: no cover - depends on Trio's internals
    CancelShieldedCheckpoint = None


@types.coroutine
def _yield_message() -> Generator[Any, Any, None]:
    # The scheduler answers this message with Value(None) and resumes the
    # task in its next batch; there is nothing to unwrap.
    yield CancelShieldedCheckpoint


yield_now: Callable[[], Awaitable[None]] = (
    _yield_message if CancelShieldedCheckpoint is not None else trio.lowlevel.cancel_shielded_checkpoint
)
