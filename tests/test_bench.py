"""The benchmark harness (`bench/`): its pure parts, its load generator against a stub HTTP
server, and one quickest-mode run against the real model. Nothing here asserts a speed."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib.util
import itertools
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import facts, figures, inprocess, loadgen, report, run, targets
from bench.stats import latency_summary, percentile, ratio, rss_trend
from tests.serverutil import DEFAULT_MODEL, ROOT, require_exported_model

BENCH_LOCK = Path("/tmp/embedserve-bench.lock")


# -- stats ----------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 2, 7, 100, 1001])
@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 95, 99, 99.9, 100])
def test_percentile_matches_numpy_linear(size: int, q: float) -> None:
    values = [random.Random(size).uniform(0, 100) for _ in range(size)]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edges() -> None:
    assert math.isnan(percentile([], 50))
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([4.0, 1.0, 3.0, 2.0], 100) == 4.0  # order of input does not matter
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_latency_summary_and_ratio() -> None:
    summary = latency_summary([float(i) for i in range(1, 101)])
    assert summary["p50"] == pytest.approx(50.5)
    assert summary["p99"] == pytest.approx(99.01)
    assert summary["max"] == 100.0
    assert all(math.isnan(v) for v in latency_summary([]).values())
    assert ratio(3.0, 2.0) == 1.5
    assert math.isnan(ratio(1.0, 0.0)) and math.isnan(ratio(math.nan, 1.0))


def test_rss_trend_uses_medians_of_the_edges() -> None:
    samples = [100.0] * 10 + [500.0] + [101.0] * 8 + [110.0] * 10  # one spike in the middle
    trend = rss_trend(samples)
    assert trend["start_mb"] == 100.0
    assert trend["end_mb"] == 110.0
    assert trend["max_mb"] == 500.0
    assert trend["growth_pct"] == pytest.approx(10.0)
    assert math.isnan(rss_trend([])["growth_pct"])


# -- in-process schedules -------------------------------------------------------------------
def test_fixed_batches_cover_in_order() -> None:
    assert inprocess.fixed_batches(10, 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert inprocess.fixed_batches(0, 4) == []
    with pytest.raises(ValueError):
        inprocess.fixed_batches(3, 0)


@pytest.mark.parametrize("budget", [64, 256, 512, 1024, 4096])
def test_budget_batches_respect_the_budget(budget: int) -> None:
    rng = random.Random(budget)
    tokens = [rng.choice([3, 5, 8, 12, 20, 40, 90, 256, 300]) for _ in range(500)]
    batches = inprocess.budget_batches(tokens, budget)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == list(range(len(tokens)))  # every text exactly once
    for batch in batches:
        longest = max(tokens[i] for i in batch)
        assert len(batch) * longest <= budget or len(batch) == 1, (batch, budget)
    # Length-sorted: a batch's texts are no longer than the next batch's.
    for first, second in itertools.pairwise(batches):
        assert max(tokens[i] for i in first) <= min(tokens[i] for i in second)
    # Greedy: each batch but the last could not take the next text.
    for first, second in itertools.pairwise(batches):
        assert (len(first) + 1) * tokens[second[0]] > budget


def test_budget_batches_put_an_oversized_text_alone() -> None:
    batches = inprocess.budget_batches([10, 600, 10, 10], 100)
    assert batches == [[0, 2, 3], [1]]
    assert inprocess.padded_tokens([10, 600, 10, 10], batches) == 30 + 600


def test_shuffled_keeps_every_batch() -> None:
    batches = [[i] for i in range(50)]
    mixed = inprocess.shuffled(batches)
    assert sorted(mixed) == batches and mixed != batches
    assert inprocess.shuffled(batches) == mixed  # seeded


class CountingModel:
    """A fake embedder that records the batches it is given."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def embed(self, texts: Sequence[str]) -> list[int]:
        self.calls.append(list(texts))
        return [len(t) for t in texts]


def test_measure_plans_runs_every_schedule_over_the_corpus() -> None:
    texts = [f"text {i} " * (1 + i % 7) for i in range(40)]
    tokens = [2 + 2 * (1 + i % 7) for i in range(40)]
    model = CountingModel()
    plans = inprocess.measure_plans(
        model,
        texts,
        tokens,
        fixed_sizes=[1, 16],
        budgets=[64],
        passes=2,
        fixed_max_s=None,
        budget_max_s=None,
    )
    assert [p.label for p in plans] == ["fixed 1", "fixed 16", "sorted, budget 64"]
    assert [p.batches for p in plans[:2]] == [40, 3]
    assert all(p.texts == 40 and p.texts_per_s > 0 and p.passes == 2 for p in plans)
    sorted_plan = inprocess.budget_batches(tokens, 64)
    assert plans[2].padded_tokens == inprocess.padded_tokens(tokens, sorted_plan)
    embedded = [t for call in model.calls for t in call]
    assert embedded.count(texts[0]) >= 2 * 3  # two passes of three schedules (plus warm-up)
    assert inprocess.single_call_p50_ms(model, texts[:5]) >= 0


# -- load generator -------------------------------------------------------------------------
def test_build_requests_are_valid_http() -> None:
    texts = [f"t{i} ü" for i in range(70)]
    single = loadgen.build_requests(8000, texts, "embed", 32)
    assert len(single) == 70
    batch = loadgen.build_requests(8000, texts, "batch", 32)
    assert len(batch) == 2
    for raw in single + batch:
        head, body = raw.split(b"\r\n\r\n", 1)
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        assert length == len(body)
        assert head.startswith(b"POST /embed")
    assert json.loads(single[1].split(b"\r\n\r\n", 1)[1]) == {"text": "t1 ü"}
    second = json.loads(batch[1].split(b"\r\n\r\n", 1)[1])["texts"]
    assert second == texts[32:64]
    with pytest.raises(ValueError):
        loadgen.build_requests(8000, texts, "other", 32)


async def _stub_server(statuses: Iterator[int]) -> asyncio.Server:
    """A keep-alive HTTP/1.1 server on 127.0.0.1 answering with the next status each time."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
                await reader.readexactly(length)
                body = b'{"ok": true}'
                writer.write(
                    b"HTTP/1.1 %d X\r\ncontent-length: %d\r\n\r\n%s"
                    % (next(statuses), len(body), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def _load(statuses: Iterator[int], **spec: Any) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        server = await _stub_server(statuses)
        port = server.sockets[0].getsockname()[1]
        try:
            load = loadgen.LoadSpec(port=port, texts_path="-", **spec)
            requests = loadgen.build_requests(port, ["a", "b", "c"], load.endpoint, load.group)
            return await loadgen.run(load, requests)
        finally:
            server.close()
            await server.wait_closed()

    return asyncio.run(asyncio.wait_for(main(), 30))


def test_loadgen_counts_every_request_and_error() -> None:
    statuses = iter([200, 200, 429] * 100)
    result = _load(statuses, clients=4, max_requests=60, duration_s=None, deadline_s=20)
    assert result["sent"] == 60
    assert result["ok"] == 40
    assert result["errors"] == 20 and result["statuses"] == {"200": 40, "429": 20}
    assert result["latency_ms"]["p50"] > 0
    assert not result["timed_out"]


def test_loadgen_stops_after_its_duration() -> None:
    started = time.monotonic()
    result = _load(
        iter([200] * 10_000_000), clients=2, max_requests=10_000_000, duration_s=0.3, deadline_s=20
    )
    assert result["ok"] > 0 and result["errors"] == 0
    assert time.monotonic() - started < 15  # ended by its duration, not by the deadline


# -- report ---------------------------------------------------------------------------------
LEVELS = [1, 4, 16, 64, 256]


def _server_run(
    corpus: str, mode: str, clients: int, repeat: int, **figures: Any
) -> dict[str, Any]:
    thr = figures.get("thr", 100.0)
    p50 = figures.get("p50", 10.0)
    return {
        "corpus": corpus,
        "mode": mode,
        "clients": clients,
        "repeat": repeat,
        "endpoint": "batch" if mode == "batch-endpoint" else "embed",
        "requests": 1000,
        "ok": 1000 - figures.get("errors", 0),
        "errors": figures.get("errors", 0),
        "statuses": {"200": 1000},
        "timed_out": False,
        "wall_s": 10.0,
        "embeddings_per_s": thr,
        "p50_ms": p50,
        "p95_ms": p50 * 1.2,
        "p99_ms": figures.get("p99", p50 * 1.5),
        "mean_batch": 4.0,
        "server_cpu_s": 19.0,
        "client_cpu_s": 0.8,
        "rss_max_mb": 300.0 + repeat,
    }


def fake_results() -> dict[str, Any]:
    """Three repeats on two corpora. mixed meets every target; short misses several."""
    server = []
    for repeat in (1, 2, 3):
        jitter = repeat - 2  # -1, 0, +1
        for clients in LEVELS:
            # mixed: 460 at 64 clients vs a 500 ceiling (0.92x), 2x batching off.
            server.append(
                _server_run("mixed", "batching", clients, repeat, thr=460 + jitter, p50=3.5)
            )
            server.append(_server_run("mixed", "no-batching", clients, repeat, thr=230 + jitter))
            # short: 300 vs 500 (0.6x); below batching off at 1 client; p99 = 3x p50 at 64.
            on = 100 + jitter if clients == 1 else 300 + jitter
            server.append(
                _server_run(
                    "short",
                    "batching",
                    clients,
                    repeat,
                    thr=on,
                    p50=10.0,
                    p99=30.0 if clients == 64 else 15.0,
                    errors=1 if clients == 256 and repeat == 1 else 0,
                )
            )
            server.append(_server_run("short", "no-batching", clients, repeat, thr=110 + jitter))
        for clients in (1, 4, 16):
            server.append(_server_run("mixed", "batch-endpoint", clients, repeat, thr=480))
            server.append(_server_run("short", "batch-endpoint", clients, repeat, thr=480))

    def plans(best: float) -> list[dict[str, Any]]:
        return [
            {
                "label": "fixed 32",
                "kind": "fixed",
                "param": 32,
                "batches": 10,
                "texts": 320,
                "padded_tokens": 9000,
                "texts_per_s": best / 2,
                "passes": 2,
            },
            {
                "label": "sorted, budget 1024",
                "kind": "budget",
                "param": 1024,
                "batches": 40,
                "texts": 2000,
                "padded_tokens": 60000,
                "texts_per_s": best,
                "passes": 2,
            },
        ]

    corpus_facts = {
        "texts": 2000,
        "distinct": 2000,
        "file": "loadtests/corpus/x.jsonl",
        "file_texts": 2000,
        "words": {"median": 14, "max": 200},
        "chars": {"median": 80, "max": 1200},
        "tokens": {"median": 20, "mean": 30.5, "p90": 60, "p99": 250, "max": 256, "at_limit": 5},
    }
    return {
        "meta": {
            "command": "make bench",
            "python_command": ".venv/bin/python -m bench",
            "started_at": "2025-01-01T00:00:00+00:00",
            "duration_s": 1400.0,
            "config": run.Config().__dict__,
            "machine": {
                "cores": 2,
                "cpu_model": "Test CPU | with a pipe",
                "mem_total_mb": 4096.0,
                "kernel": "Linux test",
                "python": "3.11.0",
                "versions": {"fastembed": "0.9"},
                "git": "abc123",
                "loadavg_start": [0.1, 0.2, 0.3],
                "loadavg_end": [1.9, 1.5, 0.9],
            },
            "model": {"name": DEFAULT_MODEL, "max_tokens": 256, "dimension": 384},
        },
        "corpora": {
            "mixed": {"description": "`mixed`: long tail", **corpus_facts},
            "short": {"description": "`short`: 10-20 words", **corpus_facts},
        },
        "inprocess": {
            "mixed": {"plans": plans(500.0), "single_call_p50_ms": 2.5, "single_call_texts": 400},
            "short": {"plans": plans(500.0), "single_call_p50_ms": 2.0, "single_call_texts": 400},
        },
        "server": server,
        "soak": {
            "corpus": "mixed",
            "clients": 64,
            "duration_s": 300.0,
            "requests": 120000,
            "errors": 0,
            "statuses": {"200": 120000},
            "embeddings_per_s": 400.0,
            "p50_ms": 150.0,
            "p99_ms": 250.0,
            "interval_s": 1.0,
            "samples": [[float(i), 300.0 + i / 10] for i in range(300)],
            "start_mb": 300.0,
            "end_mb": 330.0,
            "max_mb": 330.0,
            "growth_pct": 10.0,
        },
    }


def _tables(markdown: str) -> list[list[str]]:
    """Each Markdown table in `markdown` as its lines."""
    tables: list[list[str]] = []
    current: list[str] = []
    for line in markdown.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def _cells(line: str) -> int:
    return len(re.split(r"(?<!\\)\|", line.strip())) - 2


def test_report_tables_are_well_formed() -> None:
    markdown = report.render(fake_results(), "benchmarks.png")
    tables = _tables(markdown)
    assert len(tables) >= 8
    for lines in tables:
        width = _cells(lines[0])
        assert re.fullmatch(r"\|(---\|)+", lines[1]), lines[1]
        assert _cells(lines[1]) == width
        assert all(_cells(line) == width for line in lines[2:]), lines
    assert "![throughput and p50/p99 latency against concurrent clients](benchmarks.png)" in (
        markdown
    )
    assert "`make bench`" in markdown and "BENCH_QUICK=1 make bench" in markdown
    assert "2 cores, Test CPU | with a pipe" in markdown
    assert figures.table(["a", "b"], [["x|y", 1]]).splitlines()[2] == "| x\\|y | 1 |"
    assert "## Noise" in markdown and "0.10 on 2 cores" in markdown
    assert "460.0 (459.0-461.0)" in markdown  # median and min-max of the repeats
    assert "nan" not in markdown.lower()


def test_report_verdicts_follow_the_figures() -> None:
    got = {(v.target.split(" (")[0], v.corpus): v for v in targets.verdicts(fake_results())}
    ceiling_target = "throughput at 64 clients vs in-process ceiling"
    assert got[(ceiling_target, "mixed")].met is True
    assert got[(ceiling_target, "mixed")].value == "0.92x"
    assert got[(ceiling_target, "short")].met is False
    assert got[("batching on / off at 64 clients", "mixed")].met is True
    assert got[("batching on / off at 64 clients", "mixed")].value == "2.00x"
    never_below = "batching never below batching off"
    assert got[(never_below, "mixed")].met is True
    assert got[(never_below, "short")].met is False
    assert "1 client" in got[(never_below, "short")].value
    lone = "lone request p50 minus in-process single call p50"
    assert got[(lone, "mixed")].met is True and got[(lone, "mixed")].value == "1.00 ms"
    assert got[(lone, "short")].met is False
    errors = "no errors up to 256 clients"
    assert got[(errors, "mixed")].met is True
    assert got[(errors, "short")].met is False
    assert got[("p99 / p50 at 64 clients", "mixed")].met is True
    assert got[("p99 / p50 at 64 clients", "short")].met is False
    assert got[("no RSS growth over the soak", "mixed")].met is False
    labels = report.render(fake_results(), None)
    assert "**not met**" in labels and "| met |" in labels


def test_report_marks_verdicts_within_noise_and_unmeasured() -> None:
    results = fake_results()
    for r in results["server"]:
        if (r["corpus"], r["mode"], r["clients"]) == ("mixed", "batching", 64):
            r["embeddings_per_s"] = {1: 430.0, 2: 460.0, 3: 470.0}[r["repeat"]]
    got = {(v.target, v.corpus): v for v in targets.verdicts(results)}
    noisy = got[("throughput at 64 clients vs in-process ceiling", "mixed")]
    assert noisy.met is True and noisy.noisy and noisy.label == "met (within noise)"

    results["server"] = [r for r in results["server"] if r["clients"] < 64]
    results["soak"] = None
    for verdict in targets.verdicts(results):
        if "64 clients" in verdict.target or "256" in verdict.target:
            assert verdict.met is None, verdict
        if "RSS" in verdict.target:
            assert verdict.met is None and verdict.label == "not measured"
    assert "nan" not in report.render(results, None).lower()


def test_report_warns_when_other_processes_took_the_cores() -> None:
    results = fake_results()
    assert "machine was busy" not in report.render(results, None)
    for r in results["server"]:
        r["other_cpu_s"] = 0.1  # 0.1 CPU s in 10 s on 2 cores: 0.5%, the kernel's networking
    assert "machine was busy" not in report.render(results, None)
    results["server"][0]["other_cpu_s"] = 1000.0
    markdown = report.render(results, None)
    assert "**The machine was busy**" in markdown and "during the server runs" in markdown
    assert "machine was busy" in report.summary(results)


def test_cpu_accounting_helpers() -> None:
    busy = loadgen.machine_busy_s()
    assert busy is None or busy > 0
    assert loadgen.cpu_seconds(os.getpid()) is not None or not Path("/proc").is_dir()
    assert loadgen.other_cpu_s(10.0, 4.0, 1.5) == 4.5
    assert loadgen.other_cpu_s(1.0, 4.0) == 0.0  # tick rounding never goes negative
    assert loadgen.other_cpu_s(None, 1.0) is None and loadgen.other_cpu_s(1.0, None) is None


def test_summary_lists_every_verdict() -> None:
    text = report.summary(fake_results())
    assert text.count("threshold") == len(targets.verdicts(fake_results()))


def test_plot_writes_a_png(tmp_path: Path) -> None:
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is the optional 'bench' extra (make bench installs it)")
    from bench.plot import render

    render(fake_results(), tmp_path / "plot.png")
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# -- configuration --------------------------------------------------------------------------
def test_config_from_environment_and_options() -> None:
    config, _ = run.parse_args([], {})
    assert not config.quick and config.repeats == 3 and config.soak_s == 300
    assert config.levels == [1, 4, 16, 64, 256] and config.batch_levels == [1, 4, 16]
    assert config.fixed_sizes == [1, 4, 16, 32, 64, 128, 256]
    assert config.duration_for(1) is None and config.duration_for(64) == 10.0

    env = {"BENCH_QUICK": "1", "BENCH_REPEATS": "5", "BENCH_SOAK_S": "30"}
    config, _ = run.parse_args([], env)
    assert config.quick and config.repeats == 5 and config.soak_s == 30.0
    assert config.corpus_limit == 512

    config, _ = run.parse_args(
        ["--repeats", "2", "--levels", "1,8", "--batch-levels", "", "--server-env", "A=b=c"],
        env,
    )
    assert config.repeats == 2 and config.levels == [1, 8] and config.batch_levels == []
    assert config.server_env == {"A": "b=c"}
    assert run.parse_args([], {"BENCH_QUICK": "0"})[0].quick is False


def test_corpus_description_comes_from_the_docstring() -> None:
    doc = """Corpora.

- ``mixed``: 3,000 texts with a long tail,
  about 8% long.
- ``short``: 2,000 texts.

More text.
"""
    assert (
        facts.corpus_description(doc, "mixed")
        == "`mixed`: 3,000 texts with a long tail, about 8% long."
    )
    assert facts.corpus_description(doc, "short") == "`short`: 2,000 texts."
    assert facts.corpus_description("", "x") == "`loadtests/corpus/x.jsonl`"


# -- the whole harness on the real model -----------------------------------------------------
@contextlib.contextmanager
def bench_lock(wait_s: float) -> Iterator[None]:
    """Hold the benchmark lock (as ``flock`` does), or skip if a benchmark holds it."""
    with BENCH_LOCK.open("a") as handle:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.skip(f"a benchmark holds {BENCH_LOCK}; not measuring beside it")
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_quickest_run_writes_a_report(tmp_path: Path) -> None:
    require_exported_model()
    plot = importlib.util.find_spec("matplotlib") is not None
    command = [
        sys.executable,
        "-m",
        "bench",
        "--quick",
        "--repeats=1",
        "--corpus-limit=48",
        "--levels=1,4",
        "--batch-levels=2",
        "--duration=0.5",
        "--lone=8",
        "--warmup=0.3",
        "--soak-s=1.5",
        "--fixed-sizes=1,8",
        "--budgets=512",
        f"--out={tmp_path / 'docs'}",
        f"--work={tmp_path / 'work'}",
        *([] if plot else ["--no-plot"]),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("BENCH_")}
    with bench_lock(wait_s=30):
        done = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=200, check=False
        )
    assert done.returncode == 0, done.stderr[-4000:]

    results = json.loads((tmp_path / "work" / "results.json").read_text())
    assert set(results["corpora"]) == {"mixed", "short"}
    assert all(results["corpora"][c]["texts"] == 48 for c in ("mixed", "short"))
    seen = {(r["corpus"], r["mode"], r["clients"]) for r in results["server"]}
    for corpus in ("mixed", "short"):
        for mode in ("batching", "no-batching"):
            assert {(corpus, mode, 1), (corpus, mode, 4)} <= seen
        assert (corpus, "batch-endpoint", 2) in seen
    for r in results["server"]:
        assert r["ok"] > 0 and r["errors"] == 0, r
        assert r["mean_batch"] >= 1.0 and r["rss_max_mb"] > 0, r
    lone = [r for r in results["server"] if r["clients"] == 1]
    assert all(r["requests"] == 8 for r in lone)
    assert results["soak"]["errors"] == 0 and results["soak"]["samples"]
    assert len(results["inprocess"]["mixed"]["plans"]) == 3

    markdown = (tmp_path / "docs" / "BENCHMARKS.md").read_text()
    assert "## Targets" in markdown and "Quick smoke run" in markdown
    assert ("benchmarks.png" in markdown) == plot
    if plot:
        assert (tmp_path / "docs" / "benchmarks.png").read_bytes()[:4] == b"\x89PNG"
    assert "== embedserve benchmark summary ==" in done.stdout
