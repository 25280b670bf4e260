"""The real server with a model that fails on purpose: ``python -m tests.faultserver serve``.

Takes the same settings (environment) and ``--host``/``--port`` as ``embedserve serve`` and
runs the real registry, batcher, HTTP stack and ONNX model; only each loaded backend is
wrapped so that `embed` raises on any batch holding a text that contains ``FAULT_MARKER``
(default ``__fault__``). With ``FAULT_BATCH_LOG`` set, every call of `embed` (a batch, or
a part of one the batcher retries) is appended to that file as one JSON line
``{"model": ..., "texts": [...], "failed": bool}``, in the order the calls ran, so a test
can tell which requests shared a batch with a marker and how the batcher retried it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from embedserve.engine.backend import Backend, TokenIds, Vectors
from embedserve.engine.tokens import Token
from embedserve.engine.wiring import build_registry
from embedserve.server import serve
from embedserve.settings import Settings, SettingsError

DEFAULT_MARKER = "__fault__"


class InjectedFault(RuntimeError):
    """Raised by `FaultyBackend.embed` for a call that holds the marker."""


class FaultyBackend:
    """A real backend whose `embed` raises for calls holding `marker`; records every call."""

    def __init__(self, inner: Backend, marker: str, batch_log: Path | None) -> None:
        self._inner = inner
        self._marker = marker
        self._batch_log = batch_log
        self._lock = threading.Lock()  # batches of different models may run at once
        self.name = inner.name
        self.dimension = inner.dimension
        self.max_tokens = inner.max_tokens
        self.packed = inner.packed
        self.row_tokens = inner.row_tokens

    def embed(self, texts: Sequence[str], tokens: Sequence[TokenIds] | None = None) -> Vectors:
        failed = any(self._marker in text for text in texts)
        if self._batch_log is not None:
            line = json.dumps({"model": self.name, "texts": list(texts), "failed": failed})
            with self._lock, self._batch_log.open("a", encoding="utf-8") as out:
                out.write(line + "\n")
        if failed:
            raise InjectedFault(f"injected fault in a batch of {len(texts)} texts")
        return self._inner.embed(texts, tokens)

    def tokenize(self, texts: Sequence[str]) -> list[TokenIds]:
        return self._inner.tokenize(texts)

    def token_details(
        self, texts: Sequence[str], *, add_special_tokens: bool = True
    ) -> list[list[Token]]:
        return self._inner.token_details(texts, add_special_tokens=add_special_tokens)

    def decode(
        self, ids: Sequence[Sequence[int]], *, skip_special_tokens: bool = True
    ) -> list[str]:
        return self._inner.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_vectors(self, texts: Sequence[str]) -> list[Vectors]:
        return self._inner.token_vectors(texts)

    def close(self) -> None:
        self._inner.close()


def main(argv: list[str] | None = None) -> int:
    """Parse ``serve --host --port``, build the faulty registry, serve until a signal."""
    parser = argparse.ArgumentParser(prog="python -m tests.faultserver")
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env(host=args.host, port=args.port)
    except SettingsError as exc:
        print(f"faultserver: {exc}", file=sys.stderr)
        return 2
    marker = os.environ.get("FAULT_MARKER") or DEFAULT_MARKER
    log = os.environ.get("FAULT_BATCH_LOG")
    batch_log = Path(log) if log else None

    def wrap(backend: Backend) -> Backend:
        return FaultyBackend(backend, marker, batch_log)

    return serve(settings, build_registry(settings, wrap_backend=wrap))


if __name__ == "__main__":
    sys.exit(main())
