"""The issue's targets, each met or not met from the figures (pure).

A target is decided on its median figure; `Verdict.noisy` says the range over repeats
reaches both sides of the threshold. A target that was not measured (a level left out, no
soak) says so instead of passing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from bench.figures import (
    TARGET_CLIENTS,
    ceiling,
    errors_total,
    figure,
    fmt_ms,
    fmt_num,
    fmt_pct,
    fmt_range,
    fmt_x,
    levels,
    lone_gaps_ms,
    on_off,
    plural,
    tail_ratios,
)
from bench.stats import median, ratio, spread

TARGET_CEILING = 0.90  # server at 64 clients / in-process ceiling
TARGET_OVER_OFF = 1.5  # batching / batching-off at 64 clients
TARGET_LONE_MS = 1.5  # lone-request p50 minus in-process single-call p50
TARGET_TAIL = 2.0  # p99 / p50 at 64 clients
TARGET_RSS_GROWTH_PCT = 5.0  # soak: end RSS over start RSS; allocator noise allowance
MAX_CLIENTS = 256


@dataclass
class Verdict:
    """One target checked against one figure.

    `met` is decided on the median figure, and is None when the figure was not measured.
    `noisy` says the range over repeats reaches both sides of the threshold: another run
    could well have given the other verdict.
    """

    target: str
    corpus: str
    value: str
    range: str
    threshold: str
    met: bool | None
    noisy: bool = False

    @property
    def label(self) -> str:
        label = {True: "met", False: "**not met**", None: "not measured"}[self.met]
        return f"{label} (within noise)" if self.noisy and self.met is not None else label


def _met(value: float, ok: bool) -> bool | None:
    return None if math.isnan(value) else ok


def straddles(low: float, high: float, threshold: float) -> bool:
    """Whether [low, high] holds values on both sides of `threshold`."""
    if math.isnan(low) or math.isnan(high):
        return False
    return min(low, high) < threshold < max(low, high)


def _never_below(results: dict[str, Any], corpus: str) -> Verdict:
    """Batching on at least as fast as off at every level both modes measured."""
    shared = sorted(
        set(levels(results, corpus, "batching")) & set(levels(results, corpus, "no-batching"))
    )
    per_level = [(c, *on_off(results, corpus, c)) for c in shared]
    kept = [item for item in per_level if not math.isnan(item[1])]
    if not kept:
        return Verdict(
            "batching never below batching off (lowest on / off over levels)",
            corpus,
            "-",
            "-",
            ">= 1.00x at every level",
            None,
        )
    clients, lowest, _, _ = min(kept, key=lambda item: item[1])
    worst = min(item[2] for item in kept)
    met = lowest >= 1.0
    failing = [item for item in kept if item[1] < 1.0]
    noisy = worst < 1.0 if met else all(item[3] >= 1.0 for item in failing)
    return Verdict(
        "batching never below batching off (lowest on / off over levels)",
        corpus,
        f"{fmt_x(lowest)} at {plural(clients)}",
        f"worst repeat {fmt_x(worst)}",
        ">= 1.00x at every level",
        met,
        noisy,
    )


def verdicts(results: dict[str, Any]) -> list[Verdict]:
    """Every target, per corpus (the soak once), computed from the figures."""
    out: list[Verdict] = []
    for corpus in results.get("corpora", {}):
        top, _ = ceiling(results, corpus)
        thr = figure(results, corpus, "batching", TARGET_CLIENTS, "embeddings_per_s")
        value, low, high = ratio(thr[0], top), ratio(thr[1], top), ratio(thr[2], top)
        out.append(
            Verdict(
                f"throughput at {TARGET_CLIENTS} clients vs in-process ceiling",
                corpus,
                fmt_x(value),
                fmt_range(low, high, fmt_x),
                f">= {TARGET_CEILING:.2f}x",
                _met(value, value >= TARGET_CEILING),
                straddles(low, high, TARGET_CEILING),
            )
        )
        mid, worst, best = on_off(results, corpus, TARGET_CLIENTS)
        out.append(
            Verdict(
                f"batching on / off at {TARGET_CLIENTS} clients",
                corpus,
                fmt_x(mid),
                fmt_range(worst, best, fmt_x),
                f">= {TARGET_OVER_OFF:.1f}x",
                _met(mid, mid >= TARGET_OVER_OFF),
                straddles(worst, best, TARGET_OVER_OFF),
            )
        )
        out.append(_never_below(results, corpus))
        gaps = lone_gaps_ms(results, corpus)
        gap, (low, high) = median(gaps), spread(gaps)
        out.append(
            Verdict(
                "lone request p50 minus in-process single call p50",
                corpus,
                fmt_ms(gap),
                fmt_range(low, high, fmt_ms),
                f"<= {TARGET_LONE_MS} ms",
                _met(gap, gap <= TARGET_LONE_MS),
                straddles(low, high, TARGET_LONE_MS),
            )
        )
        top_level = max(levels(results, corpus, "batching"), default=0)
        errors = errors_total(results, corpus)
        out.append(
            Verdict(
                f"no errors up to {MAX_CLIENTS} clients (every server run)",
                corpus,
                str(errors),
                f"largest level {top_level}",
                "0",
                False if errors else (True if top_level >= MAX_CLIENTS else None),
            )
        )
        tails = tail_ratios(results, corpus)
        tail, (low, high) = median(tails), spread(tails)
        out.append(
            Verdict(
                f"p99 / p50 at {TARGET_CLIENTS} clients",
                corpus,
                fmt_x(tail),
                fmt_range(low, high, fmt_x),
                f"<= {TARGET_TAIL:.1f}x",
                _met(tail, tail <= TARGET_TAIL),
                straddles(low, high, TARGET_TAIL),
            )
        )
    soak = results.get("soak")
    growth = math.nan if not soak else float(soak["growth_pct"])
    out.append(
        Verdict(
            "no RSS growth over the soak (end vs start)",
            soak["corpus"] if soak else "-",
            fmt_pct(growth),
            f"max {fmt_num(soak['max_mb'], 0)} MiB" if soak else "-",
            f"<= {TARGET_RSS_GROWTH_PCT:g}%",
            _met(growth, growth <= TARGET_RSS_GROWTH_PCT),
        )
    )
    return out
