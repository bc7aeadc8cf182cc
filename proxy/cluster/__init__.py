"""Endpoint sets and load-balancer picks (pure: no I/O, no trio)."""

from .balancer import Balancer, make_balancer

__all__ = ["Balancer", "make_balancer"]
