"""Quick benchmark: in-process FastEmbed versus the real server, batching on and off.

Not a test: it reports figures and asserts nothing. One run measures, on deterministic texts:

(a) in-process ``load_local(...).embed()`` at fixed batch sizes (corpus order) and with
    length-sorted batches under padded-token budgets (the planner's cost: texts x longest);
(b) the server with N concurrent closed-loop single-text clients (default 64);
(c) the same with ``ENABLE_BATCHING=false``;
(d) one client sending short texts one after another, against in-process single calls;
(e) the server with ``BATCH_MAX_WAIT_MS=2`` at 1 and N clients;
then a sweep of ``BATCH_TOKEN_BUDGET`` x ``BATCH_MAX_TEXTS`` at N clients, and the
uniform-short-texts case (in-process best against the server).

The load generator (``bench/loadgen.py``, shared with ``make bench``) is a separate process
speaking raw HTTP/1.1 over keep-alive asyncio streams, so it costs the two shared cores
little; its CPU time is reported next to the server's. ``make bench`` is the full, repeated
benchmark that writes docs/BENCHMARKS.md; this script is the quick tuning tool. Run from the
repository root::

    .venv/bin/python scripts/quickbench.py            # everything: about 2 minutes on 2 cores
    .venv/bin/python scripts/quickbench.py --no-sweep --requests 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# The load generator, the batch schedules and the /metrics reading are the benchmark suite's
# (bench/); this script keeps its own comparisons and sweeps for tuning.
@dataclass
class LoadResult:
    requests: int
    wall_s: float
    client_cpu_s: float
    server_cpu_s: float | None
    p50_ms: float
    p99_ms: float
    statuses: dict[str, int]
    batches: int
    texts: int

    @property
    def throughput(self) -> float:
        return self.statuses.get("200", 0) / self.wall_s

    @property
    def mean_batch(self) -> float:
        return self.texts / self.batches if self.batches else 0.0


def run_load(server: Any, texts_path: Path, clients: int, requests: int) -> dict[str, Any]:
    """One closed-loop run of `requests` requests in the load generator process."""
    from bench.loadgen import LoadSpec
    from bench.loadgen import run_load as run_loadgen

    spec = LoadSpec(
        port=server.port,
        texts_path=str(texts_path),
        clients=clients,
        max_requests=requests,
        duration_s=None,
        deadline_s=max(60.0, requests * 0.5),
        server_pid=server.pid,
    )
    return run_loadgen(spec)


def measure(server: Any, texts_path: Path, clients: int, requests: int, warmup: int) -> LoadResult:
    """Warm up, then one closed-loop run of `requests` requests from `clients` clients."""
    from bench.server import batch_counters

    if warmup:
        run_load(server, texts_path, clients, warmup)
    batches0, texts0 = batch_counters(server.base_url)
    raw = run_load(server, texts_path, clients, requests)
    batches1, texts1 = batch_counters(server.base_url)
    return LoadResult(
        requests=requests,
        wall_s=raw["wall_s"],
        client_cpu_s=raw["client_cpu_s"],
        server_cpu_s=raw["server_cpu_s"],
        p50_ms=raw["latency_ms"]["p50"],
        p99_ms=raw["latency_ms"]["p99"],
        statuses=raw["statuses"],
        batches=batches1 - batches0,
        texts=texts1 - texts0,
    )


def in_process(
    backend: Any, texts: Sequence[str], tokens: Sequence[int], budgets: Sequence[int]
) -> list[Any]:
    """Throughput at fixed batch sizes and under token budgets (one whole pass each)."""
    from bench.inprocess import measure_plans

    return measure_plans(
        backend,
        texts,
        tokens,
        fixed_sizes=(1, 8, 32, 64),
        budgets=budgets,
        passes=1,
        fixed_max_s=None,
        budget_max_s=None,
    )


# -- reporting ------------------------------------------------------------------------------
def describe_tokens(tokens: Sequence[int], limit: int) -> str:
    import numpy as np

    values = np.asarray(tokens)
    return (
        f"tokens median {np.median(values):.0f}, mean {values.mean():.1f}, "
        f"p90 {np.percentile(values, 90):.0f}, p99 {np.percentile(values, 99):.0f}, "
        f"max {values.max()} ({(values >= limit).sum()} cut at the {limit}-token limit)"
    )


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def load_row(label: str, settings: str, clients: int, result: LoadResult) -> list[object]:
    errors = {k: v for k, v in result.statuses.items() if k != "200"}
    server_cpu = "-" if result.server_cpu_s is None else f"{result.server_cpu_s:.1f}"
    return [
        label,
        settings,
        clients,
        result.requests,
        f"{result.throughput:.1f}",
        f"{result.p50_ms:.1f}",
        f"{result.p99_ms:.1f}",
        f"{result.mean_batch:.2f}",
        server_cpu,
        f"{result.client_cpu_s:.2f}",
        json.dumps(errors) if errors else "none",
    ]


LOAD_HEADER = [
    "run",
    "settings",
    "clients",
    "requests",
    "texts/s",
    "p50 ms",
    "p99 ms",
    "mean batch",
    "server CPU s",
    "client CPU s",
    "errors",
]


def env_label(env: dict[str, str]) -> str:
    return " ".join(f"{k}={v}" for k, v in env.items()) or "defaults"


# -- main -----------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=512, help="corpus size (default 512)")
    parser.add_argument("--seed", type=int, default=2024, help="corpus seed")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (64)")
    parser.add_argument("--requests", type=int, default=1024, help="requests per server run")
    parser.add_argument("--warmup", type=int, default=128, help="unmeasured requests first")
    parser.add_argument("--lone", type=int, default=100, help="sequential requests in (d)")
    parser.add_argument(
        "--token-budget", type=int, help="BATCH_TOKEN_BUDGET for runs (b), (d), (e), uniform"
    )
    parser.add_argument("--max-texts", type=int, help="BATCH_MAX_TEXTS for the same runs")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra setting for every server run (repeatable), e.g. ORT_THREADS=1",
    )
    parser.add_argument(
        "--budgets",
        default="256,512,1024,2048",
        help="in-process token budgets, comma-separated",
    )
    parser.add_argument("--sweep-budgets", default="512,1024,2048,4096")
    parser.add_argument("--sweep-max-texts", default="32,64")
    parser.add_argument("--no-sweep", action="store_true", help="skip the server sweep")
    return parser.parse_args(argv)


def ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


@dataclass
class Corpus:
    """One set of texts, their token counts, and the JSON file the load generator reads."""

    name: str
    texts: list[str]
    tokens: list[int]
    path: Path


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    import fastembed
    import onnxruntime

    from embedserve.engine.backend import load_local
    from embedserve.models.store import ModelStore
    from tests.serverutil import (
        DEFAULT_MODEL,
        long_tailed_texts,
        model_manifest,
        models_dir,
        uniform_texts,
    )

    started = time.perf_counter()
    print("# embedserve quickbench\n")
    print(f"command: `{shlex.join([sys.executable, *sys.argv])}`  ")
    print(
        f"machine: {os.cpu_count()} cores, {platform.machine()}, Python "
        f"{platform.python_version()}, fastembed {fastembed.__version__}, onnxruntime "
        f"{onnxruntime.__version__}  "
    )
    manifest = ModelStore(models_dir()).get(DEFAULT_MODEL)
    if manifest is None:
        print(f"no model at {model_manifest().parent}; import it first", file=sys.stderr)
        return 1
    backend = load_local(model_manifest().parent, manifest, threads=None)
    workdir = Path(tempfile.mkdtemp(prefix="quickbench-"))
    try:
        mixed_texts = long_tailed_texts(args.texts, seed=args.seed)
        short_texts = uniform_texts(args.texts, seed=args.seed + 1)
        corpora = {}
        for name, texts in (
            ("mixed", mixed_texts),
            ("short", short_texts),
            ("lone", short_texts[: args.lone]),
        ):
            path = workdir / f"{name}.json"
            path.write_text(json.dumps(texts))
            corpora[name] = Corpus(name, texts, [len(i) for i in backend.tokenize(texts)], path)
        limit = backend.max_tokens
        print(f"model: {DEFAULT_MODEL} (max {limit} tokens, dim {backend.dimension})  ")
        print(
            f"mixed corpus: {args.texts} texts, {describe_tokens(corpora['mixed'].tokens, limit)}  "
        )
        print(
            f"uniform-short corpus: {args.texts} texts (10-20 words), "
            f"{describe_tokens(corpora['short'].tokens, limit)}"
        )
        run_all(args, backend, corpora)
    finally:
        backend.close()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\ntotal run time: {time.perf_counter() - started:.0f} s")
    return 0


def run_all(args: argparse.Namespace, backend: Any, corpora: dict[str, Corpus]) -> None:
    """Every measurement, in process first (before any server shares the cores)."""
    from bench.inprocess import single_call_p50_ms
    from tests.serverutil import running_server

    mixed, short, lone = corpora["mixed"], corpora["short"], corpora["lone"]
    budgets = ints(args.budgets)
    mixed_rows = in_process(backend, mixed.texts, mixed.tokens, budgets)
    short_rows = in_process(backend, short.texts, short.tokens, budgets)
    lone_inproc_p50 = single_call_p50_ms(backend, lone.texts)
    best_mixed = max(mixed_rows, key=lambda r: r.texts_per_s)
    best_short = max(short_rows, key=lambda r: r.texts_per_s)
    print("\n## (a) in-process `load_local(...).embed()`, one pass per row\n")
    print(
        table(
            ["batching", "mixed: batches", "padded tokens", "texts/s", "uniform-short: texts/s"],
            [
                [
                    m.label,
                    m.batches,
                    m.padded_tokens,
                    f"{m.texts_per_s:.1f}",
                    f"{s.texts_per_s:.1f}",
                ]
                for m, s in zip(mixed_rows, short_rows, strict=True)
            ],
        )
    )
    print(
        f"\nbest in-process: mixed {best_mixed.texts_per_s:.1f} texts/s ({best_mixed.label}); "
        f"uniform-short {best_short.texts_per_s:.1f} texts/s ({best_short.label})"
    )

    base_env = dict(item.split("=", 1) for item in args.server_env)
    if args.token_budget:
        base_env["BATCH_TOKEN_BUDGET"] = str(args.token_budget)
    if args.max_texts:
        base_env["BATCH_MAX_TEXTS"] = str(args.max_texts)
    n, requests, warmup = args.clients, args.requests, args.warmup
    load_rows: list[list[object]] = []
    lone_rows: list[list[object]] = []

    with running_server(base_env) as server:
        b = measure(server, mixed.path, n, requests, warmup)
        load_rows.append(load_row("(b) batching, mixed", env_label(base_env), n, b))
        u = measure(server, short.path, n, requests, warmup)
        load_rows.append(load_row("uniform-short", env_label(base_env), n, u))
        d = measure(server, lone.path, 1, len(lone.texts), 10)
        lone_rows.append(["(d) server, " + env_label(base_env), f"{d.p50_ms:.2f}"])
    no_batching = {**base_env, "ENABLE_BATCHING": "false"}
    with running_server(no_batching) as server:
        c = measure(server, mixed.path, n, requests, warmup)
        load_rows.append(load_row("(c) no batching, mixed", env_label(no_batching), n, c))
    waiting = {**base_env, "BATCH_MAX_WAIT_MS": "2"}
    with running_server(waiting) as server:
        e = measure(server, mixed.path, n, requests, warmup)
        load_rows.append(load_row("(e) wait 2 ms, mixed", env_label(waiting), n, e))
        e1 = measure(server, lone.path, 1, len(lone.texts), 10)
        lone_rows.append(["(e) server, " + env_label(waiting), f"{e1.p50_ms:.2f}"])
    lone_rows.append(["in-process `embed([text])`", f"{lone_inproc_p50:.2f}"])

    print("\n## (b) (c) (e) server, closed-loop single-text clients on `POST /embed`\n")
    print(table(LOAD_HEADER, load_rows))
    print(
        f"\nserver (b) / in-process best, mixed: {b.throughput / best_mixed.texts_per_s:.2f}; "
        f"uniform-short: {u.throughput / best_short.texts_per_s:.2f}; "
        f"batching on / off: {b.throughput / c.throughput:.2f}x; "
        f"wait 2 ms / no wait: {e.throughput / b.throughput:.2f}x"
    )
    print(f"\n## (d) lone requests: 1 client, {len(lone.texts)} short texts in sequence\n")
    print(table(["path", "p50 ms"], lone_rows))
    print(f"\nserver overhead over in-process at p50: {d.p50_ms - lone_inproc_p50:.2f} ms")

    if not args.no_sweep:
        sweep_rows: list[list[object]] = []
        results: list[tuple[LoadResult, str]] = []
        for budget in ints(args.sweep_budgets):
            for max_texts in ints(args.sweep_max_texts):
                env = {
                    **base_env,
                    "BATCH_TOKEN_BUDGET": str(budget),
                    "BATCH_MAX_TEXTS": str(max_texts),
                }
                with running_server(env) as server:
                    result = measure(server, mixed.path, n, requests, warmup)
                sweep_rows.append(load_row("sweep", env_label(env), n, result))
                results.append((result, env_label(env)))
        best, label = max(results, key=lambda pair: pair[0].throughput)
        print(f"\n## sweep at {n} clients, mixed corpus\n")
        print(table(LOAD_HEADER, sweep_rows))
        print(f"\nbest: {label} at {best.throughput:.1f} texts/s (p99 {best.p99_ms:.1f} ms)")

    print(
        f"\n## uniform-short (10-20 words)\n\nin-process best {best_short.texts_per_s:.1f} "
        f"texts/s ({best_short.label}) vs server at {n} clients {u.throughput:.1f} texts/s "
        f"(mean batch {u.mean_batch:.2f}, p50 {u.p50_ms:.1f} ms)"
    )


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
