"""python -m bench SCENARIO [--targets ...] [--duration S] [--warmup S] [--rounds N]
[--rate RPS --loadgen-procs N] [--no-pin] ..."""

import argparse
import signal
import sys
from datetime import datetime
from pathlib import Path

from . import BenchError, hdr, report, runner, targets, upstream
from .scenarios import ALL as SCENARIOS

_RESULTS = Path(__file__).resolve().parent / "results"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    scenario_list = "\n".join(f"  {s.name:<16} {s.summary}" for s in SCENARIOS.values())
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Side-by-side load tests of meshproxy and other proxies, each pinned to CPU 1.",
        epilog=f"scenarios:\n{scenario_list}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("scenario", choices=SCENARIOS, metavar="SCENARIO", help="one listed below")
    parser.add_argument("--targets",
                        help="comma-separated, in run order (default: "
                             f"{','.join(targets.DEFAULT)}; the scenario's own for "
                             "reload-under-load)")
    parser.add_argument("--duration", type=int, default=10, help="measured seconds per run")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up seconds per run (0: none)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds, run forward, reverse, forward, ... (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="meshproxy worker processes")
    parser.add_argument("--rate", type=float,
                        help="HTTP scenarios: open-loop load at this many req/s in all, latency "
                             "into HDR histograms (default: closed loop with wrk)")
    parser.add_argument("--loadgen-procs", type=int, default=2,
                        help="open-loop generator processes (default: %(default)s)")
    parser.add_argument("--connections", type=int, default=50,
                        help="connections: wrk -c and h2load -c, in all over the generator "
                             "processes, or gRPC calls in flight (default: %(default)s)")
    parser.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                        help="taskset the proxy to CPU 1 and everything else to CPU 0 "
                             "(default: on)")
    parser.add_argument("--out", type=Path,
                        help="results directory (default: bench/results/<timestamp>-<scenario>)")
    args = parser.parse_args(argv)
    scenario = SCENARIOS[args.scenario]
    args.targets = args.targets or ",".join(scenario.targets or targets.DEFAULT)
    unknown = set(args.targets.split(",")) - set(targets.ALL)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; known: {', '.join(targets.ALL)}")
    if args.duration < 1 or args.warmup < 0 or args.rounds < 1 or args.workers < 1:
        parser.error("--duration, --rounds and --workers must be >= 1, --warmup >= 0")
    if args.loadgen_procs < 1 or args.connections < args.loadgen_procs:
        parser.error("--loadgen-procs must be >= 1 and --connections >= --loadgen-procs")
    if scenario.needs_rate and args.rate is None:
        parser.error(f"{args.scenario} needs --rate (open-loop load)")
    if args.rate is not None:
        if args.rate <= 0:
            parser.error("--rate must be > 0")
        if not SCENARIOS[args.scenario].open_loop:
            parser.error(f"--rate does not apply to {args.scenario} (HTTP scenarios only)")
        if reason := hdr.missing():
            parser.error(f"--rate needs HDR histograms: {reason}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    # On SIGTERM unwind like Ctrl-C, so every started process is stopped by its `finally`.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    scenario = SCENARIOS[args.scenario]
    names = list(dict.fromkeys(args.targets.split(",")))
    skipped = {n: r for n in names if (r := targets.unavailable(targets.ALL[n], scenario.listener))}
    chosen = [targets.ALL[n] for n in names if n not in skipped]
    for name, reason in skipped.items():
        runner.progress(f"skip {name}: {reason}")
    if reason := upstream.missing(scenario.origin):
        runner.progress(f"cannot run {scenario.name}: {reason}")
        return 1
    mode = f"-rate{args.rate:g}" if args.rate else ""
    out = args.out or _RESULTS / f"{datetime.now():%Y%m%d-%H%M%S}-{scenario.name}{mode}"
    options = runner.Options(args.duration, args.warmup, args.rounds, args.workers, args.pin,
                             args.rate, args.loadgen_procs, args.connections)
    environment = runner.environment()
    try:
        runs = runner.run(scenario, chosen, options, out)
    except BenchError as e:
        runner.progress(f"error: {e}")
        return 1
    markdown = report.write(
        out, scenario=scenario, targets=names, skipped=skipped, runs=runs,
        options=vars(options), environment=environment,
    )
    print(markdown)
    runner.progress(f"results in {out}")
    return 1 if any(run.error for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
