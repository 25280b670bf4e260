"""The one closed-loop load client: ``python -m devkit.loadclient SPEC.json``, its own process.

`clients` clients each hold one keep-alive HTTP/1.1 connection to 127.0.0.1 over raw asyncio
streams and send one request, wait for the answer, send the next. Requests are built before
the clock starts and responses are parsed by hand (status, content-length, Retry-After), so
the client costs the cores it shares with the server little; running in its own interpreter,
its CPU time is its own and is reported next to the server's. It prints one JSON line
``{"started": T}`` once every client is connected, then one JSON line with the `LoadResult`.
Times are ``time.monotonic()``, one clock for every process on the machine, so a caller can
place its own events (a signal) among the requests.

Each attempt ends in one outcome: the HTTP status (``"200"``, ``"429"``, ...), or
``"refused"`` (connection refused: nothing was sent; ``"connect_error"`` for other connection
failures), ``"closed"`` (sent, and the connection was closed or reset without an answer) or
``"timeout"`` (sent, no answer in time); requests still unanswered when the deadline cuts the
run count as ``"deadline"``. A client that cannot connect stops; after a closed connection it
reconnects. A 429 makes the client wait as its ``Retry-After`` says (capped at
`retry_after_cap_s`, jittered; a cap of 0 never waits). The run ends after `max_requests`
requests or once `duration_s` has passed (no request starts after it), and always within
`deadline_s`.

Callers: the reliability tests (`LoadProcess`, asynchronous), ``make bench`` and
``scripts/loopcpu.py`` (`run_load`, blocking).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio

from devkit import procfs
from devkit.stats import latency_summary

ROOT = Path(__file__).resolve().parent.parent
CONNECT_S = 10.0
ENDPOINTS = ("embed", "batch", "v1")


@dataclass
class LoadSpec:
    """One run: `bodies` (JSON values) are POSTed to `path` in turn, by `clients` clients.

    With `server_pid`, that process's CPU (whole and per thread) is read just before and after
    the load."""

    port: int
    path: str
    bodies: list[Any]
    clients: int
    deadline_s: float
    duration_s: float | None = None
    max_requests: int | None = None
    request_timeout_s: float = 60.0
    retry_after_cap_s: float = 2.0
    keep_records: bool = False  # every attempt as [sent_at, seconds, outcome]
    seed: int = 7
    server_pid: int | None = None


@dataclass
class LoadResult:
    """What a run measured. Latencies are of the 200 answers, in seconds; CPU figures are
    None when unknown (no `server_pid`, no /proc); `records` only when the spec asked."""

    started: float
    ended: float
    outcomes: dict[str, int]
    with_retry_after: int  # 429 answers that carried a Retry-After header
    latency_200_s: dict[str, float]  # p50, p95, p99, max, mean
    timed_out: bool = False  # the deadline cut the run
    client_cpu_s: float | None = None
    server_cpu_s: float | None = None
    server_loop_cpu_s: float | None = None  # its main thread, which runs the event loop
    server_threads_cpu_s: dict[str, float] = field(default_factory=dict)  # by thread id
    other_cpu_s: float | None = None  # the rest of the machine's busy time
    records: list[list[Any]] = field(default_factory=list)

    @property
    def attempts(self) -> int:
        return sum(self.outcomes.values())

    @property
    def ok(self) -> int:
        return self.count("200")

    @property
    def errors(self) -> int:
        return self.attempts - self.ok

    @property
    def wall_s(self) -> float:
        return self.ended - self.started

    def count(self, outcome: str) -> int:
        return self.outcomes.get(outcome, 0)


def text_bodies(
    texts: Sequence[str], endpoint: str, *, group: int = 32, model: str | None = None
) -> tuple[str, list[Any]]:
    """The path and bodies that send `texts`: ``embed`` one per ``/embed`` request, ``v1`` one
    per ``/v1/embeddings`` request (naming `model`), ``batch`` `group` consecutive texts per
    ``/embed/batch`` request, cycling through the texts."""
    if endpoint == "embed":
        return "/embed", [{"text": text} for text in texts]
    if endpoint == "v1":
        return "/v1/embeddings", [{"input": text, "model": model} for text in texts]
    if endpoint == "batch":
        count = max(1, len(texts) // group)
        bodies = [
            {"texts": [texts[(k * group + j) % len(texts)] for j in range(group)]}
            for k in range(count)
        ]
        return "/embed/batch", bodies
    raise ValueError(f"unknown endpoint {endpoint!r} (one of {', '.join(ENDPOINTS)})")


def build_requests(port: int, path: str, bodies: Sequence[Any]) -> list[bytes]:
    """Each body as a complete HTTP/1.1 POST request."""
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    requests = []
    for body in bodies:
        data = json.dumps(body).encode()
        requests.append(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return requests


async def read_response(reader: asyncio.StreamReader) -> tuple[int, float | None, bool]:
    """One response: its status, its Retry-After seconds (if any), whether it closes."""
    head = (await reader.readuntil(b"\r\n\r\n")).lower()
    status = int(head[9:12])
    length = _header(head, b"content-length")
    if length is None:
        raise ConnectionError("response without content-length")
    await reader.readexactly(int(length))
    retry_after = _header(head, b"retry-after")
    return (
        status,
        float(retry_after) if retry_after else None,
        _header(head, b"connection") == b"close",
    )


def _header(head: bytes, name: bytes) -> bytes | None:
    marker = head.find(b"\r\n" + name + b":")
    if marker < 0:
        return None
    start = marker + len(name) + 3
    return head[start : head.index(b"\r\n", start)].strip()


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    async with asyncio.timeout(CONNECT_S):
        return await asyncio.open_connection("127.0.0.1", port)


class _Run:
    """The state shared by one run's clients; each client only appends to it."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.requests = build_requests(spec.port, spec.path, spec.bodies)
        self.numbers = itertools.count()
        self.stop_at = float("inf")
        self.outcomes: Counter[str] = Counter()
        self.with_retry_after = 0
        self.in_flight = 0
        self.latencies: list[float] = []
        self.records: list[list[Any]] = []
        self.rng = random.Random(spec.seed)

    def next_request(self) -> bytes | None:
        """The next request to send, or None once the run is over."""
        if time.monotonic() >= self.stop_at:
            return None
        number = next(self.numbers)
        if self.spec.max_requests is not None and number >= self.spec.max_requests:
            return None
        return self.requests[number % len(self.requests)]

    def note(self, sent_at: float, seconds: float, outcome: str) -> None:
        self.outcomes[outcome] += 1
        if self.spec.keep_records:
            self.records.append([sent_at, seconds, outcome])

    async def client(
        self, stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None
    ) -> None:
        spec = self.spec
        try:
            while (payload := self.next_request()) is not None:
                sent_at = time.monotonic()
                if stream is None:
                    try:
                        stream = await _connect(spec.port)
                    except (OSError, TimeoutError) as exc:
                        refused = isinstance(exc, ConnectionRefusedError)
                        self.note(sent_at, 0.0, "refused" if refused else "connect_error")
                        return
                    sent_at = time.monotonic()
                reader, writer = stream
                pause = 0.0
                self.in_flight += 1
                try:
                    writer.write(payload)
                    async with asyncio.timeout(spec.request_timeout_s):
                        status, retry_after, closing = await read_response(reader)
                except TimeoutError:
                    self.note(sent_at, time.monotonic() - sent_at, "timeout")
                    closing = True
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    self.note(sent_at, time.monotonic() - sent_at, "closed")
                    closing = True
                else:
                    seconds = time.monotonic() - sent_at
                    self.note(sent_at, seconds, str(status))
                    if status == 200:
                        self.latencies.append(seconds)
                    elif status == 429 and retry_after is not None:
                        self.with_retry_after += 1
                        cap = spec.retry_after_cap_s
                        pause = min(retry_after, cap) * self.rng.uniform(0.5, 1.0)
                finally:
                    self.in_flight -= 1
                if closing:
                    writer.close()
                    stream = None
                if pause:
                    await asyncio.sleep(pause)
        finally:
            if stream is not None:
                stream[1].close()


class _ServerCpu:
    """The server's CPU (whole process and per thread), the machine's and ours, at one time."""

    def __init__(self, pid: int | None) -> None:
        self.server = procfs.cpu_seconds(pid)
        self.threads = procfs.threads_cpu_s(pid)
        self.machine = procfs.machine_busy_s()
        self.own = time.process_time()


def _cpu_figures(pid: int | None, before: _ServerCpu, after: _ServerCpu) -> dict[str, Any]:
    own = after.own - before.own
    if pid is None:
        return {"client_cpu_s": own}
    server = procfs.delta(before.server, after.server)
    threads = {tid: end - before.threads.get(tid, 0.0) for tid, end in after.threads.items()}
    machine = procfs.delta(before.machine, after.machine)
    return {
        "client_cpu_s": own,
        "server_cpu_s": server,
        "server_loop_cpu_s": threads.get(pid),
        "server_threads_cpu_s": {str(tid): seconds for tid, seconds in sorted(threads.items())},
        "other_cpu_s": procfs.other_cpu_s(machine, server, own),
    }


async def run(spec: LoadSpec) -> LoadResult:
    """Connect every client, announce the start on stdout, run, and summarise."""
    if spec.duration_s is None and spec.max_requests is None:
        raise ValueError("a load run needs duration_s or max_requests")
    state = _Run(spec)
    streams = await asyncio.gather(*(_connect(spec.port) for _ in range(spec.clients)))
    before = _ServerCpu(spec.server_pid)
    started = time.monotonic()
    if spec.duration_s is not None:
        state.stop_at = started + spec.duration_s
    print(json.dumps({"started": started}), flush=True)
    tasks = [asyncio.create_task(state.client(stream)) for stream in streams]
    _, pending = await asyncio.wait(tasks, timeout=spec.deadline_s)
    ended = time.monotonic()
    after = _ServerCpu(spec.server_pid)
    if pending:
        state.outcomes["deadline"] += state.in_flight
        state.stop_at = 0.0
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=CONNECT_S)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise RuntimeError("a load client failed") from task.exception()
    return LoadResult(
        started=started,
        ended=ended,
        outcomes=dict(state.outcomes),
        with_retry_after=state.with_retry_after,
        latency_200_s=latency_summary(state.latencies),
        timed_out=bool(pending),
        records=state.records,
        **_cpu_figures(spec.server_pid, before, after),
    )


def _bound_s(spec: LoadSpec) -> float:
    """How long a client process may take in all: its deadline, connecting, a margin."""
    return spec.deadline_s + 2 * CONNECT_S + 30


def _command(spec_path: Path) -> list[str]:
    return [sys.executable, "-m", "devkit.loadclient", str(spec_path)]


def _parse(out: str) -> LoadResult:
    return LoadResult(**json.loads(out.strip().splitlines()[-1]))


def run_load(spec: LoadSpec) -> LoadResult:
    """Run `spec` in a fresh client process and return its result (bounded in time)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="loadclient-", delete=False) as f:
        json.dump(asdict(spec), f)
    try:
        done = subprocess.run(
            _command(Path(f.name)),
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=_bound_s(spec),
            check=False,
        )
    finally:
        os.unlink(f.name)
    if done.returncode != 0:
        raise RuntimeError(f"load client failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return _parse(done.stdout)


class LoadProcess:
    """A load run in its own interpreter, driven from async code; `started()` and `result()`
    wait with bounds, `aclose()` kills and reaps it."""

    def __init__(self, spec: LoadSpec, proc: asyncio.subprocess.Process) -> None:
        self.spec = spec
        self._proc = proc

    @classmethod
    async def start(cls, spec: LoadSpec, spec_path: Path) -> LoadProcess:
        """Write `spec` to `spec_path` and start the client process on it."""
        await anyio.Path(spec_path).write_text(json.dumps(asdict(spec)))
        proc = await asyncio.create_subprocess_exec(
            *_command(spec_path),
            cwd=ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(spec, proc)

    async def started(self) -> float:
        """When the load began (monotonic), once every client is connected."""
        assert self._proc.stdout is not None
        with anyio.fail_after(CONNECT_S + 30):
            line = await self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load client ended before starting: {await self._stderr()}")
        started: float = json.loads(line)["started"]
        return started

    async def result(self) -> LoadResult:
        """The result, once the run is over (within its deadline and a margin)."""
        assert self._proc.stdout is not None
        with anyio.fail_after(_bound_s(self.spec)):
            out = await self._proc.stdout.read()
            status = await self._proc.wait()
        if status != 0:
            raise RuntimeError(f"load client failed ({status}): {await self._stderr()}")
        return _parse(out.decode())

    def running(self) -> bool:
        """True until the client process has exited."""
        return self._proc.returncode is None

    async def aclose(self) -> None:
        """Kill the client process if it is still running, and reap it (bounded; shielded,
        so it also runs in a `finally` of a cancelled test)."""
        with anyio.CancelScope(shield=True), anyio.move_on_after(10):
            if self._proc.returncode is None:
                self._proc.kill()
            await self._proc.wait()

    async def _stderr(self) -> str:
        assert self._proc.stderr is not None
        with anyio.move_on_after(5):
            return (await self._proc.stderr.read()).decode(errors="replace")[-3000:]
        return ""


def main(argv: Sequence[str]) -> int:
    """Entry point of the client process: spec JSON path in, JSON lines out."""
    spec = LoadSpec(**json.loads(Path(argv[0]).read_text()))
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run(spec))
    else:
        result = uvloop.run(run(spec))
    print(json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
