"""Token buckets and the rate-limit middleware, on a clock the tests move by hand."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette

from embedserve.http.middleware.ratelimit import RateLimit, TokenBuckets
from tests.conftest import Api, Serve
from tests.fakes import FakeClock

KEY_A = "key-a-0123456789abcdef"
KEY_B = "key-b-0123456789abcdef"
EMBED = {"text": "hi"}


# -- TokenBuckets ------------------------------------------------------------------------
def test_bucket_allows_capacity_then_refuses_then_refills() -> None:
    clock = FakeClock()
    buckets = TokenBuckets(3, period_s=60, clock=clock)
    assert [buckets.take("a").allowed for _ in range(4)] == [True, True, True, False]
    refused = buckets.take("a")
    assert (refused.allowed, refused.remaining) == (False, 0)
    assert refused.retry_after_s == pytest.approx(20)  # one token every 20 s
    assert refused.reset_s == pytest.approx(60)  # three tokens to full
    assert buckets.take("b").allowed  # another client has its own bucket
    clock.advance(20)
    assert buckets.take("a").allowed
    assert not buckets.take("a").allowed


def test_bucket_waits_shrink_as_tokens_return() -> None:
    clock = FakeClock()
    buckets = TokenBuckets(4, period_s=60, clock=clock)
    first = buckets.take("a")
    assert (first.remaining, first.retry_after_s) == (3, 0)
    assert first.reset_s == pytest.approx(15)  # one token short of full
    clock.advance(15)
    again = buckets.take("a")
    assert again.remaining == 3
    assert again.reset_s == pytest.approx(15)


def test_bucket_never_goes_negative_even_if_the_clock_steps_back() -> None:
    clock = FakeClock()
    buckets = TokenBuckets(2, period_s=60, clock=clock)
    for _ in range(10):
        verdict = buckets.take("a")
        clock.advance(-5)
        assert verdict.remaining >= 0
        assert verdict.retry_after_s >= 0
        assert verdict.reset_s >= 0
    assert not buckets.take("a").allowed


def test_bucket_refills_to_capacity_and_no_further() -> None:
    clock = FakeClock()
    buckets = TokenBuckets(3, period_s=60, clock=clock)
    for _ in range(3):
        buckets.take("a")
    clock.advance(3600)
    assert [buckets.take("a").allowed for _ in range(4)] == [True, True, True, False]


# -- the middleware in the real app -----------------------------------------------------
def buckets_of(app: Starlette) -> TokenBuckets:
    [buckets] = [m.kwargs["buckets"] for m in app.user_middleware if "buckets" in m.kwargs]
    assert isinstance(buckets, TokenBuckets)
    return buckets


@asynccontextmanager
async def limited(serve: Serve, limit: int = 3, **overrides: Any) -> AsyncIterator[Api]:
    """The app with a rate limit of `limit` per minute on a FakeClock (reachable as .clock)."""
    async with serve(enable_rate_limit=True, rate_limit_per_minute=limit, **overrides) as api:
        buckets_of(api.app).clock = FakeClock()
        yield api


def advance(api: Api, seconds: float) -> None:
    clock = buckets_of(api.app).clock
    assert isinstance(clock, FakeClock)
    clock.advance(seconds)


@asynccontextmanager
async def client_at(api: Api, address: str, **kwargs: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A client whose requests come from the socket address `address`."""
    transport = httpx.ASGITransport(app=api.app, client=(address, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://test", **kwargs) as client:
        yield client


def limit_headers(response: httpx.Response) -> tuple[int, int, int]:
    """(Limit, Remaining, Reset), checked to be non-negative integers."""
    limit, remaining, reset = (
        int(response.headers[f"RateLimit-{name}"]) for name in ("Limit", "Remaining", "Reset")
    )
    assert min(limit, remaining, reset) >= 0, (limit, remaining, reset)
    return limit, remaining, reset


@pytest.mark.anyio
async def test_429_after_the_budget_with_sane_headers_then_recovers(serve: Serve) -> None:
    with anyio.fail_after(10):
        async with limited(serve, limit=3) as api:
            answers = [await api.client.post("/embed", json=EMBED) for _ in range(3)]
            refused = await api.client.post("/embed", json=EMBED)
            advance(api, 20)  # one token back (3 per minute)
            one_back = await api.client.post("/embed", json=EMBED)
            refused_again = await api.client.post("/embed", json=EMBED)
            advance(api, 60)  # a whole window: full again
            recovered = [await api.client.post("/embed", json=EMBED) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [limit_headers(a)[:2] for a in answers] == [(3, 2), (3, 1), (3, 0)]
    assert [limit_headers(a)[2] for a in answers] == [20, 40, 60]  # seconds until full
    assert answers[0].headers["RateLimit-Policy"] == "3;w=60"

    assert refused.status_code == 429
    body = refused.json()
    assert body["error_type"] == "rate_limited"
    assert "3 requests per 60 seconds" in body["error"]
    assert refused.headers["Retry-After"] == "20"
    assert limit_headers(refused) == (3, 0, 60)

    assert one_back.status_code == 200
    assert refused_again.status_code == 429
    assert [r.status_code for r in recovered] == [200, 200, 200]


@pytest.mark.anyio
async def test_retry_after_is_enough_and_never_below_one(serve: Serve) -> None:
    with anyio.fail_after(10):
        async with limited(serve, limit=120) as api:  # a token every 0.5 s
            for _ in range(120):
                assert (await api.client.get("/models")).status_code == 200
            refused = await api.client.post("/embed", json=EMBED)
            advance(api, int(refused.headers["Retry-After"]))
            after_waiting = await api.client.post("/embed", json=EMBED)
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "1"  # 0.5 s, rounded up to a whole second
    assert after_waiting.status_code == 200


@pytest.mark.anyio
async def test_health_ready_and_metrics_are_exempt(serve: Serve) -> None:
    with anyio.fail_after(10):
        async with limited(serve, limit=1) as api:
            await api.client.post("/embed", json=EMBED)
            assert (await api.client.post("/embed", json=EMBED)).status_code == 429
            probes = [await api.client.get(path) for path in ("/health", "/ready", "/metrics") * 5]
    assert [p.status_code for p in probes] == [200] * 15
    assert not any("RateLimit-Limit" in p.headers for p in probes)


@pytest.mark.anyio
async def test_other_paths_and_the_openai_shape_are_limited(serve: Serve) -> None:
    with anyio.fail_after(10):
        async with limited(serve, limit=1) as api:
            assert (await api.client.get("/models")).status_code == 200
            refused = await api.client.post("/v1/embeddings", json={"input": "hi"})
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limited")
    assert int(refused.headers["Retry-After"]) >= 1


@pytest.mark.anyio
async def test_each_address_has_its_own_bucket(serve: Serve) -> None:
    with anyio.fail_after(10):
        async with (
            limited(serve, limit=1) as api,
            client_at(api, "192.0.2.1") as one,
            client_at(api, "192.0.2.2") as two,
        ):
            assert (await one.post("/embed", json=EMBED)).status_code == 200
            assert (await one.post("/embed", json=EMBED)).status_code == 429
            assert (await two.post("/embed", json=EMBED)).status_code == 200


@pytest.mark.anyio
async def test_ipv6_clients_share_a_bucket_per_64(serve: Serve) -> None:
    with anyio.fail_after(10):
        async with (
            limited(serve, limit=1) as api,
            client_at(api, "2001:db8:1:2::1") as one,
            client_at(api, "2001:db8:1:2:ffff::9") as same_64,
            client_at(api, "2001:db8:1:3::1") as other_64,
        ):
            assert (await one.post("/embed", json=EMBED)).status_code == 200
            assert (await same_64.post("/embed", json=EMBED)).status_code == 429
            assert (await other_64.post("/embed", json=EMBED)).status_code == 200


@pytest.mark.anyio
async def test_forwarded_for_is_honoured_only_from_a_trusted_proxy(serve: Serve) -> None:
    def via(address: str) -> dict[str, str]:
        return {"X-Forwarded-For": f"198.51.100.66, {address}"}  # the left part is forged

    with anyio.fail_after(10):
        async with (
            limited(serve, limit=1, trusted_proxies="10.0.0.0/8, 192.0.2.10") as api,
            client_at(api, "10.1.2.3") as proxy,
            client_at(api, "203.0.113.50") as stranger,
        ):
            # Behind the proxy, two clients are two buckets.
            assert (await proxy.post("/embed", json=EMBED, headers=via("1.1.1.1"))).is_success
            assert (await proxy.post("/embed", json=EMBED, headers=via("2.2.2.2"))).is_success
            again = await proxy.post("/embed", json=EMBED, headers=via("1.1.1.1"))
            # A chain of trusted proxies is walked through to the client.
            chained = await proxy.post(
                "/embed", json=EMBED, headers={"X-Forwarded-For": "3.3.3.3, 192.0.2.10"}
            )
            same_client = await proxy.post(
                "/embed", json=EMBED, headers={"X-Forwarded-For": "3.3.3.3"}
            )
            # An untrusted peer's header is ignored: it is one client, whatever it claims.
            first = await stranger.post("/embed", json=EMBED, headers=via("4.4.4.4"))
            spoofed = await stranger.post("/embed", json=EMBED, headers=via("5.5.5.5"))
    assert again.status_code == 429
    assert chained.status_code == 200
    assert same_client.status_code == 429  # 3.3.3.3 again, one proxy fewer
    assert first.status_code == 200
    assert spoofed.status_code == 429


@pytest.mark.anyio
async def test_per_key_buckets_and_refused_requests_spend_nothing(serve: Serve) -> None:
    def bearer(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    with anyio.fail_after(10):
        async with (
            limited(serve, limit=2, api_keys=[KEY_A, KEY_B]) as api,
            client_at(api, "192.0.2.1") as here,
            client_at(api, "192.0.2.2") as there,
        ):
            # Unauthenticated and wrong-key requests from the same address spend no budget.
            for _ in range(5):
                assert (await here.post("/embed", json=EMBED)).status_code == 401
                wrong = await here.post("/embed", json=EMBED, headers=bearer("x" * 20))
                assert wrong.status_code == 401
                assert "RateLimit-Limit" not in wrong.headers
            a1 = await here.post("/embed", json=EMBED, headers=bearer(KEY_A))
            a2 = await there.post("/embed", json=EMBED, headers=bearer(KEY_A))  # same key
            a3 = await here.post("/embed", json=EMBED, headers=bearer(KEY_A))
            b1 = await here.post("/embed", json=EMBED, headers=bearer(KEY_B))  # same address
    assert [r.status_code for r in (a1, a2, a3, b1)] == [200, 200, 429, 200]
    assert a1.headers["RateLimit-Remaining"] == "1"
    assert b1.headers["RateLimit-Remaining"] == "1"


def test_client_key_is_the_key_digest_else_the_address() -> None:
    limiter = RateLimit(app=Starlette(), buckets=TokenBuckets(1))
    scope = {"type": "http", "client": ("192.0.2.1", 1), "headers": []}
    assert limiter.client_key(scope) == "addr:192.0.2.1"
    scope["embedserve.api_key_id"] = "ab" * 32
    assert limiter.client_key(scope) == "key:" + "ab" * 32
    assert limiter.client_key({"type": "http", "client": None}) == "addr:unknown"
