"""``GET /openapi.json``: the OpenAPI 3.1 document, generated from the pydantic models.

Every route of `routes()` has one row in `OPERATIONS` (method, path, request and response
models, error statuses, summary); the document is built from that table and the models'
JSON schemas, never written by hand. ``tests/test_openapi.py`` fails when a route has no
row or a row no route. The document depends on the app's settings (limits, API keys, rate
limiting), so it is built once per app, on first request, and cached in ``app.state``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import orjson
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from starlette.requests import Request
from starlette.responses import Response

from embedserve import __version__, auth, ratelimit
from embedserve.docs import ASSET_NAMES
from embedserve.openai_api import EmbeddingsRequest
from embedserve.responses import OPENAI_PREFIX
from embedserve.schemas import (
    BatchEmbedRequest,
    BatchEmbedResponse,
    EmbedRequest,
    EmbedResponse,
    ErrorResponse,
    HealthResponse,
    MetricsResponse,
    ModelInfoResponse,
    ModelsResponse,
    OpenAIEmbeddingsResponse,
    OpenAIErrorResponse,
    OpenAIModel,
    OpenAIModelList,
    ReadyResponse,
)
from embedserve.settings import Settings

OPENAPI_VERSION = "3.1.0"
REF_TEMPLATE = "#/components/schemas/{model}"
JSON = "application/json"


@dataclass(frozen=True)
class Param:
    """A path or query parameter: its description, and its values (any when empty)."""

    description: str
    enum: tuple[str, ...] = ()


@dataclass(frozen=True)
class Operation:
    """One row of the table: a route as the document describes it.

    `response` is the JSON body of a 200 (None: any object); `media_types` are the 200's
    content types (other than JSON, a string: HTML, assets, Prometheus text). `errors` are
    the statuses answered in the error shape (OpenAI's under ``/v1``); `also` maps other
    statuses to bodies of their own (``/health`` answers 503 with its usual body). `params`
    describe path parameters, `query` the optional query parameters; `headers` are the
    response headers of a 200.
    """

    method: str
    path: str
    summary: str
    response: type[BaseModel] | None
    request: type[BaseModel] | None = None
    errors: tuple[int, ...] = ()
    also: Mapping[int, type[BaseModel]] = field(default_factory=dict)
    tag: str = "embeddings"
    description: str = ""
    params: Mapping[str, Param] = field(default_factory=dict)
    query: Mapping[str, Param] = field(default_factory=dict)
    headers: tuple[str, ...] = ()
    media_types: tuple[str, ...] = (JSON,)


MODEL_NAME = Param(
    "Model name. It contains '/': request /models/BAAI/bge-small-en-v1.5 as it is (the "
    "slash may also be sent as %2F, as Swagger UI's Try it out does)."
)
METRICS_FORMAT = Param("json or prometheus; without it, `Accept` decides", ("json", "prometheus"))
EMBED_ERRORS = (400, 403, 404, 408, 413, 415, 422, 429, 500, 503, 504)
OPENAI_EMBED_ERRORS = (400, 403, 404, 408, 413, 415, 429, 500, 503, 504)
TIMING = ("X-Queue-Time", "X-Inference-Time")

# fmt: off
OPERATIONS: tuple[Operation, ...] = (
    Operation("POST", "/embed", "Embed one text", EmbedResponse, EmbedRequest,
              EMBED_ERRORS, headers=TIMING),
    Operation("POST", "/embed/batch", "Embed several texts, answered in the same order",
              BatchEmbedResponse, BatchEmbedRequest, EMBED_ERRORS, headers=TIMING),
    Operation("GET", "/health", "Liveness: healthy when every required model is loaded",
              HealthResponse, also={503: HealthResponse}, tag="operations"),
    Operation("GET", "/ready", "Readiness, for load balancers", ReadyResponse,
              also={503: ReadyResponse}, tag="operations"),
    Operation("GET", "/metrics", "Request totals and batching figures", MetricsResponse,
              errors=(400, 404), tag="operations", query={"format": METRICS_FORMAT},
              media_types=(JSON, "text/plain", "application/openmetrics-text"),
              description="JSON, or the Prometheus exposition when `Accept` asks for "
              "text/plain or OpenMetrics (or ?format=prometheus). 404 when "
              "ENABLE_METRICS=false."),
    Operation("GET", "/models", "Required, loaded, allowed and imported models",
              ModelsResponse, tag="models"),
    Operation("GET", "/models/{model_name}", "One model, loaded or not", ModelInfoResponse,
              errors=(404,), tag="models", params={"model_name": MODEL_NAME},
              description="404 when the model is unknown, not allowed, or an invalid name."),
    Operation("POST", "/v1/embeddings", "OpenAI-compatible embeddings",
              OpenAIEmbeddingsResponse, EmbeddingsRequest, OPENAI_EMBED_ERRORS, tag="openai",
              headers=TIMING, description="Invalid fields are 400 here, as OpenAI answers."),
    Operation("GET", "/v1/models", "OpenAI-compatible model list", OpenAIModelList,
              tag="openai"),
    Operation("GET", "/v1/models/{model_name}", "OpenAI-compatible model object", OpenAIModel,
              errors=(404,), tag="openai", params={"model_name": MODEL_NAME}),
    Operation("GET", "/openapi.json", "This document", None, tag="documentation"),
    Operation("GET", "/docs", "Swagger UI over this document (no CDN: works offline)", None,
              tag="documentation", media_types=("text/html",)),
    Operation("GET", "/docs/static/{name}", "An asset of the /docs page", None,
              errors=(404,), tag="documentation",
              params={"name": Param("Asset file name", ASSET_NAMES)},
              media_types=("text/css", "text/javascript", "image/png")),
)
# fmt: on

ERROR_TEXT: dict[int, str] = {
    400: "Malformed or empty JSON body, or an invalid query value (bad_request; under /v1 "
    "also every invalid field), or a model name that could leave the models directory "
    "(invalid_model_name).",
    401: "No API key, or a wrong one (missing_api_key, invalid_api_key).",
    403: "The model is outside ALLOWED_MODELS (model_not_allowed); nothing was loaded.",
    404: "Not found: no such model (model_not_found), or nothing here (not_found).",
    408: "The body did not arrive within BODY_TIMEOUT_S of the headers (body_timeout); the "
    "connection is closed.",
    413: "The body is over MAX_REQUEST_BYTES (request_too_large); the connection is closed.",
    415: "A content type other than JSON (unsupported_media_type).",
    422: "Missing or mistyped fields, blank text, a text over MAX_TEXT_LENGTH, or more than "
    "MAX_BATCH_SIZE texts (validation_error); `details` names every failed field.",
    429: "The model's queue is full (overloaded), or this client's rate limit is spent "
    "(rate_limited). Retry after Retry-After seconds.",
    500: "The model failed on a text of this request (inference_error), or an unexpected "
    "error (internal_error).",
    503: "The model could not be loaded (model_unavailable), or the server is draining after "
    "SIGTERM (shutting_down).",
    504: "Not answered within REQUEST_TIMEOUT (timeout); the queued work was dropped.",
}
HEADERS: dict[str, str] = {
    "X-Queue-Time": "Milliseconds the request's texts waited for a model batch.",
    "X-Inference-Time": "Milliseconds in the model calls that carried the request's texts.",
    "Retry-After": "Seconds to wait before trying again (on 503, with shutting_down).",
    "WWW-Authenticate": "The Bearer challenge.",
}
ERROR_HEADERS = {401: ("WWW-Authenticate",), 429: ("Retry-After",), 503: ("Retry-After",)}


async def openapi_json(request: Request) -> Response:
    """``GET /openapi.json``: this app's document (built on first request, then cached)."""
    state = request.app.state
    body: bytes | None = getattr(state, "openapi_json", None)
    if body is None:
        body = orjson.dumps(build_spec(state.settings))
        state.openapi_json = body
    return Response(body, media_type=JSON)


def build_spec(settings: Settings, operations: Sequence[Operation] = OPERATIONS) -> dict[str, Any]:
    """The OpenAPI document for an app with `settings`, one operation per table row."""
    refs, components = _schemas(operations)
    _apply_limits(components, settings)
    auth_on = bool(settings.api_keys) or settings.api_keys_file is not None
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        errors = set(op.errors)
        security: list[dict[str, list[str]]] | None = None  # no keys: no security named
        if auth_on:
            security = [] if op.path in auth.EXEMPT_PATHS else [{"apiKey": []}]
            if security:
                errors.add(401)
        if settings.enable_rate_limit and op.path not in ratelimit.EXEMPT_PATHS:
            errors.add(429)
        paths.setdefault(op.path, {})[op.method.lower()] = _operation(
            op, refs, sorted(errors), security
        )
    spec: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "embedserve", "version": __version__, "description": _intro(settings)},
        "paths": paths,
        "components": {"schemas": components},
    }
    if auth_on:
        spec["components"]["securitySchemes"] = {
            "apiKey": {"type": "http", "scheme": "bearer", "description": "An API_KEYS key."}
        }
    return spec


def spec_path(route_path: str) -> str:
    """A Starlette route path as the document writes it: ``{name:path}`` -> ``{name}``."""
    return re.sub(r"\{(\w+):\w+\}", r"{\1}", route_path)


def _schemas(
    operations: Sequence[Operation],
) -> tuple[dict[type[BaseModel], dict[str, Any]], dict[str, Any]]:
    """Each model's ``$ref``, and every schema (the models' ``$defs`` gathered) by name."""
    modes: dict[type[BaseModel], JsonSchemaMode] = {
        ErrorResponse: "serialization",
        OpenAIErrorResponse: "serialization",
    }
    for op in operations:
        if op.request is not None:
            modes[op.request] = "validation"
        for model in (op.response, *op.also.values()):
            if model is not None:
                modes[model] = "serialization"
    keyed, defs = models_json_schema(list(modes.items()), ref_template=REF_TEMPLATE)
    refs = {model: keyed[(model, mode)] for model, mode in modes.items()}
    return refs, dict(defs.get("$defs", {}))


def _apply_limits(components: dict[str, Any], settings: Settings) -> None:
    """Write this server's MAX_BATCH_SIZE into the request schemas (more texts: 422, or 400
    under /v1), copying what it changes: the models' schemas may share dicts."""
    for name, prop in (("BatchEmbedRequest", "texts"), ("EmbeddingsRequest", "input")):
        properties = components.get(name, {}).get("properties", {})
        if prop not in properties:
            continue
        schema = dict(properties[prop])
        if schema.get("type") == "array":
            schema["maxItems"] = settings.max_batch_size
        elif "anyOf" in schema:
            schema["anyOf"] = [
                {**branch, "maxItems": settings.max_batch_size}
                if branch.get("type") == "array"
                else branch
                for branch in schema["anyOf"]
            ]
        properties[prop] = schema


def _operation(
    op: Operation,
    refs: Mapping[type[BaseModel], Any],
    errors: list[int],
    security: list[dict[str, list[str]]] | None,
) -> dict[str, Any]:
    error_model = OpenAIErrorResponse if op.path.startswith(OPENAI_PREFIX) else ErrorResponse
    responses: dict[str, Any] = {"200": _ok(op, refs)}
    for status, model in op.also.items():
        responses[str(status)] = _json_response(HTTPStatus(status).phrase, refs[model])
    for status in errors:
        headers = ERROR_HEADERS.get(status, ())
        responses[str(status)] = _json_response(
            ERROR_TEXT[status], refs[error_model], headers, always=status != 503
        )
    words = re.sub(r"\W+", "_", op.path).strip("_")
    doc: dict[str, Any] = {
        "tags": [op.tag],
        "summary": op.summary,
        "operationId": f"{op.method.lower()}_{words}",
        "responses": responses,
    }
    if op.description:
        doc["description"] = op.description
    names = re.findall(r"\{(\w+)\}", op.path)
    parameters = [_param(name, "path", op.params.get(name)) for name in names]
    parameters += [_param(name, "query", param) for name, param in op.query.items()]
    if parameters:
        doc["parameters"] = parameters
    if op.request is not None:
        doc["requestBody"] = {"required": True, "content": {JSON: {"schema": refs[op.request]}}}
    if security is not None:
        doc["security"] = security
    return doc


def _ok(op: Operation, refs: Mapping[type[BaseModel], Any]) -> dict[str, Any]:
    response = _json_response("OK", {"type": "object"}, op.headers)
    content: dict[str, Any] = {}
    for media in op.media_types:
        if media == JSON:
            schema = refs[op.response] if op.response is not None else {"type": "object"}
        else:
            schema = {"type": "string"}
        content[media] = {"schema": schema}
    response["content"] = content
    return response


def _json_response(
    description: str, schema: Any, headers: Sequence[str] = (), *, always: bool = True
) -> dict[str, Any]:
    """A JSON response; `always`: its `headers` are sent with every such answer."""
    response: dict[str, Any] = {"description": description, "content": {JSON: {"schema": schema}}}
    if headers:
        response["headers"] = {
            name: {"description": HEADERS[name], "required": always, "schema": {"type": "string"}}
            for name in headers
        }
    return response


def _param(name: str, where: str, param: Param | None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    if param is not None and param.enum:
        schema["enum"] = list(param.enum)
    doc: dict[str, Any] = {"name": name, "in": where, "required": where == "path"}
    doc["schema"] = schema
    if param is not None:
        doc["description"] = param.description
    return doc


def _intro(settings: Settings) -> str:
    return (
        "A dynamic micro-batching embedding server. Errors are "
        '`{"error", "error_type"}`; under `/v1` they are OpenAI\'s '
        '`{"error": {"message", "type", "param", "code"}}`.\n\n'
        f"This server: at most {settings.max_batch_size} texts per request (MAX_BATCH_SIZE), "
        f"{settings.max_text_length} characters per text (MAX_TEXT_LENGTH), "
        f"{settings.max_request_bytes} bytes per body (MAX_REQUEST_BYTES); default model: "
        f"{settings.default_model or 'none (model_name is required)'}."
    )
