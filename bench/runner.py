"""Runs one scenario: the origin once, then each target in interleaved rounds
(forward, reverse, forward, ...), each run a warm-up followed by a measured window."""

import contextlib
import dataclasses
import importlib.metadata
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from . import BenchError, hdr, load, proc, procstat, reload, targets, upstream
from .load import LoadResult
from .report import Run
from .scenarios import Scenario


@dataclass(frozen=True)
class Options:
    duration: int
    warmup: int
    rounds: int
    workers: int
    pin: bool = True  # proxy on PROXY_CPU, everything else on LOAD_CPU
    rate: float | None = None  # open-loop req/s (None: closed loop, wrk)
    loadgen_procs: int = 2  # open-loop generator processes
    connections: int = 50

    @property
    def load(self) -> load.Settings:
        return load.Settings(self.pin, self.rate, self.loadgen_procs, self.connections)

    @property
    def proxy_cpu(self) -> int | None:
        return proc.PROXY_CPU if self.pin else None

    @property
    def load_cpu(self) -> int | None:
        return proc.LOAD_CPU if self.pin else None


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


_VERSION_FLAG = {"nginx": "-v", "haproxy": "-v", "socat": "-V", "wrk": "-v", "iperf3": "-v",
                 "h2load": "--version", "nghttpx": "--version"}


def environment() -> dict[str, object]:
    """Machine and tool versions, recorded with the results."""
    commands = {tool: [tool, flag] for tool, flag in _VERSION_FLAG.items() if shutil.which(tool)}
    if meshproxy := targets.Meshproxy.command():
        commands["meshproxy"] = [*meshproxy, "--version"]
    versions = {}
    for tool, argv in commands.items():
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except subprocess.TimeoutExpired:
            continue
        lines = (done.stdout + done.stderr).splitlines()
        versions[tool] = next((line.strip() for line in lines if re.search(r"\d", line)), "?")
    for package in ("hdrhistogram", "matplotlib", "grpcio"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "started": datetime.now().isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "versions": versions,
    }


class _Window:
    """CPU and kernel counters over the measured window. The load function calls `begin()`
    when its measured load starts and `end()` when it stops (wrk: around the process; the
    open-loop generator: around its schedule, leaving out its start-up and drain)."""

    def __init__(self, proxy_pid: int | None, origin_pid: int) -> None:
        self._proxy_pid, self._origin_pid = proxy_pid, origin_pid
        self._marks: list[dict[str, float]] = []

    def _mark(self) -> None:
        mark = {
            "proxy": procstat.cpu_seconds(self._proxy_pid) if self._proxy_pid else 0.0,
            "origin": procstat.cpu_seconds(self._origin_pid),
            "drops": procstat.listen_drops(),
            "proxy_core_idle": procstat.cpu_idle_seconds(proc.PROXY_CPU),
            "load_core_idle": procstat.cpu_idle_seconds(proc.LOAD_CPU),
            "proxy_core_irq": procstat.cpu_irq_seconds(proc.PROXY_CPU),
            "load_core_irq": procstat.cpu_irq_seconds(proc.LOAD_CPU),
        }
        mark["time"] = time.monotonic()
        self._marks.append(mark)

    begin = end = _mark

    def figures(self, work: float) -> dict[str, float]:
        if len(self._marks) != 2:
            raise BenchError("the load tool did not mark its measured window")
        before, after = self._marks
        d = {key: after[key] - before[key] for key in before}
        seconds = d["time"]
        figures = {
            "window_s": seconds,
            "proxy_core_busy": 1 - d["proxy_core_idle"] / seconds,
            "load_core_busy": 1 - d["load_core_idle"] / seconds,
            "proxy_core_irq": d["proxy_core_irq"] / seconds,
            "load_core_irq": d["load_core_irq"] / seconds,
            "listen_drops": d["drops"],
            "origin_cores": d["origin"] / seconds,
        }
        if self._proxy_pid:
            figures["proxy_cores"] = d["proxy"] / seconds
            figures["cost_us"] = d["proxy"] * 1e6 / work
        return figures


class _WithBackground:
    """The measured window, with the target's background work (e.g. config reloads) started
    right after it begins and told to stop right before it ends."""

    def __init__(self, window: _Window, background: reload.Background) -> None:
        self._window, self._background = window, background

    def begin(self) -> None:
        self._window.begin()
        self._background.start()

    def end(self) -> None:
        self._background.signal_stop()
        self._window.end()


def _load_settings(options: Options, proxy: targets.Proxy) -> load.Settings:
    """The load settings of the run, for this target's listener."""
    return dataclasses.replace(options.load, http1=True) if proxy.http1_only else options.load


def _measure_window(
    scenario: Scenario, target: targets.Target, proxy: targets.Proxy, origin_pid: int,
    options: Options,
) -> tuple[LoadResult, dict[str, float]]:
    """Apply the load once; return the load result and the CPU/memory figures of its window."""
    pid = proxy.process.pid if proxy.process else None
    window = _Window(pid, origin_pid)
    background = target.during_window(proxy)
    rss = procstat.PeakRss(pid) if pid else contextlib.nullcontext()
    with rss:
        start = time.monotonic()
        try:
            result = scenario.run_load(proxy.port, options.duration,
                                       _load_settings(options, proxy),
                                       _WithBackground(window, background) if background
                                       else window)
        finally:
            if background:
                background.stop()
        wall = time.monotonic() - start
    metrics = dict(result.metrics, wall_s=wall, **window.figures(result.work))
    if pid:
        metrics["peak_rss_mib"] = rss.mib
    if background:
        metrics.update(background.metrics())
        for error in background.errors:
            progress(f"{target.name}: reload failed: {error}")
    return result, metrics


def _run_target(
    scenario: Scenario, target: targets.Target, origin: upstream.Origin, options: Options,
    round_no: int, workroot: Path, out: Path,
) -> Run:
    tag = f"r{round_no}-{target.name}"
    workdir = workroot / tag
    workdir.mkdir(mode=0o755)
    progress(f"round {round_no}/{options.rounds} {target.name}: start, warm up {options.warmup}s, "
             f"measure {options.duration}s")
    try:
        with targets.running(target, scenario.listener, origin.port, options.workers, workdir,
                             out / "logs" / f"{tag}.log", options.proxy_cpu) as proxy:
            if options.warmup:
                scenario.run_load(proxy.port, options.warmup, _load_settings(options, proxy))
            result, metrics = _measure_window(scenario, target, proxy, origin.pid, options)
            if proxy.process and proxy.process.poll() is not None:
                code = proxy.process.returncode
                raise BenchError(f"{target.name} exited during the run (exit code {code})")
            if proxy.config:
                shutil.copy(proxy.config, out / "configs" / f"{target.name}-{proxy.config.name}")
    except (BenchError, OSError) as e:
        progress(f"round {round_no}/{options.rounds} {target.name}: FAILED: {e}")
        return Run(round_no, target.name, error=str(e))
    (out / "raw" / f"{tag}.{result.raw_suffix}").write_text(result.raw)
    histogram = None
    if result.latency is not None:
        histogram = hdr.encode(result.latency)
        (out / "hgrm" / f"{tag}.hgrm").write_text(hdr.hgrm(result.latency))
    primary = scenario.primary
    summary = f"{primary.header} {metrics[primary.key]:{primary.fmt}}"
    if "p99_ms" in metrics:
        summary += f", p99 {metrics['p99_ms']:.2f} ms"
    elif "mean_ms" in metrics:
        summary += f", mean {metrics['mean_ms']:.2f} ms"
    if "cost_us" in metrics:
        summary += (f", proxy {metrics['proxy_cores']:.2f} cores, "
                    f"{metrics['cost_us']:,.1f} µs/{scenario.cost_unit}")
    if "reloads" in metrics:
        summary += (f", reloads {metrics['reloads']:.0f} applied, "
                    f"{metrics['reloads_failed']:.0f} failed")
    bad = {k: metrics[k] for k in ("errors", "non_2xx", "failed", "unsent") if metrics.get(k)}
    if bad:
        summary += ", " + ", ".join(f"{k} {v:,.0f}" for k, v in bad.items())
    progress(f"round {round_no}/{options.rounds} {target.name}: {summary}")
    return Run(round_no, target.name, metrics, shlex.join(result.argv), histogram=histogram)


def run(scenario: Scenario, chosen: list[targets.Target], options: Options, out: Path) -> list[Run]:
    """Measure every target in `chosen` for `options.rounds` interleaved rounds."""
    if options.pin:  # this harness, and what it starts, stay off the proxy's core
        os.sched_setaffinity(0, {proc.LOAD_CPU})
    for sub in ("raw", "logs", "configs", "hgrm"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="meshproxy-bench-") as tmp:
        workroot = Path(tmp)
        workroot.chmod(0o755)  # nginx workers run as an unprivileged user
        progress(f"origin: {scenario.origin}")
        origin_log = out / "logs" / "origin.log"
        with upstream.origin(scenario.origin, workroot / "origin", origin_log,
                             options.load_cpu) as origin:
            for round_no in range(1, options.rounds + 1):
                order = chosen if round_no % 2 else chosen[::-1]
                for target in order:
                    run = _run_target(scenario, target, origin, options, round_no, workroot, out)
                    runs.append(run)
    return runs
