"""The HDR histogram layout every latency histogram uses: 1 µs to 60 s, 3 significant digits.

Workers do not record into `hdrh.histogram.HdrHistogram` objects: its `record_value` costs
about 1.5 µs, more than the whole per-request budget. They keep sparse counts instead,
`{index: count}`, where `index` is HdrHistogram's counts-array index of the value
(`index_of`, a few integer operations; the layout is taken from an HdrHistogram of the
same range and precision). Sparse counts merge by adding dicts.

Percentiles, mean and deviation are computed here from the sparse counts, with
HdrHistogram's definitions (tests hold them equal to the package's): the package's own
functions walk every one of the 17,408 buckets in Python, tens of ms per histogram.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Iterator, Mapping, Sequence

from hdrh.histogram import HdrHistogram

LOWEST_US = 1
HIGHEST_US = 60_000_000
SIGNIFICANT_FIGURES = 3

Counts = Mapping[int, int]  # HdrHistogram counts-array index -> count

_LAYOUT = HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_FIGURES)
# With a lowest value of 1 the unit magnitude is 0, which `index_of` relies on.
SUB_BUCKET_MASK = _LAYOUT.sub_bucket_mask  # 2047
HALF_COUNT_MAGNITUDE = _LAYOUT.sub_bucket_half_count_magnitude  # 10
HALF_COUNT = _LAYOUT.sub_bucket_half_count  # 1024
BUCKET_COUNT = _LAYOUT.bucket_count  # 16
SUB_BUCKET_COUNT = _LAYOUT.sub_bucket_count  # 2048
COUNTS_LEN = _LAYOUT.counts_len  # 17408: every index is below


def clamp(us: int) -> int:
    return max(LOWEST_US, min(us, HIGHEST_US))


def index_of(us: int) -> int:
    """HdrHistogram's counts index for a value in µs (clamped into the tracked range).

    `record_request` (_core/tally.pyx) does this arithmetic in C; a test keeps the two in step.
    """
    us = clamp(us)
    bucket = (us | SUB_BUCKET_MASK).bit_length() - HALF_COUNT_MAGNITUDE - 1
    return ((bucket + 1) << HALF_COUNT_MAGNITUDE) + (us >> bucket) - HALF_COUNT


# HdrHistogram's get_value_from_index and friends, in integer arithmetic: they run once per
# bucket per histogram on every scrape, and the package's methods cost ~1 µs each.


def lowest_us(index: int) -> int:
    """The smallest value that lands on `index`."""
    bucket = (index >> HALF_COUNT_MAGNITUDE) - 1
    if bucket <= 0:  # the first 2048 indices hold the values 0..2047, one each
        return index
    return ((index & (HALF_COUNT - 1)) + HALF_COUNT) << bucket


def width_us(index: int) -> int:
    """How many values land on `index`."""
    bucket = (index >> HALF_COUNT_MAGNITUDE) - 1
    return 1 << bucket if bucket > 0 else 1


def highest_us(index: int) -> int:
    """The largest value that lands on `index`."""
    return lowest_us(index) + width_us(index) - 1


def middle_us(index: int) -> int:
    """Where HdrHistogram places the values of a bucket for its mean and deviation."""
    return lowest_us(index) + (width_us(index) >> 1)


def recorded(counts: Counts) -> list[int]:
    """The indices that hold samples, ascending."""
    return sorted(index for index, n in counts.items() if n)


def max_us(counts: Counts) -> int:
    """The largest value recorded, as HdrHistogram reports it (its bucket's highest); 0 if none."""
    indices = recorded(counts)
    return highest_us(indices[-1]) if indices else 0


def total(counts: Counts) -> int:
    return sum(counts.values())


@functools.cache
def _middles() -> list[int]:
    """`middle_us` of every index, made on first use: by the supervisor, not the workers."""
    return [middle_us(index) for index in range(COUNTS_LEN)]


def sum_us(counts: Counts) -> int:
    """The sum of the recorded values, each taken at its bucket's middle (within 0.05%)."""
    return sum(map(operator.mul, map(_middles().__getitem__, counts), counts.values()))


def mean_us(counts: Counts) -> float:
    n = total(counts)
    return sum_us(counts) / n if n else 0.0


def stddev_us(counts: Counts) -> float:
    n = total(counts)
    if not n:
        return 0.0
    mean = sum_us(counts) / n
    return math.sqrt(sum((middle_us(i) - mean) ** 2 * c for i, c in counts.items()) / n)


def percentile_steps(counts: Counts, ticks_per_half_distance: int = 5) -> Iterator[tuple[int, float, int]]:
    """`(value, percentile, count up to it)` rows of a percentile distribution (`.hgrm`), at the
    percentiles Java HdrHistogram's PercentileIterator visits: `ticks_per_half_distance`
    steps to 50%, as many to 75%, to 87.5%, ... and a last row at 100%.

    (The hdrhistogram package's iterator leaves out the rounding down in the step size, so
    its rows land on 10%, 19%, 27.1%, ... and never on 50% or 99%.)
    """
    n = total(counts)
    if not n:
        return
    level = 0.0
    seen = 0
    for index in recorded(counts):
        seen += counts[index]
        while 100.0 * seen / n >= level:
            yield highest_us(index), level, seen
            if seen == n:
                break
            half_distances = int(math.log(100.0 / (100.0 - level)) / math.log(2))
            level += 100.0 / (ticks_per_half_distance * 2 ** (half_distances + 1))
    yield max_us(counts), 100.0, n


def percentiles_us(counts: Counts, percentiles: Sequence[float]) -> list[int]:
    """Values at the given percentiles (ascending), as `HdrHistogram.get_value_at_percentile`
    reports them: the highest value of the bucket holding the target count. Walks the sparse
    buckets once instead of the whole counts array."""
    n = total(counts)
    if not n:
        return [0] * len(percentiles)
    targets = iter([max(int(p * n / 100 + 0.5), 1) for p in percentiles])
    target = next(targets)
    values = []
    seen = 0
    for index in recorded(counts):
        seen += counts[index]
        while target is not None and seen >= target:
            values.append(highest_us(index))
            target = next(targets, None)
    return values
