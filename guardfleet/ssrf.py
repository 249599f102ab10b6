"""Refuse callback URLs that would make the service call into private networks (SSRF).

A URL passes when it is http(s) and *every* address its host resolves to is public
(`ipaddress.is_global`, with IPv4-mapped IPv6 unwrapped): no loopback, private, link-local (so
no cloud metadata at 169.254.169.254), shared, reserved or multicast ranges. The operator's
allow-list (hostnames, IP addresses, CIDR ranges) overrides that. Delivery checks again and then
connects to the address it checked, so a DNS answer that changes in between cannot slip through.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]


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
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _unwrap(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


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
    port = port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        addresses = [ipaddress.ip_address(a.split("%")[0]) for a in resolver(host, port)]
    if not addresses:
        raise UnsafeURL(f"host {host!r} has no address")
    host_allowed = allow.allows_host(host)
    for address in map(_unwrap, addresses):
        if host_allowed or allow.allows_address(address):
            continue
        if not address.is_global or address.is_multicast:
            raise UnsafeURL(
                f"callback host {host!r} resolves to {address}, which is not a public address "
                "(allow it with GUARDFLEET_WEBHOOK_ALLOW)"
            )
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return CheckedURL(url, parts.scheme, host, port, path, _unwrap(addresses[0]))
