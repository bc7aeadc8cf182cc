"""Runs one scenario: the origin once, then each target in interleaved rounds
(forward, reverse, forward, ...), each run a warm-up followed by a measured window."""

import contextlib
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

from . import BenchError, proc, procstat, targets, upstream
from .load import LoadResult
from .report import Run
from .scenarios import Scenario


@dataclass(frozen=True)
class Options:
    duration: int
    warmup: int
    rounds: int
    workers: int


def progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


_VERSION_FLAG = {"nginx": "-v", "haproxy": "-v", "socat": "-V", "wrk": "-v", "iperf3": "-v"}


def environment() -> dict[str, object]:
    """Machine and tool versions, recorded with the results."""
    commands = {tool: [tool, flag] for tool, flag in _VERSION_FLAG.items() if shutil.which(tool)}
    if meshproxy := targets.Meshproxy.command():
        commands["meshproxy"] = [*meshproxy, "--version"]
    versions = {}
    for tool, argv in commands.items():
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except subprocess.TimeoutExpired:
            continue
        lines = (done.stdout + done.stderr).splitlines()
        versions[tool] = next((line.strip() for line in lines if re.search(r"\d", line)), "?")
    return {
        "started": datetime.now().isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "versions": versions,
    }


def _measure_window(
    scenario: Scenario, proxy: targets.Proxy, origin_pid: int, seconds: int
) -> tuple[LoadResult, dict[str, float]]:
    """Apply the load once; return the load result and the CPU/memory figures around it."""
    pid = proxy.process.pid if proxy.process else None
    proxy_before = procstat.cpu_seconds(pid) if pid else 0.0
    origin_before = procstat.cpu_seconds(origin_pid)
    core_before = procstat.cpu_busy_seconds(proc.PROXY_CPU)
    drops_before = procstat.listen_drops()
    rss = procstat.PeakRss(pid) if pid else contextlib.nullcontext()
    with rss:
        start = time.monotonic()
        result = scenario.run_load(proxy.port, seconds)
        wall = time.monotonic() - start
    metrics = dict(result.metrics, wall_s=wall)
    metrics["proxy_core_busy"] = (procstat.cpu_busy_seconds(proc.PROXY_CPU) - core_before) / wall
    metrics["listen_drops"] = procstat.listen_drops() - drops_before
    if pid:
        proxy_cpu = procstat.cpu_seconds(pid) - proxy_before
        metrics["proxy_cores"] = proxy_cpu / wall
        metrics["cost_us"] = proxy_cpu * 1e6 / result.work
        metrics["peak_rss_mib"] = rss.mib
    metrics["origin_cores"] = (procstat.cpu_seconds(origin_pid) - origin_before) / wall
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
                             out / "logs" / f"{tag}.log") as proxy:
            if options.warmup:
                scenario.run_load(proxy.port, options.warmup)
            result, metrics = _measure_window(scenario, proxy, origin.pid, options.duration)
            if proxy.process and proxy.process.poll() is not None:
                code = proxy.process.returncode
                raise BenchError(f"{target.name} exited during the run (exit code {code})")
            if proxy.config:
                shutil.copy(proxy.config, out / "configs" / f"{target.name}-{proxy.config.name}")
    except (BenchError, OSError) as e:
        progress(f"round {round_no}/{options.rounds} {target.name}: FAILED: {e}")
        return Run(round_no, target.name, error=str(e))
    (out / "raw" / f"{tag}.{result.raw_suffix}").write_text(result.raw)
    primary = scenario.primary
    summary = f"{primary.header} {metrics[primary.key]:{primary.fmt}}"
    if "cost_us" in metrics:
        summary += (f", proxy {metrics['proxy_cores']:.2f} cores, "
                    f"{metrics['cost_us']:,.1f} µs/{scenario.cost_unit}")
    progress(f"round {round_no}/{options.rounds} {target.name}: {summary}")
    return Run(round_no, target.name, metrics, shlex.join(result.argv))


def run(scenario: Scenario, chosen: list[targets.Target], options: Options, out: Path) -> list[Run]:
    """Measure every target in `chosen` for `options.rounds` interleaved rounds."""
    os.sched_setaffinity(0, {proc.LOAD_CPU})  # this harness, and what it starts, stay off CPU 1
    for sub in ("raw", "logs", "configs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="meshproxy-bench-") as tmp:
        workroot = Path(tmp)
        workroot.chmod(0o755)  # nginx workers run as an unprivileged user
        progress(f"origin: {scenario.origin}")
        origin_log = out / "logs" / "origin.log"
        with upstream.origin(scenario.origin, workroot / "origin", origin_log) as origin:
            for round_no in range(1, options.rounds + 1):
                order = chosen if round_no % 2 else chosen[::-1]
                for target in order:
                    run = _run_target(scenario, target, origin, options, round_no, workroot, out)
                    runs.append(run)
    return runs
