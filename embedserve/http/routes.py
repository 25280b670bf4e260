"""The seed API's handlers (embed, health, metrics, models). Handlers validate, then
``await registry.embed(...)``; nothing more. `route_table` routes requests to them."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from embedserve.engine.registry import ModelRegistry
from embedserve.errors import (
    InvalidModelName,
    ModelNotAllowed,
    ModelNotFound,
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
from embedserve.http.prometheus import prometheus_answer
from embedserve.http.responses import JSONResponse, error_response
from embedserve.http.schemas import (
    BatchEmbedRequest,
    EmbedRequest,
    check_texts,
    validate,
)
from embedserve.http.tei_api import embed_inputs
from embedserve.settings import Settings


def _model_name(settings: Settings, requested: str | None) -> str:
    name = requested if requested is not None else settings.default_model
    if name is None:
        raise ValidationFailed("invalid field 'model_name': required (no default model is set)")
    return name


async def embed(request: Request) -> Response:
    """``POST /embed``: one text -> one embedding; a body with ``inputs`` instead of ``text``
    is TEI's request, answered as TEI does (`tei_api.embed_inputs`)."""
    settings, _, stats = state(request)
    stats.total_requests += 1
    data = await json_body(request)
    if isinstance(data, dict) and ("text" in data) == ("inputs" in data):
        raise ValidationFailed(
            "send either 'text' (embedserve's request) or 'inputs' (TEI's request)"
            + (", not both" if "text" in data else "")
        )
    if isinstance(data, dict) and "inputs" in data:
        return await embed_inputs(request, data)
    body = validate(EmbedRequest, data)
    model = _model_name(settings, body.model_name)
    [text] = check_texts(
        [body.text], max_length=settings.max_text_chars, truncate=body.truncate, field="text"
    )
    try:
        lane = choose_lane(request, 1, priority=body.priority)
        result, elapsed_ms = await run_embed(request, model, [text], lane)
    except ClientGone:
        return Response(status_code=499)
    content: dict[str, Any] = {
        "embedding": result.vectors[0],
        "model_name": model,
        "dimension": result.vectors.shape[1],
        "text_length": len(text),
        "processing_time_ms": round(elapsed_ms, 3),
    }
    if len(text) != len(body.text):
        content["truncated"] = True
    return JSONResponse(content, headers=timing_headers(result))


async def embed_batch(request: Request) -> Response:
    """``POST /embed/batch``: texts -> embeddings in the same order."""
    settings, _, stats = state(request)
    stats.total_requests += 1
    data = await json_body(request)
    # Counted before validation: pydantic reports every bad item, so a 10 MB list of numbers
    # would hold the event loop for seconds and answer with a 200 MB error body.
    sent = data.get("texts") if isinstance(data, dict) else None
    if isinstance(sent, list) and len(sent) > settings.max_batch_size:
        raise ValidationFailed(
            f"invalid field 'texts': {len(sent)} texts, over the limit of "
            f"{settings.max_batch_size} (MAX_BATCH_SIZE)"
        )
    body = validate(BatchEmbedRequest, data)
    model = _model_name(settings, body.model_name)
    texts = check_texts(
        body.texts, max_length=settings.max_text_chars, truncate=body.truncate, field="texts"
    )
    try:
        lane = choose_lane(request, len(texts), priority=body.priority, bulk=True)
        result, elapsed_ms = await run_embed(request, model, texts, lane)
    except ClientGone:
        return Response(status_code=499)
    content = {
        "embeddings": result.vectors,
        "model_name": model,
        "dimension": result.vectors.shape[1],
        "count": len(texts),
        "processing_time_ms": round(elapsed_ms, 3),
    }
    return JSONResponse(content, headers=timing_headers(result))


def _cache_info(settings: Settings, registry: ModelRegistry) -> dict[str, Any]:
    names = [m.name for m in registry.loaded()]
    return {
        "cached_models": names,
        "num_cached": len(names),
        "max_cached": settings.max_cached_models,
        "cache_ttl": settings.model_cache_ttl_s,
    }


async def health(request: Request) -> Response:
    """``GET /health``: 200 "healthy" only when required models are loaded and not draining."""
    settings, registry, stats = state(request)
    if registry.ready:
        status, code = "healthy", 200
    elif registry.closing:
        status, code = "shutting_down", 503
    else:
        status, code = "unhealthy", 503
    content = {
        "status": status,
        "cache_info": _cache_info(settings, registry),
        "uptime_seconds": stats.uptime_s(),
    }
    return JSONResponse(content, status_code=code)


async def ready(request: Request) -> Response:
    """``GET /ready``: readiness for load balancers and Kubernetes."""
    _, registry, _ = state(request)
    if registry.ready:
        return JSONResponse({"status": "ready"})
    missing = [name for name in registry.required if name not in registry.loaded_names()]
    return JSONResponse(
        {"status": "shutting_down" if registry.closing else "not_ready", "missing": missing},
        status_code=503,
    )


async def metrics(request: Request) -> Response:
    """``GET /metrics``: request totals plus per-model batching figures (JSON), or the
    Prometheus exposition when the scraper asks for it (see `prometheus.prometheus_answer`).
    """
    settings, registry, stats = state(request)
    if not settings.enable_metrics:
        return error_response(404, "metrics are disabled (ENABLE_METRICS=false)", "not_found")
    exposition = prometheus_answer(request)
    if exposition is not None:
        return exposition
    per_model: dict[str, Any] = {}
    batches = texts = real = slots = 0
    for info in registry.loaded():
        model_stats = info.stats
        batches += int(model_stats["batches"])
        texts += int(model_stats["texts"])
        real += int(model_stats["real_tokens"])
        slots += int(model_stats["slot_tokens"])
        per_model[info.name] = {
            "queue_depth": info.queued,
            "in_flight": info.in_flight,
            "packed": info.packed,
            "batches": model_stats["batches"],
            "texts": model_stats["texts"],
            "mean_batch_size": model_stats["mean_batch_size"],
            "mean_fill": model_stats["mean_fill"],
            "failed_batches": model_stats["failed_batches"],
            "dropped_texts": model_stats["dropped_texts"],
            "inference_time_s": model_stats["inference_s"],
            "queue_time_s": model_stats["queue_s"],
            "lanes": {
                lane: {
                    "queue_depth": figures["queue_depth"],
                    "texts": figures["texts"],
                    "queue_time_s": figures["queue_s"],
                }
                for lane, figures in info.lanes.items()
            },
        }
    content = {
        "total_requests": stats.total_requests,
        "total_embeddings": stats.total_embeddings,
        "cache_info": _cache_info(settings, registry),
        "uptime_seconds": stats.uptime_s(),
        "errors": stats.errors_by_type(),
        "batching": {
            "enabled": settings.enable_batching,
            "batches": batches,
            "mean_batch_size": round(texts / batches, 3) if batches else 0.0,
            "mean_fill": round(real / slots, 4) if slots else 0.0,
            "real_tokens": real,
            "slot_tokens": slots,
            "evictions": registry.evictions,
            "offloads": registry.offloads,
            "models": per_model,
        },
    }
    return JSONResponse(content)


async def list_models(request: Request) -> Response:
    """``GET /models``: required, loaded and allowed models."""
    settings, registry, _ = state(request)
    return JSONResponse(
        {
            "required_models": settings.required_models,
            "cached_models": [m.name for m in registry.loaded()],
            "allowed_models": settings.allowed_models or None,
            "local_models": registry.local_models(),
        }
    )


async def show_model(request: Request) -> Response:
    """``GET /models/{model_name}``: facts about one model; 404 if unknown or not allowed."""
    _, registry, _ = state(request)
    name = request.path_params["model_name"]
    try:
        info = registry.describe(name)
    except (InvalidModelName, ModelNotAllowed, ModelNotFound):
        return error_response(404, f"model {name!r} is not available here", "model_not_found")
    details = asdict(info)
    content = {
        "model_name": info.name,
        "is_cached": info.is_loaded,
        "load_time": info.load_time_s,
        "loaded_at": info.loaded_at,
        "last_used": info.last_used,
        **{
            k: v
            for k, v in details.items()
            if k not in ("name", "is_loaded", "load_time_s", "loaded_at", "last_used")
        },
    }
    return JSONResponse(content)
