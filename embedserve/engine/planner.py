"""Batch forming: choose which queued texts run together. Pure functions, no asyncio.

Two shapes of batch, one per kind of backend:

- **Packed** (`plan_packed`, `pack_rows`): several texts share one row of the model input, one
  after another, so a batch costs its rows x the longest row, whatever the mix of lengths.
  The planner fills rows first-fit from the oldest waiting text on (which is always taken, so
  nothing starves), looking at most `lookahead` distinct texts past it.
- **Padded** (`plan_batch`): a model batch pads every text to the longest one, so cost follows
  ``texts x longest``: mixing a 250-token text with 5-token texts makes all of them pay for
  250. The planner therefore anchors each batch on the oldest waiting text (no starvation)
  and grows it with the texts closest to it in length, while the padded size stays within the
  budget and mostly real tokens (measured on 2 cores with MiniLM and a 64-text window of
  mixed lengths: budget 512 with a fill floor of 0.85 ran 403 texts/s, against 377 without
  the floor and 317 at budget 1024).

In both, identical texts share one row (or segment) and cost nothing more.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchLimits:
    """Caps for one model batch.

    `token_budget` counts padded tokens (texts x longest). `min_fill` is the least share of
    a batch's padded tokens that must be real tokens: a text that would push the padding
    past it waits for a batch of its own length instead.
    """

    max_texts: int
    token_budget: int
    min_fill: float = 0.0


def plan_batch(lengths: Sequence[int], keys: Sequence[str], limits: BatchLimits) -> list[int]:
    """Indices (into the queue, oldest first) of the texts to run next as one batch.

    `lengths[i]` is text i's token count and `keys[i]` its text; identical texts share one
    row of the batch, so a duplicate costs nothing and always rides along. The oldest text
    (index 0) is always chosen, even alone over the budget. Returns indices in queue order.
    """
    if not lengths:
        return []
    # Unique texts, each with every queue index that carries it.
    groups: dict[str, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    unique = list(groups.values())  # in order of first arrival; unique[0] holds index 0
    order = sorted(range(len(unique)), key=lambda g: (lengths[unique[g][0]], g))
    position = order.index(0)
    length_of = [lengths[unique[g][0]] for g in order]

    lo = hi = position
    longest = real = length_of[position]

    def acceptable(count: int, new_longest: int, new_real: int) -> bool:
        padded = count * new_longest
        return padded <= limits.token_budget and new_real >= limits.min_fill * padded

    while hi - lo + 1 < limits.max_texts:
        count = hi - lo + 2
        # Waste each choice adds: a shorter text pads up to `longest`; a longer text makes
        # every row already chosen pad up to it.
        left_waste = longest - length_of[lo - 1] if lo > 0 else -1
        right_waste = (hi - lo + 1) * (length_of[hi + 1] - longest) if hi + 1 < len(order) else -1
        left_fits = left_waste >= 0 and acceptable(count, longest, real + length_of[lo - 1])
        right_fits = right_waste >= 0 and acceptable(
            count, length_of[hi + 1], real + length_of[hi + 1]
        )
        if left_fits and (not right_fits or left_waste <= right_waste):
            lo -= 1
            real += length_of[lo]
        elif right_fits:
            hi += 1
            longest = length_of[hi]
            real += longest
        else:
            break
    chosen = [index for g in order[lo : hi + 1] for index in unique[g]]
    return sorted(chosen)


@dataclass(frozen=True)
class PackLimits:
    """Caps for one packed batch: `max_rows` rows of `row_tokens` slots, at most `max_texts`
    texts, chosen among the oldest `lookahead` distinct texts waiting."""

    row_tokens: int
    max_rows: int
    max_texts: int
    lookahead: int


def pack_rows(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    """Rows of text indices for one packed run of texts with these token counts.

    First-fit in the given order decides how many rows the texts need (each goes into the
    first row with room, else a new row; a text longer than a row fills a row of its own).
    The texts are then spread over that many rows longest first, each into the least-filled
    row, when that makes the longest row shorter: a run computes rows x its longest row, so
    rows of 256 + 100 tokens cost 512 slots, and two of 178 cost 356. The planner predicts
    the rows with this function and the packed backend packs with it.
    """
    rows = _first_fit(lengths, row_tokens)
    if len(rows) < 2:
        return rows
    balanced: list[list[int]] = [[] for _ in rows]
    load = [0] * len(rows)
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(len(rows)), key=load.__getitem__)
        balanced[r].append(index)
        load[r] += lengths[index]
    if max(load) < max(sum(lengths[i] for i in row) for row in rows):
        return balanced
    return rows


def _first_fit(lengths: Sequence[int], row_tokens: int) -> list[list[int]]:
    rows: list[list[int]] = []
    room: list[int] = []
    for index, length in enumerate(lengths):
        for r, free in enumerate(room):
            if length <= free:
                rows[r].append(index)
                room[r] -= length
                break
        else:
            rows.append([index])
            room.append(max(0, row_tokens - length))
    return rows


def packed_slots(lengths: Sequence[int], row_tokens: int) -> int:
    """Token slots a packed run of these texts computes: rows x the longest row."""
    rows = pack_rows(lengths, row_tokens)
    return len(rows) * max((sum(lengths[i] for i in row) for row in rows), default=0)


def plan_packed(
    lengths: Sequence[int],
    keys: Sequence[str],
    limits: PackLimits,
    urgent: Sequence[bool] | None = None,
    bulk_share: float = 0.0,
    bulk_first: bool = False,
    urgent_rows: int | None = None,
    fill_tokens: int | None = None,
) -> list[int]:
    """Indices (into the queue, oldest first) of the texts to pack into the next batch.

    Walks the distinct texts in order of arrival, from the oldest, and puts each in the first
    row with room (`pack_rows`' rule), opening a row while fewer than `max_rows` are open; a
    text that fits nowhere is left for a later batch and the walk goes on, so shorter texts
    behind it can still fill the gaps. The oldest text is always taken. Duplicates of a taken
    text ride along in its segment. Returns indices in queue order.

    Priority lanes: `urgent[i]` marks text i as the interactive lane's. Then the walk takes
    the interactive texts first, in order of arrival (the oldest always), as long as they hold
    at most ``1 - bulk_share`` of the batch's slots (`max_rows` x `row_tokens`) while bulk
    texts wait, then bulk texts in the room that is left. Interactive texts may open up to
    `urgent_rows` rows (default `max_rows`); bulk texts open rows only while fewer than
    `max_rows` are open, and only while the batch holds at most `fill_tokens` tokens in all
    (default: no such bound), so that bulk-only batches stay short and bulk adds little to
    a batch of queries. With `bulk_first` (the caller's turn for bulk: see
    `MicroBatcher`), the oldest bulk text is the one always taken, ahead of the interactive
    texts. `lookahead` counts each lane's distinct texts on its own, so a
    query is seen behind any backlog.
    """
    if not lengths:
        return []
    everything = range(len(lengths))
    if urgent is None:
        first, rest = [], _distinct(keys, everything, limits.lookahead)
    else:
        first = _distinct(keys, [i for i in everything if urgent[i]], limits.lookahead)
        rest = _distinct(keys, [i for i in everything if not urgent[i]], limits.lookahead)
    walk = [(group, True) for group in first] + [(group, False) for group in rest]
    rows_for_urgent = limits.max_rows if urgent_rows is None else urgent_rows
    cap = float("inf")
    if first and rest:
        cap = (1 - bulk_share) * rows_for_urgent * limits.row_tokens
        if bulk_first:
            walk.insert(0, walk.pop(len(first)))
    room: list[int] = []
    chosen: list[int] = []
    urgent_tokens = total_tokens = 0
    fill = float("inf") if fill_tokens is None else fill_tokens
    for position, (group, is_urgent) in enumerate(walk):
        anchor = position == 0
        length = lengths[group[0]]
        if not anchor:
            if len(chosen) + len(group) > limits.max_texts:
                continue
            if is_urgent and urgent_tokens + length > cap:
                continue
            if not is_urgent and total_tokens + length > fill:
                continue
        for r, free in enumerate(room):
            if length <= free:
                room[r] -= length
                break
        else:
            if not anchor and len(room) >= (rows_for_urgent if is_urgent else limits.max_rows):
                continue
            room.append(max(0, limits.row_tokens - length))
        chosen += group
        total_tokens += length
        if is_urgent:
            urgent_tokens += length
        if len(chosen) >= limits.max_texts:
            break
    return sorted(chosen)


def _distinct(keys: Sequence[str], indices: Iterable[int], lookahead: int) -> list[list[int]]:
    """`indices` grouped by text, in order of first arrival: at most `lookahead` distinct
    texts, each with every index (among `indices`) that carries it."""
    groups: dict[str, list[int]] = {}
    for index in indices:
        key = keys[index]
        group = groups.get(key)
        if group is None:
            if len(groups) >= lookahead:
                continue
            groups[key] = [index]
        else:
            group.append(index)
    return list(groups.values())
