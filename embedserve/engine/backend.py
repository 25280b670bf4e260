"""The only module that imports FastEmbed / ONNX Runtime: a synchronous text -> vectors model.

Everything here blocks (model loading, inference, tokenisation) and is meant to run in a
worker thread; the batcher and registry call it through `anyio.to_thread`.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from embedserve.engine.tokens import Token, TokenizerViews
from embedserve.errors import ModelUnavailable, NotSupported
from embedserve.models.store import Manifest, ModelFileMismatch, ModelSpec, verify_model_file

logger = logging.getLogger(__name__)

Vectors = npt.NDArray[np.float32]
# A text's token ids as the model runs them (specials included, truncation applied).
TokenIds = Sequence[int]


def token_ids(tokenizer: Any, texts: Sequence[str]) -> list[TokenIds]:
    """The ids a `tokenizers.Tokenizer` gives each text (no padding, as it truncates).

    One text: `encode`, which keeps the GIL (`encode_batch` releases it and, on the event
    loop, then waits up to the interpreter's switch interval, 5 ms, to get it back). More:
    `encode_batch_fast` where the library has it (0.21+: no character offsets, ~15% less
    time on the mixed corpus), else `encode_batch`.
    """
    if len(texts) == 1:
        return [tokenizer.encode(texts[0]).ids]
    encode = getattr(tokenizer, "encode_batch_fast", None) or tokenizer.encode_batch
    return [e.ids for e in encode(list(texts))]


# FastEmbed keeps custom models in class-level lists; registration is not thread-safe.
_REGISTRATION_LOCK = threading.Lock()


class Backend(Protocol):
    """A loaded model. `embed` blocks for milliseconds: call it from a worker thread.

    `tokenize` is cheap for short texts (tens of microseconds) and may run on the event
    loop for them; callers move large inputs to a worker thread. `packed` says how the batcher
    should plan: False, texts of one batch are padded to the longest (plan by length); True,
    texts are packed into rows of `row_tokens` slots (see `packed.PackedBackend`).
    """

    name: str
    dimension: int
    max_tokens: int
    packed: bool
    row_tokens: int

    def embed(self, texts: Sequence[str], tokens: Sequence[TokenIds] | None = None) -> Vectors:
        """Embed `texts` as one batch: float32 array of shape (len(texts), dimension).

        `tokens`, when given, is `tokenize(texts)`: a backend that can run ids uses them
        instead of tokenising again.
        """
        ...

    def tokenize(self, texts: Sequence[str]) -> list[TokenIds]:
        """Each text's token ids as a batch runs them (specials included, truncation applied)."""
        ...

    def token_details(
        self, texts: Sequence[str], *, add_special_tokens: bool = True
    ) -> list[list[Token]]:
        """Each text's tokens with their text and character offsets (`tokens.Token`)."""
        ...

    def decode(
        self, ids: Sequence[Sequence[int]], *, skip_special_tokens: bool = True
    ) -> list[str]:
        """Each id sequence back to text; ids outside the vocabulary are skipped."""
        ...

    def token_vectors(self, texts: Sequence[str]) -> list[Vectors]:
        """Each text's last hidden state, one row per token (specials included, truncation
        applied), before pooling; raises NotSupported when the backend cannot give it."""
        ...

    def close(self) -> None:
        """Release the model's memory. The backend must not be used afterwards."""
        ...


class NonFiniteEmbedding(RuntimeError):
    """The model returned NaN or infinite values: its weights are damaged."""


class FastEmbedBackend(TokenizerViews):
    """A FastEmbed `TextEmbedding` plus an unpadded copy of its tokenizer for counting.

    FastEmbed takes texts, not ids, so a text is tokenised twice here: once to plan (by
    length), once by FastEmbed to run. The packed backend runs the planning ids themselves.
    """

    packed = False

    def __init__(self, name: str, model: Any) -> None:
        self.name = name
        self._model: Any = model
        inner = model.model
        if getattr(inner, "tokenizer", None) is None:
            inner.load_onnx_model()
        from tokenizers import Tokenizer

        # A copy, because FastEmbed's own tokenizer pads to the longest text in a batch.
        self._tokenizer = Tokenizer.from_str(inner.tokenizer.to_str())
        self._tokenizer.no_padding()
        truncation = self._tokenizer.truncation
        self.max_tokens = int(truncation["max_length"]) if truncation else 512
        self.dimension = int(model.embedding_size)
        self.row_tokens = self.max_tokens

    def embed(self, texts: Sequence[str], tokens: Sequence[TokenIds] | None = None) -> Vectors:
        if self._model is None:
            raise RuntimeError(f"model {self.name} is closed")
        rows = list(self._model.embed(list(texts), batch_size=max(1, len(texts))))
        vectors = np.asarray(rows, dtype=np.float32).reshape(len(texts), self.dimension)
        # Damaged weights give NaN rows, which JSON would carry as nulls with a 200; a few
        # microseconds per batch turn them into an error (and fail the load's warm-up).
        if not np.isfinite(vectors).all():
            raise NonFiniteEmbedding(f"model {self.name} produced non-finite embeddings")
        return vectors

    def tokenize(self, texts: Sequence[str]) -> list[TokenIds]:
        return token_ids(self._tokenizer, texts)

    def token_vectors(self, texts: Sequence[str]) -> list[Vectors]:
        raise NotSupported(
            f"model {self.name} has no packed graph, which token vectors need; re-import it "
            "with 'embedserve models import' (and leave ENABLE_PACKING on)"
        )

    def close(self) -> None:
        self._model = None
        gc.collect()
        return_freed_memory()


def return_freed_memory() -> None:
    """Ask glibc to hand freed heap back to the OS, so an offloaded model's RSS really drops."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def catalogue_names() -> frozenset[str]:
    """Names FastEmbed can download from its catalogue (for users who are online)."""
    from fastembed import TextEmbedding

    return frozenset(m["model"] for m in TextEmbedding.list_supported_models())


def load_local(model_dir: Path, manifest: Manifest, threads: int | None) -> FastEmbedBackend:
    """Load an imported model directory (``model.onnx`` + tokenizer files) with no network.

    Raises ModelUnavailable when ``model.onnx`` does not match the manifest's checksum or
    the files do not load. Messages name the model, never a path (clients see them).
    """
    from fastembed import TextEmbedding
    from fastembed.common.model_description import ModelSource, PoolingType

    try:
        verify_model_file(model_dir, manifest)
    except ModelFileMismatch as exc:
        raise ModelUnavailable(
            f"model {manifest.name} failed to load: {exc}; "
            "re-import it with 'embedserve models import'"
        ) from exc

    # A private alias, so an imported model never collides with a catalogue entry of the
    # same name whose file layout differs, and a re-import with other settings gets a new one.
    alias = f"embedserve-local/{manifest.name}@{manifest.onnx_sha256[:12] or 'dev'}"
    with _REGISTRATION_LOCK:
        known = {m["model"].lower() for m in TextEmbedding.list_supported_models()}
        if alias.lower() not in known:
            TextEmbedding.add_custom_model(
                model=alias,
                pooling=PoolingType.MEAN if manifest.pooling == "mean" else PoolingType.CLS,
                normalization=manifest.normalize,
                sources=ModelSource(hf=manifest.source or manifest.name),
                dim=manifest.dimension,
                model_file="model.onnx",
            )
    # cache_dir: the model's own directory, which exists, so FastEmbed's mkdir of it is a
    # no-op and it never falls back to tempfile.gettempdir(): a read-only root has no
    # writable /tmp (`docker run --read-only`), and gettempdir() then raises.
    try:
        model = TextEmbedding(
            alias,
            cache_dir=str(model_dir),
            threads=threads,
            specific_model_path=str(model_dir),
            local_files_only=True,
        )
        backend = FastEmbedBackend(manifest.name, model)
    except Exception as exc:  # onnxruntime/tokenizers raise many unrelated types
        raise ModelUnavailable(
            f"model {manifest.name} failed to load: its files are unreadable or corrupt; "
            "re-import it with 'embedserve models import'"
        ) from exc
    if backend.dimension != manifest.dimension:
        backend.close()
        raise ModelUnavailable(f"model {manifest.name}: dimension does not match its manifest")
    return backend


def load_catalogue(
    name: str, cache_dir: Path, threads: int | None, offline: bool
) -> FastEmbedBackend:
    """Load a FastEmbed catalogue model, downloading it into `cache_dir` unless `offline`."""
    from fastembed import TextEmbedding

    try:
        model = TextEmbedding(
            name, cache_dir=str(cache_dir), threads=threads, local_files_only=offline
        )
        return FastEmbedBackend(name, model)
    except Exception as exc:  # network, hub and file errors all surface here
        logger.warning("loading catalogue model %s failed: %s", name, exc)
        raise ModelUnavailable(
            f"model {name} is not available locally and could not be downloaded; "
            f"import it with 'embedserve models import SRC --name {name}'"
        ) from exc


def load_spec(
    spec: ModelSpec,
    *,
    cache_dir: Path,
    threads: int | None,
    offline: bool,
    packing: bool = True,
    row_tokens: int | None = None,
    ort_spinning: bool = False,
) -> Backend:
    """Load whatever `spec` points at: an imported directory or a catalogue model.

    An imported model with a packed graph runs packed (rows of `row_tokens`, default its
    token limit) unless `packing` is False; everything else runs FastEmbed's padded path.
    """
    if spec.source == "local" and spec.directory is not None and spec.manifest is not None:
        if packing and spec.manifest.packed:
            from embedserve.engine.packed import load_packed

            return load_packed(
                spec.directory, spec.manifest, threads, row_tokens, spinning=ort_spinning
            )
        return load_local(spec.directory, spec.manifest, threads)
    return load_catalogue(spec.name, cache_dir, threads, offline)


def route_library_logs() -> None:
    """Send FastEmbed's loguru records through stdlib logging (one format, one level)."""
    try:
        from loguru import logger as loguru_logger
    except ImportError:  # an older FastEmbed without loguru logs through stdlib already
        return
    library_logger = logging.getLogger("fastembed")

    def sink(message: Any) -> None:
        record = message.record
        library_logger.log(record["level"].no, "%s", record["message"])

    loguru_logger.remove()
    loguru_logger.add(sink, level="DEBUG", format="{message}")
