"""Who is asking: the client behind a request, for per-client shares (page sessions, bodies in flight).

The client is the peer address of the connection. Behind a reverse proxy every peer is the proxy, so
the operator names the proxies (`SAMHQ_TRUSTED_PROXIES`: addresses or networks, comma-separated); only
when the peer is one of them is `X-Forwarded-For` read, from the right, skipping the named proxies: the
first hop that is not one is the client (what a visitor writes into the header themselves is further
left and never reached). Nothing named: the header is ignored, so nobody can pick their own identity.

Every address is parsed and normalised (`client_key`) so one host cannot pass for many: an IPv4-mapped
IPv6 address is its IPv4 address, an IPv6 address stands for its /64 network (what one host or one
household is given), brackets and ports are stripped, and spellings (`09.9.9.4`, `2001:DB8::C`) that
are not one address are not trusted: a hop that does not parse stops the walk and the proxy's own
address is the client.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_proxies(spec: str | Iterable[str]) -> tuple[Network, ...]:
    """`"10.0.0.0/8, 127.0.0.1"` → networks; a malformed entry is an error at start-up, not a silent hole."""
    items = spec.split(",") if isinstance(spec, str) else spec
    networks = []
    for item in (part.strip() for part in items):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError as error:
            raise ValueError(f"SAMHQ_TRUSTED_PROXIES: {item!r} is not an address or a network") from error
    return tuple(networks)


class ClientIdentity:
    def __init__(self, trusted_proxies: str | Iterable[str] = ()):
        self.proxies = parse_proxies(trusted_proxies)

    @classmethod
    def from_env(cls) -> ClientIdentity:
        """The proxies the operator named (`SAMHQ_TRUSTED_PROXIES`, or `app.py --trusted-proxies`)."""
        return cls(os.environ.get("SAMHQ_TRUSTED_PROXIES", ""))

    def trusted(self, host: str | ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        address = host if isinstance(host, (ipaddress.IPv4Address, ipaddress.IPv6Address)) else _address(host)
        if address is None:
            return False
        return any(address in network for network in self.proxies)

    def of(self, scope) -> str:
        """The client of an ASGI request scope (see the module docstring), as `client_key` writes it."""
        peer = (scope.get("client") or ("unknown", 0))[0]
        peer_address = _address(peer)
        if not self.proxies or not self.trusted(peer_address):
            return client_key(peer)
        forwarded = b",".join(value for name, value in scope.get("headers") or () if name == b"x-forwarded-for")
        hops = [hop.strip() for hop in forwarded.decode("latin-1").split(",") if hop.strip()]
        for hop in reversed(hops):
            address = _address(hop)
            if address is None:
                return client_key(peer)  # a malformed hop: the proxy's own address is the most we know
            if not self.trusted(address):
                return _key(address)
        return client_key(peer)


def client_key(host: str | None) -> str:
    """The one name of a client address: IPv4 as written by `ipaddress`, IPv4-mapped IPv6 as its IPv4,
    other IPv6 as its /64 network; something that is not an address (a test client's name, a Unix
    socket) is kept as it is, since only the server itself puts it there."""
    address = _address(host)
    return _key(address) if address is not None else str(host)


def _key(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def _address(hop: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address in one hop (`1.2.3.4`, `1.2.3.4:5678`, `[::1]:80`, `::1`, `::ffff:1.2.3.4`), else None.

    IPv4-mapped IPv6 becomes its IPv4 address; a zone (`fe80::1%eth0`) is dropped; anything `ipaddress`
    does not read (`09.9.9.4`, `junk1`, an unclosed bracket) is None."""
    if not isinstance(hop, str):
        return None
    hop = hop.strip()
    if hop.startswith("["):
        end = hop.find("]")
        if end < 0 or (hop[end + 1 :] and not _port(hop[end + 1 :])):
            return None
        hop = hop[1:end]
    elif hop.count(":") == 1:
        hop, port = hop.split(":", 1)
        if not _port(":" + port):
            return None
    try:
        address = ipaddress.ip_address(hop)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.scope_id:
            address = ipaddress.IPv6Address(hop.split("%", 1)[0])
    return address


def _port(text: str) -> bool:
    """`:443` after an address: a colon and 1-5 digits (nothing else may follow an address in a hop)."""
    return text.startswith(":") and text[1:].isascii() and text[1:].isdigit() and 0 < len(text) - 1 <= 5
