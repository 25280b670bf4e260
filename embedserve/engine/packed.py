"""The packed backend: several texts share one row of the model input, so nothing is padded.

Runs ``model.packed.onnx`` (written by `embedserve models import` for BERT-family models) with
ONNX Runtime directly, and the model's own `tokenizers` tokenizer. The graph takes
``input_ids``, ``position_ids`` (restarting at 0 for each text) and ``segment_ids`` (0 for
padding, k for the k-th text of a row, from which the graph builds a block-diagonal attention
mask) and returns the last hidden state; pooling is done here, per text, then normalisation as
the model's manifest says. The result equals running each text alone.

Everything here blocks and is meant for a worker thread, like `backend.FastEmbedBackend`.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from embedserve.engine.backend import (
    NonFiniteEmbedding,
    TokenIds,
    Vectors,
    return_freed_memory,
    token_ids,
)
from embedserve.engine.planner import pack_rows
from embedserve.engine.tokens import TokenizerViews
from embedserve.errors import ModelUnavailable
from embedserve.models.store import (
    PACKED_MODEL_FILE,
    Manifest,
    ModelFileMismatch,
    verify_model_file,
)

logger = logging.getLogger(__name__)

INPUT_NAMES = ("input_ids", "position_ids", "segment_ids")
OUTPUT_NAME = "last_hidden_state"


class PackedInputs:
    """The three int64 arrays of one packed run, plus where each text's tokens lie.

    `starts[k]`/`ends[k]` index text k's tokens in the flattened ``[rows * width]`` axis.
    """

    def __init__(self, tokens: Sequence[TokenIds], row_tokens: int) -> None:
        rows = pack_rows([len(t) for t in tokens], row_tokens)
        width = max(sum(len(tokens[i]) for i in row) for row in rows)
        self.shape = (len(rows), width)
        self.input_ids = np.zeros(self.shape, dtype=np.int64)
        self.position_ids = np.zeros(self.shape, dtype=np.int64)
        self.segment_ids = np.zeros(self.shape, dtype=np.int64)
        self.starts = np.empty(len(tokens), dtype=np.int64)
        self.ends = np.empty(len(tokens), dtype=np.int64)
        positions = np.arange(width, dtype=np.int64)
        for r, row in enumerate(rows):
            offset = 0
            for segment, i in enumerate(row, start=1):
                n = len(tokens[i])
                self.input_ids[r, offset : offset + n] = tokens[i]
                self.position_ids[r, offset : offset + n] = positions[:n]
                self.segment_ids[r, offset : offset + n] = segment
                self.starts[i] = r * width + offset
                self.ends[i] = r * width + offset + n
                offset += n

    @property
    def real_tokens(self) -> int:
        """Token slots that hold a text's token (the rest is padding)."""
        return int((self.ends - self.starts).sum())

    def feed(self) -> dict[str, npt.NDArray[np.int64]]:
        """The graph's inputs by name."""
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "segment_ids": self.segment_ids,
        }


def pool_segments(hidden: Vectors, inputs: PackedInputs, pooling: str) -> Vectors:
    """One vector per text from the last hidden state ``[rows, width, dim]``.

    "mean": the mean over the text's own tokens (specials included, as sentence-transformers
    does); "cls": the text's first token.
    """
    flat = hidden.reshape(-1, hidden.shape[-1])
    if pooling == "cls":
        return np.ascontiguousarray(flat[inputs.starts], dtype=np.float32)
    # reduceat sums flat[start:end] for each (start, end) pair; the appended zero row keeps
    # an end that is the last slot a valid index.
    padded = np.concatenate([flat, np.zeros((1, flat.shape[1]), dtype=flat.dtype)])
    bounds = np.empty(2 * len(inputs.starts), dtype=np.int64)
    bounds[0::2] = inputs.starts
    bounds[1::2] = inputs.ends
    sums = np.add.reduceat(padded, bounds, axis=0)[0::2]
    counts = (inputs.ends - inputs.starts).astype(np.float32)[:, None]
    return (sums / counts).astype(np.float32, copy=False)


def normalize_rows(vectors: Vectors) -> Vectors:
    """Each row scaled to unit length (a zero row stays zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    scaled = vectors / np.maximum(norms, 1e-12)
    return np.asarray(scaled, dtype=np.float32)


class PackedBackend(TokenizerViews):
    """A packed ONNX graph, its tokenizer, and the model's pooling and normalisation.

    `row_tokens` is the length of one row: the planner (`planner.plan_packed`) decides which
    texts run together with the same `pack_rows` that `embed` uses, so its picture of the
    batch is the batch that runs. A text longer than a row gets a row of its own length.
    """

    packed = True

    def __init__(
        self,
        name: str,
        session: Any,
        tokenizer: Any,
        *,
        dimension: int,
        max_tokens: int,
        pooling: str,
        normalize: bool,
        row_tokens: int | None = None,
    ) -> None:
        if pooling not in ("mean", "cls"):
            raise ValueError(f"unknown pooling {pooling!r}")
        self.name = name
        self.dimension = dimension
        self.max_tokens = max_tokens
        self.row_tokens = row_tokens or max_tokens
        self._session: Any = session
        self._tokenizer = tokenizer
        self._pooling = pooling
        self._normalize = normalize

    def tokenize(self, texts: Sequence[str]) -> list[TokenIds]:
        return token_ids(self._tokenizer, texts)

    def embed(self, texts: Sequence[str], tokens: Sequence[TokenIds] | None = None) -> Vectors:
        if self._session is None:
            raise RuntimeError(f"model {self.name} is closed")
        if tokens is None:
            tokens = self.tokenize(texts)
        if len(tokens) != len(texts):
            raise ValueError(f"{len(tokens)} token lists for {len(texts)} texts")
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        inputs = PackedInputs(tokens, self.row_tokens)
        (hidden,) = self._session.run([OUTPUT_NAME], inputs.feed())
        vectors = pool_segments(hidden, inputs, self._pooling)
        if self._normalize:
            vectors = normalize_rows(vectors)
        if not np.isfinite(vectors).all():
            raise NonFiniteEmbedding(f"model {self.name} produced non-finite embeddings")
        return vectors

    def token_vectors(self, texts: Sequence[str]) -> list[Vectors]:
        if self._session is None:
            raise RuntimeError(f"model {self.name} is closed")
        if not texts:
            return []
        inputs = PackedInputs(self.tokenize(texts), self.row_tokens)
        (hidden,) = self._session.run([OUTPUT_NAME], inputs.feed())
        flat = np.asarray(hidden, dtype=np.float32).reshape(-1, hidden.shape[-1])
        if not np.isfinite(flat).all():
            raise NonFiniteEmbedding(f"model {self.name} produced non-finite embeddings")
        return [flat[start:end] for start, end in zip(inputs.starts, inputs.ends, strict=True)]

    def close(self) -> None:
        self._session = None
        gc.collect()
        return_freed_memory()


def session_options(threads: int | None, spinning: bool) -> Any:
    """ONNX Runtime options for a packed session.

    `spinning=False` stops ORT's intra-op threads from busy-waiting between runs: in the
    server they would otherwise take CPU from the event loop that feeds them.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return options


def load_packed(
    model_dir: Path,
    manifest: Manifest,
    threads: int | None,
    row_tokens: int | None = None,
    *,
    spinning: bool = False,
) -> PackedBackend:
    """Load an imported model's packed graph and tokenizer; raise ModelUnavailable on failure.

    The packed file is checked against the manifest's checksum first, as `backend.load_local`
    does for the padded one. Messages name the model, never a path (clients see them).
    """
    import onnxruntime as ort
    from tokenizers import Tokenizer

    try:
        verify_model_file(model_dir, manifest, PACKED_MODEL_FILE)
    except ModelFileMismatch as exc:
        raise ModelUnavailable(
            f"model {manifest.name} failed to load: {exc}; "
            "re-import it with 'embedserve models import'"
        ) from exc
    try:
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=manifest.max_tokens)
        session = ort.InferenceSession(
            str(model_dir / PACKED_MODEL_FILE),
            sess_options=session_options(threads, spinning),
            providers=["CPUExecutionProvider"],
        )
        names = tuple(i.name for i in session.get_inputs())
        if sorted(names) != sorted(INPUT_NAMES):
            raise ValueError(f"packed graph inputs are {names}")
    except Exception as exc:  # onnxruntime/tokenizers raise many unrelated types
        raise ModelUnavailable(
            f"model {manifest.name} failed to load: its files are unreadable or corrupt; "
            "re-import it with 'embedserve models import'"
        ) from exc
    return PackedBackend(
        manifest.name,
        session,
        tokenizer,
        dimension=manifest.dimension,
        max_tokens=manifest.max_tokens,
        pooling=manifest.pooling,
        normalize=manifest.normalize,
        row_tokens=row_tokens,
    )
