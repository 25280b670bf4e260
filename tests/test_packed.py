"""The packed backend's inputs and pooling, with a numpy stand-in for the packed graph.

The stand-in behaves like the real graph in the ways packing relies on: a token's state
depends on its id, its position and every token of its own segment (and nothing else), so a
packed row gives each text exactly the vectors it gets alone only if segments, positions and
pooling bounds are right. The real graph is checked against the unpacked model in
tests/test_model_parity.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from embedserve.engine.backend import NonFiniteEmbedding
from embedserve.engine.packed import PackedBackend, PackedInputs, pool_segments
from embedserve.engine.planner import pack_rows

DIM = 6


def token_vector(ids: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(7)
    table = rng.standard_normal((1000, DIM)).astype(np.float32)
    return table[ids % 1000]


class SegmentAttentionSession:
    """hidden[b, i] = v(id) * (1 + pos) + mean of v over i's own segment (zero for padding)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, np.ndarray]] = []

    def run(self, outputs: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        assert outputs == ["last_hidden_state"]
        self.calls.append(feed)
        ids, positions, segments = feed["input_ids"], feed["position_ids"], feed["segment_ids"]
        vectors = token_vector(ids)
        hidden = vectors * (1 + positions[..., None]).astype(np.float32)
        for b in range(ids.shape[0]):
            for segment in set(segments[b].tolist()) - {0}:
                mask = segments[b] == segment
                hidden[b, mask] += vectors[b, mask].mean(axis=0)
        return [hidden]


class WordTokenizer:
    """[CLS]=1, one id per word (its length + 10), [SEP]=2; truncates to `limit`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit

    class _Encoding:
        def __init__(self, ids: list[int]) -> None:
            self.ids = ids

    def encode(self, text: str) -> Any:
        ids = [1, *(len(word) + 10 for word in text.split()), 2]
        return self._Encoding([*ids[: self.limit - 1], 2] if len(ids) > self.limit else ids)

    def encode_batch(self, texts: list[str]) -> list[Any]:
        return [self.encode(t) for t in texts]


def backend(pooling: str = "mean", row_tokens: int = 16, normalize: bool = True) -> PackedBackend:
    return PackedBackend(
        "test/packed",
        SegmentAttentionSession(),
        WordTokenizer(limit=32),
        dimension=DIM,
        max_tokens=32,
        pooling=pooling,
        normalize=normalize,
        row_tokens=row_tokens,
    )


TEXTS = [
    "",
    "one",
    "two words",
    "a text of seven words in it",
    " ".join(f"w{i}" for i in range(40)),  # truncated to 32 tokens: longer than a row
    "the same three",
    "one",
]


def test_inputs_restart_positions_and_number_segments_per_row() -> None:
    tokens = [[5, 6, 7], [8, 9], [1, 2, 3, 4]]
    inputs = PackedInputs(tokens, row_tokens=6)
    assert pack_rows([3, 2, 4], 6) == [[0, 1], [2]]
    assert inputs.shape == (2, 5)
    assert inputs.input_ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 4, 0]]
    assert inputs.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert inputs.segment_ids.tolist() == [[1, 1, 1, 2, 2], [1, 1, 1, 1, 0]]
    assert inputs.starts.tolist() == [0, 3, 5]
    assert inputs.ends.tolist() == [3, 5, 9]
    assert inputs.real_tokens == 9


@pytest.mark.parametrize("pooling", ["mean", "cls"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("row_tokens", [4, 16, 64])
def test_packed_rows_give_each_text_its_vector_alone(
    pooling: str, normalize: bool, row_tokens: int
) -> None:
    model = backend(pooling, row_tokens, normalize)
    together = model.embed(TEXTS)
    alone = np.concatenate([model.embed([text]) for text in TEXTS])
    np.testing.assert_allclose(together, alone, rtol=1e-5, atol=1e-5)
    session = model._session
    assert isinstance(session, SegmentAttentionSession)
    packed_call = session.calls[0]
    if row_tokens >= 16:  # several texts really shared a row
        assert packed_call["segment_ids"].max() > 1
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, rtol=1e-5)


def test_mean_pooling_averages_only_the_texts_own_tokens() -> None:
    inputs = PackedInputs([[1, 1], [1], [1, 1, 1]], row_tokens=4)
    assert inputs.shape == (2, 3)
    hidden = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    pooled = pool_segments(hidden, inputs, "mean")
    np.testing.assert_allclose(pooled[0], hidden[0, 0:2].mean(axis=0))
    np.testing.assert_allclose(pooled[1], hidden[0, 2])
    np.testing.assert_allclose(pooled[2], hidden[1, 0:3].mean(axis=0))
    np.testing.assert_allclose(pool_segments(hidden, inputs, "cls")[2], hidden[1, 0])


def test_given_tokens_are_run_without_tokenising_again() -> None:
    model = backend()
    calls: list[list[str]] = []
    real = model.tokenize

    def counting(texts: Any) -> Any:
        calls.append(list(texts))
        return real(texts)

    model.tokenize = counting  # type: ignore[method-assign]
    tokens = real(TEXTS)
    model.embed(TEXTS, tokens)
    assert calls == []
    model.embed(TEXTS)
    assert calls == [TEXTS]


def test_mismatched_tokens_and_non_finite_output_raise() -> None:
    model = backend()
    with pytest.raises(ValueError):
        model.embed(["a", "b"], [[1, 2]])

    class NaNSession:
        def run(self, outputs: list[str], feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            return [np.full((*feed["input_ids"].shape, DIM), np.nan, dtype=np.float32)]

    model._session = NaNSession()
    with pytest.raises(NonFiniteEmbedding):
        model.embed(["a"])


def test_closed_backend_refuses_work() -> None:
    model = backend()
    model.close()
    with pytest.raises(RuntimeError, match="closed"):
        model.embed(["a"])
