"""Priority lanes through the API: which lane a request runs in (defaults, X-Priority, the
body's `priority`, bulk-only keys), bad values, per-lane 429s, and no starvation of bulk."""

from __future__ import annotations

from typing import Any

import anyio
import anyio.lowlevel
import pytest

from embedserve.settings import Settings, SettingsError
from tests.conftest import Api, Serve
from tests.fakes import GatedRunner
from tests.test_api import assert_error, wait_until_queued

pytestmark = pytest.mark.anyio

KEY = "k" * 16
BULK_KEY = "b" * 16
MODEL = "fake/a"


async def lane_of(api: Api, path: str, body: Any, **headers: str) -> str:
    response = await api.client.post(path, json=body, headers=headers)
    assert response.status_code == 200, response.text
    return response.headers["X-Priority"]


async def test_a_request_runs_in_the_lane_its_size_and_route_say(api: Api) -> None:
    with anyio.fail_after(10):
        assert await lane_of(api, "/embed", {"text": "a query"}) == "interactive"
        assert await lane_of(api, "/embed/batch", {"texts": ["a"]}) == "bulk"
        four = {"model": MODEL, "input": ["a", "b", "c", "d"]}
        assert await lane_of(api, "/v1/embeddings", four) == "interactive"
        five = {"model": MODEL, "input": ["a", "b", "c", "d", "e"]}
        assert await lane_of(api, "/v1/embeddings", five) == "bulk"
        assert await lane_of(api, "/", {"inputs": "a query"}) == "interactive"
        assert await lane_of(api, "/embed", {"inputs": ["a"] * 5}) == "bulk"
    figures = (await api.client.get("/metrics")).json()["batching"]["models"][MODEL]["lanes"]
    assert figures["interactive"]["texts"] == 1 + 4 + 1
    assert figures["bulk"]["texts"] == 1 + 5 + 5


async def test_the_header_or_the_body_field_chooses_the_lane(api: Api) -> None:
    with anyio.fail_after(10):
        batch = {"texts": ["a", "b"]}
        assert await lane_of(api, "/embed/batch", batch, **{"X-Priority": "Interactive"}) == (
            "interactive"
        )
        assert await lane_of(api, "/embed", {"text": "a"}, **{"X-Priority": "bulk"}) == "bulk"
        assert await lane_of(api, "/embed/batch", {**batch, "priority": "interactive"}) == (
            "interactive"
        )
        body = {"model": MODEL, "input": "a", "priority": "bulk"}
        assert await lane_of(api, "/v1/embeddings", body) == "bulk"
        agreeing = {"text": "a", "priority": "bulk"}
        assert await lane_of(api, "/embed", agreeing, **{"X-Priority": "bulk"}) == "bulk"


async def test_a_bad_lane_is_422_in_the_error_shape(api: Api) -> None:
    with anyio.fail_after(10):
        header = await api.client.post(
            "/embed", json={"text": "a"}, headers={"X-Priority": "urgent"}
        )
        disagree = await api.client.post(
            "/embed", json={"text": "a", "priority": "bulk"}, headers={"X-Priority": "interactive"}
        )
        body = await api.client.post("/embed", json={"text": "a", "priority": "urgent"})
        openai = await api.client.post(
            "/v1/embeddings", json={"model": MODEL, "input": "a"}, headers={"X-Priority": "high"}
        )
    assert "X-Priority" in assert_error(header, 422, "validation_error")["error"]
    assert "disagree" in assert_error(disagree, 422, "validation_error")["error"]
    assert_error(body, 422, "validation_error")
    assert openai.status_code == 400
    assert "X-Priority" in openai.json()["error"]["message"]


async def test_interactive_max_texts_zero_makes_everything_bulk_unless_asked(
    serve: Serve,
) -> None:
    with anyio.fail_after(10):
        async with serve(interactive_max_texts=0) as api:
            assert await lane_of(api, "/embed", {"text": "a"}) == "bulk"
            asked = await lane_of(api, "/embed", {"text": "a"}, **{"X-Priority": "interactive"})
    assert asked == "interactive"


async def test_a_bulk_only_key_runs_in_the_bulk_lane_whatever_it_asks(serve: Serve) -> None:
    with anyio.fail_after(10):
        async with serve(api_keys=[KEY, BULK_KEY], bulk_only_api_keys=[BULK_KEY]) as api:
            own = {"Authorization": f"Bearer {BULK_KEY}"}
            other = {"Authorization": f"Bearer {KEY}"}
            asked = {"X-Priority": "interactive"}
            tenant = await lane_of(api, "/embed", {"text": "a"}, **own, **asked)
            by_size = await lane_of(api, "/embed", {"text": "a"}, **own)
            normal = await lane_of(api, "/embed", {"text": "a"}, **other, **asked)
    assert (tenant, by_size, normal) == ("bulk", "bulk", "interactive")


def test_a_bulk_only_key_must_be_an_accepted_key() -> None:
    with pytest.raises(SettingsError, match="BULK_ONLY_API_KEYS"):
        Settings.build(api_keys=[KEY], bulk_only_api_keys=[BULK_KEY])


async def test_a_full_bulk_lane_refuses_bulk_but_not_queries(serve: Serve) -> None:
    gate = GatedRunner(open_=True)  # open while the lifespan loads fake/a
    answers: dict[str, Any] = {}
    with anyio.fail_after(10):
        async with serve(run_sync=gate, max_queue_size=2, max_batch_size=2) as api:
            gate.open = False

            async def post(name: str, path: str, body: Any) -> None:
                answers[name] = await api.client.post(path, json=body)

            async with anyio.create_task_group() as group:
                group.start_soon(post, "held", "/embed/batch", {"texts": ["held"]})
                await gate.wait_for_waiting(1)
                group.start_soon(post, "queued", "/embed/batch", {"texts": ["a", "b"]})
                await wait_until_queued(api, 2)
                refused = await api.client.post("/embed/batch", json={"texts": ["c"]})
                group.start_soon(post, "query", "/embed", {"text": "a query"})
                await wait_until_queued(api, 3)
                gate.open = True
                gate.release()
    assert_error(refused, 429, "overloaded")
    assert int(refused.headers["Retry-After"]) >= 1
    assert "bulk texts queued" in refused.json()["error"]
    assert {name: r.status_code for name, r in answers.items()} == {
        "held": 200, "queued": 200, "query": 200,
    }  # fmt: skip
    assert answers["query"].headers["X-Priority"] == "interactive"


async def test_bulk_finishes_while_32_interactive_clients_flood_the_model(serve: Serve) -> None:
    gate = GatedRunner(open_=True)
    flooding = True
    queries = 0
    # Four texts a batch: the 32 clients alone would fill every batch eight times over.
    settings = {"batch_max_texts": 4, "run_sync": gate, "request_timeout": 30.0}
    with anyio.fail_after(30):
        async with serve(**settings) as api:

            async def client(n: int) -> None:
                nonlocal queries
                while flooding:
                    response = await api.client.post("/embed", json={"text": f"query {n}"})
                    assert response.status_code == 200, response.text
                    queries += 1

            gate.open = False
            async with anyio.create_task_group() as group:
                for n in range(32):
                    group.start_soon(client, n)
                await wait_until_queued(api, 31)
                bulk_texts = [f"chunk {i}" for i in range(8)]

                async def ingest() -> None:
                    nonlocal flooding
                    answer = await api.client.post("/embed/batch", json={"texts": bulk_texts})
                    bulk.append(answer)
                    flooding = False
                    gate.open = True
                    gate.release(64)

                bulk: list[Any] = []
                group.start_soon(ingest)
                batches = 0
                while not bulk:
                    await gate.wait_for_waiting(1)
                    gate.release()
                    batches += 1
                    assert batches < 200, "the bulk request is starved"
                    for _ in range(10):
                        await anyio.lowlevel.checkpoint()
    assert bulk[0].status_code == 200, bulk[0].text
    assert bulk[0].headers["X-Priority"] == "bulk"
    # Queries went first all along: most of the batches went to them.
    assert queries > len(bulk_texts)
