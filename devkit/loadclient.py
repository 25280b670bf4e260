"""A cheap load client for the reliability tests, run as its own process.

``python -m tests.loadclient SPEC.json`` runs `clients` closed-loop clients, each on one
keep-alive HTTP/1.1 connection to 127.0.0.1 over raw asyncio streams (requests are built
once, responses parsed by hand: little CPU per request on the two cores the server shares).
It prints one JSON line ``{"started": T}`` once every client is connected, then one JSON line
with the summary. Times are ``time.monotonic()``, which is one clock for every process on
the machine, so a test can place its own events (a signal) among the requests.

Each attempt ends in one outcome: the HTTP status (``"200"``, ``"429"``, ...), or
``"refused"`` (connection refused: nothing was sent; ``"connect_error"`` for other
connection failures), ``"closed"`` (sent, and the connection was
closed or reset without an answer) or ``"timeout"`` (sent, no answer in time). A client that
is refused stops. A 429 makes the client wait as its ``Retry-After`` says (capped, jittered),
as a well-behaved client does. The run ends at `duration_s` or `max_requests`, and always
within `deadline_s`.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import anyio
import httpx

ROOT = Path(__file__).resolve().parent.parent
CONNECT_S = 10.0


@dataclass
class LoadSpec:
    """One run: `bodies` (JSON values) are POSTed to `path` in turn, by `clients` clients."""

    port: int
    path: str
    bodies: list[Any]
    clients: int
    duration_s: float
    deadline_s: float
    max_requests: int | None = None
    request_timeout_s: float = 60.0
    retry_after_cap_s: float = 2.0
    keep_records: bool = False  # every attempt as [sent_at, seconds, outcome]
    seed: int = 7


@dataclass
class LoadResult:
    """What a run measured. `records` only when the spec asked to keep them."""

    started: float
    ended: float
    outcomes: dict[str, int]
    with_retry_after: int  # 429 answers that carried a Retry-After header
    latency_200_s: dict[str, float]
    records: list[list[Any]] = field(default_factory=list)

    @property
    def attempts(self) -> int:
        return sum(self.outcomes.values())

    def count(self, outcome: str) -> int:
        return self.outcomes.get(outcome, 0)


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (nearest rank above) of `values`; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))]


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


class _Run:
    """The state shared by one run's clients; each client only appends to it."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.requests = build_requests(spec.port, spec.path, spec.bodies)
        self.sent = 0
        self.stop_at = float("inf")
        self.outcomes: Counter[str] = Counter()
        self.with_retry_after = 0
        self.latencies: list[float] = []
        self.records: list[list[Any]] = []
        self.rng = random.Random(spec.seed)

    def next_request(self) -> bytes | None:
        if time.monotonic() >= self.stop_at:
            return None
        if self.spec.max_requests is not None and self.sent >= self.spec.max_requests:
            return None
        request = self.requests[self.sent % len(self.requests)]
        self.sent += 1
        return request

    def note(self, sent_at: float, seconds: float, outcome: str) -> None:
        self.outcomes[outcome] += 1
        if self.spec.keep_records:
            self.records.append([sent_at, seconds, outcome])

    async def client(
        self, stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None
    ) -> None:
        spec = self.spec
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
                    pause = min(retry_after, spec.retry_after_cap_s) * self.rng.uniform(0.5, 1.0)
            if closing:
                writer.close()
                stream = None
            if pause:
                await asyncio.sleep(pause)
        if stream is not None:
            stream[1].close()

    def result(self, started: float, ended: float) -> LoadResult:
        latencies = self.latencies
        return LoadResult(
            started=started,
            ended=ended,
            outcomes=dict(self.outcomes),
            with_retry_after=self.with_retry_after,
            latency_200_s={
                "p50": percentile(latencies, 50),
                "p99": percentile(latencies, 99),
                "max": max(latencies, default=float("nan")),
            },
            records=self.records,
        )


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    async with asyncio.timeout(CONNECT_S):
        return await asyncio.open_connection("127.0.0.1", port)


async def run(spec: LoadSpec) -> LoadResult:
    """Connect every client, announce the start on stdout, run, and summarise."""
    state = _Run(spec)
    streams = await asyncio.gather(*(_connect(spec.port) for _ in range(spec.clients)))
    started = time.monotonic()
    state.stop_at = started + spec.duration_s
    print(json.dumps({"started": started}), flush=True)
    tasks = [asyncio.create_task(state.client(stream)) for stream in streams]
    _, pending = await asyncio.wait(tasks, timeout=spec.deadline_s)
    for task in pending:
        task.cancel()
        state.outcomes["deadline"] += 1
    await asyncio.wait(tasks, timeout=CONNECT_S)
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            raise RuntimeError("a load client failed") from task.exception()
    return state.result(started, time.monotonic())


class LoadProcess:
    """A load run in its own interpreter; `started()` and `result()` wait with bounds."""

    def __init__(self, spec: LoadSpec, proc: asyncio.subprocess.Process) -> None:
        self.spec = spec
        self._proc = proc

    @classmethod
    async def start(cls, spec: LoadSpec, spec_path: Path) -> LoadProcess:
        """Write `spec` to `spec_path` and start the client process on it."""
        await anyio.Path(spec_path).write_text(json.dumps(asdict(spec)))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.loadclient",
            str(spec_path),
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
        """The summary, once the run is over (within its deadline and a margin)."""
        assert self._proc.stdout is not None
        with anyio.fail_after(self.spec.deadline_s + 2 * CONNECT_S + 30):
            out = await self._proc.stdout.read()
            status = await self._proc.wait()
        if status != 0:
            raise RuntimeError(f"load client failed ({status}): {await self._stderr()}")
        return LoadResult(**json.loads(out.decode().strip().splitlines()[-1]))

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


# -- the server seen from outside --------------------------------------------------------
def proc_status(pid: int) -> dict[str, int]:
    """`pid`'s memory figures in bytes (``VmRSS``, ``VmHWM``: peak RSS) and ``Threads``."""
    figures: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            figures[name] = int(value.split()[0]) * 1024
        elif name == "Threads":
            figures[name] = int(value)
    return figures


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    """The unlabelled samples of ``/metrics`` in Prometheus format (name -> value)."""
    response = await client.get("/metrics", params={"format": "prometheus"})
    response.raise_for_status()
    samples = {}
    for line in response.text.splitlines():
        name, _, value = line.partition(" ")
        if line and not line.startswith("#") and "{" not in name:
            samples[name] = float(value)
    return samples


class Backlog(NamedTuple):
    """The server's work at one moment (from the JSON ``/metrics``), over every model."""

    queued: int  # texts waiting
    in_flight: int  # texts in the batch running now
    embedded: int  # texts answered since the start

    @property
    def idle(self) -> bool:
        return self.queued == 0 and self.in_flight == 0


async def backlog(client: httpx.AsyncClient) -> Backlog:
    """What the server has queued, running and done."""
    response = await client.get("/metrics")
    response.raise_for_status()
    data = response.json()
    models = data["batching"]["models"].values()
    return Backlog(
        queued=sum(int(m["queue_depth"]) for m in models),
        in_flight=sum(int(m["in_flight"]) for m in models),
        embedded=int(data["total_embeddings"]),
    )


def mib(size: float) -> str:
    return f"{size / 2**20:.0f} MiB"


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
