"""`ModelRegistry`: resolve names, load off the event loop, warm up, LRU-evict, TTL-offload.

Each loaded model gets a `MicroBatcher`; requests go through `ModelRegistry.embed`, which
holds a lease on the model for the whole request so it is never evicted with work queued
or in flight. `token_vectors`, `token_details` and `decode` serve work that is not batched
(TEI's token-level routes) with the same leases; the HTTP layer never holds a backend.

One module because loading, leases, eviction and offload all change the same table of
entries under the same rules (the entry records are already in `model_entry.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from typing import Any, Protocol, TypeVar

import anyio
import anyio.to_thread

from embedserve.engine.backend import Backend, Vectors
from embedserve.engine.batcher import (
    BULK,
    PROBE_TEXT,
    BatchPolicy,
    BatchRecord,
    EmbedResult,
    Lane,
    MicroBatcher,
)
from embedserve.engine.model_entry import ModelEntry, ModelInfo
from embedserve.engine.tokens import Token
from embedserve.errors import (
    EmbedServeError,
    InferenceFailed,
    InvalidModelName,
    ModelNotAllowed,
    ModelNotFound,
    ModelUnavailable,
    Overloaded,
    RequestTimeout,
    ShuttingDown,
)
from embedserve.models.store import ModelSpec, ModelStore, validate_model_name

logger = logging.getLogger(__name__)

T = TypeVar("T")
Loader = Callable[[ModelSpec], Backend]


class ModelObserver(Protocol):
    """Told about every model batch and every embedded request (metrics); must be quick."""

    def on_batch(self, model: str, batch: BatchRecord) -> None: ...

    def on_result(self, model: str, result: EmbedResult) -> None: ...


class ModelRegistry:
    """The single owner of loaded models.

    Loading is single-flight per name and runs in a worker thread, so a slow or failing
    load never holds up requests for other models. A failed load evicts nothing and is
    remembered for `load_retry_s`. Eviction (LRU past `max_cached_models`) and offload
    (unused for `model_cache_ttl_s`) skip pinned and busy models; a busy model is evicted once
    it drains. Shutdown has one deadline, set by the first `begin_shutdown(grace_s)`:
    `aclose` drains every batcher within what remains of it, then releases the models.
    It also owns the listing of imported models (`local_models`), so that requests read no
    file: read at `start`, again by each sweep (in a worker thread) and by each `resolve`.
    `observer` (set it before `start`) hears of each model's batches and results.
    """

    def __init__(
        self,
        *,
        store: ModelStore,
        loader: Loader,
        policy: BatchPolicy,
        catalogue: frozenset[str] = frozenset(),
        allowed: Sequence[str] = (),
        required: Sequence[str] = (),
        max_models: int = 5,
        ttl_s: float = 3600.0,
        cleanup_interval_s: float = 60.0,
        pin_required: bool = True,
        load_retry_s: float = 30.0,
        request_timeout_s: float | None = None,
        max_unbatched: int = 4,
        run_sync: Callable[[Callable[[], Any]], Awaitable[Any]] | None = None,
        tokenize_sync: Callable[[Callable[[], Any]], Awaitable[Any]] | None = None,
        load_run_sync: Callable[[Callable[[], Any]], Awaitable[Any]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        observer: ModelObserver | None = None,
    ) -> None:
        self.store = store
        self.observer = observer
        self.policy = policy
        self.required = list(required)
        self.allowed = frozenset(allowed)
        self._loader = loader
        self._catalogue = catalogue
        self._max_models = max_models
        self._ttl_s = ttl_s
        self._cleanup_interval_s = cleanup_interval_s
        self._pin_required = pin_required
        self._load_retry_s = load_retry_s
        self._request_timeout_s = request_timeout_s
        self._run_sync = run_sync or anyio.to_thread.run_sync
        # The batchers' tokenising off the loop (the wiring gives it `run_sync`'s threads).
        self._tokenize_sync = tokenize_sync or anyio.to_thread.run_sync
        # Loads get their own threads: a load stuck in a download retry loop must not take
        # a worker that inference for other models needs.
        self._load_run_sync = load_run_sync or anyio.to_thread.run_sync
        self._clock = clock
        self._wall = wall_clock
        self._models: dict[str, ModelEntry] = {}
        # The imported models, as last read from the models directory (`local_models`).
        self._local: dict[str, ModelSpec] = {}
        self._loading: dict[str, asyncio.Task[ModelEntry]] = {}
        self._waiters: dict[str, int] = {}
        self._failures: dict[str, tuple[float, EmbedServeError]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._closing = False
        self._shutdown_at = float("inf")
        self._shutdown_deadline = float("inf")  # on `clock`, like every wait of the registry
        self._expiry: asyncio.Task[None] | None = None
        self._expired = False  # past the point where queued work is answered 503
        self.evictions = 0
        self.offloads = 0
        # `_run_on_model` calls in flight (all models): past `max_unbatched`, 429 at once.
        self.max_unbatched = max_unbatched
        self._unbatched = 0

    # -- resolution ------------------------------------------------------------------
    def resolve(self, name: str, *, listed: bool = False) -> ModelSpec:
        """Check `name` against the rules and find its source; loads nothing, opens no file
        outside the models directory. Reads the model's manifest, and keeps the listing in
        step with what it found; `listed`: reads no file, trusting `local_models` instead.
        Raises InvalidModelName, ModelNotAllowed, ModelNotFound, ModelUnavailable.
        """
        validate_model_name(name)
        if self.allowed and name not in self.allowed:
            raise ModelNotAllowed(f"model {name} is not in the allowed models")
        local = self._local.get(name) if listed else self._read_local(name)
        if local is not None:
            return local
        if name in self._catalogue:
            return ModelSpec(name, "catalogue")
        raise ModelNotFound(
            f"model {name} is not available locally and is not in FastEmbed's catalogue; "
            f"import it with 'embedserve models import SRC --name {name}'"
        )

    def _read_local(self, name: str) -> ModelSpec | None:
        try:
            manifest = self.store.get(name)
        except ValueError as exc:
            self._local.pop(name, None)
            raise ModelUnavailable(f"model {name} has an unreadable manifest") from exc
        if manifest is None:
            self._local.pop(name, None)
            return None
        spec = self._local[name] = ModelSpec(name, "local", self.store.model_dir(name), manifest)
        return spec

    def local_models(self) -> list[str]:
        """The imported models' names, sorted, as the models directory was last read: at
        `start`, by every sweep, and by every `resolve` that reads a manifest. Reads no file.
        """
        return sorted(self._local)

    async def refresh_local_models(self) -> None:
        """Read the models directory again, in a worker thread; on failure keep the old list."""
        try:
            listed = await self._load_run_sync(self._list_local)
        except OSError as exc:
            logger.warning("cannot list the models directory %s: %s", self.store.root, exc)
            return
        self._local = listed

    def _list_local(self) -> dict[str, ModelSpec]:
        listed: dict[str, ModelSpec] = {}
        for manifest in self.store.list():
            with contextlib.suppress(InvalidModelName):  # a manifest naming no directory
                directory = self.store.model_dir(manifest.name)
                listed[manifest.name] = ModelSpec(manifest.name, "local", directory, manifest)
        return listed

    # -- using models ----------------------------------------------------------------
    async def embed(
        self,
        name: str,
        texts: Sequence[str],
        *,
        arrived_at: float | None = None,
        lane: Lane = BULK,
    ) -> EmbedResult:
        """Embed `texts` with model `name` in `lane`, loading the model first if needed.

        `arrived_at` (``time.monotonic()`` when the request reached the server) lets a
        request that arrived before shutdown began still be served while draining.
        """
        loop = asyncio.get_running_loop()
        timeout_s = self._request_timeout_s
        deadline = None if timeout_s is None else loop.time() + timeout_s
        async with self.lease(name, arrived_at=arrived_at, deadline=deadline) as entry:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            result = await entry.batcher.submit(texts, timeout_s=remaining, lane=lane)
        if self.observer is not None:
            try:
                self.observer.on_result(name, result)
            except Exception:  # an observer's fault must not fail a request that was answered
                logger.exception("on_result hook failed for model %s", name)
        return result

    async def token_vectors(
        self, name: str, texts: Sequence[str], *, arrived_at: float | None = None
    ) -> list[Vectors]:
        """Per text, model `name`'s vector for each token, before pooling (not batched)."""
        return await self._run_on_model(
            name, lambda backend: backend.token_vectors(texts), arrived_at=arrived_at
        )

    async def token_details(
        self,
        name: str,
        texts: Sequence[str],
        *,
        add_special_tokens: bool,
        arrived_at: float | None = None,
    ) -> list[list[Token]]:
        """Per text, model `name`'s tokens with their character offsets (not batched)."""
        return await self._run_on_model(
            name,
            lambda backend: backend.token_details(texts, add_special_tokens=add_special_tokens),
            arrived_at=arrived_at,
        )

    async def decode(
        self,
        name: str,
        ids: Sequence[Sequence[int]],
        *,
        skip_special_tokens: bool,
        arrived_at: float | None = None,
    ) -> list[str]:
        """Each id sequence back to text with model `name`'s tokenizer (not batched)."""
        return await self._run_on_model(
            name,
            lambda backend: backend.decode(ids, skip_special_tokens=skip_special_tokens),
            arrived_at=arrived_at,
        )

    async def _run_on_model(
        self, name: str, work: Callable[[Backend], T], *, arrived_at: float | None = None
    ) -> T:
        """`work(backend)` of model `name` (loaded first if needed) in a worker thread, the
        model leased meanwhile: for work that is not batched (the three methods above).
        Overloaded when `max_unbatched` such calls are in flight already (they queue for
        worker threads, not in a batcher, so this is their bound). An error of the model's
        own (not an `EmbedServeError`) becomes InferenceFailed.
        """
        if self._unbatched >= self.max_unbatched:
            raise Overloaded(
                f"{self._unbatched} token-level requests are running already (at most "
                f"{self.max_unbatched}, THREAD_POOL_WORKERS); retry shortly"
            )
        self._unbatched += 1
        try:
            async with self.lease(name, arrived_at=arrived_at) as entry:
                result: T = await self._run_sync(partial(work, entry.backend))
        except EmbedServeError:
            raise
        except Exception as exc:  # the model's libraries raise many unrelated types
            logger.warning("model %s failed outside a batch: %r", name, exc)
            raise InferenceFailed(f"model {name} failed on this request") from exc
        finally:
            self._unbatched -= 1
        return result

    @contextlib.asynccontextmanager
    async def lease(
        self, name: str, *, arrived_at: float | None = None, deadline: float | None = None
    ) -> AsyncIterator[ModelEntry]:
        """Hold model `name` loaded (never evicted or offloaded) for the duration.

        Waiting for a load ends at `deadline` (event-loop time) with RequestTimeout; the
        load itself goes on for whoever asks next.
        """
        entry = await self._acquire(name, arrived_at, deadline)
        try:
            yield entry
        finally:
            entry.leases -= 1
            self._enforce_capacity()

    async def _acquire(
        self, name: str, arrived_at: float | None, deadline: float | None
    ) -> ModelEntry:
        """The loaded entry for `name` with one lease taken, sharing one load among callers."""
        if self._expired or (
            self._closing and (arrived_at is None or arrived_at >= self._shutdown_at)
        ):
            raise ShuttingDown()
        entry = self._models.get(name)
        if entry is None:
            failure = self._failures.get(name)
            if failure is not None and self._clock() - failure[0] < self._load_retry_s:
                raise type(failure[1])(failure[1].message)
            task = self._loading.get(name)
            if task is None:  # only a new load reads the model's manifest (on the loop)
                spec = self.resolve(name)
                task = asyncio.get_running_loop().create_task(self._load(spec), name=f"load:{name}")
                self._loading[name] = task
            # Waiters protect the new entry from eviction until they hold their lease.
            self._waiters[name] = self._waiters.get(name, 0) + 1
            try:
                # Shielded: one caller giving up must not cancel the load others wait for.
                async with asyncio.timeout_at(deadline):
                    entry = await asyncio.shield(task)
            except TimeoutError:
                raise RequestTimeout(
                    f"model {name} was not loaded within the request timeout"
                ) from None
            finally:
                self._waiters[name] -= 1
                if not self._waiters[name]:
                    del self._waiters[name]
        entry.leases += 1
        self._touch(entry)
        return entry

    async def _load(self, spec: ModelSpec) -> ModelEntry:
        started = self._clock()
        backend: Backend | None = None
        try:
            logger.info("loading model %s (%s)", spec.name, spec.source)
            backend = await self._load_run_sync(lambda: self._loader(spec))
            warm = backend
            try:
                await self._load_run_sync(lambda: warm.embed([PROBE_TEXT]))
            except Exception as exc:  # damaged weights load fine and fail here (NaN rows)
                raise ModelUnavailable(
                    f"model {spec.name} failed to load: its warm-up inference failed"
                ) from exc
            on_batch = partial(self.observer.on_batch, spec.name) if self.observer else None
            batcher = MicroBatcher(
                backend,
                self.policy,
                run_sync=self._run_sync,
                tokenize_sync=self._tokenize_sync,
                on_batch=on_batch,
            )
            batcher.start()
            if self._expired:  # loaded after the expiry: it takes no work, like the others
                batcher.expire()
        except BaseException as exc:
            if backend is not None:
                closing = backend
                with contextlib.suppress(Exception):
                    await self._load_run_sync(closing.close)
            error = exc if isinstance(exc, EmbedServeError) else None
            if error is not None:
                # The client's message names no file; the log keeps the library's reason.
                logger.warning(
                    "loading model %s failed: %s (%r)", spec.name, error.message, exc.__cause__
                )
            elif isinstance(exc, Exception):
                logger.exception("loading model %s failed", spec.name)
                error = ModelUnavailable(
                    f"model {spec.name} failed to load; the server log has the cause"
                )
            if error is not None:
                self._failures[spec.name] = (self._clock(), error)
                raise error from exc
            raise
        finally:
            self._loading.pop(spec.name, None)
        load_time = self._clock() - started
        now = self._clock()
        entry = ModelEntry(
            spec=spec,
            backend=backend,
            batcher=batcher,
            loaded_at=self._wall(),
            load_time_s=load_time,
            last_used=now,
            last_used_wall=self._wall(),
            pinned=self._pin_required and spec.name in self.required,
        )
        self._failures.pop(spec.name, None)
        self._models[spec.name] = entry
        logger.info("model %s loaded in %.2fs", spec.name, load_time)
        self._enforce_capacity()
        return entry

    def _touch(self, entry: ModelEntry) -> None:
        entry.last_used = self._clock()
        entry.last_used_wall = self._wall()

    # -- eviction --------------------------------------------------------------------
    def _enforce_capacity(self) -> None:
        # The least recently used model goes; if it is busy, nothing goes until it drains
        # (the lease that drains it calls this again).
        while len(self._models) > self._max_models:
            candidates = [
                e
                for e in self._models.values()
                if not e.pinned and e.spec.name not in self._waiters
            ]
            if not candidates:
                return
            victim = min(candidates, key=lambda e: e.last_used)
            if victim.busy:
                return
            logger.info("evicting least recently used model %s", victim.spec.name)
            self.evictions += 1
            self._release(victim)

    def sweep(self) -> list[str]:
        """Offload models unused for the TTL; returns their names. Run by the sweeper task."""
        # A model over capacity whose last request left while its batch ran (the lease ended
        # before the batcher drained) goes now, if nothing else has evicted it since.
        self._enforce_capacity()
        now = self._clock()
        expired = [
            e
            for e in self._models.values()
            if not e.pinned and not e.busy and now - e.last_used >= self._ttl_s
        ]
        for entry in expired:
            logger.info(
                "offloading model %s (unused for %.0fs)", entry.spec.name, now - entry.last_used
            )
            self.offloads += 1
            self._release(entry)
        return [e.spec.name for e in expired]

    def _release(self, entry: ModelEntry) -> None:
        del self._models[entry.spec.name]
        task = asyncio.get_running_loop().create_task(self._close_entry(entry, 0.0))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _close_entry(self, entry: ModelEntry, grace_s: float) -> None:
        await entry.batcher.aclose(grace_s)
        await self._load_run_sync(entry.backend.close)

    async def wait_released(self) -> None:
        """Wait until every evicted or offloaded model has been closed (for tests, shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Load and warm up every required model (a failure raises), then start the sweeper."""
        results = await asyncio.gather(
            *(self._load_required(name) for name in self.required), return_exceptions=True
        )
        for name, result in zip(self.required, results, strict=True):
            if isinstance(result, BaseException):
                message = getattr(result, "message", repr(result))
                raise ModelUnavailable(f"required model {name} failed to load: {message}")
        await self.refresh_local_models()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _load_required(self, name: str) -> None:
        async with self.lease(name):
            pass

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self._cleanup_interval_s)
            self.sweep()
            await self.refresh_local_models()  # picks up models imported or removed meanwhile

    @property
    def ready(self) -> bool:
        """Every required model is loaded and the registry is not closing."""
        return not self._closing and all(name in self._models for name in self.required)

    @property
    def closing(self) -> bool:
        """True once shutdown has begun."""
        return self._closing

    def loaded_names(self) -> list[str]:
        """Names of the loaded models."""
        return list(self._models)

    def begin_shutdown(self, grace_s: float = 0.0) -> None:
        """Refuse requests that arrive from now on (ShuttingDown); accepted work carries on
        until the shutdown deadline, `grace_s` from now. Only the first call counts.

        Only sets fields, so it is safe to call from a signal handler.
        """
        if not self._closing:
            self._shutdown_at = time.monotonic()
            self._shutdown_deadline = self._clock() + grace_s
            self._closing = True

    def shutdown_remaining_s(self) -> float:
        """Seconds left until the shutdown deadline (0 once past it; inf before shutdown)."""
        return max(0.0, self._shutdown_deadline - self._clock())

    def expire_queued_after(self, delay_s: float) -> None:
        """Answer whatever is still queued `delay_s` from now with ShuttingDown (503)."""
        self.begin_shutdown()
        if self._expiry is None:
            self._expiry = asyncio.get_running_loop().create_task(self._expire(delay_s))

    async def _expire(self, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        self._expired = True
        for entry in list(self._models.values()):
            entry.batcher.expire()

    async def aclose(self, grace_s: float = 0.0) -> None:
        """Drain every batcher until the shutdown deadline, then release every model.

        The deadline is `grace_s` from the first `begin_shutdown` (from now if shutdown has
        not begun): time the server spent waiting for connections is not given again here.
        """
        self.begin_shutdown(grace_s)
        for background in (self._sweeper, self._expiry):
            if background is not None:
                background.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await background
        for loading in list(self._loading.values()):
            loading.cancel()
        entries = list(self._models.values())
        self._models.clear()
        remaining_s = self.shutdown_remaining_s()
        await asyncio.gather(*(self._close_entry(e, remaining_s) for e in entries))
        await self.wait_released()

    # -- facts -----------------------------------------------------------------------
    def loaded(self) -> list[ModelInfo]:
        """Facts about every loaded model, most recently used first."""
        entries = sorted(self._models.values(), key=lambda e: e.last_used, reverse=True)
        return [e.info() for e in entries]

    def describe(self, name: str) -> ModelInfo:
        """Facts about `name` whether loaded or not; raises like `resolve` for unknown names.
        Reads a manifest only for a name that `local_models` does not list."""
        entry = self._models.get(name)
        if entry is not None:
            return entry.info()
        try:
            spec = self.resolve(name, listed=True)
        except ModelNotFound:
            spec = self.resolve(name)  # imported since the last listing, perhaps
        manifest = spec.manifest
        return ModelInfo(
            name=name,
            is_loaded=False,
            source=spec.source,
            dimension=manifest.dimension if manifest else None,
            max_tokens=manifest.max_tokens if manifest else None,
            packed_graph=manifest.packed if manifest else None,
            pinned=self._pin_required and name in self.required,
        )
