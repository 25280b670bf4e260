"""The client address: X-Forwarded-For believed only from trusted proxies, read from the right."""

from __future__ import annotations

import pytest

from embedserve.http.middleware.client_addr import client_address, parse_address, parse_networks

TRUSTED = parse_networks(["10.0.0.0/8", "192.0.2.10", "fd00::/8"])


def scope(peer: str | None, *forwarded: str) -> dict[str, object]:
    headers = [(b"x-forwarded-for", value.encode()) for value in forwarded]
    return {"type": "http", "client": (peer, 1234) if peer else None, "headers": headers}


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
        # Garbage stops the walk at the last hop a trusted proxy vouched for.
        ("10.0.0.1", ["1.1.1.1, unknown"], "10.0.0.1"),
        ("10.0.0.1", ["unknown, 10.2.2.2"], "10.2.2.2"),
        # Ports, brackets, IPv6, IPv4-mapped peers.
        ("10.0.0.1", ["1.1.1.1:5555"], "1.1.1.1"),
        ("10.0.0.1", ["[2001:db8::1]:443"], "2001:db8::1"),
        ("fd00::1", ["2001:db8::7"], "2001:db8::7"),
        ("::ffff:10.0.0.1", ["1.1.1.1"], "1.1.1.1"),
        ("::ffff:203.0.113.9", ["1.1.1.1"], "203.0.113.9"),
    ],
)
def test_client_address(peer: str, forwarded: list[str], expected: str) -> None:
    assert client_address(scope(peer, *forwarded), TRUSTED) == expected


def test_no_trusted_proxies_means_the_peer_always() -> None:
    assert client_address(scope("10.0.0.1", "1.1.1.1")) == "10.0.0.1"


def test_without_a_socket_address() -> None:
    assert client_address(scope(None, "1.1.1.1"), TRUSTED) == "unknown"
    assert client_address(scope("testclient", "1.1.1.1"), TRUSTED) == "testclient"


def test_parse_address_refuses_what_is_not_an_address() -> None:
    assert parse_address("example.com") is None
    assert parse_address("") is None
    assert str(parse_address(" 1.2.3.4 ")) == "1.2.3.4"


def test_parse_networks_names_the_bad_entry() -> None:
    with pytest.raises(ValueError, match="not-a-net"):
        parse_networks(["10.0.0.0/8", "not-a-net"])
