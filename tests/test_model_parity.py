"""Integration: imported all-MiniLM-L6-v2, served by FastEmbed and by its packed graph,
matches sentence-transformers.

Needs ``make model`` first (models/sentence-transformers/all-MiniLM-L6-v2; MODELS_DIR, as `make
test` passes it, moves the models directory). Without the model the tests skip, unless
EMBEDSERVE_REQUIRE_MODEL is set (as CI should), in which case they fail.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from embedserve.engine.backend import Backend, load_local
from embedserve.engine.packed import load_packed
from embedserve.models.importer import min_cosine
from embedserve.models.store import PACKED_MODEL_FILE, Manifest, ModelStore, file_sha256

pytestmark = pytest.mark.integration

NAME = "sentence-transformers/all-MiniLM-L6-v2"
MODELS = Path(os.environ.get("MODELS_DIR") or Path(__file__).resolve().parent.parent / "models")
REFERENCE = Path(__file__).resolve().parent / "data" / "minilm_reference.json"
MIN_COSINE = 0.9999


@pytest.fixture(scope="module")
def manifest() -> Manifest:
    store = ModelStore(MODELS)
    found = store.get(NAME)
    if found is None:
        reason = f"{store.model_dir(NAME)} has no imported model: run `make model` first"
        if os.environ.get("EMBEDSERVE_REQUIRE_MODEL"):
            pytest.fail(f"EMBEDSERVE_REQUIRE_MODEL is set but {reason}")
        pytest.skip(reason)
    return found


@pytest.fixture(scope="module")
def model_dir(manifest: Manifest) -> Path:
    return ModelStore(MODELS).model_dir(manifest.name)


@pytest.fixture(scope="module")
def backend(model_dir: Path, manifest: Manifest) -> Iterator[Backend]:
    loaded = load_local(model_dir, manifest, threads=None)
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def reference() -> dict[str, object]:
    data: dict[str, object] = json.loads(REFERENCE.read_text(encoding="utf-8"))
    return data


def test_manifest_sha256_matches_model_onnx(model_dir: Path, manifest: Manifest) -> None:
    assert file_sha256(model_dir / "model.onnx") == manifest.onnx_sha256


def test_manifest_describes_minilm(manifest: Manifest) -> None:
    assert (manifest.dimension, manifest.pooling, manifest.normalize) == (384, "mean", True)
    assert manifest.max_tokens == 256
    assert manifest.parity_min_cosine is not None and manifest.parity_min_cosine >= MIN_COSINE


def test_embeddings_match_sentence_transformers(
    backend: Backend, reference: dict[str, object]
) -> None:
    texts = reference["texts"]
    assert isinstance(texts, list)
    expected = np.asarray(reference["embeddings"], dtype=np.float32)
    got = backend.embed(texts)
    assert got.dtype == np.float32
    assert min_cosine(got, expected) >= MIN_COSINE


def test_each_text_alone_matches_too(backend: Backend, reference: dict[str, object]) -> None:
    texts = reference["texts"]
    assert isinstance(texts, list)
    expected = np.asarray(reference["embeddings"], dtype=np.float32)
    got = np.concatenate([backend.embed([text]) for text in texts])
    assert min_cosine(got, expected) >= MIN_COSINE


def test_long_text_is_truncated_at_256_tokens(
    backend: Backend, reference: dict[str, object]
) -> None:
    texts = reference["texts"]
    assert isinstance(texts, list)
    longest = max(texts, key=len)
    assert backend.max_tokens == 256
    assert [len(ids) for ids in backend.tokenize([longest])] == [256]


def test_manifest_records_the_checked_packed_graph(model_dir: Path, manifest: Manifest) -> None:
    assert manifest.packed, f"no packed graph: {manifest.packed_reason}; re-run `make model`"
    assert file_sha256(model_dir / PACKED_MODEL_FILE) == manifest.packed_sha256
    assert manifest.packed_parity_min_cosine is not None
    assert manifest.packed_parity_min_cosine >= MIN_COSINE


def test_packed_graph_takes_three_dynamic_int64_inputs(model_dir: Path) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(model_dir / PACKED_MODEL_FILE), providers=["CPUExecutionProvider"]
    )
    inputs = [(i.name, i.type, i.shape) for i in session.get_inputs()]
    assert [name for name, _, _ in inputs] == ["input_ids", "position_ids", "segment_ids"]
    for _, kind, shape in inputs:
        assert kind == "tensor(int64)"
        assert len(shape) == 2 and all(isinstance(axis, str) for axis in shape)  # dynamic
    ((name, shape),) = [(o.name, o.shape) for o in session.get_outputs()]
    assert name == "last_hidden_state" and shape[-1] == 384


# 32: rows of a few short texts (the long one gets a row of its own); 256: the short texts
# share one row; 512: the text truncated to 256 tokens shares a row with "Hi" and the rest.
@pytest.mark.parametrize("row_tokens", [32, 256, 512])
def test_packed_embeddings_match_sentence_transformers(
    model_dir: Path, manifest: Manifest, reference: dict[str, object], row_tokens: int
) -> None:
    texts = reference["texts"]
    assert isinstance(texts, list)
    expected = np.asarray(reference["embeddings"], dtype=np.float32)
    packed = load_packed(model_dir, manifest, threads=None, row_tokens=row_tokens)
    try:
        got = packed.embed(texts)
    finally:
        packed.close()
    assert got.dtype == np.float32
    assert min_cosine(got, expected) >= MIN_COSINE


def test_loads_with_no_usable_temporary_directory(
    model_dir: Path, manifest: Manifest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`docker run --read-only` leaves no writable /tmp, and tempfile.gettempdir() raises
    there: neither backend may need a temporary directory to load an imported model."""

    def no_tempdir() -> str:
        raise FileNotFoundError("No usable temporary directory found (read-only root)")

    monkeypatch.setattr(tempfile, "gettempdir", no_tempdir)
    for loaded in (load_local(model_dir, manifest, threads=1), load_packed(model_dir, manifest, 1)):
        try:
            assert loaded.embed(["read-only root"]).shape == (1, manifest.dimension)
        finally:
            loaded.close()
