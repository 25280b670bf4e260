"""MicroBatcher's priority lanes: interactive texts first, bulk never starved, admission and
counts per lane. Batches are held at a `GatedRunner` gate; the clock is a `FakeClock`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from embedserve.engine.batcher import BULK, INTERACTIVE, BatchPolicy, Lane, MicroBatcher
from embedserve.errors import Overloaded
from tests.fakes import FakeBackend, FakeClock, GatedRunner

pytestmark = pytest.mark.anyio


async def inline(func: Callable[[], Any]) -> Any:
    return func()


@asynccontextmanager
async def running(
    backend: FakeBackend, gate: GatedRunner, clock: FakeClock | None = None, **policy: Any
) -> AsyncIterator[MicroBatcher]:
    batcher = MicroBatcher(
        backend,
        BatchPolicy(**policy),
        run_sync=gate,
        tokenize_sync=inline,
        clock=clock or FakeClock(),
    )
    batcher.start()
    try:
        yield batcher
    finally:
        await batcher.aclose(0)


def spawn(batcher: MicroBatcher, lane: Lane, *texts: str) -> asyncio.Future[Any]:
    return asyncio.ensure_future(batcher.submit(list(texts), lane=lane))


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def busy(batcher: MicroBatcher, gate: GatedRunner) -> asyncio.Future[Any]:
    """A first batch held at the gate, so that what is submitted next queues up."""
    first = spawn(batcher, BULK, "warm")
    await gate.wait_for_waiting(1)
    return first


BULK_TEXTS = [f"b{i} x" for i in range(8)]  # 4 tokens each in the fake


async def test_a_query_goes_ahead_of_queued_bulk_texts_packed() -> None:
    backend, gate = FakeBackend(packed=True, row_tokens=16), GatedRunner()
    with anyio.fail_after(5):
        async with running(backend, gate, token_budget=16) as batcher:
            first = await busy(batcher, gate)
            bulk = spawn(batcher, BULK, *BULK_TEXTS)
            await settle()
            query = spawn(batcher, INTERACTIVE, "query")  # 3 tokens, arrived last
            await settle()
            assert batcher.queued_by_lane() == {INTERACTIVE: 1, BULK: 8}
            gate.open = True
            gate.release(1)
            result = (await asyncio.gather(first, bulk, query))[2]
    # One row of 16: the query and the oldest bulk text (the two anchors), then bulk fills
    # the rest of the row in order of arrival. Without lanes the query would wait 2 batches.
    assert backend.batches[1] == ["b0 x", "b1 x", "b2 x", "query"]
    assert result.lane == INTERACTIVE
    assert batcher.stats.lane_texts == {INTERACTIVE: 1, BULK: 9}


async def test_a_query_goes_ahead_of_queued_bulk_texts_padded() -> None:
    backend, gate = FakeBackend(), GatedRunner()
    with anyio.fail_after(5):
        async with running(backend, gate, max_texts=2) as batcher:
            first = await busy(batcher, gate)
            bulk = spawn(batcher, BULK, *BULK_TEXTS[:4])
            query = spawn(batcher, INTERACTIVE, "query x")
            await settle()
            gate.open = True
            gate.release(1)
            await asyncio.gather(first, bulk, query)
    assert "query x" in backend.batches[1]


async def test_bulk_keeps_its_share_of_packed_batches_under_a_flood_of_queries() -> None:
    backend, gate = FakeBackend(packed=True, row_tokens=16), GatedRunner()
    with anyio.fail_after(5):
        async with running(backend, gate, token_budget=16, bulk_share=0.25) as batcher:
            first = await busy(batcher, gate)
            bulk = spawn(batcher, BULK, "bulk one", "bulk two")  # 4 tokens each
            queries = [spawn(batcher, INTERACTIVE, f"q{i} y") for i in range(12)]  # 4 tokens
            await settle()
            gate.open = True
            gate.release(1)
            await asyncio.gather(first, bulk, *queries)
    # Each batch: the oldest query and the oldest bulk text always, then queries while they
    # hold at most 12 of the 16 slots. So the bulk request is done in two batches, not after
    # the twelve queries, and queries still get most of each batch.
    second, third = backend.batches[1], backend.batches[2]
    assert "bulk one" in second and "bulk two" in third
    assert sum(t.startswith("q") for t in second) == 3


async def test_a_long_bulk_text_left_out_behind_queries_gets_its_turn() -> None:
    backend, gate = FakeBackend(packed=True, row_tokens=16), GatedRunner()
    long_text = " ".join(["long"] * 12)  # 14 tokens: never fits behind a query
    with anyio.fail_after(5):
        async with running(backend, gate, token_budget=16, bulk_share=0.25) as batcher:
            first = await busy(batcher, gate)
            bulk = spawn(batcher, BULK, long_text, "s1", "s2", "s3")  # 3 tokens each
            queries = [spawn(batcher, INTERACTIVE, f"q{i} y") for i in range(12)]  # 4 tokens
            await settle()
            gate.open = True
            gate.release(1)
            await asyncio.gather(first, bulk, *queries)
    # Three batches of queries leave the long text out (the short bulk texts fit behind
    # them); round(1 / 0.25) - 1 = 3 such batches in a row, then a batch anchored on it.
    assert long_text not in backend.batches[1] + backend.batches[2] + backend.batches[3]
    assert backend.batches[4][0] == long_text


async def test_padded_batches_turn_to_bulk_after_a_run_without_any() -> None:
    backend, gate = FakeBackend(), GatedRunner()
    with anyio.fail_after(5):
        async with running(backend, gate, enabled=False, bulk_share=0.25) as batcher:
            first = await busy(batcher, gate)
            bulk = spawn(batcher, BULK, "b0", "b1")
            queries = [spawn(batcher, INTERACTIVE, f"q{i}") for i in range(7)]
            await settle()
            gate.open = True
            gate.release(1)
            await asyncio.gather(first, bulk, *queries)
    # bulk_share 0.25: after round(1 / 0.25) - 1 = 3 batches without bulk, one of bulk.
    assert [b[0] for b in backend.batches[1:]] == [
        "q0", "q1", "q2", "b0", "q3", "q4", "q5", "b1", "q6",
    ]  # fmt: skip


async def test_each_lane_has_its_own_queue_limit_and_retry_after() -> None:
    backend, gate = FakeBackend(), GatedRunner()
    with anyio.fail_after(5):
        async with running(backend, gate, max_queue=4, max_queue_interactive=2) as batcher:
            first = await busy(batcher, gate)
            batcher.stats.recent_s_per_text = 1.0
            bulk = spawn(batcher, BULK, "a", "b", "c", "d")
            await settle()
            with pytest.raises(Overloaded) as refused_bulk:
                await batcher.submit(["e"], lane=BULK)
            # A full bulk lane does not refuse queries...
            queries = [spawn(batcher, INTERACTIVE, "q1"), spawn(batcher, INTERACTIVE, "q2")]
            await settle()
            assert batcher.queued_by_lane() == {INTERACTIVE: 2, BULK: 4}
            with pytest.raises(Overloaded) as refused_query:
                await batcher.submit(["q3"], lane=INTERACTIVE)
            gate.open = True
            gate.release(1)
            await asyncio.gather(first, bulk, *queries)
    # Retry-After: what is ahead in the lane plus the running batch, at 1 s a text. A query
    # waits only for queries (2 + 1); bulk for everything queued (6 + 1).
    assert refused_query.value.retry_after_s == 3
    assert refused_bulk.value.retry_after_s == 5  # refused before the queries came
    assert "interactive texts queued" in str(refused_query.value)


async def test_while_queries_come_batches_are_kept_short() -> None:
    backend, gate, clock = FakeBackend(packed=True, row_tokens=16), GatedRunner(), FakeClock()
    policy = {"token_budget": 32, "interactive_budget": 8, "interactive_window_s": 1.0}
    with anyio.fail_after(5):
        async with running(backend, gate, clock, **policy) as batcher:
            first = await busy(batcher, gate)
            query = spawn(batcher, INTERACTIVE, "q")  # 3 tokens
            bulk = spawn(batcher, BULK, *BULK_TEXTS)
            await settle()
            gate.release(1)  # the first batch; the second is planned while a query is recent
            await settle()
            await gate.wait_for_waiting(1)
            clock.advance(2.0)  # no query for longer than the window: the third is not
            gate.open = True
            gate.release(1)
            await asyncio.gather(first, query, bulk)
    # Within the window, at most 8 slots: the query and one bulk text. Then the full budget
    # again: two rows of 16 take the other seven.
    assert backend.batches[1] == ["q", "b0 x"]
    assert [len(b) for b in backend.batches[2:]] == [7]


async def test_a_query_is_not_tokenised_behind_bulk_texts() -> None:
    backend, gate = FakeBackend(), GatedRunner()
    hops = GatedRunner()
    batcher = MicroBatcher(backend, BatchPolicy(), run_sync=gate, tokenize_sync=hops)
    batcher.start()
    try:
        with anyio.fail_after(5):
            first = await busy(batcher, gate)
            bulk = spawn(batcher, BULK, *BULK_TEXTS)
            await hops.wait_for_waiting(1)  # the bulk texts are in the tokeniser, held
            query = spawn(batcher, INTERACTIVE, "query")
            await settle()
            # Tokenised on the loop at once, so it is ready before the bulk texts.
            assert backend.tokenize_calls[-1] == ["query"]
            gate.open = hops.open = True
            gate.release(1)
            hops.release(1)
            await asyncio.gather(first, bulk, query)
    finally:
        await batcher.aclose(0)
    assert "query" in backend.batches[1]
