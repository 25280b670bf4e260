"""The client's address: the socket peer, or X-Forwarded-For when that peer is a trusted proxy.

`behind_proxies` puts uvicorn's `ProxyHeadersMiddleware` outermost, trusting TRUSTED_PROXIES
only: it reads the X-Forwarded-For chain from the right and puts the first address that is
not itself a trusted proxy into ``scope["client"]`` (what the client forged to its left is
ignored); it also believes such a proxy's X-Forwarded-Proto. Every later layer, the rate
limiter and the access log included, reads that one answer through `client_host`.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence
from typing import Any, cast

from starlette.types import ASGIApp, Scope
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def behind_proxies(app: ASGIApp, trusted: Sequence[IPNetwork]) -> ASGIApp:
    """`app` seeing the forwarded client when the peer is in `trusted`; `app` itself if empty."""
    if not trusted:
        return app
    hosts = [str(network) for network in trusted]
    # A dual-stack socket shows an IPv4 peer as ::ffff:a.b.c.d, which uvicorn compares as an
    # IPv6 address: each IPv4 network is trusted in that spelling too.
    hosts += [
        f"::ffff:{network.network_address}/{96 + network.prefixlen}"
        for network in trusted
        if network.version == 4
    ]
    # uvicorn types the ASGI messages with its own TypedDicts, Starlette as plain mappings.
    return cast(ASGIApp, ProxyHeadersMiddleware(cast(Any, app), trusted_hosts=hosts))


def client_host(scope: Scope) -> str:
    """The client's address (IPv4-mapped IPv6 as IPv4), or ``"unknown"`` when there is none."""
    client = scope.get("client")
    if not client:
        return "unknown"
    return _canonical(str(client[0]))


@functools.lru_cache(maxsize=4096)
def _canonical(host: str) -> str:
    """`host` in one spelling per address; what is not an address, as it is. Cached: a
    keep-alive connection sends many requests from one address."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)
