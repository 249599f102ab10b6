"""Refuse callback URLs that would make the service call into private networks (SSRF).

A URL passes when it is http(s), its port is not one browsers refuse, its host name is valid, and
*every* address its host resolves to is public (`ipaddress.is_global`): no loopback, private,
link-local (so no cloud metadata at 169.254.169.254), shared, reserved or multicast ranges. An
IPv6 address that carries an IPv4 address (IPv4-mapped, -compatible or -translated, NAT64, 6to4,
Teredo) is public only if the IPv4 address inside it is too, because a gateway will deliver to
that IPv4 address. The operator's allow-list (hostnames, IP addresses, CIDR ranges) overrides
the address rules, never the port rule. Delivery checks again and then connects to the address
it checked, so a DNS answer that changes in between cannot slip through.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]

# The ports the Fetch standard makes browsers refuse (https://fetch.spec.whatwg.org/#bad-port),
# plus 0. A callback body carries client-chosen text (`metadata`), so a POST to a mail, IRC or
# similar line-based service on a public host could be read as that protocol's commands. Every
# other port is allowed: receivers commonly listen on 8080, 8443 and the like, and the address
# rules above already keep private services out of reach.
BAD_PORTS = frozenset(
    {0, 1, 7, 9, 11, 13, 15, 17, 19, 20, 21, 22, 23, 25, 37, 42, 43, 53, 69, 77, 79, 87, 95}
    | {101, 102, 103, 104, 109, 110, 111, 113, 115, 117, 119, 123, 135, 137, 139, 143, 161}
    | {179, 389, 427, 465, 512, 513, 514, 515, 526, 530, 531, 532, 540, 548, 554, 556, 563}
    | {587, 601, 636, 989, 990, 993, 995, 1719, 1720, 1723, 2049, 3659, 4045, 4190, 5060}
    | {5061, 6000, 6566, 6665, 6666, 6667, 6668, 6669, 6679, 6697, 10080}
)

_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")  # deprecated ::a.b.c.d (RFC 4291 2.5.5.1)
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")  # SIIT ::ffff:0:a.b.c.d (RFC 2765)
_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052: the IPv4 is the last 32 bits
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215, where the IPv4 sits varies


class UnsafeURL(ValueError):
    """The URL may not be called; the message says why."""


@dataclass(frozen=True)
class CheckedURL:
    url: str
    scheme: str
    host: str
    port: int
    path: str  # path and query, as sent in the request line
    address: IPAddress  # the checked address to connect to


def resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UnsafeURL(f"host {host!r} does not resolve: {exc.strerror}") from None
    except UnicodeError as exc:  # the IDNA codec refusing the name
        raise UnsafeURL(f"host {host!r} is not a valid host name: {exc}") from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _check_host_name(host: str) -> None:
    """Refuse names DNS cannot carry (a label over 63 octets, a name over 253) before they reach
    the resolver, whose IDNA codec would raise UnicodeError instead."""
    try:
        ascii_name = host.rstrip(".").encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise UnsafeURL(f"host {host[:80]!r} is not a valid host name: {exc}") from None
    if len(ascii_name) > 253:
        raise UnsafeURL(f"host name is {len(ascii_name)} characters; at most 253")
    for label in ascii_name.split("."):
        if not 1 <= len(label) <= 63:
            raise UnsafeURL(f"host {host[:80]!r} has a label of {len(label)} characters (1-63)")


def _unwrap(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address is the IPv4 address itself (the kernel connects over IPv4)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def embedded_ipv4(address: IPAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address routes to through a translator or tunnel."""
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    low32 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    found: list[ipaddress.IPv4Address] = []
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    if address in _IPV4_COMPATIBLE and int(address) > 1:  # not :: or ::1
        found.append(low32)
    if address in _NAT64_WELL_KNOWN or address in _IPV4_TRANSLATED:
        found.append(low32)
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)  # (server, client): both are reached through it
    return found


class AllowList:
    def __init__(self, entries: Sequence[str]) -> None:
        self.hosts: set[str] = set()
        self.networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in entries:
            try:
                self.networks.append(ipaddress.ip_network(entry.strip(), strict=False))
            except ValueError:
                self.hosts.add(entry.strip().lower().rstrip("."))

    def allows_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts

    def allows_address(self, address: IPAddress) -> bool:
        return any(address in net for net in self.networks if net.version == address.version)


def _refusal(address: IPAddress, allow: AllowList) -> str | None:
    """Why `address` may not be called, or None if it may."""
    if allow.allows_address(address):
        return None
    if not address.is_global or address.is_multicast:
        return f"{address}"
    if address in _NAT64_LOCAL:
        # Not globally routable (RFC 8215) and its IPv4 position depends on local configuration.
        return f"{address} (a local-use NAT64 address)"
    for inner in embedded_ipv4(address):
        if not allow.allows_address(inner) and (not inner.is_global or inner.is_multicast):
            return f"{address} (which carries {inner})"
    return None


def check_url(url: str, allow: AllowList, resolver: Resolver = resolve) -> CheckedURL:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeURL(f"not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise UnsafeURL("callback URLs must use http or https")
    host = parts.hostname
    if not host:
        raise UnsafeURL("callback URL has no host")
    if parts.username or parts.password:
        raise UnsafeURL("callback URLs must not carry credentials")
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    if port in BAD_PORTS:
        raise UnsafeURL(f"port {port} may not be called (it serves a non-HTTP protocol)")
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        _check_host_name(host)
        addresses = [ipaddress.ip_address(a.split("%")[0]) for a in resolver(host, port)]
    if not addresses:
        raise UnsafeURL(f"host {host!r} has no address")
    if not allow.allows_host(host):
        for address in map(_unwrap, addresses):
            reason = _refusal(address, allow)
            if reason is not None:
                raise UnsafeURL(
                    f"callback host {host!r} resolves to {reason}, which is not a public address "
                    "(allow it with GUARDFLEET_WEBHOOK_ALLOW)"
                )
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return CheckedURL(url, parts.scheme, host, port, path, _unwrap(addresses[0]))
