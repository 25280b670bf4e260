"""Hostile clients against the real server (uvicorn, real model, loopback): bodies over the
limit streamed without or with a lying Content-Length (413 while streaming, RSS flat),
slow bodies (408 at BODY_TIMEOUT_S), slow or missing headers (408 at HEADER_TIMEOUT_S;
nobody else waits meanwhile), and the
hostile texts and request ids of tests/test_hostile_input.py once more through real sockets.

Requests are written on raw sockets: httpx sends a whole body before it reads the answer,
and cannot send a slow, chunked-forever or lying body.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import statistics
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import pytest

from devkit.launcher import ServerProcess, running_server
from devkit.procfs import proc_status
from tests.leaks import assert_no_leak
from tests.reliability import Recorder

pytestmark = [pytest.mark.integration, pytest.mark.reliability, pytest.mark.anyio]

AREA = "Hostile input"
MIB = 1024 * 1024
MAX_REQUEST_BYTES = 10 * MIB  # the default, stated so the test does not depend on it moving
BODY_TIMEOUT_S = 2.0
HEADER_TIMEOUT_S = 3.0
CHUNK = 64 * 1024
BIG_BODY = 12 * 1000 * 1000  # "12 MB": over the 10 MiB limit
GENERATED_ID = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(scope="module")
def server(
    exported_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    env = {
        "MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES),
        "BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "ORT_THREADS": "1",
    }
    with running_server(env, log_dir=tmp_path_factory.mktemp("hostile-server")) as running:
        yield running


def rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of process `pid` in MiB: resident now, and the peak so far."""
    status = proc_status(pid)
    return status["VmRSS"] / MIB, status["VmHWM"] / MIB


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


# -- a raw HTTP/1.1 client -----------------------------------------------------------------
@dataclass
class Exchange:
    """What one raw request got: the answer (status 0: none), and how the client fared."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    sent: int = 0  # body bytes the client managed to write
    answered_after_s: float | None = None  # from the end of the headers
    closed: bool = False  # the server closed the connection after answering
    error: str = ""


def head(
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    *,
    json: bool = True,
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    if json:
        lines.append("Content-Type: application/json")
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def read_answer(reader: asyncio.StreamReader, exchange: Exchange, started: float) -> None:
    """Read one response into `exchange`, then whether the server closed the connection."""
    raw = await reader.readuntil(b"\r\n\r\n")
    exchange.answered_after_s = time.monotonic() - started
    status_line, *header_lines = raw.decode("latin-1").split("\r\n")
    exchange.status = int(status_line.split()[1])
    for line in header_lines:
        if line:
            name, _, value = line.partition(":")
            exchange.headers[name.strip().lower()] = value.strip()
    length = int(exchange.headers.get("content-length", "0"))
    exchange.body = await reader.readexactly(length)
    try:
        exchange.closed = await asyncio.wait_for(reader.read(1), 1) == b""
    except TimeoutError:
        exchange.closed = False
    except ConnectionError:  # reset: closed too
        exchange.closed = True


async def send_request(
    port: int,
    request_head: bytes,
    body: AsyncIterator[bytes] | Iterable[bytes] = (),
    *,
    answer_timeout_s: float = 30.0,
) -> Exchange:
    """Write `request_head`, then `body` part by part until the server answers; read the
    answer. Stops writing as soon as an answer arrives (as a browser does on a 413)."""
    exchange = Exchange()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request_head)
        await writer.drain()
        started = time.monotonic()
        answer = asyncio.ensure_future(read_answer(reader, exchange, started))
        try:
            parts = body if isinstance(body, AsyncIterator) else _aiter(body)
            async for part in parts:
                if answer.done():
                    break
                writer.write(part)
                await writer.drain()
                exchange.sent += len(part)
        except ConnectionError as exc:  # the server closed while we wrote: read its answer
            exchange.error = type(exc).__name__
        try:
            await asyncio.wait_for(answer, answer_timeout_s)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            exchange.error = exchange.error or type(exc).__name__
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return exchange


async def _aiter(parts: Iterable[bytes]) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def streamed(total: int, *, chunked: bool) -> Iterator[bytes]:
    """A JSON text body of `total` bytes in 64 KiB parts (chunked-encoded if `chunked`)."""
    parts = [b'{"text": "'] + [b"x" * CHUNK] * (total // CHUNK)
    for part in parts:
        yield b"%x\r\n%s\r\n" % (len(part), part) if chunked else part
    if chunked:
        yield b"0\r\n\r\n"


def tally(values: Iterable[object]) -> str:
    counts: dict[str, int] = {}
    for value in values:
        counts[str(value)] = counts.get(str(value), 0) + 1
    return ", ".join(f"{key}x{n}" for key, n in sorted(counts.items()))


def check_error(exchange: Exchange, status: int, error_type: str) -> None:
    assert exchange.status == status, exchange
    assert orjson.loads(exchange.body)["error_type"] == error_type
    assert_no_leak(exchange.body)


# -- big bodies ----------------------------------------------------------------------------
async def test_big_bodies_are_413_while_streaming_and_rss_stays_flat(
    server: ServerProcess, reliability: Recorder
) -> None:
    port = server.port
    chunked = head("POST", "/embed", [("Transfer-Encoding", "chunked")])

    async def big_chunked() -> Exchange:
        return await send_request(port, chunked, list(streamed(BIG_BODY, chunked=True)))

    # Warm-up: the first rounds of large bodies size the allocator's heap (up to about one
    # body per concurrent request, kept for reuse); growth after them is what counts.
    at_start, _ = rss_mib(server.pid)
    for _ in range(2):
        await asyncio.gather(*(big_chunked() for _ in range(4)))
    before, warm_peak = rss_mib(server.pid)

    # 20 bodies of 12 MB, chunked (no Content-Length), 4 at a time; RSS after each round.
    refused: list[Exchange] = []
    rounds: list[float] = []
    started = time.monotonic()
    for _ in range(5):
        refused += await asyncio.gather(*(big_chunked() for _ in range(4)))
        rounds.append(rss_mib(server.pid)[0])
    streaming_s = time.monotonic() - started
    # One that would go on for 200 MB: the 413 must stop it long before.
    endless = await send_request(port, chunked, streamed(200 * 1000 * 1000, chunked=True))

    # Declared lengths: over the limit (honest, or absurd), or lying small with 12 MB sent.
    payload = list(streamed(BIG_BODY, chunked=False))
    lying: dict[str, Exchange] = {}
    for label, length in (
        ("Content-Length 12 MB", str(BIG_BODY)),
        ("Content-Length 10^12", str(10**12)),
        ("Content-Length 10^30", str(10**30)),
        ("Content-Length 100, 12 MB sent", "100"),
        ("Content-Length 9 MiB, 12 MB sent", str(9 * MIB)),
    ):
        request = head("POST", "/embed", [("Content-Length", length)])
        lying[label] = await send_request(port, request, payload)
    for label, headers in (
        ("two Content-Lengths", [("Content-Length", "5"), ("Content-Length", str(BIG_BODY))]),
        ("Content-Length and chunked", [("Content-Length", "5"), ("Transfer-Encoding", "chunked")]),
        ("negative Content-Length", [("Content-Length", "-1")]),
    ):
        lying[label] = await send_request(port, head("POST", "/embed", headers), payload[:20])
    after, peak = rss_mib(server.pid)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
        healthy = await client.post("/embed", json={"text": "still serving"})

    sent_mb = [e.sent / 1e6 for e in refused]
    reliability.record(
        AREA,
        "10 MB+ bodies",
        tried=(
            f"12 MB bodies chunked without Content-Length (MAX_REQUEST_BYTES {MAX_REQUEST_BYTES}), "
            "4 at a time; one 200 MB stream; declared lengths of 12 MB, 10^12, 10^30; lying "
            "lengths (100 B, 9 MiB) with 12 MB sent; duplicate and negative lengths, length "
            "with chunked (real server, raw sockets)"
        ),
        amount=f"{len(refused) + 9 + len(lying)} requests, {streaming_s:.1f} s for the 20 bodies",
        outcome=(
            f"chunked: {tally(e.status for e in refused)}, the client had sent "
            f"{min(sent_mb):.1f}-{max(sent_mb):.1f} MB when the 413 came, connection kept "
            f"{sum(not e.closed for e in refused)}/{len(refused)}; 200 MB stream cut after "
            f"{endless.sent / 1e6:.1f} MB ({endless.status or endless.error}); declared/lying: "
            + "; ".join(f"{k} -> {v.status or v.error}" for k, v in lying.items())
            + f"; RSS {at_start:.0f} MiB at start, {before:.0f} MiB after 2 warm-up rounds "
            f"(peak {warm_peak:.0f}), "
            f"{' / '.join(f'{r:.0f}' for r in rounds)} MiB after each round of 4, "
            f"{after:.0f} MiB at the end (peak {peak:.0f} MiB)"
        ),
    )
    # Within twice the limit a body is read to its end and discarded: the client gets its
    # 413 and keeps a usable connection.
    for exchange in refused:
        check_error(exchange, 413, "request_too_large")
        assert not exchange.closed, exchange
    check_error(lying["Content-Length 12 MB"], 413, "request_too_large")
    # Past that, reading stops and the connection closes; a client still writing then sees
    # a reset rather than the 413 (uvicorn closes without lingering), but it is cut off.
    assert endless.status == 413 or endless.error == "ConnectionResetError", endless
    assert endless.sent < 50 * 1000 * 1000, endless.sent
    for label in ("Content-Length 10^12", "Content-Length 10^30"):
        exchange = lying[label]
        assert exchange.status == 413 or exchange.error == "ConnectionResetError", exchange
        assert exchange.sent < BIG_BODY, (label, exchange.sent)  # refused before the body
    for label, exchange in lying.items():
        assert exchange.status in (400, 413) or exchange.error == "ConnectionResetError", (
            label,
            exchange,
        )
        assert_no_leak(exchange.body)
    # Flat: a kept body would add 10 MiB each, 40 MiB a round, 200 MiB over the 20. The
    # allocator keeps freed memory for reuse, up to about what one round had in use at
    # once (4 bodies plus the server's copies in flight): RSS may climb back towards the
    # warm-up's peak, but a leak would take it past that peak, round after round. So:
    # never more than two bodies over the warm-up's peak, and less than 6 over the start.
    assert max(rounds) < warm_peak + 2 * MAX_REQUEST_BYTES / MIB, (warm_peak, rounds)
    assert after - at_start < 6 * MAX_REQUEST_BYTES / MIB, (at_start, after)
    assert healthy.status_code == 200


# -- slow clients --------------------------------------------------------------------------
async def slow_body(port: int, *, chunked: bool, interval_s: float = 1.0) -> Exchange:
    """Headers, then one body byte a second (a chunk of one byte, if `chunked`)."""
    framing = [("Transfer-Encoding", "chunked")] if chunked else [("Content-Length", "1000")]

    async def drip() -> AsyncIterator[bytes]:
        for byte in b'{"text": "' + b"x" * 100:
            yield b"1\r\n%c\r\n" % byte if chunked else bytes([byte])
            await asyncio.sleep(interval_s)

    return await send_request(port, head("POST", "/embed", framing), drip())


async def stalled_head(port: int, sent: bytes) -> Exchange:
    """A connection that sends `sent` (part of a request head, or nothing) and then waits
    for the server's answer; `answered_after_s` counts from the connect."""
    exchange = Exchange()
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        if sent:
            writer.write(sent)
            await writer.drain()
        await asyncio.wait_for(read_answer(reader, exchange, started), HEADER_TIMEOUT_S + 20)
    except (asyncio.IncompleteReadError, ConnectionError, TimeoutError) as exc:
        exchange.error = type(exc).__name__
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return exchange


HALF_HEAD = b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: appl"


async def test_slow_bodies_are_cut_at_the_body_timeout(
    server: ServerProcess, reliability: Recorder
) -> None:
    cut = await asyncio.gather(
        slow_body(server.port, chunked=False),
        slow_body(server.port, chunked=True),
        send_request(server.port, head("POST", "/v1/embeddings", [("Content-Length", "50")])),
    )
    reliability.record(
        AREA,
        "Slow body (slow-loris)",
        tried=(
            f"body sent at 1 byte/s with Content-Length, chunked at 1 byte/s, and a body never "
            f"sent; BODY_TIMEOUT_S={BODY_TIMEOUT_S:g} (real server)"
        ),
        amount="3 clients",
        outcome=(
            f"{tally(e.status for e in cut)}; cut off after "
            + ", ".join(f"{e.answered_after_s or 0:.2f}" for e in cut)
            + f" s, having sent {', '.join(str(e.sent) for e in cut)} B; connection closed "
            f"{sum(e.closed for e in cut)}/3"
        ),
    )
    for exchange in cut:
        assert exchange.status == 408, exchange
        assert exchange.answered_after_s is not None
        # At the deadline, not before, and not much after (a loaded 2-core machine is slow).
        assert BODY_TIMEOUT_S - 0.1 <= exchange.answered_after_s < BODY_TIMEOUT_S + 3
        assert exchange.closed
        assert_no_leak(exchange.body)
    assert orjson.loads(cut[0].body)["error_type"] == "body_timeout"
    assert orjson.loads(cut[2].body)["error"]["code"] == "body_timeout"


async def test_200_slow_connections_do_not_hold_up_other_clients(
    server: ServerProcess, reliability: Recorder
) -> None:
    """Half-sent heads and silent connections are cut at HEADER_TIMEOUT_S, slow bodies at
    BODY_TIMEOUT_S, and while they last they cost a socket each and delay nobody."""
    port = server.port
    fds_before = open_fds(server.pid)
    heads = [
        asyncio.ensure_future(stalled_head(port, HALF_HEAD if i % 2 else b"")) for i in range(100)
    ]
    bodies = [asyncio.ensure_future(slow_body(port, chunked=i % 2 == 0)) for i in range(100)]
    await asyncio.sleep(0.5)  # every slow client is connected and dripping
    fds_during = open_fds(server.pid)

    latencies: list[float] = []
    statuses: list[int] = []
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:

        async def one(i: int) -> None:
            started = time.monotonic()
            response = await client.post("/embed", json={"text": f"served meanwhile {i}"})
            latencies.append(time.monotonic() - started)
            statuses.append(response.status_code)

        for start in range(0, 50, 10):
            await asyncio.gather(*(one(i) for i in range(start, start + 10)))
    cut = await asyncio.gather(*bodies)
    cut_heads = await asyncio.gather(*heads)
    await asyncio.sleep(0.5)
    fds_after = open_fds(server.pid)

    p50 = statistics.median(latencies)
    head_times = [e.answered_after_s for e in cut_heads if e.answered_after_s is not None]
    reliability.record(
        AREA,
        "Slow headers and slow bodies are cut off and block no one",
        tried=(
            "50 connections that stop halfway through their headers, 50 that send nothing, "
            "100 bodies at 1 byte/s, then 50 ordinary /embed requests, 10 at a time; "
            f"HEADER_TIMEOUT_S={HEADER_TIMEOUT_S:g}, BODY_TIMEOUT_S={BODY_TIMEOUT_S:g} "
            "(real server)"
        ),
        amount="250 connections",
        outcome=(
            f"ordinary requests: {tally(statuses)}, p50 {p50 * 1000:.0f} ms, max "
            f"{max(latencies) * 1000:.0f} ms; slow bodies: {tally(e.status for e in cut)}; "
            f"slow heads: {tally(e.status for e in cut_heads)}, closed "
            f"{sum(e.closed for e in cut_heads)}/100, after "
            f"{min(head_times, default=0):.2f}-{max(head_times, default=0):.2f} s; "
            f"server fds {fds_before} -> {fds_during} -> {fds_after} after they left"
        ),
    )
    assert statuses == [200] * 50
    # Bounded by the slowest possible path: each request waits at most for a few batches.
    assert max(latencies) < 10, latencies
    assert [e.status for e in cut] == [408] * 100
    for exchange in cut_heads:
        assert exchange.status == 408, exchange
        assert exchange.closed, exchange
        assert exchange.answered_after_s is not None
        assert HEADER_TIMEOUT_S - 0.1 <= exchange.answered_after_s < HEADER_TIMEOUT_S + 3
        check_error(exchange, 408, "header_timeout")
    assert fds_after <= fds_before + 5


async def test_a_kept_alive_connection_gets_a_fresh_head_deadline_per_request(
    server: ServerProcess,
) -> None:
    """The deadline runs from a request's first byte on a kept-alive connection: a client
    idle between requests (within uvicorn's keep-alive) is not cut, a stalled head is."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        first, second = Exchange(), Exchange()
        writer.write(head("GET", "/health", json=False))
        await writer.drain()
        await read_answer(reader, first, time.monotonic())
        assert first.status == 200 and not first.closed
        writer.write(HALF_HEAD)  # the next request starts, and stalls
        await writer.drain()
        started = time.monotonic()
        await asyncio.wait_for(read_answer(reader, second, started), HEADER_TIMEOUT_S + 20)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    check_error(second, 408, "header_timeout")
    assert second.closed
    assert second.answered_after_s is not None
    assert HEADER_TIMEOUT_S - 1.2 <= second.answered_after_s < HEADER_TIMEOUT_S + 3


# -- the hostile texts and ids through real sockets ----------------------------------------
async def test_hostile_texts_and_request_ids_on_the_real_model(
    server: ServerProcess, reliability: Recorder
) -> None:
    results: dict[str, tuple[int, bytes]] = {}
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
        for label, body in (
            ("NUL inside a text", b'{"text": "a\\u0000b"}'),
            ("only NULs", b'{"text": "\\u0000\\u0000\\u0000"}'),
            ("control characters", b'{"text": "\\u0001\\u001b[31m\\u007f\\u0085"}'),
            (
                "1M characters, truncate",
                orjson.dumps({"text": "word " * 200_000, "truncate": True}),
            ),
            ("1M characters", orjson.dumps({"text": "word " * 200_000})),
            ("nesting bomb", b"[" * 100_000 + b"]" * 100_000),
            ("invalid UTF-8", b'{"text": "\xff\xfe"}'),
            ("1e999999", b'{"text": "a", "truncate": 1e999999}'),
        ):
            response = await client.post(
                "/embed", content=body, headers={"content-type": "application/json"}
            )
            results[label] = (response.status_code, response.content)
            assert_no_leak(response.content)

    ids: dict[str, tuple[int, str]] = {}
    for label, value in (
        ("CR/LF split by the client", b"abc\r\nSet-Cookie: evil=1"),
        ("obs-fold continuation", b"abc\r\n Set-Cookie: evil=1"),
        ("non-ASCII bytes", b"caf\xc3\xa9\xff"),
        ("8 KiB", b"x" * 8192),
        ("safe", b"client-7.a:b"),
    ):
        request = (
            b"POST /embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"X-Request-ID: " + value + b"\r\nContent-Length: 13\r\n\r\n"
        )
        exchange = await send_request(server.port, request, [b'{"text": "a"}'])
        ids[label] = (exchange.status, exchange.headers.get("x-request-id", ""))
        assert_no_leak(exchange.body)
        assert "set-cookie" not in exchange.headers
    await asyncio.sleep(0.5)  # the access log is written by a background thread
    log = server.log()

    reliability.record(
        AREA,
        "Hostile texts and X-Request-ID on the real model",
        tried=(
            "NUL and control characters in texts, 1M characters with and without truncate, "
            "nesting bomb, invalid UTF-8, 1e999999; X-Request-ID split by CR/LF, obs-folded, "
            "non-ASCII, 8 KiB (real server, real model)"
        ),
        amount=f"{len(results) + len(ids)} requests",
        outcome=(
            "; ".join(f"{k}: {v[0]}" for k, v in results.items())
            + "; ids: "
            + "; ".join(
                f"{k}: {s} {'kept' if i and not GENERATED_ID.fullmatch(i) else 'replaced'}"
                for k, (s, i) in ids.items()
            )
            + f"; 'evil' in the server log: {'evil' in log}"
        ),
    )
    for label in (
        "NUL inside a text",
        "only NULs",
        "control characters",
        "1M characters, truncate",
    ):
        status, content = results[label]
        assert status == 200, (label, content)
        assert len(orjson.loads(content)["embedding"]) == 384
    assert results["1M characters"][0] == 422
    for label in ("nesting bomb", "invalid UTF-8", "1e999999"):
        assert results[label][0] == 400, (label, results[label])
    for label, (status, rid) in ids.items():
        if label == "safe":
            assert (status, rid) == (200, "client-7.a:b")
        elif label == "CR/LF split by the client":  # two headers; the id part is safe
            assert (status, rid) == (200, "abc")
        elif status == 200:  # the server took the request: the id it echoes is a fresh one
            assert GENERATED_ID.fullmatch(rid), (label, rid)
        else:  # the HTTP parser refused the head itself
            assert status == 400, (label, status)
    assert "evil" not in log
    assert all("\r" not in line for line in log.splitlines())
