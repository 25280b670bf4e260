"""X-Request-ID: which client ids are kept, and what replaces the others."""

from __future__ import annotations

import re
import uuid

import pytest

from embedserve.http.middleware.request_id import request_id

GENERATED = re.compile(r"[0-9a-f]{32}")


@pytest.mark.parametrize("given", ["abc", "A-1.b_2:c", "x" * 128, "0"])
def test_a_safe_id_is_kept(given: str) -> None:
    assert request_id([(b"x-request-id", given.encode())]) == given


@pytest.mark.parametrize(
    "given",
    [
        b"",
        b"x" * 129,
        b"abc\r\nSet-Cookie: x",
        b"abc\nx",
        b"has space",
        b'quote"d',
        b"caf\xc3\xa9",
        b"semi;colon",
        b"a/b",
    ],
    ids=repr,
)
def test_an_unsafe_id_is_replaced_by_a_fresh_one(given: bytes) -> None:
    made = request_id([(b"host", b"test"), (b"x-request-id", given)])
    assert GENERATED.fullmatch(made)


def test_without_the_header_each_request_gets_a_new_id() -> None:
    ids = {request_id([(b"host", b"test")]) for _ in range(100)}
    assert len(ids) == 100
    assert all(GENERATED.fullmatch(i) for i in ids)


def test_the_first_header_decides() -> None:
    headers = [(b"x-request-id", b"first"), (b"x-request-id", b"second")]
    assert request_id(headers) == "first"
    unsafe_first = [(b"x-request-id", b"bad value"), (b"x-request-id", b"good")]
    assert GENERATED.fullmatch(request_id(unsafe_first))


def test_a_fresh_id_is_a_version_4_uuid() -> None:
    made = uuid.UUID(hex=request_id([]))
    assert made.version == 4
    assert made.variant == uuid.RFC_4122
