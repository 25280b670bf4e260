"""Logging: the access line per request, JSON and text lines, request ids, and no secrets."""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
from starlette.types import Message

from embedserve.logs import (
    TEXT_FORMAT,
    WRITE_INTERVAL_S,
    JsonFormatter,
    TextFormatter,
    configure_logging,
    stop_background_logging,
)
from tests.conftest import Api, Serve

pytestmark = pytest.mark.anyio

GENERATED = re.compile(r"[0-9a-f]{32}")
CLIENT_LOGGERS = ("httpx", "httpcore")  # the test's own client, which logs its URLs
ACCESS_FIELDS = {"method", "path", "status", "duration_ms", "request_id", "client"}


# -- helpers -------------------------------------------------------------------------
@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every record of every logger, DEBUG and up."""
    caplog.set_level(logging.DEBUG)
    yield caplog


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The access log records, each formatted as a JSON line and parsed back."""
    formatter = JsonFormatter()
    lines = [formatter.format(r) for r in caplog.records if r.name == "embedserve.access"]
    for line in lines:
        assert "\n" not in line
    return [json.loads(line) for line in lines]


def all_lines(caplog: pytest.LogCaptureFixture) -> str:
    """Every record the server side logged, as both formats would write it."""
    text, as_json = TextFormatter(TEXT_FORMAT), JsonFormatter()
    server = [r for r in caplog.records if not r.name.startswith(CLIENT_LOGGERS)]
    return "\n".join(f.format(r) for r in server for f in (text, as_json))


async def raw_request(
    api: Api, path: str, headers: list[tuple[bytes, bytes]], body: bytes = b""
) -> tuple[int, list[tuple[bytes, bytes]]]:
    """Send exactly these headers (httpx refuses CR/LF in a header); status and headers."""
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
        "method": "POST" if body else "GET", "scheme": "http", "path": path,
        "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"host", b"test"), *headers], "server": ("test", 80),
        "client": ("127.0.0.1", 1234),
    }  # fmt: skip
    await api.app(scope, receive, send)
    return sent[0]["status"], list(sent[0]["headers"])


# -- the access line -------------------------------------------------------------------
async def test_one_json_access_line_per_request_with_its_fields(
    api: Api, logs: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(10):
        started = time.perf_counter()
        one = await api.client.post("/embed", json={"text": "hello"})
        wall_ms = (time.perf_counter() - started) * 1000
        many = await api.client.post("/embed/batch", json={"texts": ["a", "b", "c"]})
    assert one.status_code == many.status_code == 200
    first, second = access_lines(logs)
    assert set(first) >= ACCESS_FIELDS | {"time", "level", "logger", "message", "model", "texts"}
    assert (first["level"], first["logger"]) == ("INFO", "embedserve.access")
    assert (first["method"], first["path"], first["status"]) == ("POST", "/embed", 200)
    assert first["message"].startswith("POST /embed 200 ")
    # The line's duration holds the handler's and is held by the client's (1 us rounding).
    handler_ms = one.json()["processing_time_ms"]
    assert handler_ms - 0.001 <= first["duration_ms"] <= wall_ms, (handler_ms, wall_ms)
    assert (first["model"], first["texts"]) == ("fake/a", 1)
    assert first["request_id"] == one.headers["x-request-id"]
    assert first["client"] == "127.0.0.1"
    assert "error_type" not in first
    assert (second["path"], second["texts"]) == ("/embed/batch", 3)
    assert second["request_id"] == many.headers["x-request-id"] != first["request_id"]


async def test_error_lines_name_the_error_type(api: Api, logs: pytest.LogCaptureFixture) -> None:
    with anyio.fail_after(10):
        invalid = await api.client.post("/embed", json={"text": ""})
        unknown = await api.client.post("/embed", json={"model_name": "nope/x", "text": "x"})
        missing = await api.client.get("/nope")
    assert (invalid.status_code, unknown.status_code, missing.status_code) == (422, 404, 404)
    lines = access_lines(logs)
    assert [(line["status"], line.get("error_type")) for line in lines] == [
        (422, "validation_error"),
        (404, "model_not_found"),
        (404, "not_found"),
    ]
    assert "model" not in lines[0]  # refused before a model was chosen
    assert lines[1]["model"] == "nope/x"


async def test_text_lines_carry_the_fields_after_the_message(
    api: Api, logs: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(10):
        response = await api.client.post("/embed", json={"text": "hello"})
    [record] = [r for r in logs.records if r.name == "embedserve.access"]
    line = TextFormatter(TEXT_FORMAT).format(record)
    assert " INFO embedserve.access: POST /embed 200 " in line
    assert f"request_id={response.headers['x-request-id']}" in line
    assert "model=fake/a texts=1" in line
    assert "method=" not in line  # already in the message


async def test_access_log_can_be_turned_off(serve: Serve, logs: pytest.LogCaptureFixture) -> None:
    with anyio.fail_after(10):
        async with serve(access_log=False) as api:
            response = await api.client.post("/embed", json={"text": "hello"})
    assert response.status_code == 200
    assert GENERATED.fullmatch(response.headers["x-request-id"])
    assert access_lines(logs) == []


async def test_control_characters_in_the_path_cannot_forge_a_line(
    api: Api, logs: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(10):
        status, _ = await raw_request(api, "/x\r\n2024-01-01 INFO forged", [])
    assert status == 404
    [line] = access_lines(logs)
    assert "\n" not in line["path"]
    assert "\r" not in line["path"]
    text = TextFormatter(TEXT_FORMAT).format(logs.records[-1])
    assert "\n" not in text


# -- X-Request-ID ----------------------------------------------------------------------
async def test_a_safe_client_request_id_is_echoed_and_logged(
    api: Api, logs: pytest.LogCaptureFixture
) -> None:
    with anyio.fail_after(10):
        response = await api.client.get("/health", headers={"X-Request-ID": "trace-42.a:b_c"})
    assert response.headers["x-request-id"] == "trace-42.a:b_c"
    assert access_lines(logs)[0]["request_id"] == "trace-42.a:b_c"


@pytest.mark.parametrize("given", ["x" * 129, "has space", 'a"b', "a,b"])
async def test_an_unsafe_client_request_id_is_replaced(api: Api, given: str) -> None:
    with anyio.fail_after(10):
        response = await api.client.get("/health", headers={"X-Request-ID": given})
    assert GENERATED.fullmatch(response.headers["x-request-id"])


async def test_a_header_injection_attempt_is_never_echoed(
    api: Api, logs: pytest.LogCaptureFixture
) -> None:
    hostile = b"abc\r\nSet-Cookie: x"
    with anyio.fail_after(10):
        status, headers = await raw_request(api, "/health", [(b"x-request-id", hostile)])
    assert status == 200
    ids = [value for name, value in headers if name == b"x-request-id"]
    assert len(ids) == 1
    assert GENERATED.fullmatch(ids[0].decode())
    assert all(name != b"set-cookie" for name, _ in headers)
    assert all(b"Set-Cookie" not in value for _, value in headers)
    assert "Set-Cookie" not in all_lines(logs)


async def test_every_answer_carries_a_request_id(serve: Serve) -> None:
    def broken(texts: object) -> list[int]:
        raise RuntimeError("boom")

    with anyio.fail_after(10):
        async with serve(
            enable_rate_limit=True, rate_limit_per_minute=4, max_request_bytes=2048
        ) as api:
            answers = [
                await api.client.get("/nope"),
                await api.client.delete("/health"),
                await api.client.post("/embed", json={"text": "x" * 4096}),
                await api.client.post("/embed", json={}),
            ]
            api.loader.backends["fake/a"].tokenize = broken  # type: ignore[method-assign]
            transport = httpx.ASGITransport(app=api.app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                answers.append(await client.post("/embed", json={"text": "x"}))
                answers.append(await client.post("/embed", json={"text": "rate limited"}))
                answers.append(await client.get("/metrics"))  # exempt from the rate limit
    statuses = [a.status_code for a in answers]
    assert statuses == [404, 405, 413, 422, 500, 429, 200]
    for answer in answers:
        assert GENERATED.fullmatch(answer.headers["x-request-id"]), answer.status_code


async def test_an_unhandled_error_is_logged_and_counted_as_500(
    api: Api, logs: pytest.LogCaptureFixture
) -> None:
    def broken(texts: object) -> list[int]:
        raise RuntimeError("boom")

    api.loader.backends["fake/a"].tokenize = broken  # type: ignore[method-assign]
    transport = httpx.ASGITransport(app=api.app, raise_app_exceptions=False)
    with anyio.fail_after(10):
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/embed", json={"text": "x"})
    assert response.status_code == 500
    [line] = access_lines(logs)
    assert (line["status"], line["error_type"]) == (500, "internal_error")
    assert line["request_id"] == response.headers["x-request-id"]
    registry = api.app.state.prometheus.registry
    labels = {"status": "500", "error_type": "internal_error"}
    assert registry.get_sample_value("embedserve_request_errors_total", labels) == 1


# -- secrets ---------------------------------------------------------------------------
@pytest.mark.parametrize("api_keys", [[], ["sk-test-aaaaaaaaaaaaaaaaaaaa"]], ids=["open", "keyed"])
async def test_no_authorization_value_or_body_is_ever_logged(
    serve: Serve, logs: pytest.LogCaptureFixture, api_keys: list[str]
) -> None:
    secret = "secret-key-123"
    headers = {"Authorization": f"Bearer {secret}", "X-Api-Key": secret}
    with anyio.fail_after(10):
        async with serve(api_keys=api_keys) as api:
            await api.client.post(
                "/embed?api_key=" + secret, json={"text": "private body text"}, headers=headers
            )
            await api.client.post("/embed", json={"text": ""}, headers=headers)
            await api.client.get("/metrics", headers=headers)
    assert len(access_lines(logs)) == 3
    captured = all_lines(logs)
    assert secret not in captured
    assert "private body text" not in captured


# -- configure_logging -----------------------------------------------------------------
@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers[:]:
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


@pytest.mark.usefixtures("restore_root")
def test_json_format_writes_one_object_per_line() -> None:
    stream = io.StringIO()
    configure_logging("INFO", "json", stream=stream)
    log = logging.getLogger("embedserve.test")
    log.info("hello %s", "there", extra={"model": "fake/a", "texts": 2})
    log.debug("not shown at INFO")
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        log.exception("it failed")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "hello there"
    assert (first["level"], first["logger"]) == ("INFO", "embedserve.test")
    assert (first["model"], first["texts"]) == ("fake/a", 2)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", first["time"])
    assert second["level"] == "ERROR"
    assert "ValueError: bad\nthing" in second["exception"]


@pytest.mark.usefixtures("restore_root")
def test_text_format_is_one_line_with_fields() -> None:
    stream = io.StringIO()
    configure_logging("INFO", "text", stream=stream)
    logging.getLogger("uvicorn.error").info(
        "Started server process", extra={"color_message": "Started \x1b[36mserver\x1b[0m"}
    )
    logging.getLogger("embedserve.test").warning("slow", extra={"model": "fake/a"})
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith(" INFO uvicorn.error: Started server process")
    assert lines[1].endswith(" WARNING embedserve.test: slow model=fake/a")


def test_background_logging_writes_everything_by_the_time_it_stops() -> None:
    stream = io.StringIO()
    saved_handlers, saved_level = logging.root.handlers[:], logging.root.level
    configure_logging("INFO", "json", stream, background=True)
    try:
        for index in range(50):
            logging.getLogger("embedserve.test").info("line %d", index, extra={"n": index})
    finally:
        stop_background_logging()
        logging.getLogger("embedserve.test").info("after the stop")
        logging.root.handlers[:] = saved_handlers
        logging.root.setLevel(saved_level)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["n"] for line in lines[:50]] == list(range(50))
    assert lines[-1]["message"] == "after the stop"


def test_background_lines_are_written_in_batches_without_a_stop() -> None:
    stream = io.StringIO()
    saved_handlers, saved_level = logging.root.handlers[:], logging.root.level
    configure_logging("INFO", "text", stream, background=True)
    try:
        for index in range(3):
            logging.getLogger("embedserve.test").info("line %d", index)
        deadline = time.monotonic() + 10
        while stream.getvalue().count("\n") < 3 and time.monotonic() < deadline:
            time.sleep(WRITE_INTERVAL_S / 5)
        lines = stream.getvalue().splitlines()
    finally:
        stop_background_logging()
        logging.root.handlers[:] = saved_handlers
        logging.root.setLevel(saved_level)
    assert [line.rsplit(": ", 1)[1] for line in lines] == ["line 0", "line 1", "line 2"]
