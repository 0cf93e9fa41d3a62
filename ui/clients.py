"""Who is asking: the client a page session belongs to, for per-client shares.

The client is the peer address of the connection. Behind a reverse proxy every peer is the proxy, so
the operator names the proxies (`SAMHQ_TRUSTED_PROXIES`: addresses or networks, comma-separated); only
when the peer is one of them is `X-Forwarded-For` read, from the right, skipping the named proxies: the
first hop that is not one is the client (what a visitor writes into the header themselves is further
left and never reached). Nothing named: the header is ignored, so nobody can pick their own identity.
"""

from __future__ import annotations

import ipaddress
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

    def trusted(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self.proxies)

    def of(self, scope) -> str:
        """The client of an ASGI request scope (see the module docstring)."""
        peer = (scope.get("client") or ("unknown", 0))[0]
        if not self.proxies or not self.trusted(peer):
            return peer
        forwarded = b",".join(value for name, value in scope.get("headers") or () if name == b"x-forwarded-for")
        hops = [hop.strip() for hop in forwarded.decode("latin-1").split(",") if hop.strip()]
        for hop in reversed(hops):
            host = _host(hop)
            if host is None:
                return peer  # a malformed hop: the proxy's own address is the most we know
            if not self.trusted(host):
                return host
        return peer


def _host(hop: str) -> str | None:
    """An address from one X-Forwarded-For hop (`1.2.3.4`, `1.2.3.4:5678`, `[::1]:80`, `::1`), else None."""
    if hop.startswith("["):
        hop = hop[1 : hop.find("]")] if "]" in hop else ""
    elif hop.count(":") == 1:
        hop = hop.split(":", 1)[0]
    try:
        return str(ipaddress.ip_address(hop))
    except ValueError:
        return None
