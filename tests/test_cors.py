"""CORS with auth and rate limiting on: preflights need no key, refusals keep CORS headers."""

from __future__ import annotations

from typing import Any

import anyio
import httpx
import pytest

from tests.conftest import Serve

pytestmark = pytest.mark.anyio

ALLOWED = "https://app.example"
DENIED = "https://evil.example"
KEY = "sk-test-aaaaaaaaaaaaaaaaaaaa"
SECURE: dict[str, Any] = {
    "enable_cors": True,
    "cors_origins": f"{ALLOWED},https://other.example",
    "api_keys": [KEY],
}


def preflight(origin: str) -> dict[str, str]:
    """What a browser sends before a JSON POST with a key."""
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }


def listed(response: httpx.Response, header: str) -> set[str]:
    return {part.strip().lower() for part in response.headers.get(header, "").split(",")}


async def test_preflight_from_an_allowed_origin_needs_no_key(serve: Serve) -> None:
    with anyio.fail_after(10):
        async with serve(**SECURE) as api:
            response = await api.client.options("/embed", headers=preflight(ALLOWED))
            openai = await api.client.options("/v1/embeddings", headers=preflight(ALLOWED))
    for answer in (response, openai):
        assert answer.status_code == 200, answer.text
        assert answer.headers["Access-Control-Allow-Origin"] == ALLOWED
        assert {"get", "post"} <= listed(answer, "Access-Control-Allow-Methods")
        assert {"authorization", "content-type"} <= listed(answer, "Access-Control-Allow-Headers")
        assert "origin" in listed(answer, "Vary")


async def test_preflight_from_another_origin_gets_no_allow_origin(serve: Serve) -> None:
    with anyio.fail_after(10):
        async with serve(**SECURE) as api:
            response = await api.client.options("/embed", headers=preflight(DENIED))
    assert response.status_code != 401  # refused by CORS, not by auth
    assert "Access-Control-Allow-Origin" not in response.headers


async def test_401_keeps_cors_headers_for_an_allowed_origin_only(serve: Serve) -> None:
    with anyio.fail_after(10):
        async with serve(**SECURE) as api:
            allowed = await api.client.post(
                "/embed", json={"text": "x"}, headers={"Origin": ALLOWED}
            )
            denied = await api.client.post("/embed", json={"text": "x"}, headers={"Origin": DENIED})
            keyed = await api.client.post(
                "/embed",
                json={"text": "x"},
                headers={"Origin": ALLOWED, "Authorization": f"Bearer {KEY}"},
            )
    assert allowed.status_code == 401
    assert allowed.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert "www-authenticate" in listed(allowed, "Access-Control-Expose-Headers")
    assert denied.status_code == 401
    assert "Access-Control-Allow-Origin" not in denied.headers
    assert keyed.status_code == 200
    assert keyed.headers["Access-Control-Allow-Origin"] == ALLOWED


async def test_429_keeps_cors_headers_and_exposes_rate_limit_headers(serve: Serve) -> None:
    headers = {"Origin": ALLOWED, "Authorization": f"Bearer {KEY}"}
    with anyio.fail_after(10):
        async with serve(**SECURE, enable_rate_limit=True, rate_limit_per_minute=1) as api:
            await api.client.get("/models", headers=headers)
            refused = await api.client.get("/models", headers=headers)
    assert refused.status_code == 429
    assert refused.headers["Access-Control-Allow-Origin"] == ALLOWED
    exposed = listed(refused, "Access-Control-Expose-Headers")
    assert {"retry-after", "ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"} <= exposed


async def test_wildcard_origins(serve: Serve) -> None:
    with anyio.fail_after(10):
        async with serve(enable_cors=True, cors_origins="*", api_keys=[KEY]) as api:
            response = await api.client.options("/embed", headers=preflight(DENIED))
            simple = await api.client.get("/models", headers={"Origin": DENIED})
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert simple.status_code == 401
    assert simple.headers["Access-Control-Allow-Origin"] == "*"
