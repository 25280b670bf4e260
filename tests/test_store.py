"""ModelStore: safe names, manifests, list/remove."""

from __future__ import annotations

from pathlib import Path

import pytest

from embedserve.errors import InvalidModelName
from embedserve.store import MANIFEST_FILE, Manifest, ModelStore, validate_model_name


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
