"""The demo's report: HDR latency (`.hgrm` and a PNG plot), the summary, the mesh's files.

    files = write_report(directory, timeline, summary, mesh_files)

- `latency.hgrm`: every request as the load generator saw it (from when it was due to the
  last byte of the answer), in HdrHistogram's percentile distribution format (values in ms),
  which HdrHistogram's plotters read; `latency-v1.hgrm`, `latency-v2.hgrm`: the requests
  each backend version answered.
- `latency.png`: those distributions on HdrHistogram's percentile axis (needs matplotlib,
  the [bench] extra; without it the PNG is skipped and the summary says so).
- `summary.json`: what `summarize` returns, machine-readable.
- `mesh/`: each sidecar's config as the demo wrote it, and every process's log.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..telemetry.hdr import percentile_steps
from ..telemetry.latency import hgrm
from .tally import Timeline, format_split, split_error

_TICKS = (1, 10, 100, 1_000, 10_000, 100_000)
_LABELS = ("0%", "90%", "99%", "99.9%", "99.99%", "99.999%")
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p999": 99.9}


def latency_summary(counts: Mapping[int, int]) -> dict[str, float] | None:
    from .tally import Tally

    tally = Tally(requests=sum(counts.values()), latency=dict(counts))
    values = tally.percentiles_ms(list(PERCENTILES.values()))
    if values is None:
        return None
    return {**dict(zip(PERCENTILES, values, strict=True)), "max": tally.max_ms}


def summarize(timeline: Timeline, *, threshold: float, rate: float, mode: str, mtls: Mapping[str, Any],
              probes: list[Mapping[str, Any]], rotations: Mapping[str, int],
              frontend: Mapping[str, Any], split_tolerance: float) -> dict[str, Any]:
    """The run in numbers. `passed` (the exit status of `--duration`) is the success rate
    reaching `threshold`; `checks_passed` adds every mesh hop over mTLS, every forbidden call
    refused and the first phase's split within `split_tolerance` points of its weights."""
    total = timeline.total
    phases = []
    for phase in timeline.phases:
        tally = phase.tally
        if not tally.requests and phase is not timeline.phase:
            continue  # changed again before a request completed
        observed = tally.split()
        phases.append({
            "name": phase.name, "start_s": round(phase.start, 2),
            "end_s": None if phase.end is None else round(phase.end, 2),
            "requests": tally.requests, "success_rate": tally.success_rate,
            "weights": phase.weights, "split": observed,
            "split_error_points": None if observed is None else round(split_error(observed, phase.weights), 2),
        })
    success = total.success_rate or 0.0
    refused = bool(probes) and all(probe["refused"] for probe in probes)
    # The split is judged on the first phase: with --duration, the configured 90/10 before
    # anything was broken or shifted.
    steady = phases[0]
    split_ok = steady["split_error_points"] is not None and steady["split_error_points"] <= split_tolerance
    passed = success >= threshold
    return {
        "mode": mode,
        "rate": rate,
        "duration_s": round(timeline.phase.end or 0.0, 2),
        "requests": total.requests,
        "ok": total.ok,
        "success_rate": success,
        "threshold": threshold,
        "failures": dict(total.failures),
        "split": total.split(),
        "steady_split": steady["split"],
        "steady_split_ok": split_ok,
        "split_tolerance_points": split_tolerance,
        "phases": phases,
        "latency_ms": latency_summary(total.latency),
        "mtls": dict(mtls),
        "forbidden_calls": list(probes),
        "forbidden_refused": refused,
        "rotations": dict(rotations),
        "frontend": dict(frontend),
        "passed": passed,
        "checks_passed": passed and bool(mtls.get("every_hop")) and refused and split_ok,
    }


def summary_text(summary: Mapping[str, Any]) -> str:
    """The summary as a few lines for a person."""
    lines = [(f"meshproxy demo ({summary['mode']}): {summary['requests']} requests in "
              f"{summary['duration_s']:.0f}s at {summary['rate']:g} req/s")]
    lines.append(f"  success rate   {summary['success_rate'] * 100:.2f}% "
                 f"(threshold {summary['threshold'] * 100:.0f}%)"
                 + (f", failures: {summary['failures']}" if summary["failures"] else ""))
    latency = summary.get("latency_ms")
    if latency:
        lines.append("  latency ms     " + "  ".join(f"{k} {v:.2f}" for k, v in latency.items()))
    for phase in summary["phases"]:
        end = "end" if phase["end_s"] is None else f"{phase['end_s']:.0f}s"
        weights = "/".join(str(w) for w in phase["weights"].values())
        rate = "-" if phase["success_rate"] is None else f"{phase['success_rate'] * 100:.2f}%"
        lines.append(f"  {phase['start_s']:>4.0f}s-{end:<5} {phase['name']:<24} split v1/v2 "
                     f"{format_split(phase['split']):<11} (configured {weights}), ok {rate}")
    mtls = summary["mtls"]
    lines.append(f"  mTLS           {'every mesh hop' if mtls.get('every_hop') else 'NOT every hop'}: "
                 f"{mtls.get('caller_verified_as_frontend', 0)}/{mtls.get('backend_answers', 0)} backend "
                 f"answers saw the caller as the frontend's SVID; handshakes {mtls.get('tls_handshakes_ok')}")
    for probe in summary["forbidden_calls"]:
        verdict = "refused" if probe["refused"] else "NOT REFUSED"
        lines.append(f"  policy         {probe['caller']} -> {probe['target']}: {probe['outcome']} ({verdict})")
    if summary["rotations"]:
        lines.append("  rotations      " + ", ".join(f"{k} {v}" for k, v in summary["rotations"].items()))
    frontend = summary.get("frontend") or {}
    if frontend:
        lines.append(f"  resilience     retries {frontend.get('retries', 0):.0f}, backend-v2 ejections "
                     f"{frontend.get('v2_ejections', 0):.0f}")
    lines.append(f"  result         {'PASSED' if summary['passed'] else 'FAILED'}")
    return "\n".join(lines)


def plot(path: Path, distributions: Mapping[str, Mapping[int, int]], title: str) -> str:
    """Latency by percentile, one line per distribution, on HdrHistogram's axis (1/(1-p),
    log scale). Returns "" when written, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedFormatter, FixedLocator
    except ImportError:
        return "matplotlib is not installed (pip install 'meshproxy[bench]'): no PNG"
    series = {}
    for name, counts in distributions.items():
        rows = [(p / 100, us / 1000) for us, p, _ in percentile_steps(counts) if p < 100.0]
        if rows:
            top = max(us for us, _, _ in percentile_steps(counts)) / 1000
            series[name] = ([1 / (1 - p) for p, _ in rows], [v for _, v in rows], top)
    if not series:
        return "no latency recorded: no PNG"
    fig, ax = plt.subplots(figsize=(10, 6), dpi=100)
    right = max(max(xs) for xs, _, _ in series.values())
    for name, (xs, ys, top) in series.items():
        (line,) = ax.plot(xs, ys, label=name, linewidth=1.6)
        ax.plot([xs[-1]], [top], marker="o", color=line.get_color(), markersize=4)
    ax.set_xscale("log")
    ticks = [t for t in _TICKS if t <= right * 1.5] or [1]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FixedFormatter(_LABELS[: len(ticks)]))
    ax.xaxis.set_minor_locator(FixedLocator([]))
    ax.set_xlim(1, max(right, 10) * 1.2)
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency, ms")
    ax.set_title(title + "\n(dot: max)")
    ax.grid(True, which="major", alpha=0.35)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return ""


def save_mesh_files(directory: Path, files: list[Path]) -> Path:
    """Copy the sidecars' configs and the processes' logs into `directory`/mesh."""
    mesh_dir = directory / "mesh"
    mesh_dir.mkdir(parents=True, exist_ok=True)
    for path in files:
        if path.is_file():
            shutil.copyfile(path, mesh_dir / path.name)
    return mesh_dir


def write_report(directory: Path, timeline: Timeline, summary: dict[str, Any],
                 mesh_files: list[Path]) -> dict[str, str]:
    """Everything into `directory` (made if missing); returns file name -> what it is."""
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    total = timeline.total
    distributions = {"all requests": total.latency}
    (directory / "latency.hgrm").write_text(hgrm(total.latency))
    written["latency.hgrm"] = "every request, as clients saw it (HdrHistogram percentile text, ms)"
    for version in sorted(total.by_version):
        name = f"latency-{version}.hgrm"
        (directory / name).write_text(hgrm(total.by_version[version]))
        written[name] = f"the requests backend {version} answered"
        distributions[f"answered by backend {version}"] = total.by_version[version]
    note = plot(directory / "latency.png", distributions,
                f"meshproxy demo: {total.requests} requests, frontend -> backend over mTLS")
    if note:
        summary["png"] = note
    else:
        written["latency.png"] = "the .hgrm distributions plotted"
    save_mesh_files(directory, mesh_files)
    written["mesh/"] = "each sidecar's config and every process's log"
    summary["report_dir"] = str(directory)
    summary["files"] = sorted(written)
    (directory / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    written["summary.json"] = "this run in numbers"
    return written
