"""meshproxy: a service-mesh sidecar proxy on Trio with a Cython hot path."""

from ._version import __version__

__all__ = ["__version__"]
