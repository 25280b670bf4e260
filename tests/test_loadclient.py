"""devkit's load client (`devkit.loadclient`) against stub HTTP servers, with its /proc readers
(`devkit.procfs`) and its percentile (`devkit.stats`). Nothing here asserts a speed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from devkit import loadclient, procfs
from devkit.loadclient import LoadResult, LoadSpec
from devkit.stats import latency_summary, percentile

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# -- stats ----------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 2, 7, 100, 1001])
@pytest.mark.parametrize("q", [0, 1, 25, 50, 90, 95, 99, 99.9, 100])
def test_percentile_matches_numpy_linear(size: int, q: float) -> None:
    values = [random.Random(size).uniform(0, 100) for _ in range(size)]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


def test_percentile_edges() -> None:
    assert math.isnan(percentile([], 50))
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([4.0, 1.0, 3.0, 2.0], 100) == 4.0  # order of input does not matter
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_latency_summary() -> None:
    summary = latency_summary([float(i) for i in range(1, 101)])
    assert summary["p50"] == pytest.approx(50.5)
    assert summary["p99"] == pytest.approx(99.01)
    assert summary["max"] == 100.0
    assert summary["mean"] == pytest.approx(50.5)
    assert all(math.isnan(v) for v in latency_summary([]).values())


# -- requests -------------------------------------------------------------------------------
def test_text_bodies_and_requests_are_valid_http() -> None:
    texts = [f"t{i} ü" for i in range(70)]
    single_path, single_bodies = loadclient.text_bodies(texts, "embed")
    single = loadclient.build_requests(8000, single_path, single_bodies)
    assert len(single) == 70
    batch_path, batch_bodies = loadclient.text_bodies(texts, "batch", group=32)
    batch = loadclient.build_requests(8000, batch_path, batch_bodies)
    assert len(batch) == 2
    for raw in single + batch:
        head, body = raw.split(b"\r\n\r\n", 1)
        length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
        assert length == len(body)
        assert head.startswith(b"POST /embed")
    assert json.loads(single[1].split(b"\r\n\r\n", 1)[1]) == {"text": "t1 ü"}
    second = json.loads(batch[1].split(b"\r\n\r\n", 1)[1])["texts"]
    assert second == texts[32:64]
    v1_path, v1_bodies = loadclient.text_bodies(texts[:2], "v1", model="m")
    assert v1_path == "/v1/embeddings" and v1_bodies[1] == {"input": "t1 ü", "model": "m"}
    with pytest.raises(ValueError, match="unknown endpoint"):
        loadclient.text_bodies(texts, "other")


# -- runs against a stub server -------------------------------------------------------------
def _answering(statuses: Iterator[int], headers: bytes = b"") -> Handler:
    """A keep-alive handler answering each request with the next status."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            body = b'{"ok": true}'
            writer.write(
                b"HTTP/1.1 %d X\r\ncontent-length: %d\r\n%s\r\n%s"
                % (next(statuses), len(body), headers, body)
            )
            await writer.drain()

    return handle


def _run(handle: Handler, **spec: Any) -> LoadResult:
    """One in-process run of the client against a stub server on 127.0.0.1."""

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handle(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def main() -> LoadResult:
        server = await asyncio.start_server(guarded, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            bodies = [{"text": text} for text in "abc"]
            return await loadclient.run(LoadSpec(port=port, path="/embed", bodies=bodies, **spec))
        finally:
            server.close()

    return asyncio.run(asyncio.wait_for(main(), 30))


def test_counts_every_request_and_outcome() -> None:
    statuses = iter([200, 200, 503] * 100)
    result = _run(_answering(statuses), clients=4, max_requests=60, deadline_s=20)
    assert result.attempts == 60
    assert result.ok == 40
    assert result.errors == 20 and result.outcomes == {"200": 40, "503": 20}
    assert result.latency_200_s["p50"] > 0
    assert result.latency_200_s["p50"] <= result.latency_200_s["p99"]
    assert not result.timed_out
    assert result.server_cpu_s is None and result.server_loop_cpu_s is None  # no server_pid


def test_stops_after_its_duration() -> None:
    result = _run(_answering(iter([200] * 10_000_000)), clients=2, duration_s=0.3, deadline_s=20)
    assert result.ok > 0 and result.errors == 0
    assert not result.timed_out  # ended by its duration, not by the deadline


def test_needs_a_duration_or_a_count() -> None:
    with pytest.raises(ValueError, match="duration_s or max_requests"):
        _run(_answering(iter([200])), clients=1, deadline_s=5)


def test_retry_after_is_honoured_up_to_its_cap() -> None:
    # Retry-After says 30 s: a cap of 0 never waits, so the run ends by count, far inside its
    # deadline; a cap of 30 would keep the clients waiting past it.
    statuses = iter([429] * 1000)
    result = _run(
        _answering(statuses, b"retry-after: 30\r\n"),
        clients=2,
        max_requests=40,
        deadline_s=10,
        retry_after_cap_s=0.0,
    )
    assert result.outcomes == {"429": 40} and result.with_retry_after == 40
    assert not result.timed_out
    waited = _run(
        _answering(iter([429] * 1000), b"retry-after: 30\r\n"),
        clients=2,
        max_requests=40,
        deadline_s=1,
        retry_after_cap_s=30.0,
    )
    assert waited.timed_out and waited.attempts == 2  # one 429 each, then waiting


def test_a_closed_connection_is_counted_and_reopened() -> None:
    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _answering(iter([200]))(reader, writer)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Answers one request, then closes on reading the next (the statuses run out).
        with contextlib.suppress(RuntimeError):
            await answer_once(reader, writer)

    result = _run(handle, clients=1, max_requests=6, deadline_s=20, keep_records=True)
    assert result.outcomes == {"200": 3, "closed": 3}
    assert [record[2] for record in result.records] == ["200", "closed"] * 3


def test_the_deadline_cuts_unanswered_requests() -> None:
    async def never(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.Event().wait()

    result = _run(never, clients=3, max_requests=100, deadline_s=0.5)
    assert result.timed_out
    assert result.outcomes == {"deadline": 3}


def test_refused_when_nothing_listens_after_a_close() -> None:
    listeners: list[asyncio.Server] = []

    async def once_then_gone(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        listeners[0].close()  # no new connection from now on
        writer.write(b"HTTP/1.1 503 X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    async def main() -> LoadResult:
        server = await asyncio.start_server(once_then_gone, "127.0.0.1", 0)
        listeners.append(server)
        port = server.sockets[0].getsockname()[1]
        spec = LoadSpec(port=port, path="/x", bodies=[{}], clients=1, deadline_s=20, max_requests=5)
        return await loadclient.run(spec)

    result = asyncio.run(asyncio.wait_for(main(), 30))
    assert result.outcomes == {"503": 1, "refused": 1}  # a refused client stops


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_reads_the_servers_cpu_by_thread() -> None:
    pid = os.getpid()  # the stub server runs in this process: its main thread serves
    result = _run(
        _answering(iter([200] * 1000)), clients=2, max_requests=200, deadline_s=20, server_pid=pid
    )
    assert result.server_cpu_s is not None and result.server_cpu_s >= 0
    assert result.server_loop_cpu_s == result.server_threads_cpu_s[str(pid)]
    assert result.client_cpu_s is not None and result.other_cpu_s is not None


# -- the client process ---------------------------------------------------------------------
class _Ok(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"{}")


def test_run_load_runs_a_client_process() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        port = server.server_address[1]
        spec = LoadSpec(
            port=port,
            path="/embed",
            bodies=[{"text": "a"}],
            clients=2,
            max_requests=30,
            deadline_s=30,
            server_pid=os.getpid(),
        )
        started = time.monotonic()
        result = loadclient.run_load(spec)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
    assert result.outcomes == {"200": 30}
    assert started <= result.started <= result.ended  # one clock across the processes
    assert result.server_cpu_s is not None


# -- /proc readers --------------------------------------------------------------------------
def _burn(cpu_s: float) -> None:
    """Spin this thread until it has used `cpu_s` seconds of CPU."""
    start = time.thread_time()
    while time.thread_time() - start < cpu_s:
        sum(range(1000))


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_cpu_reader_tells_the_main_thread_from_the_others() -> None:
    pid = os.getpid()
    main0, whole0 = procfs.cpu_seconds(pid, pid), procfs.cpu_seconds(pid)
    _burn(0.3)
    main1, whole1 = procfs.cpu_seconds(pid, pid), procfs.cpu_seconds(pid)
    assert main0 is not None and main1 is not None and whole0 is not None and whole1 is not None
    assert main1 - main0 >= 0.2 and whole1 - whole0 >= 0.2

    worker = threading.Thread(target=_burn, args=(0.3,))
    main2, whole2 = procfs.cpu_seconds(pid, pid), procfs.cpu_seconds(pid)
    threads2 = procfs.threads_cpu_s(pid)
    worker.start()
    worker.join(timeout=30)
    main3, whole3 = procfs.cpu_seconds(pid, pid), procfs.cpu_seconds(pid)
    assert main2 is not None and main3 is not None and whole2 is not None and whole3 is not None
    assert whole3 - whole2 >= 0.2  # the process counts its ended thread
    assert main3 - main2 <= 0.1  # the main thread only waited
    assert threads2[pid] == pytest.approx(main2, abs=0.05)  # the main thread is in the map
    assert procfs.cpu_seconds(pid, 2**22 + 7) is None  # no such thread
    assert procfs.cpu_seconds(None) is None and procfs.threads_cpu_s(None) == {}


def test_cpu_accounting_helpers() -> None:
    busy = procfs.machine_busy_s()
    assert busy is None or busy > 0
    assert procfs.cpu_seconds(os.getpid()) is not None or not Path("/proc").is_dir()
    assert procfs.other_cpu_s(10.0, 4.0, 1.5) == 4.5
    assert procfs.other_cpu_s(1.0, 4.0) == 0.0  # tick rounding never goes negative
    assert procfs.other_cpu_s(None, 1.0) is None and procfs.other_cpu_s(1.0, None) is None
    assert procfs.delta(1.0, 3.5) == 2.5 and procfs.delta(None, 1.0) is None


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux /proc")
def test_proc_status_reads_memory_and_threads() -> None:
    figures = procfs.proc_status(os.getpid())
    assert figures["VmHWM"] >= figures["VmRSS"] > 0
    assert figures["Threads"] >= 1
