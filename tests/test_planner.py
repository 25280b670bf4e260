"""Batch forming: budget, caps, length grouping, duplicates, fairness to the oldest text."""

import random

from embedserve.engine.planner import (
    BatchLimits,
    PackLimits,
    pack_rows,
    packed_slots,
    plan_batch,
    plan_packed,
)


def keys(n: int) -> list[str]:
    return [f"t{i}" for i in range(n)]


def test_empty_queue_plans_nothing() -> None:
    assert plan_batch([], [], BatchLimits(8, 100)) == []


def test_oldest_text_always_runs_even_over_budget() -> None:
    assert plan_batch([500, 5, 5], keys(3), BatchLimits(8, 100)) == [0]


def test_padded_budget_is_respected() -> None:
    lengths = [10, 12, 11, 9, 10, 13, 10, 12]
    chosen = plan_batch(lengths, keys(8), BatchLimits(64, 40))
    assert 0 in chosen
    assert len(chosen) * max(lengths[i] for i in chosen) <= 40  # texts x longest


def test_max_texts_cap() -> None:
    assert len(plan_batch([5] * 20, keys(20), BatchLimits(4, 10_000))) == 4


def test_long_text_is_not_mixed_into_a_short_batch() -> None:
    lengths = [8, 250, 9, 7, 10, 8]
    chosen = plan_batch(lengths, keys(6), BatchLimits(8, 512))
    assert 1 not in chosen
    assert chosen == [0, 2, 3, 4, 5]


def test_long_anchor_groups_with_long_neighbours() -> None:
    lengths = [200, 5, 190, 6, 210, 7]
    chosen = plan_batch(lengths, keys(6), BatchLimits(8, 640))
    assert chosen == [0, 2, 4]


def test_duplicates_share_a_row_and_ride_along() -> None:
    lengths = [10, 10, 10, 10]
    chosen = plan_batch(lengths, ["a", "b", "a", "a"], BatchLimits(1, 100))
    assert chosen == [0, 2, 3]


def test_result_is_in_queue_order() -> None:
    lengths = [30, 10, 20, 25, 15]
    chosen = plan_batch(lengths, keys(5), BatchLimits(8, 10_000))
    assert chosen == sorted(chosen) == [0, 1, 2, 3, 4]


def test_fill_floor_keeps_a_mostly_padding_batch_from_forming() -> None:
    lengths = [100, 10, 12]
    assert plan_batch(lengths, keys(3), BatchLimits(8, 10_000, min_fill=0.0)) == [0, 1, 2]
    assert plan_batch(lengths, keys(3), BatchLimits(8, 10_000, min_fill=0.85)) == [0]
    assert plan_batch([10, 9, 10], keys(3), BatchLimits(8, 10_000, min_fill=0.85)) == [0, 1, 2]


# -- packed batches ------------------------------------------------------------------


def packed(row_tokens: int = 100, max_rows: int = 2, max_texts: int = 64, lookahead: int = 64):
    return PackLimits(row_tokens, max_rows, max_texts, lookahead)


def test_pack_rows_is_first_fit_and_gives_a_long_text_its_own_row() -> None:
    assert pack_rows([60, 50, 30, 40, 10], 100) == [[0, 2, 4], [1, 3]]
    assert pack_rows([150, 20], 100) == [[0], [1]]
    assert pack_rows([], 100) == []
    assert packed_slots([60, 50, 30, 40, 10], 100) == 2 * 100
    assert packed_slots([150, 20], 100) == 2 * 150


def test_packed_plan_mixes_any_lengths_within_the_rows() -> None:
    lengths = [250, 3, 100, 40, 7, 90]
    chosen = plan_packed(lengths, keys(6), packed(row_tokens=256, max_rows=2))
    assert chosen == [0, 1, 2, 3, 4, 5]  # 490 tokens in two rows of 256
    rows = pack_rows([lengths[i] for i in chosen], 256)
    assert all(sum(lengths[chosen[i]] for i in row) <= 256 for row in rows)


def test_packed_plan_always_takes_the_oldest_and_skips_what_does_not_fit() -> None:
    lengths = [80, 90, 30, 60, 20, 5]
    chosen = plan_packed(lengths, keys(6), packed(row_tokens=100, max_rows=1))
    # 80 opens the row; 90 and 30 and 60 do not fit the 20 left; 20 fills it exactly.
    assert chosen == [0, 4]
    assert plan_packed([500, 5], keys(2), packed(row_tokens=100, max_rows=1)) == [0]


def test_packed_plan_predicts_the_rows_the_backend_packs() -> None:
    rng = random.Random(3)
    for _ in range(200):
        lengths = [rng.choice([1, 3, 12, 30, 64, 120, 256]) for _ in range(rng.randint(1, 40))]
        limits = packed(row_tokens=128, max_rows=rng.randint(1, 4), lookahead=rng.randint(1, 40))
        chosen = plan_packed(lengths, keys(len(lengths)), limits)
        assert chosen[0] == 0
        rows = pack_rows([lengths[i] for i in chosen], limits.row_tokens)
        assert len(rows) <= limits.max_rows or len(chosen) == 1
        assert chosen == sorted(set(chosen))


def test_packed_plan_shares_a_segment_between_duplicates_and_caps_texts() -> None:
    lengths = [50, 50, 50, 50]
    chosen = plan_packed(lengths, ["a", "b", "a", "c"], packed(row_tokens=100, max_rows=1))
    assert chosen == [0, 1, 2]  # "a" twice in one segment, "b" fills the row, "c" waits
    assert plan_packed([5] * 10, keys(10), packed(max_texts=4)) == [0, 1, 2, 3]


def test_packed_plan_looks_only_so_far_past_the_oldest() -> None:
    lengths = [10] * 10
    assert plan_packed(lengths, keys(10), packed(lookahead=3)) == [0, 1, 2]
    # Duplicates of a text inside the window still ride along.
    names = ["a", "b", "c", "d", "a"]
    assert plan_packed([10] * 5, names, packed(lookahead=2)) == [0, 1, 4]


def test_pack_rows_spreads_texts_over_the_rows_first_fit_needs() -> None:
    # First-fit: 200+50 and 60+40, so the run would compute 2 x 250 slots; spread longest
    # first into the least-filled row, the longest row is 200 and the run computes 2 x 200.
    rows = pack_rows([200, 60, 50, 40], 256)
    assert sorted(map(sorted, rows)) == [[0], [1, 2, 3]]
    assert packed_slots([200, 60, 50, 40], 256) == 2 * 200
    # Spreading is kept only when it shortens the longest row.
    assert pack_rows([60, 50, 30, 40, 10], 100) == [[0, 2, 4], [1, 3]]


def test_packed_lanes_take_queries_first_up_to_their_share_then_bulk():
    limits = PackLimits(row_tokens=100, max_rows=1, max_texts=64, lookahead=256)
    lengths = [20, 20, 20, 20, 20, 20, 20, 10]
    urgent = [False, True, True, True, True, False, False, False]
    keys = [f"t{i}" for i in range(len(lengths))]
    # Queries first, while they hold at most 75 of the 100 slots: 1, 2 and 3 (60), not 4 (80).
    # Bulk fills the 40 slots left in order: texts 0 and 5; then the row is full.
    chosen = plan_packed(lengths, keys, limits, urgent, bulk_share=0.25)
    assert chosen == [0, 1, 2, 3, 5]
    # Without lanes: oldest first.
    assert plan_packed(lengths, keys, limits) == [0, 1, 2, 3, 4]


def test_packed_lanes_see_a_query_behind_a_bulk_backlog_longer_than_the_lookahead():
    limits = PackLimits(row_tokens=100, max_rows=1, max_texts=64, lookahead=8)
    lengths = [10] * 30 + [5]
    urgent = [False] * 30 + [True]
    keys = [f"t{i}" for i in range(31)]
    assert 30 in plan_packed(lengths, keys, limits, urgent, bulk_share=0.25)
    assert 30 not in plan_packed(lengths, keys, limits)


def test_packed_lanes_on_bulks_turn_take_the_oldest_bulk_text_first():
    limits = PackLimits(row_tokens=100, max_rows=1, max_texts=64, lookahead=256)
    lengths = [90, 30, 30, 30, 5]
    urgent = [False, True, True, True, False]
    keys = [f"t{i}" for i in range(len(lengths))]
    # Queries first: text 0 (90 tokens) never fits behind them, the short bulk text does.
    assert plan_packed(lengths, keys, limits, urgent, bulk_share=0.25) == [1, 2, 4]
    # Bulk's turn: the oldest bulk text is taken first, whatever its length.
    assert plan_packed(lengths, keys, limits, urgent, 0.25, bulk_first=True) == [0, 4]


def test_packed_lanes_keep_bulk_to_the_fill_bound_and_let_queries_open_their_rows():
    limits = PackLimits(row_tokens=50, max_rows=1, max_texts=64, lookahead=256)
    lengths = [10, 40, 40, 40, 10, 10]
    urgent = [False, True, True, True, False, False]
    keys = [f"t{i}" for i in range(len(lengths))]
    # Queries may open 3 rows (urgent_rows) though bulk-only batches get one; bulk then
    # fills their rows only while the batch holds at most 130 tokens in all.
    chosen = plan_packed(lengths, keys, limits, urgent, 0.0, urgent_rows=3, fill_tokens=130)
    assert chosen == [0, 1, 2, 3]
    assert plan_packed(lengths, keys, limits, urgent, 0.0, urgent_rows=3) == [0, 1, 2, 3, 4, 5]
    # One row for the queries: one query, then bulk in its room.
    assert plan_packed(lengths, keys, limits, urgent, 0.0, urgent_rows=1) == [0, 1]
