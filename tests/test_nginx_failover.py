"""config/nginx.conf in front of three real replicas: traffic is spread, and a replica killed
with SIGKILL mid-run costs clients no failed request (nginx re-sends to another replica).

Figures (requests, rates before and after the kill, retries) are printed; run with ``-s``.
Speeds are reported, never asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from devkit.launcher import ServerProcess, free_port, running_server
from tests import nginxutil
from tests.support import uniform_texts

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

REPLICAS = 3
CLIENTS = 32
KILL_AT_S = 4.0
RUN_S = 10.0
REPLICA_ENV = {
    "SHUTDOWN_GRACE_S": "2",
    "ORT_THREADS": "1",  # three replicas and the clients share two cores
    "THREAD_POOL_WORKERS": "2",
    "ACCESS_LOG": "false",
    "LOG_LEVEL": "WARNING",
}
HTTP_TIMEOUT = httpx.Timeout(30.0, connect=5.0)


@dataclass
class Outcome:
    """What the clients saw: completion times of successes, and every failure."""

    ok_at: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


async def total_requests(client: httpx.AsyncClient, server: ServerProcess) -> int:
    """The replica's own count of requests (JSON /metrics), asked directly, not via nginx."""
    response = await client.get(f"{server.base_url}/metrics")
    response.raise_for_status()
    count: int = response.json()["total_requests"]
    return count


async def unanswered(client: httpx.AsyncClient, server: ServerProcess) -> int:
    """Requests the replica has taken and not yet answered (queued + running texts)."""
    response = await client.get(f"{server.base_url}/metrics")
    response.raise_for_status()
    models = response.json()["batching"]["models"].values()
    return sum(int(m["queue_depth"]) + int(m["in_flight"]) for m in models)


async def drive(client: httpx.AsyncClient, texts: list[str], start: float, out: Outcome) -> None:
    """One client: POST /embed back to back until RUN_S after `start`."""
    index = 0
    while time.monotonic() - start < RUN_S:
        text = texts[index % len(texts)]
        index += 1
        try:
            response = await client.post("/embed", json={"text": text})
        except httpx.HTTPError as exc:
            out.failures.append(f"{type(exc).__name__}: {exc}")
            continue
        if response.status_code == 200 and len(response.json()["embedding"]) > 0:
            out.ok_at.append(time.monotonic() - start)
        else:
            out.failures.append(f"{response.status_code}: {response.text[:200]}")


def retried(access_log: Path) -> int:
    """Requests nginx passed to more than one replica (``upstream_status=502, 200``)."""
    text = access_log.read_text(errors="replace") if access_log.exists() else ""
    return len(re.findall(r"upstream_status=\S+, ", text))


async def test_traffic_survives_a_killed_replica(exported_model: Path, tmp_path: Path) -> None:
    binary = nginxutil.nginx_binary()
    if binary is None:
        pytest.skip("nginx is not installed (`make test` installs Debian's nginx)")
    texts = uniform_texts(256, seed=7, min_words=4, max_words=24)
    prefix = tmp_path / "nginx"
    with contextlib.ExitStack() as stack:
        replicas = [
            stack.enter_context(running_server(REPLICA_ENV, log_dir=tmp_path))
            for _ in range(REPLICAS)
        ]
        port = free_port()
        upstreams = [f"127.0.0.1:{replica.port}" for replica in replicas]
        stack.enter_context(nginxutil.running_nginx(binary, upstreams, port, prefix))
        limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
        async with (
            httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", timeout=HTTP_TIMEOUT, limits=limits
            ) as client,
            httpx.AsyncClient(timeout=HTTP_TIMEOUT) as direct,
        ):
            before = [await total_requests(direct, replica) for replica in replicas]
            out = Outcome()
            start = time.monotonic()
            tasks = [asyncio.create_task(drive(client, texts, start, out)) for _ in range(CLIENTS)]
            await asyncio.sleep(KILL_AT_S)
            mid = [await total_requests(direct, replica) for replica in replicas]
            victim, survivors = replicas[0], replicas[1:]
            in_flight = await unanswered(direct, victim)
            victim.send_signal(signal.SIGKILL)
            killed_at = time.monotonic() - start
            assert victim.wait(5.0) == -signal.SIGKILL
            await asyncio.wait_for(asyncio.gather(*tasks), timeout=RUN_S + 40.0)
            elapsed = time.monotonic() - start
            after = [await total_requests(direct, r) for r in survivors]
    served = [m - b for m, b in zip(mid, before, strict=True)]
    served_after = [a - m for a, m in zip(after, mid[1:], strict=True)]

    log = nginxutil.error_log(prefix)
    before_kill = sum(1 for t in out.ok_at if t < killed_at)
    after_kill = len(out.ok_at) - before_kill
    retries = retried(prefix / "logs" / "access.log")
    print(
        f"\nnginx failover: {REPLICAS} replicas, {CLIENTS} clients, {elapsed:.1f}s; "
        f"served per replica before the kill {served}; "
        f"{before_kill} ok before the kill at {killed_at:.1f}s "
        f"({before_kill / killed_at:.0f} req/s), {after_kill} ok after "
        f"({after_kill / (elapsed - killed_at):.0f} req/s); failed {len(out.failures)}; "
        f"retried by nginx {retries}; served per survivor after the kill {served_after}; "
        f"in flight on the victim at the kill {in_flight}"
    )
    assert all(count > 0 for count in served), f"a replica got no traffic: {served}"
    # nginx re-sends a request whose replica died before answering; one it cannot re-send
    # (the replica had started its answer) may fail, but never more than were in flight.
    # One more is allowed for a request that reached the victim between the count and the kill.
    assert len(out.failures) <= in_flight + 1, (
        f"{len(out.failures)} failed with {in_flight} in flight, e.g. {out.failures[:5]}\n{log}"
    )
    # What a request nginx could not re-send looks like: a 502, or an answer cut off
    # because the replica died after its headers were already passed on.
    assert all(f.startswith(("502", "RemoteProtocolError")) for f in out.failures), out.failures
    assert after_kill > 0, "no request completed after the kill"
    assert all(count > 0 for count in served_after), f"a survivor idled: {served_after}"
    assert retries > 0 or "connect() failed" in log, "the kill went unnoticed by nginx"
