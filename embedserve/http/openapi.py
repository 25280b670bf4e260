"""``GET /openapi.json``: the OpenAPI 3.1 document, generated from the pydantic models.

The document is built from the rows (`Operation`: method, path, handler, request and
response models, error statuses, summary) of the one route table, `route_table.ROUTES`,
that the router is built from too: each `DocumentedRoute` keeps its row, and the document
describes the routes the app serves, never written by hand. It depends on the app's
settings (limits, API keys, rate limiting), so it is built once per app, on first request,
and cached in ``app.state``.

One module because the document is one generator: the texts of every status and header,
the schemas and each operation's parts are read together to see what a client is told
(the table of routes, the other half, is `route_table`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

import orjson
from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from embedserve import __version__
from embedserve.errors import EmbedServeError
from embedserve.http.middleware import auth, ratelimit
from embedserve.http.responses import OPENAI_PREFIX
from embedserve.http.schemas import ErrorResponse, OpenAIErrorResponse
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
    """One row of the route table: a route, and how the document describes it.

    `path` is Starlette's (``{name:path}`` converters included; the document drops them);
    `endpoint` is the handler the router calls. `response` is the JSON body of a 200
    (None: any object; a tuple: any one of them); `request` a tuple: exactly one of them,
    told apart by their required fields (a body with the required fields of two is none of
    them). `media_types` are the 200's content types (other than JSON, a string: HTML,
    assets, Prometheus text). `errors` are the statuses answered in the error shape
    (OpenAI's under ``/v1``); `also` maps other statuses to bodies of their own
    (``/health`` answers 503 with its usual body). `params` describe path parameters,
    `query` the optional query parameters; `headers` are the
    response headers of a 200.
    """

    method: str
    path: str
    endpoint: Callable[..., Any]
    summary: str
    response: type[BaseModel] | tuple[type[BaseModel], ...] | None
    request: type[BaseModel] | tuple[type[BaseModel], ...] | None = None
    errors: tuple[int, ...] = ()
    also: Mapping[int, type[BaseModel]] = field(default_factory=dict)
    tag: str = "embeddings"
    description: str = ""
    params: Mapping[str, Param] = field(default_factory=dict)
    query: Mapping[str, Param] = field(default_factory=dict)
    headers: tuple[str, ...] = ()
    media_types: tuple[str, ...] = (JSON,)


class DocumentedRoute(Route):
    """The route of one table row; it keeps the row, which the document is built from."""

    def __init__(self, operation: Operation) -> None:
        super().__init__(operation.path, operation.endpoint, methods=[operation.method])
        self.operation = operation


def served_operations(routes: Iterable[BaseRoute]) -> list[Operation]:
    """The table rows of the routes an app serves, in their order."""
    return [route.operation for route in routes if isinstance(route, DocumentedRoute)]


ERROR_TEXT: dict[int, str] = {
    400: "Malformed or empty JSON body, or an invalid query value (bad_request; under /v1 "
    "also every invalid field), or a model name that could leave the models directory "
    "(invalid_model_name).",
    401: "No API key, or a wrong one (missing_api_key, invalid_api_key).",
    403: "The model is outside ALLOWED_MODELS (model_not_allowed); nothing was loaded.",
    404: "Not found: no such model (model_not_found), or nothing here (not_found).",
    408: "The body did not arrive within BODY_TIMEOUT_S of the headers (body_timeout); the "
    "connection is closed.",
    413: "The body is over MAX_REQUEST_BYTES (request_too_large); the connection is closed. "
    "On TEI's routes also more than MAX_BATCH_SIZE inputs (validation_error), as TEI answers.",
    415: "A content type other than JSON (unsupported_media_type).",
    422: "Missing or mistyped fields, blank text, a text over MAX_TEXT_LENGTH, or more than "
    "MAX_BATCH_SIZE texts (validation_error); `details` names every failed field.",
    424: "On TEI's routes: the model failed on a text of this request (inference_error), or "
    "cannot give token vectors: it has no packed graph (not_supported).",
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
    "X-Compute-Time": "Milliseconds the request spent in the server (TEI's header).",
    "X-Total-Time": "The same as X-Compute-Time (TEI's header).",
    "X-Compute-Characters": "Characters embedded, after any truncation (TEI's header).",
    "X-Compute-Tokens": "Tokens the model ran, specials included (TEI's header).",
    "Retry-After": "Seconds to wait before trying again (on 503, with shutting_down).",
    "WWW-Authenticate": "The Bearer challenge.",
}
ERROR_HEADERS = {401: ("WWW-Authenticate",), 429: ("Retry-After",), 503: ("Retry-After",)}


async def openapi_json(request: Request) -> Response:
    """``GET /openapi.json``: this app's document (built on first request, then cached)."""
    state = request.app.state
    body: bytes | None = getattr(state, "openapi_json", None)
    if body is None:
        operations = served_operations(request.app.routes)
        spec = build_spec(state.settings, operations, dimension=_tei_dimension(request))
        body = orjson.dumps(spec)
        state.openapi_json = body
    return Response(body, media_type=JSON)


def build_spec(
    settings: Settings, operations: Sequence[Operation], *, dimension: int | None = None
) -> dict[str, Any]:
    """The OpenAPI document for an app with `settings`, one operation per table row.

    `dimension`, the default model's, is the one value TEI's `dimensions` accepts.
    """
    refs, components = _schemas(operations)
    _apply_limits(components, settings)
    if dimension is not None:
        _only_dimension(components, dimension)
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
        paths.setdefault(document_path(op.path), {})[op.method.lower()] = _operation(
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


def document_path(route_path: str) -> str:
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
        for model in _models(op.request):
            modes[model] = "validation"
        for model in (*_models(op.response), *op.also.values()):
            modes[model] = "serialization"
    keyed, defs = models_json_schema(list(modes.items()), ref_template=REF_TEMPLATE)
    refs = {model: keyed[(model, mode)] for model, mode in modes.items()}
    return refs, dict(defs.get("$defs", {}))


def _models(
    models: type[BaseModel] | tuple[type[BaseModel], ...] | None,
) -> tuple[type[BaseModel], ...]:
    if models is None:
        return ()
    return models if isinstance(models, tuple) else (models,)


def _apply_limits(components: dict[str, Any], settings: Settings) -> None:
    """Write this server's MAX_BATCH_SIZE into the request schemas (more texts: 422, or 400
    under /v1), copying what it changes: the models' schemas may share dicts."""
    limited = (
        ("BatchEmbedRequest", "texts"),
        ("EmbeddingsRequest", "input"),
        ("TEIEmbedRequest", "inputs"),
        ("EmbedAllRequest", "inputs"),
        ("TokenizeRequest", "inputs"),
        ("DecodeRequest", "ids"),
    )
    for name, prop in limited:
        properties = components.get(name, {}).get("properties", {})
        if prop not in properties:
            continue
        schema = dict(properties[prop])
        if schema.get("type") == "array":
            schema["maxItems"] = settings.max_batch_size
        elif "anyOf" in schema:
            # The batch branch: an array of texts, or of id arrays (not one id array).
            schema["anyOf"] = [
                {**branch, "maxItems": settings.max_batch_size}
                if branch.get("type") == "array" and branch["items"].get("type") != "integer"
                else branch
                for branch in schema["anyOf"]
            ]
        properties[prop] = schema


def _tei_dimension(request: Request) -> int | None:
    """The default model's dimension, when it is known without loading it."""
    settings, registry = request.app.state.settings, request.app.state.registry
    if settings.default_model is None:
        return None
    try:
        dimension: int | None = registry.describe(settings.default_model).dimension
    except EmbedServeError:
        return None
    return dimension


def _only_dimension(components: dict[str, Any], dimension: int) -> None:
    """TEI's `dimensions` as the one value this server accepts (or null)."""
    properties = components.get("TEIEmbedRequest", {}).get("properties", {})
    if "dimensions" in properties:
        described = properties["dimensions"].get("description", "")
        properties["dimensions"] = {
            "anyOf": [{"const": dimension}, {"type": "null"}],
            "default": None,
            "description": described,
        }


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
    path = document_path(op.path)
    words = re.sub(r"\W+", "_", path).strip("_")
    doc: dict[str, Any] = {
        "tags": [op.tag],
        "summary": op.summary,
        "operationId": f"{op.method.lower()}_{words}",
        "responses": responses,
    }
    if op.description:
        doc["description"] = op.description
    names = re.findall(r"\{(\w+)\}", path)
    parameters = [_param(name, "path", op.params.get(name)) for name in names]
    parameters += [_param(name, "query", param) for name, param in op.query.items()]
    if parameters:
        doc["parameters"] = parameters
    if op.request is not None:
        body = _one_of(op.request, refs)
        doc["requestBody"] = {"required": True, "content": {JSON: {"schema": body}}}
    if security is not None:
        doc["security"] = security
    return doc


def _ok(op: Operation, refs: Mapping[type[BaseModel], Any]) -> dict[str, Any]:
    response = _json_response("OK", {"type": "object"}, op.headers)
    content: dict[str, Any] = {}
    for media in op.media_types:
        if media == JSON:
            responses = [refs[model] for model in _models(op.response)]
            schema = {"type": "object"} if not responses else _single_or(responses, "anyOf")
        else:
            schema = {"type": "string"}
        content[media] = {"schema": schema}
    response["content"] = content
    return response


def _single_or(schemas: list[Any], keyword: str) -> Any:
    return schemas[0] if len(schemas) == 1 else {keyword: schemas}


def _one_of(
    request: type[BaseModel] | tuple[type[BaseModel], ...], refs: Mapping[type[BaseModel], Any]
) -> Any:
    """One request model's schema, or exactly one of several: each branch refuses the other
    branches' required fields, so a body with both sets matches none."""
    models = _models(request)
    if len(models) == 1:
        return refs[models[0]]
    required = {model: _required(model) for model in models}
    branches = []
    for model in models:
        others = sorted({key for other in models if other is not model for key in required[other]})
        branches.append(
            {"allOf": [refs[model]], "not": {"anyOf": [{"required": [key]} for key in others]}}
        )
    return {"oneOf": branches}


def _required(model: type[BaseModel]) -> list[str]:
    return [name for name, info in model.model_fields.items() if info.is_required()]


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
        f"{settings.max_text_chars} characters per text (MAX_TEXT_LENGTH), "
        f"{settings.max_request_bytes} bytes per body (MAX_REQUEST_BYTES); default model: "
        f"{settings.default_model or 'none (model_name is required)'}."
    )
