"""ASGI middleware that bounds request bodies while they stream in: size (413) and time (408)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedserve.errors import BodyTimeout, BodyTooLarge

# The client may still be sending when it is refused; closing the connection stops the
# upload instead of reading the rest of it into the void.
_CLOSE = {"Connection": "close"}


class BodySizeLimit:
    """Refuse bodies over `max_bytes` (413), or not complete `timeout_s` after the headers
    (408). No body is ever held beyond `max_bytes` plus one chunk.

    Both errors are raised inside the handler's ``await body()``, so the app's error handler
    renders them. Time is one deadline for the whole body (a client sending a byte a second
    gains nothing), counted from when the app got the request; a late body is answered 408
    with ``Connection: close``.

    A body over the limit is read on and thrown away, up to `max_bytes` more, before the 413
    goes out: a server that closes a connection with unread input makes the kernel reset it,
    and a client still sending would lose the answer. A body that ends within that bound
    gets its 413 on a connection that stays usable; a longer one (or one not sent within
    the deadline) gets it with ``Connection: close``, and reading stops. A Content-Length
    past that bound, or one announced with ``Expect: 100-continue`` (its body is not sent
    until asked for), is refused at once, unread.

    Once the body is complete, `receive` passes through unchanged (handlers wait on it for
    the client's disconnect).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.app(scope, self._guarded(scope, receive), send)

    def _guarded(self, scope: Scope, receive: Receive) -> Receive:
        length, expect = _first_values(scope["headers"], b"content-length", b"expect")
        declared = _content_length(length)
        waits_for_continue = expect.strip().lower() == b"100-continue"
        loop = asyncio.get_running_loop()
        deadline = None if self.timeout_s is None else loop.time() + self.timeout_s
        seen = 0
        complete = False

        async def guarded_receive() -> Message:
            nonlocal seen, complete
            if complete:
                return await receive()
            if declared is not None and declared > self.max_bytes:
                if waits_for_continue or declared > 2 * self.max_bytes:
                    raise self._too_large(ended=False)
                raise await self._drained(receive, deadline, seen=0)
            message = await self._receive_by(receive, deadline)
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                complete = not message.get("more_body", False)
                if seen > self.max_bytes:
                    if complete:
                        raise self._too_large(ended=True)
                    raise await self._drained(receive, deadline, seen=seen)
            return message

        return guarded_receive

    async def _receive_by(self, receive: Receive, deadline: float | None) -> Message:
        """`receive()`, or BodyTimeout once `deadline` (loop time) passes.

        What ``asyncio.timeout_at`` does, with one timer handle and no context object: it
        runs for every request, and that object was a measurable share of its cost.
        """
        if deadline is None:
            return await receive()
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        timer = asyncio.get_running_loop().call_at(deadline, expire)
        try:
            return await receive()
        except asyncio.CancelledError:
            if expired and task.uncancel() <= cancelling:
                raise self._too_slow() from None
            raise
        finally:
            timer.cancel()

    async def _drained(
        self, receive: Receive, deadline: float | None, *, seen: int
    ) -> BodyTooLarge:
        """Read the rest of a body that is over the limit and discard it (see the class
        docstring); the error to answer with."""
        while seen <= 2 * self.max_bytes:
            try:
                message = await self._receive_by(receive, deadline)
            except BodyTimeout:
                break
            if message["type"] != "http.request":  # the client left
                break
            seen += len(message.get("body", b""))
            if not message.get("more_body", False):
                return self._too_large(ended=True)
        return self._too_large(ended=False)

    def _too_large(self, *, ended: bool) -> BodyTooLarge:
        error = BodyTooLarge(f"request body is larger than the limit of {self.max_bytes} bytes")
        if not ended:
            error.headers.update(_CLOSE)
        return error

    def _too_slow(self) -> BodyTimeout:
        error = BodyTimeout(
            f"request body did not arrive within {self.timeout_s:g}s (BODY_TIMEOUT_S)"
        )
        error.headers.update(_CLOSE)
        return error


def _first_values(headers: Iterable[tuple[bytes, bytes]], *names: bytes) -> list[bytes]:
    """The first value of each header in `names` (lower case), b"" when absent: what
    `Headers.get` finds, without building a `Headers` for every request."""
    found = [b""] * len(names)
    missing = set(names)
    for name, value in headers:
        if name in missing:
            missing.discard(name)
            found[names.index(name)] = value
            if not missing:
                break
    return found


def _content_length(raw: bytes) -> int | None:
    value = raw.strip()
    if not (value.isascii() and value.isdigit()):
        return None  # absent; anything else the HTTP server refuses before it gets here
    # Not int() on any length: past 4300 digits Python refuses the conversion, and 19
    # digits are past every limit already.
    return int(value) if len(value) < 19 else sys.maxsize
