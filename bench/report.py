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
    BATCH_MODES,
    BUSY_SHARE_PCT,
    MODE_NAMES,
    MODES,
    TARGET_CLIENTS,
    fmt_ms,
    fmt_num,
    fmt_pct,
    fmt_spread,
    other_cpu_shares,
    plural,
    runs,
)
from bench.sidecar import table as sidecar_table
from bench.stats import finite, median, relative_spread, spread
from bench.tables import (
    corpora_table,
    inprocess_table,
    ratios_table,
    server_table,
    side_by_side_table,
    targets_table,
)
from bench.targets import verdicts


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
    servers = results.get("servers", {})
    packed_note = {True: "runs packed", False: "runs padded", None: "backend unknown"}
    server_modes = "; ".join(
        f"{MODE_NAMES[mode]}: "
        + (
            " ".join(f"`{k}={v}`" for k, v in info["settings"].items() if k not in env)
            or "defaults"
        )
        + f" ({packed_note[info.get('packed')]})"
        for mode, info in servers.items()
    )
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
        f"dimension {model.get('dimension', '-')}, packed graph "
        f"{'yes' if model.get('packed_graph') else 'no'}), loaded from its exported directory.",
        f"- Servers: `python -m embedserve serve` on 127.0.0.1, settings {server_env}; three "
        f"up at once for the whole run, by mode: {server_modes or '-'}. Batching off keeps the "
        "default backend and runs one text per model call.",
        f"- Server runs: {config['repeats']} repeat(s); in each, for each corpus and client "
        "level, every server runs once, one after another, in an order that rotates from "
        "level to level and from repeat to repeat (idle servers take no CPU). Closed-loop "
        f"clients at {', '.join(map(str, config['levels']))} clients on `POST /embed` (one "
        f"text per request) for {config['duration_s']:g} s at >= 16 clients and "
        f"{config['duration_s'] * 0.6:.2f} s below, the 1-client run the first "
        f"{config['lone_requests']} texts in order; `POST /embed/batch` ("
        f"{', '.join(MODE_NAMES[m] for m in BATCH_MODES)}) with {config['batch_group']} "
        f"texts per request at {', '.join(map(str, config['batch_levels'])) or 'no'} clients; "
        f"{config['warmup_s']:g} s of 64-client warm-up per server and corpus, unmeasured.",
        "- Load generator: a separate process (`devkit/loadclient.py`), raw HTTP/1.1 keep-alive "
        "connections on asyncio/uvloop with pre-built requests; its CPU time is in the tables "
        "next to the server's. Mean batch size and fill (real tokens / token slots computed, "
        "padding included) are from `/metrics` deltas around each run. Server CPU per "
        "completed request is read from /proc just before and after the load: the main "
        "thread (the event loop: HTTP, routing, handlers, the batcher) apart from the other "
        "threads (ONNX Runtime's and the workers that call the model).",
        f"- In process, padded backend (FastEmbed): `embed()` at fixed batch sizes "
        f"{', '.join(map(str, config['fixed_sizes']))} in corpus order (each stops after "
        f"{config['fixed_max_s'] or '-'} s), and length-sorted batches under padded-token "
        f"budgets {', '.join(map(str, config['budgets']))} (texts x longest <= budget, the "
        "whole corpus known in advance"
        + (f", each stops after {config['budget_max_s']} s" if config["budget_max_s"] else "")
        + ").",
        "- In process, packed backend: the server's packed planner over a queue of the whole "
        f"corpus, rows of {', '.join(map(str, config.get('pack_rows', [])))} tokens, token "
        f"budgets {', '.join(map(str, config.get('pack_budgets', [])))} (budget // row rows a "
        "batch), the queue length-sorted (full knowledge) or in corpus order (arrival, "
        f"looking {config.get('pack_lookahead', '-')} texts ahead)"
        + (
            f"; each stops after {config['packed_max_s']} s (batches in random order)"
            if config.get("packed_max_s")
            else ""
        )
        + f". Packed and padded schedules alternate; best of {config['inprocess_passes']} "
        "pass(es), every other pass in reverse order. The best of all is the ceiling.",
    ]
    return "\n".join(lines)


def _memory(results: dict[str, Any]) -> str:
    lines = []
    for corpus in results["corpora"]:
        peaks = []
        for mode in MODES:
            values = [r.get("rss_max_mb") for r in runs(results, corpus, mode, TARGET_CLIENTS)]
            peaks.append(
                f"{MODE_NAMES[mode]} {fmt_spread(median(values), *spread(values), digits=0)} MiB"
            )
        lines.append(
            f"- Server RSS (one model loaded) under {TARGET_CLIENTS} clients, {corpus}, peak: "
            + ", ".join(peaks)
            + "."
        )
    soak = results.get("soak")
    if soak:
        lines.append(
            f"- Soak (packed server, after the runs above): {soak['clients']} clients on "
            f"`{soak['corpus']}` for "
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
    groups = {
        (r["corpus"], r["mode"], r["endpoint"], r["clients"]) for r in results.get("server", [])
    }
    for corpus, mode, endpoint, clients in sorted(groups):
        group = runs(results, corpus, mode, clients, endpoint)
        where = "" if endpoint == "embed" else " on /embed/batch"
        label = f"{MODE_NAMES[mode]}{where}, {corpus}, {plural(clients)}"
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
        f"Server figures are medians of {repeats} run(s) with min-max in parentheses; the "
        "three servers stay up for the whole run and take turns, so the runs a ratio compares "
        "are minutes apart at most, and ratios between servers are taken per repeat before "
        "their median. In-process figures are the best pass, so the ceiling errs high rather "
        "than low.",
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
        "embedserve's packed and padded batching, and batching off, against the same model "
        "called in process, on the same machine and texts in one run. Every number below is "
        "generated from the measurements.",
    ]
    if meta["config"].get("quick"):
        out += ["", "> **Quick smoke run** (`BENCH_QUICK=1`): the figures are indicative only."]
    warning = _busy_warning(results)
    if warning:
        out += ["", warning]
    out += ["", "## How this was measured", "", _facts(results)]
    out += ["", "## Corpora", "", corpora_table(results)]
    out += ["", "## Targets", "", targets_table(verdicts(results))]
    out += ["", "## Ratios", "", ratios_table(results)]
    if plot_name:
        out += [
            "",
            "## Throughput and latency against concurrency",
            "",
            f"![throughput and p50/p99 latency against concurrent clients]({plot_name})",
        ]
    out += ["", "## In-process ceiling"]
    for corpus in corpora:
        out += ["", f"### {corpus}", "", inprocess_table(results, corpus)]
    out += [
        "",
        "## Server: single-text clients on `POST /embed`",
        "",
        "Medians over repeats (texts/s with min-max); fill is real tokens / token slots "
        "computed; loop CPU is the server's main thread per completed request; packed / "
        "padded is the median of the per-repeat ratios of texts/s (min-max).",
    ]
    for corpus in corpora:
        out += ["", f"### {corpus}", "", side_by_side_table(results, corpus, "embed", MODES)]
    out += ["", "## Server: `POST /embed/batch`"]
    for corpus in corpora:
        out += ["", f"### {corpus}", "", side_by_side_table(results, corpus, "batch", BATCH_MODES)]
    out += ["", "## Server runs in detail"]
    for corpus in corpora:
        out += ["", f"### {corpus}, `POST /embed`", "", server_table(results, corpus, MODES)]
        out += [
            "",
            f"### {corpus}, `POST /embed/batch`",
            "",
            server_table(results, corpus, BATCH_MODES, "batch"),
        ]
    out += [
        "",
        "## Sidecar: an ingestion job and search queries on one server",
        "",
        "4 clients post `/embed/batch` with 32 texts and 4 clients post `/embed` with one "
        "text, flat out, on the packed server (priority lanes) and on a server with the lanes "
        "off (`INTERACTIVE_MAX_TEXTS=0`: one FIFO lane); medians over the repeats, the two "
        "servers in turns.",
        "",
        sidecar_table(results.get("sidecar", [])),
    ]
    out += ["", "## Memory", "", _memory(results)]
    out += ["", "## Noise", "", _noise(results), ""]
    return "\n".join(out)


def summary(results: dict[str, Any]) -> str:
    """A short plain summary for the terminal: the ratios and the verdicts."""
    lines = ["", "== embedserve benchmark summary ==", "", ratios_table(results), ""]
    warning = _busy_warning(results)
    if warning:
        lines += [warning.removeprefix("> ").replace("**", ""), ""]
    lines += [
        f"- {v.target} [{v.corpus}]: {v.value} "
        + (v.threshold if v.info else f"(threshold {v.threshold})")
        + f": {v.label}"
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
