"""Counters and histograms for one thread, exposed exactly as prometheus_client's are.

prometheus_client's `Counter` and `Histogram` take a lock for every addition and scan the
buckets one by one in Python; `PrometheusMetrics` updates its figures only from the event
loop thread, once or twice per request, so plain numbers do. A `LoopCounter` or
`LoopHistogram` is a collector: register it with a `CollectorRegistry`, and it yields the
samples prometheus_client's metric of the same name, labels and buckets would (children
in the order they were created, ``_created`` samples as prometheus_client's own switch
says), so the exposition is the same byte for byte. Not thread-safe: one thread only.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterable, Sequence
from typing import Generic, TypeVar

import prometheus_client.metrics
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString


def _created_series() -> bool:
    """Whether ``_created`` samples are exposed: prometheus_client's own switch
    (``PROMETHEUS_DISABLE_CREATED_SERIES``, `disable_created_metrics`)."""
    return bool(getattr(prometheus_client.metrics, "_use_created", True))


class CounterChild:
    """One label set's count, and when it was created (Unix time)."""

    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        """Add `amount`."""
        self.value += amount


class HistogramChild:
    """One label set's bucket counts (not cumulative), sum, and when it was created."""

    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0.0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        """Count `amount` in the first bucket whose bound is at least it (none for NaN)."""
        self.sum += amount
        index = bisect.bisect_left(self.bounds, amount)
        if index < len(self.bounds) and amount <= self.bounds[index]:
            self.counts[index] += 1


C = TypeVar("C", CounterChild, HistogramChild)


class _LoopFamily(Generic[C]):
    """A labelled metric family of one thread: its children by label values, in creation
    order, and its exposition as prometheus_client's metric of the same kind yields it."""

    kind = ""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], C] = {}

    def _new_child(self) -> C:
        raise NotImplementedError

    def _add_samples(self, metric: Metric, labels: dict[str, str], child: C) -> None:
        raise NotImplementedError

    def labels(self, *values: str) -> C:
        """The child for these label values (created on first use)."""
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._new_child()
        return child

    def collect(self) -> Iterable[Metric]:
        """The family and its samples, as prometheus_client's metric yields them."""
        metric = Metric(self.name, self.documentation, self.kind)
        created = _created_series()
        for values, child in list(self._children.items()):
            labels = dict(zip(self.labelnames, values, strict=True))
            self._add_samples(metric, labels, child)
            if created:
                metric.add_sample(self.name + "_created", labels, child.created)
        return [metric]


class LoopCounter(_LoopFamily[CounterChild]):
    """A labelled counter for one thread (the event loop's), exposed as prometheus_client
    exposes its `Counter`: ``_total`` and ``_created`` samples, children in creation order.
    """

    kind = "counter"

    def _new_child(self) -> CounterChild:
        return CounterChild()

    def _add_samples(self, metric: Metric, labels: dict[str, str], child: CounterChild) -> None:
        metric.add_sample(self.name + "_total", labels, child.value)


class LoopHistogram(_LoopFamily[HistogramChild]):
    """A labelled histogram for one thread (the event loop's), exposed as prometheus_client
    exposes its `Histogram`: cumulative ``_bucket`` samples up to ``+Inf``, ``_count``,
    ``_sum`` and ``_created``, children in creation order.
    """

    kind = "histogram"

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        buckets: Sequence[float],
    ) -> None:
        super().__init__(name, documentation, labelnames)
        self.bounds = (*map(float, buckets), float("inf"))
        self._bound_labels = tuple(
            str(floatToGoString(bound))  # type: ignore[no-untyped-call]
            for bound in self.bounds
        )

    def _new_child(self) -> HistogramChild:
        return HistogramChild(self.bounds)

    def _add_samples(self, metric: Metric, labels: dict[str, str], child: HistogramChild) -> None:
        total = 0.0
        for le, count in zip(self._bound_labels, child.counts, strict=True):
            total += count
            metric.add_sample(self.name + "_bucket", {**labels, "le": le}, total)
        metric.add_sample(self.name + "_count", labels, total)
        if self.bounds[0] >= 0:  # as prometheus_client: no sum when negatives count
            metric.add_sample(self.name + "_sum", labels, child.sum)
