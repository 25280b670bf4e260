"""The only reader of the environment: every setting, its env name, default and unit.

One module because the settings are one table: each field's name, default, bounds and
description sit together, and the cross-field checks read all of them.

Each setting is read from its documented name (``MAX_BATCH_SIZE``) or the same name with an
``EMBEDSERVE_`` prefix (which wins when both are set). Lists accept ``a,b`` as well as JSON.
`Settings.from_env()` is called once by the entry point; tests build `Settings.build(...)`
from explicit values without touching the environment.
"""

from __future__ import annotations

import ipaddress
import json
import os
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AliasChoices,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

DEFAULT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"

StrList = Annotated[list[str], NoDecode]
SecretList = Annotated[list[SecretStr], NoDecode]
NetworkList = Annotated[list[ipaddress.IPv4Network | ipaddress.IPv6Network], NoDecode]
# Never echoed in an error message (see `_describe`).
SECRET_SETTINGS = frozenset({"API_KEYS", "BULK_ONLY_API_KEYS"})
MIN_API_KEY_LENGTH = 16


# Set while `Settings.build` runs, so that explicit construction never reads the environment.
_READ_ENV: ContextVar[bool] = ContextVar("embedserve_read_env", default=True)


def check_api_key(key: str) -> None:
    """Raise ValueError (never quoting the key) unless `key` can be sent as a Bearer token."""
    if len(key) < MIN_API_KEY_LENGTH:
        raise ValueError(f"an API key is shorter than {MIN_API_KEY_LENGTH} characters")
    if not all("!" <= ch <= "~" for ch in key) or "," in key:
        raise ValueError("an API key holds a space, comma or non-ASCII character")


def read_api_keys_file(path: Path) -> list[str]:
    """The keys in `path`: one a line, blank lines and ``#`` comments skipped. Raises ValueError."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read the API keys file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ValueError("the API keys file is not UTF-8 text") from None
    keys = []
    for number, line in enumerate(text.splitlines(), start=1):
        key = line.strip()
        if not key or key.startswith("#"):
            continue
        try:
            check_api_key(key)
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}") from None
        keys.append(key)
    if not keys:
        raise ValueError("the API keys file holds no keys (authentication would be off)")
    return keys


def _split(value: Any) -> Any:
    """A list setting from the environment: ``a,b`` or JSON; other values as they are."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


def _field(name: str, default: Any, description: str, **kwargs: Any) -> Any:
    return Field(
        default,
        validation_alias=AliasChoices(f"EMBEDSERVE_{name}", name),
        description=description,
        **kwargs,
    )


class Settings(BaseSettings):
    """All configuration. Immutable; passed into `create_app` and the registry."""

    model_config = SettingsConfigDict(
        frozen=True, validate_by_name=True, validate_by_alias=True, extra="ignore"
    )

    # -- server ------------------------------------------------------------------------
    host: str = _field("HOST", "0.0.0.0", "Address to listen on.")
    port: int = _field("PORT", 8000, "TCP port to listen on.", ge=1, le=65535)
    debug: bool = _field("DEBUG", False, "Debug logging (never exposes tracebacks to clients).")
    log_level: Literal["CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"] = _field(
        "LOG_LEVEL", "INFO", "Log level."
    )
    log_format: Literal["text", "json"] = _field(
        "LOG_FORMAT", "text", "Log lines as plain text, or as one JSON object per line."
    )
    access_log: bool = _field(
        "ACCESS_LOG", True, "One INFO log line per request (never headers or bodies)."
    )
    shutdown_grace_s: float = _field(
        "SHUTDOWN_GRACE_S",
        30.0,
        "Seconds from SIGTERM until the server has stopped (one deadline for every phase).",
        gt=0,
    )
    max_request_bytes: int = _field(
        "MAX_REQUEST_BYTES",
        10 * 1024 * 1024,
        "Largest request body, enforced while reading.",
        ge=1024,
    )
    body_timeout_s: float = _field(
        "BODY_TIMEOUT_S",
        60.0,
        "Seconds from a request's headers to the end of its body; a slower body gets 408.",
        gt=0,
    )
    keep_alive_s: float = _field(
        "KEEP_ALIVE_S",
        75.0,
        "Seconds an idle kept-alive connection stays open. Longer than clients' and load "
        "balancers' idle timeouts (httpx 5, ALB 60), so they close first: a server closing a "
        "connection just as a client reuses it fails that request.",
        gt=0,
    )
    header_timeout_s: float = _field(
        "HEADER_TIMEOUT_S",
        10.0,
        "Seconds for a request's headers to arrive, from the connection (or, on a kept-alive "
        "one, from the request's first byte); a slower head gets 408 and the connection closes.",
        gt=0,
    )

    # -- requests ----------------------------------------------------------------------
    max_text_chars: int = _field(
        "MAX_TEXT_LENGTH", 8192, "Longest text in characters (longer: 422 or truncate).", ge=1
    )
    max_batch_size: int = _field(
        "MAX_BATCH_SIZE", 32, "Most texts in one /embed/batch request.", ge=1
    )
    request_timeout_s: float = _field(
        "REQUEST_TIMEOUT",
        300.0,
        "Seconds before a request is answered 504 and dropped; one the queue could not serve "
        "in time is refused with 429 at once.",
        gt=0,
    )

    # -- models ------------------------------------------------------------------------
    models_dir: Path = _field("MODELS_DIR", Path("models"), "Directory of imported models.")
    required_models: StrList = _field(
        "REQUIRED_MODELS", [DEFAULT_MODEL], "Loaded and warmed up before ready; first is default."
    )
    allowed_models: StrList = _field(
        "ALLOWED_MODELS", [], "Allow-list of model names; empty means any resolvable model."
    )
    model_cache_ttl_s: float = _field(
        "MODEL_CACHE_TTL", 3600.0, "Seconds unused before a model is offloaded.", gt=0
    )
    max_cached_models: int = _field(
        "MAX_CACHED_MODELS", 5, "Most models loaded at once (LRU eviction).", ge=1
    )
    cleanup_interval_s: float = _field(
        "CLEANUP_INTERVAL",
        60.0,
        "Seconds between sweeps: TTL offload, and a new read of MODELS_DIR for the model lists.",
        gt=0,
    )
    pin_required_models: bool = _field(
        "PIN_REQUIRED_MODELS", True, "Never evict or offload REQUIRED_MODELS."
    )
    offline: bool = _field(
        "OFFLINE", False, "Never try to download catalogue models (HF_HUB_OFFLINE also works)."
    )
    load_retry_s: float = _field(
        "LOAD_RETRY_S", 30.0, "Seconds a failed model load is remembered before retrying.", ge=0
    )
    ort_threads: int | None = _field(
        "ORT_THREADS", None, "ONNX Runtime threads per model; unset means all cores.", ge=1
    )
    thread_pool_workers: int = _field(
        "THREAD_POOL_WORKERS",
        4,
        "Worker threads shared by every model's inference: its batches, its tokenising off the "
        "event loop, and TEI's token-level routes (past this many of those at once, 429). "
        "Model loads, warm-ups and releases run on threads of their own, so a slow load never "
        "holds one of these.",
        ge=1,
    )

    # -- micro-batching ----------------------------------------------------------------
    enable_batching: bool = _field(
        "ENABLE_BATCHING", True, "Coalesce queued texts; false runs one text per inference."
    )
    batch_max_texts: int = _field("BATCH_MAX_TEXTS", 64, "Most texts in one model batch.", ge=1)
    batch_token_budget: int = _field(
        "BATCH_TOKEN_BUDGET",
        512,
        "Most token slots one model batch computes: padded, texts x longest; packed, "
        "rows x PACK_ROW_TOKENS (so BATCH_TOKEN_BUDGET // PACK_ROW_TOKENS rows).",
        ge=1,
    )
    enable_packing: bool = _field(
        "ENABLE_PACKING",
        True,
        "Run models that have a packed graph packed (several texts per row, no padding); "
        "false forces FastEmbed's padded path.",
    )
    pack_row_tokens: int = _field(
        "PACK_ROW_TOKENS",
        0,
        "Token slots in one packed row; 0: the model's token limit (256 for MiniLM).",
        ge=0,
    )
    pack_lookahead: int = _field(
        "PACK_LOOKAHEAD",
        256,
        "Distinct queued texts, from the oldest, the packed planner considers for a batch.",
        ge=1,
    )
    ort_spinning: bool = _field(
        "ORT_SPINNING",
        False,
        "Let ONNX Runtime's threads busy-wait between runs of a packed model (takes CPU "
        "from the event loop).",
    )
    batch_min_fill: float = _field(
        "BATCH_MIN_FILL",
        0.85,
        "Least share of a batch's padded tokens that must be real tokens.",
        ge=0,
        le=1,
    )
    batch_max_wait_ms: float = _field(
        "BATCH_MAX_WAIT_MS",
        0.0,
        "Extra wait for companions when the model is idle.",
        ge=0,
        le=100,
    )
    max_queue_size: int = _field(
        "MAX_QUEUE_SIZE", 1024, "Most bulk-lane texts waiting per model before 429.", ge=1
    )

    # -- priority lanes ----------------------------------------------------------------
    interactive_max_texts: int = _field(
        "INTERACTIVE_MAX_TEXTS",
        4,
        "Requests to /embed, /v1/embeddings and TEI's routes with at most this many texts "
        "go to the interactive lane unless they ask otherwise (/embed/batch: always bulk); "
        "0 puts every request in the bulk lane unless it asks for interactive.",
        ge=0,
    )
    max_queue_size_interactive: int = _field(
        "MAX_QUEUE_SIZE_INTERACTIVE",
        256,
        "Most interactive-lane texts waiting per model before 429.",
        ge=1,
    )
    bulk_min_share: float = _field(
        "BULK_MIN_SHARE",
        0.25,
        "Share of each batch kept for bulk texts while they wait, so that a flood of "
        "interactive requests never starves an ingestion job.",
        gt=0,
        le=1,
    )
    interactive_token_budget: int = _field(
        "INTERACTIVE_TOKEN_BUDGET",
        256,
        "Most token slots a batch computes while interactive requests come (one in the last "
        "INTERACTIVE_WINDOW_MS), so that a query waits for a short batch; 0: "
        "BATCH_TOKEN_BUDGET.",
        ge=0,
    )
    interactive_window_ms: float = _field(
        "INTERACTIVE_WINDOW_MS",
        1000.0,
        "How long after an interactive request batches stay within INTERACTIVE_TOKEN_BUDGET.",
        ge=0,
    )
    bulk_only_api_keys: SecretList = _field(
        "BULK_ONLY_API_KEYS",
        [],
        "API keys (also listed in API_KEYS or API_KEYS_FILE) whose requests always go to "
        "the bulk lane, whatever they ask.",
    )

    # -- production surface ------------------------------------------------------------
    enable_cors: bool = _field("ENABLE_CORS", False, "Add CORS headers and answer preflight.")
    cors_origins: StrList = _field("CORS_ORIGINS", ["*"], "Origins allowed by CORS.")
    enable_rate_limit: bool = _field(
        "ENABLE_RATE_LIMIT", False, "Per-client token-bucket rate limit."
    )
    rate_limit_per_minute: int = _field(
        "RATE_LIMIT_REQUESTS", 100, "Requests per minute per client when rate limiting.", ge=1
    )
    enable_metrics: bool = _field("ENABLE_METRICS", True, "Serve /metrics.")
    api_keys: SecretList = _field(
        "API_KEYS", [], "Keys accepted as 'Authorization: Bearer <key>'; none: auth is off."
    )
    api_keys_file: Path | None = _field(
        "API_KEYS_FILE", None, "File of API keys, one a line, '#' comments; adds to API_KEYS."
    )
    trusted_proxies: NetworkList = _field(
        "TRUSTED_PROXIES", [], "Proxy IPs/CIDRs whose X-Forwarded-For names the client."
    )

    # API_KEYS_FILE's keys, read once while validating.
    _file_keys: tuple[SecretStr, ...] = PrivateAttr(default=())

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        if not _READ_ENV.get():
            return (init_settings,)
        return (init_settings, env_settings)

    @field_validator(
        "required_models",
        "allowed_models",
        "cors_origins",
        "api_keys",
        "bulk_only_api_keys",
        mode="before",
    )
    @classmethod
    def _split_list(cls, value: Any) -> Any:
        return _split(value)

    @field_validator("api_keys", "bulk_only_api_keys")
    @classmethod
    def _check_api_keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        for key in value:
            check_api_key(key.get_secret_value())
        return value

    @model_validator(mode="after")
    def _read_api_keys_file(self) -> Settings:
        # The file's only read: a bad file fails start-up in one line, not the first request,
        # and the keys checked here are the keys served (no second read to disagree with).
        if self.api_keys_file is not None:
            try:
                keys = read_api_keys_file(self.api_keys_file)
            except ValueError as exc:
                raise _SettingInvalid("API_KEYS_FILE", str(exc)) from None
            self._file_keys = tuple(SecretStr(key) for key in keys)
        return self

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _parse_networks(cls, value: Any) -> Any:
        # The one parse of TRUSTED_PROXIES; a bare IP is a /32 or /128, host bits are allowed.
        items = _split(value)
        if not isinstance(items, list):
            return items
        return [ipaddress.ip_network(i, strict=False) if isinstance(i, str) else i for i in items]

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        if self.allowed_models:
            outside = [m for m in self.required_models if m not in self.allowed_models]
            if outside:
                raise ValueError(
                    f"REQUIRED_MODELS {outside} are not in ALLOWED_MODELS {self.allowed_models}"
                )
        if self.max_batch_size > min(self.max_queue_size, self.max_queue_size_interactive):
            raise ValueError(
                "MAX_BATCH_SIZE must not exceed MAX_QUEUE_SIZE or MAX_QUEUE_SIZE_INTERACTIVE"
            )
        if len(self.required_models) > self.max_cached_models:
            raise ValueError("more REQUIRED_MODELS than MAX_CACHED_MODELS")
        accepted = set(self.accepted_api_keys)
        stray = [k for k in self.bulk_only_api_keys if k.get_secret_value() not in accepted]
        if stray:
            raise _SettingInvalid(
                "BULK_ONLY_API_KEYS",
                f"{len(stray)} of its keys are not in API_KEYS or API_KEYS_FILE",
            )
        return self

    @property
    def accepted_api_keys(self) -> tuple[str, ...]:
        """Every key auth accepts: API_KEYS, then API_KEYS_FILE's. Empty: auth is off."""
        return tuple(key.get_secret_value() for key in (*self.api_keys, *self._file_keys))

    @property
    def default_model(self) -> str | None:
        """The model used when a request names none: the first required model."""
        return self.required_models[0] if self.required_models else None

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Read the environment (the entry point's job); `overrides` win. Raises SettingsError."""
        try:
            return cls(**{k: v for k, v in overrides.items() if v is not None})
        except ValidationError as exc:
            raise SettingsError(_describe(exc)) from None

    @classmethod
    def build(cls, **values: Any) -> Settings:
        """Settings from explicit values only (no environment): for tests and embedding."""
        token = _READ_ENV.set(False)
        try:
            return cls(**values)
        except ValidationError as exc:
            raise SettingsError(_describe(exc)) from None
        finally:
            _READ_ENV.reset(token)


class SettingsError(ValueError):
    """An invalid setting; the message is one line naming it."""


class _SettingInvalid(ValueError):
    """A check made after the fields are parsed that fails one named setting."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


def _describe(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False):
        loc = error.get("loc") or ()
        cause = (error.get("ctx") or {}).get("error")
        if isinstance(cause, _SettingInvalid):
            loc = (cause.name,)
        name = str(loc[0]).upper() if loc else "SETTINGS"
        if name.startswith("EMBEDSERVE_"):
            name = name.removeprefix("EMBEDSERVE_")
        value = os.environ.get(name, os.environ.get(f"EMBEDSERVE_{name}"))
        shown = f"={value!r}" if value is not None and loc and name not in SECRET_SETTINGS else ""
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"invalid setting {name}{shown}: {message}")
    return "; ".join(parts)
