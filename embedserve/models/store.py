"""Where model files live: the models directory, its per-model manifests, and safe names.

Model names contain ``/`` (``BAAI/bge-small-en-v1.5``) and map to nested directories under
the models root. `ModelStore.model_dir` is the only way from a name to a path, and it
refuses anything that could leave the root (``..``, absolute paths, NUL bytes, backslashes).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from embedserve.errors import InvalidModelName

MANIFEST_FILE = "embedserve.json"
MODEL_FILE = "model.onnx"
PACKED_MODEL_FILE = "model.packed.onnx"
MAX_NAME_LENGTH = 200
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_RESERVED = {".cache", ".staging"}


def validate_model_name(name: str) -> str:
    """Return `name` if it is a safe model name (``org/model`` style); raise otherwise."""
    if not isinstance(name, str) or not name:
        raise InvalidModelName("model name must be a non-empty string")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidModelName(f"model name is longer than {MAX_NAME_LENGTH} characters")
    segments = name.split("/")
    for segment in segments:
        # The regex forbids empty segments, leading dots (so '..' and '.cache'), NUL,
        # backslashes, '%' (URL-encoded traversal) and whitespace.
        if not _SEGMENT.fullmatch(segment) or segment.endswith("."):
            raise InvalidModelName(
                "invalid model name: use letters, digits, '.', '_' or '-' in "
                "'/'-separated parts, e.g. 'BAAI/bge-small-en-v1.5'"
            )
    return name


@dataclass(frozen=True)
class Manifest:
    """What embedserve knows about an imported model directory (``embedserve.json``)."""

    name: str
    dimension: int
    pooling: str
    normalize: bool
    max_tokens: int
    source: str
    onnx_sha256: str
    parity_min_cosine: float | None = None
    created_at: str = ""
    format_version: int = 1
    # The packed graph (``model.packed.onnx``): its sha256, or "" when the model has none; then
    # `packed_reason` says why (empty in a manifest written before packed graphs existed).
    packed_sha256: str = ""
    packed_reason: str = ""
    packed_parity_min_cosine: float | None = None

    @property
    def packed(self) -> bool:
        """True when the model directory holds a parity-checked packed graph."""
        return bool(self.packed_sha256)

    def to_json(self) -> dict[str, object]:
        """The manifest as a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Manifest:
        """Build a manifest from parsed JSON, ignoring unknown keys; raises ValueError."""
        known = {f.name for f in fields(cls)}
        try:
            manifest = cls(**{k: v for k, v in data.items() if k in known})  # type: ignore[arg-type]
        except TypeError as exc:
            raise ValueError(f"incomplete manifest: {exc}") from exc
        if manifest.pooling not in ("mean", "cls"):
            raise ValueError(f"unknown pooling {manifest.pooling!r}")
        return manifest


class ModelFileMismatch(ValueError):
    """A model file is missing or differs from the checksum its manifest recorded."""


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (90 MB: ~0.05 s from the page cache)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_model_file(directory: Path, manifest: Manifest, filename: str = MODEL_FILE) -> None:
    """Check a graph (``model.onnx`` or ``model.packed.onnx``) against the manifest's sha256;
    raise ModelFileMismatch if it is missing, truncated or altered, or is the packed graph of
    a manifest that records none. A manifest without ``onnx_sha256`` skips the padded check.

    ONNX Runtime rejects a truncated file, but bytes flipped inside the weights load fine
    and turn every embedding into NaN; only the checksum tells such a file apart.
    """
    if filename == PACKED_MODEL_FILE:
        if not manifest.packed:
            reason = f" ({manifest.packed_reason})" if manifest.packed_reason else ""
            raise ModelFileMismatch(f"the model has no {PACKED_MODEL_FILE}{reason}")
        _verify_file(directory / filename, manifest.packed_sha256)
    elif filename == MODEL_FILE:
        if manifest.onnx_sha256:
            _verify_file(directory / filename, manifest.onnx_sha256)
    else:
        raise ValueError(f"no checksum is kept for {filename}")


def _verify_file(path: Path, expected_sha256: str) -> None:
    try:
        actual = file_sha256(path)
    except OSError as exc:
        raise ModelFileMismatch(f"{path.name} is unreadable: {exc.strerror}") from exc
    if actual != expected_sha256:
        raise ModelFileMismatch(
            f"{path.name} does not match the sha256 in its manifest (corrupt or truncated)"
        )


@dataclass(frozen=True)
class ModelSpec:
    """Where a resolved model comes from: an imported directory or FastEmbed's catalogue."""

    name: str
    source: str  # "local" | "catalogue"
    directory: Path | None = None
    manifest: Manifest | None = None


class ModelStore:
    """The models directory. Owns no in-memory state; every call reads the file system."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def model_dir(self, name: str) -> Path:
        """The directory for `name` under the root; raises InvalidModelName for unsafe names."""
        validate_model_name(name)  # also keeps out .cache and .staging: no part starts with "."
        root = self.root.resolve()
        path = (root / name).resolve()
        if not path.is_relative_to(root) or path == root:
            raise InvalidModelName("invalid model name: outside the models directory")
        return path

    def get(self, name: str) -> Manifest | None:
        """The manifest of a local model, or None when there is no such model directory."""
        manifest_path = self.model_dir(name) / MANIFEST_FILE
        if not manifest_path.is_file():
            return None
        return self._read(manifest_path)

    def list(self) -> list[Manifest]:
        """Every model directory with a readable manifest, sorted by name."""
        if not self.root.is_dir():
            return []
        found: list[Manifest] = []
        for manifest_path in sorted(self.root.rglob(MANIFEST_FILE)):
            relative = manifest_path.parent.relative_to(self.root)
            if relative.parts and relative.parts[0] in _RESERVED:
                continue
            try:
                found.append(self._read(manifest_path))
            except ValueError:
                continue
        return found

    def remove(self, name: str) -> bool:
        """Delete a local model directory; False when there was none."""
        directory = self.model_dir(name)
        if not (directory / MANIFEST_FILE).is_file():
            return False
        shutil.rmtree(directory)
        # Drop now-empty organisation folders ('BAAI/') but never the root itself.
        parent = directory.parent
        root = self.root.resolve()
        while parent != root and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
        return True

    def write_manifest(self, directory: Path, manifest: Manifest) -> None:
        """Write `manifest` into `directory` (used on a staging dir before it is moved)."""
        (directory / MANIFEST_FILE).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")

    def staging_dir(self) -> Path:
        """A fresh empty directory on the same file system as the models, for atomic renames."""
        staging = self.root / ".staging"
        staging.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=staging))

    def cache_dir(self) -> Path:
        """Where FastEmbed keeps catalogue models it downloads (for users who are online)."""
        return self.root / ".cache"

    @staticmethod
    def _read(manifest_path: Path) -> Manifest:
        try:
            data = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"unreadable manifest {manifest_path.name}: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError("manifest is not a JSON object")
        return Manifest.from_json(data)
