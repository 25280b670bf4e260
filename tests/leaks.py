"""Assert that a response body leaks nothing of the server: no stack trace, no server file
path (repo root, site-packages, stdlib, models directory), no API key value.

A body is checked twice: as raw text, and, when it parses as JSON, as each of its decoded
strings (a traceback inside a JSON string has its quotes escaped as ``File \\"...``).
Text the client itself sent may come back in an error message (``model 'x' not found``);
pass it as `echoed` so that a marker found there is not taken for a leak.
"""

from __future__ import annotations

import contextlib
import json
import re
import site
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Fragments of a Python traceback or exception repr; none belongs in a client's answer.
_TRACE_MARKERS = (
    "Traceback (most recent call last)",
    "Traceback",
    'File "',
    "site-packages",
    "dist-packages",
)
# A frame line as loggers print it, e.g. ``embedserve/engine/registry.py", line 42``.
_FRAME = re.compile(r"\.py\"?,? line \d+")


def _server_paths(extra: Sequence[str | Path]) -> list[str]:
    """Absolute directories of this server: repo, interpreter prefixes, stdlib, site dirs."""
    candidates: list[str | Path] = [ROOT, ROOT.resolve(), sys.prefix, sys.base_prefix]
    candidates += [sysconfig.get_paths()[name] for name in ("stdlib", "purelib", "platlib")]
    candidates += site.getsitepackages()
    candidates += list(extra)
    paths = {str(Path(p)) for p in candidates} | {str(Path(p).resolve()) for p in candidates}
    # "/" or "/usr" alone would match any slash in a message; keep only specific directories.
    return sorted((p for p in paths if p.count("/") >= 2), key=len, reverse=True)


def _strings(value: object) -> Iterator[str]:
    """Every string (keys included) inside a decoded JSON value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def find_leaks(
    body: bytes | str,
    *,
    secrets: Sequence[str] = (),
    paths: Sequence[str | Path] = (),
    echoed: Sequence[str] = (),
) -> list[str]:
    """What `body` leaks, as a list of descriptions (empty: nothing).

    `secrets` are values that must never appear (API keys); `paths` are extra server
    directories (a test's models dir); `echoed` is text the client sent.
    """
    text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
    views = [text]
    with contextlib.suppress(ValueError):  # not JSON: the raw text is all there is
        views.extend(_strings(json.loads(text)))
    sent = "\n".join(echoed)

    def leaked(marker: str) -> bool:
        return marker not in sent and any(marker in view for view in views)

    found = [f"stack trace marker {m!r}" for m in _TRACE_MARKERS if leaked(m)]
    for view in views:
        match = _FRAME.search(view)
        if match and match.group(0) not in sent:
            found.append(f"stack frame {match.group(0)!r}")
            break
    found += [f"server path {p!r}" for p in _server_paths(paths) if leaked(p)]
    # A secret is reported by position only: the failure message must not leak it either.
    found += [f"secret #{i}" for i, s in enumerate(secrets) if s and any(s in v for v in views)]
    return found


def assert_no_leak(
    body: bytes | str,
    *,
    secrets: Sequence[str] = (),
    paths: Sequence[str | Path] = (),
    echoed: Sequence[str] = (),
) -> None:
    """Fail if `body` holds a stack trace, a server file path, or one of `secrets`.

    `paths` adds server directories to look for (e.g. a test's temporary models dir; the
    repo root, which holds the default ``models/``, is always checked); `echoed` is text the
    client sent, which the server may quote back without leaking anything.
    """
    found = find_leaks(body, secrets=secrets, paths=paths, echoed=echoed)
    if found:
        text = body.decode("utf-8", errors="replace") if isinstance(body, bytes) else body
        for secret in secrets:
            if secret:
                text = text.replace(secret, "<secret>")
        raise AssertionError(f"response leaks {', '.join(found)}: {text[:500]!r}")
