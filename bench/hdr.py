"""HDR latency histograms (the `hdrhistogram` package): building them from counts, merging,
and writing HdrHistogram's percentile-distribution text (`.hgrm`).

Values are microseconds from 1 µs to 60 s at 3 significant digits (0.1% resolution);
`.hgrm` files are written in milliseconds, as HdrHistogram's own tools and plotter expect.
Without the package, closed-loop runs still report wrk's percentiles and open-loop runs
cannot be made; `missing()` says so.
"""

from __future__ import annotations

import collections
import io
from collections.abc import Iterable
from typing import TYPE_CHECKING

try:
    from hdrh.histogram import HdrHistogram
except ImportError:  # the [bench] extra is not installed
    HdrHistogram = None

if TYPE_CHECKING:
    from hdrh.histogram import HdrHistogram as Histogram
else:
    Histogram = object

LOWEST_US = 1
HIGHEST_US = 60_000_000
DIGITS = 3

# The percentiles each report row shows, and their metric names.
PERCENTILES = (("p50_ms", 50.0), ("p90_ms", 90.0), ("p99_ms", 99.0), ("p99.9_ms", 99.9),
               ("p99.99_ms", 99.99))


def missing() -> str | None:
    if HdrHistogram is None:
        return "the hdrhistogram package is not installed (pip install -e '.[bench]')"
    return None


def new() -> Histogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, DIGITS)


def clamp(value: int) -> int:
    return min(max(int(value), LOWEST_US), HIGHEST_US)


def of_counts(pairs: Iterable[tuple[int, int]]) -> Histogram:
    """A histogram of (microseconds, count) pairs."""
    hist = new()
    for value, count in pairs:
        if count > 0:
            hist.record_value(clamp(value), int(count))
    return hist


def of_values(values_us: Iterable[int]) -> Histogram:
    """A histogram of integer microsecond values (counted first, then recorded once each)."""
    return of_counts(collections.Counter(values_us).items())


def encode(hist: Histogram) -> str:
    """HdrHistogram's compressed base64 form (what its tools call a histogram log entry)."""
    return hist.encode().decode("ascii")


def decode(text: str) -> Histogram:
    return HdrHistogram.decode(text.encode("ascii"))


def merged(encoded: Iterable[str]) -> Histogram:
    total = new()
    for text in encoded:
        total.add(decode(text))
    return total


def summary(hist: Histogram) -> dict[str, float]:
    """p50/p90/p99/p99.9/p99.99 and max, in ms, and the count."""
    figures = {key: hist.get_value_at_percentile(p) / 1000 for key, p in PERCENTILES}
    figures["max_ms"] = hist.get_max_value() / 1000
    figures["count"] = float(hist.get_total_count())
    return figures


def hgrm(hist: Histogram) -> str:
    """The percentile distribution in HdrHistogram's text format, values in ms."""
    out = io.BytesIO()
    hist.output_percentile_distribution(out, 1000)
    text = out.getvalue().decode()
    # hdrh scales Mean but not StdDeviation by the unit ratio; write the footer line right.
    mean, stddev = hist.get_mean_value() / 1000, hist.get_stddev() / 1000
    lines = [
        f"#[Mean    = {mean:12.3f}, StdDeviation   = {stddev:12.3f}]"
        if line.startswith("#[Mean") else line
        for line in text.splitlines()
    ]
    return "\n".join(lines) + "\n"


def parse_hgrm(text: str) -> list[tuple[float, float]]:
    """(percentile as a fraction, value in ms) rows of an `.hgrm` text."""
    rows = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3 and not line.startswith("#"):
            try:
                rows.append((float(fields[1]), float(fields[0])))
            except ValueError:
                continue  # the header line
    return rows
