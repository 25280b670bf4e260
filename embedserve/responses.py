"""orjson responses and the one error shape: ``{"error": message, "error_type": type}``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson
from starlette.responses import JSONResponse as _StarletteJSON


class JSONResponse(_StarletteJSON):
    """JSON via orjson; numpy arrays are written directly (float32 stays float32)."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def error_response(
    status_code: int,
    message: str,
    error_type: str,
    headers: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> JSONResponse:
    """The error body every endpoint uses."""
    body: dict[str, Any] = {"error": message, "error_type": error_type}
    if extra:
        body.update(extra)
    return JSONResponse(body, status_code=status_code, headers=dict(headers or {}))
