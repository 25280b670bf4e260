"""Closed-loop load generator, run as its own process: ``python -m bench.loadgen SPEC.json``.

Each client holds one keep-alive HTTP/1.1 connection to 127.0.0.1 and sends one request,
waits for the answer, sends the next (closed loop). Requests are pre-built bytes and
responses are parsed by hand (status + content-length), so the generator costs the two
shared cores little; it runs in a separate interpreter so that its CPU time is its own and
is reported next to the server's. A run ends after `max_requests` requests or once
`duration_s` has passed (no new request starts after it), and always within `deadline_s`.
The summary is one JSON object on stdout.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.stats import latency_summary

ROOT = Path(__file__).resolve().parent.parent
MAX_REQUEST_S = 60.0
CONNECT_S = 10.0


@dataclass
class LoadSpec:
    """One load run. `endpoint` is ``embed`` (one text per request) or ``batch`` (`group`
    consecutive texts per ``/embed/batch`` request)."""

    port: int
    texts_path: str
    clients: int
    max_requests: int
    duration_s: float | None
    deadline_s: float
    endpoint: str = "embed"
    group: int = 32
    server_pid: int | None = None


def build_requests(port: int, texts: Sequence[str], endpoint: str, group: int) -> list[bytes]:
    """Every HTTP/1.1 request of the run, built before the clock starts. The ``batch``
    endpoint cycles through the corpus in groups of `group` texts."""
    path = "/embed" if endpoint == "embed" else "/embed/batch"
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    bodies: list[Any]
    if endpoint == "embed":
        bodies = [{"text": text} for text in texts]
    elif endpoint == "batch":
        count = max(1, len(texts) // group)
        bodies = [
            {"texts": [texts[(k * group + j) % len(texts)] for j in range(group)]}
            for k in range(count)
        ]
    else:
        raise ValueError(f"unknown endpoint {endpoint!r}")
    requests = []
    for body in bodies:
        data = json.dumps(body).encode()
        requests.append(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return requests


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one HTTP/1.1 response; its status and whether the server will close."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    lower = head.lower()
    marker = lower.find(b"\r\ncontent-length:")
    if marker < 0:
        raise ConnectionError("response without content-length")
    end = lower.index(b"\r\n", marker + 2)
    await reader.readexactly(int(lower[marker + 17 : end]))
    return status, b"\r\nconnection: close" in lower


def cpu_seconds(pid: int | None, tid: int | None = None) -> float | None:
    """User + system CPU seconds of process `pid` (every thread, ended ones included), or of
    its thread `tid` alone (``tid == pid`` is the main thread), from /proc; None when unknown.
    """
    if pid is None:
        return None
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        stat = Path(path).read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def machine_busy_s() -> float | None:
    """CPU seconds every process on the machine has spent busy so far (Linux /proc/stat:
    all time but idle and iowait, summed over cores), or None when unknown."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = sum(fields) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


def other_cpu_s(machine: float | None, *own: float | None) -> float | None:
    """CPU seconds of processes other than `own` out of the machine's busy time."""
    if machine is None or any(value is None for value in own):
        return None
    return max(0.0, machine - sum(value for value in own if value is not None))


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    async with asyncio.timeout(CONNECT_S):
        return await asyncio.open_connection("127.0.0.1", port)


class _Run:
    """The shared state of one run: request numbers, deadline, and what came back."""

    def __init__(self, spec: LoadSpec, requests: list[bytes]) -> None:
        self.spec = spec
        self.requests = requests
        self.numbers = itertools.count()
        self.stop_at = float("inf")
        self.latencies_ms: list[float] = []
        self.statuses: Counter[str] = Counter()
        self.in_flight = 0

    def next_request(self) -> bytes | None:
        """The next request to send, or None once the run is over."""
        if time.perf_counter() >= self.stop_at:
            return None
        number = next(self.numbers)
        if number >= self.spec.max_requests:
            return None
        return self.requests[number % len(self.requests)]

    async def client(
        self, connection: tuple[asyncio.StreamReader, asyncio.StreamWriter], start: asyncio.Event
    ) -> None:
        reader, writer = connection
        await start.wait()
        try:
            for _ in range(self.spec.max_requests):  # bounded; usually ends on None below
                payload = self.next_request()
                if payload is None:
                    return
                sent = time.perf_counter()
                self.in_flight += 1
                try:
                    writer.write(payload)
                    async with asyncio.timeout(MAX_REQUEST_S):
                        status, closing = await read_response(reader)
                except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                    self.statuses[type(exc).__name__] += 1
                    closing = True
                else:
                    self.statuses[str(status)] += 1
                    if status == 200:
                        self.latencies_ms.append((time.perf_counter() - sent) * 1000)
                finally:
                    self.in_flight -= 1
                if closing:
                    writer.close()
                    try:
                        reader, writer = await _connect(self.spec.port)
                    except (OSError, TimeoutError) as exc:
                        self.statuses["reconnect " + type(exc).__name__] += 1
                        return
        finally:
            writer.close()


async def run(spec: LoadSpec, requests: list[bytes]) -> dict[str, Any]:
    """Connect every client, then run the load and summarise it."""
    state = _Run(spec, requests)
    connections = await asyncio.gather(*(_connect(spec.port) for _ in range(spec.clients)))
    start = asyncio.Event()
    tasks = [asyncio.create_task(state.client(c, start)) for c in connections]
    # The server's main thread runs its event loop: its CPU apart from the whole process's.
    pid = spec.server_pid
    server_cpu0, loop_cpu0, busy0 = cpu_seconds(pid), cpu_seconds(pid, pid), machine_busy_s()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if spec.duration_s is not None:
        state.stop_at = wall0 + spec.duration_s
    start.set()
    _, pending = await asyncio.wait(tasks, timeout=spec.deadline_s)
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    server_cpu1, loop_cpu1, busy1 = cpu_seconds(pid), cpu_seconds(pid, pid), machine_busy_s()
    server_cpu = _delta(server_cpu0, server_cpu1)
    busy = _delta(busy0, busy1)
    if pending:
        state.statuses["deadline"] += state.in_flight
        state.stop_at = 0.0
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=CONNECT_S)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise RuntimeError("a load client failed") from task.exception()
    ok = state.statuses.get("200", 0)
    return {
        "spec": asdict(spec),
        "sent": sum(state.statuses.values()),
        "ok": ok,
        "statuses": dict(state.statuses),
        "errors": sum(n for status, n in state.statuses.items() if status != "200"),
        "timed_out": bool(pending),
        "wall_s": wall,
        "client_cpu_s": cpu,
        "server_cpu_s": server_cpu,
        "server_loop_cpu_s": _delta(loop_cpu0, loop_cpu1),
        "other_cpu_s": other_cpu_s(busy, server_cpu, cpu),
        "latency_ms": latency_summary(state.latencies_ms),
    }


def main(argv: Sequence[str]) -> int:
    """Entry point of the generator process: spec JSON path in, summary JSON on stdout."""
    spec = LoadSpec(**json.loads(Path(argv[0]).read_text()))
    texts = json.loads(Path(spec.texts_path).read_text())
    requests = build_requests(spec.port, texts, spec.endpoint, spec.group)
    runner: Callable[[Any], Any]
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    print(json.dumps(runner(run(spec, requests))))
    return 0


def run_load(spec: LoadSpec) -> dict[str, Any]:
    """Run one load in a fresh generator process and return its summary (bounded in time)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="loadgen-", delete=False) as f:
        json.dump(asdict(spec), f)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bench.loadgen", f.name],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=spec.deadline_s + 60,
            check=False,
        )
    finally:
        os.unlink(f.name)
    if done.returncode != 0:
        raise RuntimeError(f"load generator failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
