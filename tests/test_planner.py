"""Batch forming: budget, caps, length grouping, duplicates, fairness to the oldest text."""

from embedserve.planner import BatchLimits, padded_tokens, plan_batch


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
    assert padded_tokens([lengths[i] for i in chosen]) <= 40


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
