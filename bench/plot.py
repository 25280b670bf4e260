"""docs/benchmarks.png: throughput and p50/p99 latency against concurrency, per corpus.

matplotlib is the optional ``bench`` extra; it is imported here only, through importlib, so
that the rest of the harness, its tests and mypy do not need it.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any

from bench.figures import BATCH_MODES, MODE_NAMES, MODES, ceiling, series

STYLE = {
    "packed": {"color": "tab:blue", "marker": "o"},
    "padded": {"color": "tab:green", "marker": "^"},
    "no-batching": {"color": "tab:orange", "marker": "s"},
}


def _pyplot() -> Any:
    matplotlib = importlib.import_module("matplotlib")
    matplotlib.use("Agg")
    return importlib.import_module("matplotlib.pyplot")


def _errorbar(ax: Any, points: list[tuple[int, float, float, float]], **style: Any) -> None:
    kept = [p for p in points if not math.isnan(p[1])]
    if not kept:
        return
    xs = [p[0] for p in kept]
    mid = [p[1] for p in kept]
    below = [p[1] - p[2] for p in kept]
    above = [p[3] - p[1] for p in kept]
    ax.errorbar(xs, mid, yerr=[below, above], capsize=3, linewidth=1.5, markersize=5, **style)


def render(results: dict[str, Any], path: Path) -> None:
    """Write the figure: one column per corpus; throughput on top, latency below."""
    plt = _pyplot()
    corpora = list(results["corpora"])
    fig, axes = plt.subplots(
        2, len(corpora), figsize=(6.5 * len(corpora), 8.5), squeeze=False, constrained_layout=True
    )
    for col, corpus in enumerate(corpora):
        top_ax, low_ax = axes[0][col], axes[1][col]
        ticks: set[int] = set()
        for mode in MODES:
            points = series(results, corpus, mode, "embeddings_per_s")
            ticks.update(p[0] for p in points)
            _errorbar(top_ax, points, label=MODE_NAMES[mode], **STYLE[mode])
        for mode in BATCH_MODES:
            points = series(results, corpus, mode, "embeddings_per_s", "batch")
            ticks.update(p[0] for p in points)
            label = f"{MODE_NAMES[mode]}, /embed/batch"
            _errorbar(top_ax, points, label=label, linestyle=":", alpha=0.6, **STYLE[mode])
        top, label = ceiling(results, corpus)
        if not math.isnan(top):
            top_ax.axhline(top, color="black", linestyle="--", linewidth=1)
            top_ax.annotate(
                f"in-process ceiling ({label})",
                (0.01, top),
                xycoords=("axes fraction", "data"),
                va="bottom",
                fontsize=8,
            )
        top_ax.set_title(f"{corpus}: throughput (median, bars min-max)")
        top_ax.set_ylabel("texts/s")
        top_ax.set_ylim(bottom=0)
        for mode in MODES:
            style = STYLE[mode]
            p50 = series(results, corpus, mode, "p50_ms")
            p99 = series(results, corpus, mode, "p99_ms")
            _errorbar(low_ax, p50, label=f"{MODE_NAMES[mode]} p50", **style)
            _errorbar(
                low_ax, p99, label=f"{MODE_NAMES[mode]} p99", linestyle="--", alpha=0.7, **style
            )
        low_ax.set_title(f"{corpus}: single-text request latency")
        low_ax.set_ylabel("ms (log scale)")
        low_ax.set_yscale("log")
        for ax in (top_ax, low_ax):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent closed-loop clients")
            if ticks:
                ax.set_xticks(sorted(ticks))
                ax.set_xticklabels([str(t) for t in sorted(ticks)])
            ax.grid(True, which="major", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    meta = results["meta"]
    machine = meta["machine"]
    fig.suptitle(
        f"embedserve, {meta.get('model', {}).get('name', '')}: {machine['cores']} cores, "
        f"{machine['cpu_model']}, {meta['started_at']}"
        + (" (quick smoke run)" if meta["config"].get("quick") else ""),
        fontsize=10,
    )
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
