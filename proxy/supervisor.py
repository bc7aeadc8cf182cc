"""The supervisor: binds the listeners, runs the workers, serves the admin plane.

It never touches the data path. It starts `workers` processes, hands each its
own SO_REUSEPORT socket per listener and the compiled config, restarts a worker
that dies (with crash-loop backoff), and on SIGTERM/SIGINT drains: readiness
turns 503, workers stop accepting and finish open connections up to
`drain_timeout`, then everything exits 0. A second signal exits at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import trio

from . import __version__, control
from .admin import AdminApp, AdminRequest, AdminResponse, bind_listening_socket, serve_admin
from .config import Config, config_to_dict
from .errors import UsageError
from .net.listen import bind_listener, bound_address
from .telemetry import (
    CONTENT_TYPE as METRICS_CONTENT_TYPE,
    LatencyWindow,
    Snapshot,
    SupervisorStats,
    Totals,
    hgrm,
    latency_json,
    read_process_usage,
    render_metrics,
    select,
)

log = logging.getLogger("meshproxy.supervisor")

# A worker that lived shorter than this is crash-looping: back off.
STABLE_AFTER = 10.0
BACKOFF_START = 0.1
BACKOFF_MAX = 10.0
# How long a new worker has to report Ready before it is killed and retried.
READY_TIMEOUT = 30.0
# Extra grace after drain_timeout before stragglers are killed.
DRAIN_GRACE = 5.0
# How long a scrape waits for workers' snapshots (a stuck worker is left out).
SCRAPE_TIMEOUT = 2.0


@dataclass
class WorkerSlot:
    index: int
    process: trio.Process | None = None
    channel: control.ControlChannel | None = None  # set while the worker process is up
    serving: bool = False  # it reported Ready (and so answers snapshot requests)
    starts: int = 0
    ready: trio.Event = field(default_factory=trio.Event)
    # Snapshot requests in flight: request id -> where the reply goes.
    pending: dict[int, _Reply] = field(default_factory=dict)


class _Reply:
    """One awaited answer from a worker."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.value: Snapshot | None = None


class Supervisor:
    def __init__(self, config: Config, log_level: str) -> None:
        self.config = config
        self.log_level = log_level
        self.worker_count = config.worker_count
        self.slots = [WorkerSlot(i) for i in range(self.worker_count)]
        # listener name -> one listening socket per worker
        self.listen_sockets: dict[str, list[socket.socket]] = {}
        self.admin_socket: socket.socket | None = None
        self.draining = False
        self.ready = False
        self.restarts = 0
        self.totals = Totals()
        self.latency = LatencyWindow()
        self._scrape_lock = trio.Lock()
        self._request_ids = 0
        self.config_version = 1
        self.config_applied = time.time()
        self.admin_app = AdminApp(_read_token(config.admin.token_file))
        self.admin_app.route("GET", "/ready", self._get_ready)
        self.admin_app.route("GET", "/live", self._get_live)
        self.admin_app.route("GET", "/config", self._get_config)
        self.admin_app.route("GET", "/metrics", self._get_metrics)
        self.admin_app.route("GET", "/stats/latency", self._get_latency)
        self.admin_app.route("POST", "/drain", self._post_drain)
        self.admin_app.route("POST", "/shutdown", self._post_shutdown)
        self._nursery: trio.Nursery
        self._drained: trio.Event | None = None
        self._exit_after_drain = False

    # -- admin handlers -------------------------------------------------
    async def _get_ready(self, request: AdminRequest) -> AdminResponse:
        if self.draining:
            return AdminResponse.text(503, "draining\n")
        if not self.ready:
            return AdminResponse.text(503, "starting\n")
        return AdminResponse.text(200, "ready\n")

    async def _get_live(self, request: AdminRequest) -> AdminResponse:
        return AdminResponse.text(200, "live\n")

    async def _get_config(self, request: AdminRequest) -> AdminResponse:
        body = config_to_dict(self.config)
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        applied = datetime.fromtimestamp(self.config_applied, timezone.utc).isoformat()
        return AdminResponse.json(200, {"version": self.config_version, "sha256": digest,
                                        "applied_at": applied, "config": body})

    async def _get_metrics(self, request: AdminRequest) -> AdminResponse:
        snapshot = await self._collect()
        processes = [read_process_usage("supervisor", os.getpid())]
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                processes.append(read_process_usage(f"worker-{slot.index}", slot.process.pid))
        supervisor = SupervisorStats(
            node=self.config.node.id, config_version=self.config_version, reloads_ok=0,
            reloads_failed=0, worker_restarts=self.restarts,
            processes=[usage for usage in processes if usage is not None],
        )
        return AdminResponse(200, render_metrics(snapshot, supervisor), METRICS_CONTENT_TYPE)

    async def _get_latency(self, request: AdminRequest) -> AdminResponse:
        query = {name: values[-1] for name, values in request.query.items()}
        fmt = query.get("format", "json")
        if fmt not in ("json", "hgrm"):
            return AdminResponse.text(400, "format must be json or hgrm\n")
        hists = self.latency.interval(await self._collect(), reset=query.get("reset") in ("1", "true"))
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

    async def _collect(self) -> Snapshot:
        """Every live worker's telemetry, merged with what finished workers counted."""
        async with self._scrape_lock:
            self._request_ids += 1
            request = self._request_ids
            asked: list[tuple[WorkerSlot, _Reply]] = []
            for slot in self.slots:
                if slot.channel is None or not slot.serving:
                    continue
                reply = slot.pending[request] = _Reply()
                try:
                    await slot.channel.send(control.SnapshotRequest(request))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    slot.pending.pop(request, None)
                    continue
                asked.append((slot, reply))
            with trio.move_on_after(SCRAPE_TIMEOUT):
                for _, reply in asked:
                    await reply.done.wait()
            for slot, reply in asked:
                slot.pending.pop(request, None)
                if reply.value is not None:
                    self.totals.update(slot.index, reply.value)
            return self.totals.total()

    async def _read_worker_messages(self, slot: WorkerSlot, channel: control.ControlChannel) -> None:
        while True:
            message = await channel.receive()
            if message is None:
                return
            if isinstance(message, control.SnapshotReply):
                reply = slot.pending.get(message.request)
                if reply is not None:
                    reply.value = message.snapshot
                    reply.done.set()

    # -- lifecycle --------------------------------------------------------
    def bind(self) -> None:
        """Bind the admin address and every listener (UsageError on a taken address)."""
        self.admin_socket = bind_listening_socket(self.config.admin.address)
        try:
            for listener in self.config.listeners:
                self.listen_sockets[listener.name] = bind_listener(listener.address, self.worker_count)
        except BaseException:
            self.close_listeners()
            self.admin_socket.close()
            raise

    def close_listeners(self) -> None:
        for sockets in self.listen_sockets.values():
            for sock in sockets:
                sock.close()
        self.listen_sockets.clear()

    async def run(self) -> int:
        """Serve until drained; returns the process exit code."""
        admin_address = self.admin_socket.getsockname()[:2]
        listeners = ", ".join(
            f"{name}={bound_address(socks[0])}" for name, socks in self.listen_sockets.items()
        )
        log.info(
            "meshproxy %s starting: node %s, %d worker(s), listeners %s, admin %s:%d",
            __version__, self.config.node.id, self.worker_count, listeners, *admin_address,
        )
        exit_code = 0
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(serve_admin, self.admin_app, [self.admin_socket])
                for slot in self.slots:
                    nursery.start_soon(self._keep_running, slot)
                nursery.start_soon(self._report_ready)
                async for signum in signals:
                    if self.draining:
                        log.warning("%s again: exiting now", signal.Signals(signum).name)
                        self._kill_workers()
                        exit_code = 1
                        nursery.cancel_scope.cancel()
                        break
                    log.info("%s: draining (up to %gs)", signal.Signals(signum).name,
                             self.config.drain_timeout)
                    self._start_drain(exit_after=True)
        self.close_listeners()
        log.info("meshproxy stopped")
        return exit_code

    def _start_drain(self, *, exit_after: bool) -> None:
        """Drain once; a later request to exit (shutdown after drain) is remembered."""
        self._exit_after_drain = self._exit_after_drain or exit_after
        if self._drained is not None and self._drained.is_set() and exit_after:
            self._nursery.start_soon(self._exit_soon)
        if not self.draining:
            self._drained = trio.Event()
            self._nursery.start_soon(self._drain)

    # -- admin: drain and shutdown ------------------------------------------
    async def _post_drain(self, request: AdminRequest) -> AdminResponse:
        """Stop accepting and let open work finish; answers once it has (or the drain timeout)."""
        self._start_drain(exit_after=False)
        await self._drained.wait()
        return AdminResponse.json(200, {"drained": True})

    async def _post_shutdown(self, request: AdminRequest) -> AdminResponse:
        """Drain, then exit 0. Answers at once; the process exits when the drain is done."""
        self._start_drain(exit_after=True)
        return AdminResponse.json(202, {"shutting_down": True})

    async def _report_ready(self) -> None:
        for slot in self.slots:
            await slot.ready.wait()
        self.ready = True
        log.info("ready: %d worker(s) serving", self.worker_count)

    async def _drain(self) -> None:
        self.draining = True
        timeout = self.config.drain_timeout
        for slot in self.slots:
            if slot.channel is not None:
                try:
                    await slot.channel.send(control.Drain(timeout))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
        # Workers close their copies as they stop accepting; closing ours makes
        # the listening sockets go away, so new connections are refused.
        self.close_listeners()
        with trio.move_on_after(timeout + DRAIN_GRACE):
            for slot in self.slots:
                if slot.process is not None:
                    await slot.process.wait()
        self._kill_workers()
        log.info("drained")
        self._drained.set()
        if self._exit_after_drain:
            await self._exit_soon()

    async def _exit_soon(self) -> None:
        # Give the admin plane a moment to answer the request that asked for this.
        await trio.sleep(0.05)
        self._nursery.cancel_scope.cancel()

    def _kill_workers(self) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                slot.process.kill()

    async def _keep_running(self, slot: WorkerSlot) -> None:
        backoff = BACKOFF_START
        while not self.draining:
            started = trio.current_time()
            code = await self._run_worker(slot)
            if self.draining:
                log.info("worker %d exited (%s)", slot.index, _describe_exit(code))
                return
            self.restarts += 1
            lived = trio.current_time() - started
            backoff = BACKOFF_START if lived >= STABLE_AFTER else min(backoff * 2, BACKOFF_MAX)
            log.warning("worker %d (pid %s) exited (%s) after %.1fs; restarting in %.1fs",
                        slot.index, slot.process.pid if slot.process else "?",
                        _describe_exit(code), lived, backoff)
            await trio.sleep(backoff)

    async def _run_worker(self, slot: WorkerSlot) -> int | None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = {name: socks[slot.index].fileno() for name, socks in self.listen_sockets.items()}
        # -P: never put the working directory on sys.path, so a worker started
        # from a source checkout still imports the installed (compiled) package.
        command = [
            sys.executable, "-P", "-m", "proxy.worker",
            "--control-fd", str(theirs.fileno()),
            "--index", str(slot.index),
            "--log-level", self.log_level,
        ]
        try:
            process = await trio.lowlevel.open_process(
                command, pass_fds=[theirs.fileno(), *fds.values()]
            )
        finally:
            theirs.close()
        slot.process = process
        slot.channel = channel = control.ControlChannel(ours)
        slot.starts += 1
        log.info("worker %d started (pid %d)", slot.index, process.pid)
        try:
            await channel.send(control.Setup(slot.index, self.config, fds))
            with trio.move_on_after(READY_TIMEOUT) as scope:
                message = await channel.receive()
            if isinstance(message, control.Ready):
                slot.ready.set()
                slot.serving = True
            elif scope.cancelled_caught:
                log.error("worker %d not ready after %gs: killing it", slot.index, READY_TIMEOUT)
                process.kill()
            # Anything else means the worker died during start-up: wait reaps it.
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        try:
            async with trio.open_nursery() as nursery:
                if slot.serving:
                    nursery.start_soon(self._read_worker_messages, slot, channel)
                code = await process.wait()
                nursery.cancel_scope.cancel()
            return code
        finally:
            slot.channel = None
            slot.serving = False
            self.totals.exited(slot.index)
            await channel.aclose()
            if process.returncode is None:
                process.kill()
            with trio.CancelScope(shield=True):
                await process.wait()


def _read_token(path: str | None) -> bytes | None:
    """The admin bearer token from `admin.token_file` (surrounding whitespace ignored)."""
    if path is None:
        return None
    try:
        token = open(path, "rb").read().strip()
    except OSError as exc:
        raise UsageError(f"admin.token_file: cannot read {path}: {exc.strerror}") from exc
    if not token:
        raise UsageError(f"admin.token_file: {path} is empty")
    return token


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "unknown status"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def run(config: Config, log_level: str) -> int:
    supervisor = Supervisor(config, log_level)
    supervisor.bind()
    try:
        return trio.run(supervisor.run)
    finally:
        supervisor.close_listeners()

