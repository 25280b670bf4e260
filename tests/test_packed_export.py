"""packed_export.py: which models get a packed graph, how rows are packed, and (in the build
venv, through scripts/packed_recipes.py) that every recipe packs like each text run alone.

tests/test_model_parity.py checks the packed graph the importer wrote for the real model.
"""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from embedserve.models import exporter, packed_export
from embedserve.models.packed_export import pack_rows, packed_inputs, packed_recipe


@pytest.mark.parametrize(
    ("model_type", "recipe"),
    [
        ("bert", "bert"),
        ("roberta", "roberta"),
        ("xlm-roberta", "roberta"),
        ("camembert", "roberta"),
        ("mpnet", "mpnet"),
    ],
)
def test_encoders_with_a_recipe(model_type: str, recipe: str) -> None:
    assert packed_recipe({"model_type": model_type}) == (recipe, "")


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"model_type": "distilbert"}, "model_type 'distilbert' has no packed recipe"),
        ({}, "model_type None has no packed recipe"),
        ({"model_type": "bert", "is_decoder": True}, "configured as a decoder"),
        (
            {"model_type": "bert", "position_embedding_type": "relative_key"},
            "position_embedding_type 'relative_key'",
        ),
    ],
)
def test_models_without_a_packed_graph_say_why(config: dict[str, object], reason: str) -> None:
    recipe, why = packed_recipe(config)
    assert recipe is None
    assert reason in why


def test_pack_rows_is_first_fit_in_order() -> None:
    assert pack_rows([3, 2, 6, 1, 4], 8) == [[0, 1, 3], [2], [4]]
    assert pack_rows([8, 1], 8) == [[0], [1]]
    assert pack_rows([], 8) == []


@pytest.mark.parametrize("lengths", [[3, 9], [0]])
def test_pack_rows_refuses_a_text_that_fits_no_row(lengths: list[int]) -> None:
    with pytest.raises(ValueError, match="a row holds 8"):
        pack_rows(lengths, 8)


def test_packed_inputs_restart_positions_and_pad_the_tail() -> None:
    tokens = [[101, 7, 102], [101, 102], [101, 5, 6, 102]]
    ids, positions, segments = packed_inputs(tokens, [[0, 1], [2]], pad_id=0)
    assert ids == [[101, 7, 102, 101, 102], [101, 5, 6, 102, 0]]
    assert positions == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert segments == [[1, 1, 1, 2, 2], [1, 1, 1, 1, 0]]


def test_min_cosine() -> None:
    assert packed_export.min_cosine([[1, 0], [1, 1]], [[2, 0], [0, 1]]) == pytest.approx(
        math.sqrt(0.5)
    )
    assert math.isnan(packed_export.min_cosine([[1, 0], [0, 0]], [[1, 0], [1, 0]]))


def test_unsupported_model_gets_no_graph_and_a_reason(tmp_path: Path) -> None:
    path = tmp_path / packed_export.PACKED_ONNX_FILE

    def verify(p: Path, names: tuple[str, ...]) -> None:
        raise AssertionError("nothing to verify")

    fields = packed_export.export_packed(
        None,  # torch is never touched
        None,
        {"model_type": "gpt2"},
        path,
        token_ids=[[1, 2]],
        reference=[[1.0, 0.0]],
        info={"max_tokens": 8, "pooling": "mean", "normalize": True},
        pad_id=0,
        verify=verify,
    )
    assert fields == {"packed": False, "packed_reason": packed_recipe({"model_type": "gpt2"})[1]}
    assert not path.exists()


def test_a_failed_packed_export_is_a_reason_not_an_error(tmp_path: Path) -> None:
    path = tmp_path / packed_export.PACKED_ONNX_FILE
    path.write_bytes(b"half-written graph")

    def verify(p: Path, names: tuple[str, ...]) -> None:
        raise AssertionError("nothing to verify")

    fields = packed_export.export_packed(
        object(),  # not torch: building the module fails
        object(),
        {"model_type": "bert"},
        path,
        token_ids=[[1, 2]],
        reference=[[1.0, 0.0]],
        info={"max_tokens": 8, "pooling": "mean", "normalize": True},
        pad_id=0,
        verify=verify,
    )
    assert fields["packed"] is False
    assert str(fields["packed_reason"]).startswith("packed export failed: ")
    assert not path.exists()


def test_parity_texts_mix_what_packing_must_survive() -> None:
    texts = exporter.PARITY_TEXTS
    assert "" in texts  # nothing but [CLS] [SEP]
    assert sum(1 for t in texts if t and " " not in t) >= 2  # one-word texts
    assert max(len(t.split()) for t in texts) > 600  # truncated to the full token limit


ROOT = Path(__file__).resolve().parent.parent
BUILD_PYTHON = ROOT / ".venv-build" / "bin" / "python"


@pytest.fixture(scope="module")
def recipe_graphs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scripts/packed_recipes.py's output: a packed graph per recipe and what it must give."""
    if not BUILD_PYTHON.is_file():
        reason = f"no build venv at {BUILD_PYTHON.parent.parent}: run `make model` first"
        if os.environ.get("EMBEDSERVE_REQUIRE_MODEL"):
            pytest.fail(f"EMBEDSERVE_REQUIRE_MODEL is set but {reason}")
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("recipes")
    subprocess.run(
        [str(BUILD_PYTHON), "-W", "ignore", str(ROOT / "scripts" / "packed_recipes.py"), str(out)],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        check=True,
        capture_output=True,
        timeout=100,
    )
    return out


@pytest.mark.integration
@pytest.mark.parametrize("model_type", sorted(packed_export.RECIPES))
def test_every_recipe_packs_like_each_text_alone(recipe_graphs: Path, model_type: str) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(recipe_graphs / f"{model_type}.onnx"), providers=["CPUExecutionProvider"]
    )
    data = np.load(recipe_graphs / f"{model_type}.npz")
    (hidden,) = session.run(None, {n: data[n] for n in packed_export.PACKED_INPUT_NAMES})
    assert np.isfinite(hidden).all()  # padding, which attends to nothing, included
    real = data["segment_ids"] > 0
    assert real.sum() < real.size  # the rows have padded tails
    assert np.abs(hidden[real] - data["expected"][real]).max() < 1e-4
