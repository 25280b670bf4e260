"""The ceiling: FastEmbed called in this process on the same model and texts as the server.

Two families of schedules, each timed over the corpus:

- fixed batch sizes in corpus order (what a naive client batching gets);
- the texts length-sorted and cut into batches under a padded-token budget (texts x longest
  <= budget), which is the best a scheduler with full knowledge of every text can do.

The best texts/s of all of them is the ceiling the server is compared with.
"""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from bench.stats import percentile


class Embedder(Protocol):
    """What the harness needs of a loaded model (embedserve's `Backend` fits)."""

    def embed(self, texts: Sequence[str]) -> Any: ...


def fixed_batches(count: int, size: int) -> list[list[int]]:
    """Indices 0..count-1 in order, cut into batches of `size` (the last may be short)."""
    if size < 1:
        raise ValueError("batch size must be >= 1")
    return [list(range(start, min(count, start + size))) for start in range(0, count, size)]


def budget_batches(tokens: Sequence[int], budget: int) -> list[list[int]]:
    """Length-sorted batches with ``len(batch) * longest <= budget``.

    Texts are taken shortest first, so each newcomer is the longest of its batch; a text
    longer than the budget on its own gets a batch of one. Every index appears exactly once.
    """
    if budget < 1:
        raise ValueError("token budget must be >= 1")
    order = sorted(range(len(tokens)), key=lambda i: (tokens[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        if current and (len(current) + 1) * tokens[index] > budget:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def padded_tokens(tokens: Sequence[int], batches: Sequence[Sequence[int]]) -> int:
    """Tokens the model computes for `batches`: each batch costs its size x its longest text."""
    return sum(len(batch) * max(tokens[i] for i in batch) for batch in batches if batch)


def shuffled(batches: list[list[int]], seed: int = 0) -> list[list[int]]:
    """`batches` in a seeded random order: a time-capped prefix then samples every length,
    not only the shortest texts of a length-sorted schedule."""
    order = list(batches)
    random.Random(seed).shuffle(order)
    return order


@dataclass
class PlanResult:
    """One schedule timed: texts/s is the best of its passes."""

    label: str
    kind: str  # "fixed" or "budget"
    param: int  # batch size or token budget
    batches: int
    texts: int  # texts embedded per pass (a time-capped pass may stop before the end)
    padded_tokens: int
    texts_per_s: float
    passes: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def time_plan(
    model: Embedder,
    texts: Sequence[str],
    batches: Sequence[Sequence[int]],
    max_s: float | None,
) -> tuple[int, int, float]:
    """Embed `batches` in order, stopping after the batch that passes `max_s` seconds (at
    least one batch); returns (batches run, texts embedded, seconds)."""
    done_batches = done_texts = 0
    started = time.perf_counter()
    for batch in batches:
        model.embed([texts[i] for i in batch])
        done_batches += 1
        done_texts += len(batch)
        if max_s is not None and time.perf_counter() - started >= max_s:
            break
    return done_batches, done_texts, time.perf_counter() - started


def measure_plans(
    model: Embedder,
    texts: Sequence[str],
    tokens: Sequence[int],
    *,
    fixed_sizes: Sequence[int],
    budgets: Sequence[int],
    passes: int,
    fixed_max_s: float | None,
    budget_max_s: float | None,
) -> list[PlanResult]:
    """Time every schedule `passes` times; keep each schedule's best pass."""
    plans: list[tuple[str, str, int, list[list[int]], float | None]] = [
        (f"fixed {size}", "fixed", size, fixed_batches(len(texts), size), fixed_max_s)
        for size in fixed_sizes
    ]
    plans += [
        (
            f"sorted, budget {budget}",
            "budget",
            budget,
            shuffled(budget_batches(tokens, budget)),
            budget_max_s,
        )
        for budget in budgets
    ]
    time_plan(model, texts, fixed_batches(min(64, len(texts)), 16), None)  # warm-up
    results = []
    for label, kind, param, batches, max_s in plans:
        best: tuple[int, int, float] | None = None
        for _ in range(max(1, passes)):
            run = time_plan(model, texts, batches, max_s)
            if best is None or run[1] / run[2] > best[1] / best[2]:
                best = run
        assert best is not None
        ran = batches[: best[0]]
        results.append(
            PlanResult(
                label=label,
                kind=kind,
                param=param,
                batches=best[0],
                texts=best[1],
                padded_tokens=padded_tokens(tokens, ran),
                texts_per_s=best[1] / best[2],
                passes=max(1, passes),
            )
        )
    return results


def single_call_p50_ms(model: Embedder, texts: Sequence[str]) -> float:
    """Median milliseconds of ``embed([text])`` over `texts`, one after another."""
    for text in texts[:5]:
        model.embed([text])
    timings = []
    for text in texts:
        started = time.perf_counter()
        model.embed([text])
        timings.append((time.perf_counter() - started) * 1000)
    return percentile(timings, 50)
