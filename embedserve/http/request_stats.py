"""Process-wide request counters behind the JSON ``/metrics`` endpoint."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class AppStats:
    """Counters owned by the app; only request handlers and the error handler update them."""

    started: float = field(default_factory=time.monotonic)
    total_requests: int = 0
    total_embeddings: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def uptime_s(self) -> float:
        """Seconds since the app was created."""
        return round(time.monotonic() - self.started, 3)
