"""Run the app under uvicorn with a phased, bounded shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import gc
import logging
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
    """uvicorn's server, stopped within one deadline (see `shutdown`).

    The registry holds the deadline: the first `begin_shutdown(grace_s)` sets it, at the
    signal, and every phase of the stop gets only what is left of it.
    """

    def __init__(self, config: uvicorn.Config, registry: ModelRegistry, grace_s: float) -> None:
        super().__init__(config)
        self._registry = registry
        self._grace_s = grace_s

    async def _serve(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn's `serve` wraps this in its signal capture and re-raises a caught SIGTERM
        # as soon as this returns, which ends the process at once (no atexit handlers): so
        # the log queue is flushed here, inside, not after `serve`. `_serve` is uvicorn's
        # own (0.29+) split; tests/test_server_integration.py checks the last log line.
        try:
            await super()._serve(sockets)
        finally:
            stop_background_logging()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs as a signal handler: it only sets fields; `shutdown` does the rest on the loop.
        if not self._registry.closing:
            self._registry.begin_shutdown(self._grace_s)
            logger.info("signal %s: draining (grace %gs)", sig, self._grace_s)
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Stop within SHUTDOWN_GRACE_S of the signal, one deadline shared by every phase.

        0. At the signal (`handle_exit`): the deadline starts, and the registry refuses new
           work (embed requests 503, /health and /ready 503).
        1. Stop accepting connections; idle keep-alive connections close now, busy ones
           after their response.
        2. Shortly before the deadline, whatever is still queued in a batcher is answered
           503 (`shutting_down`), rather than the bare 500 of the cancellation in 3.
        3. In-flight requests finish until the deadline; those still running are cancelled.
        4. The lifespan's shutdown (`http.app.create_app`): each batcher drains within what
           is left (nothing, if 3 used it all), its loop is cancelled and its leftovers
           fail; then the models are released.
        Total: at most SHUTDOWN_GRACE_S, plus the batch running in a worker thread at the
        deadline (a thread cannot be interrupted) and releasing the models.
        """
        registry = self._registry
        registry.begin_shutdown(self._grace_s)  # 0, when no signal started the stop
        logger.info("Shutting down")

        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()

        # The margin is for the batch running at the expiry to finish before the cancel in
        # 3: up to a second, and a third of a short grace (0.2 of a 1 s grace lost the
        # race on a busy 2-core machine: tests/test_server_integration.py).
        margin_s = min(1.0, self._grace_s * 0.3)
        registry.expire_queued_after(max(0.0, registry.shutdown_remaining_s() - margin_s))

        try:
            async with asyncio.timeout(registry.shutdown_remaining_s()):
                await self._requests_finished()
        except TimeoutError:
            tasks = list(self.server_state.tasks)
            logger.error("grace period over: cancelling %d running request(s)", len(tasks))
            for task in tasks:
                task.cancel(msg="shutdown grace period over")

        if not self.force_exit:  # a second Ctrl+C skips the drain
            await self.lifespan.shutdown()

    async def _requests_finished(self) -> None:
        """Return once every connection has closed and every request task has ended."""
        state = self.server_state
        # uvicorn's state signals neither, so it is polled, as uvicorn's own shutdown does.
        while (state.connections or state.tasks) and not self.force_exit:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for server in self.servers:
            await server.wait_closed()


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
        # No timeout_graceful_shutdown: `_Server.shutdown`, which replaces uvicorn's, bounds
        # the whole stop by SHUTDOWN_GRACE_S.
        log_config=None,  # uvicorn's records go through our handler, in LOG_FORMAT
        access_log=False,  # AccessLog writes one line per request (ACCESS_LOG)
        server_header=False,
        # Forwarded headers are not trusted (no proxy is configured), and skipping the
        # middleware saves a layer on every request.
        proxy_headers=False,
    )
