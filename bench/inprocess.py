"""The ceiling: the server's two backends called in this process on the same texts.

The padded backend (FastEmbed, `backend.load_local`) and the packed one (`packed.load_packed`,
one model per row length) each run their schedules (`bench.schedules`) over the corpus.
Packed and padded schedules alternate, and every other pass runs them in reverse, so that a
machine whose speed drifts favours neither. The best texts/s of all is the ceiling.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from bench.schedules import Schedule, fixed_batches, padded_schedules, slot_tokens
from devkit.stats import percentile


class Embedder(Protocol):
    """What the harness needs of a loaded model (embedserve's `Backend` fits)."""

    def embed(self, texts: Sequence[str]) -> Any: ...


@dataclass
class PlanResult:
    """One schedule timed: texts/s is the best of its passes; the token counts are of the
    batches that best pass ran (`padded_tokens`: slots computed, padding included)."""

    label: str
    kind: str  # "fixed", "budget" or "packed"
    param: int  # batch size or token budget
    batches: int
    texts: int  # texts embedded per pass (a time-capped pass may stop before the end)
    padded_tokens: int
    texts_per_s: float
    passes: int
    backend: str = "padded"
    order: str = "corpus"
    row_tokens: int | None = None
    real_tokens: int = 0

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


def measure_schedules(
    models: Mapping[str, Embedder],
    texts: Sequence[str],
    tokens: Sequence[int],
    schedules: Sequence[Schedule],
    passes: int,
) -> list[PlanResult]:
    """Time every schedule `passes` times, odd passes in reverse order; keep each one's best
    pass. Each model is warmed up first."""
    for model in models.values():
        time_plan(model, texts, fixed_batches(min(64, len(texts)), 16), None)
    passes = max(1, passes)
    best: dict[int, tuple[int, int, float]] = {}
    for number in range(passes):
        order: Iterable[int] = range(len(schedules))
        if number % 2:
            order = reversed(range(len(schedules)))
        for at in order:
            schedule = schedules[at]
            run = time_plan(models[schedule.model], texts, schedule.batches, schedule.max_s)
            kept = best.get(at)
            if kept is None or run[1] / run[2] > kept[1] / kept[2]:
                best[at] = run
    results = []
    for at, schedule in enumerate(schedules):
        ran_batches, ran_texts, seconds = best[at]
        ran = schedule.batches[:ran_batches]
        results.append(
            PlanResult(
                label=schedule.label,
                kind=schedule.kind,
                param=schedule.param,
                batches=ran_batches,
                texts=ran_texts,
                padded_tokens=slot_tokens(tokens, ran, schedule.row_tokens),
                texts_per_s=ran_texts / seconds,
                passes=passes,
                backend=schedule.backend,
                order=schedule.order,
                row_tokens=schedule.row_tokens,
                real_tokens=sum(tokens[i] for batch in ran for i in batch),
            )
        )
    return results


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
    """The padded schedules alone, on one model (see `padded_schedules`)."""
    schedules = padded_schedules(
        tokens,
        fixed_sizes=fixed_sizes,
        budgets=budgets,
        fixed_max_s=fixed_max_s,
        budget_max_s=budget_max_s,
    )
    return measure_schedules({"padded": model}, texts, tokens, schedules, passes)


def single_call_p50_ms(model: Embedder, texts: Sequence[str]) -> float:
    """Median milliseconds of ``embed([text])`` over `texts`, one after another."""
    return single_calls_p50_ms({"model": model}, texts)["model"]


def single_calls_p50_ms(
    models: Mapping[str, Embedder], texts: Sequence[str], block: int = 20
) -> dict[str, float]:
    """Median milliseconds of ``embed([text])`` over `texts` for each model. The models take
    the texts in blocks of `block`, in turn (the first model changing from block to block),
    so drift is shared; blocks rather than single texts because a FastEmbed session's
    threads spin for a while after each call (ONNX Runtime's default), which slowed the
    call of another model made right after it."""
    names = list(models)
    for text in texts[:5]:
        for name in names:
            models[name].embed([text])
    timings: dict[str, list[float]] = {name: [] for name in names}
    for turn, at in enumerate(range(0, len(texts), block)):
        shift = turn % len(names)
        for name in names[shift:] + names[:shift]:
            for text in texts[at : at + block]:
                started = time.perf_counter()
                models[name].embed([text])
                timings[name].append((time.perf_counter() - started) * 1000)
    return {name: percentile(values, 50) for name, values in timings.items()}
