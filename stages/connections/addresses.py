"""The address gate: which addresses a tenant's source may resolve to.

Only globally routable addresses, unless the operator allows private ones: the host
is resolved once, every address it resolves to is checked (IPv6 forms that carry an
IPv4 address are judged by that address), and the first one is pinned as `hostaddr`
so libpq connects to exactly the address that was checked.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import Any

from stages.connections.pgurl import SourceURL
from stages.errors import PermanentError


class SourceAddressNotAllowed(PermanentError):
    """The source resolves to an address the service will not connect to."""


class SourceHostUnresolvable(PermanentError):
    """The source host name does not resolve to any address."""


Resolver = Callable[[str, int], list[str]]
AddressLookup = Callable[..., list[tuple[Any, ...]]]


def resolve(host: str, port: int, *, getaddrinfo: AddressLookup = socket.getaddrinfo) -> list[str]:
    """All addresses `host` resolves to (IPv4 and IPv6), in resolver order.

    Raises `SourceHostUnresolvable` when the name does not resolve. `getaddrinfo` is
    the lookup itself, passed in so tests can fail a lookup without asking a DNS server.
    """
    try:
        infos = getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise SourceHostUnresolvable(
            f"the source host {host!r} does not resolve ({err.strerror}); check the host name"
        ) from err
    seen: list[str] = []
    for info in infos:
        address = str(info[4][0])
        if address not in seen:
            seen.append(address)
    return seen


# -- the address gate --------------------------------------------------------------------
#
# An explicit table, because `ipaddress.is_global` differs between Python versions (3.11
# calls 100.100.100.200's neighbours 192.0.0.9 and 192.88.99.1, fec0::/10, 2002::/16 and
# 3fff::/20 global). It is consulted first, for the reason it gives; `is_global` then
# refuses whatever else Python's registry knows to be special. Most specific first.

_REFUSED_NETWORKS: tuple[tuple[str, str], ...] = (
    (
        "169.254.169.254/32",
        "a cloud metadata address (AWS, GCP, Azure, OpenStack instance metadata; in 169.254.0.0/16, link-local)",
    ),
    ("169.254.170.2/32", "a cloud metadata address (AWS ECS task metadata; in 169.254.0.0/16, link-local)"),
    (
        "100.100.100.200/32",
        "a cloud metadata address (Alibaba Cloud instance metadata; in 100.64.0.0/10, carrier-grade NAT)",
    ),
    ("168.63.129.16/32", "a cloud metadata address (Azure WireServer, 168.63.129.16/32)"),
    ("192.0.0.192/32", "a cloud metadata address (Oracle Cloud instance metadata; in 192.0.0.0/24)"),
    ("0.0.0.0/8", "a 'this network' address (0.0.0.0/8, RFC 1122), which reaches this host"),
    ("10.0.0.0/8", "a private address (10.0.0.0/8, RFC 1918)"),
    (
        "100.64.0.0/10",
        "a shared carrier-grade NAT address (100.64.0.0/10, RFC 6598), not reachable from the internet",
    ),
    ("127.0.0.0/8", "a loopback address (127.0.0.0/8)"),
    ("169.254.0.0/16", "a link-local address (169.254.0.0/16, RFC 3927)"),
    ("172.16.0.0/12", "a private address (172.16.0.0/12, RFC 1918)"),
    ("192.0.0.0/24", "an IETF protocol assignment address (192.0.0.0/24, RFC 6890)"),
    ("192.0.2.0/24", "a documentation address (192.0.2.0/24, RFC 5737)"),
    ("192.88.99.0/24", "a 6to4 relay anycast address (192.88.99.0/24, deprecated by RFC 7526)"),
    ("192.168.0.0/16", "a private address (192.168.0.0/16, RFC 1918)"),
    ("198.18.0.0/15", "a benchmarking address (198.18.0.0/15, RFC 2544)"),
    ("198.51.100.0/24", "a documentation address (198.51.100.0/24, RFC 5737)"),
    ("203.0.113.0/24", "a documentation address (203.0.113.0/24, RFC 5737)"),
    ("224.0.0.0/4", "a multicast address (224.0.0.0/4)"),
    ("240.0.0.0/4", "a reserved address (240.0.0.0/4, with the broadcast address)"),
    (
        "fd00:ec2::254/128",
        "a cloud metadata address (AWS instance metadata over IPv6; in fc00::/7, unique local)",
    ),
    ("::/128", "the unspecified address (::)"),
    ("::1/128", "a loopback address (::1)"),
    (
        "64:ff9b:1::/48",
        "a local-use NAT64 address (64:ff9b:1::/48, RFC 8215), which translates into a private network",
    ),
    ("100::/64", "a discard-only address (100::/64, RFC 6666)"),
    ("2001:db8::/32", "a documentation address (2001:db8::/32, RFC 3849)"),
    ("2001::/23", "an IETF protocol assignment address (2001::/23, RFC 2928)"),
    ("3fff::/20", "a documentation address (3fff::/20, RFC 9637)"),
    ("5f00::/16", "an SRv6 segment identifier (5f00::/16, RFC 9602)"),
    ("fc00::/7", "a unique local (private) address (fc00::/7, RFC 4193)"),
    ("fe80::/10", "a link-local address (fe80::/10)"),
    ("fec0::/10", "a site-local address (fec0::/10, deprecated by RFC 3879)"),
    ("ff00::/8", "a multicast address (ff00::/8)"),
)
_REFUSED = tuple((ipaddress.ip_network(net), why) for net, why in _REFUSED_NETWORKS)
_GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


def _table_problem(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    for network, why in _REFUSED:
        if ip.version == network.version and ip in network:
            return why
    return None


def _v4_problem(ip: ipaddress.IPv4Address) -> str | None:
    problem = _table_problem(ip)
    if problem is None and not ip.is_global:
        problem = "not a globally routable address"
    return problem


def _embedded(ip: ipaddress.IPv6Address) -> tuple[str, list[tuple[str, ipaddress.IPv4Address]]] | None:
    """The IPv4 addresses an IPv6 form carries, by the form's name, or None."""
    if ip.ipv4_mapped is not None:
        return "an IPv4-mapped address (::ffff:0:0/96)", [("", ip.ipv4_mapped)]
    if ip in _NAT64:
        return "a NAT64 address (64:ff9b::/96)", [("", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))]
    if ip.sixtofour is not None:
        return "a 6to4 address (2002::/16)", [("", ip.sixtofour)]
    if ip.teredo is not None:
        server, client = ip.teredo
        return "a Teredo address (2001::/32)", [("server ", server), ("client ", client)]
    if ip in _IPV4_COMPATIBLE and int(ip) > 1:
        return "an IPv4-compatible address (::/96)", [("", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))]
    return None


def address_problem(address: str) -> str | None:
    """Why connecting to `address` is not allowed for a public source, or None.

    The answer names the range and why it is refused. IPv6 forms that carry an IPv4
    address (mapped, NAT64, 6to4, Teredo, IPv4-compatible) are judged by it; of them
    only mapped and NAT64 (64:ff9b::/96) addresses of a public IPv4 are allowed: 6to4
    and IPv4-compatible are deprecated, Teredo is a client tunnel, never a server's.
    """
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv4Address):
        return _v4_problem(ip)
    ip = ipaddress.IPv6Address(ip.compressed.split("%", 1)[0])  # the zone does not matter
    problem = (
        _table_problem(ip) if ip in (ipaddress.IPv6Address("::"), ipaddress.IPv6Address("::1")) else None
    )
    if problem:
        return problem
    embedded = _embedded(ip)
    if embedded is not None:
        form, carried = embedded
        for role, v4 in carried:
            inner = _v4_problem(v4)
            if inner:
                return f"{form} of {role}{v4}, {inner}"
        if form.startswith("a 6to4"):
            return f"{form} of {carried[0][1]}; 6to4 is deprecated (RFC 7526): use the IPv4 address itself"
        if form.startswith("a Teredo"):
            return f"{form}, a client tunnel (RFC 4380), never a database server's address"
        if form.startswith("an IPv4-compatible"):
            return f"{form} of {carried[0][1]}, deprecated by RFC 4291: use the IPv4 address itself"
        return None
    problem = _table_problem(ip)
    if problem is None and ip not in _GLOBAL_UNICAST_V6:
        problem = "outside the IPv6 global unicast range (2000::/3)"
    if problem is None and not ip.is_global:
        problem = "not a globally routable address"
    return problem


def pin_address(source: SourceURL, *, allow_private: bool, resolver: Resolver = resolve) -> SourceURL:
    """Resolve the source host once, check every address, and pin the first as `hostaddr`.

    Pinning makes libpq connect to exactly the address that was checked, so a DNS
    answer that changes between check and connect (DNS rebinding) cannot redirect the
    connection; `host` stays for TLS verification and pg_hba matching. A name with
    any address that is not allowed is refused, whichever comes first: a public
    database has no business resolving to an internal address too.
    """
    addresses = resolver(source.host, source.port)
    if not addresses:
        raise SourceHostUnresolvable(f"the source host {source.host!r} does not resolve; check the host name")
    if not allow_private and (why := refused_addresses(addresses)):
        raise SourceAddressNotAllowed(
            f"the source host {source.host!r} {why}; "
            "imports connect only to publicly reachable databases. Use the database's "
            "public host name (an operator can allow private sources with "
            "CAPY_ALLOW_PRIVATE_SOURCES=true)"
        )
    return source.with_params(hostaddr=addresses[0])


def refused_addresses(addresses: list[str]) -> str | None:
    """Why a host that resolves to `addresses` is refused ("resolves to 10.0.0.5, a
    private address (one of its addresses: …)"), or None when every one is allowed:
    one address not allowed refuses the name, whichever comes first."""
    for address in addresses:
        problem = address_problem(address)
        if problem:
            among = f" (one of its addresses: {', '.join(addresses)})" if len(addresses) > 1 else ""
            return f"resolves to {address}, {problem}{among}"
    return None
