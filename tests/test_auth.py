"""API keys: who needs one, what a refusal looks like, and that keys never leak."""

from __future__ import annotations

import hmac
import logging
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from embedserve import server
from embedserve.engine.registry import ModelRegistry
from embedserve.engine.wiring import policy_from
from embedserve.http.app import create_app
from embedserve.http.middleware.auth import (
    API_KEY_ID,
    ApiKeyAuth,
    exposure_warning,
    warn_if_exposed,
)
from embedserve.models.store import ModelStore
from embedserve.settings import Settings, SettingsError
from tests.conftest import Serve
from tests.fakes import FakeLoader

KEY_A = "sk-test-aaaaaaaaaaaaaaaaaaaa"
KEY_B = "sk-test-bbbbbbbbbbbbbbbbbbbb"
KEY_C = "sk-test-cccccccccccccccccccc"
EMBED = {"text": "hi"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_refused(response: httpx.Response, error_type: str) -> dict[str, Any]:
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"].startswith('Bearer realm="embedserve"')
    body: dict[str, Any] = response.json()
    assert body["error_type"] == error_type
    assert set(body) == {"error", "error_type"}
    return body


# -- who needs a key ---------------------------------------------------------------------
@pytest.mark.anyio
async def test_every_endpoint_but_health_and_ready_needs_a_key(serve: Serve) -> None:
    with anyio.fail_after(10):
        async with serve(api_keys=[KEY_A]) as api:
            refused = [
                await api.client.post("/embed", json=EMBED),
                await api.client.post("/embed/batch", json={"texts": ["a"]}),
                await api.client.get("/metrics"),
                await api.client.get("/models"),
                await api.client.get("/models/fake/a"),
                await api.client.get("/nope"),  # unknown routes are not revealed either
            ]
            health = await api.client.get("/health")
            ready = await api.client.get("/ready")
            with_key = [
                await api.client.post("/embed", json=EMBED, headers=bearer(KEY_A)),
                await api.client.get("/metrics", headers=bearer(KEY_A)),
                await api.client.get("/models", headers=bearer(KEY_A)),
            ]
            unknown_with_key = await api.client.get("/nope", headers=bearer(KEY_A))
    for response in refused:
        assert_refused(response, "missing_api_key")
    assert (health.status_code, ready.status_code) == (200, 200)
    assert [r.status_code for r in with_key] == [200, 200, 200]
    assert unknown_with_key.status_code == 404


@pytest.mark.anyio
async def test_without_keys_nothing_needs_one(serve: Serve) -> None:
    with anyio.fail_after(10):
        async with serve() as api:
            response = await api.client.post("/embed", json=EMBED)
    assert response.status_code == 200
    assert "WWW-Authenticate" not in response.headers


# -- what a refusal looks like ---------------------------------------------------------
@pytest.mark.anyio
@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Basic {KEY_A}"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": f"Bearer {KEY_A} extra"},
        {"Authorization": KEY_A},
    ],
)
async def test_malformed_authorization_is_401(serve: Serve, headers: dict[str, str]) -> None:
    with anyio.fail_after(10):
        async with serve(api_keys=[KEY_A]) as api:
            response = await api.client.post("/embed", json=EMBED, headers=headers)
    body = assert_refused(response, "missing_api_key")
    assert "Bearer <key>" in body["error"]
    assert KEY_A not in response.text


@pytest.mark.anyio
async def test_two_authorization_headers_are_refused(serve: Serve) -> None:
    with anyio.fail_after(10):
        async with serve(api_keys=[KEY_A]) as api:
            response = await api.client.post(
                "/embed",
                json=EMBED,
                headers=[("Authorization", f"Bearer {KEY_A}"), ("Authorization", "Bearer x")],
            )
    assert_refused(response, "missing_api_key")


@pytest.mark.anyio
async def test_missing_key_says_how_to_send_one(serve: Serve) -> None:
    with anyio.fail_after(10):
        async with serve(api_keys=[KEY_A]) as api:
            missing = await api.client.post("/embed", json=EMBED)
            x_api_key = await api.client.post("/embed", json=EMBED, headers={"X-API-Key": KEY_A})
    body = assert_refused(missing, "missing_api_key")
    assert "Authorization: Bearer <key>" in body["error"]
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="embedserve"'
    assert "X-API-Key is not accepted" in assert_refused(x_api_key, "missing_api_key")["error"]
    assert KEY_A not in x_api_key.text


@pytest.mark.anyio
async def test_wrong_key_is_401_invalid_token_and_never_echoed(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "sk-wrong-zzzzzzzzzzzzzzzzzz"
    caplog.set_level(logging.DEBUG)
    with anyio.fail_after(10):
        async with serve(api_keys=[KEY_A]) as api:
            response = await api.client.post("/embed", json=EMBED, headers=bearer(wrong))
            prefix = await api.client.post("/embed", json=EMBED, headers=bearer(KEY_A[:-1]))
            accepted = await api.client.post("/embed", json=EMBED, headers=bearer(KEY_A))
            lower = await api.client.post(
                "/embed", json=EMBED, headers={"Authorization": f"bearer  {KEY_A} "}
            )
    body = assert_refused(response, "invalid_api_key")
    assert body["error"] == "invalid API key"
    assert (
        response.headers["WWW-Authenticate"] == 'Bearer realm="embedserve", error="invalid_token"'
    )
    assert_refused(prefix, "invalid_api_key")
    assert (accepted.status_code, lower.status_code) == (200, 200)
    # The access log saw the refusals (so the check below looks at something real).
    assert any("401" in r.getMessage() for r in caplog.records if r.name.startswith("embedserve"))
    for leaked in (wrong, KEY_A):
        assert leaked not in response.text
        assert not any(leaked in value for value in response.headers.values())
        assert leaked not in caplog.text


@pytest.mark.anyio
async def test_openai_paths_get_openais_error_shape(serve: Serve) -> None:
    with anyio.fail_after(10):
        async with serve(api_keys=[KEY_A]) as api:
            response = await api.client.post("/v1/embeddings", json={"input": "hi"})
    assert response.status_code == 401
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("authentication_error", "missing_api_key")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.anyio
async def test_preflight_needs_no_key_even_without_cors(serve: Serve) -> None:
    preflight = {"Origin": "https://a.example", "Access-Control-Request-Method": "POST"}
    with anyio.fail_after(10):
        async with serve(api_keys=[KEY_A]) as api:
            bare = await api.client.options("/embed", headers=preflight)
            not_preflight = await api.client.options("/embed")
    assert bare.status_code == 405  # no CORS configured: the router's answer, not 401
    assert not_preflight.status_code == 401


# -- the comparison ------------------------------------------------------------------------
@pytest.mark.anyio
@pytest.mark.parametrize("presented", [KEY_A, KEY_C, "sk-wrong-zzzzzzzzzzzzzzzzzz"])
async def test_every_key_is_compared_with_compare_digest(
    serve: Serve, monkeypatch: pytest.MonkeyPatch, presented: str
) -> None:
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    with anyio.fail_after(10):
        async with serve(api_keys=[KEY_A, KEY_B, KEY_C]) as api:
            response = await api.client.get("/models", headers=bearer(presented))
    assert response.status_code == (401 if presented.startswith("sk-wrong") else 200)
    assert len(calls) == 3  # all keys, whichever matched first (or none)
    assert all(a == b == 32 for a, b in calls)  # digests, so every comparison is equal-length


@pytest.mark.anyio
async def test_the_scope_carries_a_digest_of_the_key_not_the_key() -> None:
    seen: list[str] = []

    async def record(request: Request) -> PlainTextResponse:
        seen.append(request.scope[API_KEY_ID])
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[Route("/x", record)],
        middleware=[Middleware(ApiKeyAuth, keys=[KEY_A, KEY_B])],
    )
    transport = httpx.ASGITransport(app=app)
    with anyio.fail_after(10):
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for key in (KEY_A, KEY_A, KEY_B):
                assert (await client.get("/x", headers=bearer(key))).status_code == 200
    assert seen[0] == seen[1] != seen[2]
    assert all(len(s) == 64 and KEY_A not in s and KEY_B not in s for s in seen)


def test_the_middleware_refuses_to_run_without_keys() -> None:
    with pytest.raises(ValueError, match="at least one key"):
        ApiKeyAuth(Starlette(), keys=[])


# -- configuration -------------------------------------------------------------------------
@pytest.mark.anyio
async def test_keys_file_with_comments_adds_to_api_keys(serve: Serve, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"# team A\n{KEY_B}\n\n   # rotated 2024-01\n  {KEY_C}  \n")
    with anyio.fail_after(10):
        async with serve(api_keys=[KEY_A], api_keys_file=keys_file) as api:
            statuses = [
                (await api.client.get("/models", headers=bearer(key))).status_code
                for key in (KEY_A, KEY_B, KEY_C, "# team A", "# rotated 2024-01")
            ]
    assert statuses == [200, 200, 200, 401, 401]


@pytest.mark.anyio
async def test_keys_file_alone_turns_auth_on(serve: Serve, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"{KEY_B}\n")
    with anyio.fail_after(10):
        async with serve(api_keys_file=keys_file) as api:
            refused = await api.client.get("/models")
            accepted = await api.client.get("/models", headers=bearer(KEY_B))
    assert (refused.status_code, accepted.status_code) == (401, 200)


@pytest.mark.anyio
async def test_the_keys_file_is_read_once_by_the_settings(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"{KEY_B}\n")
    settings = Settings.build(api_keys_file=keys_file, required_models=[])
    keys_file.write_text(f"{KEY_C}\n")  # after validation: the app must not read it again
    registry = ModelRegistry(
        store=ModelStore(tmp_path / "models"), loader=FakeLoader(), policy=policy_from(settings)
    )
    app = create_app(settings, registry)
    transport = httpx.ASGITransport(app=app)
    with anyio.fail_after(10):
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://test") as client,
        ):
            statuses = [
                (await client.get("/models", headers=bearer(key))).status_code
                for key in (KEY_B, KEY_C)
            ]
    assert settings.accepted_api_keys == (KEY_B,)
    assert statuses == [200, 401]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read the API keys file"),
        ("# nothing but comments\n\n", "holds no keys"),
        (f"{KEY_A}\nshort-secret\n", "line 2: an API key is shorter than 16"),
        (f"{KEY_A}\nsk-with space-0123456789\n", "line 2: an API key holds a space"),
    ],
)
def test_a_bad_keys_file_stops_start_up_without_quoting_keys(
    tmp_path: Path, content: str | None, message: str
) -> None:
    keys_file = tmp_path / "keys.txt"
    if content is not None:
        keys_file.write_text(content)
    with pytest.raises(SettingsError, match=message) as caught:
        Settings.build(api_keys_file=keys_file)
    assert str(caught.value).startswith("invalid setting API_KEYS_FILE")
    for secret in (KEY_A, "short-secret", "sk-with space"):
        assert secret not in str(caught.value)


@pytest.mark.parametrize("value", ["tiny-Secret", "sk-ok-0123456789abcd,tiny-Secret", "[1"])
def test_a_bad_api_keys_value_is_never_echoed(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.delenv("EMBEDSERVE_API_KEYS", raising=False)
    monkeypatch.setenv("API_KEYS", value)
    with pytest.raises(SettingsError, match="invalid setting API_KEYS") as caught:
        Settings.from_env()
    assert "tiny-Secret" not in str(caught.value)
    assert "sk-ok" not in str(caught.value)


def test_api_keys_come_from_the_environment_and_stay_out_of_repr(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("EMBEDSERVE_API_KEYS", raising=False)
    monkeypatch.setenv("API_KEYS", f"{KEY_A}, {KEY_B}")
    settings = Settings.from_env()
    assert [k.get_secret_value() for k in settings.api_keys] == [KEY_A, KEY_B]
    assert KEY_A not in repr(settings)
    assert KEY_A not in str(settings.model_dump())


def test_trusted_proxies_must_be_addresses_or_networks() -> None:
    networks = Settings.build(trusted_proxies="10.0.0.0/8, 192.0.2.1").trusted_proxies
    assert [str(network) for network in networks] == ["10.0.0.0/8", "192.0.2.1/32"]
    with pytest.raises(SettingsError, match="invalid setting TRUSTED_PROXIES"):
        Settings.build(trusted_proxies="10.0.0.0/8,proxy.internal")


# -- the start-up warning --------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "warns"),
    [
        ({"host": "0.0.0.0"}, True),
        ({"host": "::"}, True),
        ({"host": "192.0.2.5"}, True),
        ({"host": "myhost.example"}, True),
        ({"host": "127.0.0.1"}, False),
        ({"host": "127.0.0.2"}, False),
        ({"host": "::1"}, False),
        ({"host": "localhost"}, False),
        ({"host": "0.0.0.0", "api_keys": [KEY_A]}, False),
    ],
)
def test_warns_once_when_exposed_without_keys(
    caplog: pytest.LogCaptureFixture, overrides: dict[str, Any], warns: bool
) -> None:
    settings = Settings.build(**overrides)
    caplog.set_level(logging.INFO, logger="embedserve")
    warn_if_exposed(settings)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == (1 if warns else 0)
    if warns:
        assert "no API keys" in warnings[0].getMessage()
        assert "API_KEYS" in warnings[0].getMessage()


def test_no_warning_with_a_keys_file(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(KEY_A)
    assert exposure_warning(Settings.build(host="0.0.0.0", api_keys_file=keys_file)) is None


def test_serve_warns_before_it_starts(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def stop(settings: Settings, *args: Any) -> None:
        raise RuntimeError("stopped before listening")

    monkeypatch.setattr(server, "configure_logging", lambda settings: None)
    monkeypatch.setattr(server, "create_app", stop)
    caplog.set_level(logging.INFO, logger="embedserve")
    with pytest.raises(RuntimeError, match="stopped before listening"):
        server.serve(Settings.build(host="0.0.0.0", required_models=[]))
    assert "no API keys" in caplog.text


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("headers", "accepted"),
    [
        ([], False),
        ([(b"authorization", b"Bearer sk-wrong-zzzzzzzzzzzzzzzzzz")], False),
        ([(b"authorization", f"Bearer {KEY_A}".encode())], True),
    ],
)
async def test_a_websocket_handshake_needs_a_key_too(
    headers: list[tuple[bytes, bytes]], accepted: bool
) -> None:
    reached: list[str] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        reached.append(scope["path"])
        await send({"type": "websocket.accept"})

    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    scope = {"type": "websocket", "path": "/ws", "headers": headers, "client": ("192.0.2.1", 1)}
    with anyio.fail_after(10):
        await ApiKeyAuth(inner, keys=[KEY_A])(scope, receive, send)
    if accepted:
        assert (reached, sent) == (["/ws"], [{"type": "websocket.accept"}])
    else:
        assert reached == []
        assert [m["type"] for m in sent] == ["websocket.close"]
        assert sent[0]["code"] == 1008
