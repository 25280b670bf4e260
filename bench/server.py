"""The real server under load: one measured run, its /metrics deltas, CPU and memory.

The server is started by `devkit.launcher.running_server` (a subprocess on a free loopback
port); this module only measures it. RSS is sampled from /proc by a thread of this process
while the load client (`devkit.loadclient`, another process) drives the server; the client
reads the server's CPU (whole process and main thread, from /proc) just before and after its
load.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from bench.stats import ratio, rss_trend
from devkit.loadclient import LoadSpec, run_load, text_bodies

COUNTERS = ("batches", "texts", "real_tokens", "slot_tokens")


def rss_mb(pid: int) -> float | None:
    """Resident set size of `pid` in MiB (Linux /proc), or None when unknown."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


class RssSampler:
    """Samples a process's RSS every `interval_s` in a thread while the block runs.

    The thread is this object's; it stops when the block exits (or after `max_samples`).
    """

    def __init__(self, pid: int, interval_s: float, max_samples: int = 100_000) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.max_samples = max_samples
        self.samples: list[tuple[float, float]] = []  # (seconds since start, MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def _sample(self) -> None:
        started = time.monotonic()
        for _ in range(self.max_samples):
            value = rss_mb(self.pid)
            if value is not None:
                self.samples.append((time.monotonic() - started, value))
            if self._stop.wait(self.interval_s):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    @property
    def max_mb(self) -> float | None:
        return max((mb for _, mb in self.samples), default=None)


def counters(base_url: str) -> dict[str, int]:
    """The server's cumulative `COUNTERS` from ``GET /metrics``: model batches run, texts
    embedded, and the real tokens and token slots (padding included) those batches computed."""
    data = httpx.get(f"{base_url}/metrics", timeout=10).json()
    batching = data["batching"]
    return {
        "batches": int(batching["batches"]),
        "texts": int(data["total_embeddings"]),
        "real_tokens": int(batching.get("real_tokens", 0)),
        "slot_tokens": int(batching.get("slot_tokens", 0)),
    }


def batch_counters(base_url: str) -> tuple[int, int]:
    """(model batches run, texts embedded) so far, from ``GET /metrics``."""
    now = counters(base_url)
    return now["batches"], now["texts"]


def runs_packed(base_url: str) -> bool | None:
    """Whether the server's loaded models all run packed (None: no model loaded)."""
    models = httpx.get(f"{base_url}/metrics", timeout=10).json()["batching"]["models"]
    flags = [bool(m.get("packed")) for m in models.values()]
    return all(flags) if flags else None


def batching_deltas(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    """What a run's batches were like, from the counters before and after it: mean texts per
    batch and mean fill (real tokens / token slots computed; NaN when nothing ran)."""
    delta = {key: after[key] - before[key] for key in COUNTERS}
    return {
        "batches": delta["batches"],
        "mean_batch": ratio(delta["texts"], delta["batches"]),
        "real_tokens": delta["real_tokens"],
        "slot_tokens": delta["slot_tokens"],
        "fill": ratio(delta["real_tokens"], delta["slot_tokens"]),
    }


def ms_per_request(cpu_s: float | None, requests: int) -> float:
    """CPU milliseconds per completed request (NaN when unknown or none completed)."""
    return math.nan if cpu_s is None or requests <= 0 else cpu_s * 1000 / requests


def load_spec(
    server: Any,
    texts_path: Path,
    clients: int,
    *,
    max_requests: int | None = None,
    duration_s: float | None = None,
    endpoint: str = "embed",
    group: int = 32,
) -> LoadSpec:
    """A spec for `server` sending the texts of the JSON list at `texts_path` to `endpoint`
    (``embed`` or ``batch``, `group` texts a request): by count (`max_requests`), by time
    (`duration_s`), or both. A 429 is counted and not waited on: the load stays closed-loop."""
    if max_requests is None and duration_s is None:
        raise ValueError("a load run needs max_requests or duration_s")
    if duration_s is None:
        assert max_requests is not None
        deadline_s = 60.0 + 0.25 * max_requests
    else:
        deadline_s = duration_s + 120.0
    path, bodies = text_bodies(json.loads(texts_path.read_text()), endpoint, group=group)
    return LoadSpec(
        port=server.port,
        path=path,
        bodies=bodies,
        clients=clients,
        max_requests=max_requests,
        duration_s=duration_s,
        deadline_s=deadline_s,
        retry_after_cap_s=0.0,
        server_pid=server.pid,
    )


def texts_per_request(spec: LoadSpec) -> int:
    """How many texts each request of `spec` carries (``/embed/batch``: its group)."""
    body = spec.bodies[0] if spec.bodies else {}
    return len(body["texts"]) if "texts" in body else 1


def measure(server: Any, spec: LoadSpec, rss_interval_s: float = 0.5) -> dict[str, Any]:
    """One measured run: throughput, latency, mean batch size and fill, the server's CPU per
    completed request (event loop, other threads, total) and its peak RSS."""
    before = counters(server.base_url)
    with RssSampler(server.pid, rss_interval_s) as rss:
        raw = run_load(spec)
    batching = batching_deltas(before, counters(server.base_url))
    latency_ms = {key: value * 1000 for key, value in raw.latency_200_s.items()}
    total_cpu, loop_cpu = raw.server_cpu_s, raw.server_loop_cpu_s
    threads_cpu = None if total_cpu is None or loop_cpu is None else total_cpu - loop_cpu
    return {
        "endpoint": "batch" if spec.path == "/embed/batch" else "embed",
        "clients": spec.clients,
        "requests": raw.attempts,
        "ok": raw.ok,
        "errors": raw.errors,
        "statuses": raw.outcomes,
        "timed_out": raw.timed_out,
        "wall_s": raw.wall_s,
        "embeddings_per_s": raw.ok * texts_per_request(spec) / raw.wall_s if raw.wall_s else 0.0,
        "p50_ms": latency_ms["p50"],
        "p95_ms": latency_ms["p95"],
        "p99_ms": latency_ms["p99"],
        "mean_batch": batching["mean_batch"],
        "fill": batching["fill"],
        "real_tokens": batching["real_tokens"],
        "slot_tokens": batching["slot_tokens"],
        "server_cpu_s": total_cpu,
        "server_loop_cpu_s": loop_cpu,
        "loop_cpu_ms": ms_per_request(loop_cpu, raw.ok),
        "threads_cpu_ms": ms_per_request(threads_cpu, raw.ok),
        "server_cpu_ms": ms_per_request(total_cpu, raw.ok),
        "client_cpu_s": raw.client_cpu_s,
        "other_cpu_s": raw.other_cpu_s,
        "rss_max_mb": rss.max_mb,
    }


def soak(
    server: Any, texts_path: Path, clients: int, duration_s: float, interval_s: float
) -> dict[str, Any]:
    """`clients` closed-loop clients for `duration_s`, RSS sampled every `interval_s`."""
    spec = load_spec(server, texts_path, clients, duration_s=duration_s)
    max_samples = int(duration_s / interval_s) * 2 + 1000
    with RssSampler(server.pid, interval_s, max_samples) as rss:
        raw = run_load(spec)
    samples = [mb for _, mb in rss.samples]
    return {
        "clients": clients,
        "duration_s": raw.wall_s,
        "requests": raw.attempts,
        "errors": raw.errors,
        "statuses": raw.outcomes,
        "embeddings_per_s": raw.ok / raw.wall_s if raw.wall_s else 0.0,
        "p50_ms": raw.latency_200_s["p50"] * 1000,
        "p99_ms": raw.latency_200_s["p99"] * 1000,
        "server_cpu_s": raw.server_cpu_s,
        "client_cpu_s": raw.client_cpu_s,
        "other_cpu_s": raw.other_cpu_s,
        "interval_s": interval_s,
        "samples": [[round(t, 2), round(mb, 2)] for t, mb in rss.samples],
        **rss_trend(samples),
    }
