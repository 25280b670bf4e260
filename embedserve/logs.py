"""Logging: text or JSON lines on stderr, and `AccessLog`, one line per HTTP request (ASGI).

Nothing here logs request headers, query strings or bodies, so an ``Authorization`` header,
an API key in a URL or a text sent for embedding never reaches a log.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedserve.http.middleware.client_addr import client_host
from embedserve.http.middleware.request_id import HEADER, SCOPE_KEY, request_id

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ACCESS_LOGGER = logging.getLogger("embedserve.access")

# Handlers that know which model a request used put it in the scope under these keys.
MODEL_KEY = "embedserve.model"
TEXTS_KEY = "embedserve.texts"
# When the request reached the app (time.monotonic()), so draining can tell old from new.
ARRIVED_AT = "embedserve.arrived_at"

# ``(endpoint, status, seconds, error_type)``, called once per answered request.
RequestHook = Callable[[str, int, float, str | None], None]

# A LogRecord's own attributes; any other attribute came from ``extra=`` and is a field
# (except uvicorn's ``color_message``, the message again with terminal colour codes).
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}
# Access-log fields the text format already shows in the message.
_IN_MESSAGE = frozenset({"method", "path", "status", "duration_ms"})
_ERROR_TYPE = re.compile(r"[a-z_]{1,64}")
_MAX_ERROR_BODY = 16 * 1024  # error bodies are small; a larger one is not parsed
_MAX_LOGGED_CHARS = 200
# What `logging` records as the caller when it does not look for one.
_NO_FILE = "(unknown file)"
_NO_FUNCTION = "(unknown function)"


def configure_logging(
    level: str,
    log_format: LogFormat = "text",
    stream: TextIO | None = None,
    *,
    background: bool = False,
) -> None:
    """Send every log record (uvicorn's too) to `stream` (stderr) as text or JSON lines.

    With `background`, records are formatted and written by a thread of their own, in
    batches (`_BackgroundWriter`), so a busy event loop only queues them; call
    `stop_background_logging` before the process exits. Records carry no thread or process
    ids and names: neither format shows them, and collecting them was a third of the time a
    record (one per request) takes to make.
    """
    global _writer
    stop_background_logging()
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter(TEXT_FORMAT))
    root_handler: logging.Handler = handler
    if background:
        _writer = root_handler = _BackgroundWriter(handler)
        atexit.register(stop_background_logging)
    logging.basicConfig(level=level, handlers=[root_handler], force=True)


def stop_background_logging() -> None:
    """Write out every queued record and stop the writer thread (idempotent)."""
    global _writer
    writer, _writer = _writer, None
    if writer is not None:
        writer.stop()
        # Anything logged from now on goes straight to the stream.
        logging.basicConfig(level=logging.root.level, handlers=[writer.target], force=True)


# How often the background writer wakes to write what was logged since, in seconds.
WRITE_INTERVAL_S = 0.1


class _BackgroundWriter(logging.Handler):
    """The root handler under `background`: records wait in a deque, and a thread of its own
    wakes every `WRITE_INTERVAL_S` to format all that arrived and write them with one call.

    `emit` only appends: no lock hand-off and no wake-up per record. logging's
    `QueueListener` woke its thread, which then took the GIL from the event loop, for every
    record (one per request), and wrote each line with a system call of its own; batched,
    that thread uses half the CPU (0.02 ms per request at ~1,000 requests/s, from 0.04). A
    line is written within `WRITE_INTERVAL_S` of being logged; `stop` writes everything still
    waiting. Owns the thread; `target` formats and writes, from that thread only until
    `stop` returns.
    """

    def __init__(self, target: logging.StreamHandler[TextIO]) -> None:
        super().__init__()
        self.target = target
        self._records: collections.deque[logging.LogRecord] = collections.deque()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        self._records.append(record)

    def stop(self) -> None:
        """Write everything logged so far and end the thread (idempotent)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        self._write()  # anything logged while the thread was finishing

    def close(self) -> None:
        self.stop()
        super().close()

    def _run(self) -> None:
        while not self._stopping.wait(WRITE_INTERVAL_S):
            self._write()
        self._write()

    def _write(self) -> None:
        lines = []
        while self._records:
            record = self._records.popleft()
            try:
                lines.append(self.target.format(record) + self.target.terminator)
            except Exception:
                self.target.handleError(record)
        if lines:
            try:
                self.target.stream.write("".join(lines))
                self.target.flush()
            except Exception:
                self.target.handleError(record)


_writer: _BackgroundWriter | None = None


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _RESERVED}


class TextFormatter(logging.Formatter):
    """``time LEVEL logger: message key=value ...`` (the fields given with ``extra=``)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = [f"{k}={v}" for k, v in _fields(record).items() if k not in _IN_MESSAGE]
        return f"{line} {' '.join(fields)}" if fields else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, logger, message, then the ``extra=``
    fields, and ``exception`` with the traceback when there is one.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(entry, default=str).decode()


class AccessLog:
    """The outermost ASGI layer: arrival stamps, request ids, the access log line and
    request metrics.

    Each HTTP request is stamped with its arrival time (``time.monotonic()``, in the scope
    under `ARRIVED_AT`), so that draining can tell old requests from new, and gets an id
    (`request_id.request_id`), stored in the scope under `request_id.SCOPE_KEY` and sent back
    as ``X-Request-ID`` on every answer, errors and middleware refusals included. Once the
    answer is sent (or the request failed), it calls `on_request` and writes one INFO line
    to ``embedserve.access``: method, path, status, duration_ms, model and texts (when the
    handler set them), error_type, request_id and client (`client_addr.client_host`: behind
    a trusted proxy, the client it forwarded for). The error type is read from the error
    body, which every error has.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        log: bool = True,
        on_request: RequestHook | None = None,
        static_paths: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self._log = log
        self._on_request = on_request
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
        error_body: bytes | None = None
        started = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status, error_body
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), id_header]
                if status >= 400:
                    error_body = b""
            elif (
                error_body is not None
                and message["type"] == "http.response.body"
                and len(error_body) <= _MAX_ERROR_BODY
            ):
                error_body += message.get("body", b"")
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            status = status or 499  # cancelled before answering: the client went away
            raise
        finally:
            status = status or 500
            seconds = time.perf_counter() - started
            error_type = _error_type(status, error_body) if status >= 400 else None
            if self._on_request is not None:
                self._on_request(self._endpoint(scope), status, seconds, error_type)
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


def _error_type(status: int, body: bytes | None) -> str:
    """The ``error_type`` of an error body (ours, or OpenAI's ``error.code`` on /v1)."""
    if body and len(body) <= _MAX_ERROR_BODY:
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            kind = parsed.get("error_type")
            nested = parsed.get("error")
            if kind is None and isinstance(nested, dict):
                kind = nested.get("code")
            if isinstance(kind, str) and _ERROR_TYPE.fullmatch(kind):
                return kind
    return "client_disconnected" if status == 499 else "unknown"
