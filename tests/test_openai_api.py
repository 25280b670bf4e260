"""The OpenAI-compatible API in process: shapes, base64, usage, models, every error, over a fake."""

from __future__ import annotations

import base64
import time
from datetime import datetime
from typing import Any

import anyio
import anyio.lowlevel
import httpx
import numpy as np
import pytest

from embedserve.models.store import Manifest, ModelStore
from tests.conftest import Api, Serve
from tests.fakes import DIM, fake_vector

pytestmark = pytest.mark.anyio

LEAKS = ("Traceback", 'File "', "/work/", "/tmp/", "site-packages")
OPENAI_TYPES = {
    400: "invalid_request_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    415: "invalid_request_error",
    500: "server_error",
    503: "server_error",
}


# -- helpers -------------------------------------------------------------------------
def assert_openai_error(
    response: httpx.Response, status: int, code: str, param: str | None = None
) -> str:
    """OpenAI's error shape with the right type, code and param; returns the message."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == OPENAI_TYPES[status], error
    assert error["code"] == code, error
    assert error["param"] == param, error
    assert isinstance(error["message"], str)
    assert error["message"]
    for leak in LEAKS:
        assert leak not in response.text, f"{leak!r} leaked in {response.text!r}"
    message: str = error["message"]
    return message


def fake_tokens(text: str, max_tokens: int = 256) -> int:
    """What the fake backend counts: whitespace words + 2 specials, cut at the limit."""
    return min(max_tokens, len(text.split()) + 2)


async def wait_until_queued(api: Api, depth: int) -> None:
    """Yield until fake/a's queue holds `depth` texts (the caller's fail_after bounds it)."""
    while True:
        metrics = (await api.client.get("/metrics")).json()
        if metrics["batching"]["models"]["fake/a"]["queue_depth"] == depth:
            return
        await anyio.lowlevel.checkpoint()


async def embeddings(api: Api, **body: Any) -> httpx.Response:
    with anyio.fail_after(10):
        return await api.client.post("/v1/embeddings", json=body)


def write_manifest(api: Api, name: str, created_at: str = "2024-05-01T12:00:00+00:00") -> None:
    """Make `name` an imported model in the app's models directory (the fake loads it)."""
    store = ModelStore(api.settings.models_dir)
    directory = store.model_dir(name)
    directory.mkdir(parents=True)
    manifest = Manifest(
        name=name,
        dimension=DIM,
        pooling="mean",
        normalize=True,
        max_tokens=256,
        source="test",
        onnx_sha256="0" * 64,
        created_at=created_at,
    )
    store.write_manifest(directory, manifest)


# -- POST /v1/embeddings ---------------------------------------------------------------
async def test_one_string_gives_openais_shape_with_real_usage(api: Api) -> None:
    started = time.perf_counter()
    response = await embeddings(api, model="fake/a", input="hello world")
    wall_ms = (time.perf_counter() - started) * 1000
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"object", "data", "model", "usage"}
    assert body["object"] == "list"
    assert body["model"] == "fake/a"
    [item] = body["data"]
    assert set(item) == {"object", "index", "embedding"}
    assert item["object"] == "embedding"
    assert item["index"] == 0
    np.testing.assert_allclose(item["embedding"], fake_vector("hello world"), rtol=1e-6)
    assert body["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    # Both within the request's wall time, rounded to a microsecond each.
    queue_ms, inference_ms = (
        float(response.headers[f"X-{n}-Time"]) for n in ("Queue", "Inference")
    )
    assert queue_ms >= 0 and inference_ms > 0, (queue_ms, inference_ms)
    assert queue_ms + inference_ms <= wall_ms + 0.001, (queue_ms, inference_ms, wall_ms)
    assert ["hello world"] in api.loader.backends["fake/a"].batches  # through the batcher


async def test_a_list_keeps_its_order_and_counts_every_text(api: Api) -> None:
    texts = ["first", "the second text", "first", "a third one here", "x " * 300]
    response = await embeddings(api, model="fake/a", input=texts, encoding_format="float")
    assert response.status_code == 200, response.text
    body = response.json()
    assert [item["index"] for item in body["data"]] == list(range(len(texts)))
    for item, text in zip(body["data"], texts, strict=True):
        np.testing.assert_allclose(item["embedding"], fake_vector(text), rtol=1e-6)
    expected = sum(fake_tokens(text) for text in texts)
    assert fake_tokens(texts[-1]) == 256  # cut at the model's token limit, as the model does
    assert body["usage"] == {"prompt_tokens": expected, "total_tokens": expected}


async def test_base64_is_little_endian_float32_equal_to_embed(api: Api) -> None:
    texts = ["The quick brown fox", "jumps over the lazy dog"]
    encoded = await embeddings(api, model="fake/a", input=texts, encoding_format="base64")
    assert encoded.status_code == 200, encoded.text
    for item, text in zip(encoded.json()["data"], texts, strict=True):
        assert isinstance(item["embedding"], str)
        # What the official client does: np.frombuffer(base64.b64decode(s), dtype="float32").
        decoded = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
        with anyio.fail_after(10):
            seed = await api.client.post("/embed", json={"model_name": "fake/a", "text": text})
        assert seed.status_code == 200, seed.text
        want = np.asarray(seed.json()["embedding"], dtype=np.float32)
        assert decoded.shape == (DIM,)
        np.testing.assert_array_equal(decoded, want)


async def test_float_and_base64_carry_the_same_numbers(api: Api) -> None:
    floats = (await embeddings(api, model="fake/a", input="same text")).json()
    packed = await embeddings(api, model="fake/a", input="same text", encoding_format="base64")
    row = np.frombuffer(base64.b64decode(packed.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(row, np.asarray(floats["data"][0]["embedding"], np.float32))
    assert packed.json()["usage"] == floats["usage"]


async def test_extra_fields_and_user_are_accepted(api: Api) -> None:
    response = await embeddings(api, model="fake/a", input="hi", user="u-1", other={"x": 1})
    assert response.status_code == 200, response.text


async def test_dimensions_equal_to_the_models_own_are_accepted(api: Api) -> None:
    loaded = await embeddings(api, model="fake/a", input="hi", dimensions=DIM)
    catalogue = await embeddings(api, model="fake/b", input="hi", dimensions=DIM)
    assert loaded.status_code == 200, loaded.text
    assert catalogue.status_code == 200, catalogue.text
    assert len(catalogue.json()["data"][0]["embedding"]) == DIM


async def test_dimensions_written_as_a_whole_float_are_accepted(api: Api) -> None:
    # JSON has one number type and the documented schema says "integer", which admits 8.0.
    response = await embeddings(api, model="fake/a", input="hi", dimensions=float(DIM))
    assert response.status_code == 200, response.text
    assert len(response.json()["data"][0]["embedding"]) == DIM


@pytest.mark.parametrize("model", ["fake/a", "fake/b"], ids=["loaded", "not_loaded_yet"])
async def test_other_dimensions_are_400_naming_the_param(api: Api, model: str) -> None:
    response = await embeddings(api, model=model, input="hi", dimensions=DIM // 2)
    message = assert_openai_error(response, 400, "bad_request", "dimensions")
    assert "Matryoshka" in message
    assert str(DIM) in message


async def test_dimensions_are_checked_before_inference_for_a_loaded_model(api: Api) -> None:
    await embeddings(api, model="fake/a", input="hi", dimensions=DIM + 1)
    assert ["hi"] not in api.loader.backends["fake/a"].batches


async def test_truncate_extension_cuts_long_texts(serve: Serve) -> None:
    text = "abcdefghij" * 2
    with anyio.fail_after(10):
        async with serve(max_text_chars=16) as api:
            response = await api.client.post(
                "/v1/embeddings", json={"model": "fake/a", "input": [text], "truncate": True}
            )
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(
        response.json()["data"][0]["embedding"], fake_vector(text[:16]), rtol=1e-6
    )


async def test_requests_and_texts_are_counted_in_metrics(api: Api) -> None:
    with anyio.fail_after(10):
        before = (await api.client.get("/metrics")).json()
        await api.client.post("/v1/embeddings", json={"model": "fake/a", "input": ["a", "b"]})
        after = (await api.client.get("/metrics")).json()
    assert after["total_requests"] == before["total_requests"] + 1
    assert after["total_embeddings"] == before["total_embeddings"] + 2


# -- errors ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": "hi"}, "model"),
        ({"input": "hi", "model": 5}, "model"),
        ({"input": "hi", "model": None}, "model"),
        ({"model": "fake/a"}, "input"),
        ({"model": "fake/a", "input": None}, "input"),
        ({"model": "fake/a", "input": {"text": "hi"}}, "input"),
        ({"model": "fake/a", "input": ""}, "input"),
        ({"model": "fake/a", "input": "   "}, "input"),
        ({"model": "fake/a", "input": []}, "input"),
        ({"model": "fake/a", "input": ["ok", ""]}, "input"),
        ({"model": "fake/a", "input": ["ok", 1.5]}, "input"),
        ({"model": "fake/a", "input": ["ok", None]}, "input"),
        ({"model": "fake/a", "input": "hi", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "fake/a", "input": "hi", "encoding_format": 1}, "encoding_format"),
        ({"model": "fake/a", "input": "hi", "dimensions": 0}, "dimensions"),
        ({"model": "fake/a", "input": "hi", "dimensions": "8"}, "dimensions"),
        ({"model": "fake/a", "input": "hi", "dimensions": 8.5}, "dimensions"),
        ({"model": "fake/a", "input": "hi", "dimensions": True}, "dimensions"),
        ({"model": "fake/a", "input": "hi", "user": 7}, "user"),
        ({"model": "fake/a", "input": "hi", "truncate": "yes"}, "truncate"),
    ],
    ids=repr,
)
async def test_invalid_bodies_are_400_naming_the_param(
    api: Api, body: dict[str, Any], param: str
) -> None:
    with anyio.fail_after(10):
        response = await api.client.post("/v1/embeddings", json=body)
    message = assert_openai_error(response, 400, "bad_request", param)
    assert param in message
    assert api.loader.backends["fake/a"].batches == [["warm-up"]], "nothing may reach the model"


@pytest.mark.parametrize(
    "tokens", [[1, 2, 3], [[1, 2, 3]], [[1, 2], [3, 4]], ["text", [1, 2]]], ids=repr
)
async def test_token_id_input_is_refused_clearly(api: Api, tokens: Any) -> None:
    response = await embeddings(api, model="fake/a", input=tokens)
    message = assert_openai_error(response, 400, "bad_request", "input")
    assert "token-id input" in message
    assert "not supported" in message


async def test_more_inputs_than_max_batch_size_is_400_naming_the_limit(serve: Serve) -> None:
    with anyio.fail_after(10):
        async with serve(max_batch_size=3) as api:
            response = await embeddings(api, model="fake/a", input=["t"] * 4)
    message = assert_openai_error(response, 400, "bad_request", "input")
    assert "MAX_BATCH_SIZE" in message
    assert "3" in message


async def test_text_over_max_length_is_400_naming_the_limit(serve: Serve) -> None:
    with anyio.fail_after(10):
        async with serve(max_text_chars=16) as api:
            response = await embeddings(api, model="fake/a", input=["ok", "x" * 17])
    message = assert_openai_error(response, 400, "bad_request", "input")
    assert "MAX_TEXT_LENGTH" in message
    assert "input[1]" in message


async def test_unknown_model_is_404_model_not_found(api: Api) -> None:
    response = await embeddings(api, model="nope/x", input="hi")
    assert_openai_error(response, 404, "model_not_found", "model")
    assert api.loader.calls == ["fake/a"]


async def test_unknown_model_with_dimensions_is_still_404(api: Api) -> None:
    response = await embeddings(api, model="nope/x", input="hi", dimensions=DIM)
    assert_openai_error(response, 404, "model_not_found", "model")


async def test_model_outside_the_allow_list_is_403_and_loads_nothing(serve: Serve) -> None:
    with anyio.fail_after(10):
        async with serve(allowed_models=["fake/a"]) as api:
            response = await embeddings(api, model="fake/b", input="hi")
    assert_openai_error(response, 403, "model_not_allowed", "model")
    assert "fake/b" not in api.loader.calls


@pytest.mark.parametrize("name", ["../../etc/passwd", "a/../b", "%2e%2e"], ids=repr)
async def test_invalid_model_name_is_400(api: Api, name: str) -> None:
    response = await embeddings(api, model=name, input="hi")
    assert_openai_error(response, 400, "invalid_model_name", "model")


async def test_requests_while_shutting_down_are_503(api: Api) -> None:
    api.registry.begin_shutdown()
    response = await embeddings(api, model="fake/a", input="hi")
    assert_openai_error(response, 503, "shutting_down")
    assert response.headers["Retry-After"] == "1"


async def test_backend_failure_is_500_in_openais_shape(api: Api) -> None:
    api.loader.backends["fake/a"].fail_next = RuntimeError('Traceback: File "/work/x.py"')
    response = await embeddings(api, model="fake/a", input="boom")
    assert "fake/a" in assert_openai_error(response, 500, "inference_error")


@pytest.mark.parametrize(
    ("content", "content_type", "status", "code"),
    [
        (b"{bad", "application/json", 400, "bad_request"),
        (b"", "application/json", 400, "bad_request"),
        (b'["hi"]', "application/json", 400, "bad_request"),
        (b'{"model": "fake/a", "input": "hi"}', "text/plain", 415, "unsupported_media_type"),
    ],
    ids=["malformed", "empty", "not_an_object", "text_plain"],
)
async def test_body_errors_are_in_openais_shape(
    api: Api, content: bytes, content_type: str, status: int, code: str
) -> None:
    with anyio.fail_after(10):
        response = await api.client.post(
            "/v1/embeddings", content=content, headers={"content-type": content_type}
        )
    assert_openai_error(response, status, code)


async def test_wrong_method_and_unknown_route_are_in_openais_shape(api: Api) -> None:
    with anyio.fail_after(10):
        wrong_method = await api.client.get("/v1/embeddings")
        unknown = await api.client.get("/v1/nope")
    assert_openai_error(wrong_method, 405, "method_not_allowed")
    assert_openai_error(unknown, 404, "not_found")


# -- GET /v1/models --------------------------------------------------------------------
def assert_model_card(card: dict[str, Any], name: str) -> None:
    assert set(card) == {"id", "object", "created", "owned_by"}
    assert card["id"] == name
    assert card["object"] == "model"
    assert isinstance(card["created"], int)
    assert card["owned_by"] == name.split("/")[0]


async def test_models_lists_loaded_and_imported_models_in_openais_shape(api: Api) -> None:
    write_manifest(api, "org/imported")
    with anyio.fail_after(10):
        await api.registry.refresh_local_models()  # what the next sweep does
        await api.client.post("/v1/embeddings", json={"model": "fake/c", "input": "load me"})
        response = await api.client.get("/v1/models")
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"object", "data"}
    assert body["object"] == "list"
    cards = {card["id"]: card for card in body["data"]}
    assert list(cards) == ["fake/a", "fake/c", "org/imported"]
    for name, card in cards.items():
        assert_model_card(card, name)
    imported_at = int(datetime.fromisoformat("2024-05-01T12:00:00+00:00").timestamp())
    assert cards["org/imported"]["created"] == imported_at
    assert cards["fake/a"]["created"] > 0  # a catalogue model: when it was loaded


async def test_models_with_an_allow_list_lists_only_servable_allowed_models(
    serve: Serve,
) -> None:
    with anyio.fail_after(10):
        async with serve(allowed_models="fake/a,fake/b,nope/x") as api:
            write_manifest(api, "org/imported")  # imported, but not allowed
            await api.registry.refresh_local_models()
            response = await api.client.get("/v1/models")
    assert response.status_code == 200, response.text
    assert [card["id"] for card in response.json()["data"]] == ["fake/a", "fake/b"]


@pytest.mark.parametrize("name", ["fake/a", "fake/b", "org/imported"])
async def test_retrieve_a_model(api: Api, name: str) -> None:
    write_manifest(api, "org/imported")
    with anyio.fail_after(10):
        response = await api.client.get(f"/v1/models/{name}")
    assert response.status_code == 200, response.text
    assert_model_card(response.json(), name)
    assert "fake/b" not in api.loader.calls  # retrieving loads nothing


@pytest.mark.parametrize("path", ["/v1/models/nope/x", "/v1/models/%2e%2e/x"])
async def test_retrieve_an_unknown_model_is_404(api: Api, path: str) -> None:
    with anyio.fail_after(10):
        response = await api.client.get(path)
    assert_openai_error(response, 404, "model_not_found", "model")


async def test_retrieve_a_model_outside_the_allow_list_is_404(serve: Serve) -> None:
    with anyio.fail_after(10):
        async with serve(allowed_models=["fake/a"]) as api:
            response = await api.client.get("/v1/models/fake/b")
    assert_openai_error(response, 404, "model_not_found", "model")
