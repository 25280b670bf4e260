"""``make bench``: the configuration, the order of measurements, and where results go.

One run, on one machine and one set of texts: machine facts, then the in-process ceiling
for each corpus (both backends, before any server shares the cores), then three servers up at
once (packed, padded, batching off) measured in turns: for each repeat, corpus and client
level every server runs once, in an order that rotates from level to level and repeat to
repeat (the machine's speed drifts by tens of percent within minutes, so the modes a ratio
compares are measured minutes apart at most). Then the sidecar scenario (an ingestion job
and search queries on one server, with priority lanes and without: `bench.sidecar`), and the
RSS soak on the packed server.
Results are saved after every measurement to ``build/bench/results.json``; the report and
plot are generated from that file only.

Environment: ``BENCH_QUICK=1`` (a 3-4 minute smoke run), ``BENCH_REPEATS`` (3),
``BENCH_SOAK_S`` (300). Command-line options override them (``--help``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import inprocess, report  # noqa: E402
from bench.facts import describe, load_corpus, machine_facts, own_cpu_s  # noqa: E402
from bench.schedules import interleave, packed_schedules, padded_schedules  # noqa: E402
from devkit.procfs import machine_busy_s, other_cpu_s  # noqa: E402

CORPORA = ("mixed", "short")
# The servers of a run, by mode: the settings each adds to the run's own (`--server-env`).
SERVER_MODES: dict[str, dict[str, str]] = {
    "packed": {},
    "padded": {"ENABLE_PACKING": "false"},
    "no-batching": {"ENABLE_BATCHING": "false"},
}
BATCH_ENDPOINT_MODES = ("packed", "padded")  # the servers measured on /embed/batch too


@dataclass
class Config:
    """Everything that decides what a run measures; saved with its results."""

    quick: bool = False
    repeats: int = 3
    corpora: list[str] = field(default_factory=lambda: list(CORPORA))
    corpus_limit: int | None = None  # use only the first N texts of each corpus
    levels: list[int] = field(default_factory=lambda: [1, 4, 16, 64, 256])
    batch_levels: list[int] = field(default_factory=lambda: [1, 4, 16])
    batch_group: int = 32
    duration_s: float = 10.0  # per run at >= 16 clients; 0.6x below; 1 client runs by count
    lone_requests: int = 400  # the 1-client runs: the first N texts, one after another
    warmup_s: float = 2.0
    soak_s: float = 300.0
    sidecar_s: float = 20.0  # per load of the sidecar scenario; 0 skips it
    soak_clients: int = 64
    soak_interval_s: float = 1.0
    fixed_sizes: list[int] = field(default_factory=lambda: [1, 4, 16, 32, 64, 128, 256])
    budgets: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096, 8192])
    pack_budgets: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096])
    pack_rows: list[int] = field(default_factory=lambda: [128, 256])
    pack_lookahead: int = 256  # the server's PACK_LOOKAHEAD, for the arrival-order queue
    inprocess_passes: int = 2
    fixed_max_s: float | None = 4.0
    budget_max_s: float | None = None
    packed_max_s: float | None = 3.0
    server_env: dict[str, str] = field(default_factory=dict)
    plot: bool = True

    def duration_for(self, clients: int) -> float | None:
        """Seconds of a run at `clients` clients (None: the 1-client run goes by count)."""
        if clients == 1:
            return None
        return self.duration_s if clients >= 16 else round(self.duration_s * 0.6, 2)


def quick_config() -> Config:
    """The ``BENCH_QUICK=1`` smoke run: one repeat of short runs on a cut corpus, fewer
    in-process schedules."""
    return Config(
        quick=True,
        repeats=1,
        corpus_limit=512,
        duration_s=2.0,
        lone_requests=60,
        warmup_s=1.0,
        soak_s=10.0,
        sidecar_s=3.0,
        inprocess_passes=1,
        fixed_sizes=[1, 4, 16, 32, 64],  # a batch of 256 long texts alone takes seconds
        fixed_max_s=1.0,
        budget_max_s=1.5,
        pack_budgets=[512, 1024],
        packed_max_s=1.0,
    )


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def parse_args(argv: Sequence[str], environ: dict[str, str]) -> tuple[Config, argparse.Namespace]:
    """The run's Config: defaults, then BENCH_QUICK's, then BENCH_* variables, then options."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (as BENCH_QUICK=1)")
    parser.add_argument("--repeats", type=int, help="runs of each server measurement")
    parser.add_argument("--soak-s", type=float, help="seconds of the RSS soak")
    parser.add_argument(
        "--sidecar-s", type=float, help="seconds per load of the sidecar scenario (0: skip)"
    )
    parser.add_argument("--corpora", help="comma-separated corpus names (mixed,short)")
    parser.add_argument("--corpus-limit", type=int, help="use the first N texts of each corpus")
    parser.add_argument("--levels", help="client counts for /embed, e.g. 1,4,16,64,256")
    parser.add_argument("--batch-levels", help="client counts for /embed/batch, e.g. 1,4,16")
    parser.add_argument("--duration", type=float, help="seconds per run at >= 16 clients")
    parser.add_argument("--lone", type=int, help="requests in each 1-client run")
    parser.add_argument("--warmup", type=float, help="warm-up seconds per server and corpus")
    parser.add_argument("--fixed-sizes", help="in-process fixed batch sizes")
    parser.add_argument("--budgets", help="in-process padded-token budgets")
    parser.add_argument("--pack-budgets", help="in-process packed token budgets, e.g. 512,1024")
    parser.add_argument("--pack-rows", help="in-process packed row lengths, e.g. 128,256")
    parser.add_argument("--passes", type=int, help="in-process passes per schedule (best kept)")
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a server setting for every server run (repeatable), e.g. BATCH_TOKEN_BUDGET=1024",
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="report directory")
    parser.add_argument(
        "--work", type=Path, default=ROOT / "build" / "bench", help="results JSON and logs"
    )
    parser.add_argument("--invoked-as", default="", help="the command to print in the report")
    args = parser.parse_args(list(argv))

    config = Config()
    if args.quick or environ.get("BENCH_QUICK", "") not in ("", "0"):
        config = quick_config()
    if environ.get("BENCH_REPEATS"):
        config.repeats = int(environ["BENCH_REPEATS"])
    if environ.get("BENCH_SOAK_S"):
        config.soak_s = float(environ["BENCH_SOAK_S"])
    overrides: dict[str, Any] = {
        "repeats": args.repeats,
        "soak_s": args.soak_s,
        "sidecar_s": args.sidecar_s,
        "corpora": args.corpora and [c.strip() for c in args.corpora.split(",") if c.strip()],
        "corpus_limit": args.corpus_limit,
        "levels": args.levels and _ints(args.levels),
        "batch_levels": None if args.batch_levels is None else _ints(args.batch_levels),
        "duration_s": args.duration,
        "lone_requests": args.lone,
        "warmup_s": args.warmup,
        "fixed_sizes": args.fixed_sizes and _ints(args.fixed_sizes),
        "budgets": args.budgets and _ints(args.budgets),
        "pack_budgets": args.pack_budgets and _ints(args.pack_budgets),
        "pack_rows": args.pack_rows and _ints(args.pack_rows),
        "inprocess_passes": args.passes,
    }
    for name, value in overrides.items():
        if value is not None:
            setattr(config, name, value)
    config.server_env = dict(item.split("=", 1) for item in args.server_env)
    config.plot = not args.no_plot
    if config.repeats < 1 or config.soak_s < 0 or config.lone_requests < 1:
        parser.error("repeats and --lone must be >= 1 and the soak >= 0 s")
    return config, args


@dataclass(frozen=True)
class Step:
    """One client level of one repeat and corpus: every mode in `modes` runs it, in order."""

    repeat: int
    corpus: str
    endpoint: str  # "embed" or "batch"
    clients: int
    modes: tuple[str, ...]


def rotation(modes: Sequence[str], shift: int) -> tuple[str, ...]:
    """`modes` rotated left by `shift`: (A, B, C), 1 -> (B, C, A)."""
    shift %= len(modes)
    return (*modes[shift:], *modes[:shift])


def server_steps(config: Config) -> list[Step]:
    """The order of the server runs: repeat, then corpus, then level (``/embed`` levels, then
    ``/embed/batch``); at each, every mode, rotated one further than the level before, and
    one further than the same level in the repeat before (so over len(modes) repeats each
    mode goes first once at every level)."""
    steps = []
    for repeat in range(1, config.repeats + 1):
        at = 0
        for corpus in config.corpora:
            levels = [("embed", c) for c in config.levels]
            levels += [("batch", c) for c in config.batch_levels]
            for endpoint, clients in levels:
                modes = tuple(SERVER_MODES) if endpoint == "embed" else BATCH_ENDPOINT_MODES
                shifted = rotation(modes, repeat - 1 + at)
                steps.append(Step(repeat, corpus, endpoint, clients, shifted))
                at += 1
    return steps


def busy_note(result: dict[str, Any]) -> str:
    """A warning for the progress log when other processes took CPU during a run."""
    other, wall = result.get("other_cpu_s"), result.get("wall_s")
    if other is None or not wall or other / wall < 0.2:
        return ""
    return f"  [other processes used {other / wall:.1f} cores]"


# -- the run --------------------------------------------------------------------------------
class Run:
    """One benchmark run: owns the results dict and saves it after every measurement."""

    def __init__(self, config: Config, work: Path, command: str) -> None:
        self.config = config
        self.work = work
        self.started = time.monotonic()
        self.results: dict[str, Any] = {
            "meta": {
                "command": command,
                "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "config": asdict(config),
                "machine": machine_facts(),
            },
            "corpora": {},
            "inprocess": {},
            "servers": {},
            "server": [],
            "soak": None,
            "sidecar": [],
        }
        self.texts_paths: dict[str, Path] = {}

    @property
    def results_path(self) -> Path:
        return self.work / "results.json"

    def log(self, message: str) -> None:
        print(f"[{time.monotonic() - self.started:6.0f}s] {message}", file=sys.stderr, flush=True)

    def save(self) -> None:
        self.results["meta"]["duration_s"] = time.monotonic() - self.started
        self.results_path.write_text(json.dumps(self.results, indent=1, allow_nan=True))

    def corpora(self) -> dict[str, list[str]]:
        """Every corpus, cut to the configured size and written where the generator reads."""
        texts_by_name = {}
        for name in self.config.corpora:
            texts, description = load_corpus(name)
            total = len(texts)
            if self.config.corpus_limit:
                texts = texts[: self.config.corpus_limit]
            path = self.work / f"{name}.json"
            path.write_text(json.dumps(texts))
            self.texts_paths[name] = path
            texts_by_name[name] = texts
            self.results["corpora"][name] = {
                "description": description,
                "file": f"loadtests/corpus/{name}.jsonl",
                "file_texts": total,
            }
        return texts_by_name

    def in_process(self, texts_by_name: dict[str, list[str]]) -> None:
        """The ceiling and single-call latency of both backends for each corpus; the models
        are freed after."""
        from devkit.launcher import DEFAULT_MODEL, model_manifest, models_dir
        from embedserve.engine.backend import load_local
        from embedserve.engine.packed import load_packed
        from embedserve.models.store import ModelStore

        manifest = ModelStore(models_dir()).get(DEFAULT_MODEL)
        if manifest is None:
            raise SystemExit(f"no model at {model_manifest().parent}: run 'make model' first")
        model_dir = model_manifest().parent
        config = self.config
        padded = load_local(model_dir, manifest, threads=None)
        loaded: list[Any] = [padded]
        try:
            models: dict[str, inprocess.Embedder] = {"padded": padded}
            rows = config.pack_rows if manifest.packed else []
            for row in rows:
                packed = load_packed(model_dir, manifest, threads=None, row_tokens=row)
                loaded.append(packed)
                models[f"packed {row}"] = packed
            if not manifest.packed:
                self.log(f"warning: {DEFAULT_MODEL} has no packed graph; packed plans skipped")
            self.results["meta"]["model"] = {
                "name": DEFAULT_MODEL,
                "max_tokens": padded.max_tokens,
                "dimension": padded.dimension,
                "packed_graph": manifest.packed,
            }
            # A single text is one row of its own length, whatever the row length.
            singles: dict[str, inprocess.Embedder] = {"padded": padded}
            if rows:
                singles["packed"] = models[f"packed {rows[0]}"]
            for name, texts in texts_by_name.items():
                self._in_process_corpus(name, texts, padded.tokenize(texts), models, singles)
        finally:
            for backend in loaded:
                backend.close()

    def _in_process_corpus(
        self,
        name: str,
        texts: list[str],
        token_ids: Sequence[Sequence[int]],
        models: dict[str, inprocess.Embedder],
        singles: dict[str, inprocess.Embedder],
    ) -> None:
        config = self.config
        tokens = [len(ids) for ids in token_ids]
        max_tokens = self.results["meta"]["model"]["max_tokens"]
        self.results["corpora"][name].update(describe(texts, tokens, max_tokens))
        self.log(f"in process, {name}: {len(texts)} texts")
        busy0, own0, wall0 = machine_busy_s(), own_cpu_s(), time.perf_counter()
        padded_plans = padded_schedules(
            tokens,
            fixed_sizes=config.fixed_sizes,
            budgets=config.budgets,
            fixed_max_s=config.fixed_max_s,
            budget_max_s=config.budget_max_s,
        )
        packed_plans = packed_schedules(
            tokens,
            budgets=config.pack_budgets,
            rows=[row for row in config.pack_rows if f"packed {row}" in models],
            lookahead=config.pack_lookahead,
            max_s=config.packed_max_s,
        )
        plans = inprocess.measure_schedules(
            models, texts, tokens, interleave(padded_plans, packed_plans), config.inprocess_passes
        )
        lone = texts[: config.lone_requests]
        single_p50 = inprocess.single_calls_p50_ms(singles, lone)
        busy1, own1 = machine_busy_s(), own_cpu_s()
        self.results["inprocess"][name] = {
            "plans": [plan.as_dict() for plan in plans],
            "single_call_p50_ms": single_p50,
            "single_call_texts": len(lone),
            "wall_s": time.perf_counter() - wall0,
            "own_cpu_s": own1 - own0,
            "other_cpu_s": other_cpu_s(
                None if busy0 is None or busy1 is None else busy1 - busy0, own1 - own0
            ),
        }
        for backend in ("packed", "padded"):
            kept = [plan for plan in plans if plan.backend == backend]
            if kept:
                best = max(kept, key=lambda plan: plan.texts_per_s)
                self.log(
                    f"  best {backend}: {best.texts_per_s:.1f} texts/s ({best.label}); "
                    f"single call p50 {single_p50.get(backend, float('nan')):.2f} ms"
                )
        self.save()

    @contextlib.contextmanager
    def servers(self) -> Iterator[dict[str, Any]]:
        """Every server of `SERVER_MODES`, up at once until the block ends (then stopped)."""
        from bench.server import runs_packed
        from devkit.launcher import running_server

        base = dict(self.config.server_env)
        with contextlib.ExitStack() as stack:
            servers = {}
            for mode, settings in SERVER_MODES.items():
                env = {**base, **settings}
                server = stack.enter_context(running_server(env, log_dir=self.work / "logs"))
                servers[mode] = server
                packed = runs_packed(server.base_url)
                self.results["servers"][mode] = {"settings": env, "packed": packed}
                self.log(f"server {mode}: pid {server.pid}, port {server.port}, packed {packed}")
            if self.results["servers"]["packed"]["packed"] is not True:
                self.log("warning: the packed server does not run packed (no packed graph?)")
            self.save()
            yield servers

    def server_runs(self, servers: dict[str, Any]) -> None:
        """Every `server_steps` step: each mode in turn, warm-ups before a corpus's first."""
        from bench.server import load_spec, measure
        from devkit.loadclient import run_load

        config = self.config
        warm: set[str] = set()
        for step in server_steps(config):
            path = self.texts_paths[step.corpus]
            if step.corpus not in warm and config.warmup_s > 0:
                for mode in SERVER_MODES:
                    run_load(load_spec(servers[mode], path, 64, duration_s=config.warmup_s))
                warm.add(step.corpus)
            for position, mode in enumerate(step.modes):
                server = servers[mode]
                if step.endpoint == "batch":
                    spec = load_spec(
                        server,
                        path,
                        step.clients,
                        duration_s=config.duration_s * 0.8,
                        endpoint="batch",
                        group=config.batch_group,
                    )
                elif step.clients == 1:
                    spec = load_spec(server, path, 1, max_requests=config.lone_requests)
                else:
                    spec = load_spec(
                        server, path, step.clients, duration_s=config.duration_for(step.clients)
                    )
                result = measure(server, spec)
                result.update(
                    {
                        "corpus": step.corpus,
                        "mode": mode,
                        "repeat": step.repeat,
                        "position": position,
                    }
                )
                self.results["server"].append(result)
                self.save()
                where = "/embed/batch" if step.endpoint == "batch" else "/embed"
                self.log(
                    f"{mode:>11} {where:<12} {step.corpus:>5} c={step.clients:<3} "
                    f"r{step.repeat}: {result['embeddings_per_s']:7.1f}/s "
                    f"p50 {result['p50_ms']:6.1f} p99 {result['p99_ms']:6.1f} ms "
                    f"batch {result['mean_batch']:5.2f} fill {result['fill']:.2f} "
                    f"loop {result['loop_cpu_ms']:.2f} ms/req errors {result['errors']}"
                    + busy_note(result)
                )

    def sidecar(self, server: Any) -> None:
        """The sidecar scenario on `server` (lanes) and on a FIFO server started for it, in
        turns per repeat."""
        from bench import sidecar
        from devkit.launcher import running_server

        config = self.config
        if config.sidecar_s <= 0:
            return
        corpus = config.corpora[0]
        path = self.texts_paths[corpus]
        env = {**config.server_env, **sidecar.FIFO_ENV}
        with running_server(env, log_dir=self.work / "logs") as fifo:
            servers = {"lanes": server, "fifo": fifo}
            for repeat in range(1, config.repeats + 1):
                for mode in rotation(sidecar.MODES, repeat - 1):
                    result = sidecar.measure(servers[mode], path, config.sidecar_s)
                    result.update({"mode": mode, "repeat": repeat, "corpus": corpus})
                    self.results["sidecar"].append(result)
                    self.save()
                    self.log(
                        f"sidecar {mode:>5} r{repeat}: queries p50 {result['query_p50_ms']:.0f} "
                        f"p99 {result['query_p99_ms']:.0f} ms (lone {result['idle_p50_ms']:.1f}); "
                        f"ingestion {result['mix_ingest_tps']:.0f}/s of {result['alone_tps']:.0f}"
                        f" alone, total {result['total_ratio']:.2f}x, errors {result['errors']}"
                    )

    def soak(self, server: Any) -> None:
        """RSS over time under `soak_clients` clients on the first corpus (packed server)."""
        from bench.server import soak

        config = self.config
        if config.soak_s <= 0:
            return
        corpus = config.corpora[0]
        path = self.texts_paths[corpus]
        self.log(f"soak: {config.soak_clients} clients, {corpus}, {config.soak_s:g} s")
        result = soak(server, path, config.soak_clients, config.soak_s, config.soak_interval_s)
        result.update({"corpus": corpus, "mode": "packed"})
        self.results["soak"] = result
        self.log(
            f"soak: RSS {result['start_mb']:.0f} -> {result['end_mb']:.0f} MiB "
            f"(max {result['max_mb']:.0f}, {result['growth_pct']:+.1f}%), errors {result['errors']}"
        )
        self.save()

    def finish(self) -> None:
        self.results["meta"]["machine"]["loadavg_end"] = list(os.getloadavg())
        self.save()


def write_outputs(
    results: dict[str, Any], out: Path, plot: bool, log: Callable[[str], None]
) -> None:
    """BENCHMARKS.md (and benchmarks.png unless `plot` is off) in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    plot_name: str | None = None
    if plot:
        from bench.plot import render

        render(results, out / "benchmarks.png")
        plot_name = "benchmarks.png"
    (out / "BENCHMARKS.md").write_text(report.render(results, plot_name))
    log(f"wrote {out / 'BENCHMARKS.md'}" + (f" and {out / plot_name}" if plot_name else ""))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the whole suite, then write the report; the summary goes to stdout."""
    argv = sys.argv[1:] if argv is None else list(argv)
    config, args = parse_args(argv, dict(os.environ))
    work = args.work.resolve()
    (work / "logs").mkdir(parents=True, exist_ok=True)
    for old_log in (work / "logs").glob("server-*.log"):  # from an earlier run
        old_log.unlink()
    shown = list(argv)
    if "--invoked-as" in shown:  # the make target's own marker, not a setting of the run
        at = shown.index("--invoked-as")
        del shown[at : at + 2]
    bench_env = " ".join(
        f"{k}={shlex.quote(v)}" for k, v in sorted(os.environ.items()) if k.startswith("BENCH_")
    )
    python_command = shlex.join([".venv/bin/python", "-m", "bench", *shown])
    command = " ".join(part for part in (bench_env, args.invoked_as or python_command) if part)
    run = Run(config, work, command)
    run.results["meta"]["python_command"] = python_command if args.invoked_as else None
    run.log(f"benchmark ({'quick' if config.quick else 'full'}); results in {run.results_path}")
    busy = run.results["meta"]["machine"]["busy_cores_start"]
    if busy is not None and busy > 0.2:
        run.log(f"warning: other processes keep {busy:.2f} cores busy; figures will be low")
    texts_by_name = run.corpora()
    run.in_process(texts_by_name)
    with run.servers() as servers:
        run.server_runs(servers)
        run.sidecar(servers["packed"])
        run.soak(servers["packed"])
    run.finish()
    write_outputs(run.results, args.out, config.plot, run.log)
    print(report.summary(run.results))
    return 0
