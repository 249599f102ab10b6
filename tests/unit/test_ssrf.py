"""The SSRF guard. Names resolve through a fixed table, never this machine's DNS or /etc/hosts,
so the verdicts do not depend on where the tests run; literals need no resolver."""

from __future__ import annotations

import ipaddress
import re

import pytest

from guardfleet.ssrf import AllowList, UnsafeURL, check_url, resolve

NO_ALLOW = AllowList([])


TABLE = {
    "localhost": ["127.0.0.1", "::1"],
    "internal.example": ["10.0.0.5"],
    "mixed.example": ["93.184.216.34", "192.168.0.9"],
    "public.example": ["93.184.216.34", "2606:2800:220:1::1"],
    "nat64.example": ["64:ff9b::a00:5"],
}


def table(host: str, port: int) -> list[str]:
    if host not in TABLE:
        raise UnsafeURL(f"host {host!r} does not resolve")
    return TABLE[host]


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
        # IPv6 forms that carry an IPv4 address a translator or tunnel will deliver to:
        ("http://[::127.0.0.1]/", "::7f00:1"),  # IPv4-compatible (deprecated)
        ("http://[::10.0.0.1]/", "::a00:1"),
        ("http://[::ffff:0:7f00:1]/", "::ffff:0:7f00:1 (which carries 127.0.0.1)"),  # SIIT
        ("http://[64:ff9b::7f00:1]/", "64:ff9b::7f00:1 (which carries 127.0.0.1)"),  # NAT64
        ("http://[64:ff9b::169.254.169.254]/", "64:ff9b::a9fe:a9fe (which carries 169.254"),
        ("http://[64:ff9b:1::5db8:d822]/", "64:ff9b:1::5db8:d822 (a local-use NAT64"),
        ("http://[2002:7f00:1::]/", "2002:7f00:1:: (which carries 127.0.0.1)"),  # 6to4
        ("http://[2002:c0a8:101::1]/", "2002:c0a8:101::1 (which carries 192.168.1.1)"),
        ("http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", "2001:0:4136:e378"),  # Teredo
    ],
)
def test_non_public_addresses_are_refused(url: str, reason: str) -> None:
    with pytest.raises(UnsafeURL, match=re.escape(f"resolves to {reason}")):
        check_url(url, NO_ALLOW, table)


def test_a_name_resolving_to_an_ipv6_form_of_a_private_address_is_refused() -> None:
    with pytest.raises(UnsafeURL, match=re.escape("which carries 10.0.0.5")):
        check_url("https://nat64.example/hook", NO_ALLOW, table)


def test_ipv6_forms_of_public_ipv4_addresses_pass() -> None:
    for literal in ("64:ff9b::5db8:d822", "2002:5db8:d822::1"):  # 93.184.216.34 inside
        checked = check_url(f"http://[{literal}]/", NO_ALLOW, table)
        assert checked.address == ipaddress.ip_address(literal)


@pytest.mark.parametrize(
    "url",
    [
        "http://" + "a" * 64 + ".example/",
        "https://" + "a" * 300 + "/",
        "http://" + ".".join(["a" * 60] * 5) + "/",  # every label fits, the name does not
        "http://a..example/",
    ],
)
def test_invalid_host_names_are_refused_not_crashed_on(url: str) -> None:
    with pytest.raises(UnsafeURL, match=r"host name|label"):
        check_url(url, NO_ALLOW)  # the real resolver: it must never be reached


def test_the_real_resolver_turns_an_unencodable_name_into_unsafe_url() -> None:
    with pytest.raises(UnsafeURL, match="not a valid host name"):
        resolve("a" * 64 + ".example", 80)


@pytest.mark.parametrize("port", [0, 25, 22, 6667])
def test_ports_of_other_protocols_are_refused_even_when_allowed(port: int) -> None:
    with pytest.raises(UnsafeURL, match=f"port {port} may not be called"):
        check_url(f"http://93.184.216.34:{port}/", AllowList(["93.184.216.34"]), table)


@pytest.mark.parametrize("port", [80, 443, 8080, 8443, 9000])
def test_ordinary_ports_pass(port: int) -> None:
    assert check_url(f"http://93.184.216.34:{port}/", NO_ALLOW, table).port == port


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
    assert check_url("http://8.8.8.8/", NO_ALLOW, table).port == 80


@pytest.mark.parametrize(
    "entries", [["127.0.0.1", "::1"], ["127.0.0.0/8", "::1/128"], ["localhost"], ["LOCALHOST."]]
)
def test_the_allow_list_admits_loopback(entries: list[str]) -> None:
    checked = check_url("http://localhost:9000/hook", AllowList(entries), table)
    assert checked.address.is_loopback


def test_the_allow_list_is_narrow() -> None:
    allow = AllowList(["10.0.0.0/24"])
    assert check_url("http://10.0.0.7/", allow, table).address == ipaddress.ip_address("10.0.0.7")
    with pytest.raises(UnsafeURL):
        check_url("http://10.0.1.7/", allow, table)
    with pytest.raises(UnsafeURL):
        check_url("http://127.0.0.1/", allow, table)
    with pytest.raises(UnsafeURL):  # every address of the name counts: ::1 is not allowed
        check_url("http://localhost/", AllowList(["127.0.0.0/8"]), table)
