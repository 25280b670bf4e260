"""Build-venv half of sequence packing: the ``model.packed.onnx`` graph and its torch parity.

Packing puts several texts into one row, one after another, with no padding between them. The
packed graph takes ``input_ids``, ``position_ids`` (0 at each text's first token) and
``segment_ids`` (0 = padding, k = the row's k-th text), all int64 [batch, length]; it builds the
block-diagonal attention mask from the segment ids inside the graph, so a token sees only its own
text, and returns ``last_hidden_state``. Pooling per text is the runtime's.

Like exporter.py (which loads this file by path: it runs as ``python -I``, so its folder is not
on sys.path) it imports only the standard library at module level; torch and the model are passed
in, so the pure helpers are importable and tested in the serving venv.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PACKED_ONNX_FILE = "model.packed.onnx"
PACKED_INPUT_NAMES = ("input_ids", "position_ids", "segment_ids")
OUTPUT_NAME = "last_hidden_state"
OPSET = 17  # as exporter.OPSET for model.onnx
PARITY_MIN_COSINE = 0.9999  # the importer's threshold (importer.PARITY_MIN_COSINE)
# model_type -> recipe. BERT numbers positions from 0 and the RoBERTa family from
# pad_token_id + 1; MPNet numbers them as RoBERTa does and also adds a relative position bias,
# which must then come from the per-text positions, not from the row's.
RECIPES = {
    "bert": "bert",
    "roberta": "roberta",
    "xlm-roberta": "roberta",
    "camembert": "roberta",
    "mpnet": "mpnet",
}

Rows = list[list[int]]


def packed_recipe(config: dict[str, Any]) -> tuple[str | None, str]:
    """The recipe for a config.json, or None and why this model gets no packed graph."""
    model_type = config.get("model_type")
    recipe = RECIPES.get(str(model_type))
    if recipe is None:
        return None, (
            f"model_type {model_type!r} has no packed recipe (packed graphs exist for "
            f"{', '.join(sorted(RECIPES))})"
        )
    if config.get("is_decoder") or config.get("add_cross_attention"):
        return None, f"{model_type} is configured as a decoder; only encoders are packed"
    if config.get("position_embedding_type", "absolute") != "absolute":
        return None, f"position_embedding_type {config['position_embedding_type']!r} is not packed"
    return recipe, ""


def pack_rows(lengths: Sequence[int], row_tokens: int) -> Rows:
    """Text indices packed first-fit, in order, into rows of at most `row_tokens` tokens."""
    rows: Rows = []
    room: list[int] = []
    for index, length in enumerate(lengths):
        if not 0 < length <= row_tokens:
            raise ValueError(f"text {index} has {length} tokens; a row holds {row_tokens}")
        row = next((r for r, free in enumerate(room) if free >= length), None)
        if row is None:
            rows.append([])
            room.append(row_tokens)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= length
    return rows


def packed_inputs(
    token_ids: Sequence[Sequence[int]], rows: Rows, pad_id: int
) -> tuple[Rows, Rows, Rows]:
    """``input_ids``, ``position_ids`` and ``segment_ids`` of `rows`, padded to the longest."""
    width = max(sum(len(token_ids[i]) for i in row) for row in rows)
    ids: Rows = []
    positions: Rows = []
    segments: Rows = []
    for row in rows:
        row_ids: list[int] = []
        row_positions: list[int] = []
        row_segments: list[int] = []
        for segment, index in enumerate(row, start=1):
            row_ids += token_ids[index]
            row_positions += range(len(token_ids[index]))
            row_segments += [segment] * len(token_ids[index])
        tail = width - len(row_ids)
        ids.append(row_ids + [pad_id] * tail)
        positions.append(row_positions + [0] * tail)
        segments.append(row_segments + [0] * tail)
    return ids, positions, segments


def packed_module(torch: Any, model: Any, recipe: str) -> Any:
    """A torch module: (input_ids, position_ids, segment_ids) -> last_hidden_state.

    `model` must be loaded with eager attention: the mask is additive, [batch, 1, L, L], with
    float32's most negative finite value where attention is not allowed (not -inf, so a padding
    token, which may attend to nothing, gets finite garbage instead of NaN).
    """
    offset = 0 if recipe == "bert" else int(model.config.pad_token_id) + 1
    lowest = torch.finfo(torch.float32).min

    class PackedEncoder(torch.nn.Module):  # type: ignore[misc]
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, position_ids: Any, segment_ids: Any) -> Any:
            allowed = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (
                segment_ids[:, None, :] != 0
            )
            mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, lowest)
            mask = mask[:, None, :, :]
            encoder = self.inner.encoder
            if recipe == "mpnet":
                hidden = self.inner.embeddings(
                    input_ids=input_ids, position_ids=position_ids + offset
                )
                # MPNetEncoder.compute_position_bias for each row's own positions: the relative
                # distance inside a text is the same as when the text is alone.
                relative = position_ids[:, None, :] - position_ids[:, :, None]
                bucket = encoder.relative_position_bucket(relative)
                bias = encoder.relative_attention_bias(bucket).permute(0, 3, 1, 2)
                for layer in encoder.layer:
                    hidden = layer(hidden, mask, bias)[0]
                return hidden
            hidden = self.inner.embeddings(
                input_ids=input_ids,
                position_ids=position_ids + offset,
                token_type_ids=torch.zeros_like(input_ids),
            )
            for layer in encoder.layer:
                out = layer(hidden, mask)
                hidden = out[0] if isinstance(out, tuple) else out  # a tuple before transformers 5
            return hidden

    return PackedEncoder(model).eval()


def packed_vectors(
    torch: Any,
    module: Any,
    token_ids: Sequence[Sequence[int]],
    *,
    row_tokens: int,
    pad_id: int,
    pooling: str,
    normalize: bool,
) -> list[list[float]]:
    """Embeddings of `token_ids` packed into rows of `row_tokens`, pooled per text."""
    rows = pack_rows([len(t) for t in token_ids], row_tokens)
    ids, positions, segments = packed_inputs(token_ids, rows, pad_id)
    with torch.no_grad():
        hidden = module(*(torch.tensor(x, dtype=torch.int64) for x in (ids, positions, segments)))
    vectors: list[Any] = [None] * len(token_ids)
    for r, row in enumerate(rows):
        start = 0
        for index in row:
            tokens = hidden[r, start : start + len(token_ids[index])]
            start += len(token_ids[index])
            pooled = tokens[0] if pooling == "cls" else tokens.mean(dim=0)
            if normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=0)
            vectors[index] = pooled.tolist()
    return vectors


def min_cosine(got: Sequence[Sequence[float]], expected: Sequence[Sequence[float]]) -> float:
    """The smallest row-wise cosine similarity; nan if any row is all zeros or not finite."""
    cosines = []
    for a, b in zip(got, expected, strict=True):
        norms = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
        cosines.append(sum(x * y for x, y in zip(a, b, strict=True)) / norms if norms else math.nan)
    return math.nan if any(math.isnan(c) for c in cosines) else min(cosines, default=math.nan)


def export_packed(
    torch: Any,
    model: Any,
    config: dict[str, Any],
    path: Path,
    *,
    token_ids: Sequence[Sequence[int]],
    reference: Sequence[Sequence[float]],
    info: dict[str, Any],
    pad_id: int,
    verify: Callable[[Path, tuple[str, ...]], None],
) -> dict[str, Any]:
    """Write the packed graph if the model has a recipe and packs faithfully in torch.

    Returns the export_info fields: ``packed`` and ``packed_reason`` (why not), or the torch
    parity of packed rows against `reference` (the sentence-transformers embeddings of the texts
    `token_ids` holds). Never raises for the model's sake: a model that cannot be packed is
    still served padded, so every failure here becomes a reason.
    """
    recipe, reason = packed_recipe(config)
    if recipe is None:
        return {"packed": False, "packed_reason": reason}
    started = time.monotonic()
    try:
        module = packed_module(torch, model, recipe)
        # Rows of max_tokens hold the short texts together; rows twice as long also put a
        # text truncated to the full max_tokens next to short ones.
        got: list[list[float]] = []
        for row_tokens in (info["max_tokens"], 2 * info["max_tokens"]):
            got += packed_vectors(
                torch,
                module,
                token_ids,
                row_tokens=row_tokens,
                pad_id=pad_id,
                pooling=info["pooling"],
                normalize=info["normalize"],
            )
        cosine = min_cosine(got, [*reference, *reference])
        if not cosine >= PARITY_MIN_COSINE:
            return {
                "packed": False,
                "packed_reason": f"packed rows differ from sentence-transformers in torch "
                f"(min cosine {cosine:.6f} < {PARITY_MIN_COSINE})",
            }
        _export_onnx(torch, module, path, pad_id)
        verify(path, PACKED_INPUT_NAMES)
    except Exception as exc:  # tracing and checking raise many types; each means "not packed"
        path.unlink(missing_ok=True)
        return {"packed": False, "packed_reason": f"packed export failed: {exc}"}
    print(f"exported {path.name} in {time.monotonic() - started:.1f}s", flush=True)
    return {"packed": True, "packed_recipe": recipe, "packed_torch_min_cosine": round(cosine, 7)}


def _export_onnx(torch: Any, module: Any, path: Path, pad_id: int) -> None:
    # Several texts a row and a padded tail, so that nothing of the mask is constant-folded.
    segments = torch.tensor(
        [[1] * 5 + [2] * 7 + [3] * 4, [1] * 6 + [2] * 3 + [0] * 7], dtype=torch.int64
    )
    positions = torch.tensor(
        [[*range(5), *range(7), *range(4)], [*range(6), *range(3)] + [0] * 7], dtype=torch.int64
    )
    tokens = (1000 + positions) % int(module.inner.config.vocab_size)
    ids = torch.where(segments > 0, tokens, torch.full_like(segments, pad_id))
    axes = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings():
        # As for model.onnx: the TorchScript exporter is deprecated but exports this correctly.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module,
            (ids, positions, segments),
            str(path),
            input_names=list(PACKED_INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes={n: axes for n in (*PACKED_INPUT_NAMES, OUTPUT_NAME)},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
