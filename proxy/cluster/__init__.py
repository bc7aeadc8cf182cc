"""Endpoint sets, load-balancer picks, circuit breakers, outlier ejection and endpoint
health (pure: no I/O, no trio)."""

from .balancer import Balancer, make_balancer
from .circuit import CircuitBreaker, Resource
from .health import EndpointAvailability, HealthState
from .outlier import OutlierDetector

__all__ = [
    "Balancer",
    "CircuitBreaker",
    "EndpointAvailability",
    "HealthState",
    "OutlierDetector",
    "Resource",
    "make_balancer",
]
