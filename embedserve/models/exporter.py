"""Standalone build-venv script: sentence-transformers checkpoint -> FastEmbed model directory.

It runs inside the separate build venv (torch, transformers, sentence-transformers, onnx), which
does not have embedserve installed, so it imports nothing from embedserve: only the standard
library at module level, and the heavy libraries lazily inside `main`. That also keeps the pure
helpers importable (and unit-testable) from the serving venv, where torch is absent.

    BUILD_PY embedserve/models/exporter.py CHECKPOINT_DIR OUTPUT_DIR

writes into OUTPUT_DIR: ``model.onnx`` (inputs ``input_ids``, ``attention_mask`` and, when the
model takes it, ``token_type_ids``, all int64 with dynamic batch and sequence axes; output
``last_hidden_state``), for the architectures packed_export.py has a recipe for also
``model.packed.onnx`` (the packed graph), the tokenizer files FastEmbed reads, ``parity.npy``
(the checkpoint's own embeddings of `PARITY_TEXTS`) and ``export_info.json`` (dimension,
pooling, normalize, max_tokens, parity texts, and ``packed`` with ``packed_reason`` when false).
Exit status 0 on success, 2 on an unsupported or broken checkpoint; a model that cannot be
packed is no error, it is served padded.

One module because the build venv runs it by path, without embedserve installed: the export is
one pipeline (read the checkpoint, export, verify, reference embeddings), and the packed graph,
the one separable step, is already `packed_export.py`.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import inspect
import json
import shutil
import sys
import time
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any


def _sibling(name: str) -> ModuleType:
    # Loaded by path: run as `python -I exporter.py`, this folder is not on sys.path, and
    # embedserve is not installed in the build venv.
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {name}.py beside {__file__}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


packed_export = _sibling("packed_export")

ONNX_FILE = "model.onnx"
INFO_FILE = "export_info.json"
PARITY_FILE = "parity.npy"
OUTPUT_NAME = "last_hidden_state"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
COPIED_FILES = ("tokenizer.json", "config.json", "special_tokens_map.json")
OPTIONAL_FILES = ("LICENSE", "NOTICE")
OPSET = 17
SUPPORTED_MODULES = {"Transformer", "Pooling", "Normalize"}


class ExportError(Exception):
    """The checkpoint cannot be exported faithfully; the message says why."""


def _long_text() -> str:
    # ~700 words, far past any 256/512 token limit, so truncation is part of the parity check.
    topics = ("rivers", "compilers", "bread", "glaciers", "jazz", "satellites", "tax law")
    return " ".join(
        f"Paragraph {i} is about {topics[i % len(topics)]}: it explains how the parts fit "
        f"together, why step {i * 7 % 13} matters, and what happens when it is skipped."
        for i in range(30)
    )


# Packed into rows, these also check packing: rows that hold a text of nothing but the special
# tokens (""), one-word texts, short ones and one truncated to the full token limit.
PARITY_TEXTS: tuple[str, ...] = (
    "hello",
    "",
    "a",
    "The quick brown fox jumps over the lazy dog.",
    "How do I reset my password if I no longer have access to my email account?",
    "Café déjà vu — naïve façade, 東京タワー, Привет мир! 🎉🚀👍🏽",
    "def add(a, b):\n    return a + b  # trailing comment\n\n\tindented\tline",
    "Embeddings map text to vectors; similar meanings should land close together.",
    _long_text(),
    "OK",
    "Sequence packing puts several texts into one row; each must still see only itself.",
)


def read_json(path: Path) -> Any:
    """Parse a JSON file; raise ExportError naming the file when it is unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read {path.name}: {exc}") from exc


def read_modules(checkpoint: Path) -> list[dict[str, Any]]:
    """The sentence-transformers module list; a bare HF checkpoint counts as Transformer only."""
    path = checkpoint / "modules.json"
    if not path.is_file():
        return [{"path": "", "type": "sentence_transformers.models.Transformer"}]
    modules = read_json(path)
    if not isinstance(modules, list):
        raise ExportError("modules.json is not a list")
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        if kind not in SUPPORTED_MODULES:
            raise ExportError(
                f"module {kind!r} is not supported (only {sorted(SUPPORTED_MODULES)})"
            )
    return modules


def _module_dir(checkpoint: Path, modules: list[dict[str, Any]], kind: str) -> Path | None:
    for module in modules:
        if str(module.get("type", "")).rsplit(".", 1)[-1] == kind:
            return checkpoint / str(module.get("path", ""))
    return None


def read_pooling(checkpoint: Path, modules: list[dict[str, Any]]) -> str:
    """'mean' or 'cls' from the Pooling module (old boolean or new string config)."""
    pooling_dir = _module_dir(checkpoint, modules, "Pooling")
    if pooling_dir is None:
        return "mean"  # what sentence-transformers itself adds to a bare HF checkpoint
    config = read_json(pooling_dir / "config.json")
    mode = config.get("pooling_mode")
    if isinstance(mode, str):
        modes = {mode}
    else:
        modes = {
            key.removeprefix("pooling_mode_").removesuffix("_tokens").removesuffix("_token")
            for key, value in config.items()
            if key.startswith("pooling_mode_") and value is True
        }
    if modes == {"mean"}:
        return "mean"
    if modes == {"cls"}:
        return "cls"
    raise ExportError(f"pooling {sorted(modes)} is not supported (only mean or cls)")


def read_normalize(modules: list[dict[str, Any]]) -> bool:
    """True when the pipeline ends in a Normalize module."""
    return any(str(m.get("type", "")).rsplit(".", 1)[-1] == "Normalize" for m in modules)


def read_max_tokens(hf_dir: Path) -> int:
    """The token limit sentence-transformers applies: max_seq_length, capped by the positions."""
    config = read_json(hf_dir / "config.json")
    positions = config.get("max_position_embeddings")
    limits: list[int] = []
    st_path = hf_dir / "sentence_bert_config.json"
    if st_path.is_file():
        max_seq = read_json(st_path).get("max_seq_length")
        if isinstance(max_seq, int) and max_seq > 0:
            limits.append(max_seq)
    if not limits and (hf_dir / "tokenizer_config.json").is_file():
        max_len = read_json(hf_dir / "tokenizer_config.json").get("model_max_length")
        if isinstance(max_len, int) and 0 < max_len < 1_000_000:
            limits.append(max_len)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    if not limits:
        raise ExportError("no max_seq_length, model_max_length or max_position_embeddings")
    return min(limits)


def tokenizer_config_for(original: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    """The tokenizer config FastEmbed should read: the original with the real token limit.

    FastEmbed truncates at min(model_max_length, max_length). MiniLM ships 512 there while
    sentence-transformers truncates at 256, which changes every embedding of a long text.
    """
    config = dict(original)
    config["model_max_length"] = max_tokens
    config.pop("max_length", None)
    return config


def _export_onnx(torch: Any, model: Any, path: Path, names: tuple[str, ...]) -> None:
    class LastHiddenState(torch.nn.Module):  # type: ignore[misc]
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *inputs: Any) -> Any:
            return self.inner(**dict(zip(names, inputs, strict=True))).last_hidden_state

    ids = torch.full((2, 16), 1000, dtype=torch.int64)
    # A padded row on purpose: traced with an all-ones mask, transformers may drop the mask
    # from the graph entirely (the dynamo exporter did so here, silently).
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    example = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    axes = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo; it is the one that
        # exports this model correctly with torch 2.13 and needs no onnxscript.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            LastHiddenState(model).eval(),
            tuple(example[n] for n in names),
            str(path),
            input_names=list(names),
            output_names=[OUTPUT_NAME],
            dynamic_axes={n: axes for n in (*names, OUTPUT_NAME)},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def verify_graph(onnx: Any, path: Path, names: tuple[str, ...]) -> None:
    """Check the saved graph: one file, the expected int64 inputs, dynamic axes, one output."""
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    inputs = [(i.name, i.type.tensor_type) for i in model.graph.input]
    if tuple(name for name, _ in inputs) != names:
        raise ExportError(f"graph inputs are {[n for n, _ in inputs]}, expected {list(names)}")
    for name, tensor in inputs:
        if tensor.elem_type != onnx.TensorProto.INT64:
            raise ExportError(f"input {name} is not int64")
        if not all(d.dim_param for d in tensor.shape.dim):
            raise ExportError(f"input {name} has a fixed axis: {tensor.shape}")
    outputs = [o.name for o in model.graph.output]
    if outputs != [OUTPUT_NAME]:
        raise ExportError(f"graph outputs are {outputs}, expected [{OUTPUT_NAME!r}]")


def reference_embeddings(checkpoint: Path, hf_dir: Path, info: dict[str, Any]) -> Any:
    """The checkpoint's own embeddings of PARITY_TEXTS, as a float32 array."""
    try:
        st = importlib.import_module("sentence_transformers")
    except ImportError:
        return _torch_embeddings(hf_dir, info)
    model = st.SentenceTransformer(str(checkpoint), device="cpu")
    if model.max_seq_length != info["max_tokens"]:
        raise ExportError(f"max_seq_length {model.max_seq_length} != {info['max_tokens']}")
    return model.encode(list(PARITY_TEXTS), convert_to_numpy=True).astype("float32")


def _torch_embeddings(hf_dir: Path, info: dict[str, Any]) -> Any:
    torch = importlib.import_module("torch")
    transformers = importlib.import_module("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    model = transformers.AutoModel.from_pretrained(str(hf_dir)).eval()
    batch = tokenizer(
        list(PARITY_TEXTS),
        padding=True,
        truncation=True,
        max_length=info["max_tokens"],
        return_tensors="pt",
    )
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    if info["pooling"] == "cls":
        pooled = hidden[:, 0]
    else:
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    if info["normalize"]:
        pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
    return pooled.numpy().astype("float32")


def export(checkpoint: Path, output: Path) -> dict[str, Any]:
    """Write the model directory into `output`; return the export_info written there."""
    torch = importlib.import_module("torch")
    transformers = importlib.import_module("transformers")
    onnx = importlib.import_module("onnx")
    numpy = importlib.import_module("numpy")

    modules = read_modules(checkpoint)
    hf_dir = _module_dir(checkpoint, modules, "Transformer") or checkpoint
    info: dict[str, Any] = {
        "pooling": read_pooling(checkpoint, modules),
        "normalize": read_normalize(modules),
        "max_tokens": read_max_tokens(hf_dir),
    }
    output.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    # Eager attention traces to plain MatMul/Softmax ops that ONNX Runtime runs everywhere.
    model = transformers.AutoModel.from_pretrained(str(hf_dir), attn_implementation="eager")
    model.eval()
    accepted = inspect.signature(model.forward).parameters
    names = tuple(n for n in INPUT_NAMES if n in accepted)
    _export_onnx(torch, model, output / ONNX_FILE, names)
    verify_graph(onnx, output / ONNX_FILE, names)
    print(f"exported {ONNX_FILE} in {time.monotonic() - started:.1f}s", flush=True)

    for name in COPIED_FILES + OPTIONAL_FILES:
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, output / name)
        elif (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, output / name)
    if (
        not (output / "tokenizer.json").is_file()
        or not (output / "special_tokens_map.json").is_file()
    ):
        _save_fast_tokenizer(transformers, hf_dir, output)
    tokenizer_config_path = hf_dir / "tokenizer_config.json"
    original = read_json(tokenizer_config_path) if tokenizer_config_path.is_file() else {}
    config = tokenizer_config_for(original, info["max_tokens"])
    (output / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    started = time.monotonic()
    reference = reference_embeddings(checkpoint, hf_dir, info)
    info["dimension"] = int(reference.shape[1])
    info["parity_texts"] = list(PARITY_TEXTS)
    info["onnx_inputs"] = list(names)
    info["versions"] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "onnx": onnx.__version__,
    }
    numpy.save(output / PARITY_FILE, reference)
    print(f"reference embeddings in {time.monotonic() - started:.1f}s", flush=True)

    info.update(_export_packed(torch, onnx, transformers, model, hf_dir, output, info, reference))
    if not info["packed"]:
        print(f"no packed graph: {info['packed_reason']}", flush=True)
    (output / INFO_FILE).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return info


def _export_packed(
    torch: Any,
    onnx: Any,
    transformers: Any,
    model: Any,
    hf_dir: Path,
    output: Path,
    info: dict[str, Any],
    reference: Any,
) -> dict[str, Any]:
    """packed_export.export_packed for this checkpoint; the export_info fields it returns."""
    config = read_json(hf_dir / "config.json")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    token_ids = tokenizer(list(PARITY_TEXTS), truncation=True, max_length=info["max_tokens"])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    fields: dict[str, Any] = packed_export.export_packed(
        torch,
        model,
        config,
        output / packed_export.PACKED_ONNX_FILE,
        token_ids=token_ids["input_ids"],
        reference=reference.tolist(),
        info=info,
        pad_id=int(pad_id),
        verify=lambda path, names: verify_graph(onnx, path, names),
    )
    return fields


def _save_fast_tokenizer(transformers: Any, hf_dir: Path, output: Path) -> None:
    """Derive tokenizer.json / special_tokens_map.json for checkpoints that ship only vocab."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir), use_fast=True)
    if not (output / "tokenizer.json").is_file():
        tokenizer.backend_tokenizer.save(str(output / "tokenizer.json"))
    if not (output / "special_tokens_map.json").is_file():
        tokens = {k: str(v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        (output / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        description="Export a sentence-transformers checkpoint for FastEmbed."
    )
    parser.add_argument("checkpoint", type=Path, help="sentence-transformers checkpoint dir")
    parser.add_argument("output", type=Path, help="directory to write the model files into")
    args = parser.parse_args(argv)
    try:
        info = export(args.checkpoint.resolve(), args.output)
    except ExportError as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 2
    summary = {k: v for k, v in info.items() if k != "parity_texts"}
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
