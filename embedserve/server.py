"""Run the app under uvicorn with a phased, bounded shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import socket
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedserve.engine.backend import route_library_logs
from embedserve.engine.registry import ModelRegistry
from embedserve.http.app import create_app
from embedserve.http.middleware.auth import warn_if_exposed
from embedserve.http.uvicorn_protocol import protocol_class
from embedserve.logs import configure_logging as configure_log_output
from embedserve.logs import stop_background_logging
from embedserve.settings import Settings

logger = logging.getLogger(__name__)

# Python collects its youngest generation every 700 net allocations of container objects.
# With 64 requests in flight that was every few requests, and each collection promoted the
# live requests' frames and dicts to older generations that were then traversed again:
# with the full collections, ~0.2 ms of the event loop's ~1.2 ms per request at 64 clients.
# At 10,000, most request objects are gone before a collection looks at them.
GC_YOUNG_THRESHOLD = 10_000


class _Server(uvicorn.Server):
    """uvicorn's server, told about the signal first so new requests get 503 at once.

    Shutdown phases: (1) the signal marks the registry as draining (new embed requests
    answer 503, /health and /ready turn 503); (2) uvicorn stops accepting connections and
    waits up to the grace period for in-flight requests, which the batchers keep serving;
    (3) the lifespan drains each batcher and releases the models.
    """

    def __init__(self, config: uvicorn.Config, registry: ModelRegistry, grace_s: float) -> None:
        super().__init__(config)
        self._registry = registry
        self._grace_s = grace_s
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _serve(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn's `serve` wraps this in its signal capture and re-raises a caught SIGTERM
        # as soon as this returns, which ends the process at once (no atexit handlers): so
        # the log queue is flushed here, inside, not after `serve`. `_serve` is uvicorn's
        # own (0.29+) split; tests/test_server_integration.py checks the last log line.
        self._loop = asyncio.get_running_loop()
        try:
            await super()._serve(sockets)
        finally:
            stop_background_logging()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs as a signal handler: only set flags here, and schedule the rest on the loop.
        first = not self._registry.closing
        self._registry.begin_shutdown()
        if first and self._loop is not None:
            logger.info("signal %s: draining (grace %gs)", sig, self._grace_s)
            # Queued work is answered 503 shortly before uvicorn's own deadline cancels
            # whatever is left (which clients would see as a bare 500).
            margin = min(1.0, self._grace_s * 0.2)
            self._loop.call_soon_threadsafe(
                self._registry.expire_queued_after, self._grace_s - margin
            )
        super().handle_exit(sig, frame)


class _OneLineStartupFailure:
    """Shortens a failed start-up report to its last line (the error), not a traceback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_short(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed" and message.get("message"):
                last = str(message["message"]).strip().splitlines()[-1]
                message = {**message, "message": last.split(": ", 1)[-1]}
            await send(message)

        await self.app(scope, receive, send_short)


def configure_logging(settings: Settings) -> None:
    """One-line logs (LOG_FORMAT: text or JSON) at LOG_LEVEL (DEBUG when DEBUG=true)."""
    level = "DEBUG" if settings.debug else settings.log_level
    configure_log_output(level, settings.log_format, background=True)
    route_library_logs()


def _tune_gc() -> None:
    """Keep the cyclic garbage collector off the request path.

    Everything imported by now (some 80,000 objects: Starlette, pydantic, numpy, ONNX
    Runtime's bindings) lives as long as the process, so it is frozen out of every later
    collection, which otherwise traversed all of it (~0.1 s on the event loop, each time).
    Models load afterwards, so an offloaded model's memory can still be collected.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def serve(settings: Settings, registry: ModelRegistry | None = None) -> int:
    """Serve until a signal; returns the exit status (3: start-up failed).

    `registry` defaults to the real one (`create_app`'s); the fault-injection tests hand in
    one whose backend fails on purpose, so they run the real server around it.

    After a graceful stop on SIGTERM/SIGINT, uvicorn re-raises the signal, so the process
    ends as killed by that signal (status 143 / -15), as the convention for signals is.
    """
    configure_logging(settings)
    warn_if_exposed(settings)
    app = create_app(settings, registry)
    _tune_gc()
    server = _Server(uvicorn_config(settings, app), app.state.registry, settings.shutdown_grace_s)
    server.run()
    return 0 if server.started else 3


def uvicorn_config(settings: Settings, app: ASGIApp) -> uvicorn.Config:
    """uvicorn's configuration for `app` from the settings."""
    return uvicorn.Config(
        _OneLineStartupFailure(app),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        lifespan="on",
        http=protocol_class(settings.header_timeout_s),  # slow-loris heads: 408 + close
        timeout_keep_alive=settings.keep_alive_s,  # type: ignore[arg-type]
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
        log_config=None,  # uvicorn's records go through our handler, in LOG_FORMAT
        access_log=False,  # AccessLog writes one line per request (ACCESS_LOG)
        server_header=False,
        # Forwarded headers are not trusted (no proxy is configured), and skipping the
        # middleware saves a layer on every request.
        proxy_headers=False,
    )
