"""Prometheus metrics: the exposition, Accept negotiation, and the figures moving under load."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from embedserve.http.prometheus import PrometheusMetrics, wants_prometheus
from tests.conftest import Api, Serve
from tests.fakes import GatedRunner

pytestmark = pytest.mark.anyio

FAMILIES = {
    "embedserve_requests": "counter",
    "embedserve_request_duration_seconds": "histogram",
    "embedserve_request_errors": "counter",
    "embedserve_queue_time_seconds": "histogram",
    "embedserve_inference_time_seconds": "histogram",
    "embedserve_batch_size": "histogram",
    "embedserve_batch_padded_tokens": "histogram",
    "embedserve_batch_fill_ratio": "histogram",
    "embedserve_batch_duration_seconds": "histogram",
    "embedserve_queue_depth": "gauge",
    "embedserve_in_flight_texts": "gauge",
    "embedserve_models_loaded": "gauge",
    "embedserve_model_load_seconds": "gauge",
    "embedserve_model_evictions": "counter",
    "embedserve_model_offloads": "counter",
    "embedserve_dropped_texts": "counter",
    "embedserve_failed_batches": "counter",
    "embedserve_lane_queue_depth": "gauge",
    "embedserve_lane_texts": "counter",
    "embedserve_event_loop_tasks": "gauge",
}
PROMETHEUS_SCRAPE_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# -- helpers -------------------------------------------------------------------------
async def scrape(api: Api) -> tuple[dict[str, str], Samples]:
    """Family name -> type, and (sample name, labels) -> value, from the text exposition."""
    response = await api.client.get("/metrics", headers={"Accept": "text/plain"})
    assert response.status_code == 200, response.text
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return types, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; 0 when the series does not exist (yet)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


async def wait_queued(api: Api, depth: int) -> None:
    """Yield to the loop until fake/a's queue holds `depth` texts (fail_after bounds it)."""
    while api.registry.loaded()[0].queued < depth:
        await anyio.lowlevel.checkpoint()


async def post(api: Api, path: str, body: dict[str, Any]) -> None:
    await api.client.post(path, json=body)


async def get_metrics(api: Api, accept: str | None, query: str = "") -> httpx.Response:
    request = api.client.build_request("GET", f"/metrics{query}")
    if accept is None:
        del request.headers["accept"]
    else:
        request.headers["accept"] = accept
    return await api.client.send(request)


# -- the exposition --------------------------------------------------------------------
async def test_exposition_parses_and_has_every_family(api: Api) -> None:
    with anyio.fail_after(10):
        assert (await api.client.post("/embed", json={"text": "one"})).status_code == 200
        batch = await api.client.post("/embed/batch", json={"texts": ["two", "three"]})
        assert batch.status_code == 200
        assert (await api.client.post("/embed", json={})).status_code == 422
        types, samples = await scrape(api)
    for name, kind in FAMILIES.items():
        assert types.get(name) == kind, (name, types.get(name))
    assert value(samples, "embedserve_requests_total", endpoint="/embed", status="200") == 1
    assert value(samples, "embedserve_requests_total", endpoint="/embed/batch", status="200") == 1
    assert value(samples, "embedserve_request_duration_seconds_count", endpoint="/embed") == 2
    # /embed ran in the interactive lane, /embed/batch in the bulk lane.
    for lane in ("interactive", "bulk"):
        assert value(samples, "embedserve_queue_time_seconds_count", model="fake/a", lane=lane) == 1
        assert value(samples, "embedserve_lane_queue_depth", model="fake/a", lane=lane) == 0
    assert value(samples, "embedserve_lane_texts_total", model="fake/a", lane="interactive") == 1
    assert value(samples, "embedserve_lane_texts_total", model="fake/a", lane="bulk") == 2
    assert value(samples, "embedserve_inference_time_seconds_count", model="fake/a") == 2
    assert value(samples, "embedserve_batch_size_sum", model="fake/a") == 3
    assert value(samples, "embedserve_batch_padded_tokens_sum", model="fake/a") > 0
    assert value(samples, "embedserve_models_loaded") == 1
    assert value(samples, "embedserve_queue_depth", model="fake/a") == 0
    load_s = api.registry.describe("fake/a").load_time_s
    assert value(samples, "embedserve_model_load_seconds", model="fake/a") == load_s
    assert value(samples, "embedserve_model_evictions_total") == api.registry.evictions
    # the scrape itself is counted once it has been answered
    _, again = await scrape(api)
    assert value(again, "embedserve_requests_total", endpoint="/metrics", status="200") >= 1


async def test_batch_size_histogram_moves_under_concurrent_load(serve: Serve) -> None:
    gate = GatedRunner(open_=True)  # open while the lifespan loads fake/a
    texts = [f"queued text {n}" for n in range(4)]  # equal lengths: one batch fits them all
    with anyio.fail_after(10):
        async with serve(run_sync=gate) as api:
            _, before = await scrape(api)
            gate.open = False
            async with anyio.create_task_group() as group:
                group.start_soon(post, api, "/embed", {"text": "held text"})
                await gate.wait_for_waiting(1)
                for text in texts:
                    group.start_soon(post, api, "/embed", {"text": text})
                await wait_queued(api, len(texts))
                gate.open = True
                gate.release()
            _, after = await scrape(api)
    together = [sorted(b) for b in api.loader.backends["fake/a"].batches if len(b) > 1]
    assert together == [texts]

    def moved(name: str, **labels: str) -> float:
        return value(after, name, model="fake/a", **labels) - value(
            before, name, model="fake/a", **labels
        )

    assert moved("embedserve_batch_size_count") == 2
    assert moved("embedserve_batch_size_sum") == 5
    assert moved("embedserve_batch_size_bucket", le="1.0") == 1  # the held text alone
    assert moved("embedserve_batch_size_bucket", le="2.0") == 1
    assert moved("embedserve_batch_size_bucket", le="4.0") == 2  # the four queued together
    # Equal lengths pad nothing: every batch was all real tokens.
    assert moved("embedserve_batch_fill_ratio_count") == 2
    assert moved("embedserve_batch_fill_ratio_sum") == 2.0
    assert moved("embedserve_batch_fill_ratio_bucket", le="0.98") == 0
    assert moved("embedserve_queue_time_seconds_count", lane="interactive") == 5


async def test_queue_depth_gauge_reads_the_batcher(serve: Serve) -> None:
    gate = GatedRunner(open_=True)
    with anyio.fail_after(10):
        async with serve(run_sync=gate) as api:
            gate.open = False
            async with anyio.create_task_group() as group:
                group.start_soon(post, api, "/embed", {"text": "held"})
                await gate.wait_for_waiting(1)
                group.start_soon(post, api, "/embed/batch", {"texts": ["a", "b"]})
                await wait_queued(api, 2)
                _, during = await scrape(api)
                gate.open = True
                gate.release()
    assert value(during, "embedserve_queue_depth", model="fake/a") == 2
    assert value(during, "embedserve_in_flight_texts", model="fake/a") == 1


async def test_event_loop_tasks_gauge_counts_open_requests(serve: Serve) -> None:
    gate = GatedRunner(open_=True)
    with anyio.fail_after(10):
        async with serve(run_sync=gate) as api:
            _, idle = await scrape(api)
            gate.open = False
            async with anyio.create_task_group() as group:
                group.start_soon(post, api, "/embed", {"text": "held"})
                await gate.wait_for_waiting(1)
                group.start_soon(post, api, "/embed", {"text": "queued"})
                await wait_queued(api, 1)
                _, busy = await scrape(api)
                gate.open = True
                gate.release()
            _, done = await scrape(api)
    tasks = "embedserve_event_loop_tasks"
    # Each open request is its client task (the handler's work runs in it) plus its
    # disconnect watcher.
    assert value(busy, tasks) >= value(idle, tasks) + 2 * 2
    assert value(done, tasks) == value(idle, tasks)


async def test_event_loop_tasks_gauge_is_left_out_off_the_loop(api: Api) -> None:
    metrics = PrometheusMetrics(api.registry, process=False)
    in_thread = await anyio.to_thread.run_sync(
        metrics.registry.get_sample_value, "embedserve_event_loop_tasks"
    )
    assert in_thread is None
    assert metrics.registry.get_sample_value("embedserve_event_loop_tasks") is not None


# -- errors and rejections -----------------------------------------------------------
async def test_rejections_are_counted_by_status_and_error_type(serve: Serve) -> None:
    gate = GatedRunner(open_=True)
    with anyio.fail_after(10):
        async with serve(
            run_sync=gate, max_queue_size=2, max_batch_size=2, max_request_bytes=2048
        ) as api:
            gate.open = False
            async with anyio.create_task_group() as group:
                group.start_soon(post, api, "/embed", {"text": "held"})
                await gate.wait_for_waiting(1)
                group.start_soon(post, api, "/embed/batch", {"texts": ["a", "b"]})
                await wait_queued(api, 2)
                # The bulk lane is full (a query would still be admitted).
                refused = await api.client.post("/embed/batch", json={"texts": ["one more"]})
                gate.open = True
                gate.release()
            invalid = await api.client.post("/embed", json={"text": ""})
            too_large = await api.client.post("/embed", json={"text": "x" * 4096})
            _, samples = await scrape(api)
    assert (refused.status_code, invalid.status_code, too_large.status_code) == (429, 422, 413)

    def errors(status: str, error_type: str) -> float:
        return value(
            samples, "embedserve_request_errors_total", status=status, error_type=error_type
        )

    assert errors("429", "overloaded") == 1
    assert errors("422", "validation_error") == 1
    assert errors("413", "request_too_large") == 1
    assert value(samples, "embedserve_requests_total", endpoint="/embed/batch", status="429") == 1
    assert value(samples, "embedserve_requests_total", endpoint="/embed", status="200") == 1


async def test_json_metrics_and_prometheus_count_the_same_errors(serve: Serve) -> None:
    """401 from auth and 429 from the rate limit (middleware), a 422 from a handler and a 404
    from the router: each counted once, the same in both formats."""
    key = "sk-test-aaaaaaaaaaaaaaaaaaaa"
    auth = {"Authorization": f"Bearer {key}"}
    with anyio.fail_after(10):
        async with serve(api_keys=[key], enable_rate_limit=True, rate_limit_requests=2) as api:
            statuses = [
                (await api.client.post("/embed", json={"text": "no key"})).status_code,
                (await api.client.post("/embed", json={"text": ""}, headers=auth)).status_code,
                (await api.client.get("/no/such/path", headers=auth)).status_code,
                (await api.client.post("/embed", json={"text": "x"}, headers=auth)).status_code,
            ]
            json_errors = (await api.client.get("/metrics", headers=auth)).json()["errors"]
            prometheus = {**auth, "Accept": "text/plain"}
            text = (await api.client.get("/metrics", headers=prometheus)).text
    assert statuses == [401, 422, 404, 429]
    by_status: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "embedserve_request_errors_total":
                by_status[(sample.labels["status"], sample.labels["error_type"])] = sample.value
    assert by_status == {
        ("401", "missing_api_key"): 1,
        ("422", "validation_error"): 1,
        ("404", "not_found"): 1,
        ("429", "rate_limited"): 1,
    }
    assert json_errors == {error_type: count for (_, error_type), count in by_status.items()}


async def test_rate_limited_requests_are_counted_under_their_endpoint(serve: Serve) -> None:
    with anyio.fail_after(10):
        async with serve(enable_rate_limit=True, rate_limit_per_minute=1) as api:
            first = await api.client.post("/embed", json={"text": "a"})
            limited = await api.client.post("/embed", json={"text": "b"})
            _, samples = await scrape(api)
    assert (first.status_code, limited.status_code) == (200, 429)
    assert (
        value(samples, "embedserve_request_errors_total", status="429", error_type="rate_limited")
        == 1
    )
    assert value(samples, "embedserve_requests_total", endpoint="/embed", status="429") == 1


async def test_unknown_paths_share_one_endpoint_label(api: Api) -> None:
    with anyio.fail_after(10):
        for n in range(3):
            assert (await api.client.get(f"/nope/{n}")).status_code == 404
        assert (await api.client.get("/models/fake/a")).status_code == 200
        _, samples = await scrape(api)
    assert value(samples, "embedserve_requests_total", endpoint="other", status="404") == 3
    endpoint = "/models/{model_name:path}"
    assert value(samples, "embedserve_requests_total", endpoint=endpoint, status="200") == 1
    assert not any("/nope/" in str(labels) for _, labels in samples)


# -- Accept negotiation ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("accept", "query", "expected"),
    [
        (None, "", "json"),
        ("*/*", "", "json"),
        ("application/json", "", "json"),
        (BROWSER_ACCEPT, "", "json"),
        ("application/json, text/plain;q=0.5", "", "json"),
        ("text/plain", "", "text"),
        ("text/plain;version=0.0.4", "", "text"),
        ("text/plain, application/json", "", "text"),
        ("application/json;q=0.5, text/plain", "", "text"),
        ("application/openmetrics-text; version=1.0.0", "", "openmetrics"),
        (PROMETHEUS_SCRAPE_ACCEPT, "", "openmetrics"),
        ("application/json", "?format=prometheus", "text"),
        (None, "?format=prometheus", "text"),
        ("text/plain", "?format=json", "json"),
    ],
)
async def test_accept_and_format_choose_the_exposition(
    api: Api, accept: str | None, query: str, expected: str
) -> None:
    with anyio.fail_after(10):
        response = await get_metrics(api, accept, query)
    assert response.status_code == 200, response.text
    content_type = response.headers["content-type"]
    if expected == "json":
        assert content_type.startswith("application/json")
        assert set(response.json()) >= {"total_requests", "total_embeddings", "batching"}
    elif expected == "text":
        assert content_type.startswith("text/plain")
        families = {f.name for f in text_string_to_metric_families(response.text)}
        assert "embedserve_models_loaded" in families
    else:
        assert content_type.startswith("application/openmetrics-text")
        assert response.text.rstrip().endswith("# EOF")
        assert "embedserve_models_loaded" in response.text


async def test_unknown_format_is_400(api: Api) -> None:
    with anyio.fail_after(10):
        response = await api.client.get("/metrics?format=xml")
    assert response.status_code == 400
    assert response.json()["error_type"] == "bad_request"


@pytest.mark.parametrize(
    ("accept", "query"),
    [("text/plain", ""), ("application/json", ""), (None, "?format=prometheus")],
)
async def test_disabled_metrics_stay_404_in_every_format(
    serve: Serve, accept: str | None, query: str
) -> None:
    with anyio.fail_after(10):
        async with serve(enable_metrics=False) as api:
            response = await get_metrics(api, accept, query)
            embedded = await api.client.post("/embed", json={"text": "x"})
    assert response.status_code == 404
    assert response.json()["error_type"] == "not_found"
    assert embedded.status_code == 200
    assert api.registry.observer is None
    assert api.app.state.prometheus is None


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        ("", False),
        ("*/*", False),
        ("text/*", False),
        ("text/html", False),
        ("TEXT/PLAIN", True),
        ("text/plain;q=0", False),
        ("text/plain;q=0.4, application/json;q=0.5", False),
        ("text/plain;q=0.5, application/json;q=0.5", True),
        ("application/openmetrics-text;q=0.9, application/json;q=0.8", True),
        ("text/plain;q=oops", False),
    ],
)
def test_wants_prometheus_rule(accept: str, expected: bool) -> None:
    assert wants_prometheus(accept) is expected


async def test_each_app_has_its_own_registry(api: Api) -> None:
    other = PrometheusMetrics(api.registry, process=False)
    other.on_request("/embed", 200, 0.001)
    mine: Any = api.app.state.prometheus
    assert other.registry is not mine.registry
    assert (
        other.registry.get_sample_value(
            "embedserve_requests_total", {"endpoint": "/embed", "status": "200"}
        )
        == 1
    )
    assert (
        mine.registry.get_sample_value(
            "embedserve_requests_total", {"endpoint": "/embed", "status": "200"}
        )
        is None
    )
