"""Errors that carry who failed and what the client should see.

A proxy-made reply names its cause with an `x-meshproxy-error` code (DESIGN,
"Errors users see"); the same code goes to logs and metrics. Local errors are
raised where the decision is made and turned into a reply (or, on an L4
listener, a close) at the edge.
"""

from __future__ import annotations


class ProxyError(Exception):
    """A failure the proxy reports to the client: `status` and `code` say how."""

    status: int = 502
    code: str = "proxy_error"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class UpstreamConnectError(ProxyError):
    """No connection to any endpoint: refused, timed out or unreachable."""

    status = 502
    code = "connect_failed"


class UpstreamTlsError(UpstreamConnectError):
    """mTLS to an endpoint failed: the handshake broke, timed out or was refused, or this
    sidecar has no certificate yet. Nothing was sent to the upstream."""

    status = 502
    code = "upstream_tls_failed"


class UpstreamIdentityError(UpstreamTlsError):
    """The endpoint's SVID verified but names an identity the cluster does not expect
    (`clusters[].tls.identity`): the connection is closed before a request is sent."""

    status = 503
    code = "upstream_identity_mismatch"


class UsageError(Exception):
    """A user mistake outside the config file (bad flag, unreadable file, port in use)."""


class CircuitOpenError(ProxyError):
    """A circuit breaker limit of the cluster is reached: shed the request at once."""

    status = 503
    code = "circuit_open"


class NoHealthyUpstreamError(ProxyError):
    """Every endpoint of the cluster is unhealthy or ejected (and panic routing is off)."""

    status = 503
    code = "no_healthy_upstream"
