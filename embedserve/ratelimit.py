"""Per-client token-bucket rate limiting (ASGI middleware), answering 429 with Retry-After.

Clients are told apart by their socket address; forwarded headers are not trusted here.
Liveness, readiness and metrics endpoints are exempt.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from embedserve.responses import error_response

EXEMPT_PATHS = frozenset({"/health", "/ready", "/metrics"})
MAX_TRACKED_CLIENTS = 10_000


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    """Buckets of `capacity` tokens refilled at `capacity` per `period_s`; owns its table."""

    def __init__(
        self, capacity: int, period_s: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.capacity = capacity
        self.rate = capacity / period_s
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def take(self, key: str) -> tuple[bool, int, float]:
        """Spend a token for `key`: (allowed, tokens left, seconds until one is back)."""
        now = self._clock()
        bucket = self._buckets.pop(key, None) or _Bucket(float(self.capacity), now)
        bucket.tokens = min(self.capacity, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        allowed = bucket.tokens >= 1
        if allowed:
            bucket.tokens -= 1
        self._buckets[key] = bucket
        if len(self._buckets) > MAX_TRACKED_CLIENTS:
            self._buckets.popitem(last=False)  # the least recently seen client
        wait = 0.0 if bucket.tokens >= 1 else (1 - bucket.tokens) / self.rate
        return allowed, int(bucket.tokens), wait


class RateLimit:
    """Refuse a client's request with 429 once its bucket is empty."""

    def __init__(self, app: ASGIApp, buckets: TokenBuckets) -> None:
        self.app = app
        self.buckets = buckets

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        allowed, remaining, wait_s = self.buckets.take(client[0] if client else "unknown")
        headers = {
            "RateLimit-Limit": str(self.buckets.capacity),
            "RateLimit-Remaining": str(remaining),
            "RateLimit-Reset": str(math.ceil(wait_s)),
        }
        if not allowed:
            headers["Retry-After"] = str(max(1, math.ceil(wait_s)))
            response = error_response(
                429,
                f"rate limit of {self.buckets.capacity} requests per minute exceeded",
                "rate_limited",
                headers,
                path=scope["path"],
            )
            await response(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [
                    (k.lower().encode(), v.encode()) for k, v in headers.items()
                ]
            await send(message)

        await self.app(scope, receive, send_with_headers)
