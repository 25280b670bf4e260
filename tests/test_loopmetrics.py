"""`loopmetrics`: the exposition is prometheus_client's, byte for byte, in both formats."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from embedserve.http.loopmetrics import LoopCounter, LoopHistogram

BUCKETS = (0.001, 0.01, 0.1, 1.0, 10.0)
AMOUNTS = [0.0, 0.0005, 0.001, 0.0010001, 0.05, 1.0, 9.99, 10.0, 10.5, 1e9, math.inf, math.nan]


def fed_registries() -> tuple[CollectorRegistry, CollectorRegistry]:
    """The same observations through prometheus_client's metrics and through ours."""
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    their_counter = Counter("demo_requests", "Requests.", ["endpoint", "status"], registry=theirs)
    their_histogram = Histogram(
        "demo_seconds", "Seconds.", ["endpoint"], buckets=BUCKETS, registry=theirs
    )
    our_counter = LoopCounter("demo_requests", "Requests.", ("endpoint", "status"))
    our_histogram = LoopHistogram("demo_seconds", "Seconds.", ("endpoint",), BUCKETS)
    ours.register(our_counter)
    ours.register(our_histogram)
    Histogram("demo_unused_seconds", "Never observed.", ["model"], registry=theirs)
    ours.register(LoopHistogram("demo_unused_seconds", "Never observed.", ("model",), BUCKETS))
    for endpoint in ("/embed", "/v1/embeddings"):
        for status in ("200", "429"):
            their_counter.labels(endpoint, status).inc()
            our_counter.labels(endpoint, status).inc()
        for amount in AMOUNTS:
            their_histogram.labels(endpoint).observe(amount)
            our_histogram.labels(endpoint).observe(amount)
    their_counter.labels("/embed", "200").inc(2.5)
    our_counter.labels("/embed", "200").inc(2.5)
    return theirs, ours


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("time.time", lambda: 1_700_000_000.25)


@pytest.mark.parametrize("encode", [generate_latest, generate_openmetrics])
def test_the_exposition_is_prometheus_clients(encode: object) -> None:
    theirs, ours = fed_registries()
    assert encode(ours) == encode(theirs)  # type: ignore[operator]


def test_without_created_series_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("prometheus_client.metrics._use_created", False)
    theirs, ours = fed_registries()
    assert b"_created" not in generate_latest(ours)
    assert generate_latest(ours) == generate_latest(theirs)


def test_nan_is_summed_but_counted_in_no_bucket() -> None:
    histogram = LoopHistogram("demo_seconds", "Seconds.", (), BUCKETS)
    child = histogram.labels()
    child.observe(math.nan)
    child.observe(0.5)
    assert child.counts == [0, 0, 0, 1, 0, 0]
    assert math.isnan(child.sum)
