"""OpenAI-compatible endpoints: ``POST /v1/embeddings``, ``GET /v1/models[/{model}]``.

Embeddings go through the same path as ``/embed/batch`` (`embed_call.run_embed`: the model's
micro-batcher, the arrival stamp, disconnect handling) and the same text checks. Errors are
the typed errors of `embedserve.errors`; the app renders them in OpenAI's shape under
``/v1/``. Validation errors are 400 here (not 422), because OpenAI's clients expect that.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    WithJsonSchema,
)
from starlette.requests import Request
from starlette.responses import Response

from embedserve.engine.model_entry import ModelInfo
from embedserve.engine.registry import ModelRegistry
from embedserve.errors import (
    BadRequest,
    InvalidModelName,
    ModelNotAllowed,
    ModelNotFound,
    ModelUnavailable,
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
from embedserve.http.responses import JSONResponse
from embedserve.http.schemas import (
    TEXTS_SCHEMA,
    ModelName,
    Priority,
    check_texts,
    dimensions_refusal,
    string_or_list,
    validate,
    whole_number,
)

# Errors about the model's name, reported with ``param: "model"``.
_REFUSED_NAME = (InvalidModelName, ModelNotAllowed, ModelNotFound)


class EmbeddingsRequest(BaseModel):
    """``POST /v1/embeddings``, as OpenAI defines it, plus embedserve's ``truncate``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    # Any: checked by `_texts`, so that token ids get a message of their own; the document
    # states what `_texts` and `check_texts` accept.
    input: Annotated[Any, WithJsonSchema(TEXTS_SCHEMA)] = Field(
        description="A string or an array of at most MAX_BATCH_SIZE strings; none blank"
    )
    model: ModelName = Field(description="Model name (required, as on OpenAI)")
    encoding_format: Literal["float", "base64"] | None = Field(
        None, description="float (default): lists of floats; base64: little-endian float32"
    )
    dimensions: Annotated[StrictInt, Field(ge=1), BeforeValidator(whole_number)] | None = Field(
        None, description="Must equal the model's dimension (no model here is Matryoshka)"
    )
    user: StrictStr | None = Field(None, description="Accepted and ignored")
    priority: Priority | None = Field(
        None, description="Lane: interactive or bulk (as the X-Priority header); default by size"
    )
    truncate: StrictBool = Field(False, description="Cut texts over MAX_TEXT_LENGTH instead of 400")


async def create_embeddings(request: Request) -> Response:
    """``POST /v1/embeddings``: OpenAI's embeddings request and response."""
    settings, registry, stats = state(request)
    stats.total_requests += 1
    body = _parse(await json_body(request))
    texts = _texts(body.input, settings.max_batch_size)
    try:
        texts = check_texts(
            texts, max_length=settings.max_text_chars, truncate=body.truncate, field="input"
        )
    except ValidationFailed as exc:
        raise BadRequest(exc.message, param="input") from None
    if body.dimensions is not None:
        with _about_model():
            native = registry.describe(body.model).dimension
        if native is not None:  # else (a catalogue model not loaded yet) checked below
            _check_dimensions(body.model, body.dimensions, native)
    try:
        lane = choose_lane(request, len(texts), priority=body.priority)
    except ValidationFailed as exc:
        raise BadRequest(exc.message, param="priority") from None
    try:
        result, _ = await run_embed(request, body.model, texts, lane)
    except ClientGone:
        return Response(status_code=499)
    except _REFUSED_NAME as exc:  # as `_about_model`, without a context manager per request
        exc.param = "model"
        raise
    vectors = result.vectors
    if body.dimensions is not None:
        _check_dimensions(body.model, body.dimensions, vectors.shape[1])
    rows: list[Any]
    if body.encoding_format == "base64":
        little_endian = vectors.astype("<f4", copy=False)
        rows = [base64.b64encode(row.tobytes()).decode("ascii") for row in little_endian]
    else:
        rows = list(vectors)
    tokens = sum(result.token_counts)
    content = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": index, "embedding": row}
            for index, row in enumerate(rows)
        ],
        "model": body.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return JSONResponse(content, headers=timing_headers(result))


async def list_models(request: Request) -> Response:
    """``GET /v1/models``: required, loaded, imported and allowed models that would be served."""
    settings, registry, _ = state(request)
    loaded = {info.name: info for info in registry.loaded()}
    imported = registry.local_models()
    names = dict.fromkeys([*registry.required, *loaded, *imported, *settings.allowed_models])
    cards = [_card(registry, name, loaded.get(name)) for name in names]
    return JSONResponse({"object": "list", "data": [card for card in cards if card is not None]})


async def retrieve_model(request: Request) -> Response:
    """``GET /v1/models/{model}``: one model; 404 when unknown or not allowed."""
    _, registry, _ = state(request)
    name = request.path_params["model_name"]
    card = None
    with contextlib.suppress(InvalidModelName, ModelNotAllowed, ModelNotFound):
        info = registry.describe(name)
        card = _card(registry, name, info if info.is_loaded else None)
    if card is None:
        raise ModelNotFound(f"model {name!r} is not available here", param="model")
    return JSONResponse(card)


def _parse(data: Any) -> EmbeddingsRequest:
    try:
        return validate(EmbeddingsRequest, data)
    except ValidationFailed as exc:
        loc = exc.details[0]["loc"] if exc.details else []
        param = str(loc[0]) if isinstance(loc, list) and loc else None
        raise BadRequest(exc.message, param=param) from None


def _texts(value: Any, max_inputs: int) -> list[str]:
    """`input` as a list of strings; refuses token ids, other types, [] and too many."""
    try:
        return string_or_list(value, field="input", max_items=max_inputs)
    except ValidationFailed as exc:
        raise BadRequest(exc.message, param="input") from None


def _check_dimensions(model: str, requested: int, native: int) -> None:
    refusal = dimensions_refusal(model, requested, native)
    if refusal is not None:
        raise BadRequest(refusal, param="dimensions")


@contextlib.contextmanager
def _about_model() -> Iterator[None]:
    """Name ``model`` as the field at fault when the model name is refused."""
    try:
        yield
    except _REFUSED_NAME as exc:
        exc.param = "model"
        raise


def _card(registry: ModelRegistry, name: str, loaded: ModelInfo | None) -> dict[str, Any] | None:
    """OpenAI's model object for `name`, or None when the server would not serve it."""
    try:
        manifest = registry.resolve(name, listed=True).manifest
    except (InvalidModelName, ModelNotAllowed, ModelNotFound, ModelUnavailable):
        if loaded is None:
            return None
        manifest = None
    # Imported models: when they were imported; catalogue models: when they were loaded.
    created = _unix(manifest.created_at if manifest else None) or _unix(
        loaded.loaded_at if loaded else None
    )
    return {
        "id": name,
        "object": "model",
        "created": created or 0,
        "owned_by": name.split("/", 1)[0] if "/" in name else "embedserve",
    }


def _unix(iso: str | None) -> int | None:
    if not iso:
        return None
    try:
        return int(datetime.fromisoformat(iso).timestamp())
    except ValueError:
        return None
