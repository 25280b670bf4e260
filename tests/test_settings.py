"""Settings: documented env names, EMBEDSERVE_ prefix, list formats, one-line errors."""

from __future__ import annotations

import httpx
import pytest
from starlette.responses import PlainTextResponse

from embedserve.server import uvicorn_config
from embedserve.settings import DEFAULT_MODEL, Settings, SettingsError

SEED_NAMES = [
    "HOST", "PORT", "DEBUG", "LOG_LEVEL", "THREAD_POOL_WORKERS", "MAX_TEXT_LENGTH",
    "MAX_BATCH_SIZE", "REQUEST_TIMEOUT", "MODEL_CACHE_TTL", "MAX_CACHED_MODELS",
    "CLEANUP_INTERVAL", "REQUIRED_MODELS", "ALLOWED_MODELS", "ENABLE_CORS", "CORS_ORIGINS",
    "ENABLE_RATE_LIMIT", "RATE_LIMIT_REQUESTS", "ENABLE_METRICS",
]  # fmt: skip


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [*SEED_NAMES, "MODELS_DIR", "BATCH_TOKEN_BUDGET"]:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(f"EMBEDSERVE_{name}", raising=False)


def test_seed_defaults() -> None:
    s = Settings.from_env()
    assert (s.host, s.port, s.debug, s.log_level) == ("0.0.0.0", 8000, False, "INFO")
    assert (s.max_text_chars, s.max_batch_size, s.request_timeout_s) == (8192, 32, 300)
    assert (s.model_cache_ttl_s, s.max_cached_models, s.cleanup_interval_s) == (3600, 5, 60)
    assert s.required_models == [DEFAULT_MODEL]
    assert s.default_model == DEFAULT_MODEL
    assert s.allowed_models == []


def test_every_seed_name_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {
        "HOST": "127.0.0.1", "PORT": "9000", "DEBUG": "true", "LOG_LEVEL": "debug",
        "THREAD_POOL_WORKERS": "3", "MAX_TEXT_LENGTH": "100", "MAX_BATCH_SIZE": "7",
        "REQUEST_TIMEOUT": "5", "MODEL_CACHE_TTL": "10", "MAX_CACHED_MODELS": "2",
        "CLEANUP_INTERVAL": "1", "REQUIRED_MODELS": "a/b", "ALLOWED_MODELS": "a/b,c/d",
        "ENABLE_CORS": "1", "CORS_ORIGINS": "https://x.example", "ENABLE_RATE_LIMIT": "yes",
        "RATE_LIMIT_REQUESTS": "42", "ENABLE_METRICS": "false",
    }  # fmt: skip
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    s = Settings.from_env()
    assert (s.host, s.port, s.debug, s.log_level) == ("127.0.0.1", 9000, True, "DEBUG")
    assert (s.thread_pool_workers, s.max_text_chars, s.max_batch_size) == (3, 100, 7)
    assert (s.request_timeout_s, s.model_cache_ttl_s, s.max_cached_models) == (5, 10, 2)
    assert s.cleanup_interval_s == 1
    assert s.required_models == ["a/b"]
    assert s.allowed_models == ["a/b", "c/d"]
    assert (s.enable_cors, s.cors_origins) == (True, ["https://x.example"])
    assert (s.enable_rate_limit, s.rate_limit_per_minute, s.enable_metrics) == (True, 42, False)


def test_lists_accept_json_and_commas_with_spaces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLOWED_MODELS", '["a/b", "c/d"]')
    monkeypatch.setenv("REQUIRED_MODELS", " a/b , ")
    s = Settings.from_env()
    assert s.allowed_models == ["a/b", "c/d"]
    assert s.required_models == ["a/b"]


def test_prefixed_name_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "9000")
    monkeypatch.setenv("EMBEDSERVE_PORT", "9001")
    assert Settings.from_env().port == 9001


@pytest.mark.parametrize(
    ("name", "value"),
    [("MAX_BATCH_SIZE", "abc"), ("PORT", "70000"), ("LOG_LEVEL", "loud"), ("DEBUG", "maybe")],
)
def test_invalid_value_is_one_line_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as error:
        Settings.from_env()
    message = str(error.value)
    assert "\n" not in message
    assert f"invalid setting {name}={value!r}" in message


def test_required_models_must_be_allowed() -> None:
    with pytest.raises(SettingsError, match="REQUIRED_MODELS"):
        Settings.build(required_models="a/b", allowed_models="c/d")


def test_build_ignores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "9000")
    assert Settings.build().port == 8000


def test_body_timeout_reads_both_names_and_refuses_non_positive(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("BODY_TIMEOUT_S", raising=False)
    monkeypatch.delenv("EMBEDSERVE_BODY_TIMEOUT_S", raising=False)
    assert Settings.from_env().body_timeout_s == 60
    monkeypatch.setenv("BODY_TIMEOUT_S", "5")
    assert Settings.from_env().body_timeout_s == 5
    monkeypatch.setenv("EMBEDSERVE_BODY_TIMEOUT_S", "2.5")
    assert Settings.from_env().body_timeout_s == 2.5
    monkeypatch.setenv("EMBEDSERVE_BODY_TIMEOUT_S", "0")
    with pytest.raises(SettingsError, match="invalid setting BODY_TIMEOUT_S"):
        Settings.from_env()


def test_idle_connections_are_kept_longer_than_clients_keep_them() -> None:
    # Closing an idle connection as a client reuses it fails that request (httpx ReadError):
    # the client must give up on an idle connection first. httpx's default is 5 s, as was
    # uvicorn's.
    app = PlainTextResponse("ok")
    client_expiry = httpx.Limits().keepalive_expiry
    assert client_expiry is not None
    assert uvicorn_config(Settings.build(), app).timeout_keep_alive > client_expiry
    assert uvicorn_config(Settings.build(keep_alive_s=2.5), app).timeout_keep_alive == 2.5
