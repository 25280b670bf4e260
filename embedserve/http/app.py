"""`create_app(settings)`: the Starlette application, its lifespan and its error handlers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp

from embedserve.engine.registry import ModelRegistry
from embedserve.engine.wiring import build_registry
from embedserve.errors import EmbedServeError, ValidationFailed
from embedserve.http.middleware.access_log import AccessLog
from embedserve.http.middleware.auth import ApiKeyAuth
from embedserve.http.middleware.body_limit import BodySizeLimit
from embedserve.http.middleware.client_addr import IPNetwork, behind_proxies
from embedserve.http.middleware.ratelimit import RateLimit, TokenBuckets
from embedserve.http.prometheus import PrometheusMetrics
from embedserve.http.request_stats import AppStats
from embedserve.http.responses import error_response
from embedserve.http.route_table import routes
from embedserve.http.tei_api import TEI_HEADERS
from embedserve.settings import Settings

logger = logging.getLogger(__name__)


def create_app(settings: Settings, registry: ModelRegistry | None = None) -> Starlette:
    """The ASGI app. `registry` defaults to one with the real loader (tests pass a fake)."""
    registry = registry if registry is not None else build_registry(settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            # Inside the try: a required model that fails releases those already loaded.
            await registry.start()
            logger.info("ready: %s", ", ".join(registry.required) or "no required models")
            yield
        finally:
            # The last phase of `server._Server.shutdown`: the batchers get what is left of
            # the deadline the signal set, not a grace of their own.
            await registry.aclose(settings.shutdown_grace_s)
            logger.info("models released")

    # First is outermost. CORS wraps auth and rate limit so their 401/429 carry CORS headers;
    # auth runs before the rate limit so a refused request spends no key's budget.
    # `AccessLog`, outside all of these, stamps each request's arrival (see `_App`).
    middleware: list[Middleware] = []
    if settings.enable_cors:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["*"],
                expose_headers=[
                    "X-Queue-Time",
                    "X-Inference-Time",
                    *TEI_HEADERS,
                    "Retry-After",
                    "X-Request-ID",
                    "RateLimit-Limit",
                    "RateLimit-Remaining",
                    "RateLimit-Reset",
                    "RateLimit-Policy",
                    "WWW-Authenticate",
                ],
            )
        )
    if settings.accepted_api_keys:
        bulk_only = [key.get_secret_value() for key in settings.bulk_only_api_keys]
        middleware.append(
            Middleware(ApiKeyAuth, keys=settings.accepted_api_keys, bulk_only=bulk_only)
        )
    if settings.enable_rate_limit:
        buckets = TokenBuckets(settings.rate_limit_per_minute)
        middleware.append(Middleware(RateLimit, buckets=buckets))
    middleware.append(
        Middleware(
            BodySizeLimit,
            max_bytes=settings.max_request_bytes,
            timeout_s=settings.body_timeout_s,
        )
    )
    stats = AppStats()
    prometheus = PrometheusMetrics(registry, stats=stats) if settings.enable_metrics else None
    if prometheus is not None:
        registry.observer = prometheus
    access_log = partial(
        AccessLog,
        log=settings.access_log,
        on_request=prometheus.on_request if prometheus is not None else None,
        on_error=stats.count_error,
    )
    app = _App(
        access_log=access_log,
        trusted_proxies=settings.trusted_proxies,
        debug=False,  # never render tracebacks to clients, whatever DEBUG says
        routes=routes(),
        middleware=middleware,
        lifespan=lifespan,
        exception_handlers={
            EmbedServeError: _handle_error,
            HTTPException: _handle_http_exception,
            Exception: _handle_unexpected,
        },
    )
    app.state.settings = settings
    app.state.registry = registry
    app.state.stats = stats
    app.state.prometheus = prometheus
    # What every handler reads, in one lookup (each of `app.state`'s costs an exception).
    app.state.parts = (settings, registry, app.state.stats)
    return app


class _App(Starlette):
    """Starlette with `AccessLog` outside even the 500 handler, so unhandled errors are
    logged, counted and carry X-Request-ID like every other answer; outside it, the proxy
    headers layer, so that every layer sees the same client address.
    """

    def __init__(
        self,
        *,
        access_log: Callable[..., ASGIApp],
        trusted_proxies: Sequence[IPNetwork],
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._access_log = access_log
        self._trusted_proxies = trusted_proxies

    def build_middleware_stack(self) -> ASGIApp:
        static_paths = frozenset(
            path for route in self.routes if "{" not in (path := getattr(route, "path", "{"))
        )
        logged = self._access_log(super().build_middleware_stack(), static_paths=static_paths)
        return behind_proxies(logged, self._trusted_proxies)


async def _handle_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EmbedServeError)
    extra = {"details": exc.details} if isinstance(exc, ValidationFailed) and exc.details else {}
    return error_response(
        exc.status_code,
        exc.message,
        exc.error_type,
        exc.headers,
        extra,
        path=request.url.path,
        param=exc.param,
    )


async def _handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kinds = {404: "not_found", 405: "method_not_allowed"}
    return error_response(
        exc.status_code,
        str(exc.detail),
        kinds.get(exc.status_code, "http_error"),
        exc.headers,
        path=request.url.path,
    )


async def _handle_unexpected(request: Request, exc: Exception) -> Response:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal server error", "internal_error", path=request.url.path)
