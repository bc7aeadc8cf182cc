"""The admin plane's endpoints: what each answers, on top of the supervisor's state.

Routes (DESIGN, "Admin plane contract"): reads are GET, changes POST or PUT.
"""

from __future__ import annotations

import hashlib
import json
import os
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from ..config import Config, ConfigError, config_to_dict, load_config, parse_config
from ..errors import UsageError
from ..telemetry import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ..telemetry import (
    EndpointStats,
    SupervisorStats,
    hgrm,
    latency_json,
    read_process_usage,
    render_metrics,
    select,
)
from .server import AdminApp, AdminRequest, AdminResponse

if TYPE_CHECKING:
    from ..supervisor import Supervisor


class AdminEndpoints:
    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup

    def register(self, app: AdminApp) -> None:
        app.route("GET", "/ready", self._get_ready)
        app.route("GET", "/live", self._get_live)
        app.route("GET", "/config", self._get_config)
        app.route("GET", "/clusters", self._get_clusters)
        app.route("GET", "/metrics", self._get_metrics)
        app.route("GET", "/stats/latency", self._get_latency)
        app.route("PUT", "/config", self._put_config)
        app.route("POST", "/reload", self._post_reload)
        app.route("POST", "/logs/reopen", self._post_logs_reopen)
        app.route("POST", "/drain", self._post_drain)
        app.route("POST", "/shutdown", self._post_shutdown)

    async def _get_ready(self, request: AdminRequest) -> AdminResponse:
        if self.sup.draining:
            return AdminResponse.text(503, "draining\n")
        if not self.sup.ready:
            waiting = self.sup.identity is not None and not self.sup.identity.loaded.is_set()
            return AdminResponse.text(503, "waiting for identity\n" if waiting else "starting\n")
        return AdminResponse.text(200, "ready\n")

    async def _get_live(self, request: AdminRequest) -> AdminResponse:
        return AdminResponse.text(200, "live\n")

    async def _get_config(self, request: AdminRequest) -> AdminResponse:
        body = config_to_dict(self.sup.config)
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        applied = datetime.fromtimestamp(self.sup.config_applied, UTC).isoformat()
        return AdminResponse.json(200, {"version": self.sup.config_version, "sha256": digest,
                                        "applied_at": applied, "config": body})

    async def _get_metrics(self, request: AdminRequest) -> AdminResponse:
        snapshot = await self.sup.collect()
        processes = [read_process_usage("supervisor", os.getpid())]
        for slot in self.sup.slots:
            if slot.process is not None and slot.process.returncode is None:
                processes.append(read_process_usage(f"worker-{slot.index}", slot.process.pid))
        supervisor = SupervisorStats(
            node=self.sup.config.node.id, config_version=self.sup.config_version, reloads_ok=self.sup.reloads_ok,
            reloads_failed=self.sup.reloads_failed, worker_restarts=self.sup.restarts,
            processes=[usage for usage in processes if usage is not None],
            identity=self.sup.identity_stats(),
        )
        return AdminResponse(200, render_metrics(snapshot, supervisor), METRICS_CONTENT_TYPE)

    async def _get_clusters(self, request: AdminRequest) -> AdminResponse:
        """Per cluster and endpoint: balancing, weights, and what the workers counted."""
        snapshot = await self.sup.collect()
        clusters = []
        for cluster in self.sup.config.clusters:
            stats = snapshot.clusters.get(cluster.name)
            endpoints = []
            for endpoint in cluster.endpoints:
                counted = stats.endpoints.get(str(endpoint.address)) if stats else None
                endpoints.append({
                    "address": str(endpoint.address),
                    "weight": endpoint.weight,
                    "health": _health(counted),
                    "ejections": counted.ejections if counted else 0,
                    "active_requests": counted.active if counted else 0,
                    "requests": counted.requests if counted else 0,
                    "errors": counted.errors if counted else 0,
                })
            clusters.append({
                "name": cluster.name,
                "lb": cluster.lb,
                "connect_timeout": cluster.connect_timeout,
                "upstream_connections_opened": stats.connections if stats else 0,
                "pool_hits": stats.pool_hits if stats else 0,
                "pool_misses": stats.pool_misses if stats else 0,
                "connect_failures": stats.connect_failures if stats else 0,
                "endpoints": endpoints,
            })
        return AdminResponse.json(200, {"version": self.sup.config_version, "clusters": clusters})

    async def _get_latency(self, request: AdminRequest) -> AdminResponse:
        query = {name: values[-1] for name, values in request.query.items()}
        fmt = query.get("format", "json")
        if fmt not in ("json", "hgrm"):
            return AdminResponse.text(400, "format must be json or hgrm\n")
        hists = self.sup.latency.interval(await self.sup.collect(), reset=query.get("reset") in ("1", "true"))
        if fmt == "json":
            return AdminResponse.json(200, latency_json(hists))
        selectors = [kind for kind in ("route", "cluster", "listener") if kind in query]
        if len(selectors) != 1:
            return AdminResponse.text(400, "format=hgrm needs one of route=, cluster= or listener=\n")
        kind = selectors[0]
        try:
            counts = select(hists, kind, query[kind])
        except LookupError as exc:
            return AdminResponse.text(404, f"{exc}\n")
        return AdminResponse.text(200, hgrm(counts))

    async def _put_config(self, request: AdminRequest) -> AdminResponse:
        try:
            config = parse_config(request.body.decode("utf-8", "replace"), source="PUT /config")
        except ConfigError as exc:
            self.sup.reloads_failed += 1
            return _errors_response(exc)
        return await self._apply_response(config)

    async def _post_logs_reopen(self, request: AdminRequest) -> AdminResponse:
        """Reopen the access log file in every worker (log rotation), as SIGUSR1 does."""
        return AdminResponse.json(200, {"workers": self.sup.reopen_logs()})

    async def _post_reload(self, request: AdminRequest) -> AdminResponse:
        if self.sup.config_path is None:
            return AdminResponse.json(400, {"errors": [{"path": "", "message": "no config file to re-read"}]})
        try:
            config = load_config(self.sup.config_path)
        except ConfigError as exc:
            self.sup.reloads_failed += 1
            return _errors_response(exc)
        return await self._apply_response(config)

    async def _apply_response(self, config: Config) -> AdminResponse:
        try:
            version, changed = await self.sup.apply_config(config)
        except ConfigError as exc:
            self.sup.reloads_failed += 1
            return _errors_response(exc)
        if changed:
            self.sup.reloads_ok += 1
        return AdminResponse.json(200, {"version": version, "changed": changed})

    async def _post_drain(self, request: AdminRequest) -> AdminResponse:
        """Stop accepting and let open work finish; answers once it has (or the drain timeout)."""
        self.sup.start_drain(exit_after=False)
        await self.sup.drained.wait()
        return AdminResponse.json(200, {"drained": True})

    async def _post_shutdown(self, request: AdminRequest) -> AdminResponse:
        """Drain, then exit 0. Answers at once; the process exits when the drain is done."""
        self.sup.start_drain(exit_after=True)
        return AdminResponse.json(202, {"shutting_down": True})


def _errors_response(exc: ConfigError) -> AdminResponse:
    errors = [{"path": error.path, "message": error.message} for error in exc.errors]
    return AdminResponse.json(400, {"errors": errors})


def read_token(path: str | None) -> bytes | None:
    """The admin bearer token from `admin.token_file` (surrounding whitespace ignored)."""
    if path is None:
        return None
    try:
        with open(path, "rb") as file:
            token = file.read().strip()
    except OSError as exc:
        raise UsageError(f"admin.token_file: cannot read {path}: {exc.strerror}") from exc
    if not token:
        raise UsageError(f"admin.token_file: {path} is empty")
    return token


def _health(counted: EndpointStats | None) -> str:
    """An endpoint's state as the workers see it: failing its health checks (or not checked
    yet), ejected by outlier detection, or healthy. Summed over workers, any one counts."""
    if counted is None:
        return "healthy"
    if counted.unhealthy:
        return "unhealthy"
    return "ejected" if counted.ejected else "healthy"
