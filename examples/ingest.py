"""Ingestion sidecar: chunk documents, embed them through embedserve, upsert them into Qdrant.

Run ``python -m examples.ingest examples/data --query "how do bees make honey"`` against a
server on ``http://127.0.0.1:8000``. Embedding is async (httpx, at most ``--concurrency``
requests in flight, retries on 429/503 and connection errors); Qdrant is used synchronously
after all vectors are in, through ``qdrant-client`` (embedded, or a server with
``--qdrant-url``).
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import json
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx
from qdrant_client import QdrantClient, models

Endpoint = Literal["batch", "openai"]
Sleep = Callable[[float], Awaitable[None]]

RETRY_STATUSES = frozenset({429, 503})
DOCUMENT_SUFFIXES = frozenset({".txt", ".md"})
# uuid5 namespace for point ids: re-ingesting the same document overwrites its own points.
POINT_NAMESPACE = uuid.UUID("5b0f4b9e-8d1a-4c57-9a59-2a1c0e6f3d10")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


class IngestError(RuntimeError):
    """Ingestion cannot go on: a refused request, retries used up, or the server not ready."""


@dataclass(frozen=True)
class Document:
    id: str
    text: str


@dataclass(frozen=True)
class Chunk:
    doc_id: str
    index: int
    text: str

    @property
    def point_id(self) -> str:
        return str(uuid.uuid5(POINT_NAMESPACE, f"{self.doc_id}#{self.index}"))


@dataclass(frozen=True)
class Hit:
    doc_id: str
    score: float
    text: str


# -- documents and chunks -------------------------------------------------------------------
def load_documents(source: Path) -> list[Document]:
    """Documents from a folder of .txt/.md files (id: path relative to it, without suffix)
    or from a JSONL file of ``{"id", "text"}`` objects. Raises IngestError on bad input."""
    if source.is_dir():
        files = sorted(p for p in source.rglob("*") if p.suffix in DOCUMENT_SUFFIXES)
        docs = [
            Document(str(p.relative_to(source).with_suffix("")), p.read_text(encoding="utf-8"))
            for p in files
        ]
    elif source.is_file():
        docs = []
        lines = source.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                docs.append(Document(str(record["id"]), str(record["text"])))
            except (ValueError, KeyError, TypeError) as exc:
                raise IngestError(f"{source}:{number}: not a {{'id', 'text'}} object") from exc
    else:
        raise IngestError(f"{source}: no such file or directory")
    return [doc for doc in docs if doc.text.strip()]


def _split_long(text: str, limit: int) -> list[str]:
    """`text` cut at whitespace into pieces of at most `limit` characters (a single longer
    word is cut where it must)."""
    pieces: list[str] = []
    while len(text) > limit:
        cut = text.rfind(" ", 0, limit + 1)
        cut = cut if cut > 0 else limit
        pieces.append(text[:cut].strip())
        text = text[cut:].strip()
    return [*pieces, text] if text else pieces


def _units(text: str, max_chars: int) -> list[str]:
    """Paragraphs; sentences of paragraphs longer than `max_chars`; pieces of longer sentences."""
    units: list[str] = []
    for paragraph in _PARAGRAPH_BREAK.split(text):
        paragraph = " ".join(paragraph.split())
        if len(paragraph) <= max_chars:
            units.append(paragraph)
            continue
        for sentence in _SENTENCE_END.split(paragraph):
            units.extend(_split_long(sentence, max_chars))
    return [unit for unit in units if unit]


def _tail(text: str, overlap_chars: int) -> str:
    """The last `overlap_chars` characters of `text`, starting at a word boundary."""
    if overlap_chars <= 0 or len(text) <= overlap_chars:
        return text if overlap_chars > 0 else ""
    window = text[-overlap_chars:]
    space = window.find(" ")
    return window[space + 1 :] if space >= 0 else window


def chunk_text(text: str, max_chars: int = 800, overlap_chars: int = 80) -> list[str]:
    """Pack paragraphs (or sentences, for long paragraphs) greedily into chunks of at most
    `max_chars` characters; each chunk after the first starts with the last `overlap_chars`
    characters of the one before when they fit."""
    if max_chars <= 0 or not 0 <= overlap_chars < max_chars:
        raise ValueError("need max_chars > 0 and 0 <= overlap_chars < max_chars")
    chunks: list[str] = []
    current = ""
    for unit in _units(text, max_chars):
        if current and len(current) + 1 + len(unit) <= max_chars:
            current = f"{current}\n{unit}"
            continue
        if current:
            chunks.append(current)
            carried = _tail(current, overlap_chars)
            if carried and len(carried) + 1 + len(unit) <= max_chars:
                current = f"{carried}\n{unit}"
                continue
        current = unit
    if current:
        chunks.append(current)
    return chunks


def chunk_documents(docs: Sequence[Document], max_chars: int, overlap_chars: int) -> list[Chunk]:
    """Every document's chunks, in document order."""
    return [
        Chunk(doc.id, index, text)
        for doc in docs
        for index, text in enumerate(chunk_text(doc.text, max_chars, overlap_chars))
    ]


# -- retries -----------------------------------------------------------------------------
def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or an HTTP date), never
    negative; None when absent or unparsable."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry. Waits are capped at `max_delay_s`."""

    attempts: int = 6
    base_delay_s: float = 0.5
    max_delay_s: float = 30.0

    def backoff_s(self, attempt: int) -> float:
        """Exponential backoff after failed attempt number `attempt` (1-based)."""
        return float(min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1)))

    def delay_s(self, attempt: int, retry_after: str | None) -> float:
        """The server's ``Retry-After`` when it gave a usable one, else the backoff."""
        told = parse_retry_after(retry_after)
        return min(self.max_delay_s, told) if told is not None else self.backoff_s(attempt)


def error_message(response: httpx.Response) -> str:
    """The server's error message: embedserve's ``{"error": str}`` or OpenAI's
    ``{"error": {"message"}}`` shape, else the start of the body."""
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        error = error.get("message")
    detail = str(error) if error else response.text[:200]
    return f"HTTP {response.status_code}: {detail}"


# -- the embedding client ------------------------------------------------------------------
BULK_LANE = {"X-Priority": "bulk"}


@dataclass
class Embedder:
    """Embeds texts through one embedserve endpoint. Owns no connection: the caller's
    `client` (base URL and auth headers set) is borrowed. At most `concurrency` requests are
    in flight across all callers; each request is retried by `policy`, sleeping with `sleep`.
    Every request says ``X-Priority: bulk``: an ingestion job runs in the bulk lane, so that
    search queries to the same server go ahead of it (README, "Priority lanes").
    """

    client: httpx.AsyncClient
    endpoint: Endpoint = "batch"
    model: str | None = None
    batch_size: int = 32
    concurrency: int = 4
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    sleep: Sleep = asyncio.sleep
    _slots: asyncio.Semaphore = field(init=False)

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.concurrency)

    async def wait_ready(self, timeout_s: float, poll_s: float = 0.5) -> None:
        """Return once ``GET /ready`` is 200; IngestError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while True:
            try:
                response = await self.client.get("/ready")
                if response.status_code == 200:
                    return
                last = error_message(response)
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() + poll_s > deadline:
                raise IngestError(f"server not ready within {timeout_s:g}s ({last})")
            await self.sleep(poll_s)

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        """Vectors for `texts`, in order, sent in batches of `batch_size` concurrently."""
        batches = [texts[i : i + self.batch_size] for i in range(0, len(texts), self.batch_size)]
        results = await asyncio.gather(*(self._embed_batch(batch) for batch in batches))
        return [vector for batch in results for vector in batch]

    async def _embed_batch(self, texts: Sequence[str]) -> list[list[float]]:
        async with self._slots:
            return self._vectors(await self._post(list(texts)))

    def _request(self, texts: list[str]) -> tuple[str, dict[str, Any]]:
        if self.endpoint == "openai":
            body = {"input": texts, "model": self.model, "encoding_format": "float"}
            return "/v1/embeddings", body
        body = {"texts": texts}
        if self.model is not None:
            body["model_name"] = self.model
        return "/embed/batch", body

    def _vectors(self, body: Any) -> list[list[float]]:
        if self.endpoint == "openai":
            items = sorted(body["data"], key=lambda item: item["index"])
            return [item["embedding"] for item in items]
        vectors: list[list[float]] = body["embeddings"]
        return vectors

    async def _post(self, texts: list[str]) -> Any:
        """POST one batch; retry 429/503 and connection errors up to `policy.attempts`
        times; any other error status raises IngestError with the server's message."""
        path, body = self._request(texts)
        for attempt in range(1, self.policy.attempts + 1):
            try:
                response = await self.client.post(path, json=body, headers=BULK_LANE)
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
                delay = self.policy.backoff_s(attempt)
            else:
                if response.status_code == 200:
                    return response.json()
                problem = error_message(response)
                if response.status_code not in RETRY_STATUSES:
                    raise IngestError(f"POST {path} refused: {problem}")
                delay = self.policy.delay_s(attempt, response.headers.get("retry-after"))
            if attempt < self.policy.attempts:
                await self.sleep(delay)
        raise IngestError(f"POST {path} failed {self.policy.attempts} times; last: {problem}")


# -- Qdrant --------------------------------------------------------------------------------
def open_qdrant(url: str | None, path: str) -> QdrantClient:
    """A Qdrant server client for `url`, else embedded Qdrant at `path` (``:memory:`` too)."""
    if url:
        return QdrantClient(url=url)
    return QdrantClient(location=":memory:") if path == ":memory:" else QdrantClient(path=path)


def store(
    qdrant: QdrantClient,
    collection: str,
    chunks: Sequence[Chunk],
    vectors: Sequence[list[float]],
    *,
    recreate: bool = False,
) -> None:
    """Create `collection` (cosine, the vectors' dimension) unless it exists, then upsert one
    point per chunk with payload ``doc_id``, ``chunk_index`` and ``text``. Raises IngestError
    when an existing collection has another dimension."""
    dimension = len(vectors[0])
    if recreate and qdrant.collection_exists(collection):
        qdrant.delete_collection(collection)
    if not qdrant.collection_exists(collection):
        qdrant.create_collection(
            collection,
            vectors_config=models.VectorParams(size=dimension, distance=models.Distance.COSINE),
        )
    else:
        existing = qdrant.get_collection(collection).config.params.vectors
        if isinstance(existing, models.VectorParams) and existing.size != dimension:
            raise IngestError(
                f"collection {collection!r} holds {existing.size}-dimensional vectors, these "
                f"are {dimension}-dimensional (use --recreate or another --collection)"
            )
    points = [
        models.PointStruct(
            id=chunk.point_id,
            vector=vector,
            payload={"doc_id": chunk.doc_id, "chunk_index": chunk.index, "text": chunk.text},
        )
        for chunk, vector in zip(chunks, vectors, strict=True)
    ]
    for start in range(0, len(points), 256):
        qdrant.upsert(collection, points=points[start : start + 256], wait=True)


def search(qdrant: QdrantClient, collection: str, vector: list[float], limit: int) -> list[Hit]:
    """The `limit` nearest chunks to `vector`, best first."""
    found = qdrant.query_points(collection, query=vector, limit=limit, with_payload=True)
    return [
        Hit(str((p.payload or {}).get("doc_id")), p.score, str((p.payload or {}).get("text")))
        for p in found.points
    ]


# -- entry point ---------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m examples.ingest", description=__doc__)
    add = parser.add_argument
    add("source", type=Path, help="folder of .txt/.md files, or a JSONL file of {id, text}")
    add("--server", default="http://127.0.0.1:8000", help="embedserve base URL")
    add("--endpoint", choices=["batch", "openai"], default="batch",
        help="/embed/batch (default) or /v1/embeddings")  # fmt: skip
    add("--model", help="model name (default: the server's first required model; "
        "needed with --endpoint openai)")  # fmt: skip
    add("--api-key", help="sent as 'Authorization: Bearer <key>'")
    add("--batch-size", type=int, default=32, help="texts per request (<= MAX_BATCH_SIZE)")
    add("--concurrency", type=int, default=4, help="requests in flight at most")
    add("--max-chars", type=int, default=800, help="longest chunk in characters")
    add("--overlap-chars", type=int, default=80, help="characters carried into the next chunk")
    add("--attempts", type=int, default=6, help="tries per request on 429/503/connection error")
    add("--max-delay-s", type=float, default=30.0, help="longest wait between tries")
    add("--timeout-s", type=float, default=60.0, help="HTTP timeout per request")
    add("--ready-timeout-s", type=float, default=60.0, help="how long to wait for /ready")
    add("--qdrant-path", default=":memory:", help="embedded Qdrant directory, or :memory:")
    add("--qdrant-url", help="a Qdrant server instead of embedded mode")
    add("--collection", default="documents", help="Qdrant collection name")
    add("--recreate", action="store_true", help="drop the collection first")
    add("--query", action="append", default=[], help="a search to run after ingestion (repeat)")
    add("--top-k", type=int, default=3, help="hits shown per query")
    add("--json", action="store_true", help="print the query results as JSON")
    args = parser.parse_args(argv)
    if args.endpoint == "openai" and not args.model:
        parser.error("--endpoint openai needs --model")
    if min(args.batch_size, args.concurrency, args.attempts, args.top_k) < 1:
        parser.error("--batch-size, --concurrency, --attempts and --top-k must be >= 1")
    if not 0 <= args.overlap_chars < args.max_chars:
        parser.error("need 0 <= --overlap-chars < --max-chars")
    return args


async def embed_all(args: argparse.Namespace, texts: Sequence[str]) -> list[list[float]]:
    """Wait for the server to be ready, then embed `texts` in order."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = httpx.Timeout(args.timeout_s, connect=min(10.0, args.timeout_s))
    async with httpx.AsyncClient(base_url=args.server, headers=headers, timeout=timeout) as http:
        embedder = Embedder(
            http,
            endpoint=args.endpoint,
            model=args.model,
            batch_size=args.batch_size,
            concurrency=args.concurrency,
            policy=RetryPolicy(attempts=args.attempts, max_delay_s=args.max_delay_s),
        )
        await embedder.wait_ready(args.ready_timeout_s)
        return await embedder.embed(texts)


def main(argv: Sequence[str] | None = None) -> int:
    """Ingest, then run the queries; 0 on success, 1 on an IngestError (message on stderr)."""
    args = parse_args(argv)
    try:
        chunks = chunk_documents(load_documents(args.source), args.max_chars, args.overlap_chars)
        if not chunks:
            raise IngestError(f"{args.source}: no documents with text")
        vectors = asyncio.run(embed_all(args, [c.text for c in chunks] + args.query))
    except IngestError as exc:
        print(f"ingest: {exc}", file=sys.stderr)
        return 1
    doc_vectors, query_vectors = vectors[: len(chunks)], vectors[len(chunks) :]
    qdrant = open_qdrant(args.qdrant_url, args.qdrant_path)
    try:
        store(qdrant, args.collection, chunks, doc_vectors, recreate=args.recreate)
        results = {
            query: search(qdrant, args.collection, vector, args.top_k)
            for query, vector in zip(args.query, query_vectors, strict=True)
        }
    except IngestError as exc:
        print(f"ingest: {exc}", file=sys.stderr)
        return 1
    finally:
        qdrant.close()
    print(f"ingested {len(chunks)} chunks, dimension {len(doc_vectors[0])}", file=sys.stderr)
    if args.json:
        print(json.dumps({q: [asdict(hit) for hit in hits] for q, hits in results.items()}))
        return 0
    for query, hits in results.items():
        print(f"\n{query}")
        for rank, hit in enumerate(hits, 1):
            print(f"  {rank}. {hit.score:.3f}  {hit.doc_id}: {hit.text[:90]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
