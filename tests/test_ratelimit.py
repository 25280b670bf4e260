"""Token buckets and the rate-limit middleware."""

from __future__ import annotations

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from embedserve.ratelimit import RateLimit, TokenBuckets
from tests.fakes import FakeClock


def test_bucket_allows_capacity_then_refuses_then_refills() -> None:
    clock = FakeClock()
    buckets = TokenBuckets(3, period_s=60, clock=clock)
    assert [buckets.take("a")[0] for _ in range(4)] == [True, True, True, False]
    allowed, remaining, wait = buckets.take("a")
    assert (allowed, remaining) == (False, 0)
    assert 0 < wait <= 20
    assert buckets.take("b")[0]  # another client has its own bucket
    clock.advance(20)
    assert buckets.take("a")[0]
    assert not buckets.take("a")[0]


def app_with(buckets: TokenBuckets) -> Starlette:
    async def ok(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(
        routes=[Route("/embed", ok, methods=["POST"]), Route("/health", ok)],
        middleware=[Middleware(RateLimit, buckets=buckets)],
    )


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_middleware_answers_429_with_headers_and_exempts_health() -> None:
    transport = httpx.ASGITransport(app=app_with(TokenBuckets(2, clock=FakeClock())))
    client = httpx.AsyncClient(transport=transport, base_url="http://test")
    first = await client.post("/embed")
    assert first.status_code == 200
    assert first.headers["RateLimit-Limit"] == "2"
    assert first.headers["RateLimit-Remaining"] == "1"
    assert (await client.post("/embed")).status_code == 200
    refused = await client.post("/embed")
    assert refused.status_code == 429
    assert refused.json()["error_type"] == "rate_limited"
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.headers["RateLimit-Remaining"] == "0"
    for _ in range(5):
        assert (await client.get("/health")).status_code == 200
    await client.aclose()
