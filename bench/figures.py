"""Figures from a results dict (pure): one measurement's repeats, their median and range,
the in-process ceiling, and how numbers are written in the report."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from bench.stats import finite, median, ratio, spread

TARGET_CLIENTS = 64  # the concurrency most targets are stated at
MODES = ("packed", "padded", "no-batching")  # the servers, all measured on /embed
BATCH_MODES = ("packed", "padded")  # the servers also measured on /embed/batch
MODE_NAMES = {"packed": "packed", "padded": "padded", "no-batching": "no batching"}
# The backend each server runs: batching off keeps the default (packed) backend.
MODE_BACKEND = {"packed": "packed", "padded": "padded", "no-batching": "packed"}


# -- selection --------------------------------------------------------------------------------
def runs(
    results: dict[str, Any], corpus: str, mode: str, clients: int, endpoint: str = "embed"
) -> list[dict[str, Any]]:
    """Every repeat of one server measurement."""
    return [
        r
        for r in results.get("server", [])
        if (r["corpus"], r["mode"], r["clients"], r["endpoint"])
        == (corpus, mode, clients, endpoint)
    ]


def levels(results: dict[str, Any], corpus: str, mode: str, endpoint: str = "embed") -> list[int]:
    """Client counts measured for `corpus`, `mode` and `endpoint`, ascending."""
    return sorted(
        {
            r["clients"]
            for r in results.get("server", [])
            if (r["corpus"], r["mode"], r["endpoint"]) == (corpus, mode, endpoint)
        }
    )


def all_levels(results: dict[str, Any], endpoint: str = "embed") -> list[int]:
    """Client counts measured for `endpoint` in any corpus and mode, ascending."""
    return sorted({r["clients"] for r in results.get("server", []) if r["endpoint"] == endpoint})


def figure(
    results: dict[str, Any],
    corpus: str,
    mode: str,
    clients: int,
    key: str,
    endpoint: str = "embed",
) -> tuple[float, float, float]:
    """(median, min, max) of `key` over the repeats; NaNs when not measured."""
    values = [r.get(key) for r in runs(results, corpus, mode, clients, endpoint)]
    low, high = spread(values)
    return median(values), low, high


def paired(
    results: dict[str, Any],
    corpus: str,
    mode: str,
    other: str,
    clients: int,
    key: str = "embeddings_per_s",
    endpoint: str = "embed",
) -> list[float]:
    """Per repeat: `mode`'s `key` / `other`'s, the two measured minutes apart at most."""
    theirs = {r["repeat"]: r.get(key) for r in runs(results, corpus, other, clients, endpoint)}
    out = []
    for r in runs(results, corpus, mode, clients, endpoint):
        mine, base = r.get(key), theirs.get(r["repeat"])
        if mine is not None and base is not None:
            out.append(ratio(float(mine), float(base)))
    return finite(out)


def series(
    results: dict[str, Any], corpus: str, mode: str, key: str, endpoint: str = "embed"
) -> list[tuple[int, float, float, float]]:
    """(clients, median, min, max) of `key` at every measured level (for the plot)."""
    return [
        (c, *figure(results, corpus, mode, c, key, endpoint))
        for c in levels(results, corpus, mode, endpoint)
    ]


def ceiling(results: dict[str, Any], corpus: str, backend: str | None = None) -> tuple[float, str]:
    """The best in-process texts/s of `corpus` (of one backend's plans, or of all) and the
    schedule that reached it."""
    plans = results.get("inprocess", {}).get(corpus, {}).get("plans", [])
    plans = [p for p in plans if backend is None or p.get("backend", "padded") == backend]
    if not plans:
        return math.nan, "not measured"
    best = max(plans, key=lambda plan: plan["texts_per_s"])
    name = str(best["label"])
    if backend is None and "backend" in best and not name.startswith(best["backend"]):
        name = f"{best['backend']}: {name}"
    return float(best["texts_per_s"]), name


def single_call_ms(results: dict[str, Any], corpus: str, backend: str) -> float:
    """In-process ``embed([text])`` p50 of `backend` (NaN when not measured)."""
    value = results.get("inprocess", {}).get(corpus, {}).get("single_call_p50_ms", {})
    return float(value.get(backend, math.nan)) if isinstance(value, dict) else math.nan


def errors_total(results: dict[str, Any], corpus: str) -> int:
    return sum(int(r["errors"]) for r in results.get("server", []) if r["corpus"] == corpus)


def lone_gaps_ms(results: dict[str, Any], corpus: str, mode: str = "packed") -> list[float]:
    """Per repeat: `mode`'s 1-client p50 minus the in-process single-call p50 of the backend
    that server runs."""
    inproc = single_call_ms(results, corpus, MODE_BACKEND[mode])
    return finite(r["p50_ms"] - inproc for r in runs(results, corpus, mode, 1))


def tail_ratios(results: dict[str, Any], corpus: str, mode: str = "packed") -> list[float]:
    """Per repeat: p99 / p50 of `mode` at 64 clients."""
    return finite(
        ratio(r["p99_ms"], r["p50_ms"]) for r in runs(results, corpus, mode, TARGET_CLIENTS)
    )


def per_repeat(
    results: dict[str, Any], corpus: str, mode: str, clients: int, key: str
) -> list[float]:
    """Per repeat: `key` of `mode` at `clients` (finite values only)."""
    return finite(r.get(key) for r in runs(results, corpus, mode, clients))


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
    return fmt(low) if low == high else f"{fmt(low)} to {fmt(high)}"


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
