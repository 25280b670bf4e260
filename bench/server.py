"""The real server under load: one measured run, its /metrics deltas and its memory.

The server is started by `tests.serverutil.running_server` (a subprocess on a free loopback
port); this module only measures it. RSS is sampled from /proc by a thread of this process
while the load generator (another process) drives the server.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from bench.loadgen import LoadSpec, run_load
from bench.stats import ratio, rss_trend


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


def batch_counters(base_url: str) -> tuple[int, int]:
    """(model batches run, texts embedded) so far, from ``GET /metrics``."""
    data = httpx.get(f"{base_url}/metrics", timeout=10).json()
    return int(data["batching"]["batches"]), int(data["total_embeddings"])


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
    """A spec for `server`: by count (`max_requests`), by time (`duration_s`), or both."""
    if max_requests is None and duration_s is None:
        raise ValueError("a load run needs max_requests or duration_s")
    if duration_s is None:
        assert max_requests is not None
        deadline_s = 60.0 + 0.25 * max_requests
    else:
        deadline_s = duration_s + 120.0
    return LoadSpec(
        port=server.port,
        texts_path=str(texts_path),
        clients=clients,
        max_requests=max_requests if max_requests is not None else 10_000_000,
        duration_s=duration_s,
        deadline_s=deadline_s,
        endpoint=endpoint,
        group=group,
        server_pid=server.pid,
    )


def measure(server: Any, spec: LoadSpec, rss_interval_s: float = 0.5) -> dict[str, Any]:
    """One measured run: throughput, latency, mean batch size, CPU and peak RSS."""
    batches0, texts0 = batch_counters(server.base_url)
    with RssSampler(server.pid, rss_interval_s) as rss:
        raw = run_load(spec)
    batches1, texts1 = batch_counters(server.base_url)
    per_request = spec.group if spec.endpoint == "batch" else 1
    latency = raw["latency_ms"]
    return {
        "endpoint": spec.endpoint,
        "clients": spec.clients,
        "requests": raw["sent"],
        "ok": raw["ok"],
        "errors": raw["errors"],
        "statuses": raw["statuses"],
        "timed_out": raw["timed_out"],
        "wall_s": raw["wall_s"],
        "embeddings_per_s": raw["ok"] * per_request / raw["wall_s"] if raw["wall_s"] else 0.0,
        "p50_ms": latency["p50"],
        "p95_ms": latency["p95"],
        "p99_ms": latency["p99"],
        "mean_batch": ratio(texts1 - texts0, batches1 - batches0),
        "server_cpu_s": raw["server_cpu_s"],
        "client_cpu_s": raw["client_cpu_s"],
        "other_cpu_s": raw["other_cpu_s"],
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
        "duration_s": raw["wall_s"],
        "requests": raw["sent"],
        "errors": raw["errors"],
        "statuses": raw["statuses"],
        "embeddings_per_s": raw["ok"] / raw["wall_s"] if raw["wall_s"] else 0.0,
        "p50_ms": raw["latency_ms"]["p50"],
        "p99_ms": raw["latency_ms"]["p99"],
        "server_cpu_s": raw["server_cpu_s"],
        "client_cpu_s": raw["client_cpu_s"],
        "other_cpu_s": raw["other_cpu_s"],
        "interval_s": interval_s,
        "samples": [[round(t, 2), round(mb, 2)] for t, mb in rss.samples],
        **rss_trend(samples),
    }
