"""Schedules: ways to cut a corpus into model batches, for the in-process ceiling (pure).

For the padded backend: fixed batch sizes in corpus order, and the texts length-sorted and cut
under a padded-token budget (texts x longest <= budget: the best a padded scheduler with full
knowledge of every text can do). For the packed backend: the server's own planner
(`planner.plan_packed`) run over a queue of the whole corpus, budget // row length rows a
batch, the queue either length-sorted (full knowledge) or in corpus order (arrival order,
looking `lookahead` texts ahead as the server does).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from embedserve.engine.planner import PackLimits, packed_slots, plan_packed

T = TypeVar("T")


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


def packed_batches(
    tokens: Sequence[int], order: Sequence[int], limits: PackLimits
) -> list[list[int]]:
    """The batches `plan_packed` takes, one after another, from a queue holding the texts in
    `order` (oldest first) until it is empty; each batch in queue order, as the server runs
    it. Texts are told apart by index (identical texts are not merged)."""
    queue = list(order)
    batches: list[list[int]] = []
    while queue:
        # The planner looks at `lookahead` distinct texts from the oldest, no further.
        window, rest = queue[: limits.lookahead], queue[limits.lookahead :]
        chosen = plan_packed([tokens[i] for i in window], [str(i) for i in window], limits)
        batches.append([window[k] for k in chosen])
        taken = set(chosen)
        queue = [i for k, i in enumerate(window) if k not in taken] + rest
    return batches


def slot_tokens(tokens: Sequence[int], batches: Sequence[Sequence[int]], row: int | None) -> int:
    """Token slots the model computes for `batches`: padded (`row` None) size x longest, or
    packed rows x the longest row."""
    if row is None:
        return padded_tokens(tokens, batches)
    return sum(packed_slots([tokens[i] for i in batch], row) for batch in batches if batch)


def interleave(*lists: Sequence[T]) -> list[T]:
    """The items of `lists` taken in turn, one from each (``a0 b0 a1 b1 ... rest``)."""
    out: list[T] = []
    for at in range(max((len(items) for items in lists), default=0)):
        out += [items[at] for items in lists if at < len(items)]
    return out


def shuffled(batches: list[list[int]], seed: int = 0) -> list[list[int]]:
    """`batches` in a seeded random order: a time-capped prefix then samples every length,
    not only the shortest texts of a length-sorted schedule."""
    order = list(batches)
    random.Random(seed).shuffle(order)
    return order


@dataclass
class Schedule:
    """One way to cut the corpus into batches, and the model (by key) that runs it."""

    label: str
    model: str  # key of the model that runs it, e.g. "padded" or "packed 256"
    backend: str  # "padded" or "packed"
    kind: str  # "fixed", "budget" or "packed"
    order: str  # the queue: "corpus", "sorted" or "arrival"
    param: int  # batch size or token budget
    row_tokens: int | None  # packed row length (None: padded)
    batches: list[list[int]]
    max_s: float | None  # a pass stops after the batch that passes this


def padded_schedules(
    tokens: Sequence[int],
    *,
    fixed_sizes: Sequence[int],
    budgets: Sequence[int],
    fixed_max_s: float | None,
    budget_max_s: float | None,
    model: str = "padded",
) -> list[Schedule]:
    """Fixed sizes in corpus order, then length-sorted batches under each padded budget."""
    out = [
        Schedule(
            f"fixed {size}",
            model,
            "padded",
            "fixed",
            "corpus",
            size,
            None,
            fixed_batches(len(tokens), size),
            fixed_max_s,
        )
        for size in fixed_sizes
    ]
    out += [
        Schedule(
            f"sorted, budget {budget}",
            model,
            "padded",
            "budget",
            "sorted",
            budget,
            None,
            shuffled(budget_batches(tokens, budget)),
            budget_max_s,
        )
        for budget in budgets
    ]
    return out


def packed_schedules(
    tokens: Sequence[int],
    *,
    budgets: Sequence[int],
    rows: Sequence[int],
    lookahead: int,
    max_s: float | None,
) -> list[Schedule]:
    """For each row length and budget (budget // row rows a batch, at least one): the packed
    planner over a length-sorted queue, then over the corpus in arrival order. The model key
    is ``packed ROW``."""
    out = []
    length_sorted = sorted(range(len(tokens)), key=lambda i: (tokens[i], i))
    arrival = list(range(len(tokens)))
    for row in rows:
        for budget in budgets:
            max_rows = max(1, budget // row)
            for order, queue, ahead in (
                ("sorted", length_sorted, len(tokens)),
                ("arrival", arrival, lookahead),
            ):
                limits = PackLimits(row, max_rows, max(1, len(tokens)), max(1, ahead))
                out.append(
                    Schedule(
                        f"packed, rows of {row}, budget {budget}, {order}",
                        f"packed {row}",
                        "packed",
                        "packed",
                        order,
                        budget,
                        row,
                        shuffled(packed_batches(tokens, queue, limits)),
                        max_s,
                    )
                )
    return out
