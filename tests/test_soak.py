"""Soak: the real server under steady moderate load for a few minutes.

~100k short requests from 48 keep-alive clients (as many as fit in SOAK_BOUND_S on a slow
machine; the real count is reported). Every answer must be a 200; after warm-up the
server's RSS may grow by less than 5%, and once idle again its event-loop tasks and open
file descriptors are back to what they were before the load.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx
import pytest

from devkit.launcher import ServerProcess, running_server
from devkit.loadclient import LoadProcess, LoadSpec
from devkit.procfs import proc_status
from tests.reliability import Recorder
from tests.support import backlog, mib, scrape, uniform_texts

pytestmark = [pytest.mark.integration, pytest.mark.reliability, pytest.mark.anyio]

CLIENTS = 48
REQUESTS = 100_000
SOAK_BOUND_S = 240.0
# Below this many requests the run says little about leaks: fail rather than pass vacuously.
MIN_REQUESTS = 20_000
WARMUP_S = 20.0
SAMPLE_EVERY_S = 2.0
MAX_RSS_GROWTH = 0.05
SETTLE_S = 10.0


@dataclass
class Snapshot:
    """The server's resources at one moment."""

    at: float
    rss: int
    fds: int
    tasks: int
    threads: int


async def snapshot(server: ServerProcess, probe: httpx.AsyncClient) -> Snapshot:
    metrics = await scrape(probe)
    status = proc_status(server.pid)
    return Snapshot(
        at=time.monotonic(),
        rss=status["VmRSS"],
        fds=int(metrics["process_open_fds"]),
        tasks=int(metrics["embedserve_event_loop_tasks"]),
        threads=status["Threads"],
    )


async def settled(server: ServerProcess, probe: httpx.AsyncClient, like: Snapshot) -> Snapshot:
    """A snapshot once the server is idle and its fds and tasks are back to `like`'s (closed
    connections are noticed a moment later), or the last one after SETTLE_S."""
    with anyio.move_on_after(SETTLE_S):
        while True:
            now = await snapshot(server, probe)
            if (await backlog(probe)).idle and (now.fds, now.tasks) == (like.fds, like.tasks):
                return now
            await anyio.sleep(0.1)
    return await snapshot(server, probe)


@pytest.mark.timeout(SOAK_BOUND_S + 180)
async def test_soak_keeps_memory_tasks_and_fds_flat(
    exported_model: Path, tmp_path: Path, reliability: Recorder
) -> None:
    texts = uniform_texts(3000, seed=47, min_words=2, max_words=10)
    series: list[Snapshot] = []
    with running_server({}, log_dir=tmp_path) as server:
        spec = LoadSpec(
            port=server.port,
            path="/embed",
            bodies=[{"text": text} for text in texts],
            clients=CLIENTS,
            duration_s=SOAK_BOUND_S,
            deadline_s=SOAK_BOUND_S + 60,
            max_requests=REQUESTS,
        )
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10.0) as probe:
            before = await snapshot(server, probe)
            load = await LoadProcess.start(spec, tmp_path / "load.json")
            try:
                started = await load.started()
                with anyio.fail_after(spec.deadline_s + 60):
                    while load.running():
                        series.append(await snapshot(server, probe))
                        await anyio.sleep(SAMPLE_EVERY_S)
                result = await load.result()
            finally:
                await load.aclose()
            end = await snapshot(server, probe)
            after = await settled(server, probe, before)

    warm = next((s for s in series if s.at >= started + WARMUP_S), end)
    seconds = result.ended - result.started
    growth = (end.rss - warm.rss) / warm.rss
    peak = max(s.rss for s in [*series, end])
    errors = result.attempts - result.count("200")
    reliability.record(
        "Soak",
        "steady load, short texts",
        tried=(
            f"{CLIENTS} keep-alive clients POSTing /embed (one 2-10 word text each, from a "
            "deterministic corpus of 3,000) in a closed loop; default settings"
        ),
        amount=f"{result.attempts} requests, {CLIENTS} clients, {seconds:.0f} s",
        outcome=(
            f"{result.attempts / seconds:.0f} requests/s; {errors} errors; RSS "
            f"{mib(warm.rss)} after {WARMUP_S:g} s warm-up, {mib(end.rss)} at the end "
            f"({growth:+.1%}, peak {mib(peak)}); event-loop tasks {before.tasks} before, "
            f"{after.tasks} after; open fds {before.fds} before, {after.fds} after; "
            f"threads {before.threads} before, {after.threads} after; p99 "
            f"{result.latency_200_s['p99'] * 1000:.0f} ms"
        ),
    )
    assert errors == 0, result.outcomes
    assert result.attempts >= MIN_REQUESTS, f"only {result.attempts} requests in {seconds:.0f}s"
    assert warm is not end, "the load ended before warm-up did"
    assert growth < MAX_RSS_GROWTH, [mib(s.rss) for s in series]
    assert after.tasks == before.tasks, (before, after)
    assert after.fds == before.fds, (before, after)
