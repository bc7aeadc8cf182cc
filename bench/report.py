"""Results: ratios within each round, medians over rounds, summary.json and report.md."""

import json
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .scenarios import Scenario


_INTERFERENCE = 0.15  # cores of CPU 1 busy beyond the proxy's own CPU that get a note


@dataclass(frozen=True)
class Column:
    header: str
    key: str  # metric name in Run.metrics
    fmt: str  # format spec for the value


@dataclass
class Run:
    """One measured window of one target in one round."""

    round: int
    target: str
    metrics: dict[str, float] = field(default_factory=dict)
    command: str = ""
    error: str | None = None


def add_ratios(runs: list[Run], primary: str) -> None:
    """Set x_direct, x_haproxy (on `primary`) and cost_x_haproxy (on cost_us), each against the
    reference measured in the same round, so drift between rounds cancels."""
    by_round: dict[int, dict[str, Run]] = defaultdict(dict)
    for run in runs:
        by_round[run.round][run.target] = run
    for round_runs in by_round.values():
        for ratio, reference, metric in (
            ("x_direct", "direct", primary),
            ("x_haproxy", "haproxy", primary),
            ("cost_x_haproxy", "haproxy", "cost_us"),
        ):
            ref = round_runs.get(reference)
            if ref is None or not ref.metrics.get(metric):
                continue
            for run in round_runs.values():
                if metric in run.metrics:
                    run.metrics[ratio] = run.metrics[metric] / ref.metrics[metric]


def aggregate(runs: list[Run]) -> dict[str, dict[str, dict[str, float]]]:
    """Per target and metric: median, min, max and n over the successful rounds."""
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for key, value in run.metrics.items():
            values[run.target][key].append(value)
    return {
        target: {
            key: {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}
            for key, v in metrics.items()
        }
        for target, metrics in values.items()
    }


def _cell(stats: dict[str, dict[str, float]], column: Column) -> str:
    stat = stats.get(column.key)
    return "–" if stat is None else format(stat["median"], column.fmt)


def _table(
    primary: Column, columns: list[Column], targets: list[str], skipped: dict, agg: dict
) -> list[str]:
    headers = ["target", f"{primary.header} median", "min–max", *(c.header for c in columns)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for target in targets:
        stats = agg.get(target)
        if stats is None or primary.key not in stats:
            status = "skipped" if target in skipped else "failed"
            lines.append(f"| {target} | {status} |" + " |" * (len(headers) - 2))
            continue
        p = stats[primary.key]
        spread = f"{p['min']:{primary.fmt}}–{p['max']:{primary.fmt}} ({p['n']})"
        cells = [target, f"**{p['median']:{primary.fmt}}**", spread]
        lines.append("| " + " | ".join(cells + [_cell(stats, c) for c in columns]) + " |")
    return lines


def _notes(scenario: "Scenario", skipped: dict[str, str], runs: list[Run], env: dict) -> list[str]:
    cost = f"µs/{scenario.cost_unit}"
    notes = [
        "Medians over rounds, (n) = successful rounds. Ratios are taken within a round, "
        "then the median.",
        "Proxy CPU: utime+stime of the proxy's whole process tree (workers, forked and reaped "
        f"children included) over the measured window, from /proc; proxy {cost} = that CPU time "
        "÷ the work the load tool completed. Peak RSS: the largest sum of VmHWM over the tree's "
        "live processes, sampled every 0.5 s in the window.",
    ]
    notes += [f"Skipped {name}: {reason}" for name, reason in skipped.items()]
    busy = [
        f"{run.target} r{run.round} {other:.2f}"
        for run in runs
        if (other := run.metrics.get("proxy_core_busy", 0.0) - run.metrics.get("proxy_cores", 0.0))
        > _INTERFERENCE
    ]
    if busy:
        notes.append(
            "CPU 1 busy beyond the proxy's own CPU (cores; other processes or softirq work on "
            f"that core, so treat these runs with care): {', '.join(busy)}."
        )
    drops = [
        f"{run.target} r{run.round} {run.metrics['listen_drops']:,.0f}"
        for run in runs
        if run.metrics.get("listen_drops")
    ]
    if drops:
        notes.append(
            "Connections dropped on a full listen queue (TcpExt ListenDrops, system-wide; a SYN "
            f"dropped is retried after 1 s, which shows in the latency tail): {', '.join(drops)}."
        )
    notes += [
        f"Failed {run.target} (round {run.round}): {run.error.splitlines()[0]}"
        for run in runs
        if run.error
    ]
    versions = ", ".join(f"{tool} `{version}`" for tool, version in env["versions"].items())
    notes.append(f"Kernel {env['kernel']}, Python {env['python']}; {versions}.")
    return [f"- {note}" for note in notes]


def write(
    out: Path,
    *,
    scenario: "Scenario",
    targets: list[str],
    skipped: dict[str, str],
    runs: list[Run],
    options: dict[str, Any],
    environment: dict[str, Any],
) -> str:
    """Write summary.json and report.md into `out`; return the markdown."""
    add_ratios(runs, scenario.primary.key)
    agg = aggregate(runs)
    command = next((run.command for run in runs if run.command), "")
    summary = {
        "scenario": scenario.name,
        "summary": scenario.summary,
        "options": options,
        "environment": environment,
        "load_command": command,
        "targets": targets,
        "skipped": skipped,
        "aggregate": agg,
        "runs": [asdict(run) for run in runs],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    cost = f"µs/{scenario.cost_unit}"
    columns = [
        *scenario.columns,
        Column("proxy CPU (cores)", "proxy_cores", ".2f"),
        Column(f"proxy {cost}", "cost_us", ",.1f"),
        Column("peak RSS MiB", "peak_rss_mib", ".1f"),
        Column("origin CPU (cores)", "origin_cores", ".2f"),
        Column("×direct", "x_direct", ".2f"),
        Column("×haproxy", "x_haproxy", ".2f"),
        Column(f"{cost} ×haproxy", "cost_x_haproxy", ".2f"),
    ]
    order = " (forward, reverse, …)" if options["rounds"] > 1 else ""
    lines = [
        f"# {scenario.name}: {scenario.summary}",
        "",
        f"{environment['started']}; {options['rounds']} round(s){order}, "
        f"{options['warmup']} s warm-up + {options['duration']} s measured per run; "
        f"meshproxy workers: {options['workers']}.",
        f"Load: `{command}` on CPU 0 with the origin; each proxy alone on CPU 1.",
        "",
        *_table(scenario.primary, columns, targets, skipped, agg),
        "",
        *_notes(scenario, skipped, runs, environment),
        "",
    ]
    markdown = "\n".join(lines)
    (out / "report.md").write_text(markdown)
    return markdown
