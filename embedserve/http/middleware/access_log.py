"""`AccessLog`: the outermost ASGI layer, one log line and one metrics call per HTTP request.

Nothing here logs request headers, query strings or bodies, so an ``Authorization`` header,
an API key in a URL or a text sent for embedding never reaches a log.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedserve.http.middleware.client_addr import client_host
from embedserve.http.middleware.request_id import HEADER, SCOPE_KEY, request_id

ACCESS_LOGGER = logging.getLogger("embedserve.access")

# Handlers that know which model a request used put it in the scope under these keys.
MODEL_KEY = "embedserve.model"
TEXTS_KEY = "embedserve.texts"
# When the request reached the app (time.monotonic()), so draining can tell old from new.
ARRIVED_AT = "embedserve.arrived_at"
# The error_type of an error answer, put there by the response that renders it
# (`http.responses.ErrorResponse`): the access log reads it rather than parsing the body.
ERROR_TYPE_KEY = "embedserve.error_type"

# ``(endpoint, status, seconds)``, called once per answered request.
RequestHook = Callable[[str, int, float], None]
# ``(status, error_type)``, called once per error answer.
ErrorHook = Callable[[int, str], None]

_MAX_LOGGED_CHARS = 200
# What `logging` records as the caller when it does not look for one.
_NO_FILE = "(unknown file)"
_NO_FUNCTION = "(unknown function)"


class AccessLog:
    """The outermost ASGI layer: arrival stamps, request ids, the access log line and
    request metrics.

    Each HTTP request is stamped with its arrival time (``time.monotonic()``, in the scope
    under `ARRIVED_AT`), so that draining can tell old requests from new, and gets an id
    (`request_id.request_id`), stored in the scope under `request_id.SCOPE_KEY` and sent back
    as ``X-Request-ID`` on every answer, errors and middleware refusals included. Once the
    answer is sent (or the request failed), it calls `on_request`, and `on_error` for an
    error answer, and writes one INFO line to ``embedserve.access``: method, path, status,
    duration_ms, model and texts (when the handler set them), error_type, request_id and
    client (`client_addr.client_host`: behind a trusted proxy, the client it forwarded
    for). The error type is the one the error response put in the scope
    (`ERROR_TYPE_KEY`); an answer without one is ``client_disconnected`` (499) or
    ``unknown``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        log: bool = True,
        on_request: RequestHook | None = None,
        on_error: ErrorHook | None = None,
        static_paths: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self._log = log
        self._on_request = on_request
        self._on_error = on_error
        # Requests answered before routing (rate limits) are counted under their path only
        # when it is one of these, so the endpoint label stays bounded.
        self._static_paths = static_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[ARRIVED_AT] = time.monotonic()
        rid = request_id(scope["headers"])
        scope[SCOPE_KEY] = rid
        id_header = (HEADER, rid.encode("ascii"))
        status = 0  # until the answer starts
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), id_header]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            status = status or 499  # cancelled before answering: the client went away
            raise
        finally:
            status = status or 500
            seconds = time.perf_counter() - started
            error_type = _error_type(scope, status) if status >= 400 else None
            if self._on_request is not None:
                self._on_request(self._endpoint(scope), status, seconds)
            if error_type is not None and self._on_error is not None:
                self._on_error(status, error_type)
            if self._log and ACCESS_LOGGER.isEnabledFor(logging.INFO):
                _write(scope, rid, status, seconds, error_type, client_host(scope))

    def _endpoint(self, scope: Scope) -> str:
        route = scope.get("route")
        if route is not None:
            return str(getattr(route, "path", "other"))
        path: str = scope["path"]
        return path if path in self._static_paths else "other"


def _write(
    scope: Scope, rid: str, status: int, seconds: float, error_type: str | None, client: str
) -> None:
    method: str = scope["method"]
    path = _printable(scope["path"])
    duration_ms = round(seconds * 1000, 3)
    fields: dict[str, Any] = {
        "method": method,
        "path": path,
        "status": status,
        "duration_ms": duration_ms,
    }
    model = scope.get(MODEL_KEY)
    if model is not None:
        fields["model"] = _printable(str(model))
        fields["texts"] = scope.get(TEXTS_KEY)
    if error_type is not None:
        fields["error_type"] = error_type
    fields["request_id"] = rid
    fields["client"] = _printable(client)  # a trusted proxy's X-Forwarded-For may hold any text
    # `Logger.info` would also walk the stack for the caller's file and line, which no
    # formatter here shows; the record is otherwise the one `info` makes.
    record = ACCESS_LOGGER.makeRecord(
        ACCESS_LOGGER.name,
        logging.INFO,
        _NO_FILE,
        0,
        "%s %s %d %.3fms",
        (method, path, status, duration_ms),
        None,
        _NO_FUNCTION,
        fields,
    )
    ACCESS_LOGGER.handle(record)


def _printable(value: str) -> str:
    """`value` cut to a bounded length, with control characters escaped (no forged lines)."""
    if len(value) > _MAX_LOGGED_CHARS:
        value = value[:_MAX_LOGGED_CHARS] + "..."
    return value if value.isprintable() else value.encode("unicode_escape").decode("ascii")


def _error_type(scope: Scope, status: int) -> str:
    """The error answer's ``error_type``, as its response recorded it in the scope."""
    kind: str | None = scope.get(ERROR_TYPE_KEY)
    if kind is not None:
        return kind
    return "client_disconnected" if status == 499 else "unknown"
