"""orjson responses and the error shapes: ``{"error", "error_type"}``, or OpenAI's on ``/v1``.

Every error leaves the server through `error_response`; middleware that answers on its own
(auth, rate limits, body size) passes the request path so ``/v1/*`` clients get OpenAI's
``{"error": {"message", "type", "param", "code"}}``, which their client libraries surface.
Sending the `ErrorResponse` it returns records the error type in the scope, so the access
log logs and counts each error once, whichever layer answered.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from starlette.responses import JSONResponse as _StarletteJSON
from starlette.types import Receive, Scope, Send

from embedserve.http.middleware.access_log import ERROR_TYPE_KEY

OPENAI_PREFIX = "/v1/"


class JSONResponse(_StarletteJSON):
    """JSON via orjson; numpy arrays are written directly (float32 stays float32)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


class ErrorResponse(JSONResponse):
    """An error answer that, when sent, puts its `error_type` in the scope under
    `logs.ERROR_TYPE_KEY` (the access log reads it from there)."""

    def __init__(
        self, content: Any, status_code: int, headers: Mapping[str, str], error_type: str
    ) -> None:
        super().__init__(content, status_code=status_code, headers=dict(headers))
        self.error_type = error_type

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[ERROR_TYPE_KEY] = self.error_type
        await super().__call__(scope, receive, send)


def error_response(
    status_code: int,
    message: str,
    error_type: str,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
    *,
    path: str = "",
    param: str | None = None,
) -> ErrorResponse:
    """The error body for a request to `path` (OpenAI's shape under ``/v1/``)."""
    body: dict[str, Any]
    if path.startswith(OPENAI_PREFIX):
        body = {
            "error": {
                "message": message,
                "type": _openai_type(status_code),
                "param": param,
                "code": error_type,
            }
        }
    else:
        body = {"error": message, "error_type": error_type}
        if extra:
            body.update(extra)
    return ErrorResponse(body, status_code, headers or {}, error_type)


def _openai_type(status_code: int) -> str:
    """OpenAI's coarse error type for a status code."""
    if status_code == 401:
        return "authentication_error"
    if status_code == 403:
        return "permission_error"
    if status_code == 404:
        return "not_found_error"
    if status_code == 429:
        return "rate_limit_error"
    if status_code < 500:
        return "invalid_request_error"
    return "server_error"
