"""examples/ingest.py: chunking, Retry-After and the retry loop (httpx MockTransport, sleeps
recorded instead of taken), and one end-to-end run against the real server into Qdrant."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from devkit.launcher import running_server
from examples.ingest import (
    Chunk,
    Embedder,
    IngestError,
    RetryPolicy,
    chunk_text,
    load_documents,
    main,
    open_qdrant,
    parse_retry_after,
    search,
    store,
)
from tests.support import require_exported_model

DATA = Path(__file__).resolve().parent.parent / "examples" / "data"


# -- chunking ------------------------------------------------------------------------------
def test_short_paragraphs_share_a_chunk() -> None:
    assert chunk_text("One.\n\nTwo.\n\n\nThree.", max_chars=100) == ["One.\nTwo.\nThree."]


def test_chunks_respect_the_limit_and_overlap() -> None:
    text = " ".join(f"Sentence number {i} is here." for i in range(40))
    chunks = chunk_text(text, max_chars=120, overlap_chars=30)
    assert len(chunks) > 5
    assert all(len(chunk) <= 120 for chunk in chunks)
    for before, after in itertools.pairwise(chunks):
        carried = after.split("\n")[0]
        assert 0 < len(carried) <= 30
        assert before.endswith(carried)
    # Nothing is lost: every sentence is in some chunk.
    assert all(any(f"number {i} " in chunk for chunk in chunks) for i in range(40))


def test_no_overlap_and_a_word_longer_than_the_limit() -> None:
    chunks = chunk_text("a" * 25 + " tail", max_chars=10, overlap_chars=0)
    assert chunks == ["a" * 10, "a" * 10, "a" * 5 + " tail"]


def test_chunk_text_refuses_bad_limits() -> None:
    with pytest.raises(ValueError):
        chunk_text("x", max_chars=10, overlap_chars=10)


def test_load_documents_from_folder_and_jsonl(tmp_path: Path) -> None:
    docs = load_documents(DATA)
    assert len(docs) >= 10
    assert len({doc.id for doc in docs}) == len(docs)
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"id": 1, "text": "hello"}\n\n{"id": "b", "text": "  "}\n')
    assert [(d.id, d.text) for d in load_documents(jsonl)] == [("1", "hello")]
    jsonl.write_text('{"text": "no id"}\n')
    with pytest.raises(IngestError, match=r"docs\.jsonl:1"):
        load_documents(jsonl)


def test_point_ids_are_stable_per_document_chunk() -> None:
    assert Chunk("a", 0, "x").point_id == Chunk("a", 0, "other text").point_id
    assert Chunk("a", 0, "x").point_id != Chunk("a", 1, "x").point_id


def test_store_creates_a_cosine_collection_and_refuses_another_dimension() -> None:
    qdrant = open_qdrant(None, ":memory:")
    try:
        chunks = [Chunk("north", 0, "up"), Chunk("east", 0, "right")]
        store(qdrant, "docs", chunks, [[0.0, 2.0], [1.0, 0.0]])
        store(qdrant, "docs", chunks[:1], [[0.0, 3.0]])  # same point id: overwritten
        assert qdrant.count("docs").count == 2
        hits = search(qdrant, "docs", [0.1, 1.0], limit=2)
        assert [hit.doc_id for hit in hits] == ["north", "east"]
        assert hits[0].text == "up"
        assert hits[0].score == pytest.approx(1.0 / (1.01**0.5))  # cosine, not dot product
        with pytest.raises(IngestError, match="2-dimensional"):
            store(qdrant, "docs", chunks[:1], [[1.0, 0.0, 0.0]])
        store(qdrant, "docs", chunks[:1], [[1.0, 0.0, 0.0]], recreate=True)
        assert qdrant.count("docs").count == 1
    finally:
        qdrant.close()


# -- Retry-After and backoff ---------------------------------------------------------------
def test_parse_retry_after() -> None:
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("3", now) == 3.0
    assert parse_retry_after(" 0 ", now) == 0.0
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:07 GMT", now) == 7.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now) == 0.0
    assert parse_retry_after(None, now) is None
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after("-1", now) is None


def test_retry_policy_delays() -> None:
    policy = RetryPolicy(attempts=5, base_delay_s=0.5, max_delay_s=3.0)
    assert [policy.backoff_s(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert policy.delay_s(1, "2") == 2.0
    assert policy.delay_s(1, "120") == 3.0
    assert policy.delay_s(3, None) == 2.0


# -- the retry loop against a scripted server ----------------------------------------------
Handler = Callable[[httpx.Request], httpx.Response]


def scripted(responses: list[httpx.Response | Exception]) -> tuple[Handler, list[httpx.Request]]:
    """A MockTransport handler answering `responses` in order, and the requests it saw."""
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        answer = responses.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    return handle, seen


def embedder(handler: Handler, sleeps: list[float], **kwargs: object) -> Embedder:
    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)

    client = httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://test")
    return Embedder(client, sleep=sleep, **kwargs)  # type: ignore[arg-type]


def ok(vectors: list[list[float]]) -> httpx.Response:
    return httpx.Response(200, json={"embeddings": vectors, "dimension": len(vectors[0])})


@pytest.mark.anyio
async def test_429_then_200_honours_retry_after() -> None:
    overloaded = {"error": "queue full", "error_type": "overloaded"}
    handler, seen = scripted(
        [
            httpx.Response(429, json=overloaded, headers={"Retry-After": "2"}),
            httpx.ConnectError("refused"),
            httpx.Response(503, json={"error": "draining", "error_type": "shutting_down"}),
            ok([[1.0, 0.0], [0.0, 1.0]]),
        ]
    )
    sleeps: list[float] = []
    client = embedder(handler, sleeps, policy=RetryPolicy(base_delay_s=0.25))
    async with client.client:
        vectors = await client.embed(["a", "b"])
    assert vectors == [[1.0, 0.0], [0.0, 1.0]]
    assert sleeps == [2.0, 0.5, 1.0]  # Retry-After, then backoff after attempts 2 and 3
    assert len(seen) == 4
    assert all(json.loads(r.content) == {"texts": ["a", "b"]} for r in seen)
    assert all(r.headers["X-Priority"] == "bulk" for r in seen)  # the ingestion is bulk


@pytest.mark.anyio
async def test_400_fails_fast_with_the_servers_message() -> None:
    refusal = {"error": "text 0 is blank", "error_type": "validation_error"}
    handler, seen = scripted([httpx.Response(422, json=refusal)])
    sleeps: list[float] = []
    client = embedder(handler, sleeps)
    async with client.client:
        with pytest.raises(IngestError, match="HTTP 422: text 0 is blank"):
            await client.embed([" "])
    assert len(seen) == 1
    assert sleeps == []


@pytest.mark.anyio
async def test_openai_error_shape_and_bounded_attempts() -> None:
    limited = {"error": {"message": "slow down", "type": "rate_limit_error", "code": "x"}}
    handler, seen = scripted([httpx.Response(429, json=limited) for _ in range(3)])
    sleeps: list[float] = []
    client = embedder(handler, sleeps, endpoint="openai", model="m", policy=RetryPolicy(attempts=3))
    async with client.client:
        with pytest.raises(IngestError, match="failed 3 times; last: HTTP 429: slow down"):
            await client.embed(["a"])
    assert len(seen) == 3
    assert len(sleeps) == 2  # no sleep after the last attempt
    assert json.loads(seen[0].content)["model"] == "m"


@pytest.mark.anyio
async def test_batches_keep_order_and_concurrency_is_bounded() -> None:
    in_flight = 0
    peak = 0

    async def handle(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        texts = json.loads(request.content)["input"]
        data = [{"index": i, "embedding": [float(t)]} for i, t in reversed(list(enumerate(texts)))]
        return httpx.Response(200, json={"data": data})

    client = httpx.AsyncClient(transport=httpx.MockTransport(handle), base_url="http://test")
    async with client:
        emb = Embedder(client, endpoint="openai", model="m", batch_size=3, concurrency=2)
        vectors = await emb.embed([str(i) for i in range(20)])
    assert vectors == [[float(i)] for i in range(20)]
    assert peak == 2


@pytest.mark.anyio
async def test_wait_ready_polls_until_200() -> None:
    not_yet = httpx.Response(503, json={"status": "not_ready"})
    handler, seen = scripted([not_yet, httpx.ConnectError("refused"), httpx.Response(200)])
    sleeps: list[float] = []
    client = embedder(handler, sleeps)
    async with client.client:
        await client.wait_ready(timeout_s=5.0, poll_s=0.0)
    assert [r.url.path for r in seen] == ["/ready"] * 3
    assert sleeps == [0.0, 0.0]


@pytest.mark.anyio
async def test_wait_ready_gives_up_after_its_bound() -> None:
    handler, seen = scripted([httpx.ConnectError("refused")])
    client = embedder(handler, [])
    async with client.client:
        with pytest.raises(IngestError, match=r"not ready within 0s \(ConnectError: refused\)"):
            await client.wait_ready(timeout_s=0.0, poll_s=1.0)
    assert len(seen) == 1


# -- end to end: the real server, the real model, embedded Qdrant ------------------------
# Each query paraphrases one document without sharing its key words where possible.
EXPECTED = {
    "How do insects turn flower nectar into something sweet?": "beekeeping",
    "What makes the sea rise and fall twice a day?": "tides",
    "Why does the sky glow green near the Arctic?": "northern-lights",
    "How should I tune the strings on my instrument?": "guitar",
    "How does the body learn to fight off a virus without getting sick?": "vaccines",
}


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_ingest_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    require_exported_model()
    with running_server({"API_KEYS": "ingest-test-key-0123456789"}, log_dir=tmp_path) as server:
        argv = [
            str(DATA),
            "--server",
            server.base_url,
            "--api-key",
            "ingest-test-key-0123456789",
            "--qdrant-path",
            str(tmp_path / "qdrant"),
            "--max-chars",
            "300",
            "--batch-size",
            "8",
            "--ready-timeout-s",
            "30",
            "--json",
        ]
        for query in EXPECTED:
            argv += ["--query", query]
        status = main(argv)
    out, err = capsys.readouterr()
    assert status == 0, err
    results = json.loads(out)
    top = {query: hits[0]["doc_id"] for query, hits in results.items()}
    print(json.dumps({q: hits[0] for q, hits in results.items()}, indent=1))
    assert top == EXPECTED
    assert "dimension 384" in err
