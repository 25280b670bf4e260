"""MicroBatcher: coalescing, caps, order, cancellation, errors, backpressure, shutdown.

Batches are held at a `GatedRunner` gate instead of sleeping; each test is bounded in time.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import numpy as np
import pytest

from embedserve.engine.batcher import PROBE_TEXT, BatchPolicy, BatchRecord, MicroBatcher
from embedserve.errors import InferenceFailed, Overloaded, RequestTimeout, ShuttingDown
from tests.fakes import FakeBackend, FakeClock, GatedRunner, fake_vector

pytestmark = pytest.mark.anyio


@pytest.fixture
def backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def gate() -> GatedRunner:
    return GatedRunner()


async def inline(func: Callable[[], Any]) -> Any:
    """A `tokenize_sync` that runs on the loop: arrivals are tokenised in a known order."""
    return func()


@asynccontextmanager
async def running(
    backend: FakeBackend,
    gate: GatedRunner,
    tokenize_sync: Callable[[Callable[[], Any]], Awaitable[Any]] = inline,
    **policy: object,
) -> AsyncIterator[MicroBatcher]:
    batcher = MicroBatcher(
        backend, BatchPolicy(**policy), run_sync=gate, tokenize_sync=tokenize_sync
    )
    batcher.start()
    try:
        yield batcher
    finally:
        await batcher.aclose(0)


def spawn(batcher: MicroBatcher, *texts: str) -> asyncio.Future:
    return asyncio.ensure_future(batcher.submit(list(texts)))


async def settle() -> None:
    """Let every ready task run (no wall-clock time passes)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_idle_model_runs_a_lone_text_at_once(backend: FakeBackend, gate: GatedRunner):
    with anyio.fail_after(5):
        async with running(backend, gate) as batcher:
            first = spawn(batcher, "alone")
            await gate.wait_for_waiting(1)  # the batch started with no timer involved
            gate.release()
            result = await first
            assert backend.batches == [["alone"]]
            assert np.allclose(result.vectors[0], fake_vector("alone"))


async def test_requests_arriving_while_busy_coalesce(backend: FakeBackend, gate: GatedRunner):
    with anyio.fail_after(5):
        async with running(backend, gate) as batcher:
            first = spawn(batcher, "a")
            await gate.wait_for_waiting(1)
            others = [spawn(batcher, t) for t in ("b", "c", "d")]
            await settle()
            assert batcher.queued == 3
            gate.release(2)
            await asyncio.gather(first, *others)
            assert backend.batches == [["a"], ["b", "c", "d"]]
            assert batcher.stats.batches == 2
            assert batcher.stats.mean_batch_size == 2.0


async def test_max_texts_cap_splits_a_big_request(backend: FakeBackend, gate: GatedRunner):
    gate.open = True
    texts = [f"text number {i}" for i in range(10)]
    with anyio.fail_after(5):
        async with running(backend, gate, max_texts=4) as batcher:
            result = await batcher.submit(texts)
    assert [len(b) for b in backend.batches] == [4, 4, 2]
    for row, text in zip(result.vectors, texts, strict=True):
        assert np.allclose(row, fake_vector(text))


async def test_token_budget_keeps_long_texts_apart(backend: FakeBackend, gate: GatedRunner):
    long_text = " ".join(["word"] * 100)  # 102 tokens in the fake
    with anyio.fail_after(5):
        async with running(backend, gate, token_budget=150) as batcher:
            first = spawn(batcher, "warm")
            await gate.wait_for_waiting(1)
            tasks = [spawn(batcher, "short one"), spawn(batcher, long_text), spawn(batcher, "x y")]
            await settle()
            gate.release(3)
            await asyncio.gather(first, *tasks)
    assert backend.batches[1:] == [["short one", "x y"], [long_text]]


async def test_length_sorting_keeps_each_requests_order(backend: FakeBackend, gate: GatedRunner):
    gate.open = True
    texts = ["one two three four five six", "a", "b c d e f g h i j k l", "m n"]
    with anyio.fail_after(5):
        async with running(backend, gate, token_budget=20) as batcher:
            result = await batcher.submit(texts)
    assert len(backend.batches) > 1
    for row, text in zip(result.vectors, texts, strict=True):
        assert np.allclose(row, fake_vector(text))


async def test_duplicate_texts_are_computed_once(backend: FakeBackend, gate: GatedRunner):
    gate.open = True
    with anyio.fail_after(5):
        async with running(backend, gate) as batcher:
            result = await batcher.submit(["same", "same", "other", "same"])
    assert backend.batches == [["same", "other"]]
    assert np.allclose(result.vectors[3], fake_vector("same"))


async def test_cancelled_caller_is_dropped_before_inference(
    backend: FakeBackend, gate: GatedRunner
):
    with anyio.fail_after(5):
        async with running(backend, gate) as batcher:
            first = spawn(batcher, "a")
            await gate.wait_for_waiting(1)
            gone, kept = spawn(batcher, "gone"), spawn(batcher, "kept")
            await settle()
            gone.cancel()
            gate.release(2)
            await asyncio.gather(first, kept)
            assert gone.cancelled()
            assert backend.batches == [["a"], ["kept"]]
            assert batcher.stats.dropped_texts == 1
            assert batcher.queued == 0


async def test_backend_error_fails_only_its_batch(backend: FakeBackend, gate: GatedRunner):
    gate.open = True
    with anyio.fail_after(5):
        async with running(backend, gate) as batcher:
            backend.fail_next = RuntimeError("onnx exploded")
            with pytest.raises(InferenceFailed, match="fake/model"):
                await batcher.submit(["doomed"])
            result = await batcher.submit(["fine"])
    assert np.allclose(result.vectors[0], fake_vector("fine"))
    assert batcher.stats.failed_batches == 1


async def test_full_queue_refuses_at_once_with_retry_after(backend: FakeBackend, gate: GatedRunner):
    with anyio.fail_after(5):
        async with running(backend, gate, max_queue=2) as batcher:
            first = spawn(batcher, "busy")
            await gate.wait_for_waiting(1)
            queued = [spawn(batcher, "q1"), spawn(batcher, "q2")]
            await settle()
            with pytest.raises(Overloaded) as refused:
                await batcher.submit(["one too many"])
            assert int(refused.value.headers["Retry-After"]) >= 1
            gate.release(2)
            await asyncio.gather(first, *queued)


async def test_work_that_would_time_out_in_the_queue_is_refused_at_once(
    backend: FakeBackend, gate: GatedRunner
):
    """Admission by estimated wait: queued texts x recent seconds per text, vs the timeout."""
    clock = FakeClock()
    with anyio.fail_after(5):
        batcher = MicroBatcher(backend, BatchPolicy(), run_sync=gate, clock=clock)
        batcher.start()
        try:
            for text in ("first", "second"):
                done = spawn(batcher, text)
                await gate.wait_for_waiting(1)
                clock.advance(1.0)  # the model takes a second a text
                gate.release()
                await done
                clock.advance(60.0)  # idle: no part of the model's pace
            assert batcher.stats.recent_s_per_text == pytest.approx(1.0)

            running_now = spawn(batcher, "running")
            await gate.wait_for_waiting(1)
            queued = spawn(batcher, "queued")
            await settle()
            # One text running, one queued, one more: about 3 s.
            assert batcher.estimated_wait_s(1) == pytest.approx(3.0)
            with pytest.raises(Overloaded) as refused:
                await batcher.submit(["would time out"], timeout_s=2.5)
            assert refused.value.headers["Retry-After"] == "2"
            assert batcher.queued == 1, "the refused request left texts behind"
            admitted = asyncio.ensure_future(batcher.submit(["fits"], timeout_s=3.5))
            await settle()
            assert batcher.queued == 2
            gate.release(3)
            await asyncio.gather(running_now, queued, admitted)
            # Alone, a request is admitted whatever its timeout: it may still make it.
            gate.open = True
            await batcher.submit(["alone, slow"], timeout_s=0.5)
        finally:
            await batcher.aclose(0)


async def test_timeout_answers_and_drops_the_work(backend: FakeBackend, gate: GatedRunner):
    with anyio.fail_after(5):
        async with running(backend, gate) as batcher:
            first = spawn(batcher, "busy")
            await gate.wait_for_waiting(1)
            with pytest.raises(RequestTimeout):
                await batcher.submit(["late"], timeout_s=0.01)
            gate.release(2)
            await first
            await settle()
            assert batcher.queued == 0
            assert ["late"] not in backend.batches


async def test_batching_off_runs_one_text_per_inference(backend: FakeBackend, gate: GatedRunner):
    gate.open = True
    with anyio.fail_after(5):
        async with running(backend, gate, enabled=False) as batcher:
            await asyncio.gather(*(batcher.submit([t]) for t in "abc"))
    assert backend.batches == [["a"], ["b"], ["c"]]


async def test_shutdown_drains_accepted_work_and_refuses_new(
    backend: FakeBackend, gate: GatedRunner
):
    with anyio.fail_after(5):
        batcher = MicroBatcher(backend, BatchPolicy(), run_sync=gate)
        batcher.start()
        first = spawn(batcher, "a")
        await gate.wait_for_waiting(1)
        second = spawn(batcher, "b")
        await settle()
        closing = asyncio.ensure_future(batcher.aclose(grace_s=5))
        await settle()
        with pytest.raises(ShuttingDown):
            await batcher.submit(["refused"])
        gate.release(2)
        await asyncio.gather(first, second, closing)
        assert backend.batches == [["a"], ["b"]]


async def test_shutdown_past_grace_fails_leftovers_instead_of_stranding(
    backend: FakeBackend, gate: GatedRunner
):
    with anyio.fail_after(5):
        batcher = MicroBatcher(backend, BatchPolicy(), run_sync=gate)
        batcher.start()
        in_flight = spawn(batcher, "in flight")
        await gate.wait_for_waiting(1)
        waiting = spawn(batcher, "waiting")
        await settle()
        await batcher.aclose(grace_s=0.01)
        for task in (in_flight, waiting):
            with pytest.raises(ShuttingDown):
                await task


async def test_expire_answers_queued_work_but_lets_the_running_batch_finish(
    backend: FakeBackend, gate: GatedRunner
):
    with anyio.fail_after(5):
        async with running(backend, gate) as batcher:
            in_flight = spawn(batcher, "in flight")
            await gate.wait_for_waiting(1)
            queued = spawn(batcher, "queued")
            await settle()
            batcher.expire()
            with pytest.raises(ShuttingDown):
                await queued
            with pytest.raises(ShuttingDown):
                await batcher.submit(["late"])
            gate.release()
            assert np.allclose((await in_flight).vectors[0], fake_vector("in flight"))


async def test_long_texts_are_tokenised_off_the_loop_and_still_embedded(
    backend: FakeBackend, gate: GatedRunner
):
    gate.open = True
    long_text = "word " * 1000
    with anyio.fail_after(5):
        # The real worker thread here (the default `tokenize_sync`).
        async with running(backend, gate, anyio.to_thread.run_sync) as batcher:
            result = await batcher.submit([long_text, "short"])
    assert result.token_counts == [backend.max_tokens, 3]
    assert np.allclose(result.vectors[0], fake_vector(long_text))


async def test_an_idle_model_tokenises_on_the_loop_a_busy_one_arrivals_together_off_it(
    backend: FakeBackend, gate: GatedRunner
):
    hops = GatedRunner(open_=True)
    calls: list[int] = []

    async def counted(func: Callable[[], Any]) -> Any:
        calls.append(len(backend.tokenize_calls))
        return await hops(func)

    with anyio.fail_after(5):
        async with running(backend, gate, counted) as batcher:
            first = spawn(batcher, "alone")
            await gate.wait_for_waiting(1)
            assert (calls, backend.tokenize_calls) == ([], [["alone"]])  # no hop
            others = [spawn(batcher, "b"), spawn(batcher, "c", "e"), spawn(batcher, "f")]
            await settle()
            assert len(calls) == 1  # one hop for everything that arrived meanwhile
            assert backend.tokenize_calls[1:] == [["b", "c", "e", "f"]]
            gate.release(2)
            results = await asyncio.gather(first, *others)
    assert backend.batches == [["alone"], ["b", "c", "e", "f"]]
    assert [r.token_counts for r in results] == [[3], [3], [3, 3], [3]]


async def test_a_text_the_tokenizer_refuses_fails_only_its_request(
    backend: FakeBackend, gate: GatedRunner
):
    backend.refuse = {"refused"}
    with anyio.fail_after(5):
        async with running(backend, gate) as batcher:
            first = spawn(batcher, "a")
            await gate.wait_for_waiting(1)
            bad, good = spawn(batcher, "x", "refused"), spawn(batcher, "fine")
            await settle()
            gate.release(2)
            with pytest.raises(InferenceFailed, match="tokenising failed"):
                await bad
            await asyncio.gather(first, good)
            assert backend.batches == [["a"], ["fine"]]  # "x" went with its request
            assert batcher.queued == 0


async def test_callers_gone_while_their_texts_are_tokenised_are_dropped(
    backend: FakeBackend, gate: GatedRunner
):
    hops = GatedRunner()
    with anyio.fail_after(5):
        async with running(backend, gate, hops) as batcher:
            first = spawn(batcher, "a")
            await gate.wait_for_waiting(1)
            gone, kept = spawn(batcher, "gone", "too"), spawn(batcher, "kept")
            await hops.wait_for_waiting(1)
            assert batcher.queued == 3
            gone.cancel()
            await settle()
            assert batcher.queued == 1  # left the queue at once, mid-tokenising
            hops.release()
            gate.release(2)
            await asyncio.gather(first, kept)
            assert gone.cancelled()
            assert backend.batches == [["a"], ["kept"]]
            assert batcher.stats.dropped_texts == 2


async def closing_while_tokenising(
    backend: FakeBackend, gate: GatedRunner, hops: GatedRunner, grace_s: float
) -> tuple[asyncio.Future, asyncio.Future]:
    """A batcher with "b" held at the tokeniser, the batch before it done, and `aclose`
    started: (the caller of "b", the close)."""
    batcher = MicroBatcher(backend, BatchPolicy(), run_sync=gate, tokenize_sync=hops)
    batcher.start()
    first = spawn(batcher, "a")
    await gate.wait_for_waiting(1)
    second = spawn(batcher, "b")
    await hops.wait_for_waiting(1)
    gate.release()
    await first
    closing = asyncio.ensure_future(batcher.aclose(grace_s=grace_s))
    await settle()
    return second, closing


async def test_shutdown_drains_texts_still_being_tokenised(backend: FakeBackend, gate: GatedRunner):
    hops = GatedRunner()
    with anyio.fail_after(5):
        second, closing = await closing_while_tokenising(backend, gate, hops, grace_s=5)
        assert not closing.done()  # "b" is accepted work: the drain waits for it
        hops.release()
        gate.release()
        await asyncio.gather(second, closing)
        assert backend.batches == [["a"], ["b"]]


async def test_shutdown_past_grace_fails_texts_still_being_tokenised(
    backend: FakeBackend, gate: GatedRunner
):
    hops = GatedRunner()
    with anyio.fail_after(5):
        second, closing = await closing_while_tokenising(backend, gate, hops, grace_s=0)
        hops.release()  # the cancelled tokeniser gets its answer back only now
        await closing
        with pytest.raises(ShuttingDown):
            await second
        assert backend.batches == [["a"]]


async def test_failed_request_leaves_no_texts_behind_in_the_queue(
    backend: FakeBackend, gate: GatedRunner
):
    gate.open = True
    with anyio.fail_after(5):
        async with running(backend, gate, max_texts=1) as batcher:
            backend.fail_next = RuntimeError("boom")
            with pytest.raises(InferenceFailed):
                await batcher.submit(["first", "second"])
            await batcher.submit(["next"])
    assert backend.batches == [["first"], ["next"]]
    assert batcher.queued == 0


# -- isolating the texts a backend fails on ------------------------------------------
EIGHT = [f"t{i}" for i in range(8)]  # same length: the batch keeps this order, halves known


async def one_batch(
    batcher: MicroBatcher, backend: FakeBackend, gate: GatedRunner, *requests: list[str]
) -> list[asyncio.Future]:
    """Queue `requests` behind a running text so they form one batch; hold it at the gate."""
    warm = spawn(batcher, "warm")
    await gate.wait_for_waiting(1)
    tasks = [spawn(batcher, *texts) for texts in requests]
    await settle()
    gate.release()
    await warm
    await gate.wait_for_waiting(1)
    backend.batches.clear()
    return tasks


@pytest.mark.parametrize(
    ("poison", "calls", "probes"),
    [
        # One poison text in 8: 1 + 2 * log2(8) calls, and only it fails.
        ({"t2"}, 7, 0),
        # Both in one quarter: found like one; the two single texts need no probe.
        ({"t0", "t1"}, 7, 0),
        # In both halves of a quarter: one probe call, then both halves are searched.
        ({"t0", "t2"}, 10, 1),
        # In both halves of the batch: the same, from the top.
        ({"t1", "t6"}, 12, 1),
    ],
)
async def test_a_failing_batch_is_split_to_fail_only_the_texts_to_blame(
    backend: FakeBackend, gate: GatedRunner, poison: set[str], calls: int, probes: int
):
    clock = FakeClock()
    seen: list[BatchRecord] = []

    async def timed(func):  # each model call takes one (fake) second
        clock.advance(1.0)
        return await gate(func)

    batcher = MicroBatcher(
        backend, BatchPolicy(), run_sync=timed, clock=clock, on_batch=seen.append
    )
    batcher.start()
    try:
        with anyio.fail_after(5):
            tasks = await one_batch(batcher, backend, gate, *([t] for t in EIGHT))
            backend.poison = poison
            gate.open = True
            gate.release()
            results = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await batcher.aclose(0)
    # About 2 log2(n) calls for each poison text, and at most one probe.
    assert len(backend.batches) == calls <= 2 + 2 * len(poison) * math.ceil(math.log2(8))
    assert backend.batches[:3] == [EIGHT, EIGHT[:4], EIGHT[4:]]
    assert backend.batches.count([PROBE_TEXT]) == probes
    for text, result in zip(EIGHT, results, strict=True):
        if text in poison:  # only the texts to blame fail
            assert isinstance(result, InferenceFailed), (text, result)
        else:
            assert np.allclose(result.vectors[0], fake_vector(text)), text
    assert batcher.stats.failed_batches == 1
    # Recorded once, with the time of every call it took.
    assert batcher.stats.batches == 2
    assert seen[-1] == BatchRecord(8, 8 * 3, 8 * 3, float(calls))


async def test_a_backend_failing_every_call_costs_a_batch_three_more_calls(
    backend: FakeBackend, gate: GatedRunner
):
    with anyio.fail_after(5):
        async with running(backend, gate) as batcher:
            tasks = await one_batch(batcher, backend, gate, *([t] for t in EIGHT))
            backend.fail_always = MemoryError("out of memory")
            gate.open = True
            gate.release()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(r, InferenceFailed) for r in results), results
            # The batch, its halves, and the probe that tells the backend is broken.
            assert backend.batches == [EIGHT, EIGHT[:4], EIGHT[4:], [PROBE_TEXT]]
            with pytest.raises(InferenceFailed):
                await batcher.submit(["one", "two"])
            assert len(backend.batches) == 4 + 3  # two texts: no probe
            assert batcher.stats.failed_batches == 2


async def test_a_transient_failure_is_retried_in_halves_and_nothing_fails(
    backend: FakeBackend, gate: GatedRunner
):
    with anyio.fail_after(5):
        async with running(backend, gate) as batcher:
            tasks = await one_batch(batcher, backend, gate, *([t] for t in EIGHT))
            backend.fail_next = RuntimeError("once")
            gate.open = True
            gate.release()
            results = await asyncio.gather(*tasks)
    assert backend.batches == [EIGHT, EIGHT[:4], EIGHT[4:]]
    for text, result in zip(EIGHT, results, strict=True):
        assert np.allclose(result.vectors[0], fake_vector(text))
    assert batcher.stats.failed_batches == 0


async def test_a_request_fails_if_any_of_its_texts_failed(backend: FakeBackend, gate: GatedRunner):
    requests = [EIGHT[:2], EIGHT[2:5], EIGHT[5:]]
    with anyio.fail_after(5):
        async with running(backend, gate) as batcher:
            tasks = await one_batch(batcher, backend, gate, *requests)
            backend.poison = {"t3"}
            gate.open = True
            gate.release()
            first, second, third = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(second, InferenceFailed)
    for texts, result in ((requests[0], first), (requests[2], third)):
        assert result.vectors.shape == (len(texts), 8)
        for row, text in zip(result.vectors, texts, strict=True):
            assert np.allclose(row, fake_vector(text))
    assert batcher.queued == 0


async def test_shutdown_during_a_retry_fails_the_whole_batch_and_strands_nothing(
    backend: FakeBackend, gate: GatedRunner
):
    with anyio.fail_after(5):
        batcher = MicroBatcher(backend, BatchPolicy(max_texts=8), run_sync=gate)
        batcher.start()
        tasks = await one_batch(batcher, backend, gate, *([t] for t in EIGHT))
        queued = spawn(batcher, "queued")
        await settle()
        backend.poison = {"t5"}
        gate.release()  # the batch fails; its first half waits at the gate
        await settle()
        await gate.wait_for_waiting(1)
        assert backend.batches == [EIGHT]
        await batcher.aclose(grace_s=0)
        results = await asyncio.gather(*tasks, queued, return_exceptions=True)
    assert all(isinstance(r, ShuttingDown) for r in results), results
    assert backend.batches == [EIGHT]
    assert (batcher.queued, batcher.in_flight) == (0, 0)


# -- packed backends ---------------------------------------------------------------------


async def test_packed_backend_batches_any_mix_of_lengths_and_runs_the_admission_ids(
    gate: GatedRunner,
) -> None:
    backend = FakeBackend(packed=True, row_tokens=16)
    long_text = " ".join(["word"] * 13)  # 15 tokens: a row to itself nearly
    with anyio.fail_after(5):
        async with running(backend, gate, token_budget=32) as batcher:
            first = spawn(batcher, "warm")
            await gate.wait_for_waiting(1)
            others = [spawn(batcher, t) for t in (long_text, "a", "b b", long_text, "c")]
            await settle()
            gate.release(3)
            await asyncio.gather(first, *others)
    # Two rows of 16: the long text fills one, the short ones share the other; the second
    # long text (a duplicate) rides in the first one's segment. Nothing was padded to 15.
    assert backend.batches[1] == [long_text, "a", "b b", "c"]
    assert backend.tokens[1] == backend.tokenize([long_text, "a", "b b", "c"])
    # Each text was tokenised once, at admission (plus the one call above).
    assert backend.tokenized == 6 + 4
    assert batcher.stats.real_tokens == 3 + 15 + 3 + 4 + 3
    assert batcher.stats.slot_tokens == 3 + 2 * 15
    assert 0.7 < batcher.stats.mean_fill < 1


async def test_packed_plan_leaves_what_does_not_fit_for_the_next_batch(
    gate: GatedRunner,
) -> None:
    backend = FakeBackend(packed=True, row_tokens=10)
    with anyio.fail_after(5):
        async with running(backend, gate, token_budget=10) as batcher:
            first = spawn(batcher, "warm")
            await gate.wait_for_waiting(1)
            texts = ["a b c d e f", "g h i j k l", "m", "n"]  # 8, 8, 3, 3 tokens
            others = [spawn(batcher, t) for t in texts]
            await settle()
            gate.release(4)
            await asyncio.gather(first, *others)
    assert backend.batches[1:] == [["a b c d e f"], ["g h i j k l"], ["m", "n"]]


async def test_padded_backend_still_gets_texts_and_their_ids(gate: GatedRunner) -> None:
    backend = FakeBackend()
    with anyio.fail_after(5):
        async with running(backend, gate) as batcher:
            task = spawn(batcher, "x y")
            gate.release()
            await task
    assert backend.tokens == [backend.tokenize(["x y"])]


# -- the loop survives its own faults --------------------------------------------------


async def test_a_planning_fault_fails_one_request_and_the_loop_serves_on(
    backend: FakeBackend, gate: GatedRunner, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    import embedserve.engine.batcher as batcher_module

    real_plan = batcher_module.plan_batch
    faults = [RuntimeError("planner bug")]

    def flaky(*args: object) -> list[int]:
        if faults:
            raise faults.pop()
        return real_plan(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(batcher_module, "plan_batch", flaky)
    gate.open = True
    with anyio.fail_after(5):
        async with running(backend, gate) as batcher:
            first = spawn(batcher, "first")
            second = spawn(batcher, "second")
            results = await asyncio.gather(first, second, return_exceptions=True)
            assert isinstance(results[0], InferenceFailed)
            assert np.allclose(results[1].vectors[0], fake_vector("second"))
            after = await batcher.submit(["after"])
            assert np.allclose(after.vectors[0], fake_vector("after"))
            assert batcher.stats.failed_batches == 1
    assert "planner bug" in caplog.text


async def test_a_delivery_fault_fails_that_batch_only(
    backend: FakeBackend, gate: GatedRunner, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    with anyio.fail_after(5):
        async with running(backend, gate) as batcher:
            real_deliver = batcher._deliver
            calls = 0

            def broken_once(*args: object) -> None:
                nonlocal calls
                calls += 1
                if calls == 1:
                    raise ValueError("delivery bug")
                real_deliver(*args)  # type: ignore[arg-type]

            monkeypatch.setattr(batcher, "_deliver", broken_once)
            first = spawn(batcher, "one", "two")
            await gate.wait_for_waiting(1)
            gate.release()
            with pytest.raises(InferenceFailed):
                await first
            gate.open = True
            later = await batcher.submit(["later"])
            assert np.allclose(later.vectors[0], fake_vector("later"))
            assert batcher.queued == 0 and batcher.in_flight == 0
    assert "delivery bug" in caplog.text
