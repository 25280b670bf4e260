"""The client's address: the socket peer, or X-Forwarded-For when that peer is a trusted proxy.

Forwarded headers are written by whoever sent the request, so they are believed only when
the direct peer is in TRUSTED_PROXIES. Each proxy appends the address it saw, so the chain
is read from the right: the first address that is not itself a trusted proxy is the client.
Anything to its left was supplied by the client and is ignored.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence

from starlette.types import Scope

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(items: Iterable[str]) -> tuple[IPNetwork, ...]:
    """IPs or CIDRs as networks (a bare IP is a /32 or /128). Raises ValueError naming one."""
    return tuple(ipaddress.ip_network(item.strip(), strict=False) for item in items)


def parse_address(text: str) -> IPAddress | None:
    """An address from a header or socket (``1.2.3.4:80`` and ``[::1]:80`` too); None if not one.

    IPv4-mapped IPv6 addresses (``::ffff:10.0.0.1``, from dual-stack sockets) become IPv4,
    so one TRUSTED_PROXIES entry matches both spellings.
    """
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_address(scope: Scope, trusted: Sequence[IPNetwork] = ()) -> str:
    """The client's address for this request, or ``"unknown"`` when the server has none."""
    client = scope.get("client")
    if not client:
        return "unknown"
    peer, shown = _peer(str(client[0]))
    if peer is None or not _is_trusted(peer, trusted):
        return shown
    chosen = peer
    for hop in reversed(_forwarded_for(scope)):
        address = parse_address(hop)
        if address is None:
            break  # a trusted proxy would not write this: stop at the last hop we can vouch for
        chosen = address
        if not _is_trusted(address, trusted):
            break
    return str(chosen)


@functools.lru_cache(maxsize=4096)
def _peer(host: str) -> tuple[IPAddress | None, str]:
    """The socket peer parsed, and as logged. Cached: a keep-alive connection sends many
    requests from one address, and parsing it is most of this module's time."""
    address = parse_address(host)
    return address, host if address is None else str(address)


def _is_trusted(address: IPAddress, trusted: Sequence[IPNetwork]) -> bool:
    return any(address in network for network in trusted)


def _forwarded_for(scope: Scope) -> list[str]:
    """Every X-Forwarded-For entry, left to right, across repeated headers."""
    hops: list[str] = []
    for key, value in scope.get("headers", []):
        if key == b"x-forwarded-for":
            hops.extend(part for part in value.decode("latin-1").split(",") if part.strip())
    return hops
