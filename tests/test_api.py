"""The HTTP API in process: every endpoint, every documented error, over a fake backend."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import numpy as np
import orjson
import pytest
from starlette.types import ASGIApp, Message

from embedserve.models.store import Manifest, ModelStore
from tests.conftest import Api, Serve
from tests.fakes import GatedRunner, fake_vector

pytestmark = pytest.mark.anyio

# Each of processing_time_ms and the two headers is rounded to a microsecond.
ROUNDING_MS = 0.002
LEAKS = ("Traceback", 'File "', "/work/", "/tmp/", "site-packages")
INVALID_NAMES = ["../../etc/passwd", "/abs/path", "a\x00b", "a/../b", "%2e%2e"]


# -- helpers -------------------------------------------------------------------------
def assert_no_leak(response: httpx.Response) -> None:
    for leak in LEAKS:
        assert leak not in response.text, f"{leak!r} leaked in {response.text!r}"


def assert_error(response: httpx.Response, status: int, error_type: str) -> dict[str, Any]:
    """The one error shape, with no internals in it; returns the body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert isinstance(body.get("error"), str)
    assert body["error"]
    assert body.get("error_type") == error_type
    assert set(body) <= {"error", "error_type", "details"}
    assert_no_leak(response)
    return body


def assert_vector(row: list[float], text: str) -> None:
    np.testing.assert_allclose(np.asarray(row, dtype=np.float32), fake_vector(text), rtol=1e-6)


async def timed_post(api: Api, path: str, body: Any) -> tuple[httpx.Response, float]:
    """The answer, and the request's wall time in milliseconds as the test saw it."""
    started = time.perf_counter()
    response = await api.client.post(path, json=body)
    return response, (time.perf_counter() - started) * 1000


def assert_timings(response: httpx.Response, wall_ms: float) -> None:
    """X-Queue-Time and X-Inference-Time add up within processing_time_ms, which is within
    the request's wall time; inference (a hop to a worker thread at least) took some."""
    queue_ms = float(response.headers["X-Queue-Time"])
    inference_ms = float(response.headers["X-Inference-Time"])
    processing_ms = response.json()["processing_time_ms"]
    assert queue_ms >= 0 and inference_ms > 0, (queue_ms, inference_ms)
    assert queue_ms + inference_ms <= processing_ms + ROUNDING_MS, (queue_ms, inference_ms)
    assert processing_ms <= wall_ms, (processing_ms, wall_ms)


async def model_metrics(api: Api, name: str = "fake/a") -> dict[str, Any]:
    response = await api.client.get("/metrics")
    assert response.status_code == 200
    figures: dict[str, Any] = response.json()["batching"]["models"][name]
    return figures


async def wait_until_queued(api: Api, depth: int, in_flight: int | None = None) -> None:
    """Yield to the loop until the model's queue holds `depth` texts (fail_after bounds it)."""
    while True:
        figures = await model_metrics(api)
        if figures["queue_depth"] == depth and in_flight in (None, figures["in_flight"]):
            return
        await anyio.lowlevel.checkpoint()


class CountingBody:
    """A JSON request body streamed in chunks; `pulled` counts the bytes the server took."""

    def __init__(self, size: int, chunk: int = 512) -> None:
        self.chunks = [b'{"text": "'] + [b"x" * chunk] * (size // chunk) + [b'"}']
        self.size = sum(len(c) for c in self.chunks)
        self.pulled = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            self.pulled += len(chunk)
            yield chunk


async def raw_get(app: ASGIApp, path: str) -> tuple[int, bytes]:
    """GET `path` exactly as given (httpx would normalise away its ``..`` segments)."""
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test")],
        "server": ("test", 80),
        "client": ("127.0.0.1", 1234),
    }
    await app(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


# -- POST /embed and /embed/batch ------------------------------------------------------
async def test_embed_returns_the_fake_vector_with_timing_headers(api: Api) -> None:
    with anyio.fail_after(10):
        response, wall_ms = await timed_post(
            api, "/embed", {"model_name": "fake/a", "text": "hello world"}
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == "fake/a"
    assert body["dimension"] == 8
    assert body["text_length"] == len("hello world")
    assert "truncated" not in body
    assert_vector(body["embedding"], "hello world")
    assert_timings(response, wall_ms)


async def test_embed_without_model_name_uses_the_first_required_model(serve: Serve) -> None:
    with anyio.fail_after(10):
        async with serve(required_models=["fake/b", "fake/a"]) as api:
            one = await api.client.post("/embed", json={"text": "hi"})
            many = await api.client.post("/embed/batch", json={"texts": ["hi", "there"]})
    assert one.status_code == 200, one.text
    assert one.json()["model_name"] == "fake/b"
    assert many.status_code == 200, many.text
    assert many.json()["model_name"] == "fake/b"
    assert ["hi"] in api.loader.backends["fake/b"].batches


async def test_embed_loads_a_catalogue_model_on_first_use(api: Api) -> None:
    with anyio.fail_after(10):
        response = await api.client.post("/embed", json={"model_name": "fake/c", "text": "hi"})
    assert response.status_code == 200, response.text
    assert response.json()["model_name"] == "fake/c"
    assert api.loader.calls == ["fake/a", "fake/c"]


async def test_embed_batch_keeps_the_order_of_texts(api: Api) -> None:
    texts = ["first", "the second text", "first", "a third one"]
    with anyio.fail_after(10):
        response, wall_ms = await timed_post(
            api, "/embed/batch", {"model_name": "fake/a", "texts": texts}
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == "fake/a"
    assert body["dimension"] == 8
    assert body["count"] == len(texts)
    assert len(body["embeddings"]) == len(texts)
    for row, text in zip(body["embeddings"], texts, strict=True):
        assert_vector(row, text)
    assert_timings(response, wall_ms)


# -- GET /health, /ready, /metrics -----------------------------------------------------
async def test_health_and_ready_when_required_models_are_loaded(api: Api) -> None:
    created = api.app.state.stats.started  # time.monotonic() when the app was made
    with anyio.fail_after(10):
        before_s = time.monotonic() - created
        health = await api.client.get("/health")
        after_s = time.monotonic() - created
        ready = await api.client.get("/ready")
    assert health.status_code == 200
    body = health.json()
    assert body["status"] == "healthy"
    assert body["cache_info"]["cached_models"] == ["fake/a"]
    # The app's age while it answered, rounded to a millisecond.
    assert before_s - 0.0005 <= body["uptime_seconds"] <= after_s + 0.0005, (before_s, after_s)
    assert ready.status_code == 200


async def test_cache_info_has_the_original_apis_keys_on_health_and_metrics(
    serve: Serve,
) -> None:
    """Clients of the original Fast Embedding API read these four keys, with these types."""
    # By environment name: what an operator sets, whatever the attributes are called.
    settings = {"MAX_CACHED_MODELS": 3, "MODEL_CACHE_TTL": 120}
    with anyio.fail_after(10):
        async with serve(**settings) as api:
            other = await api.client.post("/embed", json={"text": "x", "model_name": "fake/b"})
            assert other.status_code == 200, other.text
            health = (await api.client.get("/health")).json()
            metrics = (await api.client.get("/metrics")).json()
    want = {
        "cached_models": ["fake/b", "fake/a"],  # most recently used first
        "num_cached": 2,
        "max_cached": 3,
        "cache_ttl": 120,
    }
    assert health["cache_info"] == want
    assert metrics["cache_info"] == want


async def test_health_and_ready_are_503_once_shutting_down(api: Api) -> None:
    api.registry.begin_shutdown()
    with anyio.fail_after(10):
        health = await api.client.get("/health")
        ready = await api.client.get("/ready")
    assert health.status_code == 503
    assert health.json()["status"] == "shutting_down"
    assert set(health.json()) >= {"cache_info", "uptime_seconds"}
    assert ready.status_code == 503


async def test_metrics_counts_move_with_requests(api: Api) -> None:
    with anyio.fail_after(10):
        before = (await api.client.get("/metrics")).json()
        await api.client.post("/embed", json={"text": "one"})
        await api.client.post("/embed/batch", json={"texts": ["two", "three", "four"]})
        response = await api.client.get("/metrics")
    assert response.status_code == 200
    after = response.json()
    assert set(after) >= {
        "total_requests",
        "total_embeddings",
        "cache_info",
        "uptime_seconds",
        "batching",
    }
    assert after["total_requests"] == before["total_requests"] + 2
    assert after["total_embeddings"] == before["total_embeddings"] + 4
    assert after["batching"]["batches"] >= before["batching"]["batches"] + 2
    assert after["batching"]["models"]["fake/a"]["queue_depth"] == 0


async def test_metrics_disabled_is_404(serve: Serve) -> None:
    with anyio.fail_after(10):
        async with serve(enable_metrics=False) as api:
            response = await api.client.get("/metrics")
    assert_error(response, 404, "not_found")


# -- GET /models, /models/{name} -------------------------------------------------------
async def test_models_lists_required_cached_and_allowed(api: Api) -> None:
    with anyio.fail_after(10):
        response = await api.client.get("/models")
    assert response.status_code == 200
    body = response.json()
    assert body["required_models"] == ["fake/a"]
    assert body["cached_models"] == ["fake/a"]
    assert body["allowed_models"] is None


async def test_models_lists_the_allow_list_when_set(serve: Serve) -> None:
    with anyio.fail_after(10):
        async with serve(allowed_models="fake/a,fake/b") as api:
            response = await api.client.get("/models")
    assert response.status_code == 200
    assert response.json()["allowed_models"] == ["fake/a", "fake/b"]


class CountingStore(ModelStore):
    """A models directory that counts its reads (the listing and single manifests)."""

    def __init__(self, root: Any) -> None:
        super().__init__(root)
        self.reads = 0

    def list(self) -> list[Manifest]:
        self.reads += 1
        return super().list()

    def get(self, name: str) -> Manifest | None:
        self.reads += 1
        return super().get(name)


def import_model(store: ModelStore, name: str) -> None:
    directory = store.model_dir(name)
    directory.mkdir(parents=True)
    store.write_manifest(directory, Manifest(name, 8, "mean", True, 256, "test", "0" * 64))


async def test_model_listings_read_no_file_per_request(api: Api) -> None:
    store = api.registry.store = CountingStore(api.settings.models_dir)
    import_model(store, "org/imported")
    with anyio.fail_after(10):
        await api.registry.refresh_local_models()  # what start-up and every sweep do
        assert store.reads == 1
        for path in ("/models", "/v1/models", "/models/org/imported", "/v1/models/org/imported"):
            for _ in range(3):
                assert (await api.client.get(path)).status_code == 200, path
        assert store.reads == 1
        listed = (await api.client.get("/models")).json()["local_models"]
    assert listed == ["org/imported"]


async def test_a_model_imported_while_running_is_listed_after_the_refresh(api: Api) -> None:
    store = ModelStore(api.settings.models_dir)
    import_model(store, "org/one")
    with anyio.fail_after(10):
        await api.registry.refresh_local_models()
        import_model(store, "org/two")
        before = (await api.client.get("/models")).json()["local_models"]
        await api.registry.refresh_local_models()
        after = (await api.client.get("/models")).json()["local_models"]
        store.remove("org/one")
        await api.registry.refresh_local_models()
        removed = (await api.client.get("/v1/models")).json()["data"]
    assert (before, after) == (["org/one"], ["org/one", "org/two"])
    assert [card["id"] for card in removed] == ["fake/a", "org/two"]


async def test_a_model_imported_since_the_listing_is_found_and_then_listed(api: Api) -> None:
    with anyio.fail_after(10):
        import_model(ModelStore(api.settings.models_dir), "org/new")
        details = await api.client.get("/models/org/new")  # reads its manifest: not listed
        listed = (await api.client.get("/models")).json()["local_models"]
    assert details.status_code == 200
    assert (details.json()["is_cached"], details.json()["dimension"]) == (False, 8)
    assert listed == ["org/new"]


async def test_model_details_of_a_loaded_model(api: Api) -> None:
    with anyio.fail_after(10):
        response = await api.client.get("/models/fake/a")
        uptime_s = (await api.client.get("/health")).json()["uptime_seconds"]
    assert response.status_code == 200
    body = response.json()
    assert body["model_name"] == "fake/a"
    assert body["is_cached"] is True
    # Loaded after the app was created (each figure rounded: 0.1 ms, 1 ms).
    assert 0 <= body["load_time"] <= uptime_s + 0.001, (body["load_time"], uptime_s)
    assert isinstance(body["loaded_at"], str)
    assert isinstance(body["last_used"], str)
    assert body["packed"] is False  # FakeBackend plans padded batches by default
    assert body["packed_graph"] is None  # a catalogue model: no manifest
    assert set(body["stats"]) >= {"mean_fill", "real_tokens", "slot_tokens"}


async def test_metrics_show_batch_fill(api: Api) -> None:
    with anyio.fail_after(10):
        await api.client.post("/embed/batch", json={"texts": ["a", "b c d e"]})
        body = (await api.client.get("/metrics")).json()
    batching = body["batching"]
    model = batching["models"]["fake/a"]
    assert model["packed"] is False
    # The two texts ran padded together (3 and 6 tokens): 9 real of 12 slots, or alone.
    assert batching["real_tokens"] >= 9
    assert batching["slot_tokens"] >= batching["real_tokens"]
    assert 0 < model["mean_fill"] <= 1
    assert batching["mean_fill"] == round(batching["real_tokens"] / batching["slot_tokens"], 4)


@pytest.mark.parametrize("name", ["fake/b", "BAAI/bge-small-en-v1.5"])
async def test_model_details_of_a_catalogue_model_not_yet_loaded(api: Api, name: str) -> None:
    with anyio.fail_after(10):
        response = await api.client.get(f"/models/{name}")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == name
    assert body["is_cached"] is False
    assert set(body) >= {"load_time", "loaded_at", "last_used"}
    assert name not in api.loader.calls


@pytest.mark.parametrize("path", ["/models/nope/x", "/models/%2e%2e/x", "/models/fake%2f..%2fa"])
async def test_model_details_of_unknown_or_traversal_names_are_404(api: Api, path: str) -> None:
    with anyio.fail_after(10):
        response = await api.client.get(path)
    assert_error(response, 404, "model_not_found")


@pytest.mark.parametrize("path", ["/models/../etc", "/models/../../etc/passwd", "/models/a/../b"])
async def test_model_details_of_unnormalised_traversal_paths_are_404(api: Api, path: str) -> None:
    with anyio.fail_after(10):
        status, raw = await raw_get(api.app, path)
    assert status == 404
    body = orjson.loads(raw)
    assert body["error_type"] == "model_not_found"
    for leak in LEAKS:
        assert leak not in raw.decode()


async def test_model_details_outside_the_allow_list_are_404(serve: Serve) -> None:
    with anyio.fail_after(10):
        async with serve(allowed_models=["fake/a"]) as api:
            response = await api.client.get("/models/fake/b")
    assert_error(response, 404, "model_not_found")


# -- request errors --------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"{bad", b'{"text": "a"', b"", b"\xff\xfe"])
async def test_malformed_json_is_400(api: Api, content: bytes) -> None:
    with anyio.fail_after(10):
        response = await api.client.post(
            "/embed", content=content, headers={"content-type": "application/json"}
        )
    assert_error(response, 400, "bad_request")


async def test_text_plain_is_415(api: Api) -> None:
    with anyio.fail_after(10):
        response = await api.client.post(
            "/embed", content=b'{"text": "hi"}', headers={"content-type": "text/plain"}
        )
    assert_error(response, 415, "unsupported_media_type")


async def test_form_body_is_415(api: Api) -> None:
    with anyio.fail_after(10):
        response = await api.client.post("/embed/batch", data={"texts": "hi"})
    assert_error(response, 415, "unsupported_media_type")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"text": 5},
        {"text": ["a"]},
        {"text": None},
        {"text": ""},
        {"text": "  \n\t "},
        ["hi"],
        {"text": "hi", "truncate": "yes"},
    ],
    ids=repr,
)
async def test_invalid_embed_body_is_422(api: Api, body: Any) -> None:
    with anyio.fail_after(10):
        response = await api.client.post("/embed", json=body)
    assert_error(response, 422, "validation_error")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"texts": []},
        {"texts": "one text"},
        {"texts": None},
        {"texts": ["ok", 1]},
        {"texts": ["ok", ""]},
        {"texts": ["ok", "   "]},
    ],
    ids=repr,
)
async def test_invalid_batch_body_is_422(api: Api, body: Any) -> None:
    with anyio.fail_after(10):
        response = await api.client.post("/embed/batch", json=body)
    assert_error(response, 422, "validation_error")


async def test_text_over_max_length_is_422_or_truncated_on_request(serve: Serve) -> None:
    text = "abcdefghij" * 2
    with anyio.fail_after(10):
        async with serve(max_text_chars=16) as api:
            refused = await api.client.post("/embed", json={"text": text})
            refused_batch = await api.client.post("/embed/batch", json={"texts": ["ok", text]})
            cut = await api.client.post("/embed", json={"text": text, "truncate": True})
    assert "MAX_TEXT_LENGTH" in assert_error(refused, 422, "validation_error")["error"]
    assert "texts[1]" in assert_error(refused_batch, 422, "validation_error")["error"]
    assert cut.status_code == 200, cut.text
    body = cut.json()
    assert body["text_length"] == 16
    assert body["truncated"] is True
    assert_vector(body["embedding"], text[:16])


async def test_text_blank_after_truncation_is_422(serve: Serve) -> None:
    with anyio.fail_after(10):
        async with serve(max_text_chars=4) as api:
            response = await api.client.post("/embed", json={"text": "    x", "truncate": True})
    assert_error(response, 422, "validation_error")


async def test_more_texts_than_max_batch_size_is_422_naming_the_limit(serve: Serve) -> None:
    with anyio.fail_after(10):
        async with serve(max_batch_size=3) as api:
            response = await api.client.post("/embed/batch", json={"texts": ["t"] * 4})
    message = assert_error(response, 422, "validation_error")["error"]
    assert "MAX_BATCH_SIZE" in message
    assert "3" in message


async def test_body_over_limit_with_content_length_is_413_unread(serve: Serve) -> None:
    body = CountingBody(size=20_480)
    with anyio.fail_after(10):
        async with serve(max_request_bytes=2048) as api:
            response = await api.client.post(
                "/embed",
                content=body,
                headers={"content-type": "application/json", "content-length": str(body.size)},
            )
    assert response.request.headers["content-length"] == str(body.size)
    assert_error(response, 413, "request_too_large")
    assert body.pulled == 0


async def test_streamed_body_over_limit_is_413_after_reading_little(serve: Serve) -> None:
    body = CountingBody(size=20_480, chunk=512)
    with anyio.fail_after(10):
        async with serve(max_request_bytes=2048) as api:
            response = await api.client.post(
                "/embed", content=body, headers={"content-type": "application/json"}
            )
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "request_too_large")
    # Past the limit the body is read on and discarded (never held), up to twice the limit,
    # so that a client still sending gets the answer (see embedserve/http/middleware/body_limit.py).
    assert body.pulled <= 2 * 2048 + 2 * 512


async def test_model_outside_the_allow_list_is_403(serve: Serve) -> None:
    with anyio.fail_after(10):
        async with serve(allowed_models=["fake/a"]) as api:
            response = await api.client.post("/embed", json={"model_name": "fake/b", "text": "x"})
    assert_error(response, 403, "model_not_allowed")
    assert "fake/b" not in api.loader.calls


async def test_unknown_model_is_404(api: Api) -> None:
    with anyio.fail_after(10):
        response = await api.client.post("/embed", json={"model_name": "nope/x", "text": "x"})
    assert_error(response, 404, "model_not_found")
    assert api.loader.calls == ["fake/a"]


@pytest.mark.parametrize("name", INVALID_NAMES, ids=repr)
async def test_invalid_model_name_is_400_and_loads_nothing(api: Api, name: str) -> None:
    with anyio.fail_after(10):
        one = await api.client.post("/embed", json={"model_name": name, "text": "x"})
        many = await api.client.post("/embed/batch", json={"model_name": name, "texts": ["x"]})
    assert_error(one, 400, "invalid_model_name")
    assert_error(many, 400, "invalid_model_name")
    assert api.loader.calls == ["fake/a"]


async def test_failed_model_load_is_503_without_internals(api: Api) -> None:
    api.loader.fail["fake/b"] = OSError('File "/work/main/models/fake/b/model.onnx" is missing')
    with anyio.fail_after(10):
        response = await api.client.post("/embed", json={"model_name": "fake/b", "text": "x"})
    assert "fake/b" in assert_error(response, 503, "model_unavailable")["error"]


# -- load, time and failure ------------------------------------------------------------
async def test_full_queue_is_429_at_once_and_admitted_requests_finish(serve: Serve) -> None:
    gate = GatedRunner(open_=True)  # open while the lifespan loads fake/a
    answers: dict[str, httpx.Response] = {}
    with anyio.fail_after(10):
        limits = {"max_queue_size_interactive": 2, "max_batch_size": 2}
        async with serve(run_sync=gate, **limits) as api:

            async def embed(text: str) -> None:
                answers[text] = await api.client.post("/embed", json={"text": text})

            gate.open = False
            async with anyio.create_task_group() as group:
                group.start_soon(embed, "held")
                await gate.wait_for_waiting(1)
                group.start_soon(embed, "queued one")
                group.start_soon(embed, "queued two")
                await wait_until_queued(api, 2)
                refused = await api.client.post("/embed", json={"text": "one too many"})
                gate.open = True
                gate.release()
    assert_error(refused, 429, "overloaded")
    assert int(refused.headers["Retry-After"]) >= 1
    assert sorted(answers) == ["held", "queued one", "queued two"]
    for text, response in answers.items():
        assert response.status_code == 200, response.text
        assert_vector(response.json()["embedding"], text)


async def test_request_timeout_is_504_and_its_work_is_dropped(serve: Serve) -> None:
    gate = GatedRunner(open_=True)
    with anyio.fail_after(10):
        async with serve(run_sync=gate, request_timeout_s=0.05) as api:
            gate.open = False
            in_batch = await api.client.post("/embed", json={"text": "held in the model"})
            in_queue = await api.client.post("/embed", json={"text": "held in the queue"})
            assert (await model_metrics(api))["queue_depth"] == 0  # dropped before inference
            gate.open = True
            gate.release()
            await wait_until_queued(api, 0, in_flight=0)
            figures = await model_metrics(api)
            after = await api.client.post("/embed", json={"text": "after"})
    assert_error(in_batch, 504, "timeout")
    assert_error(in_queue, 504, "timeout")
    assert figures["in_flight"] == 0
    assert figures["dropped_texts"] == 1
    assert after.status_code == 200, after.text


@pytest.mark.parametrize(
    ("path", "body"), [("/embed", {"text": "x"}), ("/embed/batch", {"texts": ["x"]})]
)
async def test_requests_while_shutting_down_are_503(
    api: Api, path: str, body: dict[str, Any]
) -> None:
    api.registry.begin_shutdown()
    with anyio.fail_after(10):
        response = await api.client.post(path, json=body)
    assert_error(response, 503, "shutting_down")
    assert response.headers["Retry-After"] == "1"


async def test_backend_failure_is_500_naming_the_model_then_recovers(api: Api) -> None:
    api.loader.backends["fake/a"].fail_next = RuntimeError('Traceback: File "/work/x.py"')
    with anyio.fail_after(10):
        failed = await api.client.post("/embed", json={"text": "boom"})
        recovered = await api.client.post("/embed", json={"text": "fine"})
    assert "fake/a" in assert_error(failed, 500, "inference_error")["error"]
    assert recovered.status_code == 200, recovered.text
    assert_vector(recovered.json()["embedding"], "fine")


async def test_unexpected_error_is_500_without_a_traceback(api: Api) -> None:
    def broken(texts: object) -> list[int]:
        raise RuntimeError('Traceback (most recent call last): File "/work/main/x.py"')

    api.loader.backends["fake/a"].tokenize = broken  # type: ignore[method-assign]
    transport = httpx.ASGITransport(app=api.app, raise_app_exceptions=False)
    with anyio.fail_after(10):
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/embed", json={"text": "x"})
    assert_error(response, 500, "internal_error")


# -- routing and CORS ------------------------------------------------------------------
async def test_unknown_route_is_404_in_the_error_shape(api: Api) -> None:
    with anyio.fail_after(10):
        response = await api.client.get("/nope")
    assert_error(response, 404, "not_found")


@pytest.mark.parametrize(("method", "path"), [("GET", "/embed"), ("DELETE", "/health")])
async def test_wrong_method_is_405_in_the_error_shape(api: Api, method: str, path: str) -> None:
    with anyio.fail_after(10):
        response = await api.client.request(method, path)
    assert_error(response, 405, "method_not_allowed")


async def test_cors_preflight_allows_only_configured_origins(serve: Serve) -> None:
    def preflight(origin: str) -> dict[str, str]:
        return {"Origin": origin, "Access-Control-Request-Method": "POST"}

    with anyio.fail_after(10):
        async with serve(enable_cors=True, cors_origins="https://a.example") as api:
            allowed = await api.client.options("/embed", headers=preflight("https://a.example"))
            denied = await api.client.options("/embed", headers=preflight("https://b.example"))
            simple = await api.client.post(
                "/embed", json={"text": "x"}, headers={"Origin": "https://a.example"}
            )
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://a.example"
    assert "access-control-allow-origin" not in denied.headers
    assert simple.headers["access-control-allow-origin"] == "https://a.example"
    assert "x-queue-time" in simple.headers["access-control-expose-headers"].lower()


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/embed", {"text": "leaving"}),
        ("/embed/batch", {"texts": ["leaving"]}),
        ("/v1/embeddings", {"model": "fake/a", "input": "leaving"}),
    ],
)
async def test_client_that_disconnects_while_queued_is_dropped_before_inference(
    serve: Serve, path: str, body: dict[str, Any]
) -> None:
    gate = GatedRunner(open_=True)
    with anyio.fail_after(10):
        async with serve(run_sync=gate) as api:
            gate.open = False
            held = anyio.Event()
            leave = anyio.Event()
            sent: list[Message] = []

            async def receive() -> Message:
                if not held.is_set():
                    held.set()
                    return {"type": "http.request", "body": orjson.dumps(body)}
                await leave.wait()
                return {"type": "http.disconnect"}

            async def send(message: Message) -> None:
                sent.append(message)

            scope = {
                "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
                "headers": [(b"content-type", b"application/json")], "scheme": "http",
                "server": ("test", 80), "client": ("127.0.0.1", 1234), "root_path": "",
                "app": api.app,
            }  # fmt: skip

            async def busy() -> None:
                await api.client.post("/embed", json={"text": "busy"})

            async with anyio.create_task_group() as group:
                group.start_soon(busy)
                await gate.wait_for_waiting(1)
                group.start_soon(api.app, scope, receive, send)
                await wait_until_queued(api, 1)
                leave.set()
                await wait_until_queued(api, 0)
                gate.open = True
                gate.release()
            figures = await model_metrics(api)
    assert figures["dropped_texts"] == 1
    assert ["leaving"] not in api.loader.backends["fake/a"].batches
    assert sent[0]["status"] == 499
