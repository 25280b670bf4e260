"""Prometheus metrics: one registry per app, fed by hooks and by a scrape-time collector.

`PrometheusMetrics` owns a `CollectorRegistry` of its own (never the global default, so apps
and tests do not collide). The access log calls `on_request` once per answer; the model
registry calls `on_batch` for every model batch and `on_result` for every embedded request;
queue depths, loaded models, load times, evictions and offloads are read from the model
registry, error answers from the app's one error count (`AppStats.errors`, which JSON
``/metrics`` shows too), and the event loop's task count from asyncio, when Prometheus
scrapes. All of it runs on the event loop thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from starlette.requests import Request
from starlette.responses import Response

from embedserve.http.loopmetrics import CounterChild, HistogramChild, LoopCounter, LoopHistogram
from embedserve.http.request_stats import AppStats
from embedserve.http.responses import error_response

if TYPE_CHECKING:
    from embedserve.engine.batcher import BatchRecord, EmbedResult
    from embedserve.engine.registry import ModelRegistry


# Seconds, for a server whose requests take milliseconds (one short text on 2 cores: ~2-5
# ms) and, under load or for long batches, tens to hundreds of milliseconds.
REQUEST_BUCKETS_S = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0,
)  # fmt: skip
QUEUE_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)  # fmt: skip
INFERENCE_BUCKETS_S = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)  # fmt: skip
# Texts per model batch (BATCH_MAX_TEXTS defaults to 64), token slots computed per batch
# (BATCH_TOKEN_BUDGET defaults to 512; one long text alone may exceed it), and batch fill
# (real tokens / slots: 1.0 is a batch with no padding).
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PADDED_TOKEN_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
FILL_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0)

FORMATS = ("prometheus", "json")
_PROMETHEUS_TYPES = frozenset({"text/plain", "application/openmetrics-text"})


class PrometheusMetrics:
    """The app's Prometheus metrics and their registry.

    The hooks' counters and histograms are `loopmetrics`' plain numbers, since only the
    event loop thread touches them (prometheus_client's own took 8 us of every request,
    these 2); they are exposed exactly as prometheus_client's would be. Labelled children
    are cached per endpoint/status and per model, so a hook costs a dict lookup and a few
    additions.
    Label values are bounded: endpoints are route templates, models are only those that
    loaded, error types are the server's own.
    """

    def __init__(
        self, models: ModelRegistry, *, stats: AppStats | None = None, process: bool = True
    ) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self._requests = LoopCounter(
            "embedserve_requests",
            "HTTP requests answered, by endpoint (route template) and status.",
            ("endpoint", "status"),
        )
        self._duration = LoopHistogram(
            "embedserve_request_duration_seconds",
            "Time from receiving a request to sending its answer, by endpoint.",
            ("endpoint",),
            REQUEST_BUCKETS_S,
        )
        self._queue = LoopHistogram(
            "embedserve_queue_time_seconds",
            "Time a request's texts waited for a model batch, by model and priority lane.",
            ("model", "lane"),
            QUEUE_BUCKETS_S,
        )
        self._inference = LoopHistogram(
            "embedserve_inference_time_seconds",
            "Time in the model calls that carried a request's texts, by model.",
            ("model",),
            INFERENCE_BUCKETS_S,
        )
        self._batch_size = LoopHistogram(
            "embedserve_batch_size",
            "Texts per model batch, by model.",
            ("model",),
            BATCH_SIZE_BUCKETS,
        )
        self._batch_tokens = LoopHistogram(
            "embedserve_batch_padded_tokens",
            "Token slots computed per model batch, padding included (padded: texts x "
            "longest; packed: rows x longest row), by model.",
            ("model",),
            PADDED_TOKEN_BUCKETS,
        )
        self._batch_fill = LoopHistogram(
            "embedserve_batch_fill_ratio",
            "Real tokens / token slots computed per model batch (1.0: no padding), by model.",
            ("model",),
            FILL_BUCKETS,
        )
        self._batch_duration = LoopHistogram(
            "embedserve_batch_duration_seconds",
            "Time the model took to run one batch, by model.",
            ("model",),
            INFERENCE_BUCKETS_S,
        )
        for family in (
            self._requests,
            self._duration,
            self._queue,
            self._inference,
            self._batch_size,
            self._batch_tokens,
            self._batch_fill,
            self._batch_duration,
        ):
            registry.register(family)
        registry.register(_ErrorsCollector(stats if stats is not None else AppStats()))
        registry.register(_ModelsCollector(models))
        registry.register(_EventLoopCollector())
        if process:
            ProcessCollector(registry=registry)
        self._by_answer: dict[tuple[str, int], tuple[CounterChild, HistogramChild]] = {}
        self._by_model: dict[str, tuple[HistogramChild, ...]] = {}
        self._by_lane: dict[tuple[str, str], HistogramChild] = {}

    # -- hooks (event loop thread) ---------------------------------------------------
    def on_request(self, endpoint: str, status: int, seconds: float) -> None:
        """One answered request (`access_log.AccessLog` calls this)."""
        children = self._by_answer.get((endpoint, status))
        if children is None:
            children = (
                self._requests.labels(endpoint, str(status)),
                self._duration.labels(endpoint),
            )
            self._by_answer[(endpoint, status)] = children
        children[0].inc()
        children[1].observe(seconds)

    def on_batch(self, model: str, batch: BatchRecord) -> None:
        """One model batch ran (the model's `MicroBatcher` calls this through the registry)."""
        _, size, tokens, duration, fill = self._model(model)
        size.observe(batch.texts)
        tokens.observe(batch.slot_tokens)
        duration.observe(batch.seconds)
        if batch.slot_tokens:
            fill.observe(batch.real_tokens / batch.slot_tokens)

    def on_result(self, model: str, result: EmbedResult) -> None:
        """One request's texts were embedded (the model registry calls this)."""
        queue = self._by_lane.get((model, result.lane))
        if queue is None:
            queue = self._by_lane[(model, result.lane)] = self._queue.labels(model, result.lane)
        queue.observe(result.queue_ms / 1000)
        self._model(model)[0].observe(result.inference_ms / 1000)

    def _model(self, model: str) -> tuple[HistogramChild, ...]:
        children = self._by_model.get(model)
        if children is None:
            children = tuple(
                histogram.labels(model)
                for histogram in (
                    self._inference,
                    self._batch_size,
                    self._batch_tokens,
                    self._batch_duration,
                    self._batch_fill,
                )
            )
            self._by_model[model] = children
        return children

    # -- exposition ------------------------------------------------------------------
    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition and its content type: OpenMetrics when `accept` asks for it,
        otherwise the Prometheus text format 0.0.4.
        """
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


def wants_prometheus(accept: str | None) -> bool:
    """True when `accept` names ``text/plain`` or ``application/openmetrics-text`` with a
    quality at least that of ``application/json``. No header, ``*/*`` or JSON: False.
    """
    if not accept:
        return False
    prometheus = json = 0.0
    for part in accept.split(","):
        media_type, _, params = part.partition(";")
        media_type = media_type.strip().lower()
        if media_type in _PROMETHEUS_TYPES:
            prometheus = max(prometheus, _quality(params))
        elif media_type == "application/json":
            json = max(json, _quality(params))
    return prometheus > 0 and prometheus >= json


def _quality(params: str) -> float:
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == "q":
            try:
                return min(1.0, max(0.0, float(value)))
            except ValueError:
                return 0.0
    return 1.0


def prometheus_answer(request: Request) -> Response | None:
    """The ``/metrics`` answer in Prometheus format when the request asks for it (``Accept``
    or ``?format=prometheus``), a 400 for an unknown ``?format=``, or None for JSON.
    """
    forced = request.query_params.get("format")
    if forced is not None and forced not in FORMATS:
        return error_response(
            400, "format must be 'prometheus' or 'json'", "bad_request", path=request.url.path
        )
    accept = request.headers.get("accept")
    if forced == "json" or (forced is None and not wants_prometheus(accept)):
        return None
    metrics: PrometheusMetrics = request.app.state.prometheus
    body, content_type = metrics.render(accept)
    return Response(body, headers={"Content-Type": content_type, "Vary": "Accept"})


class _ErrorsCollector:
    """Error answers, read at scrape time from the count JSON ``/metrics`` shows too."""

    def __init__(self, stats: AppStats) -> None:
        self._stats = stats

    def collect(self) -> Iterable[Metric]:
        errors = CounterMetricFamily(
            "embedserve_request_errors",
            "Error answers by status and error_type (429 overloaded or rate_limited, 413, "
            "422, 504, ...).",
            labels=("status", "error_type"),
        )
        for (status, error_type), count in self._stats.errors.items():
            errors.add_metric((str(status), error_type), count)
        yield errors


class _ModelsCollector:
    """Reads the model registry at scrape time: no hook on the request path for these."""

    def __init__(self, models: ModelRegistry) -> None:
        self._models = models

    def collect(self) -> Iterable[Metric]:
        infos = self._models.loaded()
        queued = GaugeMetricFamily(
            "embedserve_queue_depth", "Texts waiting in the model's queue.", labels=["model"]
        )
        in_flight = GaugeMetricFamily(
            "embedserve_in_flight_texts",
            "Texts in the batch the model is running now.",
            labels=["model"],
        )
        load_time = GaugeMetricFamily(
            "embedserve_model_load_seconds",
            "Time the loaded model took to load and warm up.",
            labels=["model"],
        )
        dropped = CounterMetricFamily(
            "embedserve_dropped_texts",
            "Texts dropped before inference (client gone, timeout), since the model loaded.",
            labels=["model"],
        )
        failed = CounterMetricFamily(
            "embedserve_failed_batches",
            "Model batches whose inference raised, since the model loaded.",
            labels=["model"],
        )
        lane_queued = GaugeMetricFamily(
            "embedserve_lane_queue_depth",
            "Texts waiting in the model's queue, by priority lane.",
            labels=["model", "lane"],
        )
        lane_texts = CounterMetricFamily(
            "embedserve_lane_texts",
            "Texts embedded, by priority lane, since the model loaded.",
            labels=["model", "lane"],
        )
        for info in infos:
            labels = [info.name]
            queued.add_metric(labels, info.queued)
            in_flight.add_metric(labels, info.in_flight)
            load_time.add_metric(labels, info.load_time_s or 0.0)
            dropped.add_metric(labels, info.stats.get("dropped_texts", 0))
            failed.add_metric(labels, info.stats.get("failed_batches", 0))
            for lane, figures in info.lanes.items():
                lane_queued.add_metric([info.name, lane], figures["queue_depth"])
                lane_texts.add_metric([info.name, lane], figures["texts"])
        yield GaugeMetricFamily("embedserve_models_loaded", "Models loaded now.", len(infos))
        yield from (queued, in_flight, load_time, dropped, failed, lane_queued, lane_texts)
        yield CounterMetricFamily(
            "embedserve_model_evictions",
            "Models unloaded to stay within MAX_CACHED_MODELS (least recently used first).",
            self._models.evictions,
        )
        yield CounterMetricFamily(
            "embedserve_model_offloads",
            "Models unloaded after MODEL_CACHE_TTL unused.",
            self._models.offloads,
        )


class _EventLoopCollector:
    """Counts the event loop's tasks at scrape time: one per open request plus a few fixed
    ones (batcher loops, the sweeper), so steady growth at steady load is a leak.
    """

    def collect(self) -> Iterable[Metric]:
        try:
            tasks = asyncio.all_tasks()
        except RuntimeError:  # scraped from a thread without a running loop: nothing to say
            return
        yield GaugeMetricFamily(
            "embedserve_event_loop_tasks",
            "Tasks on the server's event loop (unfinished), the scrape's own included.",
            len(tasks),
        )
