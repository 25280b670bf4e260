"""server.py: the stop is bounded by one deadline, SHUTDOWN_GRACE_S from the signal.

The real uvicorn server runs in-process on a loopback port over the fake model; a
`GatedRunner` holds batches, so the model is as slow as a test needs, without sleeping.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest

from embedserve.engine.registry import ModelRegistry
from embedserve.engine.wiring import policy_from
from embedserve.http.app import create_app
from embedserve.models.store import ModelStore
from embedserve.server import _Server, uvicorn_config
from embedserve.settings import Settings
from tests.conftest import CATALOGUE
from tests.fakes import FakeLoader, GatedRunner

pytestmark = pytest.mark.anyio

GRACE_S = 1.0
# What the stop may take past the deadline: the 50 ms poll for finished requests, the
# cancellations, releasing the fake model, and a busy test machine's scheduling.
MARGIN_S = 0.5


@asynccontextmanager
async def running_server(
    tmp_path: Path, runner: GatedRunner, grace_s: float
) -> AsyncIterator[tuple[_Server, asyncio.Future[None], httpx.AsyncClient]]:
    """The server on a free loopback port: (server, its serve task, a client for it)."""
    settings = Settings.build(
        models_dir=tmp_path / "models",
        required_models=["fake/a"],
        shutdown_grace_s=grace_s,
        host="127.0.0.1",
        body_timeout_s=60.0,  # a slow upload outlasts the grace
    )
    registry = ModelRegistry(
        store=ModelStore(settings.models_dir),
        loader=FakeLoader(),
        policy=policy_from(settings),
        catalogue=CATALOGUE,
        required=settings.required_models,
        run_sync=runner,
    )
    config = uvicorn_config(settings, create_app(settings, registry))
    config.port = 0  # the system picks a free one
    server = _Server(config, registry, settings.shutdown_grace_s)
    serving = asyncio.ensure_future(server._serve())
    try:
        with anyio.fail_after(10):
            while not server.started:  # uvicorn has no event for it  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield server, serving, client
    finally:
        server.should_exit = True
        with anyio.fail_after(grace_s * 4 + 10):
            await serving


async def until(predicate: object) -> None:
    """Yield to the loop until `predicate()` holds (callers bound it with fail_after)."""
    while not predicate():  # type: ignore[operator]  # noqa: ASYNC110
        await asyncio.sleep(0.005)


async def test_slow_connections_and_a_slow_model_share_one_grace_period(tmp_path: Path) -> None:
    """A batch the model never finishes, a request queued behind it and an upload that
    never completes: the server still stops within the grace period, not twice it."""
    runner = GatedRunner(open_=True)  # open while the lifespan warms the model up
    async with running_server(tmp_path, runner, GRACE_S) as (server, serving, client):
        runner.open = False
        with anyio.fail_after(10):
            held = asyncio.ensure_future(client.post("/embed", json={"text": "held"}))
            await runner.wait_for_waiting(1)
            queued = asyncio.ensure_future(client.post("/embed", json={"text": "queued"}))
            registry = server._registry
            await until(lambda: registry.describe("fake/a").queued == 1)
            _, upload = await asyncio.open_connection("127.0.0.1", client.base_url.port)
            upload.write(
                b"POST /embed HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100\r\n\r\n{"
            )
            await until(lambda: len(server.server_state.tasks) == 3)

        loop = asyncio.get_running_loop()
        signalled = loop.time()
        server.handle_exit(signal.SIGTERM, None)
        with anyio.fail_after(GRACE_S * 4 + 10):
            await serving
        stopped_s = loop.time() - signalled
        upload.close()

        assert stopped_s <= GRACE_S + MARGIN_S, f"stopped {stopped_s:.2f}s after the signal"
        answer = await queued
        assert answer.status_code == 503, answer.text
        assert answer.json()["error_type"] == "shutting_down"
        # Still in the model at the deadline: cancelled, answered, not left hanging.
        assert (await held).status_code == 500
        assert runner.waiting == 0


async def test_work_that_finishes_within_the_grace_is_served_and_the_stop_ends_early(
    tmp_path: Path,
) -> None:
    runner = GatedRunner(open_=True)
    grace_s = 30.0  # far more than the test takes: the stop must not wait it out
    async with running_server(tmp_path, runner, grace_s) as (server, serving, client):
        runner.open = False
        with anyio.fail_after(10):
            held = asyncio.ensure_future(client.post("/embed", json={"text": "held"}))
            await runner.wait_for_waiting(1)
            server.handle_exit(signal.SIGTERM, None)
            runner.release()
            answer = await held
            await serving

        assert answer.status_code == 200, answer.text
        assert len(answer.json()["embedding"]) == 8
        assert server._registry.shutdown_remaining_s() > grace_s - 10
