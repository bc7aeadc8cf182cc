"""What the demo reads from its sidecars: Prometheus text, latency JSON and log lines, turned
into the numbers of the live table (pure: text in, values out).

    metrics = Metrics.parse(text_of_GET_metrics)
    metrics.value("meshproxy_requests_total", listener="inbound", code_class="5xx")
    sample = SidecarSample.read(now, metrics, latency_json)
    row = sample.since(previous)          # requests/s, success rate over the interval
    CertWatch().feed(log_text)            # the serials the sidecar logged, newest last
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

LISTENER = "inbound"
FAILED_CLASSES = ("5xx", "none")  # a proxy-made or upstream 5xx, or no response at all


@dataclass(frozen=True)
class Metrics:
    samples: tuple[tuple[str, Mapping[str, str], float], ...] = ()

    @classmethod
    def parse(cls, text: str) -> Metrics:
        samples = []
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples.append((sample.name, dict(sample.labels), float(sample.value)))
        return cls(tuple(samples))

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels`."""
        return sum(value for sample_name, sample_labels, value in self.samples
                   if sample_name == name and all(sample_labels.get(k) == v for k, v in labels.items()))

    def has(self, name: str) -> bool:
        return any(sample_name == name for sample_name, _, _ in self.samples)


@dataclass(frozen=True)
class SidecarSample:
    """One poll of one sidecar."""

    at: float  # monotonic seconds
    requests: float  # on its inbound listener, ever
    failed: float  # of those: 5xx or no response
    retries: float  # upstream retries, all clusters
    p50_ms: float | None  # since the previous poll (its /stats/latency interval)
    p99_ms: float | None
    cert_expiry: float | None  # unix time
    rotations: float
    config_version: float
    handshakes_ok: float
    handshakes_failed: float
    authz_denied: float
    ejections: dict[str, float] = field(default_factory=dict)  # "cluster/endpoint" -> ever
    healthy: dict[str, bool] = field(default_factory=dict)  # "cluster/endpoint" -> now

    @classmethod
    def read(cls, at: float, metrics: Metrics, latency: Mapping[str, Any] | None) -> SidecarSample:
        listener = (latency or {}).get("listeners", {}).get(LISTENER) or {}
        ejections, healthy = {}, {}
        for name, labels, value in metrics.samples:
            key = f"{labels.get('cluster')}/{labels.get('endpoint')}"
            if name == "meshproxy_upstream_endpoint_ejections_total":
                ejections[key] = value
            elif name == "meshproxy_upstream_endpoint_healthy":
                healthy[key] = value >= 1
        requests = metrics.value("meshproxy_requests_total", listener=LISTENER)
        failed = sum(metrics.value("meshproxy_requests_total", listener=LISTENER, code_class=c)
                     for c in FAILED_CLASSES)
        expiry = metrics.value("meshproxy_identity_cert_expiry_seconds") \
            if metrics.has("meshproxy_identity_cert_expiry_seconds") else None
        return cls(
            at=at, requests=requests, failed=failed,
            retries=metrics.value("meshproxy_upstream_retries_total"),
            p50_ms=listener.get("p50"), p99_ms=listener.get("p99"),
            cert_expiry=expiry,
            rotations=metrics.value("meshproxy_identity_rotations_total"),
            config_version=metrics.value("meshproxy_config_version"),
            handshakes_ok=metrics.value("meshproxy_downstream_tls_handshakes_total", result="ok"),
            handshakes_failed=metrics.value("meshproxy_downstream_tls_handshakes_total", result="failed"),
            authz_denied=metrics.value("meshproxy_authz_decisions_total", decision="deny"),
            ejections=ejections, healthy=healthy,
        )


@dataclass(frozen=True)
class Rates:
    """A sidecar over the interval between two polls."""

    requests_per_s: float
    success_rate: float | None
    retries_per_s: float


def rates(previous: SidecarSample | None, current: SidecarSample) -> Rates:
    if previous is None or current.at <= previous.at:
        return Rates(0.0, None, 0.0)
    seconds = current.at - previous.at
    # A counter that went down means the sidecar restarted: count from zero.
    requests = _delta(previous.requests, current.requests)
    failed = _delta(previous.failed, current.failed) if requests else 0.0
    success = (requests - failed) / requests if requests else None
    return Rates(requests / seconds, success, _delta(previous.retries, current.retries) / seconds)


def _delta(before: float, after: float) -> float:
    return after - before if after >= before else after


_ISSUED = re.compile(r"identity (\S+): certificate serial ([0-9a-fA-F]+) valid until (\S+)")


@dataclass
class CertWatch:
    """The certificates a sidecar logged as it got them (`identity ...: certificate serial
    ... valid until ...`), read incrementally from its log."""

    identity: str = ""
    serials: list[str] = field(default_factory=list)
    valid_until: str = ""
    _partial: str = ""

    def feed(self, text: str) -> list[str]:
        """Take more log text; returns the serials that are new."""
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        new = []
        for line in lines:
            match = _ISSUED.search(line)
            if match:
                self.identity, serial, self.valid_until = match.group(1), match.group(2), match.group(3)
                self.serials.append(serial)
                new.append(serial)
        return new

    @property
    def serial(self) -> str:
        return self.serials[-1] if self.serials else ""


def short_serial(serial: str, width: int = 10) -> str:
    return serial if len(serial) <= width else serial[:width] + "…"
