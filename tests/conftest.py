"""Shared fixtures: an in-process app over a fake loader, driven through httpx."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from embedserve.engine.registry import ModelRegistry
from embedserve.engine.wiring import policy_from
from embedserve.http.app import create_app
from embedserve.models.store import ModelStore
from embedserve.settings import Settings
from tests.fakes import FakeLoader, GatedRunner
from tests.reliability import Recorder, results_path
from tests.support import require_exported_model

CATALOGUE = frozenset({"fake/a", "fake/b", "fake/c", "BAAI/bge-small-en-v1.5"})

Serve = Callable[..., AbstractAsyncContextManager["Api"]]


@dataclass
class Api:
    """One running app: its client, and the registry and fake loader behind it."""

    app: Starlette
    client: httpx.AsyncClient
    registry: ModelRegistry
    loader: FakeLoader
    settings: Settings


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def exported_model() -> Path:
    """The imported default model's directory (skip, or fail under EMBEDSERVE_REQUIRE_MODEL)."""
    return require_exported_model()


@pytest.fixture
def serve(tmp_path: Path) -> Serve:
    """Start an app (lifespan included) from settings overrides; use as ``async with``.

    ``run_sync`` (a GatedRunner, say) is handed to the registry; it must be open while the
    lifespan loads the required models. Defaults: required model ``fake/a``, short grace.
    """

    @asynccontextmanager
    async def start(*, run_sync: GatedRunner | None = None, **overrides: Any) -> AsyncIterator[Api]:
        values: dict[str, Any] = {
            "models_dir": tmp_path / "models",
            "required_models": ["fake/a"],
            "shutdown_grace_s": 1.0,
        }
        values.update(overrides)
        settings = Settings.build(**values)
        loader = FakeLoader()
        registry = ModelRegistry(
            store=ModelStore(settings.models_dir),
            loader=loader,
            policy=policy_from(settings),
            catalogue=CATALOGUE,
            allowed=settings.allowed_models,
            required=settings.required_models,
            request_timeout_s=settings.request_timeout_s,
            run_sync=run_sync,
        )
        app = create_app(settings, registry)
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://test") as client,
        ):
            yield Api(app, client, registry, loader, settings)

    return start


@pytest.fixture
async def api(serve: Serve) -> AsyncIterator[Api]:
    """The app with default test settings."""
    async with serve() as running:
        yield running


def pytest_sessionstart(session: pytest.Session) -> None:
    """Start the reliability results afresh when asked (`make test` and `make
    test-reliability` ask, so the report holds one run's figures only)."""
    if os.environ.get("EMBEDSERVE_RELIABILITY_FRESH"):
        results_path().unlink(missing_ok=True)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that records reliability figures is part of the reliability suite (``-m
    reliability``, which `make test-reliability` runs), marked or not."""
    for item in items:
        if "reliability" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.reliability)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the item, so fixtures can see whether the test passed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def reliability(request: pytest.FixtureRequest) -> Iterator[Recorder]:
    """A recorder of reliability figures (tests/reliability.py); its rows are written with
    the test's outcome when the test ends."""
    recorder = Recorder(request.node.nodeid)
    yield recorder
    report = getattr(request.node, "report_call", None)
    recorder.flush(passed=bool(report is not None and report.passed))
