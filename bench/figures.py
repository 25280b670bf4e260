"""Figures from a results dict (pure): one measurement's repeats, their median and range,
the in-process ceiling, and how numbers are written in the report."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from bench.stats import finite, median, ratio, spread

TARGET_CLIENTS = 64  # the concurrency most targets are stated at
MODES = ("batching", "no-batching", "batch-endpoint")
MODE_NAMES = {
    "batching": "batching on",
    "no-batching": "batching off",
    "batch-endpoint": "/embed/batch",
}


# -- selection --------------------------------------------------------------------------------
def runs(results: dict[str, Any], corpus: str, mode: str, clients: int) -> list[dict[str, Any]]:
    """Every repeat of one server measurement."""
    return [
        r
        for r in results.get("server", [])
        if r["corpus"] == corpus and r["mode"] == mode and r["clients"] == clients
    ]


def levels(results: dict[str, Any], corpus: str, mode: str) -> list[int]:
    """Client counts measured for `corpus` and `mode`, ascending."""
    return sorted(
        {
            r["clients"]
            for r in results.get("server", [])
            if (r["corpus"], r["mode"]) == (corpus, mode)
        }
    )


def figure(
    results: dict[str, Any], corpus: str, mode: str, clients: int, key: str
) -> tuple[float, float, float]:
    """(median, min, max) of `key` over the repeats; NaNs when not measured."""
    values = [r.get(key) for r in runs(results, corpus, mode, clients)]
    low, high = spread(values)
    return median(values), low, high


def series(
    results: dict[str, Any], corpus: str, mode: str, key: str
) -> list[tuple[int, float, float, float]]:
    """(clients, median, min, max) of `key` at every measured level (for the plot)."""
    return [(c, *figure(results, corpus, mode, c, key)) for c in levels(results, corpus, mode)]


def ceiling(results: dict[str, Any], corpus: str) -> tuple[float, str]:
    """The best in-process texts/s of `corpus` and the schedule that reached it."""
    plans = results.get("inprocess", {}).get(corpus, {}).get("plans", [])
    if not plans:
        return math.nan, "not measured"
    best = max(plans, key=lambda plan: plan["texts_per_s"])
    return float(best["texts_per_s"]), str(best["label"])


def errors_total(results: dict[str, Any], corpus: str) -> int:
    return sum(int(r["errors"]) for r in results.get("server", []) if r["corpus"] == corpus)


def lone_gaps_ms(results: dict[str, Any], corpus: str) -> list[float]:
    """Per repeat: 1-client batching p50 minus the in-process single-call p50."""
    inproc = results.get("inprocess", {}).get(corpus, {}).get("single_call_p50_ms", math.nan)
    return [r["p50_ms"] - inproc for r in runs(results, corpus, "batching", 1)]


def tail_ratios(results: dict[str, Any], corpus: str) -> list[float]:
    """Per repeat: p99 / p50 with batching at 64 clients."""
    return [
        ratio(r["p99_ms"], r["p50_ms"]) for r in runs(results, corpus, "batching", TARGET_CLIENTS)
    ]


def on_off(results: dict[str, Any], corpus: str, clients: int) -> tuple[float, float, float]:
    """Batching on / off throughput at `clients`: (median ratio, worst case, best case)."""
    on = figure(results, corpus, "batching", clients, "embeddings_per_s")
    off = figure(results, corpus, "no-batching", clients, "embeddings_per_s")
    return ratio(on[0], off[0]), ratio(on[1], off[2]), ratio(on[2], off[1])


def plural(clients: int) -> str:
    """``1 client``, ``4 clients``."""
    return f"{clients} client" if clients == 1 else f"{clients} clients"


BUSY_SHARE_PCT = 10.0  # other processes' share of the cores that makes a run suspect


def other_cpu_shares(results: dict[str, Any]) -> list[tuple[str, float, float]]:
    """(phase, other processes' CPU s, their share of the cores in %) for each phase."""
    cores = results["meta"]["machine"].get("cores") or 1
    shares = []
    inproc = list(results.get("inprocess", {}).values())
    soak = [results["soak"]] if results.get("soak") else []
    for name, items, wall_key in (
        ("the in-process runs", inproc, "wall_s"),
        ("the server runs", results.get("server", []), "wall_s"),
        ("the soak", soak, "duration_s"),
    ):
        measured = [item for item in items if item.get("other_cpu_s") is not None]
        other = sum(finite(item["other_cpu_s"] for item in measured))
        wall = sum(finite(item.get(wall_key) for item in measured))
        if measured and wall:
            shares.append((name, other, other / (wall * cores) * 100))
    return shares


# -- formatting -----------------------------------------------------------------------------
def _bad(value: float | None) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def fmt_num(value: float | None, digits: int = 1) -> str:
    return "-" if _bad(value) else f"{value:,.{digits}f}"


def fmt_x(value: float | None) -> str:
    return "-" if _bad(value) else f"{value:.2f}x"


def fmt_ms(value: float | None) -> str:
    return "-" if _bad(value) else f"{value:.2f} ms"


def fmt_pct(value: float | None) -> str:
    return "-" if _bad(value) else f"{value:+.1f}%"


def fmt_range(low: float, high: float, fmt: Any) -> str:
    if _bad(low) or _bad(high):
        return "-"
    return f"{fmt(low)} - {fmt(high)}"


def fmt_spread(med: float, low: float, high: float, digits: int = 1) -> str:
    """``median (min-max)``; just the median when the repeats agree or there is one."""
    if _bad(med):
        return "-"
    if _bad(low) or _bad(high) or low == high:
        return fmt_num(med, digits)
    return f"{fmt_num(med, digits)} ({fmt_num(low, digits)}-{fmt_num(high, digits)})"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; cells are rendered with str() and pipes escaped."""

    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(cell(h) for h in header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
