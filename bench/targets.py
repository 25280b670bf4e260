"""The issue's targets, each met or not met from the figures (pure).

A target is decided on its median figure; `Verdict.noisy` says the range over repeats
reaches both sides of the threshold. A target that was not measured (a level left out, no
soak) says so instead of passing. Ratios between two servers are taken per repeat (the two
were measured minutes apart at most), and their median decides.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.figures import (
    MODE_NAMES,
    TARGET_CLIENTS,
    ceiling,
    errors_total,
    fmt_ms,
    fmt_num,
    fmt_pct,
    fmt_range,
    fmt_x,
    levels,
    lone_gaps_ms,
    paired,
    per_repeat,
    plural,
    tail_ratios,
)
from bench.stats import median, ratio, spread

TARGET_TAIL = 1.6  # packed p99 / p50 at 64 clients, mixed corpus
TAIL_CORPUS = "mixed"
TARGET_PACKED_OVER_PADDED = {16: 1.25, 64: 1.0}  # packed / padded texts/s, by clients
TARGET_LOOP_MS = 0.5  # packed server's event-loop CPU per request at 64 clients
TARGET_LONE_MS = 1.5  # lone-request p50 minus in-process single-call p50, same backend
TARGET_FILL = 0.9  # packed mean batch fill at 64 clients
TARGET_OVER_OFF = 1.5  # packed (batching on) / batching off at 64 clients
TARGET_RSS_GROWTH_PCT = 5.0  # soak: end RSS over start RSS; allocator noise allowance
MAX_CLIENTS = 256


@dataclass
class Verdict:
    """One target checked against one figure.

    `met` is decided on the median figure, and is None when the figure was not measured or
    the row only reports a figure (`info`). `noisy` says the range over repeats reaches both
    sides of the threshold: another run could well have given the other verdict.
    """

    target: str
    corpus: str
    value: str
    range: str
    threshold: str
    met: bool | None
    noisy: bool = False
    info: bool = False

    @property
    def label(self) -> str:
        if self.info:
            return "reported"
        label = {True: "met", False: "**not met**", None: "not measured"}[self.met]
        return f"{label} (within noise)" if self.noisy and self.met is not None else label


def _met(value: float, ok: bool) -> bool | None:
    return None if math.isnan(value) else ok


def straddles(low: float, high: float, threshold: float) -> bool:
    """Whether [low, high] holds values on both sides of `threshold`."""
    if math.isnan(low) or math.isnan(high):
        return False
    return min(low, high) < threshold < max(low, high)


def _check(
    target: str,
    corpus: str,
    values: list[float],
    threshold: float,
    fmt: Callable[[float], str],
    *,
    at_most: bool,
) -> Verdict:
    """A verdict on the median of per-repeat `values` against `threshold`."""
    value, (low, high) = median(values), spread(values)
    ok = value <= threshold if at_most else value >= threshold
    return Verdict(
        target,
        corpus,
        fmt(value),
        fmt_range(low, high, fmt),
        f"{'<=' if at_most else '>='} {fmt(threshold)}",
        _met(value, ok),
        straddles(low, high, threshold),
    )


def _report(
    target: str, corpus: str, values: list[float], fmt: Callable[[float], str], note: str
) -> Verdict:
    """A row that reports the median of `values`, with no verdict."""
    low, high = spread(values)
    return Verdict(
        target, corpus, fmt(median(values)), fmt_range(low, high, fmt), note, None, info=True
    )


def _never_below(results: dict[str, Any], corpus: str) -> Verdict:
    """Packed batching at least as fast as batching off at every level both measured."""
    target = "batching (packed) never below batching off (lowest on / off over levels)"
    shared = sorted(
        set(levels(results, corpus, "packed")) & set(levels(results, corpus, "no-batching"))
    )
    per_level = [(c, paired(results, corpus, "packed", "no-batching", c)) for c in shared]
    kept = [(c, median(r), min(r), max(r)) for c, r in per_level if r]
    if not kept:
        return Verdict(target, corpus, "-", "-", ">= 1.00x at every level", None)
    clients, lowest, _, _ = min(kept, key=lambda item: item[1])
    worst = min(item[2] for item in kept)
    met = lowest >= 1.0
    failing = [item for item in kept if item[1] < 1.0]
    noisy = worst < 1.0 if met else all(item[3] >= 1.0 for item in failing)
    return Verdict(
        target,
        corpus,
        f"{fmt_x(lowest)} at {plural(clients)}",
        f"worst repeat {fmt_x(worst)}",
        ">= 1.00x at every level",
        met,
        noisy,
    )


def _corpus_verdicts(results: dict[str, Any], corpus: str) -> list[Verdict]:
    out: list[Verdict] = []
    at = TARGET_CLIENTS
    mixed = corpus == TAIL_CORPUS or TAIL_CORPUS not in results.get("corpora", {})
    if mixed:
        out.append(
            _check(
                f"packed p99 / p50 at {at} clients",
                corpus,
                tail_ratios(results, corpus, "packed"),
                TARGET_TAIL,
                fmt_x,
                at_most=True,
            )
        )
        out.append(
            _report(
                f"padded p99 / p50 at {at} clients",
                corpus,
                tail_ratios(results, corpus, "padded"),
                fmt_x,
                "(for comparison)",
            )
        )
    for clients, threshold in TARGET_PACKED_OVER_PADDED.items():
        target = f"packed / padded texts/s at {plural(clients)}"
        ratios = paired(results, corpus, "packed", "padded", clients)
        if mixed:
            out.append(_check(target, corpus, ratios, threshold, fmt_x, at_most=False))
        else:
            # Packing pays where lengths mix; on texts of nearly one length padding costs
            # little, so the target is the mixed corpus's and this row only reports.
            out.append(
                _report(target, corpus, ratios, fmt_x, f"(target {fmt_x(threshold)} on mixed)")
            )
    top, label = ceiling(results, corpus)
    out.append(
        _report(
            f"packed at {at} clients / in-process ceiling",
            corpus,
            [ratio(v, top) for v in per_repeat(results, corpus, "packed", at, "embeddings_per_s")],
            fmt_x,
            f"(ceiling {fmt_num(top)} texts/s, {label}; 0.95x would be excellent)",
        )
    )
    out.append(
        _check(
            f"packed server event-loop CPU per request at {at} clients",
            corpus,
            per_repeat(results, corpus, "packed", at, "loop_cpu_ms"),
            TARGET_LOOP_MS,
            fmt_ms,
            at_most=True,
        )
    )
    out.append(
        _check(
            "lone request p50 (packed) minus in-process single call p50 (packed)",
            corpus,
            lone_gaps_ms(results, corpus, "packed"),
            TARGET_LONE_MS,
            fmt_ms,
            at_most=True,
        )
    )
    out.append(
        _report(
            "lone request p50 (padded) minus in-process single call p50 (padded)",
            corpus,
            lone_gaps_ms(results, corpus, "padded"),
            fmt_ms,
            "(for comparison)",
        )
    )
    out.append(
        _check(
            f"packed mean batch fill at {at} clients",
            corpus,
            per_repeat(results, corpus, "packed", at, "fill"),
            TARGET_FILL,
            lambda v: fmt_num(v, 2),
            at_most=False,
        )
    )
    out.append(
        _check(
            f"batching on (packed) / off at {at} clients",
            corpus,
            paired(results, corpus, "packed", "no-batching", at),
            TARGET_OVER_OFF,
            fmt_x,
            at_most=False,
        )
    )
    out.append(_never_below(results, corpus))
    top_level = max(
        (c for mode in MODE_NAMES for c in levels(results, corpus, mode)),
        default=0,
    )
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
    return out


def verdicts(results: dict[str, Any]) -> list[Verdict]:
    """Every target, per corpus (the soak once), computed from the figures."""
    out: list[Verdict] = []
    for corpus in results.get("corpora", {}):
        out += _corpus_verdicts(results, corpus)
    soak = results.get("soak")
    growth = math.nan if not soak else float(soak["growth_pct"])
    out.append(
        Verdict(
            "no RSS growth over the soak (end vs start, packed server)",
            soak["corpus"] if soak else "-",
            fmt_pct(growth),
            f"max {fmt_num(soak['max_mb'], 0)} MiB" if soak else "-",
            f"<= {TARGET_RSS_GROWTH_PCT:g}%",
            _met(growth, growth <= TARGET_RSS_GROWTH_PCT),
        )
    )
    return out
