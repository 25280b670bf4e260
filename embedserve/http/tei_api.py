"""text-embeddings-inference (TEI) routes: ``POST /`` and ``POST /embed`` with ``inputs``
(embed), ``POST /embed_all``, ``GET /info``, ``POST /tokenize``, ``POST /decode``.

Embeddings go through the same path as the other APIs (`embed_call.run_embed`: the model's
micro-batcher, limits, disconnect handling). Token vectors and tokenizer work run through the
registry's `token_vectors`, `token_details` and `decode` in the same worker threads, one
request per model call (not micro-batched). TEI has no model field: these routes serve the
default model. Errors keep the shape ``{"error", "error_type"}`` with TEI's status codes: 413
for more inputs than MAX_BATCH_SIZE, 422 for invalid fields, 424 when the model fails, 429
when overloaded.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, TypeVar

import numpy as np
from starlette.requests import Request
from starlette.responses import Response

from embedserve import __version__
from embedserve.errors import (
    InferenceFailed,
    ModelFailed,
    ModelUnavailable,
    TooManyInputs,
    ValidationFailed,
)
from embedserve.http.embed_call import (
    ClientGone,
    choose_lane,
    json_body,
    run_embed,
    state,
    timing_headers,
)
from embedserve.http.middleware.access_log import ARRIVED_AT, MODEL_KEY, TEXTS_KEY
from embedserve.http.responses import JSONResponse
from embedserve.http.schemas import check_texts, dimensions_refusal, string_or_list, validate
from embedserve.http.tei_schemas import (
    MAX_TOKEN_ID,
    DecodeRequest,
    EmbedAllRequest,
    TEIEmbedRequest,
    TokenizeRequest,
)
from embedserve.settings import Settings

T = TypeVar("T")

# TEI's headers beyond the X-Queue-Time and X-Inference-Time every embedding answer has.
TEI_HEADERS = ("X-Compute-Time", "X-Total-Time", "X-Compute-Characters", "X-Compute-Tokens")


def default_model(settings: Settings) -> str:
    """The model TEI's routes serve; 503 when no default model is configured."""
    name = settings.default_model
    if name is None:
        raise ModelUnavailable("no default model is set (REQUIRED_MODELS); TEI routes need one")
    return name


async def embed(request: Request) -> Response:
    """``POST /``: TEI's embed (HF clients given a base URL post here)."""
    _, _, stats = state(request)
    stats.total_requests += 1
    return await embed_inputs(request, await json_body(request))


async def embed_inputs(request: Request, data: Any) -> Response:
    """TEI's embed request `data` (already counted) -> a bare array of vectors."""
    settings, registry, _ = state(request)
    body = validate(TEIEmbedRequest, data)
    model = default_model(settings)
    texts = _inputs(body.inputs, bool(body.truncate), settings)
    if body.dimensions is not None:
        native = registry.describe(model).dimension
        if native is not None:  # else (a catalogue model not loaded yet) checked below
            _check_dimensions(model, body.dimensions, native)
    try:
        lane = choose_lane(request, len(texts))
        result, elapsed_ms = await run_embed(request, model, texts, lane)
    except ClientGone:
        return Response(status_code=499)
    except InferenceFailed as exc:
        raise ModelFailed(exc.message) from exc
    vectors = result.vectors
    if body.dimensions is not None:
        _check_dimensions(model, body.dimensions, vectors.shape[1])
    if body.normalize:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = (vectors / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
    headers = {**timing_headers(result), **tei_headers(elapsed_ms, texts, result.token_counts)}
    return JSONResponse(vectors, headers=headers)


def _inputs(value: Any, truncate: bool, settings: Settings) -> list[str]:
    """TEI's `inputs` as checked texts: at most MAX_BATCH_SIZE (else 413), none blank."""
    texts = string_or_list(
        value, field="inputs", max_items=settings.max_batch_size, too_many=TooManyInputs
    )
    return check_texts(texts, max_length=settings.max_text_chars, truncate=truncate, field="inputs")


def _check_dimensions(model: str, requested: int, native: int) -> None:
    refusal = dimensions_refusal(model, requested, native)
    if refusal is not None:
        raise ValidationFailed(refusal)


def tei_headers(elapsed_ms: float, texts: list[str], token_counts: list[int]) -> dict[str, str]:
    """TEI's headers beyond `timing_headers` (milliseconds, as ``X-Queue-Time``): the
    handler's time as both compute and total time, the characters and tokens embedded."""
    compute_ms = f"{elapsed_ms:.3f}"
    return {
        "X-Compute-Time": compute_ms,
        "X-Total-Time": compute_ms,
        "X-Compute-Characters": str(sum(len(text) for text in texts)),
        "X-Compute-Tokens": str(sum(token_counts)),
    }


async def embed_all(request: Request) -> Response:
    """``POST /embed_all``: per input, the model's vector for each token (no pooling)."""
    settings, registry, stats = state(request)
    stats.total_requests += 1
    started = time.perf_counter()
    body = validate(EmbedAllRequest, await json_body(request))
    model = default_model(settings)
    texts = _inputs(body.inputs, bool(body.truncate), settings)

    rows = await _on_model(
        request, model, len(texts), partial(registry.token_vectors, model, texts)
    )
    elapsed_ms = (time.perf_counter() - started) * 1000
    headers = tei_headers(elapsed_ms, texts, [len(row) for row in rows])
    return JSONResponse(rows, headers=headers)


async def info(request: Request) -> Response:
    """``GET /info``: the default model and the limits, in TEI's fields."""
    settings, registry, _ = state(request)
    model = default_model(settings)
    described = registry.describe(model)
    manifest = registry.resolve(model).manifest
    content = {
        "model_id": model,
        "model_sha": None,
        "model_dtype": "float32",
        "model_type": {"embedding": {"pooling": manifest.pooling if manifest else "unknown"}},
        "max_concurrent_requests": settings.max_queue_size,
        "max_input_length": described.max_tokens or 0,
        "max_batch_tokens": settings.batch_token_budget,
        "max_batch_requests": settings.batch_max_texts,
        "max_client_batch_size": settings.max_batch_size,
        "auto_truncate": True,
        "tokenization_workers": settings.thread_pool_workers,
        "version": __version__,
        "sha": None,
        "docker_label": None,
    }
    return JSONResponse(content)


async def tokenize(request: Request) -> Response:
    """``POST /tokenize``: each input's tokens with their character offsets."""
    settings, registry, stats = state(request)
    stats.total_requests += 1
    body = validate(TokenizeRequest, await json_body(request))
    model = default_model(settings)
    texts = _strings(body.inputs, settings.max_batch_size)
    special = body.add_special_tokens

    details = partial(registry.token_details, model, texts, add_special_tokens=special)
    # orjson writes each `Token` dataclass as an object of its fields.
    return JSONResponse(await _on_model(request, model, len(texts), details))


async def decode(request: Request) -> Response:
    """``POST /decode``: token ids back to text, one string per id array."""
    settings, registry, stats = state(request)
    stats.total_requests += 1
    body = validate(DecodeRequest, await json_body(request))
    model = default_model(settings)
    rows = _id_rows(body.ids, settings.max_batch_size)
    skip = body.skip_special_tokens

    decoded = partial(registry.decode, model, rows, skip_special_tokens=skip)
    return JSONResponse(await _on_model(request, model, len(rows), decoded))


async def _on_model(
    request: Request, model: str, count: int, call: Callable[..., Awaitable[T]]
) -> T:
    """`call(arrived_at=...)`, a registry method for `model` (the model failing: 424); the
    model and the input count go to the access log line, as `run_embed` notes them."""
    request.scope[MODEL_KEY] = model
    request.scope[TEXTS_KEY] = count
    try:
        return await call(arrived_at=request.scope.get(ARRIVED_AT))
    except InferenceFailed as exc:
        raise ModelFailed(exc.message) from exc


def _strings(value: Any, max_items: int) -> list[str]:
    """/tokenize's `inputs`: a string or a non-empty array of strings (empty ones allowed)."""
    rows = value if isinstance(value, list) else [value]
    if not rows:
        raise ValidationFailed("invalid field 'inputs': must not be an empty array")
    for index, item in enumerate(rows):
        if not isinstance(item, str):
            where = f"inputs[{index}]" if isinstance(value, list) else "inputs"
            raise ValidationFailed(f"invalid field '{where}': must be a string")
    if len(rows) > max_items:
        raise TooManyInputs(
            f"invalid field 'inputs': {len(rows)} inputs, over the limit of {max_items} "
            "(MAX_BATCH_SIZE)"
        )
    return rows


def _id_rows(value: Any, max_items: int) -> list[list[int]]:
    """/decode's `ids`: one array of token ids, or a non-empty array of such arrays."""
    if not isinstance(value, list):
        raise ValidationFailed("invalid field 'ids': must be an array of token ids or of arrays")
    if value and all(isinstance(row, list) for row in value):
        if len(value) > max_items:
            raise TooManyInputs(
                f"invalid field 'ids': {len(value)} arrays, over the limit of {max_items} "
                "(MAX_BATCH_SIZE)"
            )
        return [_ids(row, f"ids[{index}]") for index, row in enumerate(value)]
    return [_ids(value, "ids")]


def _ids(row: list[Any], where: str) -> list[int]:
    ids: list[int] = []
    for index, item in enumerate(row):
        if isinstance(item, float) and item.is_integer():
            item = int(item)  # JSON has one number type; 7.0 is the integer 7
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item <= MAX_TOKEN_ID:
            raise ValidationFailed(
                f"invalid field '{where}[{index}]': must be a token id (0 to {MAX_TOKEN_ID})"
            )
        ids.append(item)
    return ids
