"""Event-loop CPU per request: the server's own cost, thread by thread, under closed-loop load.

Not a test: it reports figures and asserts nothing. Each run starts the real server
(``embedserve serve``, by `devkit.launcher`) on a free 127.0.0.1 port with the settings given,
waits until it is healthy, drives it from a separate load process (`devkit.loadclient`: N
keep-alive HTTP/1.1 clients, one text per request, texts from a load-test corpus), then stops
it with SIGTERM. After a warm-up run, the measured run's client reads every server thread's
CPU time (utime + stime in ``/proc/PID/task/TID/stat``) just before and after its load; the
report gives, per completed request:

- ``loop``: the main thread (TID == PID), which runs the event loop: HTTP parsing, routing,
  handlers, the batcher's loop, response rendering;
- ``workers``: anyio's worker threads, which call the model (ONNX Runtime runs one share of
  each batch on its calling thread) and tokenise long texts;
- ``native``: threads Python did not start: ONNX Runtime's intra-op pool and tokenizer threads;
- ``other``: other Python threads (the log listener) and threads that exited in the window;
- ``total``: the whole process.

Python threads are told apart by name: the server runs under a small wrapper that records each
Python thread's native id as it starts (Python 3.11 does not name OS threads).

CPU time per request is steadier than throughput on a shared machine whose speed drifts; to
compare two trees (say a copy of the code before a change and the work tree), give ``--tree``
twice and several ``--rounds``: runs interleave, the order reversing every round (A B, B A,
A B, ...), and the summary shows medians. The ``busy`` column is the CPU other processes took
during the window: rows with a large one were measured on a contended machine.

``--null-model`` skips inference (tokenising stays real): the event loop is then the
bottleneck, at ten times the request rate, which shows the server's own cost with far less
noise. ``--py-spy DIR`` also records a flame graph of each run (``pip install py-spy``).

From the repository root::

    .venv/bin/python scripts/loopcpu.py                          # 64 clients, /embed, 20 s
    .venv/bin/python scripts/loopcpu.py --endpoint embed --endpoint v1 --rounds 3
    .venv/bin/python scripts/loopcpu.py --tree /tmp/before --tree . --rounds 4 --duration 15
    .venv/bin/python scripts/loopcpu.py --env ACCESS_LOG=false --requests 5000
    .venv/bin/python scripts/loopcpu.py --null-model --py-spy build/loopcpu
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from devkit.launcher import DEFAULT_MODEL, ServerProcess, running_server  # noqa: E402
from devkit.loadclient import LoadResult, LoadSpec, run_load, text_bodies  # noqa: E402

ENDPOINTS = ("embed", "v1")
GROUPS = ("loop", "workers", "native", "other", "total")
WORKER_THREAD_NAME = "AnyIO worker thread"
THREADS_FILE_ENV = "LOOPCPU_THREADS_FILE"
NULL_MODEL_ENV = "LOOPCPU_NULL_MODEL"
MAX_REQUEST_S = 60.0
STARTUP_S = 120.0
STOP_S = 30.0
_run_numbers = itertools.count()


# -- the server, under a wrapper that records its Python threads ---------------------------
def serve_traced(tree: Path, argv: Sequence[str]) -> int:
    """Run ``embedserve`` from `tree` with `argv`, noting each Python thread's native id and
    name in the file named by ``$LOOPCPU_THREADS_FILE`` as the thread starts.

    With ``$LOOPCPU_NULL_MODEL`` set, every loaded model answers each text with one fixed
    unit vector instead of running inference (tokenisation stays real): the server's own
    cost, at the request rates the event loop alone allows.
    """
    import threading

    sys.path.insert(0, str(tree))
    path = os.environ[THREADS_FILE_ENV]
    bootstrap = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]

    def record(thread: threading.Thread) -> None:
        with open(path, "a", encoding="utf-8") as out:
            out.write(f"{threading.get_native_id()}\t{thread.name}\n")
        bootstrap(thread)

    threading.Thread._bootstrap_inner = record  # type: ignore[attr-defined]
    if not os.environ.get(NULL_MODEL_ENV):
        from embedserve.cli import main as cli_main

        return int(cli_main(list(argv)) or 0)
    from embedserve.engine.wiring import build_registry
    from embedserve.server import serve
    from embedserve.settings import Settings

    options = dict(zip(argv[1::2], argv[2::2], strict=False))  # serve --host H --port P
    settings = Settings.from_env(host=options["--host"], port=int(options["--port"]))
    return serve(settings, build_registry(settings, wrap_backend=NullModel))


class NullModel:
    """A loaded model whose inference is skipped: one fixed unit vector per text."""

    def __init__(self, inner: Any) -> None:
        import numpy as np

        self._inner = inner
        self._row = np.full(inner.dimension, inner.dimension**-0.5, dtype=np.float32)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def embed(self, texts: Sequence[str], tokens: Any = None) -> Any:
        import numpy as np

        return np.tile(self._row, (len(texts), 1))


@contextlib.contextmanager
def running_traced(
    tree: Path, settings: dict[str, str], workdir: Path, *, null_model: bool = False
) -> Iterator[tuple[ServerProcess, Path]]:
    """The server from `tree` with env `settings` on top of the launcher's defaults, under
    `serve_traced`; yields it and the file its Python threads are recorded in."""
    threads_path = workdir / f"threads-{next(_run_numbers)}.tsv"
    env = {**settings, THREADS_FILE_ENV: str(threads_path)}
    if null_model:
        env[NULL_MODEL_ENV] = "1"
    command = [sys.executable, str(Path(__file__).resolve()), "_serve", str(tree)]
    with running_server(
        env,
        command=command,
        cwd=tree,
        log_dir=workdir,
        startup_timeout_s=STARTUP_S,
        stop_timeout_s=STOP_S,
    ) as server:
        yield server, threads_path


# -- per-thread CPU --------------------------------------------------------------------------
def python_threads(path: Path) -> dict[int, str]:
    """Native id -> name of the Python threads the wrapper recorded (the latest per id)."""
    names: dict[int, str] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            tid, _, name = line.partition("\t")
            names[int(tid)] = name
    return names


def cpu_by_group(pid: int, result: LoadResult, names: dict[int, str]) -> dict[str, float]:
    """CPU seconds of each thread group of server `pid` over the `result`'s load."""
    groups = dict.fromkeys(GROUPS, 0.0)
    for key, spent in result.server_threads_cpu_s.items():
        tid = int(key)
        if tid == pid:
            groups["loop"] += spent
        elif tid not in names:
            groups["native"] += spent
        elif names[tid] == WORKER_THREAD_NAME:
            groups["workers"] += spent
        else:
            groups["other"] += spent
    groups["total"] = result.server_cpu_s or 0.0
    live = groups["loop"] + groups["workers"] + groups["native"] + groups["other"]
    groups["other"] += max(0.0, groups["total"] - live)  # threads that ended in the window
    return groups


# -- the load ----------------------------------------------------------------------------------
def batch_counters(base_url: str) -> tuple[int, int]:
    """(model batches run, texts embedded) so far, from the server's JSON ``/metrics``."""
    data = httpx.get(f"{base_url}/metrics", timeout=MAX_REQUEST_S).json()
    return int(data["batching"]["batches"]), int(data["total_embeddings"])


def measure(
    server: ServerProcess, threads_path: Path, endpoint: str, args: argparse.Namespace
) -> dict[str, Any]:
    """A warm-up run, then one measured run against `server`, each in a load process."""
    from loadtests.corpus import load

    path, bodies = text_bodies(load(args.corpus), endpoint, model=DEFAULT_MODEL)

    def spec(duration_s: float, max_requests: int | None, pid: int | None) -> LoadSpec:
        return LoadSpec(
            port=server.port,
            path=path,
            bodies=bodies,
            clients=args.clients,
            duration_s=duration_s,
            max_requests=max_requests,
            deadline_s=duration_s + 2 * MAX_REQUEST_S,
            request_timeout_s=MAX_REQUEST_S,
            retry_after_cap_s=0.0,
            server_pid=pid,
        )

    if args.warmup > 0:
        run_load(spec(args.warmup, None, None))
    batches0, texts0 = batch_counters(server.base_url)
    result = run_load(spec(args.duration, args.requests, server.pid))
    batches1, texts1 = batch_counters(server.base_url)
    cpu = cpu_by_group(server.pid, result, python_threads(threads_path))
    ok, wall = result.ok, result.wall_s
    return {
        "endpoint": endpoint,
        "requests": result.attempts,
        "ok": ok,
        "statuses": result.outcomes,
        "wall_s": wall,
        "requests_per_s": ok / wall if wall else 0.0,
        "cpu_s": cpu,
        "ms_per_request": {k: 1000 * v / ok if ok else 0.0 for k, v in cpu.items()},
        "mean_batch": (texts1 - texts0) / max(1, batches1 - batches0),
        "load_cpu_s": result.client_cpu_s,
        "machine_other_cpu_s": result.other_cpu_s or 0.0,
        "p50_ms": result.latency_200_s["p50"] * 1000,
        "p99_ms": result.latency_200_s["p99"] * 1000,
    }


# -- reporting -------------------------------------------------------------------------------
def _row(label: str, result: dict[str, Any]) -> str:
    per = result["ms_per_request"]
    figures = " ".join(f"{per[group]:8.3f}" for group in GROUPS)
    errors = result["requests"] - result["ok"]
    return (
        f"{label:<34} {result['requests_per_s']:7.1f} {figures} "
        f"{result['mean_batch']:5.1f} {result['p50_ms']:7.1f} {result['p99_ms']:7.1f} {errors:5d} "
        f"{result['machine_other_cpu_s']:6.2f}"
    )


def _header() -> str:
    groups = " ".join(f"{group:>8}" for group in GROUPS)
    return (
        f"{'run':<34} {'req/s':>7} {groups} {'batch':>5} {'p50ms':>7} {'p99ms':>7} {'errs':>5} "
        f"{'busy':>6}"
    )


def summarise(runs: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Median figures per label (tree and endpoint) over the rounds."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for label, result in runs:
        by_label.setdefault(label, []).append(result)
    lines = []
    for label, results in by_label.items():
        median = {
            "requests": sum(r["requests"] for r in results),
            "ok": sum(r["ok"] for r in results),
            "requests_per_s": statistics.median(r["requests_per_s"] for r in results),
            "ms_per_request": {
                g: statistics.median(r["ms_per_request"][g] for r in results) for g in GROUPS
            },
            "mean_batch": statistics.median(r["mean_batch"] for r in results),
            "p50_ms": statistics.median(r["p50_ms"] for r in results),
            "p99_ms": statistics.median(r["p99_ms"] for r in results),
            "machine_other_cpu_s": statistics.median(r["machine_other_cpu_s"] for r in results),
        }
        lines.append(_row(f"{label} (median of {len(results)})", median))
    return lines


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure the server's CPU per request by thread group (event loop, "
        "anyio workers, native ONNX Runtime/tokenizer threads) under closed-loop load.",
        epilog="Columns: req/s; CPU ms per completed request for loop, workers, native, "
        "other, total; mean texts per model batch; latency p50/p99 in ms; non-200 answers; "
        "busy: CPU seconds other processes used during the window (interference).",
    )
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (64)")
    parser.add_argument("--duration", type=float, default=20.0, help="window, seconds (20)")
    parser.add_argument(
        "--requests", type=int, default=None, help="end the window after K answers instead"
    )
    parser.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds (3)")
    parser.add_argument(
        "--endpoint",
        action="append",
        choices=ENDPOINTS,
        help="embed (POST /embed) or v1 (POST /v1/embeddings); repeat to run both (embed)",
    )
    parser.add_argument("--corpus", default="mixed", help="load-test corpus (mixed)")
    parser.add_argument(
        "--tree",
        action="append",
        type=Path,
        help="source tree to run the server from; repeat to compare (this repository)",
    )
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (1)")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="server setting, e.g. ACCESS_LOG=false (repeatable)",
    )
    parser.add_argument(
        "--null-model",
        action="store_true",
        help="skip inference (one fixed vector per text; tokenising stays): the server's own "
        "cost at the rate the event loop allows",
    )
    parser.add_argument(
        "--py-spy",
        type=Path,
        metavar="DIR",
        help="also record a flame graph of each run (warm-up included) into DIR with py-spy",
    )
    parser.add_argument(
        "--py-spy-format",
        choices=["flamegraph", "raw"],
        default="flamegraph",
        help="py-spy's output: an SVG flame graph, or raw collapsed stacks to add up (flamegraph)",
    )
    parser.add_argument("--json", type=Path, help="also write every run's figures here")
    args = parser.parse_args(argv)
    args.endpoint = args.endpoint or ["embed"]
    args.tree = [tree.resolve() for tree in (args.tree or [ROOT])]
    if args.clients < 1 or args.duration <= 0 or args.rounds < 1:
        parser.error("--clients, --duration and --rounds must be positive")
    beside = Path(sys.executable).with_name("py-spy")
    args.py_spy_bin = str(beside) if beside.exists() else shutil.which("py-spy")
    if args.py_spy is not None and args.py_spy_bin is None:
        parser.error("--py-spy needs py-spy (pip install py-spy)")
    return args


def _tree_labels(trees: Sequence[Path]) -> dict[Path, str]:
    """Each tree's directory name, numbered when two trees share one."""
    names = [tree.name or str(tree) for tree in trees]
    return {
        tree: name if names.count(name) == 1 else f"{index}.{name}"
        for index, (tree, name) in enumerate(zip(trees, names, strict=True))
    }


@contextlib.contextmanager
def _profiled(server: ServerProcess, args: argparse.Namespace, name: str) -> Iterator[None]:
    """Record a py-spy flame graph of `server` while the block runs, if --py-spy asks."""
    if args.py_spy is None:
        yield
        return
    args.py_spy.mkdir(parents=True, exist_ok=True)
    suffix = ".svg" if args.py_spy_format == "flamegraph" else ".txt"
    out = args.py_spy / (name.replace("/", "_").replace(":", "-") + suffix)
    seconds = int(args.warmup + args.duration) + 1
    command = [args.py_spy_bin, "record", "--pid", str(server.pid), "--duration", str(seconds)]
    command += ["--nonblocking", "--threads", "--format", args.py_spy_format, "--output", str(out)]
    spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        try:
            spy.wait(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait(timeout=10)


def main(argv: Sequence[str]) -> int:
    if argv[:1] == ["_serve"]:
        return serve_traced(Path(argv[1]), argv[2:])
    args = parse_args(argv)
    settings = dict(item.split("=", 1) for item in args.env)
    runs: list[tuple[str, dict[str, Any]]] = []
    print(_header(), flush=True)
    labels = _tree_labels(args.tree)
    with tempfile.TemporaryDirectory(prefix="loopcpu-") as workdir:
        for round_number in range(args.rounds):
            # Reverse the order every other round, so that no tree or endpoint always goes
            # first (the machine drifts).
            flip = round_number % 2 == 1
            for tree in args.tree[::-1] if flip else args.tree:
                with running_traced(tree, settings, Path(workdir), null_model=args.null_model) as (
                    server,
                    threads_path,
                ):
                    for endpoint in args.endpoint[::-1] if flip else args.endpoint:
                        label = f"{labels[tree]}:{endpoint}"
                        with _profiled(server, args, f"{label}-{round_number}"):
                            result = measure(server, threads_path, endpoint, args)
                        result["tree"], result["round"] = str(tree), round_number
                        runs.append((label, result))
                        print(_row(label, result), flush=True)
    print()
    print(_header())
    print("\n".join(summarise(runs)))
    if args.json is not None:
        args.json.write_text(json.dumps([result for _, result in runs], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
