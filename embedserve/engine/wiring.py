"""`build_registry(settings)`: the engine as `Settings` describe it, with the real model loader
(FastEmbed, or the packed backend), its worker-thread limit and the batching policy.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import anyio.to_thread
from anyio import CapacityLimiter

from embedserve.engine import backend
from embedserve.engine.backend import Backend
from embedserve.engine.batcher import BatchPolicy
from embedserve.engine.registry import ModelRegistry
from embedserve.models.store import ModelSpec, ModelStore
from embedserve.settings import Settings


def build_registry(
    settings: Settings, *, wrap_backend: Callable[[Backend], Backend] | None = None
) -> ModelRegistry:
    """The registry with the real FastEmbed loader, configured from `settings`.

    `wrap_backend` decorates every loaded model (tests/faultserver.py injects faults so).
    """
    store = ModelStore(settings.models_dir)
    limiter = CapacityLimiter(settings.thread_pool_workers)

    async def run_sync(func: Any) -> Any:
        return await anyio.to_thread.run_sync(func, limiter=limiter)

    real_loader = partial(
        backend.load_spec,
        cache_dir=store.cache_dir(),
        threads=settings.ort_threads,
        offline=settings.offline,
        packing=settings.enable_packing,
        row_tokens=settings.pack_row_tokens or None,
        ort_spinning=settings.ort_spinning,
    )

    def loader(spec: ModelSpec) -> Backend:
        loaded = real_loader(spec)
        return loaded if wrap_backend is None else wrap_backend(loaded)

    return ModelRegistry(
        store=store,
        loader=loader,
        policy=policy_from(settings),
        catalogue=backend.catalogue_names(),
        allowed=settings.allowed_models,
        required=settings.required_models,
        max_models=settings.max_cached_models,
        ttl_s=settings.model_cache_ttl_s,
        cleanup_interval_s=settings.cleanup_interval_s,
        pin_required=settings.pin_required_models,
        load_retry_s=settings.load_retry_s,
        request_timeout_s=settings.request_timeout_s,
        max_unbatched=settings.thread_pool_workers,
        run_sync=run_sync,
        # Tokenising off the loop shares the THREAD_POOL_WORKERS threads with inference.
        tokenize_sync=run_sync,
    )


def policy_from(settings: Settings) -> BatchPolicy:
    """The batching policy the settings describe."""
    return BatchPolicy(
        max_texts=settings.batch_max_texts,
        token_budget=settings.batch_token_budget,
        min_fill=settings.batch_min_fill,
        max_wait_s=settings.batch_max_wait_ms / 1000,
        max_queue=settings.max_queue_size,
        enabled=settings.enable_batching,
        lookahead=settings.pack_lookahead,
        max_queue_interactive=settings.max_queue_size_interactive,
        bulk_share=settings.bulk_min_share,
        interactive_budget=settings.interactive_token_budget,
        interactive_window_s=settings.interactive_window_ms / 1000,
    )
