"""Deterministic test doubles: a fake backend and a run_sync whose batches a test releases."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from embedserve.engine.backend import TokenIds, Vectors
from embedserve.engine.tokens import Token
from embedserve.models.store import ModelSpec

DIM = 8


def fake_vector(text: str, dim: int = DIM) -> np.ndarray:
    """The unit vector the fake backend returns for `text` (seeded by its hash)."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


class FakeBackend:
    """Embeds by hashing; tokens are whitespace words + 2. Records every batch it runs.

    Failures: `fail_next` fails the next call, `fail_always` every call, and `poison` every
    call holding one of its texts; `tokenize` raises on any call holding a text in
    `refuse`. With `packed=True` it plans like a packed backend (rows
    of `row_tokens`) and records in `tokens` the ids each call was given.
    """

    def __init__(
        self,
        name: str = "fake/model",
        dimension: int = DIM,
        max_tokens: int = 256,
        *,
        packed: bool = False,
        row_tokens: int | None = None,
    ):
        self.name = name
        self.dimension = dimension
        self.max_tokens = max_tokens
        self.packed = packed
        self.row_tokens = row_tokens or max_tokens
        self.batches: list[list[str]] = []
        self.tokens: list[list[TokenIds] | None] = []
        self.tokenized = 0  # texts tokenised
        self.fail_next: Exception | None = None
        self.fail_always: Exception | None = None
        self.poison: set[str] = set()
        self.refuse: set[str] = set()
        self.tokenize_calls: list[list[str]] = []
        self.hold: threading.Event | None = None  # embed waits for it (from a worker thread)
        self.closed = False
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str], tokens: Sequence[TokenIds] | None = None) -> Vectors:
        assert not self.closed, "embed after close"
        if self.hold is not None:
            self.hold.wait(timeout=10)
        with self._lock:
            self.batches.append(list(texts))
            self.tokens.append(None if tokens is None else list(tokens))
            error, self.fail_next = self.fail_next, None
        if error is not None:
            raise error
        if self.fail_always is not None:
            raise self.fail_always
        if self.poison.intersection(texts):
            raise RuntimeError(f"poisoned batch of {len(texts)} texts")
        return np.stack([fake_vector(t, self.dimension) for t in texts])

    def tokenize(self, texts: Sequence[str]) -> list[TokenIds]:
        with self._lock:
            self.tokenize_calls.append(list(texts))
        if self.refuse.intersection(texts):
            raise ValueError(f"tokenizer refused one of {len(texts)} texts")
        self.tokenized += len(texts)
        return [list(range(min(self.max_tokens, len(t.split()) + 2))) for t in texts]

    def token_details(
        self, texts: Sequence[str], *, add_special_tokens: bool = True
    ) -> list[list[Token]]:
        """Whitespace words as tokens (ids: their position + 10), [CLS]/[SEP] as 0 and 1."""
        details = []
        for text in texts:
            tokens, start = [], 0
            for index, word in enumerate(text.split()):
                start = text.index(word, start)
                tokens.append(Token(index + 10, word, False, start, start + len(word)))
                start += len(word)
            tokens = tokens[: self.max_tokens - 2]
            if add_special_tokens:
                tokens = [Token(0, "[CLS]", True, None, None), *tokens]
                tokens.append(Token(1, "[SEP]", True, None, None))
            details.append(tokens)
        return details

    def decode(
        self, ids: Sequence[Sequence[int]], *, skip_special_tokens: bool = True
    ) -> list[str]:
        """Each id as ``t<id>`` (specials 0 and 1 as [CLS]/[SEP] unless skipped)."""
        names = {0: "[CLS]", 1: "[SEP]"}
        return [
            " ".join(names.get(i, f"t{i}") for i in row if not (skip_special_tokens and i in names))
            for row in ids
        ]

    def token_vectors(self, texts: Sequence[str]) -> list[Vectors]:
        """One fake vector per token (`tokenize`'s count), seeded by the text and position."""
        counts = self.tokenize(texts)
        return [
            np.stack([fake_vector(f"{text}#{i}", self.dimension) for i in range(len(ids))])
            for text, ids in zip(texts, counts, strict=True)
        ]

    def close(self) -> None:
        self.closed = True


class GatedRunner:
    """A `run_sync` that holds every call until the test releases it (no sleeps, no threads).

    `entered` counts calls waiting at the gate; `release(n)` lets n of them run.
    """

    def __init__(self, open_: bool = False) -> None:
        self._permits = asyncio.Semaphore(0)
        self.open = open_
        self.waiting = 0
        self._changed = asyncio.Event()

    async def __call__(self, func: Callable[[], Any]) -> Any:
        if not self.open:
            self.waiting += 1
            self._changed.set()
            try:
                await self._permits.acquire()
            finally:
                self.waiting -= 1
        return func()

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self._permits.release()

    async def wait_for_waiting(self, n: int = 1) -> None:
        """Return once at least `n` calls are held at the gate."""
        while self.waiting < n:
            self._changed.clear()
            await self._changed.wait()


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeLoader:
    """A loader that returns FakeBackends, optionally gated per model name or failing."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail: dict[str, Exception] = {}
        self.gates: dict[str, threading.Event] = {}
        self.backends: dict[str, FakeBackend] = {}

    def __call__(self, spec: ModelSpec) -> FakeBackend:
        self.calls.append(spec.name)
        gate = self.gates.get(spec.name)
        if gate is not None:
            gate.wait(timeout=10)
        if spec.name in self.fail:
            raise self.fail[spec.name]
        backend = FakeBackend(spec.name)
        self.backends[spec.name] = backend
        return backend
