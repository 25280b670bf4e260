"""`MicroBatcher`: one per loaded model; owns that model's queue and the loop that runs it.

Request handlers only ``await batcher.submit(texts)``. Everything else here (the queue, the
futures, the backend) belongs to the batcher and its loop task.

One module because admission (per priority lane), the tokeniser task, the loop, the loop's
fault guard, failure isolation and delivery all move the same queued items and resolve or
fail the same futures: kept in one class, the rule "every future ends exactly once" can be
checked in one place. Batch planning (which texts, in which lane's order) lives in
`planner.py` and running a packed model in `packed.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import anyio
import anyio.to_thread
import numpy as np

from embedserve.engine.backend import Backend, TokenIds, Vectors
from embedserve.engine.planner import BatchLimits, PackLimits, packed_slots, plan_batch, plan_packed
from embedserve.errors import InferenceFailed, Overloaded, RequestTimeout, ShuttingDown

logger = logging.getLogger(__name__)

T = TypeVar("T")
# An idle model's request with at most this many characters is tokenised on the event loop,
# so that a lone request pays no thread hop; every other request is tokenised in a worker
# thread, together with whatever else arrived meanwhile (`_tokenize_loop`). MiniLM's
# tokenizer takes ~1 us a character on the 2-core machine: ~0.15 ms for a text of the mixed
# corpus, the largest single share of the event loop's time per request under load.
INLINE_TOKENIZE_CHARS = 2048
RunSync = Callable[[Callable[[], T]], Awaitable[T]]
# What `_isolate` embeds to tell a backend that fails on every input from two poison texts
# (the registry's warm-up text: the model has embedded it once already).
PROBE_TEXT = "warm-up"
# Weight of the latest batch in the running estimate of seconds per text: recent enough to
# follow a change of load (or of the machine), smooth enough that one odd batch does not
# swing admission.
RECENT_WEIGHT = 0.2

# Priority lanes. An interactive text (a search query) goes ahead of every bulk text (an
# ingestion job's) queued before it; bulk keeps a share of every batch (`BatchPolicy`).
Lane = Literal["interactive", "bulk"]
INTERACTIVE: Lane = "interactive"
BULK: Lane = "bulk"
LANES: tuple[Lane, ...] = (INTERACTIVE, BULK)


@dataclass(frozen=True)
class BatchPolicy:
    """How the batcher forms batches. `enabled=False` runs one text per inference.

    `token_budget` caps the token slots one batch computes: texts x longest for a padded
    backend, rows x row length for a packed one (so budget // row length rows).
    `min_fill` applies to padded batches only, `lookahead` to packed ones.

    Lanes: `max_queue` bounds the bulk lane's queue and `max_queue_interactive` the
    interactive lane's. Batches take interactive texts first; while bulk texts wait,
    interactive texts take at most ``1 - bulk_share`` of a packed batch's slots, and once
    ``round(1 / bulk_share) - 1`` batches in a row have left the oldest bulk text out, the
    next batch is anchored on it (so no bulk text waits for ever).
    While the interactive lane is in use (a text in the last `interactive_window_s`) and bulk
    texts wait, a batch computes at most `interactive_budget` token slots (0: `token_budget`)
    beyond the rows its interactive texts open, so that a query arriving meanwhile waits for
    a short batch, not a long one.
    """

    max_texts: int = 64
    token_budget: int = 512
    min_fill: float = 0.85
    max_wait_s: float = 0.0
    max_queue: int = 1024
    enabled: bool = True
    lookahead: int = 256
    max_queue_interactive: int = 256
    bulk_share: float = 0.25
    interactive_budget: int = 0
    interactive_window_s: float = 1.0


@dataclass(frozen=True)
class EmbedResult:
    """What `submit` returns: one row per text, in the order the texts were given."""

    vectors: Vectors
    token_counts: list[int]
    queue_ms: float
    inference_ms: float
    lane: Lane = BULK


@dataclass(frozen=True)
class BatchRecord:
    """One model batch, as observers see it (`on_batch`)."""

    texts: int  # texts delivered from it, duplicates included
    real_tokens: int  # tokens of its distinct texts
    slot_tokens: int  # token slots computed (padding included): fill = real / slots
    seconds: float


@dataclass
class BatcherStats:
    """Running totals, owned and updated only by the batcher's loop."""

    batches: int = 0
    texts: int = 0
    real_tokens: int = 0  # tokens of the distinct texts run
    slot_tokens: int = 0  # token slots computed for them (padding included)
    failed_batches: int = 0  # batches in which at least one text failed, after isolation
    dropped_texts: int = 0
    inference_s: float = 0.0
    queue_s: float = 0.0
    recent_s_per_text: float | None = None  # wall time per text while busy, moving average
    lane_texts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LANES, 0))
    lane_queue_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(LANES, 0.0))

    @property
    def mean_batch_size(self) -> float:
        return self.texts / self.batches if self.batches else 0.0

    @property
    def mean_fill(self) -> float:
        """Share of the computed token slots that held real tokens (1.0: no padding)."""
        return self.real_tokens / self.slot_tokens if self.slot_tokens else 0.0


@dataclass(eq=False)
class _Request:
    future: asyncio.Future[EmbedResult]
    vectors: list[Vectors | None]
    token_counts: list[int]
    submitted: float
    remaining: int
    lane: Lane = BULK
    inference_s: float = 0.0
    last_batch: int = 0  # the latest batch that delivered to it (batches only count up)


@dataclass(eq=False)
class _Item:
    request: _Request
    index: int
    text: str
    ids: TokenIds


@dataclass(eq=False)
class _Arrival:
    """A text admitted but not tokenised yet (see `_tokenize_loop`)."""

    request: _Request
    index: int
    text: str


class MicroBatcher:
    """Coalesces one model's queued texts into length-aware batches run in a worker thread.

    Ownership: the queues and every request future belong to this object. `submit` adds
    texts to `_arrivals` (or, on an idle model, tokenises a short request itself and adds it
    to `_pending`); the tokeniser task moves arrivals to `_pending` once tokenised, in order;
    only the loop task takes from `_pending`. Every future ends in
    exactly one of result, exception or cancelled. Cancelling the caller of `submit` (client
    gone, timeout) cancels its future, and its texts are dropped before inference. When the
    backend raises on a batch, `_isolate` retries parts of it so that only the requests
    holding the texts to blame fail.
    Shutdown (`aclose`): refuse new work, drain within a bound, cancel the loop, fail what is
    left with `ShuttingDown`. The backend is not closed here; the registry owns it.
    """

    def __init__(
        self,
        backend: Backend,
        policy: BatchPolicy,
        *,
        run_sync: RunSync[Any] | None = None,
        tokenize_sync: RunSync[Any] | None = None,
        clock: Callable[[], float] = time.perf_counter,
        on_batch: Callable[[BatchRecord], None] | None = None,
    ) -> None:
        self.backend = backend
        self.policy = policy
        self.stats = BatcherStats()
        self._limits = BatchLimits(policy.max_texts, policy.token_budget, policy.min_fill)
        self._packed = backend.packed
        row_tokens = backend.row_tokens or backend.max_tokens
        self._pack_limits = PackLimits(
            row_tokens=row_tokens,
            max_rows=max(1, policy.token_budget // row_tokens),
            max_texts=policy.max_texts,
            lookahead=policy.lookahead,
        )
        # The smaller batches run while the interactive lane is in use.
        budget = policy.interactive_budget or policy.token_budget
        short_row = min(row_tokens, budget)
        self._pack_limits_interactive = dataclasses.replace(
            self._pack_limits, row_tokens=short_row, max_rows=max(1, budget // short_row)
        )
        # Queries may open rows up to the whole budget even then (bulk fills their rows).
        self._urgent_rows = max(1, policy.token_budget // short_row)
        self._interactive_tokens = budget
        self._limits_interactive = dataclasses.replace(self._limits, token_budget=budget)
        # Batches in a row that left the oldest bulk text out while queries were taken.
        self._starve_limit = max(1, round(1 / policy.bulk_share) - 1) if policy.bulk_share else 0
        self._bulk_skips = 0
        self._interactive_seen: float | None = None  # when an interactive text last arrived
        self._run_sync: RunSync[Any] = run_sync or anyio.to_thread.run_sync
        self._tokenize_sync: RunSync[Any] = tokenize_sync or anyio.to_thread.run_sync
        self._clock = clock
        self._on_batch = on_batch
        self._pending: list[_Item] = []  # tokenised, in order of arrival
        self._arrivals: list[_Arrival] = []  # admitted, for the tokeniser to take
        self._tokenizing: list[_Arrival] = []  # what the tokeniser is working on
        self._arrived = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._drained = asyncio.Event()  # set by the loop whenever it finds nothing to do
        self._in_flight = 0
        self._cancelled = 0  # requests ended early since the queue was last cleaned
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._tokenizer_task: asyncio.Task[None] | None = None
        self._batch_seq = 0
        # When the last batch ended, while the loop has had work ever since (else None): the
        # pace of a busy model counts the time between batches too.
        self._busy_since: float | None = None

    # -- public surface --------------------------------------------------------------
    @property
    def queued(self) -> int:
        """Texts admitted and waiting, tokenised or not (cancelled ones until dropped)."""
        return len(self._pending) + len(self._arrivals) + len(self._tokenizing)

    @property
    def in_flight(self) -> int:
        """Texts in the batch the model is running now."""
        return self._in_flight

    @property
    def idle(self) -> bool:
        """True when nothing is queued or running."""
        return self.queued == 0 and self._in_flight == 0

    def start(self) -> None:
        """Start the loop and tokeniser tasks (once). The batcher keeps the only references."""
        loop = asyncio.get_running_loop()
        if self._task is None:
            self._task = loop.create_task(self._loop(), name=f"batcher:{self.backend.name}")
        if self._tokenizer_task is None:
            self._tokenizer_task = loop.create_task(
                self._tokenize_loop(), name=f"tokenizer:{self.backend.name}"
            )

    def queued_by_lane(self) -> dict[str, int]:
        """Texts admitted and waiting, per lane."""
        counts: dict[str, int] = dict.fromkeys(LANES, 0)
        for queue in (self._pending, self._arrivals, self._tokenizing):
            for item in queue:
                counts[item.request.lane] += 1
        return counts

    async def submit(
        self, texts: Sequence[str], *, timeout_s: float | None = None, lane: Lane = BULK
    ) -> EmbedResult:
        """Embed `texts` (in order) as part of whatever batches the loop forms, in `lane`.

        Raises `Overloaded` at once when the lane's queue cannot take all of them, or when the
        work ahead of them would keep them waiting past `timeout_s`; `ShuttingDown` while
        draining; `RequestTimeout` after `timeout_s` (its work is dropped); and
        `InferenceFailed` when the backend failed on one of them (alone, or on a part of its
        batch that could not be narrowed down; see `_isolate`).
        """
        if not texts:
            raise ValueError("submit needs at least one text")
        self._admit(len(texts), timeout_s, lane)
        future: asyncio.Future[EmbedResult] = asyncio.get_running_loop().create_future()
        request = _Request(
            future=future,
            vectors=[None] * len(texts),
            token_counts=[0] * len(texts),
            submitted=self._clock(),
            remaining=len(texts),
            lane=lane,
        )
        if lane == INTERACTIVE:
            self._interactive_seen = request.submitted
        if sum(map(len, texts)) <= INLINE_TOKENIZE_CHARS and (
            self.idle or (lane == INTERACTIVE and self._tokenizer_has_bulk())
        ):
            # Nothing else to do, or only bulk texts to wait behind in the tokeniser: a
            # thread hop would only delay this request.
            ids = self.backend.tokenize(texts)
            request.token_counts = [len(x) for x in ids]
            pairs = zip(texts, ids, strict=True)
            self._pending.extend(_Item(request, i, text, n) for i, (text, n) in enumerate(pairs))
            self._wakeup.set()
        else:
            self._arrivals.extend(_Arrival(request, i, text) for i, text in enumerate(texts))
            self._arrived.set()
        future.add_done_callback(self._forget_if_cancelled)
        try:
            if timeout_s is None:
                return await future
            async with asyncio.timeout(timeout_s):
                return await future
        except TimeoutError:
            raise RequestTimeout(
                f"request to model {self.backend.name} timed out after {timeout_s:g}s"
            ) from None

    def estimated_wait_s(self, count: int = 0, lane: Lane = BULK) -> float:
        """Seconds until `count` more texts of `lane` would be embedded, at the recent pace
        (0 before the first batch): an interactive text waits only for interactive ones."""
        per_text = self.stats.recent_s_per_text or 0.0
        return (self._ahead(lane) + self._in_flight + count) * per_text

    def _ahead(self, lane: Lane) -> int:
        """Texts queued that a new text of `lane` would wait for."""
        return self.queued_by_lane()[INTERACTIVE] if lane == INTERACTIVE else self.queued

    def _tokenizer_has_bulk(self) -> bool:
        return any(a.request.lane == BULK for a in (*self._arrivals, *self._tokenizing))

    def _admit(self, count: int, timeout_s: float | None, lane: Lane) -> None:
        if self._closing:
            raise ShuttingDown()
        queued = self.queued_by_lane()[lane]
        limit = self.policy.max_queue_interactive if lane == INTERACTIVE else self.policy.max_queue
        if queued + count > limit:
            raise Overloaded(
                f"model {self.backend.name} is overloaded: {queued} {lane} texts queued "
                f"(limit {limit}); retry later",
                retry_after_s=self._retry_after_s(lane),
            )
        # A request that would time out in the queue is refused now rather than after its
        # whole timeout: the client learns at once, and can retry elsewhere. Only behind
        # other work: alone, a request gets its chance whatever its size.
        wait_s = self.estimated_wait_s(count, lane)
        if self._ahead(lane) and timeout_s is not None and wait_s > timeout_s:
            raise Overloaded(
                f"model {self.backend.name} is overloaded: the texts queued ahead of these "
                f"would take about {wait_s:.1f}s, past the request timeout of {timeout_s:g}s; "
                "retry later",
                retry_after_s=self._retry_after_s(lane),
            )

    def expire(self) -> None:
        """Stop admitting and answer everything still queued with ShuttingDown at once.

        The batch already running finishes normally. Used when the shutdown grace period
        is about to run out, so queued callers get a 503 rather than a cancelled request.
        """
        self._closing = True
        self._fail_queued()
        self._wakeup.set()

    async def aclose(self, grace_s: float) -> None:
        """Stop admitting, let queued work finish for up to `grace_s`, then fail the rest."""
        self._closing = True
        self._wakeup.set()
        if not self.idle:
            self._drained.clear()
            with anyio.move_on_after(grace_s):
                await self._drained.wait()
        for task in (self._tokenizer_task, self._task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._task = self._tokenizer_task = None
        self._fail_queued()

    def _fail_queued(self) -> None:
        leftovers, self._pending = self._pending, []
        arrivals, self._arrivals = self._arrivals, []
        self._fail([*leftovers, *arrivals, *self._tokenizing], ShuttingDown())

    # -- the tokeniser -----------------------------------------------------------------
    async def _tokenize_loop(self) -> None:
        """Tokenise arrivals in a worker thread, all that arrived since the last call in one
        call, and queue them for the loop, in order.

        Under load this keeps tokenising (the largest per-request cost the event loop had)
        off the loop, and runs it while the model runs the batch before. A fault here fails
        only the texts of that call; a text the tokenizer refuses fails only its request.
        """
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            while self._arrivals:
                chunk, self._arrivals = self._arrivals, []
                batch = [a for a in chunk if not a.request.future.done()]
                self.stats.dropped_texts += len(chunk) - len(batch)
                if not batch:
                    continue
                # `_drop_cancelled` may replace this list (not `batch`) meanwhile.
                self._tokenizing = batch
                try:
                    work = functools.partial(_tokenize_each, self.backend, [a.text for a in batch])
                    results = await self._tokenize_sync(work)
                    self._queue_tokenised(dict(zip(batch, results, strict=True)))
                except asyncio.CancelledError:  # shutdown past its grace period
                    self._fail(self._tokenizing, ShuttingDown())
                    raise
                except Exception:
                    logger.exception(
                        "tokenising %d texts for model %s failed", len(batch), self.backend.name
                    )
                    failure = InferenceFailed(f"tokenising failed for model {self.backend.name}")
                    self._fail(self._tokenizing, failure)
                finally:
                    self._tokenizing = []
                self._wakeup.set()

    def _queue_tokenised(self, results: dict[_Arrival, TokenIds | Exception]) -> None:
        """Queue the texts just tokenised that are still wanted, in order of arrival."""
        refused: list[_Arrival] = []
        for arrival in self._tokenizing:
            ids = results[arrival]
            request = arrival.request
            if request.future.done():
                self.stats.dropped_texts += 1
            elif isinstance(ids, Exception):
                refused.append(arrival)
            else:
                request.token_counts[arrival.index] = len(ids)
                self._pending.append(_Item(request, arrival.index, arrival.text, ids))
        if refused:
            logger.error(
                "the tokenizer of model %s refused %d texts", self.backend.name, len(refused)
            )
            self._fail(refused, InferenceFailed(f"tokenising failed for model {self.backend.name}"))

    # -- the loop --------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            self._drop_cancelled()
            if not self._pending:
                self._busy_since = None
                if self.idle:
                    self._drained.set()
                continue
            # An idle model may wait briefly for companions; a busy one never does, because
            # requests that arrived during the last batch are already queued.
            wait = self.policy.enabled and self.policy.max_wait_s > 0
            if wait and len(self._pending) < self.policy.max_texts:
                self._busy_since = None
                await asyncio.sleep(self.policy.max_wait_s)
                self._drop_cancelled()
                if not self._pending:
                    continue
            await self._run_guarded()
            if self._pending:
                self._wakeup.set()
            else:
                self._busy_since = None  # idle from here: the wait for work is not the pace
                if self.idle:
                    self._drained.set()

    async def _run_guarded(self) -> None:
        """One batch, with the loop's own faults contained: a bug in planning, bookkeeping or
        delivery fails only the requests of that batch (logged), and the loop serves on.
        Without this, one such exception would end the loop task silently and every later
        request on the model would wait for its timeout while /health says ready."""
        batch: list[_Item] = []
        try:
            batch = self._take_batch()
            await self._run_one_batch(batch)
        except Exception:
            if not batch and self._pending:
                # Planning itself failed: fail the oldest text's request, so the queue
                # still moves when the fault repeats.
                batch = [self._pending.pop(0)]
            logger.exception(
                "batcher for model %s failed outside the model call; failing %d texts",
                self.backend.name,
                len(batch),
            )
            self._in_flight = 0
            self._fail(batch, InferenceFailed(f"inference failed for model {self.backend.name}"))
            self.stats.failed_batches += 1

    def _forget_if_cancelled(self, future: asyncio.Future[EmbedResult]) -> None:
        # A caller that gave up (client gone, timeout) leaves the queue at once, so the
        # queue depth and admission see only live work, even while a batch is running.
        if future.cancelled():
            self._cancelled += 1
            self._drop_cancelled()
            self._wakeup.set()

    def _drop_cancelled(self) -> None:
        if not self._cancelled:
            return
        self._cancelled = 0
        live = [item for item in self._pending if not item.request.future.done()]
        arrived = [a for a in self._arrivals if not a.request.future.done()]
        tokenizing = [a for a in self._tokenizing if not a.request.future.done()]
        self.stats.dropped_texts += self.queued - len(live) - len(arrived) - len(tokenizing)
        self._pending, self._arrivals, self._tokenizing = live, arrived, tokenizing

    def _take_batch(self) -> list[_Item]:
        pending = self._pending
        urgent = [item.request.lane == INTERACTIVE for item in pending]
        mixed = any(urgent) and not all(urgent)
        # Short batches only where a query could wait behind bulk work: bulk texts queued
        # and queries coming. Queries alone get the whole budget (they are all the work).
        interactive = not all(urgent) and self._interactive_active()
        lengths = [len(item.ids) for item in pending]
        keys = [item.text for item in pending]
        bulk_turn = mixed and bool(self._starve_limit) and self._bulk_skips >= self._starve_limit
        if self._packed and self.policy.enabled:
            limits = self._pack_limits_interactive if interactive else self._pack_limits
            chosen = plan_packed(
                lengths,
                keys,
                limits,
                urgent if mixed else None,
                self.policy.bulk_share,
                bulk_turn,
                # On bulk's turn, queries only fill the oldest bulk text's row: a long one
                # would pad every row the queries opened to its length.
                (1 if bulk_turn else self._urgent_rows) if interactive else None,
                self._interactive_tokens if interactive else None,
            )
        else:
            # Padded, or one text a batch: the planner anchors on the first text of `order`.
            order = list(range(len(pending)))
            if mixed:
                order.sort(key=lambda i: urgent[i] == bulk_turn)
            if not self.policy.enabled:
                chosen = [order[0]]
            else:
                limits_padded = self._limits_interactive if interactive else self._limits
                picked = plan_batch(
                    [lengths[i] for i in order], [keys[i] for i in order], limits_padded
                )
                chosen = sorted(order[j] for j in picked)
        oldest_bulk = urgent.index(False) if mixed else -1
        self._bulk_skips = self._bulk_skips + 1 if mixed and oldest_bulk not in chosen else 0
        if len(chosen) == len(pending):
            self._pending = []
            return pending
        taken = set(chosen)
        self._pending = [item for i, item in enumerate(pending) if i not in taken]
        return [pending[i] for i in chosen]

    async def _run_one_batch(self, batch: list[_Item]) -> None:
        self._batch_seq += 1
        seq = self._batch_seq
        # The distinct texts, in order of arrival (the order the planner packed them in).
        units = {item.text: item.ids for item in reversed(batch)}
        texts = list(dict.fromkeys(item.text for item in batch))
        rows: dict[str, Vectors] = {}
        self._in_flight = len(batch)
        started = self._clock()
        since = self._busy_since if self._busy_since is not None else started
        try:
            error = await self._embed(texts, units, rows)
            failed = await self._isolate(texts, units, rows, []) if error is not None else []
        except BaseException:
            # The loop itself is being cancelled (shutdown past its grace period), perhaps
            # mid-retry: nothing was delivered yet, so the whole batch fails.
            self._fail(batch, ShuttingDown())
            raise
        finally:
            self._in_flight = 0
            self._busy_since = self._clock()
        elapsed = self._busy_since - started
        if failed:
            logger.error(
                "inference failed for model %s on %d of %d texts: %r",
                self.backend.name,
                len(failed),
                len(texts),
                error,
            )
            self.stats.failed_batches += 1
            lost = set(failed)
            answer = InferenceFailed(f"inference failed for model {self.backend.name}")
            self._fail([item for item in batch if item.text in lost], answer)
        elif error is not None:
            logger.warning(
                "inference for model %s failed on %d texts, then succeeded in parts: %r",
                self.backend.name,
                len(texts),
                error,
            )
        if rows:  # a batch that embedded nothing is only counted in failed_batches
            self._record(batch, texts, units, elapsed, self._busy_since - since)
        for item in batch:
            row = rows.get(item.text)
            if row is not None:
                self._deliver(item, row, seq, elapsed)

    async def _embed(
        self, texts: list[str], units: dict[str, TokenIds], rows: dict[str, Vectors]
    ) -> Exception | None:
        """Run the backend on `texts` once; add their rows to `rows`, or return its error."""
        tokens = [units[text] for text in texts]
        try:
            vectors: Vectors = await self._run_sync(lambda: self.backend.embed(texts, tokens))
            if vectors.shape[0] != len(texts):
                raise RuntimeError(f"backend returned {vectors.shape[0]} rows for {len(texts)}")
        except Exception as exc:
            return exc
        rows.update(zip(texts, vectors, strict=True))
        return None

    async def _isolate(
        self,
        texts: list[str],
        units: dict[str, TokenIds],
        rows: dict[str, Vectors],
        health: list[bool],
    ) -> list[str]:
        """Find the texts to blame in `texts`, on which the backend has just raised.

        Splits `texts` in halves and runs each (one after the other): a half that succeeds
        adds its rows to `rows`, a half that fails is split again, so one poison text in n
        costs about 2*log2(n) more calls and only it fails. When both halves fail, either
        each holds a poison text or the backend fails whatever it is given (out of memory, a
        closed model): one call on `PROBE_TEXT`, made at most once per batch (`health`
        keeps its answer), tells which. If the probe fails too, all of `texts` fail, so a
        broken backend costs 3 more calls a batch, not 2n-1; else the search goes on in both
        halves. Returns the texts that failed. Backend errors never escape; cancellation does.
        """
        if len(texts) == 1:
            return texts
        middle = len(texts) // 2
        halves = (texts[:middle], texts[middle:])
        errors = [await self._embed(half, units, rows) for half in halves]
        both_failed = all(error is not None for error in errors)
        # Two single texts that both failed are both to blame either way: no probe needed.
        if both_failed and len(texts) > 2 and not await self._healthy(health):
            return texts
        failed: list[str] = []
        for half, error in zip(halves, errors, strict=True):
            if error is not None:
                failed += await self._isolate(half, units, rows, health)
        return failed

    async def _healthy(self, health: list[bool]) -> bool:
        """Whether the backend embeds `PROBE_TEXT`; asked once, kept in `health`."""
        if not health:
            probe = {PROBE_TEXT: self.backend.tokenize([PROBE_TEXT])[0]}
            health.append(await self._embed([PROBE_TEXT], probe, {}) is None)
        return health[0]

    def _interactive_active(self) -> bool:
        seen = self._interactive_seen
        return seen is not None and self._clock() - seen < self.policy.interactive_window_s

    def _fail(self, batch: Sequence[_Item | _Arrival], error: Exception) -> None:
        for item in batch:
            if not item.request.future.done():
                item.request.future.set_exception(error)
                # The request's other texts may still be queued: clean them out too.
                self._cancelled += 1

    def _deliver(self, item: _Item, row: Vectors, seq: int, elapsed: float) -> None:
        request = item.request
        if request.future.done():
            return
        request.vectors[item.index] = row
        if seq != request.last_batch:
            request.last_batch = seq
            request.inference_s += elapsed
        request.remaining -= 1
        if request.remaining == 0:
            queued_s = max(0.0, self._clock() - request.submitted - request.inference_s)
            self.stats.queue_s += queued_s
            self.stats.lane_texts[request.lane] += len(request.vectors)
            self.stats.lane_queue_s[request.lane] += queued_s
            request.future.set_result(
                EmbedResult(
                    vectors=np.stack([v for v in request.vectors if v is not None]),
                    token_counts=request.token_counts,
                    queue_ms=queued_s * 1000,
                    inference_ms=request.inference_s * 1000,
                    lane=request.lane,
                )
            )

    def _record(
        self,
        batch: list[_Item],
        texts: list[str],
        units: dict[str, TokenIds],
        elapsed: float,
        cycle: float,
    ) -> None:
        lengths = [len(units[text]) for text in texts]
        real = sum(lengths)
        if self._packed:
            slots = packed_slots(lengths, self._pack_limits.row_tokens)
        else:
            slots = len(lengths) * max(lengths)
        stats = self.stats
        stats.batches += 1
        stats.texts += len(batch)
        stats.real_tokens += real
        stats.slot_tokens += slots
        stats.inference_s += elapsed
        per_text = cycle / len(batch)
        recent = stats.recent_s_per_text
        stats.recent_s_per_text = (
            per_text if recent is None else recent + RECENT_WEIGHT * (per_text - recent)
        )
        if self._on_batch is not None:
            try:
                self._on_batch(BatchRecord(len(batch), real, slots, elapsed))
            except Exception:  # an observer's fault must not end the loop and strand callers
                logger.exception("on_batch hook failed for model %s", self.backend.name)

    def _retry_after_s(self, lane: Lane) -> int:
        # Time to work off what is queued ahead in the lane; a guess of 10 ms a text before
        # any batch ran.
        per_text = self.stats.recent_s_per_text or 0.01
        return max(1, math.ceil((self._ahead(lane) + self._in_flight) * per_text))


def _tokenize_each(backend: Backend, texts: list[str]) -> list[TokenIds | Exception]:
    """`backend.tokenize(texts)`; if that raises, each text alone, so that a text the
    tokenizer refuses fails only itself. Runs in a worker thread."""
    try:
        return list(backend.tokenize(texts))
    except Exception:
        results: list[TokenIds | Exception] = []
        for text in texts:
            try:
                results.append(backend.tokenize([text])[0])
            except Exception as exc:
                results.append(exc)
        return results
