"""ASGI middleware that caps request bodies while they stream in (413, never buffered)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedserve.errors import BodyTooLarge


class BodySizeLimit:
    """Refuse bodies over `max_bytes`: at once from Content-Length, else while reading.

    The check while reading raises `BodyTooLarge` inside the handler's ``await body()``, so
    the app's error handler renders the 413 and at most `max_bytes` plus one chunk is held.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            receive = _refusing_receive(self._error())
        else:
            receive = self._counting(receive)
        await self.app(scope, receive, send)

    def _error(self) -> BodyTooLarge:
        return BodyTooLarge(f"request body is larger than the limit of {self.max_bytes} bytes")

    def _counting(self, receive: Receive) -> Receive:
        seen = 0

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise self._error()
            return message

        return counting_receive


def _refusing_receive(error: BodyTooLarge) -> Receive:
    async def refusing_receive() -> Message:
        raise error

    return refusing_receive


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
