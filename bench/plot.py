"""Latency by percentile, one line per target, like HdrHistogram's plotter: the x axis is
1/(1-percentile) on a log scale, so 90%, 99%, 99.9%, ... are evenly spaced and the tail gets
as much room as the median. Needs matplotlib (the [bench] extra); without it, no plot."""

from __future__ import annotations

from pathlib import Path

from . import hdr

_TICKS = (1, 10, 100, 1_000, 10_000, 100_000, 1_000_000)
_LABELS = ("0%", "90%", "99%", "99.9%", "99.99%", "99.999%", "99.9999%")


def latency_by_percentile(path: Path, distributions: dict[str, str], title: str) -> str:
    """Plot the `.hgrm` texts of `distributions` (target -> text) into `path` (PNG).
    Return "" on success, else why there is no plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedFormatter, FixedLocator
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]')"
    series = {}
    for target, text in distributions.items():
        rows = [(p, v) for p, v in hdr.parse_hgrm(text) if p < 1.0]
        top = max((v for _, v in hdr.parse_hgrm(text)), default=None)
        if rows:
            series[target] = ([1 / (1 - p) for p, _ in rows], [v for _, v in rows], top)
    if not series:
        return "no latency data to plot"
    fig, ax = plt.subplots(figsize=(10, 6), dpi=110)
    right = max(max(xs) for xs, _, _ in series.values())
    for target, (xs, ys, top) in series.items():
        (line,) = ax.plot(xs, ys, label=target, linewidth=1.6)
        ax.plot([xs[-1]], [top], marker="o", color=line.get_color(), markersize=4)
    lows = [ys[0] for _, ys, _ in series.values() if ys[0] > 0]
    highs = [top for _, _, top in series.values()]
    ax.set_xscale("log")
    ticks = [t for t in _TICKS if t <= right * 1.5] or [1]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FixedFormatter(_LABELS[: len(ticks)]))
    ax.xaxis.set_minor_locator(FixedLocator([]))
    ax.set_xlim(1, max(right, 10) * 1.2)
    log_y = bool(lows) and max(highs) / min(lows) > 50
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency, ms" + (" (log scale)" if log_y else ""))
    ax.set_title(title + "\n(dot: max)")
    ax.grid(True, which="major", alpha=0.35)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return ""
