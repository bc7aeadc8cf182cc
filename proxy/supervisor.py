"""The supervisor: binds the listeners, runs the workers, serves the admin plane.

It never touches the data path. It starts `workers` processes, hands each its
own SO_REUSEPORT socket per listener and the compiled config, restarts a worker
that dies (with crash-loop backoff), and on SIGTERM/SIGINT drains: readiness
turns 503, workers stop accepting and finish open connections up to
`drain_timeout`, then everything exits 0. A second signal exits at once.
A reload (PUT /config, POST /reload, SIGHUP) is validated here once and applied to
every worker in place; workers answer telemetry snapshots, merged here for scrapes.
With `identity` configured, the supervisor keeps the sidecar's SVID fresh (identity/
manager.py) and sends each new one to every worker, and to each worker that starts later;
readiness waits for the first.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from . import __version__, control
from .admin import AdminApp, bind_listening_socket, serve_admin
from .admin.endpoints import AdminEndpoints, read_token
from .config import Config, ConfigError, FieldError, config_to_dict, load_config
from .errors import UsageError
from .identity.manager import IdentityManager, WorkloadSvid
from .net.listen import bind_listener, bound_address
from .telemetry import (
    IdentityStats,
    LatencyWindow,
    Snapshot,
    Totals,
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
# How long a worker has to apply a new config version before it is restarted.
APPLY_TIMEOUT = 10.0
# How long handing a new SVID to one worker may take (a stuck worker is left out).
IDENTITY_SEND_TIMEOUT = 5.0


@dataclass
class WorkerSlot:
    index: int
    process: trio.Process | None = None
    channel: control.ControlChannel | None = None  # set while the worker process is up
    serving: bool = False  # it reported Ready (and so answers snapshot requests)
    starts: int = 0
    ready: trio.Event = field(default_factory=trio.Event)
    # Answers awaited from the worker: ("snapshot", id) or ("applied", version) -> reply.
    pending: dict[tuple[str, int], _Reply] = field(default_factory=dict)
    # The listening socket the worker holds per listener name (what a reload must add).
    sockets: dict[str, socket.socket] = field(default_factory=dict)
    version: int = 0  # the config version the worker serves


class _Reply:
    """One awaited answer from a worker."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.value: Any = None


class Supervisor:
    def __init__(self, config: Config, log_level: str, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
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
        self.reloads_ok = 0
        self.reloads_failed = 0
        self._apply_lock = trio.Lock()
        # The SVID every worker gets: sent under `_identity_lock`, which a starting worker also
        # holds from its Setup to its first Identity, so each worker gets every version once it
        # has its Setup, in order.
        self.identity = (IdentityManager(config.identity, self._publish_identity)
                         if config.identity is not None else None)
        self._identity_message: control.Identity | None = None
        self._identity_lock = trio.Lock()
        self.admin_app = AdminApp(read_token(config.admin.token_file))
        AdminEndpoints(self).register(self.admin_app)
        self._nursery: trio.Nursery
        self.drained: trio.Event | None = None
        self._exit_after_drain = False

    # -- admin handlers -------------------------------------------------
    def reopen_logs(self) -> int:
        """SIGUSR1 or POST /logs/reopen: every worker reopens its access log file (after a
        rotation moved it). Returns how many workers were told."""
        told = 0
        for slot in self.slots:
            process = slot.process
            if process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGUSR1)
                    told += 1
        return told

    # -- reload -----------------------------------------------------------
    async def reload_from_file(self) -> None:
        """SIGHUP: re-read the config file; a bad one is logged and changes nothing."""
        if self.config_path is None:
            return
        try:
            version, changed = await self.apply_config(load_config(self.config_path))
        except ConfigError as exc:
            self.reloads_failed += 1
            log.error("reload of %s refused:\n%s", self.config_path, exc)
            return
        if changed:
            self.reloads_ok += 1
        log.info("reload of %s: version %d%s", self.config_path, version, "" if changed else " (unchanged)")

    async def apply_config(self, config: Config) -> tuple[int, bool]:
        """Make `config` the active one everywhere; returns (version, changed).

        Reloads are serialised. An equal config changes nothing. What cannot change
        without a restart, or a listen address that cannot be bound, raises ConfigError
        and leaves everything as it was. Otherwise the supervisor switches first (so a
        worker started from now on gets the new version), then every worker is told
        and answers once the version is in effect; the call returns after all have.
        """
        async with self._apply_lock:
            if self.draining:
                raise ConfigError([FieldError("", "draining: no reloads")])
            if config_to_dict(config) == config_to_dict(self.config):
                return self.config_version, False
            problems = []
            if config.worker_count != self.config.worker_count:
                problems.append(FieldError("workers", "changing the number of workers needs a restart"))
            if config.admin != self.config.admin:
                problems.append(FieldError("admin", "changing the admin plane needs a restart"))
            if config.identity != self.config.identity:
                problems.append(FieldError("identity", "changing the identity section needs a restart"))
            if problems:
                raise ConfigError(problems)
            sockets = self._sockets_for(config)
            retired = [socks for name, socks in self.listen_sockets.items() if sockets.get(name) is not socks]
            self.config = config
            self.config_version += 1
            self.config_applied = time.time()
            self.listen_sockets = sockets
            version = self.config_version
            try:
                async with trio.open_nursery() as nursery:
                    for slot in self.slots:
                        if slot.serving:
                            nursery.start_soon(self._apply_to_worker, slot)
            finally:
                # The workers closed their copies as they stopped accepting on them.
                for socks in retired:
                    for sock in socks:
                        sock.close()
            log.info("config version %d applied to %d worker(s)", version, self.worker_count)
            return version, True

    def _sockets_for(self, config: Config) -> dict[str, list[socket.socket]]:
        """Listening sockets for `config`: kept where name and address are unchanged,
        bound anew for listeners added or moved (ConfigError if that fails)."""
        current = {listener.name: listener for listener in self.config.listeners}
        sockets: dict[str, list[socket.socket]] = {}
        try:
            for index, listener in enumerate(config.listeners):
                old = current.get(listener.name)
                if old is not None and old.address == listener.address and listener.name in self.listen_sockets:
                    sockets[listener.name] = self.listen_sockets[listener.name]
                    continue
                try:
                    sockets[listener.name] = bind_listener(listener.address, self.worker_count)
                except UsageError as exc:
                    raise ConfigError([FieldError(f"listeners[{index}].address", str(exc))]) from exc
        except BaseException:
            for name, socks in sockets.items():
                if self.listen_sockets.get(name) is not socks:
                    for sock in socks:
                        sock.close()
            raise
        return sockets

    async def _apply_to_worker(self, slot: WorkerSlot) -> None:
        """Bring one worker to the current version; one that does not answer is restarted."""
        version = self.config_version
        channel = slot.channel
        if channel is None or slot.version == version:
            return
        mine = {name: socks[slot.index] for name, socks in self.listen_sockets.items()}
        new = [name for name, sock in mine.items() if slot.sockets.get(name) is not sock]
        reply = slot.pending[("applied", version)] = _Reply()
        try:
            await channel.send(control.Apply(version, self.config, tuple(new)),
                               fds=[mine[name].fileno() for name in new])
            with trio.move_on_after(APPLY_TIMEOUT):
                await reply.done.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            slot.pending.pop(("applied", version), None)
        if reply.value == version:
            slot.sockets = mine
            slot.version = version
        elif slot.process is not None and slot.process.returncode is None:
            log.error("worker %d did not apply version %d: restarting it", slot.index, version)
            slot.process.kill()

    async def _bring_up_to_date(self, slot: WorkerSlot) -> None:
        async with self._apply_lock:
            await self._apply_to_worker(slot)

    # -- identity -----------------------------------------------------------------------
    async def _publish_identity(self, svid: WorkloadSvid) -> None:
        """Send a new SVID (or trust bundle) to every worker up; later ones get it at start."""
        message = control.Identity(svid.cert_chain_pem, svid.key_pem, svid.bundle_pem, svid.spiffe_id)
        async with self._identity_lock:
            self._identity_message = message
            for slot in self.slots:
                if slot.channel is None:
                    continue
                with trio.move_on_after(IDENTITY_SEND_TIMEOUT):
                    try:
                        await slot.channel.send(message)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass  # it died: its successor gets the SVID when it starts

    def identity_stats(self) -> IdentityStats | None:
        manager = self.identity
        if manager is None:
            return None
        current = manager.current
        return IdentityStats(expiry=current.not_after if current else None,
                             rotations=manager.rotations, failures=manager.failures)

    async def collect(self) -> Snapshot:
        """Every live worker's telemetry, merged with what finished workers counted."""
        async with self._scrape_lock:
            self._request_ids += 1
            request = self._request_ids
            asked: list[tuple[WorkerSlot, _Reply]] = []
            for slot in self.slots:
                if slot.channel is None or not slot.serving:
                    continue
                reply = slot.pending[("snapshot", request)] = _Reply()
                try:
                    await slot.channel.send(control.SnapshotRequest(request))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    slot.pending.pop(("snapshot", request), None)
                    continue
                asked.append((slot, reply))
            with trio.move_on_after(SCRAPE_TIMEOUT):
                for _, reply in asked:
                    await reply.done.wait()
            for slot, reply in asked:
                slot.pending.pop(("snapshot", request), None)
                if reply.value is not None:
                    self.totals.update(slot.index, reply.value)
            return self.totals.total()

    async def _read_worker_messages(self, slot: WorkerSlot, channel: control.ControlChannel) -> None:
        while True:
            message = await channel.receive()
            if message is None:
                return
            if isinstance(message, control.SnapshotReply):
                key, value = ("snapshot", message.request), message.snapshot
            elif isinstance(message, control.Applied):
                key, value = ("applied", message.version), message.version
            else:
                continue
            reply = slot.pending.get(key)
            if reply is not None:
                reply.value = value
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
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1) as signals:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await nursery.start(serve_admin, self.admin_app, [self.admin_socket])
                if self.identity is not None:
                    await nursery.start(self.identity.run)
                for slot in self.slots:
                    nursery.start_soon(self._keep_running, slot)
                nursery.start_soon(self._report_ready)
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        nursery.start_soon(self.reload_from_file)
                        continue
                    if signum == signal.SIGUSR1:
                        self.reopen_logs()
                        continue
                    if self.draining:
                        log.warning("%s again: exiting now", signal.Signals(signum).name)
                        self._kill_workers()
                        exit_code = 1
                        nursery.cancel_scope.cancel()
                        break
                    log.info("%s: draining (up to %gs)", signal.Signals(signum).name,
                             self.config.drain_timeout)
                    self.start_drain(exit_after=True)
        self.close_listeners()
        log.info("meshproxy stopped")
        return exit_code

    def start_drain(self, *, exit_after: bool) -> None:
        """Drain once; a later request to exit (shutdown after drain) is remembered."""
        self._exit_after_drain = self._exit_after_drain or exit_after
        if self.drained is not None and self.drained.is_set() and exit_after:
            self._nursery.start_soon(self._exit_soon)
        if not self.draining:
            self.drained = trio.Event()
            self._nursery.start_soon(self._drain)

    # -- admin: drain and shutdown ------------------------------------------
    async def _report_ready(self) -> None:
        for slot in self.slots:
            await slot.ready.wait()
        if self.identity is not None:
            await self.identity.loaded.wait()
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
        self.drained.set()
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
        # -P: never put the working directory on sys.path, so a worker started
        # from a source checkout still imports the installed (compiled) package.
        command = [
            sys.executable, "-P", "-m", "proxy.worker",
            "--control-fd", str(theirs.fileno()),
            "--index", str(slot.index),
            "--log-level", self.log_level,
        ]
        # Config, version and sockets are taken together and handed over before a
        # reload can move on: the sockets a new worker inherits stay open until it has
        # them, and a reload that starts later reaches it (it is tracked from here on).
        async with self._apply_lock:
            config = self.config
            slot.sockets = {name: socks[slot.index] for name, socks in self.listen_sockets.items()}
            slot.version = self.config_version
            fds = {name: sock.fileno() for name, sock in slot.sockets.items()}
            try:
                process = await trio.lowlevel.open_process(
                    command, pass_fds=[theirs.fileno(), *fds.values()]
                )
            finally:
                theirs.close()
            slot.process = process
            async with self._identity_lock:
                slot.channel = channel = control.ControlChannel(ours)
                slot.starts += 1
                log.info("worker %d started (pid %d)", slot.index, process.pid)
                try:
                    await channel.send(control.Setup(slot.index, config, fds))
                    if self._identity_message is not None:
                        await channel.send(self._identity_message)
                except trio.BrokenResourceError:
                    pass  # it died at once: wait() below reaps it
        try:
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
                    # A reload may have happened while this worker started.
                    nursery.start_soon(self._bring_up_to_date, slot)
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






def _describe_exit(code: int | None) -> str:
    if code is None:
        return "unknown status"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def run(config: Config, log_level: str, config_path: str | None = None) -> int:
    supervisor = Supervisor(config, log_level, config_path)
    supervisor.bind()
    try:
        return trio.run(supervisor.run)
    finally:
        supervisor.close_listeners()

