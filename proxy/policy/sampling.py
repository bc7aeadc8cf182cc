"""Picking a share of requests with a uniform roll (pure: the caller draws the roll)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Mirror


def sampled(percent: float, roll: float) -> bool:
    """True for `percent` % of rolls uniform in [0, 1): never at 0, always at 100."""
    return roll * 100.0 < percent


def mirror_cluster(mirror: Mirror | None, roll: float) -> str | None:
    """The cluster to shadow this request to (`routes[].mirror`), or None."""
    if mirror is not None and sampled(mirror.percent, roll):
        return mirror.cluster
    return None
