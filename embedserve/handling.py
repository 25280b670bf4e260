"""Request plumbing shared by the native and the OpenAI endpoints: JSON bodies, the call
into the registry (with the arrival stamp and disconnect handling), timing headers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from starlette.requests import Request

from embedserve.batcher import EmbedResult
from embedserve.errors import UnsupportedMediaType
from embedserve.logs import ARRIVED_AT, MODEL_KEY, TEXTS_KEY
from embedserve.registry import ModelRegistry
from embedserve.schemas import parse_json
from embedserve.settings import Settings
from embedserve.stats import AppStats

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def state(request: Request) -> tuple[Settings, ModelRegistry, AppStats]:
    """The app's settings, registry and counters."""
    state = request.app.state
    return state.settings, state.registry, state.stats


async def json_body(request: Request) -> Any:
    """The parsed JSON body; 415 for another content type, 400 for malformed JSON."""
    content_type = request.headers.get("content-type")
    if content_type is not None:
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type != "application/json" and not media_type.endswith("+json"):
            shown = media_type if len(media_type) <= 100 else media_type[:100] + "..."
            raise UnsupportedMediaType(
                f"content type {shown or '(empty)'} is not supported; send application/json"
            )
    return parse_json(await request.body())


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (so its queued texts are dropped) if the client leaves."""
    task = asyncio.ensure_future(work)

    async def wait_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(wait_disconnect())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Both cancellations land before we return: the watcher stops reading the request,
        # and the work's texts leave the queue.
        pending = {t for t in (task, watcher) if not t.done()}
        for left in pending:
            left.cancel()
        if pending:
            await asyncio.wait(pending)
    if task.cancelled():
        raise ClientGone()
    return task.result()


async def run_embed(request: Request, model: str, texts: list[str]) -> tuple[EmbedResult, float]:
    """Embed through the model's batcher; the result and the handler's elapsed ms.

    Raises `ClientGone` when the client disconnected first (its texts were dropped).
    """
    _, registry, stats = state(request)
    request.scope[MODEL_KEY] = model  # for the access log line
    request.scope[TEXTS_KEY] = len(texts)
    started = time.perf_counter()
    try:
        arrived_at = request.scope.get(ARRIVED_AT)
        work = registry.embed(model, texts, arrived_at=arrived_at)
        result = await unless_disconnected(request, work)
    except ClientGone:
        stats.errors["client_disconnected"] += 1
        raise
    stats.total_embeddings += len(texts)
    return result, (time.perf_counter() - started) * 1000


def timing_headers(result: EmbedResult) -> dict[str, str]:
    """``X-Queue-Time`` and ``X-Inference-Time`` in milliseconds."""
    return {
        "X-Queue-Time": f"{result.queue_ms:.3f}",
        "X-Inference-Time": f"{result.inference_ms:.3f}",
    }
