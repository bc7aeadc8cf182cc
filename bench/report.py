"""Results: ratios within each round, medians over rounds, HDR histograms pooled over rounds,
summary.json, report.md, one .hgrm per target and a latency-by-percentile plot."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import hdr, plot

if TYPE_CHECKING:
    from .scenarios import Scenario


_INTERFERENCE = 0.15  # cores of CPU 1 busy beyond the proxy's own CPU that get a note
_LOAD_BOUND = 0.95  # CPU 0 busier than this: the load side (generator + origin) is the limit


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
    histogram: str | None = None  # latency (µs), HdrHistogram's compressed base64 form


# The targets other targets are compared with: the headline figure against each (x_<ref>), and
# the proxy cost against each that is a proxy (cost_x_<ref>). The report shows the columns of
# those a run measured.
REFERENCES = ("nginx", "haproxy", "nghttpx")
_RATIOS = (  # (name, reference target, metric: "primary" or a key)
    ("x_direct", "direct", "primary"),
    *((f"x_{ref}", ref, "primary") for ref in REFERENCES),
    *((f"cost_x_{ref}", ref, "cost_us") for ref in REFERENCES),
)
# Latency figures and failure counts: their own table when there is no HDR histogram.
LATENCY_KEYS = frozenset({"p50_ms", "p90_ms", "p99_ms", "p99.9_ms", "min_ms", "mean_ms",
                          "sd_ms", "max_ms"})
COUNT_KEYS = ("errors", "non_2xx", "failed", "errored")  # totals over rounds with the histograms


def add_ratios(runs: list[Run], primary: str) -> None:
    """Set x_direct and x_<ref> for each of REFERENCES (on `primary`) and cost_x_<ref> (on
    cost_us), each against the reference measured in the same round, so drift between rounds
    cancels."""
    by_round: dict[int, dict[str, Run]] = defaultdict(dict)
    for run in runs:
        by_round[run.round][run.target] = run
    for round_runs in by_round.values():
        for ratio, reference, metric in _RATIOS:
            metric = primary if metric == "primary" else metric
            ref = round_runs.get(reference)
            if ref is None or not ref.metrics.get(metric):
                continue
            for run in round_runs.values():
                if metric in run.metrics:
                    run.metrics[ratio] = run.metrics[metric] / ref.metrics[metric]


def aggregate(runs: list[Run]) -> dict[str, dict[str, dict[str, float]]]:
    """Per target and metric: median, min, max, sum and n over the successful rounds."""
    values: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        for key, value in run.metrics.items():
            values[run.target][key].append(value)
    return {
        target: {
            key: {"median": statistics.median(v), "min": min(v), "max": max(v), "sum": sum(v),
                  "n": len(v)}
            for key, v in metrics.items()
        }
        for target, metrics in values.items()
    }


def pooled_histograms(runs: list[Run]) -> dict[str, hdr.Histogram]:
    """Per target, the latency histograms of all its rounds added together."""
    encoded: dict[str, list[str]] = defaultdict(list)
    for run in runs:
        if run.histogram:
            encoded[run.target].append(run.histogram)
    return {target: hdr.merged(texts) for target, texts in encoded.items()}


# -- markdown ----------------------------------------------------------------------------------


def _cell(stats: dict[str, dict[str, float]], column: Column, stat: str = "median") -> str:
    value = stats.get(column.key)
    return "–" if value is None else format(value[stat], column.fmt)


def _table(first: list[str], columns: list[Column], targets: list[str], skipped: dict,
           agg: dict, primary: Column | None, stat: str = "median") -> list[str]:
    """A markdown table: per target, optionally the headline figure with its spread, then
    `columns` (their `stat` over rounds)."""
    headers = [*first, *(c.header for c in columns)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for target in targets:
        stats = agg.get(target)
        if stats is None or (primary and primary.key not in stats):
            status = "skipped" if target in skipped else "failed"
            lines.append(f"| {target} | {status} |" + " |" * (len(headers) - 2))
            continue
        cells = [target]
        if primary:
            p = stats[primary.key]
            cells += [f"**{p['median']:{primary.fmt}}**",
                      f"{p['min']:{primary.fmt}}–{p['max']:{primary.fmt}} ({p['n']})"]
        lines.append("| " + " | ".join(cells + [_cell(stats, c, stat) for c in columns]) + " |")
    return lines


def _hdr_table(targets: list[str], pooled: dict[str, hdr.Histogram], files: dict[str, str],
               agg: dict, counts: list[Column]) -> list[str]:
    """Pooled percentiles per target, and the totals over rounds of the `counts` columns."""
    headers = ["target", "samples", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "p99.99 ms",
               "max ms", *(c.header for c in counts), "distribution"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for target in targets:
        if target not in pooled:
            continue
        s = hdr.summary(pooled[target])
        stats = agg.get(target, {})
        cells = [target, f"{s['count']:,.0f}",
                 *(f"{s[k]:.3f}" for k in ("p50_ms", "p90_ms", "p99_ms", "p99.9_ms",
                                           "p99.99_ms")),
                 f"{s['max_ms']:.2f}",
                 *(format(stats[c.key]["sum"] if c.key in stats else 0, c.fmt) for c in counts),
                 f"[{files[target]}]({files[target]})"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _notes(scenario: Scenario, skipped: dict[str, str], runs: list[Run], env: dict,
           options: dict[str, Any]) -> list[str]:
    cost = f"µs/{scenario.cost_unit}"
    notes = [
        ("Medians over rounds, (n) = successful rounds. Ratios are taken within a round, "
         "then the median."),
        ("Proxy CPU: utime+stime of the proxy's whole process tree (workers, forked and reaped "
         f"children included) over the measured window, from /proc; proxy {cost} = that CPU time "
         "÷ the work the load tool completed. Peak RSS: the largest sum of VmHWM over the tree's "
         "live processes, sampled every 0.5 s in the window."),
    ]
    if options.get("rate"):
        notes.append(
            f"Open loop: {options['rate']:,.0f} req/s in all from {options['loadgen_procs']} "
            f"generator processes over {options['connections']} kept-alive connections "
            "(a new one per request for Connection: close); latency runs from each request's "
            "intended send time to the last byte of its response, so a stall counts in every "
            "request scheduled during it. Lag = how late a generator noticed a request was due "
            "(its own contribution to latency); queued = share of requests that found every "
            "connection of their process busy; unsent = requests still waiting when the run "
            "ended."
        )
    elif scenario.open_loop:
        notes.append(
            "Closed loop (wrk): latency percentiles come from wrk's own histogram, which includes "
            "wrk's adjustment for coordinated omission; with a fixed number of connections a "
            "slow target gets fewer requests instead of longer queues. Use --rate for "
            "open-loop latency."
        )
    notes += scenario.notes
    reloading: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        if "reloads" in run.metrics:
            reloading[run.target].append(run)
    for target, target_runs in reloading.items():
        applied = sum(run.metrics["reloads"] for run in target_runs)
        failed = sum(run.metrics["reloads_failed"] for run in target_runs)
        slowest = max(run.metrics.get("reload_put_max_ms", 0.0) for run in target_runs)
        notes.append(
            f"Reloads, {target}: a thread of the harness (CPU 0) PUT a changed config to "
            "meshproxy's admin `/config` every second of the measured window (a second route "
            "`reload-k` added ahead of the catch-all, k = 1, 2, …); over "
            f"{len(target_runs)} run(s), {applied:,.0f} applied (200, `changed: true`, a new "
            f"version) and {failed:,.0f} failed; the slowest PUT took {slowest:.1f} ms. The "
            "proxy CPU includes the work of applying them."
        )
    notes += [f"Skipped {name}: {reason}" for name, reason in skipped.items()]
    busy = [
        f"{run.target} r{run.round} {other:.2f}"
        for run in runs
        if (other := run.metrics.get("proxy_core_busy", 0.0) - run.metrics.get("proxy_cores", 0.0)
            - run.metrics.get("proxy_core_irq", 0.0)) > _INTERFERENCE
    ]
    if busy and options.get("pin", True):
        notes.append(
            "CPU 1 busy beyond the proxy's own CPU and interrupt/softirq work (cores; other "
            "processes ran on the proxy's core, so treat these runs with care; for `direct` "
            f"nothing of the suite runs there): {', '.join(busy)}."
        )
    crowded = [
        f"{run.target} r{run.round} {other:.2f}"
        for run in runs
        if (other := run.metrics.get("load_core_busy", 0.0) - run.metrics.get("load_core_irq", 0.0)
            - run.metrics.get("loadgen_cores", 0.0) - run.metrics.get("origin_cores", 0.0))
        > _INTERFERENCE
    ]
    if crowded and options.get("pin", True):
        notes.append(
            "CPU 0 busy beyond the load generator, the origin and interrupt/softirq work (cores; "
            "other processes took time from the load side, which then sends less or later): "
            f"{', '.join(crowded)}."
        )
    bound = [
        f"{run.target} r{run.round} {run.metrics['load_core_busy']:.2f}"
        for run in runs
        if run.metrics.get("load_core_busy", 0.0) > _LOAD_BOUND
    ]
    if bound and options.get("pin", True):
        notes.append(
            "CPU 0 (load generator + origin) was saturated, so these figures are load-side "
            f"bound and the cost columns are the comparison to use: {', '.join(bound)}."
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


def _columns(scenario: Scenario, open_loop: bool, measured: list[str]) -> tuple[
        list[Column], list[Column], list[Column]]:
    """The columns of the throughput/cost table, the latency table (medians over rounds, used
    when there are no histograms) and the load-side table. Ratio columns appear for the
    references among the `measured` targets."""
    cost = f"µs/{scenario.cost_unit}"
    latency_keys = LATENCY_KEYS | set(COUNT_KEYS)
    extra = [c for c in scenario.columns if c.key not in latency_keys]
    latency = [c for c in scenario.columns if c.key in latency_keys]
    references = [ref for ref in REFERENCES if ref in measured]
    main = [*extra]
    if open_loop:
        main.insert(0, Column("target req/s", "rate", ",.0f"))
    main += [
        Column("proxy CPU (cores)", "proxy_cores", ".2f"),
        Column(f"proxy {cost}", "cost_us", ",.1f"),
        Column("peak RSS MiB", "peak_rss_mib", ".1f"),
    ]
    if not open_loop:
        main += [Column(f"×{ref}", f"x_{ref}", ".2f") for ref in references]
    main += [Column(f"{cost} ×{ref}", f"cost_x_{ref}", ".2f") for ref in references]
    if not open_loop and "direct" in measured:
        main.append(Column("×direct", "x_direct", ".2f"))
    side = [
        Column("origin CPU (cores)", "origin_cores", ".2f"),
        Column("load generator CPU (cores)", "loadgen_cores", ".2f"),
        Column("CPU 0 busy (cores)", "load_core_busy", ".2f"),
        Column("CPU 1 busy (cores)", "proxy_core_busy", ".2f"),
        Column("CPU 1 irq+softirq (cores)", "proxy_core_irq", ".2f"),
    ]
    if open_loop:
        side += [
            Column("generator µs/req", "loadgen_us", ".1f"),
            Column("lag p99 ms", "lag_p99_ms", ".3f"),
            Column("lag max ms", "lag_max_ms", ".2f"),
            Column("queued", "queued", ".2%"),
            Column("unsent", "unsent", ",.0f"),
        ]
    return main, latency, side


def write(
    out: Path,
    *,
    scenario: Scenario,
    targets: list[str],
    skipped: dict[str, str],
    runs: list[Run],
    options: dict[str, Any],
    environment: dict[str, Any],
) -> str:
    """Write summary.json, report.md, <target>.hgrm and latency.png into `out`; return the
    markdown."""
    add_ratios(runs, scenario.primary.key)
    agg = aggregate(runs)
    pooled = pooled_histograms(runs)
    files = {}
    for target, hist in pooled.items():
        files[target] = f"{target}.hgrm"
        (out / files[target]).write_text(hdr.hgrm(hist))
    open_loop = bool(options.get("rate"))
    plot_note = plot.latency_by_percentile(
        out / "latency.png", {t: (out / files[t]).read_text() for t in targets if t in files},
        title=f"{scenario.name}: "
        + (f"open loop, {options['rate']:,.0f} req/s" if open_loop else "closed loop (wrk)"),
    ) if files else "no latency histograms"
    # The load as the targets under test got it (`direct` may get a variant: h2load --h1).
    commands = [run.command for run in runs if run.command and run.target != "direct"]
    command = next(iter(commands or [run.command for run in runs if run.command]), "")
    summary = {
        "scenario": scenario.name,
        "summary": scenario.summary,
        "options": options,
        "environment": environment,
        "load_command": command,
        "targets": targets,
        "skipped": skipped,
        "aggregate": agg,
        "latency_pooled": {t: hdr.summary(h) for t, h in pooled.items()},
        "runs": [asdict(run) for run in runs],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    main, latency, side = _columns(scenario, open_loop,
                                   [t for t in targets if t not in skipped])
    primary = scenario.primary
    if open_loop:
        primary = Column("achieved req/s", "rps", ",.0f")
        main = [c for c in main if c.key != "rps"]
    order = " (forward, reverse, …)" if options["rounds"] > 1 else ""
    pin = ("each proxy alone on CPU 1" if options.get("pin", True)
           else "nothing pinned (--no-pin)")
    lines = [
        f"# {scenario.name}: {scenario.summary}",
        "",
        (f"{environment['started']}; {options['rounds']} round(s){order}, "
         f"{options['warmup']} s warm-up + {options['duration']} s measured per run; "
         f"meshproxy workers: {options['workers']}."),
        f"Load: `{command}` on CPU 0 with the origin; {pin}.",
        "",
        "## Throughput and proxy cost",
        "",
        *_table(["target", f"{primary.header} median", "min–max"], main, targets, skipped, agg,
                primary),
        "",
    ]
    counts = [c for c in latency if c.key in COUNT_KEYS]
    unit = {"req": "requests"}.get(scenario.cost_unit, f"{scenario.cost_unit}s")
    if pooled:
        lines += [
            "## Latency (HDR histograms, all rounds pooled)",
            "",
            *_hdr_table(targets, pooled, files, agg, counts),
            "",
            (f"No plot: {plot_note}. " if plot_note else "Plot: [latency.png](latency.png). ")
            + (f"{', '.join(c.header for c in counts)}: totals over the rounds. " if counts
               else "")
            + f"Samples = {unit} measured"
            + (", plus the samples wrk adds for its coordinated-omission adjustment."
               if scenario.open_loop and not open_loop else f" (completed {unit})."),
            "",
        ]
    elif latency:
        lines += ["## Latency (medians over rounds)", "",
                  *_table(["target"], latency, targets, skipped, agg, None), ""]
    lines += [
        "## Load side",
        "",
        *_table(["target"], side, targets, skipped, agg, None),
        "",
        "## Notes",
        "",
        *_notes(scenario, skipped, runs, environment, options),
        "",
    ]
    markdown = "\n".join(lines)
    (out / "report.md").write_text(markdown)
    return markdown
