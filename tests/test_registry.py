"""ModelRegistry: resolution rules, single-flight loads, LRU, TTL, failures, isolation.

Time is a `FakeClock`; loads and batches run in real worker threads, held back by
`threading.Event`s where a test needs something to be slow.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from embedserve.engine.batcher import BatchPolicy
from embedserve.engine.registry import ModelRegistry
from embedserve.errors import (
    InferenceFailed,
    InvalidModelName,
    ModelNotAllowed,
    ModelNotFound,
    ModelUnavailable,
    RequestTimeout,
    ShuttingDown,
)
from embedserve.models.store import Manifest, ModelStore
from tests.fakes import FakeClock, FakeLoader, GatedRunner

pytestmark = pytest.mark.anyio
CATALOGUE = frozenset({"org/a", "org/b", "org/c", "org/slow", "org/fast", "org/broken"})


@pytest.fixture
def loader() -> FakeLoader:
    return FakeLoader()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@asynccontextmanager
async def registry_for(
    tmp_path: Path, loader: FakeLoader, clock: FakeClock, **kwargs: object
) -> AsyncIterator[ModelRegistry]:
    options: dict[str, object] = {"catalogue": CATALOGUE, "max_models": 2, "ttl_s": 100.0}
    options.update(kwargs)
    registry = ModelRegistry(
        store=ModelStore(tmp_path),
        loader=loader,
        policy=BatchPolicy(),
        clock=clock,
        **options,  # type: ignore[arg-type]
    )
    try:
        with anyio.fail_after(10):
            yield registry
    finally:
        await registry.aclose(grace_s=1)


async def until(predicate: object) -> None:
    """Yield to the loop (and worker threads) until `predicate()` holds."""
    # Polling, because the awaited change happens in a worker thread; bounded by fail_after.
    while not predicate():  # type: ignore[operator]  # noqa: ASYNC110
        await asyncio.sleep(0.001)


async def test_concurrent_first_requests_share_one_load(tmp_path, loader, clock):
    loader.gates["org/a"] = gate = threading.Event()
    async with registry_for(tmp_path, loader, clock) as registry:
        waiters = [asyncio.ensure_future(registry.embed("org/a", [f"t{i}"])) for i in range(8)]
        await until(lambda: loader.calls)
        gate.set()
        await asyncio.gather(*waiters)
        assert loader.calls == ["org/a"]


async def test_one_waiter_giving_up_does_not_cancel_the_shared_load(tmp_path, loader, clock):
    loader.gates["org/a"] = gate = threading.Event()
    async with registry_for(tmp_path, loader, clock) as registry:
        impatient = asyncio.ensure_future(registry.embed("org/a", ["x"]))
        patient = asyncio.ensure_future(registry.embed("org/a", ["y"]))
        await until(lambda: loader.calls)
        impatient.cancel()
        gate.set()
        await patient
        assert loader.calls == ["org/a"]


async def test_slow_load_does_not_delay_another_model(tmp_path, loader, clock):
    loader.gates["org/slow"] = gate = threading.Event()
    async with registry_for(tmp_path, loader, clock) as registry:
        slow = asyncio.ensure_future(registry.embed("org/slow", ["x"]))
        await until(lambda: "org/slow" in loader.calls)
        result = await registry.embed("org/fast", ["y"])  # completes while slow is held
        assert result.vectors.shape == (1, 8)
        assert not slow.done()
        gate.set()
        await slow


async def test_a_load_needs_none_of_the_inference_threads(tmp_path, loader, clock):
    # THREAD_POOL_WORKERS bounds `run_sync`; loads and warm-ups must not queue behind it.
    pool = GatedRunner()  # every inference thread busy until released
    async with registry_for(tmp_path, loader, clock, run_sync=pool) as registry:
        held = asyncio.ensure_future(registry.embed("org/a", ["held"]))
        await pool.wait_for_waiting(1)
        async with registry.lease("org/b"):
            assert registry.loaded_names() == ["org/a", "org/b"]
            assert pool.waiting == 1 and not held.done()
        pool.release(1)
        assert (await held).vectors.shape[0] == 1


async def test_tokenising_off_the_loop_uses_the_inference_threads(tmp_path, loader, clock):
    # THREAD_POOL_WORKERS bounds every thread hop of a request: the tokeniser's too.
    pool = GatedRunner(open_=True)
    hops = 0

    async def counted(func):
        nonlocal hops
        hops += 1
        return await pool(func)

    async with registry_for(
        tmp_path, loader, clock, run_sync=counted, tokenize_sync=counted
    ) as registry:
        await registry.embed("org/a", ["warm"])
        before = hops
        await registry.embed("org/a", ["word " * 1000])  # too long to tokenise on the loop
        assert hops - before == 2  # tokenising, then the batch


async def test_lru_evicts_the_least_recently_used(tmp_path, loader, clock):
    async with registry_for(tmp_path, loader, clock) as registry:
        await registry.embed("org/a", ["1"])
        clock.advance(1)
        await registry.embed("org/b", ["2"])
        clock.advance(1)
        await registry.embed("org/a", ["3"])  # a is now more recent than b
        clock.advance(1)
        await registry.embed("org/c", ["4"])
        await registry.wait_released()
        assert sorted(registry.loaded_names()) == ["org/a", "org/c"]
        assert loader.backends["org/b"].closed
        assert registry.evictions == 1


async def test_busy_model_is_evicted_only_after_it_drains(tmp_path, loader, clock):
    async with registry_for(tmp_path, loader, clock, max_models=1) as registry:
        await registry.embed("org/a", ["warm"])
        hold = loader.backends["org/a"].hold = threading.Event()
        busy = asyncio.ensure_future(registry.embed("org/a", ["in flight"]))
        await until(lambda: registry.describe("org/a").in_flight == 1)
        clock.advance(1)
        await registry.embed("org/b", ["new"])
        assert sorted(registry.loaded_names()) == ["org/a", "org/b"]  # over capacity, a busy
        hold.set()
        await busy
        await registry.wait_released()
        assert registry.loaded_names() == ["org/b"]
        assert loader.backends["org/a"].closed


async def test_ttl_offloads_unused_models_and_use_refreshes(tmp_path, loader, clock):
    async with registry_for(tmp_path, loader, clock) as registry:
        await registry.embed("org/a", ["x"])
        clock.advance(99)
        assert registry.sweep() == []
        await registry.embed("org/a", ["refresh"])
        clock.advance(99)
        assert registry.sweep() == []
        clock.advance(2)
        assert registry.sweep() == ["org/a"]
        await registry.wait_released()
        assert registry.loaded_names() == []
        assert loader.backends["org/a"].closed
        assert registry.offloads == 1


async def test_required_models_are_pinned(tmp_path, loader, clock):
    async with registry_for(tmp_path, loader, clock, required=["org/a"], max_models=1) as registry:
        await registry.start()
        clock.advance(1000)
        assert registry.sweep() == []
        await registry.embed("org/b", ["x"])
        await registry.wait_released()
        assert "org/a" in registry.loaded_names()
        assert registry.ready


async def test_failed_load_evicts_nothing_and_is_remembered(tmp_path, loader, clock):
    loader.fail["org/broken"] = RuntimeError("corrupt model.onnx")
    async with registry_for(tmp_path, loader, clock, max_models=1, load_retry_s=30) as registry:
        await registry.embed("org/a", ["x"])
        with pytest.raises(ModelUnavailable, match="org/broken"):
            await registry.embed("org/broken", ["x"])
        with pytest.raises(ModelUnavailable):
            await registry.embed("org/broken", ["x"])
        assert loader.calls.count("org/broken") == 1  # the second refusal came from memory
        assert registry.loaded_names() == ["org/a"]
        assert not loader.backends["org/a"].closed
        clock.advance(31)
        with pytest.raises(ModelUnavailable):
            await registry.embed("org/broken", ["x"])
        assert loader.calls.count("org/broken") == 2


async def test_required_model_that_fails_stops_startup(tmp_path, loader, clock):
    loader.fail["org/broken"] = RuntimeError("no such file")
    async with registry_for(tmp_path, loader, clock, required=["org/broken"]) as registry:
        with pytest.raises(ModelUnavailable, match="required model org/broken"):
            await registry.start()


@pytest.mark.parametrize(
    "name", ["../etc/passwd", "/etc/passwd", "org/../../x", "a\x00b", "%2e%2e/x", "a\\b", ""]
)
async def test_unsafe_names_are_refused_before_anything_loads(tmp_path, loader, clock, name):
    async with registry_for(tmp_path, loader, clock) as registry:
        with pytest.raises(InvalidModelName):
            await registry.embed(name, ["x"])
        assert loader.calls == []


async def test_allow_list_refuses_before_loading(tmp_path, loader, clock):
    async with registry_for(tmp_path, loader, clock, allowed=["org/a"]) as registry:
        with pytest.raises(ModelNotAllowed):
            await registry.embed("org/b", ["x"])
        with pytest.raises(ModelNotAllowed):
            registry.describe("org/b")
        assert loader.calls == []


async def test_unknown_model_is_not_found(tmp_path, loader, clock):
    async with registry_for(tmp_path, loader, clock) as registry:
        with pytest.raises(ModelNotFound, match="embedserve models import"):
            await registry.embed("org/unknown", ["x"])


async def test_local_model_directory_wins_over_the_catalogue(tmp_path, loader, clock):
    store = ModelStore(tmp_path)
    directory = store.model_dir("org/a")
    directory.mkdir(parents=True)
    store.write_manifest(directory, Manifest("org/a", 8, "mean", True, 256, "test", "00"))
    async with registry_for(tmp_path, loader, clock) as registry:
        spec = registry.resolve("org/a")
        assert spec.source == "local"
        assert spec.directory == directory


async def test_the_sweeper_reads_the_models_directory_again(tmp_path, loader, clock):
    store = ModelStore(tmp_path)
    async with registry_for(tmp_path, loader, clock, cleanup_interval_s=0.001) as registry:
        await registry.start()
        assert registry.local_models() == []
        directory = store.model_dir("org/new")
        directory.mkdir(parents=True)
        store.write_manifest(directory, Manifest("org/new", 8, "mean", True, 256, "test", "00"))
        await until(lambda: registry.local_models() == ["org/new"])
        store.remove("org/new")
        await until(lambda: registry.local_models() == [])


async def test_a_failed_listing_keeps_the_last_one(tmp_path, loader, clock):
    store = ModelStore(tmp_path / "models")
    directory = store.model_dir("org/a")
    directory.mkdir(parents=True)
    store.write_manifest(directory, Manifest("org/a", 8, "mean", True, 256, "test", "00"))
    async with registry_for(tmp_path / "models", loader, clock) as registry:
        await registry.refresh_local_models()

        def unreadable() -> list[Manifest]:
            raise PermissionError(13, "Permission denied")

        registry.store.list = unreadable  # type: ignore[method-assign]
        await registry.refresh_local_models()
        assert registry.local_models() == ["org/a"]


async def test_shutdown_refuses_new_arrivals_but_serves_earlier_ones(tmp_path, loader, clock):
    async with registry_for(tmp_path, loader, clock) as registry:
        await registry.embed("org/a", ["warm"])
        arrived_before = time.monotonic()
        registry.begin_shutdown()
        result = await registry.embed("org/a", ["old"], arrived_at=arrived_before)
        assert result.vectors.shape == (1, 8)
        with pytest.raises(ShuttingDown):
            await registry.embed("org/a", ["new"], arrived_at=time.monotonic())
        with pytest.raises(ShuttingDown):
            await registry.embed("org/a", ["unknown arrival"])
        assert not registry.ready


async def test_expiry_answers_queued_work_before_the_grace_runs_out(tmp_path, loader, clock):
    async with registry_for(tmp_path, loader, clock) as registry:
        await registry.embed("org/a", ["warm"])
        hold = loader.backends["org/a"].hold = threading.Event()
        running = asyncio.ensure_future(registry.embed("org/a", ["running"]))
        await until(lambda: registry.describe("org/a").in_flight == 1)
        queued = asyncio.ensure_future(registry.embed("org/a", ["queued"]))
        await until(lambda: registry.describe("org/a").queued == 1)
        registry.expire_queued_after(0)
        with pytest.raises(ShuttingDown):
            await queued
        hold.set()
        await running


async def test_aclose_gives_the_batchers_only_what_is_left_of_the_deadline(tmp_path, loader, clock):
    """The grace counts from `begin_shutdown` (the signal): with the deadline past, a batch
    still held fails at once instead of getting a fresh grace period."""
    runner = GatedRunner()
    async with registry_for(tmp_path, loader, clock, run_sync=runner) as registry:
        running = asyncio.ensure_future(registry.embed("org/a", ["held"]))
        await runner.wait_for_waiting(1)
        registry.begin_shutdown(grace_s=30)
        clock.advance(30)
        assert registry.shutdown_remaining_s() == 0
        with anyio.fail_after(5):  # a fresh 30 s grace would outlast this
            await registry.aclose(grace_s=30)
        with pytest.raises(ShuttingDown):
            await running


async def test_aclose_before_the_deadline_lets_the_running_batch_finish(tmp_path, loader, clock):
    runner = GatedRunner()
    async with registry_for(tmp_path, loader, clock, run_sync=runner) as registry:
        running = asyncio.ensure_future(registry.embed("org/a", ["held"]))
        await runner.wait_for_waiting(1)
        registry.begin_shutdown(grace_s=30)
        clock.advance(10)
        assert registry.shutdown_remaining_s() == 20
        closing = asyncio.ensure_future(registry.aclose(grace_s=30))
        await asyncio.sleep(0)
        assert not closing.done()
        runner.release()
        assert (await running).vectors.shape == (1, 8)
        await closing
        assert loader.backends["org/a"].closed


async def test_waiting_for_a_stuck_load_ends_at_the_request_timeout(tmp_path, loader, clock):
    loader.gates["org/slow"] = gate = threading.Event()
    async with registry_for(tmp_path, loader, clock, request_timeout_s=0.05) as registry:
        with pytest.raises(RequestTimeout, match="org/slow"):
            await registry.embed("org/slow", ["x"])
        gate.set()  # the load itself went on, and serves the next request
        result = await registry.embed("org/slow", ["y"])
        assert result.vectors.shape == (1, 8)
        assert loader.calls == ["org/slow"]


async def test_failed_warm_up_is_a_failed_load_that_evicts_nothing(tmp_path, loader, clock):
    # Damaged weights load fine and give NaN rows, which the real backend turns into an
    # error on the warm-up text; that must count as a failed load.
    def load(spec):
        backend = loader(spec)
        if spec.name == "org/broken":
            backend.fail_next = RuntimeError("non-finite embeddings")
        return backend

    async with registry_for(tmp_path, load, clock, max_models=1) as registry:
        await registry.embed("org/a", ["x"])
        with pytest.raises(ModelUnavailable, match="org/broken failed to load: its warm-up"):
            await registry.embed("org/broken", ["x"])
        assert registry.loaded_names() == ["org/a"]
        assert registry.evictions == 0
        assert loader.backends["org/broken"].closed
        assert (await registry.embed("org/a", ["still serving"])).vectors.shape == (1, 8)


async def test_callers_gone_while_queued_or_running_leave_nothing_behind(tmp_path, loader, clock):
    async with registry_for(tmp_path, loader, clock, max_models=1) as registry:
        await registry.embed("org/a", ["warm"])
        tasks_before = len(asyncio.all_tasks())
        hold = loader.backends["org/a"].hold = threading.Event()
        running = asyncio.ensure_future(registry.embed("org/a", ["running"]))
        await until(lambda: registry.describe("org/a").in_flight == 1)
        queued = [
            asyncio.ensure_future(registry.embed("org/a", [f"queued {n}", f"also {n}"]))
            for n in range(50)
        ]
        await until(lambda: registry.describe("org/a").queued == 100)
        for caller in [running, *queued]:
            caller.cancel()
        await asyncio.gather(running, *queued, return_exceptions=True)
        info = registry.describe("org/a")
        assert (info.queued, info.in_flight) == (0, 1)  # the queue emptied at once
        hold.set()
        await until(lambda: registry.describe("org/a").in_flight == 0)
        assert registry.describe("org/a").stats["dropped_texts"] == 100
        assert len(asyncio.all_tasks()) == tasks_before
        # No lease leaked: the model is idle, so a new model evicts it at once.
        clock.advance(1)
        await registry.embed("org/b", ["next"])
        await registry.wait_released()
        assert registry.loaded_names() == ["org/b"]
        assert loader.backends["org/a"].closed


async def test_a_model_loaded_after_the_expiry_takes_no_work(tmp_path, loader, clock):
    loader.gates["org/slow"] = gate = threading.Event()
    async with registry_for(tmp_path, loader, clock) as registry:
        arrived = time.monotonic()  # both requests arrived before the signal
        waiting = asyncio.ensure_future(registry.embed("org/slow", ["x"], arrived_at=arrived))
        await until(lambda: loader.calls)
        registry.expire_queued_after(0)
        await until(lambda: registry._expiry is not None and registry._expiry.done())
        with pytest.raises(ShuttingDown):  # a new load is not even started
            await registry.embed("org/a", ["y"], arrived_at=arrived)
        gate.set()
        with pytest.raises(ShuttingDown):  # the load finished, but its batcher takes nothing
            await waiting
        assert loader.calls == ["org/slow"]


async def test_a_model_left_over_capacity_by_a_departed_client_goes_at_the_next_sweep(
    tmp_path, loader, clock
):
    async with registry_for(tmp_path, loader, clock, max_models=1) as registry:
        await registry.embed("org/a", ["warm"])
        hold = loader.backends["org/a"].hold = threading.Event()
        gone = asyncio.ensure_future(registry.embed("org/a", ["in flight"]))
        await until(lambda: registry.describe("org/a").in_flight == 1)
        gone.cancel()  # its lease ends while its batch still runs
        clock.advance(1)
        await registry.embed("org/b", ["new"])  # over capacity: org/a is busy, so it stays
        hold.set()
        await until(lambda: registry.describe("org/a").in_flight == 0)
        assert sorted(registry.loaded_names()) == ["org/a", "org/b"]
        registry.sweep()
        await registry.wait_released()
        assert registry.loaded_names() == ["org/b"]
        assert registry.evictions == 1


# -- token-level work (TEI's /embed_all, /tokenize, /decode) ------------------------------
async def test_token_level_methods_run_on_the_named_model(tmp_path, loader, clock):
    async with registry_for(tmp_path, loader, clock) as registry:
        details = await registry.token_details("org/a", ["hi there"], add_special_tokens=False)
        decoded = await registry.decode("org/a", [[0, 12, 1]], skip_special_tokens=True)
        vectors = await registry.token_vectors("org/a", ["hi there"])
    assert [[t.text for t in tokens] for tokens in details] == [["hi", "there"]]
    assert decoded == ["t12"]
    assert [v.shape for v in vectors] == [(4, loader.backends["org/a"].dimension)]
    assert loader.calls == ["org/a"]  # one load served all three


async def test_token_level_model_error_is_inference_failed(tmp_path, loader, clock):
    async with registry_for(tmp_path, loader, clock) as registry:
        await registry.decode("org/a", [[1]], skip_special_tokens=True)
        loader.backends["org/a"].refuse.add("boom")
        with pytest.raises(InferenceFailed, match="org/a"):
            await registry.token_vectors("org/a", ["boom"])
        # The lease ended with the failure: the model can still be evicted.
        clock.advance(1)
        await registry.decode("org/b", [[1]], skip_special_tokens=True)
        clock.advance(1)
        await registry.decode("org/c", [[1]], skip_special_tokens=True)
        assert registry.loaded_names() == ["org/b", "org/c"]


def test_the_wiring_gives_tokenising_the_inference_threads(tmp_path: Path) -> None:
    from embedserve.engine.wiring import build_registry
    from embedserve.settings import Settings

    registry = build_registry(Settings.build(models_dir=tmp_path, required_models=[]))
    assert registry._tokenize_sync is registry._run_sync  # one THREAD_POOL_WORKERS limiter
