"""Request and response bodies of the HTTP API, and the checks that depend on settings.

One module because /openapi.json is generated from these models: the bodies and the shared
field types (model names, texts, the error shape) are read together.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    ValidationError,
    WithJsonSchema,
)

from embedserve.errors import BadRequest, EmbedServeError, ValidationFailed
from embedserve.models.store import MAX_NAME_LENGTH

M = TypeVar("M", bound=BaseModel)

# What `store.validate_model_name` accepts, as a JSON Schema pattern: '/'-separated parts of
# letters, digits, '.', '_', '-', each starting with a letter or digit and not ending in '.'.
# A name outside it is refused with 400 (invalid_model_name); tests/test_openapi.py checks
# that the two agree.
_NAME_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_-])?"
MODEL_NAME_PATTERN = rf"^{_NAME_PART}(?:/{_NAME_PART})*$"
MODEL_NAME_SCHEMA: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_NAME_LENGTH,
    "pattern": MODEL_NAME_PATTERN,
}
# `check_texts` refuses a text that is empty or only whitespace (422; 400 under /v1): it needs
# a character that `str.strip` keeps. Python's whitespace adds \x1c-\x1f and \x85 to ECMA's
# `\s`, which adds \uFEFF; the pattern spells out both, so every regex engine reads it alike.
TEXT_SCHEMA: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "pattern": r"[^\s\x1c-\x1f\x85]|\uFEFF",
}

# A string or a non-empty array of them (the OpenAI and TEI inputs); `string_or_list` checks it.
TEXTS_SCHEMA: dict[str, Any] = {
    "anyOf": [TEXT_SCHEMA, {"type": "array", "items": TEXT_SCHEMA, "minItems": 1}]
}

# The pydantic checks stay as they are (strict types); these only tell /openapi.json the
# rules enforced after parsing, so that the document describes what is really accepted.
ModelName = Annotated[StrictStr, WithJsonSchema(MODEL_NAME_SCHEMA)]
Text = Annotated[StrictStr, WithJsonSchema(TEXT_SCHEMA)]
# A request's priority lane (README, "Priority lanes").
Priority = Literal["interactive", "bulk"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    model_name: ModelName | None = Field(None, description="Model to use; default: first required")
    truncate: StrictBool = Field(False, description="Cut texts over MAX_TEXT_LENGTH instead of 422")
    priority: Priority | None = Field(
        None,
        description="Lane: interactive or bulk (as the X-Priority header); default: "
        "/embed interactive, /embed/batch bulk",
    )


class EmbedRequest(_Request):
    """``POST /embed``: one text."""

    text: Text = Field(description="Not blank; at most MAX_TEXT_LENGTH characters unless truncate")


class BatchEmbedRequest(_Request):
    """``POST /embed/batch``: several texts, answered in the same order."""

    texts: list[Text] = Field(
        min_length=1,
        description="At most MAX_BATCH_SIZE texts; each as in /embed",
    )


# -- responses --------------------------------------------------------------------------
# Handlers build plain dicts (orjson writes numpy arrays directly); these models describe
# those bodies for /openapi.json, and tests/test_openapi.py checks real answers against them.


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EmbedResponse(_Response):
    """``POST /embed``: 200."""

    embedding: list[float] = Field(description="The embedding (normalised if the model is)")
    model_name: str = Field(description="Model that made it")
    dimension: int = Field(description="Length of the embedding")
    text_length: int = Field(description="Characters embedded, after any truncation")
    processing_time_ms: float = Field(description="Time in the server, queue included")
    truncated: bool = Field(False, description='Sent (true) only when "truncate" cut the text')


class BatchEmbedResponse(_Response):
    """``POST /embed/batch``: 200; embeddings in the order of ``texts``."""

    embeddings: list[list[float]] = Field(description="One embedding per text, in order")
    model_name: str = Field(description="Model that made them")
    dimension: int = Field(description="Length of each embedding")
    count: int = Field(description="Number of embeddings")
    processing_time_ms: float = Field(description="Time in the server, queue included")


class CacheInfo(_Response):
    """Loaded models and the cache's limits, under the original Fast Embedding API's keys."""

    cached_models: list[str] = Field(description="Names of the models loaded now")
    num_cached: int = Field(description="How many models are loaded now")
    max_cached: int = Field(description="MAX_CACHED_MODELS")
    cache_ttl: float = Field(description="MODEL_CACHE_TTL, in seconds")


class HealthResponse(_Response):
    """``GET /health``: 200 when healthy, 503 (same body) otherwise."""

    status: Literal["healthy", "unhealthy", "shutting_down"]
    cache_info: CacheInfo
    uptime_seconds: float


class ReadyResponse(_Response):
    """``GET /ready``: 200 when ready; 503 names the required models not loaded yet."""

    status: Literal["ready", "not_ready", "shutting_down"]
    missing: list[str] = Field(default_factory=list, description="Required models not loaded")


class MetricsResponse(BaseModel):
    """``GET /metrics``: counters; loose (more figures may appear)."""

    model_config = ConfigDict(extra="allow")

    total_requests: int
    total_embeddings: int
    cache_info: CacheInfo
    uptime_seconds: float
    errors: dict[str, int] = Field(description="Errors answered, by error_type")
    batching: dict[str, Any] = Field(
        description="Batches run, mean batch size, evictions, offloads, and per model: queue "
        "depth, in-flight texts, batches, failed batches, dropped texts, inference and queue time"
    )


class ModelsResponse(_Response):
    """``GET /models``."""

    required_models: list[str] = Field(description="REQUIRED_MODELS; the first is the default")
    cached_models: list[str] = Field(description="Models loaded now")
    allowed_models: list[str] | None = Field(description="ALLOWED_MODELS; null: any model")
    local_models: list[str] = Field(description="Models imported into MODELS_DIR")


class ModelInfoResponse(_Response):
    """``GET /models/{model_name}``: one model, loaded or not."""

    model_name: str
    is_cached: bool = Field(description="Loaded now")
    load_time: float | None = Field(description="Seconds the last load took")
    loaded_at: str | None = Field(description="When it was loaded (ISO 8601, UTC)")
    last_used: str | None = Field(description="When it last ran a batch (ISO 8601, UTC)")
    source: str | None = Field(description="Where it was loaded from")
    dimension: int | None = Field(description="Length of its embeddings")
    max_tokens: int | None = Field(description="Token limit; longer texts are truncated")
    packed: bool | None = Field(
        description="Runs packed batches (several texts per row, no padding); null while not loaded"
    )
    packed_graph: bool | None = Field(
        description="Its imported files include the packed graph; null for catalogue models"
    )
    pinned: bool = Field(description="Never evicted or offloaded")
    queued: int = Field(description="Texts waiting for a batch")
    in_flight: int = Field(description="Texts in a running batch")
    stats: dict[str, float] = Field(description="Batch figures since it was loaded")
    lanes: dict[str, dict[str, float]] = Field(
        description="Per priority lane (interactive, bulk): queue_depth, texts embedded and "
        "queue_s (their total wait) since it was loaded"
    )


class ErrorDetail(_Response):
    """One failed field of a 422."""

    loc: list[str | int] = Field(description="Where in the body")
    msg: str
    type: str


class ErrorResponse(_Response):
    """Every error outside ``/v1``."""

    error: str = Field(description="What went wrong, for a person")
    error_type: str = Field(description="Stable kind, for a program (README, Errors)")
    details: list[ErrorDetail] = Field(
        default_factory=list, description="422 only: every failed field"
    )


class OpenAIErrorBody(_Response):
    """OpenAI's error object."""

    message: str
    type: str = Field(description="OpenAI's coarse type, e.g. invalid_request_error")
    param: str | None = Field(description="The request field at fault, if one is")
    code: str | None = Field(description="embedserve's error_type")


class OpenAIErrorResponse(_Response):
    """Every error under ``/v1``, in OpenAI's shape (its client libraries read it)."""

    error: OpenAIErrorBody


class OpenAIEmbedding(_Response):
    """One row of ``POST /v1/embeddings``."""

    object: Literal["embedding"]
    index: int = Field(description="Position of its input")
    embedding: list[float] | str = Field(
        description="Floats; with encoding_format=base64, base64 of little-endian float32"
    )


class OpenAIUsage(_Response):
    """Tokens counted by the model's tokenizer."""

    prompt_tokens: int
    total_tokens: int


class OpenAIEmbeddingsResponse(_Response):
    """``POST /v1/embeddings``: 200, as OpenAI answers it."""

    object: Literal["list"]
    data: list[OpenAIEmbedding]
    model: str
    usage: OpenAIUsage


class OpenAIModel(_Response):
    """OpenAI's model object."""

    id: str
    object: Literal["model"]
    created: int = Field(description="Unix time it was imported or loaded; 0 if unknown")
    owned_by: str


class OpenAIModelList(_Response):
    """``GET /v1/models``."""

    object: Literal["list"]
    data: list[OpenAIModel]


def whole_number(value: Any) -> Any:
    """8.0 as 8: JSON has one number type, and JSON Schema's "integer" admits 8.0."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def parse_json(body: bytes) -> Any:
    """Decode a JSON body; raises BadRequest (400) on malformed JSON."""
    if not body.strip():
        raise BadRequest("request body is empty; send a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc.msg} at position {exc.pos}") from None


def validate(model: type[M], data: Any) -> M:
    """Validate parsed JSON against `model`; raises ValidationFailed (422) with field details."""
    if not isinstance(data, dict):
        raise ValidationFailed("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        details: list[dict[str, object]] = [
            {"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]}
            for e in exc.errors(include_url=False, include_input=False, include_context=False)
        ]
        first = details[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"  # type: ignore[attr-defined]
        raise ValidationFailed(
            f"invalid field '{where}': {first['msg']}", details=details
        ) from None


def string_or_list(
    value: Any, *, field: str, max_items: int, too_many: type[EmbedServeError] = ValidationFailed
) -> list[str]:
    """`value` (a string or an array of strings) as a list; ValidationFailed for token ids,
    other types and [], `too_many` past `max_items` (checked after the types, as before)."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ValidationFailed(f"invalid field '{field}': must be a string or an array of strings")
    if not value:
        raise ValidationFailed(f"invalid field '{field}': must not be an empty array")
    for index, item in enumerate(value):
        if isinstance(item, str):
            continue
        if isinstance(item, list) or (isinstance(item, int) and not isinstance(item, bool)):
            raise ValidationFailed(
                f"invalid field '{field}': token-id input (arrays of integers) is not "
                "supported, because token ids are specific to a tokenizer; send the text as a "
                "string or an array of strings"
            )
        raise ValidationFailed(f"invalid field '{field}[{index}]': must be a string")
    if len(value) > max_items:
        raise too_many(
            f"invalid field '{field}': {len(value)} inputs, over the limit of {max_items} "
            "(MAX_BATCH_SIZE)"
        )
    return value


def dimensions_refusal(model: str, requested: int, native: int) -> str | None:
    """Why `dimensions` is refused, or None when it is the model's own dimension.

    Cutting a vector short is only meaningful for Matryoshka-trained models; no model
    embedserve serves is marked as one, so only the native dimension is accepted.
    """
    if requested == native:
        return None
    return (
        f"invalid field 'dimensions': model {model} produces {native}-dimensional "
        f"embeddings and does not support other dimensions (it is not Matryoshka-trained, "
        f"so truncated vectors would not be meaningful); omit 'dimensions' or send {native}"
    )


def check_texts(texts: list[str], *, max_length: int, truncate: bool, field: str) -> list[str]:
    """Refuse blank texts; cut or refuse texts longer than `max_length` characters."""
    checked: list[str] = []
    for index, text in enumerate(texts):
        where = field if len(texts) == 1 and field == "text" else f"{field}[{index}]"
        if len(text) > max_length:
            if not truncate:
                raise ValidationFailed(
                    f"invalid field '{where}': text is {len(text)} characters, over the limit of "
                    f'{max_length} (MAX_TEXT_LENGTH); send "truncate": true to cut it'
                )
            text = text[:max_length]
        if not text.strip():
            raise ValidationFailed(f"invalid field '{where}': text must not be empty or blank")
        checked.append(text)
    return checked
