"""The `embedserve` command: models list/show/remove, settings errors, `python -m`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from embedserve.cli import main
from embedserve.models.store import Manifest, ModelStore


def add_model(root: Path, name: str, packed_sha256: str = "") -> None:
    store = ModelStore(root)
    directory = store.model_dir(name)
    directory.mkdir(parents=True)
    manifest = Manifest(
        name, 384, "mean", True, 256, "test", "ab" * 32, packed_sha256=packed_sha256
    )
    store.write_manifest(directory, manifest)


def test_models_list_show_remove(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = ["models", "--models-dir", str(tmp_path)]
    assert main([*root, "list"]) == 0
    assert "no models" in capsys.readouterr().out
    add_model(tmp_path, "org/model")
    assert main([*root, "list"]) == 0
    assert "org/model\tdim=384\tmax_tokens=256\tpacked=no\t" in capsys.readouterr().out
    assert main([*root, "show", "org/model"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["max_tokens"], shown["packed"]) == (256, False)
    add_model(tmp_path, "org/packed", packed_sha256="cd" * 32)
    assert main([*root, "list"]) == 0
    assert "org/packed\tdim=384\tmax_tokens=256\tpacked=yes\t" in capsys.readouterr().out
    assert main([*root, "remove", "org/model"]) == 0
    assert main([*root, "show", "org/model"]) == 1
    assert "no model org/model" in capsys.readouterr().err


def test_unsafe_name_is_refused_by_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["models", "--models-dir", str(tmp_path), "remove", "../outside"]) == 1
    assert "invalid model name" in capsys.readouterr().err


def test_invalid_setting_exits_2_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MAX_CACHED_MODELS", "zero")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "invalid setting MAX_CACHED_MODELS='zero'" in err


def test_python_dash_m_runs_the_cli() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "embedserve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0
    assert "serve" in done.stdout and "models" in done.stdout
