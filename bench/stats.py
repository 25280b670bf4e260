"""Pure figure helpers of the harness and the report (the percentile is `devkit.stats`'s)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence


def finite(values: Iterable[float | None]) -> list[float]:
    """The values that are real numbers (None and NaN dropped)."""
    return [v for v in values if v is not None and not math.isnan(v)]


def median(values: Iterable[float | None]) -> float:
    """Median of the finite values; NaN when there are none."""
    kept = finite(values)
    return statistics.median(kept) if kept else math.nan


def spread(values: Iterable[float | None]) -> tuple[float, float]:
    """(min, max) of the finite values; (NaN, NaN) when there are none."""
    kept = finite(values)
    return (min(kept), max(kept)) if kept else (math.nan, math.nan)


def relative_spread(values: Iterable[float | None]) -> float:
    """(max - min) / median of the finite values: how far repeats disagree (NaN if unknown)."""
    kept = finite(values)
    if not kept:
        return math.nan
    mid = statistics.median(kept)
    return (max(kept) - min(kept)) / mid if mid else math.nan


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when either is unknown or the denominator is zero."""
    if math.isnan(numerator) or math.isnan(denominator) or denominator == 0:
        return math.nan
    return numerator / denominator


def rss_trend(samples_mb: Sequence[float], edge_share: float = 0.1) -> dict[str, float]:
    """Start, end and max of an RSS series and the growth from start to end in percent.

    Start and end are medians of the first and last `edge_share` of the samples (at least
    one each), so one allocator hiccup at either edge does not read as growth or shrinkage.
    """
    if not samples_mb:
        nan = math.nan
        return {"start_mb": nan, "end_mb": nan, "max_mb": nan, "growth_pct": nan}
    edge = max(1, round(len(samples_mb) * edge_share))
    start = statistics.median(samples_mb[:edge])
    end = statistics.median(samples_mb[-edge:])
    return {
        "start_mb": start,
        "end_mb": end,
        "max_mb": max(samples_mb),
        "growth_pct": (end - start) / start * 100 if start else math.nan,
    }
