"""Export a packed graph for a tiny random model of every packed recipe, with what it must give.

    .venv-build/bin/python scripts/packed_recipes.py OUTPUT_DIR

Runs in the build venv (torch + transformers). No checkpoint of the RoBERTa family or MPNet is
at hand offline, so each model_type in packed_export.RECIPES gets a small randomly initialised
model instead: the recipe is right when the packed graph gives every text of a packed row the
hidden states the model gives that text run alone. For each model_type this writes
``<model_type>.onnx`` (the packed graph, exported as the importer exports it) and
``<model_type>.npz`` (``input_ids``, ``position_ids``, ``segment_ids`` of a few packed rows, and
``expected``: each text's hidden states from the model alone, in the same layout, zeros in the
padding). tests/test_packed_export.py runs the graphs with ONNX Runtime and compares.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import random
from pathlib import Path
from types import ModuleType
from typing import Any

ROW_TOKENS = 96
# Text lengths: a lone special token's worth, short, long, and one that fills a row.
LENGTHS = (1, 2, 60, 7, 30, 3, 96, 1, 15)
SMALL = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "vocab_size": 120,
}


def _packed_export() -> ModuleType:
    path = Path(__file__).resolve().parent.parent / "embedserve" / "models" / "packed_export.py"
    spec = importlib.util.spec_from_file_location("packed_export", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _config(transformers: Any, model_type: str) -> Any:
    # RoBERTa-style positions start at pad_token_id + 1, so they need that many more slots.
    if model_type == "bert":
        return transformers.BertConfig(max_position_embeddings=96, pad_token_id=0, **SMALL)
    return transformers.AutoConfig.for_model(
        model_type, max_position_embeddings=98, pad_token_id=1, **SMALL
    )


def main() -> None:
    """Write the graphs and expectations for every recipe into OUTPUT_DIR."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("output", type=Path)
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    torch = importlib.import_module("torch")
    transformers = importlib.import_module("transformers")
    numpy = importlib.import_module("numpy")
    packed_export = _packed_export()

    for model_type in sorted(packed_export.RECIPES):
        torch.manual_seed(0)
        rng = random.Random(0)
        config = _config(transformers, model_type)
        model = transformers.AutoModel.from_config(config, attn_implementation="eager").eval()
        recipe, reason = packed_export.packed_recipe(config.to_dict())
        if recipe is None:
            raise SystemExit(f"{model_type}: {reason}")
        texts = [[rng.randrange(5, config.vocab_size) for _ in range(n)] for n in LENGTHS]
        rows = packed_export.pack_rows(LENGTHS, ROW_TOKENS)
        ids, positions, segments = packed_export.packed_inputs(texts, rows, config.pad_token_id)
        expected = numpy.zeros((len(rows), len(ids[0]), config.hidden_size), dtype="float32")
        with torch.no_grad():
            for r, row in enumerate(rows):
                start = 0
                for index in row:
                    alone = model(input_ids=torch.tensor([texts[index]])).last_hidden_state[0]
                    expected[r, start : start + len(texts[index])] = alone.numpy()
                    start += len(texts[index])
        module = packed_export.packed_module(torch, model, recipe)
        packed_export._export_onnx(
            torch, module, args.output / f"{model_type}.onnx", config.pad_token_id
        )
        numpy.savez(
            args.output / f"{model_type}.npz",
            input_ids=numpy.array(ids, dtype="int64"),
            position_ids=numpy.array(positions, dtype="int64"),
            segment_ids=numpy.array(segments, dtype="int64"),
            expected=expected,
        )
        print(f"{model_type}: recipe {recipe}, rows {rows}", flush=True)


if __name__ == "__main__":
    main()
