"""API keys: ``Authorization: Bearer <key>`` on every endpoint but liveness, readiness, preflight.

The keys are handed in (`Settings.accepted_api_keys`: API_KEYS and API_KEYS_FILE, checked, and
the file read, once by the settings); with none, authentication is off. The middleware keeps
only keyed digests of the keys, compares the presented key against every one of them with
`hmac.compare_digest` (no early exit, so timing does not tell which key matched or how much
of one), and never puts a key into a response or a log line. An accepted request
carries ``scope[API_KEY_ID]``, a digest of its key, for the rate limiter to key buckets by,
and ``scope[BULK_ONLY]`` when its key is one of BULK_ONLY_API_KEYS (priority lanes).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from embedserve.http.responses import error_response

if TYPE_CHECKING:
    from embedserve.settings import Settings

logger = logging.getLogger(__name__)

API_KEY_ID = "embedserve.api_key_id"
BULK_ONLY = "embedserve.bulk_only"  # set on the scope for a key in BULK_ONLY_API_KEYS
EXEMPT_PATHS = frozenset({"/health", "/ready"})
REALM = 'Bearer realm="embedserve"'
POLICY_VIOLATION = 1008  # WebSocket close code for a refused handshake (RFC 6455)


class ApiKeyAuth:
    """Answer 401 unless the request carries a configured key; owns the keys' digests.

    Exempt: ``/health`` and ``/ready`` (probes carry no credentials) and CORS preflights
    (browsers never send credentials on them). Nothing is read from the body before the check.
    A WebSocket handshake without a valid key is closed before it is accepted (HTTP 403).
    """

    def __init__(self, app: ASGIApp, keys: Sequence[str], bulk_only: Sequence[str] = ()) -> None:
        if not keys:
            raise ValueError("ApiKeyAuth needs at least one key")
        self.app = app
        # Digests with a per-process secret: all the same length for compare_digest, and
        # not a plain hash that a dump of the bucket table could be checked against.
        self._secret = secrets.token_bytes(32)
        self._digests = tuple(self._digest(key.encode()) for key in keys)
        # Keys whose requests run in the bulk lane only (BULK_ONLY_API_KEYS).
        self._bulk_only = frozenset(self._digest(key.encode()) for key in bulk_only)

    def _digest(self, key: bytes) -> bytes:
        return hmac.new(self._secret, key, hashlib.sha256).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # WebSocket handshakes are checked like requests: a WebSocket route added later
        # must not be the one endpoint that needs no key. Only lifespan passes unchecked.
        if scope["type"] not in ("http", "websocket") or (
            scope["path"] in EXEMPT_PATHS or _is_preflight(scope)
        ):
            await self.app(scope, receive, send)
            return
        presented = _bearer_token(scope)
        if presented is None or presented == b"":
            await self._refuse(scope, receive, send, presented)
            return
        digest = self._digest(presented)
        matched = False
        for known in self._digests:
            matched |= hmac.compare_digest(digest, known)
        if not matched:
            await self._refuse(scope, receive, send, presented)
            return
        scope[API_KEY_ID] = digest.hex()
        if digest in self._bulk_only:
            scope[BULK_ONLY] = True
        await self.app(scope, receive, send)

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, token: bytes | None
    ) -> None:
        if scope["type"] == "websocket":
            # Closing before accepting: the server answers the handshake with 403.
            await send({"type": "websocket.close", "code": POLICY_VIOLATION, "reason": ""})
            return
        if token is None:
            message = "missing API key: send the header 'Authorization: Bearer <key>'"
            if "x-api-key" in Headers(scope=scope):
                message += " (X-API-Key is not accepted)"
            error_type, challenge = "missing_api_key", REALM
        elif token == b"":
            message = "malformed Authorization header: expected 'Bearer <key>'"
            error_type, challenge = "missing_api_key", REALM
        else:
            message = "invalid API key"
            error_type, challenge = "invalid_api_key", f'{REALM}, error="invalid_token"'
        response = error_response(
            401, message, error_type, {"WWW-Authenticate": challenge}, path=scope["path"]
        )
        await response(scope, receive, send)


def _bearer_token(scope: Scope) -> bytes | None:
    """The Bearer token; None without an Authorization header, b"" when it is malformed."""
    values = [value for key, value in scope.get("headers", []) if key == b"authorization"]
    if not values:
        return None
    if len(values) > 1:
        return b""  # ambiguous: a proxy and the app could each read a different one
    scheme, _, token = bytes(values[0]).strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or b" " in token:
        return b""
    return token


def _is_preflight(scope: Scope) -> bool:
    """A CORS preflight, as browsers send it and as Starlette's CORSMiddleware detects it."""
    if scope.get("method") != "OPTIONS":
        return False
    headers = Headers(scope=scope)
    return "origin" in headers and "access-control-request-method" in headers


def exposure_warning(settings: Settings) -> str | None:
    """The start-up warning for a server reachable beyond this machine with no API keys."""
    if settings.accepted_api_keys or _is_loopback(settings.host):
        return None
    return (
        f"listening on {settings.host} with no API keys: anyone who can reach this port can "
        "use it; set API_KEYS or API_KEYS_FILE, or HOST=127.0.0.1"
    )


def warn_if_exposed(settings: Settings) -> None:
    """Log `exposure_warning` once as a WARNING, if there is one."""
    warning = exposure_warning(settings)
    if warning is not None:
        logger.warning(warning)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything
