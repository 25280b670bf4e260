"""The one percentile of the dev tools (numpy's default method), and a latency summary."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence


def percentile(values: Iterable[float], q: float) -> float:
    """The `q`-th percentile (0..100) by linear interpolation between closest ranks, as
    numpy's default method; NaN for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_summary(latencies: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/max/mean of `latencies`, in their unit (NaN when there are none)."""
    if not latencies:
        return {key: math.nan for key in ("p50", "p95", "p99", "max", "mean")}
    return {
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "p99": percentile(latencies, 99),
        "max": max(latencies),
        "mean": statistics.fmean(latencies),
    }
