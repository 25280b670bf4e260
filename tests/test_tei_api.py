"""The text-embeddings-inference (TEI) routes in process: shapes, statuses, headers, the
``/embed`` choice between the two request bodies, and the document, over a fake backend."""

from __future__ import annotations

import time
from typing import Any

import anyio
import httpx
import numpy as np
import pytest

from embedserve.errors import NotSupported, Overloaded
from embedserve.http.openapi import build_spec
from embedserve.http.route_table import ROUTES
from embedserve.settings import Settings
from tests.conftest import Api, Serve
from tests.fakes import DIM, GatedRunner, fake_vector
from tests.test_api import assert_error

pytestmark = pytest.mark.anyio

TEI_HEADERS = (
    "x-queue-time",
    "x-inference-time",
    "x-compute-time",
    "x-total-time",
    "x-compute-characters",
    "x-compute-tokens",
)


async def post(api: Api, path: str, body: Any) -> httpx.Response:
    with anyio.fail_after(10):
        return await api.client.post(path, json=body)


def assert_vectors(got: Any, texts: list[str]) -> None:
    """A bare array with one unit vector per text, each the fake's vector for its text."""
    assert isinstance(got, list)
    assert len(got) == len(texts)
    for row, text in zip(got, texts, strict=True):
        assert len(row) == DIM
        np.testing.assert_allclose(row, fake_vector(text), rtol=1e-6, atol=1e-6)


# -- embed -------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/", "/embed"])
async def test_embed_answers_a_bare_array_for_one_text_and_many(api: Api, path: str) -> None:
    one = await post(api, path, {"inputs": "hello world"})
    many = await post(api, path, {"inputs": ["one", "two words", "three more words"]})
    assert one.status_code == 200, one.text
    assert_vectors(one.json(), ["hello world"])
    assert many.status_code == 200, many.text
    assert_vectors(many.json(), ["one", "two words", "three more words"])


async def test_embed_sends_teis_timing_and_size_headers(api: Api) -> None:
    started = time.perf_counter()
    response = await post(api, "/", {"inputs": ["ab cd", "efg"]})
    wall_ms = (time.perf_counter() - started) * 1000
    assert response.status_code == 200, response.text
    # The handler's time, within the request's, holds the queue and inference times.
    compute_ms, total_ms = (float(response.headers[f"X-{n}-Time"]) for n in ("Compute", "Total"))
    queue_ms, inference_ms = (
        float(response.headers[f"X-{n}-Time"]) for n in ("Queue", "Inference")
    )
    assert compute_ms == total_ms <= wall_ms, (compute_ms, total_ms, wall_ms)
    assert inference_ms > 0 and queue_ms + inference_ms <= compute_ms + 0.002
    assert all(name in response.headers for name in TEI_HEADERS)
    assert response.headers["x-compute-characters"] == "8"
    assert response.headers["x-compute-tokens"] == str((2 + 2) + (1 + 2))  # fake: words + 2


async def test_embed_honours_teis_fields(api: Api) -> None:
    body = {
        "inputs": "hi",
        "normalize": False,
        "truncate": None,
        "truncation_direction": "right",
        "dimensions": DIM,
        "prompt_name": None,
        "encoding_format": "float",  # unknown fields are ignored, as TEI ignores them
    }
    response = await post(api, "/", body)
    assert response.status_code == 200, response.text
    assert_vectors(response.json(), ["hi"])


async def test_truncate_cuts_texts_over_the_character_limit(serve: Serve) -> None:
    async with serve(max_text_chars=10) as api:
        refused = await post(api, "/", {"inputs": "x" * 11})
        cut = await post(api, "/", {"inputs": "x" * 11, "truncate": True})
    assert_error(refused, 422, "validation_error")
    assert cut.status_code == 200, cut.text
    assert_vectors(cut.json(), ["x" * 10])
    assert cut.headers["x-compute-characters"] == "10"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"inputs": ""},
        {"inputs": []},
        {"inputs": ["ok", " "]},
        {"inputs": ["ok", 5]},
        {"inputs": [101, 102]},
        {"inputs": None},
        {"inputs": "hi", "normalize": "yes"},
        {"inputs": "hi", "truncation_direction": "left"},
        {"inputs": "hi", "dimensions": DIM - 1},
        {"inputs": "hi", "prompt_name": "query"},
        ["hi"],
    ],
    ids=repr,
)
async def test_invalid_tei_body_is_422(api: Api, body: Any) -> None:
    assert_error(await post(api, "/", body), 422, "validation_error")


async def test_more_inputs_than_max_batch_size_is_413(serve: Serve) -> None:
    async with serve(max_batch_size=2) as api:
        response = await post(api, "/", {"inputs": ["a", "b", "c"]})
        tokenized = await post(api, "/tokenize", {"inputs": ["a", "b", "c"]})
        decoded = await post(api, "/decode", {"ids": [[1], [2], [3]]})
    for answer in (response, tokenized, decoded):
        assert "MAX_BATCH_SIZE" in assert_error(answer, 413, "validation_error")["error"]


async def test_model_failure_is_424(api: Api) -> None:
    api.loader.backends["fake/a"].fail_next = RuntimeError("boom")
    response = await post(api, "/", {"inputs": "boom"})
    assert "fake/a" in assert_error(response, 424, "inference_error")["error"]


async def test_overload_is_429_with_retry_after(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    # The queue filling up is tested on /embed (test_api.py); here, that the refusal keeps
    # its status and header on TEI's routes.
    async def refuse(*args: Any, **kwargs: Any) -> Any:
        raise Overloaded("model fake/a is overloaded", retry_after_s=2)

    monkeypatch.setattr(api.registry, "embed", refuse)
    response = await post(api, "/", {"inputs": "hi"})
    assert_error(response, 429, "overloaded")
    assert response.headers["Retry-After"] == "2"


# -- /embed: one route, two bodies --------------------------------------------------------
async def test_embed_with_text_is_the_original_answer(api: Api) -> None:
    response = await post(api, "/embed", {"text": "hello"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {
        "embedding",
        "model_name",
        "dimension",
        "text_length",
        "processing_time_ms",
    }
    assert "x-compute-time" not in response.headers


@pytest.mark.parametrize(
    ("body", "words"),
    [({"text": "a", "inputs": "a"}, "not both"), ({}, "either"), ({"texts": ["a"]}, "either")],
    ids=["both", "neither", "batch_body"],
)
async def test_embed_with_both_keys_or_neither_is_422(api: Api, body: Any, words: str) -> None:
    error = assert_error(await post(api, "/embed", body), 422, "validation_error")["error"]
    assert "'text'" in error and "'inputs'" in error and words in error


# -- info, tokenize, decode ---------------------------------------------------------------
async def test_info_names_the_default_model_and_the_limits(serve: Serve) -> None:
    async with serve(max_batch_size=16, batch_max_texts=8, max_queue_size=64) as api:
        with anyio.fail_after(10):
            response = await api.client.get("/info")
    assert response.status_code == 200, response.text
    info = response.json()
    assert info["model_id"] == "fake/a"
    assert info["max_client_batch_size"] == 16
    assert info["max_batch_requests"] == 8
    assert info["max_concurrent_requests"] == 64
    assert info["max_input_length"] == 256
    assert info["model_type"] == {"embedding": {"pooling": "unknown"}}  # a catalogue model


async def test_tokenize_gives_each_token_with_character_offsets(api: Api) -> None:
    response = await post(api, "/tokenize", {"inputs": "hi  there"})
    assert response.status_code == 200, response.text
    assert response.json() == [
        [
            {"id": 0, "text": "[CLS]", "special": True, "start": None, "stop": None},
            {"id": 10, "text": "hi", "special": False, "start": 0, "stop": 2},
            {"id": 11, "text": "there", "special": False, "start": 4, "stop": 9},
            {"id": 1, "text": "[SEP]", "special": True, "start": None, "stop": None},
        ]
    ]
    plain = await post(api, "/tokenize", {"inputs": ["a", ""], "add_special_tokens": False})
    assert plain.json() == [[{"id": 10, "text": "a", "special": False, "start": 0, "stop": 1}], []]


async def test_decode_gives_one_string_per_id_array(api: Api) -> None:
    one = await post(api, "/decode", {"ids": [0, 12, 1]})
    many = await post(api, "/decode", {"ids": [[0, 12, 1], []], "skip_special_tokens": False})
    assert one.json() == ["t12"]
    assert many.json() == ["[CLS] t12 [SEP]", ""]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/tokenize", {"inputs": []}),
        ("/tokenize", {"inputs": ["a", 1]}),
        ("/tokenize", {"inputs": "a", "prompt_name": "query"}),
        ("/decode", {"ids": "12"}),
        ("/decode", {"ids": [1, [2]]}),
        ("/decode", {"ids": [-1]}),
        ("/decode", {"ids": [2**32]}),
        ("/decode", {"ids": [True]}),
    ],
    ids=repr,
)
async def test_invalid_tokenize_and_decode_bodies_are_422(
    api: Api, path: str, body: dict[str, Any]
) -> None:
    assert_error(await post(api, path, body), 422, "validation_error")


# -- embed_all ------------------------------------------------------------------------------
async def test_embed_all_gives_a_vector_per_token(api: Api) -> None:
    response = await post(api, "/embed_all", {"inputs": ["one two", "three"]})
    assert response.status_code == 200, response.text
    rows = response.json()
    assert [len(row) for row in rows] == [4, 3]  # the fake: words + 2 specials
    np.testing.assert_allclose(rows[1][2], fake_vector("three#2"), rtol=1e-6, atol=1e-6)
    assert response.headers["x-compute-tokens"] == "7"
    assert response.headers["x-compute-characters"] == "12"


async def test_embed_all_refusals(serve: Serve) -> None:
    async with serve(max_batch_size=2) as api:
        too_many = await post(api, "/embed_all", {"inputs": ["a", "b", "c"]})
        blank = await post(api, "/embed_all", {"inputs": " "})
        api.loader.backends["fake/a"].token_vectors = broken  # type: ignore[method-assign]
        failed = await post(api, "/embed_all", {"inputs": "a"})
    assert_error(too_many, 413, "validation_error")
    assert_error(blank, 422, "validation_error")
    assert "fake/a" in assert_error(failed, 424, "inference_error")["error"]


def broken(texts: Any) -> Any:
    raise RuntimeError('Traceback: File "/work/x.py"')


async def test_embed_all_without_a_packed_graph_is_424(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(texts: Any) -> Any:
        raise NotSupported("model fake/a has no packed graph")

    monkeypatch.setattr(api.loader.backends["fake/a"], "token_vectors", unsupported)
    assert_error(await post(api, "/embed_all", {"inputs": "a"}), 424, "not_supported")


# -- the document ---------------------------------------------------------------------------
def test_openapi_documents_both_embed_bodies_and_the_tei_routes() -> None:
    spec = build_spec(Settings.build(max_batch_size=32), ROUTES)
    paths = spec["paths"]
    assert {"/", "/info", "/tokenize", "/decode"} <= set(paths)
    body = paths["/embed"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    refs = [branch["allOf"][0]["$ref"] for branch in body["oneOf"]]
    assert refs == ["#/components/schemas/EmbedRequest", "#/components/schemas/TEIEmbedRequest"]
    assert {"413", "422", "424", "429"} <= set(paths["/"]["post"]["responses"])
    inputs = spec["components"]["schemas"]["TEIEmbedRequest"]["properties"]["inputs"]
    assert [branch.get("maxItems") for branch in inputs["anyOf"]] == [None, 32]


async def test_the_served_document_allows_only_the_default_models_dimension(api: Api) -> None:
    with anyio.fail_after(10):
        spec = (await api.client.get("/openapi.json")).json()
    dimensions = spec["components"]["schemas"]["TEIEmbedRequest"]["properties"]["dimensions"]
    assert dimensions["anyOf"] == [{"const": DIM}, {"type": "null"}]
    assert "/embed_all" in spec["paths"]


async def test_tei_routes_need_the_api_key_when_keys_are_on(serve: Serve) -> None:
    key = "tei-" + "k" * 28
    async with serve(api_keys=[key]) as api:
        with anyio.fail_after(10):
            refused = await api.client.post("/", json={"inputs": "hi"})
            info = await api.client.get("/info")
            allowed = await api.client.post(
                "/", json={"inputs": "hi"}, headers={"Authorization": f"Bearer {key}"}
            )
    assert_error(refused, 401, "missing_api_key")
    assert_error(info, 401, "missing_api_key")
    assert allowed.status_code == 200, allowed.text


async def test_token_level_requests_past_the_bound_are_429(serve: Serve) -> None:
    gate = GatedRunner(open_=True)  # open while the lifespan loads fake/a
    answers: list[httpx.Response] = []
    with anyio.fail_after(10):
        async with serve(run_sync=gate) as api:
            api.registry.max_unbatched = 1

            async def tokenize() -> None:
                answers.append(await api.client.post("/tokenize", json={"inputs": "held"}))

            gate.open = False
            async with anyio.create_task_group() as group:
                group.start_soon(tokenize)
                await gate.wait_for_waiting(1)
                refused = await api.client.post("/embed_all", json={"inputs": "one too many"})
                gate.open = True
                gate.release()
            after = await api.client.post("/decode", json={"ids": [12]})
    assert_error(refused, 429, "overloaded")
    assert refused.headers["Retry-After"] == "1"
    assert [answer.status_code for answer in answers] == [200]
    assert after.status_code == 200, after.text
