"""Event-loop CPU per request: the server's own cost, thread by thread, under closed-loop load.

Not a test: it reports figures and asserts nothing. Each run starts the real server
(``embedserve serve``) on a free 127.0.0.1 port with the settings given, waits until it is
healthy, drives it from a separate load process (N keep-alive HTTP/1.1 clients, one text per
request, texts from a load-test corpus), then stops it with SIGTERM. Over the measured window
(after a warm-up) it reads every server thread's CPU time (utime + stime in
``/proc/PID/task/TID/stat``) and reports, per completed request:

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
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
ENDPOINTS = ("embed", "v1")
GROUPS = ("loop", "workers", "native", "other", "total")
WORKER_THREAD_NAME = "AnyIO worker thread"
THREADS_FILE_ENV = "LOOPCPU_THREADS_FILE"
NULL_MODEL_ENV = "LOOPCPU_NULL_MODEL"
MAX_REQUEST_S = 60.0
STARTUP_S = 120.0
STOP_S = 30.0


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


@dataclass
class Server:
    """One server process on a loopback port; owns the process, its log and thread file."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    threads_path: Path

    def wait_healthy(self, timeout_s: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        with httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited; log {self.log_path}:\n{self._tail()}")
                try:
                    if client.get("/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        raise RuntimeError(f"server not healthy in {timeout_s:g}s; log:\n{self._tail()}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL past a bound (this process only, never a group)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def _tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def start_server(
    tree: Path, settings: dict[str, str], workdir: Path, *, null_model: bool = False
) -> Server:
    """Start the server from `tree` with env `settings` on top of the tests' defaults."""
    from tests.serverutil import free_port, python_executable, server_env

    port = free_port()
    log_path = workdir / f"server-{port}.log"
    threads_path = workdir / f"threads-{port}.tsv"
    env = server_env(settings)
    env[THREADS_FILE_ENV] = str(threads_path)
    if null_model:
        env[NULL_MODEL_ENV] = "1"
    command = [
        python_executable(),
        str(Path(__file__).resolve()),
        "_serve",
        str(tree),
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            command,
            cwd=tree,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(proc, port, log_path, threads_path)
    try:
        server.wait_healthy(STARTUP_S)
    except BaseException:
        server.stop()
        raise
    return server


# -- per-thread CPU --------------------------------------------------------------------------
def _ticks(stat_path: str) -> int | None:
    try:
        with open(stat_path) as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks


def thread_ticks(pid: int) -> dict[int, int]:
    """CPU ticks of every live thread of `pid`, plus the whole process under key 0."""
    ticks: dict[int, int] = {}
    whole = _ticks(f"/proc/{pid}/stat")
    if whole is not None:
        ticks[0] = whole
    for name in os.listdir(f"/proc/{pid}/task"):
        value = _ticks(f"/proc/{pid}/task/{name}/stat")
        if value is not None:
            ticks[int(name)] = value
    return ticks


def python_threads(path: Path) -> dict[int, str]:
    """Native id -> name of the Python threads the wrapper recorded (the latest per id)."""
    names: dict[int, str] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            tid, _, name = line.partition("\t")
            names[int(tid)] = name
    return names


def cpu_by_group(
    pid: int, before: dict[int, int], after: dict[int, int], names: dict[int, str]
) -> dict[str, float]:
    """CPU seconds of each thread group between two `thread_ticks` samples."""
    tick_s = 1 / os.sysconf("SC_CLK_TCK")
    groups = dict.fromkeys(GROUPS, 0.0)
    for tid, end in after.items():
        if tid == 0:
            continue
        spent = (end - before.get(tid, 0)) * tick_s
        if tid == pid:
            groups["loop"] += spent
        elif tid not in names:
            groups["native"] += spent
        elif names[tid] == WORKER_THREAD_NAME:
            groups["workers"] += spent
        else:
            groups["other"] += spent
    groups["total"] = (after.get(0, 0) - before.get(0, 0)) * tick_s
    live = groups["loop"] + groups["workers"] + groups["native"] + groups["other"]
    groups["other"] += max(0.0, groups["total"] - live)  # threads that ended in the window
    return groups


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent busy so far (/proc/stat, all cores)."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


# -- the load process ------------------------------------------------------------------------
@dataclass
class LoadSpec:
    """One load run against a server (passed to the load process as JSON)."""

    port: int
    server_pid: int
    threads_path: str
    endpoint: str
    clients: int
    warmup_s: float
    duration_s: float
    max_requests: int | None
    corpus: str
    model: str = DEFAULT_MODEL


def build_requests(spec: LoadSpec, texts: Sequence[str]) -> list[bytes]:
    """Every request of the run as bytes, one text each, built before the clock starts."""
    if spec.endpoint == "embed":
        path, bodies = "/embed", [{"text": text} for text in texts]
    elif spec.endpoint == "v1":
        path, bodies = "/v1/embeddings", [{"input": t, "model": spec.model} for t in texts]
    else:
        raise ValueError(f"unknown endpoint {spec.endpoint!r}")
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{spec.port}\r\n"
    head += "Content-Type: application/json\r\n"
    requests = []
    for body in bodies:
        data = json.dumps(body).encode()
        requests.append(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return requests


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    marker = lower.find(b"\r\ncontent-length:")
    if marker < 0:
        raise ConnectionError("response without content-length")
    end = lower.index(b"\r\n", marker + 2)
    await reader.readexactly(int(lower[marker + 17 : end]))
    if b"\r\nconnection: close" in lower:
        raise ConnectionError("server closed the connection")
    return int(head[9:12])


async def batch_counters(port: int) -> tuple[int, int]:
    """(model batches run, texts embedded) so far, from the server's JSON ``/metrics``."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    try:
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), MAX_REQUEST_S)
    finally:
        writer.close()
    data = json.loads(answer.partition(b"\r\n\r\n")[2])
    return int(data["batching"]["batches"]), int(data["total_embeddings"])


@dataclass
class _Window:
    """What the clients saw while the window was open."""

    open: bool = False
    stop: bool = False
    latencies_ms: list[float] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)


async def run_load(spec: LoadSpec, requests: list[bytes]) -> dict[str, Any]:
    """Connect the clients, warm up, measure one window, and summarise it."""
    window = _Window()
    numbers = itertools.count()
    connections = [
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", spec.port), 10)
        for _ in range(spec.clients)
    ]
    done_measuring = asyncio.Event()

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while not window.stop:
                payload = requests[next(numbers) % len(requests)]
                sent = time.perf_counter()
                counted = window.open
                writer.write(payload)
                try:
                    status = await asyncio.wait_for(_read_response(reader), MAX_REQUEST_S)
                except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                    if counted and window.open:
                        key = type(exc).__name__
                        window.statuses[key] = window.statuses.get(key, 0) + 1
                    return
                if counted and window.open:
                    window.statuses[str(status)] = window.statuses.get(str(status), 0) + 1
                    window.latencies_ms.append((time.perf_counter() - sent) * 1000)
                    if spec.max_requests and len(window.latencies_ms) >= spec.max_requests:
                        done_measuring.set()
        finally:
            writer.close()

    tasks = [asyncio.create_task(client(r, w)) for r, w in connections]
    await asyncio.sleep(spec.warmup_s)
    batches0, texts0 = await batch_counters(spec.port)
    before, busy0, own0 = thread_ticks(spec.server_pid), machine_busy_s(), time.process_time()
    wall0 = time.perf_counter()
    window.open = True
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(done_measuring.wait(), spec.duration_s)
    window.open = False
    wall = time.perf_counter() - wall0
    after, busy1, own1 = thread_ticks(spec.server_pid), machine_busy_s(), time.process_time()
    window.stop = True
    batches1, texts1 = await batch_counters(spec.port)
    await asyncio.wait(tasks, timeout=MAX_REQUEST_S)
    names = python_threads(Path(spec.threads_path))
    cpu = cpu_by_group(spec.server_pid, before, after, names)
    ok = window.statuses.get("200", 0)
    latencies = sorted(window.latencies_ms) or [0.0]
    return {
        "endpoint": spec.endpoint,
        "requests": sum(window.statuses.values()),
        "ok": ok,
        "statuses": window.statuses,
        "wall_s": wall,
        "requests_per_s": ok / wall,
        "cpu_s": cpu,
        "ms_per_request": {k: 1000 * v / ok if ok else 0.0 for k, v in cpu.items()},
        "mean_batch": (texts1 - texts0) / max(1, batches1 - batches0),
        "load_cpu_s": own1 - own0,
        "machine_other_cpu_s": max(0.0, busy1 - busy0 - cpu["total"] - (own1 - own0)),
        "p50_ms": latencies[len(latencies) // 2],
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
    }


def load_main(spec_json: str) -> int:
    """Entry point of the load process: a LoadSpec as JSON in, a summary JSON out."""
    from loadtests.corpus import load

    spec = LoadSpec(**json.loads(spec_json))
    requests = build_requests(spec, load(spec.corpus))
    try:
        import uvloop

        result = uvloop.run(run_load(spec, requests))
    except ImportError:
        result = asyncio.run(run_load(spec, requests))
    print(json.dumps(result))
    return 0


def measure(server: Server, endpoint: str, args: argparse.Namespace) -> dict[str, Any]:
    """One measured window against `server`, run in a separate load process."""
    spec = LoadSpec(
        port=server.port,
        server_pid=server.proc.pid,
        threads_path=str(server.threads_path),
        endpoint=endpoint,
        clients=args.clients,
        warmup_s=args.warmup,
        duration_s=args.duration,
        max_requests=args.requests,
        corpus=args.corpus,
    )
    bound = args.warmup + args.duration + 2 * MAX_REQUEST_S
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "_load", json.dumps(asdict(spec))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=bound,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"load process failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


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
def _profiled(server: Server, args: argparse.Namespace, name: str) -> Iterator[None]:
    """Record a py-spy flame graph of `server` while the block runs, if --py-spy asks."""
    if args.py_spy is None:
        yield
        return
    args.py_spy.mkdir(parents=True, exist_ok=True)
    suffix = ".svg" if args.py_spy_format == "flamegraph" else ".txt"
    out = args.py_spy / (name.replace("/", "_").replace(":", "-") + suffix)
    seconds = int(args.warmup + args.duration) + 1
    command = [args.py_spy_bin, "record", "--pid", str(server.proc.pid), "--duration", str(seconds)]
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
    if argv[:1] == ["_load"]:
        return load_main(argv[1])
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
                server = start_server(tree, settings, Path(workdir), null_model=args.null_model)
                try:
                    for endpoint in args.endpoint[::-1] if flip else args.endpoint:
                        label = f"{labels[tree]}:{endpoint}"
                        with _profiled(server, args, f"{label}-{round_number}"):
                            result = measure(server, endpoint, args)
                        result["tree"], result["round"] = str(tree), round_number
                        runs.append((label, result))
                        print(_row(label, result), flush=True)
                finally:
                    server.stop()
    print()
    print(_header())
    print("\n".join(summarise(runs)))
    if args.json is not None:
        args.json.write_text(json.dumps([result for _, result in runs], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
