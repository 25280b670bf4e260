"""LRU/TTL churn on the real server: clients rotate over more models than MAX_CACHED_MODELS.

The extra models are hard-linked copies of the exported model under other names, so every
answer, whichever copy served it, must equal the required model's embedding of the same text:
a model evicted or closed while its batch ran could not produce that. The registry's own
counters (/metrics) and log lines show that churn really happened, and RSS is read from
/proc before, during and after the TTL has offloaded the copies.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import pytest

from devkit.launcher import DEFAULT_MODEL, MANIFEST_FILE, ROOT, ServerProcess, running_server
from devkit.procfs import proc_status
from tests.reliability import Recorder
from tests.support import uniform_texts

pytestmark = [pytest.mark.integration, pytest.mark.reliability, pytest.mark.anyio]

COPIES = [f"churn/minilm-{i}" for i in range(1, 5)]
MAX_CACHED = 3  # the pinned required model + 2 slots for 4 copies: every rotation evicts
CLIENTS = 6
CHURN_S = 35.0
TTL_S = 4.0
CLEANUP_S = 1.0
TEXTS_PER_REQUEST = 4
MIN_COSINE = 0.9999
HTTP_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
# The copies are offloaded within TTL + one sweep; the rest is margin for a noisy machine.
OFFLOAD_WAIT_S = TTL_S + CLEANUP_S + 20.0
# Freed ONNX Runtime arenas and glibc's malloc caches are not all handed back to the OS, so
# "near baseline" is the baseline plus half of what one loaded copy added to RSS: one model
# left resident (a leak of any copy) would exceed it; allocator slack (11-14 MiB measured
# after 120+ loads, against 113 MiB per model) does not.
RESIDUAL_SHARE = 0.5


@pytest.fixture
def churn_models(exported_model: Path) -> Iterator[Path]:
    """A models directory holding the exported model and `COPIES` of it under other names.

    Files are hard-linked (same file system as the original, so no 90 MB copies); each copy
    gets its own manifest naming it, as `embedserve models import` would write it.
    """
    build = ROOT / "build"
    build.mkdir(exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="churn-models-", dir=build))
    try:
        manifest = json.loads((exported_model / MANIFEST_FILE).read_text())
        for name in [DEFAULT_MODEL, *COPIES]:
            target = root / name
            target.mkdir(parents=True)
            for source in exported_model.iterdir():
                if source.name == MANIFEST_FILE or not source.is_file():
                    continue
                try:
                    os.link(source, target / source.name)
                except OSError:  # another file system, or links not allowed: copy
                    shutil.copy2(source, target / source.name)
            (target / MANIFEST_FILE).write_text(json.dumps({**manifest, "name": name}))
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def rss_mib(pid: int) -> float:
    """Resident set size of process `pid` in MiB."""
    return proc_status(pid)["VmRSS"] / 2**20


async def settled_rss(pid: int, samples: int = 5, interval_s: float = 0.2) -> float:
    """The smallest of a few RSS readings (a reading can catch a transient allocation)."""
    readings = []
    for _ in range(samples):
        readings.append(rss_mib(pid))
        await asyncio.sleep(interval_s)
    return min(readings)


async def metrics(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    return np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))


@dataclass
class Tally:
    """What the churn clients saw."""

    requests: int = 0
    ok: int = 0
    by_model: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    worst_cosine: float = 1.0


async def churn_client(
    client: httpx.AsyncClient,
    index: int,
    texts: list[str],
    reference: np.ndarray,
    stop_at: float,
    tally: Tally,
) -> None:
    """Rotate over the copies (each client from its own offset), now and then the default."""
    models = [*COPIES, DEFAULT_MODEL]
    step = index
    while time.monotonic() < stop_at:
        model = models[step % len(models)]
        first = (step * TEXTS_PER_REQUEST) % (len(texts) - TEXTS_PER_REQUEST)
        chosen = list(range(first, first + TEXTS_PER_REQUEST))
        step += 1
        tally.requests += 1
        try:
            response = await client.post(
                "/embed/batch",
                json={"texts": [texts[i] for i in chosen], "model_name": model},
            )
        except httpx.HTTPError as exc:
            tally.failures.append(f"{model}: {type(exc).__name__}")
            continue
        if response.status_code != 200:
            tally.failures.append(f"{model}: {response.status_code} {response.text[:200]}")
            continue
        body = response.json()
        got = np.asarray(body["embeddings"], dtype=np.float32)
        similarity = float(cosines(got, reference[chosen]).min())
        tally.worst_cosine = min(tally.worst_cosine, similarity)
        if body["model_name"] != model or similarity < MIN_COSINE:
            tally.failures.append(f"{model}: wrong answer (cosine {similarity:.6f})")
            continue
        tally.ok += 1
        tally.by_model[model] = tally.by_model.get(model, 0) + 1


async def sample_peak(pid: int, stop: asyncio.Event, peak: list[float]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], rss_mib(pid))
        await asyncio.sleep(0.1)


async def wait_for_offload(client: httpx.AsyncClient, server: ServerProcess) -> list[str]:
    """Poll until only the required model is loaded (bounded); the names still loaded."""
    deadline = time.monotonic() + OFFLOAD_WAIT_S
    names: list[str] = []
    while time.monotonic() < deadline:
        names = (await metrics(client))["cache_info"]["cached_models"]
        if names == [DEFAULT_MODEL]:
            break
        await asyncio.sleep(0.25)
    return names


async def test_lru_and_ttl_churn_answers_everything_and_gives_memory_back(
    churn_models: Path, reliability: Recorder
) -> None:
    env = {
        "MODELS_DIR": str(churn_models),
        "ALLOWED_MODELS": ",".join([DEFAULT_MODEL, *COPIES]),
        "MAX_CACHED_MODELS": str(MAX_CACHED),
        "MODEL_CACHE_TTL": str(TTL_S),
        "CLEANUP_INTERVAL": str(CLEANUP_S),
        "PIN_REQUIRED_MODELS": "true",
        "ORT_THREADS": "1",
        "ACCESS_LOG": "false",
    }
    texts = uniform_texts(32, seed=7)  # MAX_BATCH_SIZE: one warm-up request
    tally = Tally()
    started = time.monotonic()
    with running_server(env) as server, anyio.fail_after(150):
        async with httpx.AsyncClient(base_url=server.base_url, timeout=HTTP_TIMEOUT) as client:
            warm = await client.post("/embed/batch", json={"texts": texts})
            assert warm.status_code == 200, warm.text
            reference = np.asarray(warm.json()["embeddings"], dtype=np.float32)
            baseline = await settled_rss(server.pid)

            # One copy alone: what one loaded model adds to RSS.
            single = await client.post(
                "/embed/batch", json={"texts": texts[:4], "model_name": COPIES[0]}
            )
            assert single.status_code == 200, single.text
            one_model = await settled_rss(server.pid) - baseline

            stop = asyncio.Event()
            peak = [rss_mib(server.pid)]
            sampler = asyncio.create_task(sample_peak(server.pid, stop, peak))
            churn_started = time.monotonic()
            stop_at = churn_started + CHURN_S
            await asyncio.gather(
                *(churn_client(client, i, texts, reference, stop_at, tally) for i in range(CLIENTS))
            )
            churn_s = time.monotonic() - churn_started
            stop.set()
            await sampler
            during = await metrics(client)

            still_loaded = await wait_for_offload(client, server)
            after = await settled_rss(server.pid, samples=10)
            final = await metrics(client)
        log = server.log()

    batching = final["batching"]
    evictions, offloads = batching["evictions"], batching["offloads"]
    loads = len(re.findall(r"model \S+ loaded in", log))
    evicted_lines = len(re.findall(r"evicting least recently used model", log))
    failed_batches = sum(m["failed_batches"] for m in during["batching"]["models"].values())
    dropped = sum(m["dropped_texts"] for m in during["batching"]["models"].values())
    bound = baseline + RESIDUAL_SHARE * one_model
    reliability.record(
        "Churn",
        "LRU/TTL churn",
        tried=(
            f"{len(COPIES)} copies + the required model rotated by {CLIENTS} clients, "
            f"MAX_CACHED_MODELS={MAX_CACHED}, MODEL_CACHE_TTL={TTL_S:g}s"
        ),
        amount=f"{tally.requests} requests in {churn_s:.0f} s",
        outcome=(
            f"{len(tally.failures)} errors; {evictions} evictions, {offloads} offloads, "
            f"{loads} loads; {failed_batches} failed batches; worst cosine "
            f"{tally.worst_cosine:.6f}; RSS baseline {baseline:.0f} MiB, one model "
            f"+{one_model:.0f} MiB, peak {peak[0]:.0f} MiB, after offload {after:.0f} MiB "
            f"(bound {bound:.0f})"
        ),
    )
    assert not tally.failures, tally.failures[:10]
    assert tally.ok == tally.requests > 0
    assert set(tally.by_model) == {DEFAULT_MODEL, *COPIES}
    assert failed_batches == 0 and dropped == 0, during["batching"]["models"]
    # Churn really happened: the registry evicted (LRU) and reloaded copies many times.
    assert evictions > len(COPIES), (evictions, loads)
    assert evicted_lines == evictions
    # Every copy that was loaded left by LRU eviction or TTL offload, none any other way.
    assert loads == 1 + evictions + offloads, (loads, evictions, offloads)
    # TTL offload left only the pinned required model, and its memory went back.
    assert still_loaded == [DEFAULT_MODEL]
    assert offloads >= 1
    assert one_model > 20, one_model  # a real model was measured, so the bound means something
    assert peak[0] >= baseline + one_model
    # At most MAX_CACHED - 1 copies are loaded, plus one load in flight per copy name: more
    # would mean evicted copies were not freed (149 loads x 100+ MiB would show at once).
    assert peak[0] <= baseline + (MAX_CACHED - 1 + len(COPIES)) * one_model
    assert after <= bound, (baseline, one_model, peak[0], after)
    assert time.monotonic() - started < 120
