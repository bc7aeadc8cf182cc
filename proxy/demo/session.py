"""`meshproxy demo`: start the mesh, drive load through it, show it live, write the report.

    exit_code = run_demo(DemoOptions(duration=20.0, netns=False, rate=200.0, report_dir=path))

One run: a temporary directory with the CA, tokens, configs and logs; the mesh's processes
(proxy/demo/mesh.py); then, in Trio, the load generator, a poll of every sidecar's admin
plane once a second (the table's numbers), the keys, and with `--duration` a script that
breaks backend v2 at 40% of the run and fixes it at 65%. It ends on `q`, Ctrl-C, SIGTERM or
the end of `--duration`: load stops, the sidecars are read a last time, every process is
stopped by PID, and the report is written.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import trio

from .dashboard import IdentityRow, KeyReader, Row, View, make_screen
from .http import HttpError
from .load import LoadGenerator
from .mesh import Mesh
from .netns import NetnsError, unavailable_reason
from .observe import CertWatch, Metrics, Rates, SidecarSample, rates, short_serial
from .plan import (
    BACKENDS,
    CANARY_STEPS,
    CERT_TTL,
    FRONTEND,
    INTRUDER,
    SERVICES,
    next_canary,
    sidecar_config,
    spiffe_id,
    weights_text,
)
from .probes import (
    IntruderError,
    Probe,
    intruder_call,
    intruder_context,
    mtls_evidence,
    plaintext_call,
)
from .report import save_mesh_files, summarize, summary_text, write_report
from .tally import Timeline, format_split

READY_TIMEOUT = 60.0
POLL_INTERVAL = 1.0
SPLIT_WINDOW = 10  # seconds of answers the live split is taken over
SPLIT_TOLERANCE = 4.0  # percentage points, for the summary's check of the first phase
BREAK_AT, FIX_AT = 0.40, 0.65  # of --duration
MIN_SCRIPTED = 10.0  # shorter unattended runs do not break v2
KEYS = "keys: [s] shift canary  [b] break backend v2  [f] fix it  [r] certificates  [q] quit"


@dataclass(frozen=True)
class DemoOptions:
    duration: float | None = None
    netns: bool = False
    rate: float = 200.0
    report_dir: Path = Path("meshproxy-demo-report")
    threshold: float = 0.99


@dataclass
class _Sidecar:
    """What the demo knows about one sidecar between polls."""

    sample: SidecarSample | None = None
    rates: Rates = field(default_factory=lambda: Rates(0.0, None, 0.0))
    certs: CertWatch = field(default_factory=CertWatch)
    log_offset: int = 0


class Session:
    def __init__(self, mesh: Mesh, options: DemoOptions, out: IO[str]) -> None:
        self.mesh = mesh
        self.options = options
        self.out = out
        self.tty = out.isatty()
        self.weights = dict(CANARY_STEPS[0])
        self.v2_broken = False
        self.sidecars = {name: _Sidecar() for name in SERVICES}
        self.events: deque[str] = deque(maxlen=10)
        self.probes: list[Probe] = []
        self.timeline: Timeline | None = None
        self.load: LoadGenerator | None = None
        self.done = trio.Event()
        self._changing = trio.Lock()
        self._v2_in_rotation: bool | None = None
        self._last_line = 0.0

    # -- the run ---------------------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        started = time.monotonic()
        await self.mesh.wait_ready(READY_TIMEOUT)
        self.say(f"mesh ready in {time.monotonic() - started:.1f}s")
        await self._poll()  # first certificates and counters
        self.probes = await self._forbidden_calls()
        for probe in self.probes:
            self.event(f"policy: {probe.caller} -> {probe.target}: {probe.outcome}"
                       + ("" if probe.refused else "  (NOT REFUSED)"))
        now = time.monotonic()
        self.timeline = Timeline(now, self.weights, phase=f"canary {weights_text(self.weights)}")
        frontend = self.mesh.plan.services[FRONTEND]
        self.load = LoadGenerator(frontend.inbound, self.options.rate, self.timeline.record)
        screen = make_screen(self.out) if self.tty else None
        try:
            with KeyReader.open() as keys, trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                if not self.tty:
                    self.say(f"sending {self.options.rate:g} req/s to the frontend at {frontend.inbound}")
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self.load.run)
                    nursery.start_soon(self._observe, screen, keys.interactive)
                    nursery.start_soon(keys.run, self._on_key)
                    nursery.start_soon(self._signals, signals)
                    if self.options.duration is not None:
                        nursery.start_soon(self._script, self.options.duration)
                    await self.done.wait()
                    nursery.cancel_scope.cancel()
        finally:
            if screen is not None:
                screen.close()
        self.timeline.finish(time.monotonic())
        with trio.move_on_after(10):
            await self._poll()
        return self._summary()

    async def _signals(self, signals: Any) -> None:
        async for signum in signals:
            self.say(f"{signal.Signals(signum).name}: stopping")
            self.done.set()

    async def _script(self, duration: float) -> None:
        """--duration: v2 breaks at 40% of the run and is fixed at 65%; the end at 100%."""
        assert self.timeline is not None
        start = self.timeline.start
        if duration >= MIN_SCRIPTED:
            await trio.sleep_until(_trio_time(start + duration * BREAK_AT))
            await self.break_v2()
            await trio.sleep_until(_trio_time(start + duration * FIX_AT))
            await self.fix_v2()
        await trio.sleep_until(_trio_time(start + duration))
        self.done.set()

    # -- the keys --------------------------------------------------------------------------
    async def _on_key(self, key: str) -> None:
        try:
            if key == "s":
                await self.shift_canary()
            elif key == "b":
                await self.break_v2()
            elif key == "f":
                await self.fix_v2()
            elif key == "r":
                self.show_certificates()
            elif key == "q":
                self.done.set()
        except (RuntimeError, HttpError) as exc:
            self.event(f"failed: {exc}")

    async def shift_canary(self) -> None:
        async with self._changing:
            weights = next_canary(self.weights)
            config = sidecar_config(self.mesh.plan, FRONTEND, self._files(), weights=weights)
            version = await self.mesh.reload(FRONTEND, config)
            self.weights = weights
            self._phase(f"canary {weights_text(weights)}")
            self.event(f"canary shifted to v1/v2 {weights_text(weights)}: PUT /config on the frontend "
                       f"sidecar (config version {version}), no restart")

    async def break_v2(self) -> None:
        await self._set_v2(broken=True)

    async def fix_v2(self) -> None:
        await self._set_v2(broken=False)

    async def _set_v2(self, broken: bool) -> None:
        async with self._changing:
            if broken == self.v2_broken:
                return
            name = BACKENDS["v2"]
            config = sidecar_config(self.mesh.plan, name, self._files(), broken=broken)
            version = await self.mesh.reload(name, config)
            self.v2_broken = broken
            self._phase(("v2 broken, " if broken else "v2 fixed, ") + f"canary {weights_text(self.weights)}")
            if broken:
                self.event(f"backend-v2 broken: its sidecar answers 503 to everything (fault abort 100%, "
                           f"config version {version}); watch retries and ejection keep requests succeeding")
            else:
                self.event(f"backend-v2 fixed (fault removed, config version {version}); it returns when "
                           "its ejection ends")

    def show_certificates(self) -> None:
        for name in SERVICES:
            sidecar = self.sidecars[name]
            serials = " -> ".join(short_serial(s, 8) for s in sidecar.certs.serials[-3:]) or "?"
            self.event(f"{name}: serials {serials} ({len(sidecar.certs.serials)} certificates so far)")
        self.event(f"certificates renew on their own at about half their {CERT_TTL} lifetime; open "
                   "connections are kept")

    def _phase(self, name: str) -> None:
        if self.timeline is not None:
            self.timeline.begin_phase(time.monotonic(), name, self.weights)

    def _files(self) -> Any:
        assert self.mesh.files is not None
        return self.mesh.files

    # -- watching --------------------------------------------------------------------------
    async def _observe(self, screen: Any, interactive: bool) -> None:
        while True:
            await trio.sleep(POLL_INTERVAL)
            with trio.move_on_after(POLL_INTERVAL * 3):
                await self._poll()
            if screen is not None:
                screen.show(self._view(interactive))
            else:
                self._status_line()

    async def _poll(self) -> None:
        async with trio.open_nursery() as nursery:
            for name in SERVICES:
                nursery.start_soon(self._poll_one, name)
        self._read_logs()
        self._watch_v2()

    async def _poll_one(self, name: str) -> None:
        try:
            metrics = await self.mesh.admin(name, "GET", "/metrics")
            latency = await self.mesh.admin(name, "GET", "/stats/latency?format=json&reset=1")
        except HttpError:
            return
        if metrics.status != 200:
            return
        try:
            parsed = Metrics.parse(metrics.body.decode())
            latency_json = json.loads(latency.body) if latency.status == 200 else None
        except ValueError:
            return
        sidecar = self.sidecars[name]
        sample = SidecarSample.read(time.monotonic(), parsed, latency_json)
        sidecar.rates = rates(sidecar.sample, sample)
        sidecar.sample = sample

    def _read_logs(self) -> None:
        for name in SERVICES:
            sidecar = self.sidecars[name]
            process = self.mesh.processes.get(name)
            if process is None:
                continue
            try:
                with open(process.log_path, "rb") as file:
                    file.seek(sidecar.log_offset)
                    data = file.read(1 << 20)
            except OSError:
                continue
            sidecar.log_offset += len(data)
            for serial in sidecar.certs.feed(data.decode("utf-8", "replace")):
                if len(sidecar.certs.serials) > 1:
                    self.event(f"{name}: certificate rotated, new serial {short_serial(serial, 12)} "
                               f"(valid until {sidecar.certs.valid_until})")

    def _v2_key(self) -> str:
        return f"backend-v2/{self.mesh.plan.backend('v2').inbound}"

    def _watch_v2(self) -> None:
        sample = self.sidecars[FRONTEND].sample
        if sample is None or self._v2_key() not in sample.healthy:
            return
        in_rotation = sample.healthy[self._v2_key()]
        if self._v2_in_rotation is not None and in_rotation != self._v2_in_rotation:
            if in_rotation:
                self.event("frontend: backend-v2 back in rotation (its ejection ended)")
            else:
                self.event("frontend: backend-v2 ejected by outlier detection; its share goes to "
                           "the v1 fallback endpoint")
        self._v2_in_rotation = in_rotation

    async def _forbidden_calls(self) -> list[Probe]:
        """For each backend: a plaintext call, and one from a workload the CA vouches for but
        the policy does not allow. Both must be refused."""
        bundle = self.mesh.trust_bundle.read_bytes()
        token = await trio.to_thread.run_sync(self.mesh.intruder_token)
        intruder = spiffe_id(INTRUDER)
        try:
            context = await intruder_context(self.mesh.plan.ca, bundle, token)
        except IntruderError as exc:
            context = None
            problem = str(exc)
        probes = []
        for name in BACKENDS.values():
            service = self.mesh.plan.services[name]
            probes.append(await plaintext_call(service.inbound, name))
            if context is None:
                probes.append(Probe(intruder, name, f"not tried: {problem}", False))
            else:
                probes.append(await intruder_call(service.inbound, name, context, intruder))
        return probes

    # -- what is shown ---------------------------------------------------------------------
    def event(self, text: str) -> None:
        stamp = datetime.now().strftime("%H:%M:%S")
        self.events.append(f"{stamp} {text}")
        if not self.tty:
            self.say(text)

    def say(self, text: str) -> None:
        if self.tty and self.timeline is not None and not self.done.is_set():
            return  # the live view shows it
        print(text, file=self.out, flush=True)

    def _admin_url(self, name: str) -> str:
        return f"http://{self.mesh.plan.services[name].admin}"

    def _view(self, interactive: bool) -> View:
        assert self.timeline is not None
        now = time.monotonic()
        elapsed = now - self.timeline.start
        last = self.timeline.window(now, 1)
        recent = self.timeline.window(now, SPLIT_WINDOW)
        client_p = last.percentiles_ms([50, 99]) or [None, None]
        rows = [Row("clients -> frontend", "(load generator)", last.requests, last.success_rate,
                    client_p[0], client_p[1],
                    f"split v1/v2: last {SPLIT_WINDOW}s {format_split(recent.split())}, "
                    f"run {format_split(self.timeline.total.split())}")]
        for name in SERVICES:
            sidecar = self.sidecars[name]
            sample = sidecar.sample
            rows.append(Row(name, self._admin_url(name), sidecar.rates.requests_per_s, sidecar.rates.success_rate,
                            sample.p50_ms if sample else None, sample.p99_ms if sample else None,
                            self._note(name)))
        identities = []
        wall = time.time()
        for name in SERVICES:
            sidecar = self.sidecars[name]
            sample = sidecar.sample
            expiry = sample.cert_expiry if sample else None
            identities.append(IdentityRow(name, self.mesh.plan.services[name].identity,
                                          short_serial(sidecar.certs.serial, 12),
                                          None if expiry is None else expiry - wall,
                                          int(sample.rotations) if sample else 0))
        where = ("network namespaces: " + self.mesh.topology.describe()) if self.mesh.topology else "loopback"
        title = (f"meshproxy demo on {'netns' if self.mesh.plan.netns else '127.0.0.1'}: "
                 f"{elapsed:.0f}s, {self.options.rate:g} req/s offered")
        if self.options.duration is not None:
            title += f", ends at {self.options.duration:.0f}s"
        v2 = "BROKEN (fault abort 503 on its sidecar)" if self.v2_broken else "healthy"
        lines = [
            f"canary: v1/v2 weights {weights_text(self.weights)} on the frontend's outbound route",
            f"backend-v2: {v2}; the frontend has it {self._v2_state()}",
            f"policy: backends take mTLS only, and only from {spiffe_id(FRONTEND)}: {self._probes_text()}",
            f"where: {where}; configs and logs in {self.mesh.workdir} (copied into the report at exit)",
        ]
        if self.mesh.admin_token is not None:
            lines.append(f"admin planes need: Authorization: Bearer $(cat {self.mesh.workdir}/admin.token)")
        keys = KEYS if interactive else "keys: stdin is not a terminal (Ctrl-C stops)"
        return View(title, rows, identities, lines, list(self.events), keys + "  |  Ctrl-C: stop and write the report")

    def _note(self, name: str) -> str:
        sidecar = self.sidecars[name]
        sample = sidecar.sample
        if sample is None:
            return ""
        if name == FRONTEND:
            ejections = sample.ejections.get(self._v2_key(), 0)
            return f"retries {sidecar.rates.retries_per_s:.0f}/s, v2 ejections {ejections:.0f}"
        note = f"mTLS handshakes {sample.handshakes_ok:.0f} ok / {sample.handshakes_failed:.0f} refused, " \
               f"policy denials {sample.authz_denied:.0f}"
        if name == BACKENDS["v2"] and self.v2_broken:
            note = "FAULT: abort 503 100%; " + note
        return note

    def _probes_text(self) -> str:
        """'plaintext -> backend-v1 refused, ...; intruder -> ...' in one line."""
        parts = []
        for kind in ("plaintext", INTRUDER):
            probes = [p for p in self.probes if (kind in p.caller)]
            if probes:
                parts.append(f"{kind} -> " + ", ".join(
                    f"{p.target} {p.outcome.split(' (')[0]}{'' if p.refused else ' NOT REFUSED'}" for p in probes))
        return "; ".join(parts) or "checking..."

    def _v2_state(self) -> str:
        if self._v2_in_rotation is None:
            return "(unknown)"
        return "in rotation" if self._v2_in_rotation else "EJECTED (outlier detection)"

    def _status_line(self) -> None:
        """Without a terminal: one line every 5 s."""
        assert self.timeline is not None
        now = time.monotonic()
        if now - self._last_line < 5:
            return
        self._last_line = now
        seconds = max(1, min(5, int(now - self.timeline.start)))
        window = self.timeline.window(now, seconds)
        p50, p99 = window.percentiles_ms([50, 99]) or [0.0, 0.0]
        ok = window.success_rate
        self.say(f"[{now - self.timeline.start:5.0f}s] {window.requests / seconds:.0f} req/s, ok "
                 f"{'-' if ok is None else f'{ok * 100:.2f}%'}, p50 {p50:.2f}ms p99 {p99:.2f}ms, split v1/v2 "
                 f"{format_split(window.split())}, v2 {self._v2_state()}, retries "
                 f"{self.sidecars[FRONTEND].rates.retries_per_s:.0f}/s")

    # -- the end ---------------------------------------------------------------------------
    def _summary(self) -> dict[str, Any]:
        assert self.timeline is not None
        metrics = {}
        for name in SERVICES:
            sample = self.sidecars[name].sample
            if sample is not None:
                metrics[name] = sample
        handshakes_ok = {name: s.handshakes_ok for name, s in metrics.items() if name != FRONTEND}
        evidence = mtls_evidence(handshakes_ok, self.timeline.total.callers, spiffe_id(FRONTEND),
                                 list(BACKENDS.values()))
        frontend = metrics.get(FRONTEND)
        summary = summarize(
            self.timeline, threshold=self.options.threshold, rate=self.options.rate,
            mode="netns" if self.mesh.plan.netns else "loopback", mtls=evidence,
            probes=[probe.as_dict() for probe in self.probes],
            rotations={name: int(s.rotations) for name, s in metrics.items()},
            frontend={"retries": frontend.retries if frontend else 0,
                      "v2_ejections": frontend.ejections.get(self._v2_key(), 0) if frontend else 0},
            split_tolerance=SPLIT_TOLERANCE)
        if self.load is not None:
            # Requests the generator itself was too late to send (a starved CPU, not the mesh).
            summary["generator"] = {"sent": self.load.sent, "skipped": self.load.skipped}
        return summary


def _trio_time(monotonic: float) -> float:
    """A time.monotonic() instant on Trio's clock."""
    return trio.current_time() + (monotonic - time.monotonic())


REPORT_FILES = ("summary.json", "latency.hgrm", "latency-v1.hgrm", "latency-v2.hgrm", "latency.png", "mesh")


def _prepare_report_dir(directory: Path) -> None:
    """Clear an earlier report; refuse to touch a directory holding anything else."""
    if not directory.exists():
        return
    strangers = [entry.name for entry in directory.iterdir() if entry.name not in REPORT_FILES]
    if strangers:
        raise ValueError(f"{directory} holds files that are not a demo report ({', '.join(sorted(strangers)[:3])}); "
                         "pick another --report-dir")
    shutil.rmtree(directory)


def run_demo(options: DemoOptions, out: IO[str] = sys.stdout) -> int:
    """The whole demo; returns the exit status."""
    if options.netns:
        reason = unavailable_reason()
        if reason is not None:
            print(f"meshproxy demo: {reason}", file=sys.stderr)
            return 1
    report_dir = options.report_dir.resolve()
    try:
        _prepare_report_dir(report_dir)
    except (ValueError, OSError) as exc:
        print(f"meshproxy demo: {exc}", file=sys.stderr)
        return 1
    workdir = Path(tempfile.mkdtemp(prefix="meshproxy-demo-"))
    # SIGTERM while the mesh starts or stops: clean up as for Ctrl-C (the live part takes
    # both signals itself and stops in order).
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        try:
            mesh = Mesh.in_namespaces(workdir) if options.netns else Mesh.on_loopback(workdir)
        except NetnsError as exc:
            print(f"meshproxy demo: cannot set up network namespaces: {exc}", file=sys.stderr)
            return 1
        try:
            summary = _run_mesh(mesh, options, out, report_dir)
        except (RuntimeError, OSError, trio.TooSlowError, KeyboardInterrupt) as exc:
            why = "interrupted" if isinstance(exc, KeyboardInterrupt) else str(exc) or "timed out"
            kept = save_mesh_files(report_dir, _mesh_files(mesh))
            print(f"meshproxy demo: {why}\nevery process was stopped; configs and logs: {kept}", file=sys.stderr)
            return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutil.rmtree(workdir, ignore_errors=True)
    if options.duration is None:
        return 0
    return 0 if summary["passed"] else 1


def _run_mesh(mesh: Mesh, options: DemoOptions, out: IO[str], report_dir: Path) -> dict[str, Any]:
    network = mesh.topology.describe() if mesh.topology else "127.0.0.1"
    with mesh:  # stops every process (and removes the namespaces) however this block ends
        print(f"meshproxy demo: starting the CA, 3 apps and 3 sidecars on {network}", file=out, flush=True)
        mesh.prepare()
        mesh.start()
        session = Session(mesh, options, out)
        summary = trio.run(session.run)
        problems = mesh.stop()
    assert session.timeline is not None
    summary["network"] = network
    summary["processes"] = mesh.pids()
    if problems:
        summary["shutdown_problems"] = problems
    written = write_report(report_dir, session.timeline, summary, _mesh_files(mesh))
    print(summary_text(summary), file=out)
    print(f"report: {report_dir}/ ({', '.join(written)})", file=out)
    if "png" in summary:
        print(f"  note: {summary['png']}", file=out)
    print(f"summary: {report_dir / 'summary.json'}", file=out, flush=True)
    return summary


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _mesh_files(mesh: Mesh) -> list[Path]:
    return [mesh.config_path(name) for name in SERVICES] + [p.log_path for p in mesh.processes.values()]
