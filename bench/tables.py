"""The report's tables (pure): corpora, targets, ratios, the in-process ceiling, and the
server runs (modes side by side, and in detail). Each returns Markdown from the results dict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from bench.figures import (
    MODE_NAMES,
    MODES,
    TARGET_CLIENTS,
    all_levels,
    ceiling,
    figure,
    fmt_ms,
    fmt_num,
    fmt_spread,
    fmt_x,
    levels,
    lone_gaps_ms,
    paired,
    plural,
    runs,
    single_call_ms,
    table,
    tail_ratios,
)
from bench.stats import median, ratio, spread
from bench.targets import Verdict


def corpora_table(results: dict[str, Any]) -> str:
    """Where the corpora come from and their sizes in texts, words, characters and tokens."""
    rows = []
    notes = []
    for name, c in results["corpora"].items():
        tokens = c.get("tokens", {})
        used = c.get("texts", "-")
        if c.get("file_texts") not in (None, used):
            used = f"{used} (first of {c['file_texts']})"
        rows.append(
            [
                name,
                used,
                c.get("distinct", "-"),
                fmt_num(c.get("words", {}).get("median"), 0),
                fmt_num(c.get("chars", {}).get("median"), 0),
                " / ".join(fmt_num(tokens.get(k), 0) for k in ("median", "p90", "p99", "max")),
                fmt_num(tokens.get("mean"), 1),
                tokens.get("at_limit", "-"),
            ]
        )
        notes.append(f"- {c.get('description', name)} (`{c.get('file', '-')}`)")
    text = table(
        [
            "corpus",
            "texts",
            "distinct",
            "words p50",
            "chars p50",
            "tokens p50 / p90 / p99 / max",
            "tokens mean",
            "at token limit",
        ],
        rows,
    )
    return (
        "Both corpora are generated deterministically by `loadtests/corpus.py` and committed. "
        "Tokens are the model's own count (special tokens included, cut at its limit).\n\n"
        + "\n".join(notes)
        + "\n\n"
        + text
    )


def targets_table(items: list[Verdict]) -> str:
    """One row per verdict."""
    return table(
        ["target", "corpus", "figure (median)", "range over repeats", "threshold", "verdict"],
        [[v.target, v.corpus, v.value, v.range, v.threshold, v.label] for v in items],
    )


def ratios_table(results: dict[str, Any]) -> str:
    """The headline ratios, one column per corpus (also the terminal summary's table)."""
    corpora = list(results["corpora"])
    rows: list[list[object]] = []

    def row(label: str, values: list[str]) -> None:
        rows.append([label, *values])

    tops = [ceiling(results, c) for c in corpora]
    row("in-process ceiling, texts/s", [f"{fmt_num(t)} ({label})" for t, label in tops])
    for backend in ("packed", "padded"):
        best = [ceiling(results, c, backend) for c in corpora]
        row(f"best in-process {backend}, texts/s", [f"{fmt_num(t)} ({lb})" for t, lb in best])
    for clients in all_levels(results):
        row(
            f"packed at {plural(clients)} / ceiling",
            [
                fmt_x(ratio(figure(results, c, "packed", clients, "embeddings_per_s")[0], t))
                for c, (t, _) in zip(corpora, tops, strict=True)
            ],
        )
    for clients in all_levels(results):
        row(
            f"packed / padded at {plural(clients)}",
            [fmt_x(median(paired(results, c, "packed", "padded", clients))) for c in corpora],
        )
    for clients in all_levels(results):
        row(
            f"packed / batching off at {plural(clients)}",
            [fmt_x(median(paired(results, c, "packed", "no-batching", clients))) for c in corpora],
        )
    for clients in all_levels(results, "batch"):
        row(
            f"/embed/batch packed at {plural(clients)} / ceiling",
            [
                fmt_x(
                    ratio(figure(results, c, "packed", clients, "embeddings_per_s", "batch")[0], t)
                )
                for c, (t, _) in zip(corpora, tops, strict=True)
            ],
        )
    for mode in ("packed", "padded"):
        row(
            f"in-process single call p50, {mode}",
            [fmt_ms(single_call_ms(results, c, mode)) for c in corpora],
        )
        row(
            f"lone request p50 (1 client), {mode} server",
            [fmt_ms(figure(results, c, mode, 1, "p50_ms")[0]) for c in corpora],
        )
        row(
            f"lone p50 minus in-process p50, {mode}",
            [fmt_ms(median(lone_gaps_ms(results, c, mode))) for c in corpora],
        )
    for mode in ("packed", "padded"):
        row(
            f"p99 / p50 at {TARGET_CLIENTS} clients, {mode}",
            [fmt_x(median(tail_ratios(results, c, mode))) for c in corpora],
        )
    for mode in ("packed", "padded"):
        row(
            f"fill at {TARGET_CLIENTS} clients, {mode}",
            [fmt_num(figure(results, c, mode, TARGET_CLIENTS, "fill")[0], 2) for c in corpora],
        )
    for mode in MODES:
        row(
            f"event-loop CPU per request at {TARGET_CLIENTS} clients, {MODE_NAMES[mode]}",
            [fmt_ms(figure(results, c, mode, TARGET_CLIENTS, "loop_cpu_ms")[0]) for c in corpora],
        )
    return table(["ratio", *corpora], rows)


def inprocess_table(results: dict[str, Any], corpus: str) -> str:
    """Every in-process schedule of `corpus`, padded first, then the best of each backend."""
    data = results.get("inprocess", {}).get(corpus)
    if not data:
        return "Not measured."
    top, _ = ceiling(results, corpus)
    rows = [
        [
            plan["label"] + (" **(ceiling)**" if plan["texts_per_s"] == top else ""),
            plan.get("backend", "padded"),
            plan["batches"],
            plan["texts"],
            f"{plan['padded_tokens']:,}",
            fmt_num(ratio(plan.get("real_tokens", math.nan), plan["padded_tokens"]), 2),
            fmt_num(plan["texts_per_s"]),
            fmt_x(ratio(plan["texts_per_s"], top)),
        ]
        for plan in sorted(data["plans"], key=lambda p: p.get("backend", "padded") != "padded")
    ]
    text = table(
        [
            "schedule",
            "backend",
            "batches run",
            "texts",
            "token slots",
            "fill",
            "texts/s",
            "vs ceiling",
        ],
        rows,
    )
    best = []
    for backend in ("packed", "padded"):
        value, label = ceiling(results, corpus, backend)
        best.append(f"best {backend} {fmt_num(value)} texts/s ({label})")
    singles = ", ".join(
        f"{backend} {fmt_ms(single_call_ms(results, corpus, backend))}"
        for backend in ("packed", "padded")
    )
    return (
        f"{text}\n\n{'; '.join(best)}. Single-call `embed([text])` p50 over the first "
        f"{data['single_call_texts']} texts (the backends in turn): {singles}."
    )


def side_by_side_table(
    results: dict[str, Any], corpus: str, endpoint: str, modes: Sequence[str]
) -> str:
    """Per client level, each mode's medians beside the others', and packed / padded."""
    header = ["clients"]
    for mode in modes:
        name = MODE_NAMES[mode]
        header += [
            f"{name} texts/s",
            f"{name} p50 / p99 ms",
            f"{name} fill",
            f"{name} loop CPU ms/req",
        ]
    header.append("packed / padded")
    rows = []
    measured = sorted({c for mode in modes for c in levels(results, corpus, mode, endpoint)})
    for clients in measured:
        row: list[object] = [clients]
        for mode in modes:
            thr = figure(results, corpus, mode, clients, "embeddings_per_s", endpoint)
            p50 = figure(results, corpus, mode, clients, "p50_ms", endpoint)[0]
            p99 = figure(results, corpus, mode, clients, "p99_ms", endpoint)[0]
            fill = figure(results, corpus, mode, clients, "fill", endpoint)[0]
            loop = figure(results, corpus, mode, clients, "loop_cpu_ms", endpoint)[0]
            row += [
                fmt_spread(*thr),
                f"{fmt_num(p50)} / {fmt_num(p99)}",
                fmt_num(fill, 2),
                fmt_num(loop, 2),
            ]
        ratios = paired(results, corpus, "packed", "padded", clients, endpoint=endpoint)
        low, high = spread(ratios)
        row.append(
            fmt_x(median(ratios)) + (f" ({fmt_x(low)}-{fmt_x(high)})" if len(ratios) > 1 else "")
        )
        rows.append(row)
    if not rows:
        return "Not measured."
    return table(header, rows)


def server_table(
    results: dict[str, Any], corpus: str, modes: Sequence[str], endpoint: str = "embed"
) -> str:
    """Every server measurement of `corpus` on `endpoint`, one row per mode and level."""
    rows = []
    for mode in modes:
        for clients in levels(results, corpus, mode, endpoint):
            group = runs(results, corpus, mode, clients, endpoint)

            def cell(key: str, digits: int = 1, group: list[dict[str, Any]] = group) -> str:
                values = [r.get(key) for r in group]
                return fmt_spread(median(values), *spread(values), digits=digits)

            errors = sum(int(r["errors"]) for r in group)
            rows.append(
                [
                    MODE_NAMES[mode],
                    clients,
                    fmt_num(median(r["requests"] for r in group), 0),
                    cell("embeddings_per_s"),
                    cell("p50_ms"),
                    cell("p95_ms"),
                    cell("p99_ms"),
                    fmt_num(median(r.get("mean_batch") for r in group), 2),
                    fmt_num(median(r.get("fill") for r in group), 2),
                    str(errors) if errors == 0 else f"**{errors}**",
                    cell("loop_cpu_ms", 2),
                    fmt_num(median(r.get("threads_cpu_ms") for r in group), 2),
                    fmt_num(median(r.get("server_cpu_ms") for r in group), 2),
                    fmt_num(median(r.get("client_cpu_s") for r in group), 2),
                    fmt_num(median(r.get("rss_max_mb") for r in group), 0),
                ]
            )
    if not rows:
        return "Not measured."
    return table(
        [
            "mode",
            "clients",
            "requests",
            "embeddings/s",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "mean batch",
            "fill",
            "errors",
            "loop CPU ms/req",
            "other threads CPU ms/req",
            "server CPU ms/req",
            "loadgen CPU s",
            "RSS max MiB",
        ],
        rows,
    )
