"""uvicorn's HTTP protocol with a deadline for each request head, and its own errors in
the server's error shape.

uvicorn times out idle keep-alive connections but not a request head that never finishes:
a client that connects and sends its headers a byte at a time, or nothing at all, holds a
socket (a file descriptor) for as long as it likes. This subclass of uvicorn's httptools
protocol (what ``uvicorn[standard]`` runs) gives every head `HEADER_TIMEOUT_S`, counted from
the connection (first request) or from the first byte of the next request (keep-alive),
and answers a late one 408 ``header_timeout``, then closes the connection. A request the
HTTP parser rejects (a malformed head, a negative or 30-digit Content-Length) is answered
400 ``bad_request`` in the same ``{"error", "error_type"}`` shape instead of uvicorn's
plain text. The body's own deadline is `BODY_TIMEOUT_S` (embedserve/http/middleware/body_limit.py).

It relies on hooks of uvicorn's httptools protocol (``connection_made``, ``data_received``,
``on_message_begin``, ``on_headers_complete``, ``send_400_response``); tests/test_protocol.py
checks each, so an upgrade of uvicorn that changes them fails there.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def protocol_class(header_timeout_s: float) -> type[asyncio.Protocol]:
    """The HTTP protocol for uvicorn's ``http=`` option: httptools' with a head deadline."""
    return type(
        "HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout_s": header_timeout_s}
    )


class HeaderTimeoutProtocol(HttpToolsProtocol):
    """httptools' protocol; a request head not complete in time gets 408 + close.

    The deadline timer belongs to the connection: armed at connect, and for each later
    request once a read ends with its head begun but not complete (at the deadline counted
    from its first byte); cancelled when the head is complete or the connection is lost.
    A head that arrives whole in one read, as a keep-alive client's usually does, costs no
    timer at all (arming and cancelling one was ~5 us of the event loop per request).
    """

    header_timeout_s: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started: float | None = None  # loop time of a head's first byte, if open

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.loop.time())

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if (
            self._head_started is not None
            and self._head_timer is None
            and not self.transport.is_closing()
        ):
            self._arm(self._head_started)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._head_timer is None:  # the first request's deadline runs from the connect
            self._head_started = self.loop.time()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self, started: float) -> None:
        self._head_timer = self.loop.call_at(started + self.header_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        self._head_started = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            message = f"request headers not received within {self.header_timeout_s:g}s"
            self._send_error(b"408 Request Timeout", message, "header_timeout")

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request its parser rejects, in the server's error shape."""
        message = "malformed HTTP request: its request line or headers could not be parsed"
        self._send_error(b"400 Bad Request", message, "bad_request")

    def _send_error(self, status: bytes, message: str, error_type: str) -> None:
        body = orjson.dumps({"error": message, "error_type": error_type})
        self.transport.write(
            b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + body
        )
        self.transport.close()
