"""The real server (subprocess, real ONNX model) under concurrency, batch splitting and SIGTERM.

Every answer is checked against an in-process embedding of the same text made with the loader
the server uses, so a batching mix-up (a request getting another request's row) fails.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import numpy as np
import pytest

from devkit.launcher import DEFAULT_MODEL, ServerProcess, models_dir, running_server
from tests.support import spread_texts

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

MIN_COSINE = 0.9999
CLIENTS = 64
BURSTS = 3
GRACE_S = 10.0
EXIT_MARGIN_S = 10.0
HTTP_TIMEOUT = httpx.Timeout(60.0, connect=10.0)


@pytest.fixture(scope="module")
def model_dir(exported_model: Path) -> Path:
    return exported_model


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> Iterator[Any]:
    """The model loaded in this process exactly as the server loads it."""
    from embedserve.engine.backend import load_local
    from embedserve.models.store import ModelStore

    manifest = ModelStore(models_dir()).get(DEFAULT_MODEL)
    assert manifest is not None
    backend = load_local(model_dir, manifest, threads=None)
    yield backend
    backend.close()


@pytest.fixture
def server(request: pytest.FixtureRequest, model_dir: Path, tmp_path: Path) -> Iterator[Any]:
    """The real server on a free loopback port; indirect parametrisation adds env settings."""
    env = {"SHUTDOWN_GRACE_S": str(GRACE_S), **getattr(request, "param", {})}
    with running_server(env, log_dir=tmp_path) as proc:
        yield proc


def embed_in_process(backend: Any, texts: list[str]) -> np.ndarray:
    """Reference rows for `texts`, in order (length-sorted chunks keep padding small)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    rows = np.zeros((len(texts), backend.dimension), dtype=np.float32)
    for start in range(0, len(order), 16):
        chunk = order[start : start + 16]
        rows[chunk] = backend.embed([texts[i] for i in chunk])
    return rows


def cosines(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity."""
    dot = np.sum(got * want, axis=1)
    norms = np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1)
    result: np.ndarray = dot / norms
    return result


def assert_distinguishable(want: np.ndarray) -> None:
    """So the checks can fail: no two texts' reference rows are within MIN_COSINE."""
    unit = want / np.linalg.norm(want, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -1.0)
    assert similarity.max() < MIN_COSINE, "two test texts embed alike; a mix-up would pass"


async def get_metrics(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


async def test_concurrent_single_texts_are_batched_without_cross_talk(
    server: ServerProcess, reference: Any
) -> None:
    bursts = [spread_texts(CLIENTS, seed=100 + b) for b in range(BURSTS)]
    want = [embed_in_process(reference, texts) for texts in bursts]
    assert_distinguishable(np.concatenate(want))

    limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
    async with httpx.AsyncClient(
        base_url=server.base_url, timeout=HTTP_TIMEOUT, limits=limits
    ) as client:

        async def one(text: str) -> list[float]:
            response = await client.post("/embed", json={"text": text})
            assert response.status_code == 200, response.text
            embedding: list[float] = response.json()["embedding"]
            return embedding

        for texts, expected in zip(bursts, want, strict=True):
            with anyio.fail_after(90):
                got = await asyncio.gather(*(one(text) for text in texts))
            similarity = cosines(np.asarray(got, dtype=np.float32), expected)
            worst = int(np.argmin(similarity))
            assert similarity[worst] >= MIN_COSINE, (
                f"text {worst} ({len(texts[worst].split())} words) has cosine "
                f"{similarity[worst]:.6f} with its own in-process embedding"
            )
        metrics = await get_metrics(client)

    batching = metrics["batching"]
    assert metrics["total_embeddings"] == CLIENTS * BURSTS
    assert batching["batches"] < CLIENTS * BURSTS, batching
    assert batching["mean_batch_size"] > 1, batching


@pytest.mark.parametrize(
    "server", [{}, {"BATCH_MAX_TEXTS": "4"}], indirect=True, ids=["default", "max_texts_4"]
)
async def test_batch_endpoint_reassembles_in_order(server: ServerProcess, reference: Any) -> None:
    texts = spread_texts(32, seed=7, max_words=150)
    texts[17] = texts[5]  # duplicates share one model row and must still both come back
    want = embed_in_process(reference, texts)
    assert_distinguishable(np.delete(want, 17, axis=0))

    async with httpx.AsyncClient(base_url=server.base_url, timeout=HTTP_TIMEOUT) as client:
        before = (await get_metrics(client))["batching"]["batches"]
        with anyio.fail_after(60):
            response = await client.post("/embed/batch", json={"texts": texts})
        assert response.status_code == 200, response.text
        body = response.json()
        after = (await get_metrics(client))["batching"]["batches"]

    assert body["count"] == len(texts)
    got = np.asarray(body["embeddings"], dtype=np.float32)
    assert got.shape == want.shape
    similarity = cosines(got, want)
    worst = int(np.argmin(similarity))
    assert similarity[worst] >= MIN_COSINE, f"row {worst} has cosine {similarity[worst]:.6f}"
    max_texts = int(server.settings.get("BATCH_MAX_TEXTS", "64"))
    distinct = len(set(texts))
    assert after - before >= -(-distinct // max_texts), "the request was not split as configured"


@dataclass
class Outcome:
    """How one request ended: an HTTP status, or the transport error that ended it."""

    status: int | None = None
    error: str | None = None  # the transport error, or the body's error_type
    embedding: list[float] | None = None
    finished: float = 0.0


def _summary(outcomes: list[Outcome]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for outcome in outcomes:
        key = f"{outcome.status or ''} {outcome.error or ''}".strip()
        counts[key] = counts.get(key, 0) + 1
    return counts


async def _send(client: httpx.AsyncClient, text: str, outcome: Outcome) -> None:
    try:
        response = await client.post("/embed", json={"text": text})
    except httpx.TransportError as exc:
        outcome.error = type(exc).__name__
    else:
        outcome.status = response.status_code
        if response.status_code == 200:
            outcome.embedding = response.json()["embedding"]
        elif response.headers.get("content-type", "").startswith("application/json"):
            outcome.error = response.json().get("error_type")
        else:
            outcome.error = repr(response.text[:40])
    outcome.finished = time.monotonic()


async def _admitted(probe: httpx.AsyncClient, base: dict[str, Any], signal_when: str) -> int:
    """How many of our requests the server has received, or handed to its batcher."""
    metrics = await get_metrics(probe)
    if signal_when == "received":
        return int(metrics["total_requests"] - base["total_requests"])
    model = metrics["batching"]["models"][DEFAULT_MODEL]
    done = metrics["total_embeddings"] - base["total_embeddings"]
    return int(model["queue_depth"] + model["in_flight"] + done)


@pytest.mark.parametrize("signal_when", ["queued", "received"])
async def test_sigterm_answers_every_request_sent_before_it(
    server: ServerProcess, reference: Any, signal_when: str
) -> None:
    """SIGTERM once 32 requests are all in the batcher ("queued") or all received by the
    server ("received"): either way every one of them is served."""
    texts = spread_texts(32, seed=23, min_words=150, max_words=200)
    late_texts = spread_texts(8, seed=29, min_words=5, max_words=10)
    want = embed_in_process(reference, texts)
    early = [Outcome() for _ in texts]
    late = [Outcome() for _ in late_texts]

    # No keep-alive: every request opens its own connection, so none can race the server
    # closing an idle connection; a reset here would be the server's doing.
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
    async with (
        httpx.AsyncClient(base_url=server.base_url, timeout=HTTP_TIMEOUT, limits=limits) as client,
        httpx.AsyncClient(base_url=server.base_url, timeout=HTTP_TIMEOUT) as probe,
    ):
        base = await get_metrics(probe)
        with anyio.fail_after(GRACE_S + 40):
            async with anyio.create_task_group() as group:
                for text, outcome in zip(texts, early, strict=True):
                    group.start_soon(_send, client, text, outcome)
                for _ in range(1000):  # bounded: about 20 s
                    if await _admitted(probe, base, signal_when) >= len(texts):
                        break
                    await anyio.sleep(0.02)
                else:
                    pytest.fail(f"the server never took all {len(texts)} requests")
                signalled = time.monotonic()
                server.send_signal(signal.SIGTERM)
                unanswered = sum(o.finished == 0.0 for o in early)
                for text, outcome in zip(late_texts, late, strict=True):
                    group.start_soon(_send, client, text, outcome)

    status = await anyio.to_thread.run_sync(server.wait, GRACE_S + EXIT_MARGIN_S)
    exit_s = time.monotonic() - signalled
    report = (
        f"signal once {signal_when}, {unanswered} unanswered then; early: {_summary(early)}; "
        f"late: {_summary(late)}; exit status {status} after {exit_s:.2f}s"
    )
    print(report)

    assert status is not None, f"still running {GRACE_S + EXIT_MARGIN_S}s after SIGTERM"
    # An upper bound: the clock stops at the later of the exit and the last answer.
    assert exit_s <= GRACE_S + EXIT_MARGIN_S, report
    # uvicorn re-raises the signal after its graceful shutdown, so -SIGTERM is a clean exit.
    assert status in (0, -signal.SIGTERM), report
    assert "models released" in server.log(), server.log(4000)
    # The last line: written by the log thread before uvicorn re-raises the signal.
    assert "Finished server process" in server.log(), server.log(4000)
    assert unanswered > 0, f"all answered before the signal; the test proves nothing: {report}"
    # Both: a request the server received before the signal is served, not refused.
    assert all(o.status == 200 for o in early), report
    for index, outcome in enumerate(early):
        if outcome.embedding is not None:
            row = np.asarray([outcome.embedding], dtype=np.float32)
            assert cosines(row, want[index : index + 1])[0] >= MIN_COSINE, index
    # Sent after the signal: refused (503) or not connected, never served.
    assert all(o.status in (None, 503) for o in late), report


async def test_grace_running_out_answers_queued_requests_with_503_not_500(
    model_dir: Path, tmp_path: Path
) -> None:
    """With more queued work than a 1 s grace can finish, what is left gets a JSON 503."""
    texts = spread_texts(96, seed=31, min_words=150, max_words=200)
    outcomes = [Outcome() for _ in texts]
    env = {"SHUTDOWN_GRACE_S": "1", "ENABLE_BATCHING": "false"}
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=0)
    with running_server(env, log_dir=tmp_path) as server:
        async with (
            httpx.AsyncClient(base_url=server.base_url, timeout=HTTP_TIMEOUT, limits=limits) as c,
            httpx.AsyncClient(base_url=server.base_url, timeout=HTTP_TIMEOUT) as probe,
        ):
            base = await get_metrics(probe)
            with anyio.fail_after(60):
                async with anyio.create_task_group() as group:
                    for text, outcome in zip(texts, outcomes, strict=True):
                        group.start_soon(_send, c, text, outcome)
                    for _ in range(1000):  # bounded: about 20 s
                        if await _admitted(probe, base, "queued") >= len(texts):
                            break
                        await anyio.sleep(0.02)
                    server.send_signal(signal.SIGTERM)
        status = await anyio.to_thread.run_sync(server.wait, 1 + EXIT_MARGIN_S)
    report = f"{_summary(outcomes)}; exit status {status}"
    print(report)
    assert status is not None, report
    assert all(o.status in (200, 503) for o in outcomes), report
    assert all(o.error in (None, "shutting_down") for o in outcomes), report
    assert any(o.status == 503 for o in outcomes), f"the grace never ran out: {report}"
