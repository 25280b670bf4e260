"""``X-Request-ID``: the client's id when it is safe to echo and log, otherwise a new one."""

from __future__ import annotations

import os
import re
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
    return _uuid4_hex()


def _uuid4_hex() -> str:
    """``uuid.uuid4().hex`` without the UUID object (a third of the time, on every request)."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40  # version 4
    raw[8] = raw[8] & 0x3F | 0x80  # RFC 4122 variant
    return raw.hex()
