"""A loaded model's record (`ModelEntry`, registry-owned) and its API snapshot (`ModelInfo`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from embedserve.engine.backend import Backend
from embedserve.engine.batcher import MicroBatcher
from embedserve.models.store import ModelSpec


@dataclass(frozen=True)
class ModelInfo:
    """Per-model facts for the API."""

    name: str
    is_loaded: bool
    source: str | None = None
    dimension: int | None = None
    max_tokens: int | None = None
    packed: bool | None = None  # runs packed; None while not loaded
    packed_graph: bool | None = None  # its files include a packed graph; None: catalogue
    load_time_s: float | None = None
    loaded_at: str | None = None
    last_used: str | None = None
    pinned: bool = False
    queued: int = 0
    in_flight: int = 0
    stats: dict[str, float] = field(default_factory=dict)
    # Per priority lane: queue_depth, texts (embedded since load), queue_s (their wait).
    lanes: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(eq=False)
class ModelEntry:
    """A loaded model. Owned by the registry; handlers see it only through `ModelInfo`."""

    spec: ModelSpec
    backend: Backend
    batcher: MicroBatcher
    loaded_at: float
    load_time_s: float
    last_used: float  # registry clock, for LRU and TTL
    last_used_wall: float
    pinned: bool
    leases: int = 0

    @property
    def busy(self) -> bool:
        return self.leases > 0 or not self.batcher.idle

    def info(self) -> ModelInfo:
        """A snapshot of this model's facts for the API."""
        stats = self.batcher.stats
        queued = self.batcher.queued_by_lane()
        return ModelInfo(
            name=self.spec.name,
            is_loaded=True,
            source=self.spec.source,
            dimension=self.backend.dimension,
            max_tokens=self.backend.max_tokens,
            packed=bool(getattr(self.backend, "packed", False)),
            packed_graph=self.spec.manifest.packed if self.spec.manifest else None,
            load_time_s=round(self.load_time_s, 4),
            loaded_at=_iso(self.loaded_at),
            last_used=_iso(self.last_used_wall),
            pinned=self.pinned,
            queued=self.batcher.queued,
            in_flight=self.batcher.in_flight,
            stats={
                "batches": stats.batches,
                "texts": stats.texts,
                "mean_batch_size": round(stats.mean_batch_size, 3),
                "mean_fill": round(stats.mean_fill, 4),
                "real_tokens": stats.real_tokens,
                "slot_tokens": stats.slot_tokens,
                "failed_batches": stats.failed_batches,
                "dropped_texts": stats.dropped_texts,
                "inference_s": round(stats.inference_s, 4),
                "queue_s": round(stats.queue_s, 4),
            },
            lanes={
                lane: {
                    "queue_depth": queued[lane],
                    "texts": stats.lane_texts[lane],
                    "queue_s": round(stats.lane_queue_s[lane], 4),
                }
                for lane in queued
            },
        )


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")
