"""ModelStore: safe names, manifests, list/remove, the model file's checksum."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest

from embedserve.errors import InvalidModelName, ModelUnavailable
from embedserve.store import (
    MANIFEST_FILE,
    MODEL_FILE,
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


def test_loading_a_mismatching_model_file_fails_before_onnx_runtime(tmp_path: Path) -> None:
    from embedserve.backend import load_local

    (tmp_path / MODEL_FILE).write_bytes(b"not a model")
    with pytest.raises(ModelUnavailable, match="org/m failed to load") as failed:
        load_local(tmp_path, manifest("org/m"), threads=1)
    assert str(tmp_path) not in failed.value.message
    assert isinstance(failed.value.__cause__, ModelFileMismatch)
