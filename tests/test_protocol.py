"""The request-head deadline (embedserve/http/uvicorn_protocol.py) on a real uvicorn over
loopback, with a tiny app and a short deadline, so it runs without the model."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import orjson
import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from devkit.launcher import free_port
from embedserve.http.uvicorn_protocol import protocol_class

pytestmark = pytest.mark.anyio

DEADLINE_S = 0.3


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    assert scope["type"] == "http"
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


@contextlib.asynccontextmanager
async def server() -> AsyncIterator[int]:
    port = free_port()
    config = uvicorn.Config(
        hello,
        host="127.0.0.1",
        port=port,
        http=protocol_class(DEADLINE_S),
        lifespan="off",
        log_config=None,
        access_log=False,
    )
    running = uvicorn.Server(config)
    task = asyncio.create_task(running.serve())
    try:
        for _ in range(200):
            if running.started:
                break
            await asyncio.sleep(0.01)
        assert running.started
        yield port
    finally:
        running.should_exit = True
        await asyncio.wait_for(task, 10)


async def exchange(port: int, sent: bytes) -> tuple[bytes, float]:
    """Send `sent`, then read until the server closes; (what came back, seconds taken)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    try:
        writer.write(sent)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return answer, time.monotonic() - started


def error_of(answer: bytes, status: int = 408) -> dict[str, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), answer
    assert b"connection: close" in head.lower()
    error: dict[str, str] = orjson.loads(body)
    return error


@pytest.mark.parametrize("sent", [b"", b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: 1"])
async def test_a_head_not_complete_in_time_gets_408_and_a_close(sent: bytes) -> None:
    async with server() as port:
        answer, took = await exchange(port, sent)
    assert error_of(answer) == {
        "error": f"request headers not received within {DEADLINE_S:g}s",
        "error_type": "header_timeout",
    }
    assert took >= DEADLINE_S - 0.05


async def test_complete_heads_are_served_and_each_request_gets_its_own_deadline() -> None:
    async with server() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(2):  # the connection outlives one deadline: requests are served
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                await writer.drain()
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 200 ")
                assert await asyncio.wait_for(reader.readexactly(2), 5) == b"ok"
                await asyncio.sleep(DEADLINE_S * 1.5)  # idle between requests is keep-alive's
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # a third request stalls
            await writer.drain()
            rest = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    assert error_of(rest)["error_type"] == "header_timeout"


async def test_a_head_in_pieces_is_served_and_its_deadline_runs_from_its_first_byte() -> None:
    async with server() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for piece in (b"GET / HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n"):  # one request
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(DEADLINE_S / 4)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert await asyncio.wait_for(reader.readexactly(2), 5) == b"ok"
            # The next head stalls after two reads: its deadline is not moved by the second.
            writer.write(b"GET / HTTP/1.1\r\n")
            await writer.drain()
            started = time.monotonic()
            await asyncio.sleep(DEADLINE_S * 0.8)
            writer.write(b"Host: x\r\n")
            await writer.drain()
            rest = await asyncio.wait_for(reader.read(), 10)
            took = time.monotonic() - started
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    assert error_of(rest)["error_type"] == "header_timeout"
    assert DEADLINE_S - 0.05 <= took < DEADLINE_S * 1.6  # counted from the second read: 1.8


@pytest.mark.parametrize(
    "sent",
    [
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: " + b"9" * 30 + b"\r\n\r\n",
        b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"NOT HTTP AT ALL\r\n\r\n",
    ],
)
async def test_a_request_the_parser_rejects_gets_400_in_the_error_shape(sent: bytes) -> None:
    async with server() as port:
        answer, _ = await exchange(port, sent)
    assert error_of(answer, 400) == {
        "error": "malformed HTTP request: its request line or headers could not be parsed",
        "error_type": "bad_request",
    }
