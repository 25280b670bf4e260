"""``X-Request-ID``: the client's id when it is safe to echo and log, otherwise a new one."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable

HEADER = b"x-request-id"
SCOPE_KEY = "embedserve.request_id"

# Anything else (CR/LF, quotes, spaces, non-ASCII, over 128 bytes) could split a header or a
# log line, so it is replaced rather than escaped or echoed.
_SAFE = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


def request_id(headers: Iterable[tuple[bytes, bytes]]) -> str:
    """The first ``X-Request-ID`` in `headers` (ASGI, lower-case names) if it is 1-128 of
    ``[A-Za-z0-9._:-]``; otherwise a fresh uuid4 hex.
    """
    for name, value in headers:
        if name == HEADER:
            if _SAFE.fullmatch(value):
                return value.decode("ascii")
            break
    return uuid.uuid4().hex
