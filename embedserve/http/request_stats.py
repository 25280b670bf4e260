"""Process-wide request counters behind the JSON ``/metrics`` endpoint (and Prometheus's
error counts)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class AppStats:
    """Counters owned by the app. Request handlers count requests and embeddings; the
    access log counts every error answer once, by status and error_type, whichever layer
    answered (`count_error`). JSON ``/metrics`` and Prometheus both read `errors`.
    """

    started: float = field(default_factory=time.monotonic)
    total_requests: int = 0
    total_embeddings: int = 0
    errors: Counter[tuple[int, str]] = field(default_factory=Counter)

    def count_error(self, status: int, error_type: str) -> None:
        """One error answer (`logs.AccessLog` calls this)."""
        self.errors[(status, error_type)] += 1

    def errors_by_type(self) -> dict[str, int]:
        """Error answers by error_type, all statuses together."""
        by_type: Counter[str] = Counter()
        for (_, error_type), count in self.errors.items():
            by_type[error_type] += count
        return dict(by_type)

    def uptime_s(self) -> float:
        """Seconds since the app was created."""
        return round(time.monotonic() - self.started, 3)
