"""Per-client token-bucket rate limiting (ASGI middleware): 429 with Retry-After and RateLimit-*.

A client is its API key when keys are on (bucketed by the digest `ApiKeyAuth` leaves in the
scope, never the key), else its address: the socket peer, or X-Forwarded-For from a trusted
proxy (see `client_addr`). IPv6 clients share a bucket per /64, the block one subscriber gets.
Runs after authentication, so refused requests never spend a key's budget. Liveness,
readiness and metrics endpoints are exempt.

Headers follow draft-ietf-httpapi-ratelimit-headers (the separate-field form):
``RateLimit-Limit`` is the bucket size, ``RateLimit-Remaining`` the whole tokens left,
``RateLimit-Reset`` the seconds until the bucket is full again, ``RateLimit-Policy`` is
``<limit>;w=<window seconds>``; a 429 adds ``Retry-After``, the seconds until one token is
back. All are non-negative integers, rounded up so that waiting that long is enough.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedserve.http.middleware.auth import API_KEY_ID
from embedserve.http.middleware.client_addr import client_host
from embedserve.http.responses import error_response

EXEMPT_PATHS = frozenset({"/health", "/ready", "/metrics"})
MAX_TRACKED_CLIENTS = 10_000
IPV6_PREFIX = 64


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass(frozen=True)
class Verdict:
    """One request's outcome: allowed or not, tokens left, and the two waits (seconds)."""

    allowed: bool
    remaining: int
    retry_after_s: float  # until one token is back (0 when one is there now)
    reset_s: float  # until the bucket is full again


class TokenBuckets:
    """Buckets of `capacity` tokens refilled at `capacity` per `period_s`; owns its table.

    The table holds at most MAX_TRACKED_CLIENTS buckets; past that the least recently seen
    client is forgotten (which only ever gives that client a full bucket back).
    """

    def __init__(
        self, capacity: int, period_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.capacity = capacity
        self.period_s = period_s
        self.rate = capacity / period_s
        self.clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def take(self, key: str) -> Verdict:
        """Spend a token for `key` if there is one."""
        now = self.clock()
        bucket = self._buckets.pop(key, None) or _Bucket(float(self.capacity), now)
        elapsed = max(0.0, now - bucket.updated)
        bucket.tokens = min(float(self.capacity), bucket.tokens + elapsed * self.rate)
        bucket.updated = now
        allowed = bucket.tokens >= 1
        if allowed:
            bucket.tokens -= 1
        self._buckets[key] = bucket
        if len(self._buckets) > MAX_TRACKED_CLIENTS:
            self._buckets.popitem(last=False)
        return Verdict(
            allowed=allowed,
            remaining=max(0, math.floor(bucket.tokens)),
            retry_after_s=max(0.0, 1 - bucket.tokens) / self.rate,
            reset_s=max(0.0, self.capacity - bucket.tokens) / self.rate,
        )


class RateLimit:
    """Refuse a client's request with 429 once its bucket is empty; label every other answer."""

    def __init__(self, app: ASGIApp, buckets: TokenBuckets) -> None:
        self.app = app
        self.buckets = buckets
        # The headers that depend only on the settings, built once.
        self._fixed_headers = {
            "RateLimit-Limit": str(buckets.capacity),
            "RateLimit-Policy": f"{buckets.capacity};w={buckets.period_s:g}",
        }

    def client_key(self, scope: Scope) -> str:
        """The bucket a request spends from: its key's digest, else its address (IPv6: /64)."""
        key_id = scope.get(API_KEY_ID)
        if key_id is not None:
            return f"key:{key_id}"
        address = client_host(scope)
        try:
            parsed = ipaddress.ip_address(address)
        except ValueError:
            return f"addr:{address}"
        if parsed.version == 6:
            return f"net:{ipaddress.ip_network(f'{parsed}/{IPV6_PREFIX}', strict=False)}"
        return f"addr:{parsed}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        verdict = self.buckets.take(self.client_key(scope))
        headers = {
            **self._fixed_headers,
            "RateLimit-Remaining": str(verdict.remaining),
            "RateLimit-Reset": str(math.ceil(verdict.reset_s)),
        }
        if not verdict.allowed:
            retry_after = max(1, math.ceil(verdict.retry_after_s))
            headers["Retry-After"] = str(retry_after)
            response = error_response(
                429,
                f"rate limit exceeded: {self.buckets.capacity} requests per "
                f"{self.buckets.period_s:g} seconds; retry after {retry_after} s",
                "rate_limited",
                headers,
                path=scope["path"],
            )
            await response(scope, receive, send)
            return
        raw = [(name.lower().encode(), value.encode()) for name, value in headers.items()]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *raw]
            await send(message)

        await self.app(scope, receive, send_with_headers)
