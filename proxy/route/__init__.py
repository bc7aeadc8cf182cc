"""Route matching: a listener's routes compiled into a `RouteTable` (pure: no I/O, no trio)."""

from .table import RouteTable

__all__ = ["RouteTable"]
