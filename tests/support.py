"""What the tests need besides devkit: the exported-model requirement (skip, or fail under
EMBEDSERVE_REQUIRE_MODEL), deterministic texts, and the server's load read from /metrics."""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest

from devkit.launcher import DEFAULT_MODEL, model_manifest


def require_exported_model(name: str = DEFAULT_MODEL) -> Path:
    """The imported model's directory. Skips the test without it, or fails it when
    EMBEDSERVE_REQUIRE_MODEL is set (as `make test` and CI do), so CI never skips silently.
    """
    manifest = model_manifest(name)
    if not manifest.is_file():
        reason = (
            f"no exported model at {manifest.parent} (run `make model`, or point MODELS_DIR "
            "at a models directory)"
        )
        if os.environ.get("EMBEDSERVE_REQUIRE_MODEL"):
            pytest.fail(f"EMBEDSERVE_REQUIRE_MODEL is set but {reason}")
        pytest.skip(reason)
    return manifest.parent


# -- deterministic texts -------------------------------------------------------------------
_VOCABULARY = (
    "the of and to in is was for on that with as by at from his her it an are were be this "
    "which or had not but have they one their has been its all would more new after who also "
    "two other first when there some into time over year city river music school county war "
    "team game party family world system company state house church album film station "
    "village series season member north south water light power market history model data "
    "network energy garden winter summer morning evening coffee bread window mountain forest "
    "ocean island bridge engine signal memory paper letter story language science number "
    "question answer reason method result theory value process design field report policy "
    "health travel kitchen doctor teacher student library museum harbor festival concert "
    "quickly slowly carefully brightly quietly gently strongly early late often never always "
    "red blue green yellow silver golden ancient modern tiny enormous bright dark warm cold "
    "build carry write read open close begin finish grow change measure follow explain "
    "discover protect remember travel compare improve prepare describe"
)
_WORDS = tuple(_VOCABULARY.split())


def words(rng: random.Random, count: int) -> str:
    """`count` words drawn from a fixed vocabulary, as one sentence."""
    return " ".join(rng.choice(_WORDS) for _ in range(count)).capitalize() + "."


def _unique(rng: random.Random, counts: list[int]) -> list[str]:
    seen: set[str] = set()
    texts: list[str] = []
    for count in counts:
        for _ in range(100):  # a repeat needs the same words in the same order: rare
            text = words(rng, count)
            if text not in seen:
                break
        else:
            raise RuntimeError(f"could not draw a unique {count}-word text")
        seen.add(text)
        texts.append(text)
    return texts


def spread_texts(count: int, *, seed: int, min_words: int = 2, max_words: int = 200) -> list[str]:
    """`count` distinct texts whose word counts are log-uniform over [min_words, max_words],
    shuffled, with both extremes present."""
    rng = random.Random(seed)
    low, high = math.log(min_words), math.log(max_words)
    counts = [round(math.exp(rng.uniform(low, high))) for _ in range(count)]
    counts[0], counts[-1] = min_words, max_words
    rng.shuffle(counts)
    return _unique(rng, counts)


def long_tailed_texts(
    count: int, *, seed: int, median_words: float = 14.0, tail_share: float = 0.08
) -> list[str]:
    """`count` distinct texts: most lognormal around `median_words` words (about 20 tokens),
    a `tail_share` of them 80-260 words (past a 256-token limit at the top)."""
    rng = random.Random(seed)
    counts: list[int] = []
    for _ in range(count):
        if rng.random() < tail_share:
            counts.append(rng.randint(80, 260))
        else:
            counts.append(max(2, min(120, round(rng.lognormvariate(math.log(median_words), 0.6)))))
    return _unique(rng, counts)


def uniform_texts(count: int, *, seed: int, min_words: int = 10, max_words: int = 20) -> list[str]:
    """`count` distinct texts of `min_words`..`max_words` words, uniformly."""
    rng = random.Random(seed)
    return _unique(rng, [rng.randint(min_words, max_words) for _ in range(count)])


# -- the server's load, from /metrics -----------------------------------------------------
async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    """The unlabelled samples of ``/metrics`` in Prometheus format (name -> value)."""
    response = await client.get("/metrics", params={"format": "prometheus"})
    response.raise_for_status()
    samples = {}
    for line in response.text.splitlines():
        name, _, value = line.partition(" ")
        if line and not line.startswith("#") and "{" not in name:
            samples[name] = float(value)
    return samples


class Backlog(NamedTuple):
    """The server's work at one moment (from the JSON ``/metrics``), over every model."""

    queued: int  # texts waiting
    in_flight: int  # texts in the batch running now
    embedded: int  # texts answered since the start

    @property
    def idle(self) -> bool:
        return self.queued == 0 and self.in_flight == 0


async def backlog(client: httpx.AsyncClient) -> Backlog:
    """What the server has queued, running and done."""
    response = await client.get("/metrics")
    response.raise_for_status()
    data = response.json()
    models = data["batching"]["models"].values()
    return Backlog(
        queued=sum(int(m["queue_depth"]) for m in models),
        in_flight=sum(int(m["in_flight"]) for m in models),
        embedded=int(data["total_embeddings"]),
    )


def mib(size: float) -> str:
    return f"{size / 2**20:.0f} MiB"
