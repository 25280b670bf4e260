"""The one route table: each endpoint's method, path, handler and OpenAPI description.

The router (`routes`) and ``/openapi.json`` (`openapi.build_spec`, over the routes the app
serves) are both built from `ROUTES`, so a route cannot exist undocumented or the other way
round. The router tries routes in table order: the busy embedding endpoints come first.
"""

from __future__ import annotations

from starlette.routing import BaseRoute

from embedserve.http import openai_api, swagger, tei_api
from embedserve.http import routes as seed_api
from embedserve.http.embed_call import Endpoint
from embedserve.http.openai_api import EmbeddingsRequest
from embedserve.http.openapi import JSON, DocumentedRoute, Operation, Param, openapi_json
from embedserve.http.schemas import (
    BatchEmbedRequest,
    BatchEmbedResponse,
    EmbedRequest,
    EmbedResponse,
    HealthResponse,
    MetricsResponse,
    ModelInfoResponse,
    ModelsResponse,
    OpenAIEmbeddingsResponse,
    OpenAIModel,
    OpenAIModelList,
    ReadyResponse,
)
from embedserve.http.swagger import ASSET_NAMES
from embedserve.http.tei_api import TEI_HEADERS
from embedserve.http.tei_schemas import (
    DecodeRequest,
    DecodeResponse,
    EmbedAllRequest,
    EmbedAllResponse,
    TEIEmbedRequest,
    TEIEmbedResponse,
    TEIInfo,
    TokenizeRequest,
    TokenizeResponse,
)

MODEL_NAME = Param(
    "Model name. It contains '/': request /models/BAAI/bge-small-en-v1.5 as it is (the "
    "slash may also be sent as %2F, as Swagger UI's Try it out does)."
)
METRICS_FORMAT = Param("json or prometheus; without it, `Accept` decides", ("json", "prometheus"))
EMBED_ERRORS = (400, 403, 404, 408, 413, 415, 422, 429, 500, 503, 504)
OPENAI_EMBED_ERRORS = (400, 403, 404, 408, 413, 415, 429, 500, 503, 504)
TIMING = ("X-Queue-Time", "X-Inference-Time")
# TEI's routes: its statuses (424 when the model fails), its headers.
TEI_ERRORS = (400, 403, 404, 408, 413, 415, 422, 424, 429, 503, 504)
TEI_TOKEN_ERRORS = (400, 403, 404, 408, 413, 415, 422, 429, 503, 504)
TEI_TIMING = (*TIMING, *TEI_HEADERS)

# fmt: off
ROUTES: tuple[Operation, ...] = (
    Operation("POST", "/embed", Endpoint(seed_api.embed),
              "Embed one text (with text), or TEI's embed (with inputs)",
              (EmbedResponse, TEIEmbedResponse), (EmbedRequest, TEIEmbedRequest),
              tuple(sorted({*EMBED_ERRORS, *TEI_ERRORS})), headers=TIMING,
              description="A body with `text` is embedserve's request and answer; a body with "
              "`inputs` is text-embeddings-inference's, answered as POST / answers it (a bare "
              "array of vectors, TEI's statuses and headers). Both or neither: 422."),
    Operation("POST", "/embed/batch", Endpoint(seed_api.embed_batch),
              "Embed several texts, answered in the same order",
              BatchEmbedResponse, BatchEmbedRequest, EMBED_ERRORS, headers=TIMING),
    Operation("POST", "/v1/embeddings", Endpoint(openai_api.create_embeddings),
              "OpenAI-compatible embeddings",
              OpenAIEmbeddingsResponse, EmbeddingsRequest, OPENAI_EMBED_ERRORS, tag="openai",
              headers=TIMING, description="Invalid fields are 400 here, as OpenAI answers."),
    Operation("GET", "/health", Endpoint(seed_api.health),
              "Liveness: healthy when every required model is loaded",
              HealthResponse, also={503: HealthResponse}, tag="operations"),
    Operation("GET", "/ready", Endpoint(seed_api.ready), "Readiness, for load balancers",
              ReadyResponse, also={503: ReadyResponse}, tag="operations"),
    Operation("GET", "/metrics", Endpoint(seed_api.metrics),
              "Request totals and batching figures", MetricsResponse,
              errors=(400, 404), tag="operations", query={"format": METRICS_FORMAT},
              media_types=(JSON, "text/plain", "application/openmetrics-text"),
              description="JSON, or the Prometheus exposition when `Accept` asks for "
              "text/plain or OpenMetrics (or ?format=prometheus). 404 when "
              "ENABLE_METRICS=false."),
    Operation("GET", "/models", Endpoint(seed_api.list_models),
              "Required, loaded, allowed and imported models", ModelsResponse, tag="models"),
    Operation("GET", "/models/{model_name:path}", Endpoint(seed_api.show_model),
              "One model, loaded or not", ModelInfoResponse,
              errors=(404,), tag="models", params={"model_name": MODEL_NAME},
              description="404 when the model is unknown, not allowed, or an invalid name."),
    Operation("GET", "/v1/models", Endpoint(openai_api.list_models),
              "OpenAI-compatible model list", OpenAIModelList, tag="openai"),
    Operation("GET", "/v1/models/{model_name:path}", Endpoint(openai_api.retrieve_model),
              "OpenAI-compatible model object", OpenAIModel,
              errors=(404,), tag="openai", params={"model_name": MODEL_NAME}),
    Operation("POST", "/", Endpoint(tei_api.embed),
              "TEI: embed (what HF clients given a base URL call)",
              TEIEmbedResponse, TEIEmbedRequest, TEI_ERRORS, tag="tei", headers=TEI_TIMING,
              description="text-embeddings-inference's embed, with the default model. More "
              "inputs than MAX_BATCH_SIZE: 413; the model failing: 424."),
    Operation("POST", "/embed_all", Endpoint(tei_api.embed_all),
              "TEI: per input, a vector for each token (no pooling)",
              EmbedAllResponse, EmbedAllRequest, TEI_ERRORS, tag="tei",
              headers=TEI_HEADERS, description="The model's last hidden state, one row per "
              "token, specials included. Needs a model with a packed graph (else 424); runs as "
              "one model call per request, not micro-batched."),
    Operation("GET", "/info", Endpoint(tei_api.info),
              "TEI: the default model and the limits", TEIInfo, errors=(503,), tag="tei"),
    Operation("POST", "/tokenize", Endpoint(tei_api.tokenize),
              "TEI: each input's tokens with character offsets",
              TokenizeResponse, TokenizeRequest, TEI_TOKEN_ERRORS, tag="tei"),
    Operation("POST", "/decode", Endpoint(tei_api.decode), "TEI: token ids back to text",
              DecodeResponse, DecodeRequest, TEI_TOKEN_ERRORS, tag="tei"),
    Operation("GET", "/openapi.json", openapi_json, "This document", None,
              tag="documentation"),
    Operation("GET", "/docs", swagger.docs_page,
              "Swagger UI over this document (no CDN: works offline)", None,
              tag="documentation", media_types=("text/html",)),
    Operation("GET", "/docs/static/{name}", swagger.docs_asset,
              "An asset of the /docs page", None,
              errors=(404,), tag="documentation",
              params={"name": Param("Asset file name", ASSET_NAMES)},
              media_types=("text/css", "text/javascript", "image/png")),
)
# fmt: on


def routes() -> list[BaseRoute]:
    """Every route of the API, one per row of `ROUTES`, in its order."""
    return [DocumentedRoute(operation) for operation in ROUTES]
