"""The SSRF guard. DNS is replaced by a fixed table only where a name must resolve to a private
address; everything else (literals, `localhost`) goes through the real resolver."""

from __future__ import annotations

import ipaddress
import re

import pytest

from guardfleet.ssrf import AllowList, UnsafeURL, check_url

NO_ALLOW = AllowList([])


def table(host: str, port: int) -> list[str]:
    return {
        "internal.example": ["10.0.0.5"],
        "mixed.example": ["93.184.216.34", "192.168.0.9"],
        "public.example": ["93.184.216.34", "2606:2800:220:1::1"],
    }[host]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:8080/hook", "127.0.0.1"),
        ("http://localhost/hook", "127.0.0.1"),
        ("http://10.1.2.3/hook", "10.1.2.3"),
        ("http://172.16.0.1/", "172.16.0.1"),
        ("http://192.168.1.10/", "192.168.1.10"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),  # cloud metadata
        ("http://100.64.0.1/", "100.64.0.1"),  # carrier-grade NAT
        ("http://0.0.0.0/", "0.0.0.0"),
        ("http://[::1]/", "::1"),
        ("http://[fe80::1]/", "fe80::1"),
        ("http://[fd00::1]/", "fd00::1"),
        ("http://[::ffff:127.0.0.1]/", "127.0.0.1"),  # IPv4-mapped IPv6 is unwrapped
        ("http://224.0.0.1/", "224.0.0.1"),
    ],
)
def test_non_public_addresses_are_refused(url: str, reason: str) -> None:
    with pytest.raises(UnsafeURL, match=re.escape(f"resolves to {reason}, which is not a public")):
        check_url(url, NO_ALLOW)


def test_a_name_resolving_to_a_private_address_is_refused() -> None:
    with pytest.raises(UnsafeURL, match=re.escape("'internal.example' resolves to 10.0.0.5")):
        check_url("https://internal.example/hook", NO_ALLOW, table)


def test_every_address_must_be_public_not_just_the_first() -> None:
    with pytest.raises(UnsafeURL, match=re.escape("192.168.0.9")):
        check_url("https://mixed.example/hook", NO_ALLOW, table)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/x", "http or https"),
        ("file:///etc/passwd", "http or https"),
        ("http:///nohost", "no host"),
        ("http://user:pw@example.com/", "credentials"),
        ("http://example.com:99999/", "not a valid URL"),
    ],
)
def test_malformed_or_wrong_scheme(url: str, message: str) -> None:
    with pytest.raises(UnsafeURL, match=message):
        check_url(url, NO_ALLOW, table)


def test_public_addresses_pass_and_the_checked_address_is_kept() -> None:
    checked = check_url("https://public.example:8443/hooks?a=1", NO_ALLOW, table)
    assert checked.address == ipaddress.ip_address("93.184.216.34")
    assert (checked.host, checked.port, checked.path) == ("public.example", 8443, "/hooks?a=1")
    assert check_url("http://8.8.8.8/", NO_ALLOW).port == 80


@pytest.mark.parametrize("entry", ["127.0.0.1", "127.0.0.0/8", "localhost", "LOCALHOST."])
def test_the_allow_list_admits_loopback(entry: str) -> None:
    checked = check_url("http://localhost:9000/hook", AllowList([entry]))
    assert checked.address.is_loopback


def test_the_allow_list_is_narrow() -> None:
    allow = AllowList(["10.0.0.0/24"])
    assert check_url("http://10.0.0.7/", allow).address == ipaddress.ip_address("10.0.0.7")
    with pytest.raises(UnsafeURL):
        check_url("http://10.0.1.7/", allow)
    with pytest.raises(UnsafeURL):
        check_url("http://127.0.0.1/", allow)
