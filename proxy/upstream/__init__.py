"""Upstream connections: bounded keep-alive pools per endpoint, grouped by cluster."""

from .pool import EndpointPool, UpstreamCluster, UpstreamConn

__all__ = ["EndpointPool", "UpstreamCluster", "UpstreamConn"]
