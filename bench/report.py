"""The results dict -> docs/BENCHMARKS.md and the terminal summary (pure).

Every figure in the report comes from the results dict that `bench.run` saves; nothing here
measures. Server figures are medians over repeats with the min-max range beside them.
Re-render a saved run with ``python -m bench.report build/bench/results.json [OUT_DIR]``.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.figures import (
    BUSY_SHARE_PCT,
    MODE_NAMES,
    MODES,
    TARGET_CLIENTS,
    ceiling,
    figure,
    fmt_ms,
    fmt_num,
    fmt_pct,
    fmt_spread,
    fmt_x,
    levels,
    lone_gaps_ms,
    on_off,
    other_cpu_shares,
    plural,
    runs,
    table,
    tail_ratios,
)
from bench.stats import finite, median, ratio, relative_spread, spread
from bench.targets import Verdict, verdicts


# -- sections -------------------------------------------------------------------------------
def _facts(results: dict[str, Any]) -> str:
    meta = results["meta"]
    machine = meta["machine"]
    config = meta["config"]
    model = meta.get("model", {})
    versions = ", ".join(f"{k} {v}" for k, v in machine.get("versions", {}).items())
    load0 = " / ".join(f"{x:.2f}" for x in machine.get("loadavg_start", []))
    load1 = " / ".join(f"{x:.2f}" for x in machine.get("loadavg_end", []))
    env = config.get("server_env") or {}
    server_env = " ".join(f"`{k}={v}`" for k, v in env.items()) or "defaults"
    lines = [
        f"- Command: `{meta['command']}`"
        + (
            f" (which runs `flock /tmp/embedserve-bench.lock {meta['python_command']}`)"
            if meta.get("python_command")
            else ""
        )
        + ". Full run: `make bench`; smoke run: `BENCH_QUICK=1 make bench`; `BENCH_REPEATS` "
        "and `BENCH_SOAK_S` change the repeats and the soak.",
        f"- Started {meta['started_at']}, took {fmt_num(meta.get('duration_s'), 0)} s; "
        f"commit {machine.get('git', 'unknown')}.",
        f"- Machine: {machine['cores']} cores, {machine['cpu_model']}, "
        f"{fmt_num(machine.get('mem_total_mb'), 0)} MiB memory, {machine['kernel']}, "
        f"Python {machine['python']}.",
        f"- Versions: {versions}.",
        f"- Load average (1 / 5 / 15 min) at start {load0 or '-'}, at end {load1 or '-'}; "
        f"cores busy with other processes in the second before the start: "
        f"{fmt_num(machine.get('busy_cores_start'), 2)}.",
        f"- Model: `{model.get('name', '-')}` ({model.get('max_tokens', '-')} tokens max, "
        f"dimension {model.get('dimension', '-')}), loaded from its exported directory.",
        f"- Server: `python -m embedserve serve` on 127.0.0.1, settings {server_env}; batching "
        "off is the same with `ENABLE_BATCHING=false`. A fresh server per mode and repeat.",
        f"- Server runs: {config['repeats']} repeat(s) of each; closed-loop clients at "
        f"{', '.join(map(str, config['levels']))} clients on `POST /embed` (one text per "
        f"request) for {config['duration_s']:g} s at >= 16 clients and "
        f"{config['duration_s'] * 0.6:.2f} s below, the 1-client run the first "
        f"{config['lone_requests']} texts in order; `POST /embed/batch` with "
        f"{config['batch_group']} texts per request at "
        f"{', '.join(map(str, config['batch_levels'])) or 'no'} clients; {config['warmup_s']:g} s "
        "of 64-client warm-up per server and corpus, unmeasured.",
        "- Load generator: a separate process (`bench/loadgen.py`), raw HTTP/1.1 keep-alive "
        "connections on asyncio/uvloop with pre-built requests; its CPU time is in the tables "
        "next to the server's. Mean batch size is from `/metrics` deltas.",
        f"- In process: `embed()` at fixed batch sizes "
        f"{', '.join(map(str, config['fixed_sizes']))} in corpus order (each stops after "
        f"{config['fixed_max_s'] or '-'} s), and length-sorted batches under padded-token "
        f"budgets {', '.join(map(str, config['budgets']))} (texts x longest <= budget, the "
        "whole corpus known in advance"
        + (f", each stops after {config['budget_max_s']} s" if config["budget_max_s"] else "")
        + f"); best of {config['inprocess_passes']} pass(es). The best is the ceiling.",
    ]
    return "\n".join(lines)


def _corpora(results: dict[str, Any]) -> str:
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


def _targets(items: list[Verdict]) -> str:
    return table(
        ["target", "corpus", "figure (median)", "range over repeats", "threshold", "verdict"],
        [[v.target, v.corpus, v.value, v.range, v.threshold, v.label] for v in items],
    )


def _ratios(results: dict[str, Any]) -> str:
    corpora = list(results["corpora"])
    rows: list[list[object]] = []

    def row(label: str, values: list[str]) -> None:
        rows.append([label, *values])

    tops = [ceiling(results, c) for c in corpora]
    row("in-process ceiling, texts/s", [f"{fmt_num(t)} ({label})" for t, label in tops])
    for clients in sorted({c for corpus in corpora for c in levels(results, corpus, "batching")}):
        row(
            f"batching at {plural(clients)} / ceiling",
            [
                fmt_x(ratio(figure(results, c, "batching", clients, "embeddings_per_s")[0], t))
                for c, (t, _) in zip(corpora, tops, strict=True)
            ],
        )
    for clients in sorted(
        {c for corpus in corpora for c in levels(results, corpus, "no-batching")}
    ):
        row(
            f"batching / batching off at {plural(clients)}",
            [fmt_x(on_off(results, c, clients)[0]) for c in corpora],
        )
    for clients in sorted(
        {c for corpus in corpora for c in levels(results, corpus, "batch-endpoint")}
    ):
        row(
            f"/embed/batch at {plural(clients)} / ceiling",
            [
                fmt_x(
                    ratio(figure(results, c, "batch-endpoint", clients, "embeddings_per_s")[0], t)
                )
                for c, (t, _) in zip(corpora, tops, strict=True)
            ],
        )
    row(
        "in-process single call p50",
        [
            fmt_ms(results.get("inprocess", {}).get(c, {}).get("single_call_p50_ms"))
            for c in corpora
        ],
    )
    row(
        "lone request p50 (1 client, batching)",
        [fmt_ms(figure(results, c, "batching", 1, "p50_ms")[0]) for c in corpora],
    )
    row(
        "lone p50 minus in-process p50", [fmt_ms(median(lone_gaps_ms(results, c))) for c in corpora]
    )
    row(
        f"p99 / p50 at {TARGET_CLIENTS} clients",
        [fmt_x(median(tail_ratios(results, c))) for c in corpora],
    )
    return table(["ratio", *corpora], rows)


def _inprocess(results: dict[str, Any], corpus: str) -> str:
    data = results.get("inprocess", {}).get(corpus)
    if not data:
        return "Not measured."
    top, _ = ceiling(results, corpus)
    rows = [
        [
            plan["label"] + (" **(ceiling)**" if plan["texts_per_s"] == top else ""),
            plan["batches"],
            plan["texts"],
            f"{plan['padded_tokens']:,}",
            fmt_num(plan["texts_per_s"]),
            fmt_x(ratio(plan["texts_per_s"], top)),
        ]
        for plan in data["plans"]
    ]
    text = table(
        ["schedule", "batches run", "texts", "padded tokens", "texts/s", "vs ceiling"], rows
    )
    return (
        f"{text}\n\nSingle-call `embed([text])` p50 over the first "
        f"{data['single_call_texts']} texts: {fmt_ms(data['single_call_p50_ms'])}."
    )


def _server(results: dict[str, Any], corpus: str, modes: Sequence[str]) -> str:
    rows = []
    for mode in modes:
        for clients in levels(results, corpus, mode):
            group = runs(results, corpus, mode, clients)

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
                    str(errors) if errors == 0 else f"**{errors}**",
                    fmt_num(median(r.get("server_cpu_s") for r in group)),
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
            "errors",
            "server CPU s",
            "loadgen CPU s",
            "RSS max MiB",
        ],
        rows,
    )


def _memory(results: dict[str, Any]) -> str:
    lines = []
    for corpus in results["corpora"]:
        values = [r.get("rss_max_mb") for r in runs(results, corpus, "batching", TARGET_CLIENTS)]
        lines.append(
            f"- Server RSS (one model loaded) under {TARGET_CLIENTS} clients, {corpus}: peak "
            f"{fmt_spread(median(values), *spread(values), digits=0)} MiB."
        )
    soak = results.get("soak")
    if soak:
        lines.append(
            f"- Soak: {soak['clients']} clients on `{soak['corpus']}` for "
            f"{fmt_num(soak['duration_s'], 0)} s, RSS sampled every {soak['interval_s']:g} s "
            f"({len(soak['samples'])} samples): start {fmt_num(soak['start_mb'])} MiB, end "
            f"{fmt_num(soak['end_mb'])} MiB, max {fmt_num(soak['max_mb'])} MiB, growth "
            f"{fmt_pct(soak['growth_pct'])} (start and end are medians of the first and last "
            f"10% of samples); {soak['requests']:,} requests, "
            f"{fmt_num(soak['embeddings_per_s'])} embeddings/s, p50 {fmt_ms(soak['p50_ms'])}, "
            f"p99 {fmt_ms(soak['p99_ms'])}, errors {soak['errors']}."
        )
    else:
        lines.append("- Soak: not run.")
    return "\n".join(lines)


def _noise(results: dict[str, Any]) -> str:
    meta = results["meta"]
    machine = meta["machine"]
    repeats = meta["config"]["repeats"]
    load0 = machine.get("loadavg_start") or [math.nan]
    cores = machine.get("cores") or 1
    busy = machine.get("busy_cores_start")
    busy_now = busy > 0.2 if busy is not None else load0[0] > 0.5 * cores
    worst: tuple[float, str] = (math.nan, "")
    worst_p99: tuple[float, str] = (math.nan, "")
    for corpus in results["corpora"]:
        for mode in MODES:
            for clients in levels(results, corpus, mode):
                group = runs(results, corpus, mode, clients)
                label = f"{MODE_NAMES[mode]}, {corpus}, {plural(clients)}"
                thr = relative_spread(r["embeddings_per_s"] for r in group)
                p99 = relative_spread(r["p99_ms"] for r in group)
                if not math.isnan(thr) and (math.isnan(worst[0]) or thr > worst[0]):
                    worst = (thr, label)
                if not math.isnan(p99) and (math.isnan(worst_p99[0]) or p99 > worst_p99[0]):
                    worst_p99 = (p99, label)
    other = _other_cpu(results)
    server_cpu = sum(finite(r.get("server_cpu_s") for r in results.get("server", [])))
    client_cpu = sum(finite(r.get("client_cpu_s") for r in results.get("server", [])))
    wall = sum(finite(r.get("wall_s") for r in results.get("server", [])))
    parts = [
        f"Server figures are medians of {repeats} run(s), each on a freshly started server, "
        "with min-max in parentheses; in-process figures are the best pass, so the ceiling "
        "errs high rather than low.",
        f"The 1-minute load average at the start was {load0[0]:.2f} on {cores} cores (it "
        "decays over minutes, so it also remembers work that had just ended); other processes "
        f"kept {fmt_num(busy, 2)} cores busy in the second before the start"
        + (
            ": something else was using the machine, treat the figures with care."
            if busy_now
            else "."
        ),
    ]
    if repeats > 1 and not math.isnan(worst[0]):
        parts.append(
            f"Across repeats, throughput differed by up to {worst[0] * 100:.0f}% of its median "
            f"({worst[1]}) and p99 by up to {worst_p99[0] * 100:.0f}% ({worst_p99[1]}); a "
            "verdict whose range over repeats straddles its threshold is within the noise."
        )
    elif repeats == 1:
        parts.append("With a single run per figure the noise is not visible here: use repeats.")
    if server_cpu:
        parts.append(
            f"Over all server runs the load generator used {client_cpu:.1f} CPU s against the "
            f"server's {server_cpu:.1f} CPU s ({client_cpu / server_cpu * 100:.0f}%), in "
            f"{wall:.0f} s of wall time on {cores} cores: its share of the cores is what the "
            "server could not use."
        )
    if other:
        parts.append(other)
    if meta["config"].get("quick"):
        parts.append(
            "This was a quick smoke run (`BENCH_QUICK=1`): short runs on a cut corpus, one "
            "repeat, a short soak. Its verdicts are not the benchmark's."
        )
    return " ".join(parts)


def _busy_warning(results: dict[str, Any]) -> str:
    busy = [(name, share) for name, _, share in other_cpu_shares(results) if share > BUSY_SHARE_PCT]
    if not busy:
        return ""
    phases = ", ".join(f"{share:.0f}% of the cores during {name}" for name, share in busy)
    return (
        f"> **The machine was busy**: other processes took {phases} (see *Noise*). "
        "The figures are low and the verdicts are not trustworthy; rerun on a quiet machine."
    )


def _other_cpu(results: dict[str, Any]) -> str:
    """How much CPU other processes took while we measured (from /proc/stat)."""
    phases = [
        f"{other:.1f} CPU s during {name} ({share:.0f}% of the cores)"
        for name, other, share in other_cpu_shares(results)
    ]
    if not phases:
        return ""
    return (
        "Other processes (and the kernel) used "
        + "; ".join(phases)
        + ": a few percent is the kernel's own networking and this harness; much more means "
        "something else ran beside the benchmark and the figures are low."
    )


def render(results: dict[str, Any], plot_name: str | None) -> str:
    """The whole BENCHMARKS.md for `results` (`plot_name`: the PNG beside it, if any)."""
    meta = results["meta"]
    corpora = list(results["corpora"])
    out = [
        "# Benchmarks",
        "",
        "<!-- Generated by `make bench` (bench/report.py): do not edit; rerun it. -->",
        "",
        "embedserve against the same model called in process, on the same machine and texts "
        "in one run. Every number below is generated from the measurements.",
    ]
    if meta["config"].get("quick"):
        out += ["", "> **Quick smoke run** (`BENCH_QUICK=1`): the figures are indicative only."]
    warning = _busy_warning(results)
    if warning:
        out += ["", warning]
    out += ["", "## How this was measured", "", _facts(results)]
    out += ["", "## Corpora", "", _corpora(results)]
    out += ["", "## Targets", "", _targets(verdicts(results))]
    out += ["", "## Ratios", "", _ratios(results)]
    if plot_name:
        out += [
            "",
            "## Throughput and latency against concurrency",
            "",
            f"![throughput and p50/p99 latency against concurrent clients]({plot_name})",
        ]
    out += ["", "## In-process ceiling"]
    for corpus in corpora:
        out += ["", f"### {corpus}", "", _inprocess(results, corpus)]
    out += ["", "## Server: single-text clients on `POST /embed`"]
    for corpus in corpora:
        out += ["", f"### {corpus}", "", _server(results, corpus, ("batching", "no-batching"))]
    out += ["", "## Server: `POST /embed/batch`"]
    for corpus in corpora:
        out += ["", f"### {corpus}", "", _server(results, corpus, ("batch-endpoint",))]
    out += ["", "## Memory", "", _memory(results)]
    out += ["", "## Noise", "", _noise(results), ""]
    return "\n".join(out)


def summary(results: dict[str, Any]) -> str:
    """A short plain summary for the terminal: the ratios and the verdicts."""
    lines = ["", "== embedserve benchmark summary ==", "", _ratios(results), ""]
    warning = _busy_warning(results)
    if warning:
        lines += [warning.removeprefix("> ").replace("**", ""), ""]
    lines += [
        f"- {v.target} [{v.corpus}]: {v.value} (threshold {v.threshold}): {v.label}"
        for v in verdicts(results)
    ]
    lines += ["", _memory(results)]
    return "\n".join(lines)


def main(argv: Sequence[str]) -> int:
    """Re-render the report from a saved results JSON: ``RESULTS [OUT_DIR] [--no-plot]``."""
    args = [a for a in argv if a != "--no-plot"]
    if not args:
        print("usage: python -m bench.report RESULTS.json [OUT_DIR] [--no-plot]", file=sys.stderr)
        return 2
    results = json.loads(Path(args[0]).read_text())
    out = Path(args[1]) if len(args) > 1 else Path("docs")
    out.mkdir(parents=True, exist_ok=True)
    plot_name = None
    if "--no-plot" not in argv:
        from bench.plot import render as render_plot

        render_plot(results, out / "benchmarks.png")
        plot_name = "benchmarks.png"
    (out / "BENCHMARKS.md").write_text(render(results, plot_name))
    print(summary(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
