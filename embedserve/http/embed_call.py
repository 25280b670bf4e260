"""Request plumbing shared by the native and the OpenAI endpoints: JSON bodies, the call
into the registry (with the arrival stamp and disconnect handling), timing headers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from embedserve.engine.batcher import BULK, INTERACTIVE, LANES, EmbedResult, Lane
from embedserve.engine.registry import ModelRegistry
from embedserve.errors import UnsupportedMediaType, ValidationFailed
from embedserve.http.middleware.access_log import ARRIVED_AT, MODEL_KEY, TEXTS_KEY
from embedserve.http.middleware.auth import BULK_ONLY
from embedserve.http.request_stats import AppStats
from embedserve.http.schemas import parse_json
from embedserve.settings import Settings

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


class Endpoint:
    """A request handler as a plain ASGI app, for `starlette.routing.Route`.

    Starlette wraps a handler function in `request_response`, which catches and renders
    its exceptions itself; the app's `ExceptionMiddleware` does exactly that one layer
    out, with the same handlers, so that second wrapper (a request object, two closures
    and a send wrapper on every call) is skipped.
    """

    def __init__(self, handler: Callable[[Request], Awaitable[Response]]) -> None:
        self.handler = handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.handler(Request(scope, receive, send))
        await response(scope, receive, send)


def state(request: Request) -> tuple[Settings, ModelRegistry, AppStats]:
    """The app's settings, registry and counters (``app.state.parts``, set by `create_app`)."""
    parts: tuple[Settings, ModelRegistry, AppStats] = request.app.state.parts
    return parts


async def json_body(request: Request) -> Any:
    """The parsed JSON body; 415 for another content type, 400 for malformed JSON.

    Reads the scope and `receive` directly: Starlette's `Request.headers` and
    `Request.body` build objects and an async generator that these requests never reuse.
    """
    content_type = _header(request, b"content-type")
    if content_type is not None:
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type != "application/json" and not media_type.endswith("+json"):
            shown = media_type if len(media_type) <= 100 else media_type[:100] + "..."
            raise UnsupportedMediaType(
                f"content type {shown or '(empty)'} is not supported; send application/json"
            )
    return parse_json(await _body(request))


def _header(request: Request, name: bytes) -> str | None:
    """The first value of header `name` (lower case), as `Request.headers.get` gives it."""
    for key, value in request.scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def _body(request: Request) -> bytes:
    """The whole body, as `Request.body` reads it (`ClientDisconnect` if the client left)."""
    chunks: list[bytes] = []
    while True:
        message = await request.receive()
        if message["type"] == "http.request":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                return b"".join(chunks)
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect()


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work` in this task, cancelling it (so its queued texts are dropped) if the
    client leaves first; then raise `ClientGone`.

    One watcher task reads the request for the disconnect and cancels this task. The work
    runs here rather than in a task of its own: a task and two `asyncio.wait` calls per
    request were a measurable share of the event loop's time. The watcher cancels only
    while the work is awaited, so a disconnect after the work ended cancels nothing.
    """
    handler = asyncio.current_task()
    if handler is None:  # not in a task (never under an ASGI server): nothing to watch with
        return await work
    awaiting = True
    gone = False

    async def wait_disconnect() -> None:
        nonlocal gone
        while (await request.receive())["type"] != "http.disconnect":
            pass
        if awaiting:
            gone = True
            handler.cancel()

    watcher = asyncio.get_running_loop().create_task(wait_disconnect())
    try:
        result = await work
    except asyncio.CancelledError:
        if gone:
            handler.uncancel()
            raise ClientGone() from None
        if not handler.cancelling():
            # Cancelled inside the work (a model load given up at shutdown), not by our
            # caller: answered as when the work ran in a task of its own.
            raise ClientGone() from None
        raise
    finally:
        awaiting = False
        if not watcher.done():
            # The watcher stops reading the request before we return.
            watcher.cancel()
            try:
                await watcher
            except asyncio.CancelledError:
                if handler.cancelling():
                    raise
    if gone:  # the work ended anyway (it swallowed the cancellation): take it back
        handler.uncancel()
    return result


def choose_lane(
    request: Request, count: int, *, priority: str | None = None, bulk: bool = False
) -> Lane:
    """The lane of a request of `count` texts: the one it asks for (``X-Priority`` header or
    the body's `priority`), else interactive for at most INTERACTIVE_MAX_TEXTS texts on a
    route that is not bulk by nature (`bulk`: /embed/batch). A key in BULK_ONLY_API_KEYS
    always gets bulk. Raises `ValidationFailed` (422) for another header value, or a header
    and body that disagree.
    """
    settings, _, _ = state(request)
    header = _header(request, b"x-priority")
    if header is not None:
        value = header.strip().lower()
        if value not in LANES:
            shown = value if len(value) <= 40 else value[:40] + "..."
            raise ValidationFailed(
                f"invalid header X-Priority: {shown!r}; use 'interactive' or 'bulk'"
            )
        if priority is not None and priority != value:
            raise ValidationFailed(
                f"the X-Priority header ({value}) and the body's 'priority' ({priority}) disagree"
            )
        priority = value
    if priority is None:
        interactive = not bulk and count <= settings.interactive_max_texts
        lane = INTERACTIVE if interactive else BULK
    else:
        lane = INTERACTIVE if priority == INTERACTIVE else BULK
    if lane == INTERACTIVE and request.scope.get(BULK_ONLY):
        return BULK
    return lane


async def run_embed(
    request: Request, model: str, texts: list[str], lane: Lane
) -> tuple[EmbedResult, float]:
    """Embed through the model's batcher, in `lane`; the result and the handler's elapsed ms.

    Raises `ClientGone` when the client disconnected first (its texts were dropped).
    """
    _, registry, stats = state(request)
    request.scope[MODEL_KEY] = model  # for the access log line
    request.scope[TEXTS_KEY] = len(texts)
    started = time.perf_counter()
    # A client gone is answered 499, which the access log counts as client_disconnected.
    arrived_at = request.scope.get(ARRIVED_AT)
    work = registry.embed(model, texts, arrived_at=arrived_at, lane=lane)
    result = await unless_disconnected(request, work)
    stats.total_embeddings += len(texts)
    return result, (time.perf_counter() - started) * 1000


def timing_headers(result: EmbedResult) -> dict[str, str]:
    """``X-Queue-Time`` and ``X-Inference-Time`` in milliseconds, and the lane it ran in."""
    return {
        "X-Queue-Time": f"{result.queue_ms:.3f}",
        "X-Inference-Time": f"{result.inference_ms:.3f}",
        "X-Priority": result.lane,
    }
