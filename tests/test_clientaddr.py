"""The client address: X-Forwarded-For believed only from trusted proxies, read from the right.

The rewriting is uvicorn's `ProxyHeadersMiddleware`; these tests pin down what it gives with
our TRUSTED_PROXIES (parsed by the settings), and that the access log and the rate limiter
(tests/test_ratelimit.py) see that address.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import anyio
import httpx
import pytest
from starlette.types import Receive, Scope, Send

from embedserve.http.middleware.client_addr import IPNetwork, behind_proxies, client_host
from embedserve.settings import Settings
from tests.conftest import Serve

TRUSTED = Settings.build(trusted_proxies="10.0.0.0/8, 192.0.2.10, fd00::/8").trusted_proxies


async def seen_by_the_app(
    peer: str | None,
    forwarded: Sequence[str] = (),
    trusted: Sequence[IPNetwork] = TRUSTED,
    proto: str | None = None,
) -> tuple[str, str]:
    """(client_host, scheme) as a layer inside `behind_proxies` sees a request."""
    seen: dict[str, Any] = {}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.update(client=client_host(scope), scheme=scope["scheme"])

    headers = [(b"x-forwarded-for", value.encode()) for value in forwarded]
    if proto is not None:
        headers.append((b"x-forwarded-proto", proto.encode()))
    scope = {
        "type": "http",
        "scheme": "http",
        "client": (peer, 1234) if peer else None,
        "headers": headers,
    }
    await behind_proxies(app, trusted)(scope, None, None)  # type: ignore[arg-type]
    return seen["client"], seen["scheme"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        # Not from a trusted proxy: the header is the client's own claim, ignored.
        ("203.0.113.9", ["1.1.1.1"], "203.0.113.9"),
        # From a trusted proxy without a header: the proxy itself.
        ("10.0.0.1", [], "10.0.0.1"),
        # The right-most untrusted address wins; whatever the client forged to its left is not.
        ("10.0.0.1", ["6.6.6.6, 1.1.1.1"], "1.1.1.1"),
        ("10.0.0.1", ["6.6.6.6, 1.1.1.1, 192.0.2.10, 10.9.9.9"], "1.1.1.1"),
        # Repeated headers are one list, in order.
        ("10.0.0.1", ["6.6.6.6", "1.1.1.1, 10.2.2.2"], "1.1.1.1"),
        # Every hop trusted: the furthest one.
        ("10.0.0.1", ["10.3.3.3, 10.2.2.2"], "10.3.3.3"),
        # A hop that is no address, written by a trusted proxy, is taken as it is (the
        # access log escapes it); an empty last hop leaves the proxy.
        ("10.0.0.1", ["1.1.1.1, unknown"], "unknown"),
        ("10.0.0.1", ["1.1.1.1, "], "10.0.0.1"),
        # Ports, brackets, IPv6.
        ("10.0.0.1", ["1.1.1.1:5555"], "1.1.1.1"),
        ("10.0.0.1", ["[2001:db8::1]:443"], "2001:db8::1"),
        ("fd00::1", ["2001:db8::7"], "2001:db8::7"),
        # IPv4-mapped addresses (a dual-stack socket) match the IPv4 entries, and are one
        # client with their IPv4 spelling.
        ("::ffff:10.0.0.1", ["1.1.1.1"], "1.1.1.1"),
        ("10.0.0.1", ["1.1.1.1, ::ffff:10.2.2.2"], "1.1.1.1"),
        ("::ffff:203.0.113.9", ["1.1.1.1"], "203.0.113.9"),
    ],
)
async def test_client_address(peer: str, forwarded: list[str], expected: str) -> None:
    client, _ = await seen_by_the_app(peer, forwarded)
    assert client == expected


@pytest.mark.anyio
async def test_no_trusted_proxies_means_the_peer_always() -> None:
    assert await seen_by_the_app("10.0.0.1", ["1.1.1.1"], trusted=()) == ("10.0.0.1", "http")


@pytest.mark.anyio
async def test_without_a_socket_address() -> None:
    assert (await seen_by_the_app(None, ["1.1.1.1"]))[0] == "unknown"
    assert (await seen_by_the_app("testclient", ["1.1.1.1"]))[0] == "testclient"


@pytest.mark.anyio
async def test_forwarded_proto_is_believed_from_trusted_proxies_only() -> None:
    assert await seen_by_the_app("10.0.0.1", proto="https") == ("10.0.0.1", "https")
    assert await seen_by_the_app("203.0.113.9", proto="https") == ("203.0.113.9", "http")


def test_trusted_proxies_are_parsed_once_by_the_settings() -> None:
    assert [str(network) for network in TRUSTED] == ["10.0.0.0/8", "192.0.2.10/32", "fd00::/8"]
    assert [str(n) for n in Settings.build(trusted_proxies="10.1.2.3/8").trusted_proxies] == [
        "10.0.0.0/8"
    ]


@pytest.mark.anyio
async def test_the_access_log_names_the_forwarded_client_from_a_trusted_proxy_only(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="embedserve.access")
    forged = {"X-Forwarded-For": "198.51.100.66, 1.1.1.1"}
    with anyio.fail_after(10):
        async with serve(trusted_proxies="10.0.0.0/8") as api:
            for peer, headers in [
                ("10.1.2.3", forged),
                ("203.0.113.50", forged),
                ("10.1.2.3", {"X-Forwarded-For": "1.1.1.1, \x1b[31mred"}),
            ]:
                transport = httpx.ASGITransport(app=api.app, client=(peer, 40000))
                async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                    assert (await client.get("/models", headers=headers)).status_code == 200
    clients = [r.client for r in caplog.records if r.name == "embedserve.access"]
    assert clients == ["1.1.1.1", "203.0.113.50", "\\x1b[31mred"]
