"""The upstream URL policy (aimesh_tasks/registry/url_policy.py): pure, no server and no DNS
(a resolver is injected; one test resolves 'localhost' through the real getaddrinfo)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

import pytest

from aimesh_tasks.errors import InvalidInput
from aimesh_tasks.registry.url_policy import (
    Resolver,
    UpstreamURLRefused,
    check_upstream_url,
    classify,
    parse_ip_literal,
    resolve_upstream,
)


def resolver(table: dict[str, list[str]]) -> tuple[list[tuple[str, int]], Resolver]:
    """A resolver answering from `table` (unknown names fail as getaddrinfo does), and the
    list of the look-ups it was asked for."""
    asked: list[tuple[str, int]] = []

    def resolve(host: str, port: int) -> Iterable[str]:
        asked.append((host, port))
        if host not in table:
            raise OSError(f"[Errno -2] Name or service not known: {host}")
        return table[host]

    return asked, resolve


PUBLIC = {"api.example.com": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]}


def refused(url: str, allow_private: bool | list[str] = False,
            table: dict[str, list[str]] | None = None) -> UpstreamURLRefused:
    _, resolve = resolver(table or PUBLIC)
    with pytest.raises(UpstreamURLRefused) as caught:
        check_upstream_url(url, allow_private=allow_private, resolver=resolve)
    assert caught.value.fields["field"] == "url"
    return caught.value


# --- what passes -------------------------------------------------------------------------


def test_a_public_https_url_passes_with_every_address_it_resolves_to() -> None:
    asked, resolve = resolver(PUBLIC)
    target = resolve_upstream("https://api.example.com/v1", allow_private=False,
                              resolver=resolve)
    assert asked == [("api.example.com", 443)]
    assert (target.scheme, target.host, target.port) == ("https", "api.example.com", 443)
    assert [str(a) for a in target.addresses] == PUBLIC["api.example.com"]
    assert resolve_upstream("HTTP://93.184.216.34:8080", allow_private=False).port == 8080


def test_a_literal_public_address_is_not_resolved() -> None:
    asked, resolve = resolver({})
    check_upstream_url("http://93.184.216.34", allow_private=False,
                       resolver=resolve)
    check_upstream_url("http://[2606:4700::1111]/", allow_private=False,
                       resolver=resolve)
    assert asked == []


# --- scheme, credentials, characters -----------------------------------------------------


@pytest.mark.parametrize("url", ["ftp://api.example.com", "file:///etc/passwd",
                                 "gopher://127.0.0.1:6379/_INFO", "api.example.com/v1",
                                 "//api.example.com", "javascript:alert(1)"])
def test_only_http_and_https_are_allowed(url: str) -> None:
    assert refused(url).reason == "scheme"


@pytest.mark.parametrize("url", ["https://user:hunter2@api.example.com",
                                 "https://hunter2@api.example.com",
                                 "https://:hunter2@api.example.com",
                                 "http://@api.example.com",
                                 "http://api.example.com:80@169.254.169.254/"])
def test_credentials_in_the_url_are_refused_and_never_repeated(url: str) -> None:
    error = refused(url)
    assert error.reason == "credentials"
    assert "hunter2" not in str(error) and "hunter2" not in repr(error.to_dict())
    assert "api-key-env" in str(error)


@pytest.mark.parametrize("url", ["http://api.exa mple.com", "http://api.example.com\t/",
                                 "http://169.254.169.254\n.example.com",
                                 "http://api.example.com\\@169.254.169.254/",
                                 "http://api.example.com\x00"])
def test_whitespace_control_characters_and_backslashes_are_refused(url: str) -> None:
    # urlsplit silently drops tabs and newlines; another parser reads a backslash as '/':
    # refusing them keeps this check and the HTTP client reading the same host.
    assert refused(url).reason == "characters"


@pytest.mark.parametrize("url,reason", [("http://", "host"), ("http:///v1", "host"),
                                        ("http://[::1", "host"),
                                        ("http://api.example.com:99999", "port"),
                                        ("http://api.example.com:http", "port")])
def test_a_url_without_a_readable_host_or_port_is_refused(url: str, reason: str) -> None:
    assert refused(url).reason == reason


# --- metadata and link-local: never, whatever is allowed ---------------------------------


METADATA_FORMS = [
    "http://169.254.169.254/latest/meta-data/",
    "http://2852039166/",                       # decimal integer
    "http://0xa9fea9fe/",                       # hex integer
    "http://0xA9FEA9FE/",
    "http://025177524776/",                     # octal integer
    "http://0251.0376.0251.0376/",              # octal parts
    "http://0xa9.0xfe.0xa9.0xfe/",              # hex parts
    "http://169.254.0xa9.254/",                 # mixed
    "http://169.254.43518/",                    # a.b.c: c fills 16 bits
    "http://169.16689662/",                     # a.b: b fills 24 bits
    "http://0169.254.169.254/",                 # not octal: leading 0 then '9' is a name
    "http://169.254.169.254./",                 # absolute (trailing dot)
    "http://[::ffff:169.254.169.254]/",         # IPv4-mapped IPv6
    "http://[::ffff:a9fe:a9fe]/",
    "http://[0:0:0:0:0:ffff:169.254.169.254]/",
    "http://[::169.254.169.254]/",              # IPv4-compatible IPv6
    "http://[64:ff9b::a9fe:a9fe]/",             # NAT64
    "http://[2002:a9fe:a9fe::1]/",              # 6to4
    "http://[fd00:ec2::254]/",                  # AWS IPv6 metadata
    "http://100.100.100.200/",                  # Alibaba
    "http://192.0.0.192/",                      # Oracle
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://metadata.google.internal./",
]


@pytest.mark.parametrize("url", METADATA_FORMS)
def test_every_spelling_of_a_metadata_address_is_refused_even_with_private_allowed(
        url: str) -> None:
    if url == "http://0169.254.169.254/":
        # inet_aton refuses '0169' (9 is no octal digit), so this is a hostname: it is
        # resolved, and refused for the address it resolves to.
        table = {"0169.254.169.254": ["169.254.169.254"]}
        assert parse_ip_literal("0169.254.169.254") is None
    else:
        table = PUBLIC
    for allow in (False, True, ["0.0.0.0/0", "::/0"]):
        error = refused(url, allow, table)
        assert error.reason == "metadata", (url, allow, error)
    assert "169.254.169.254" in str(refused("http://0xa9fea9fe/")), "names the real address"


@pytest.mark.parametrize("url", ["http://169.254.1.1/", "http://2851995905/",
                                 "http://[fe80::1]/", "http://[fe80::1%25eth0]/",
                                 "http://[::ffff:169.254.1.1]/"])
def test_link_local_is_refused_even_when_listed(url: str) -> None:
    for allow in (False, True, ["169.254.0.0/16", "fe80::/10"]):
        assert refused(url, allow).reason == "link_local"


@pytest.mark.parametrize("url", ["http://0.0.0.0:6379/", "http://0/", "http://[::]/",
                                 "http://0.1.2.3/", "http://224.0.0.1/",
                                 "http://255.255.255.255/", "http://240.0.0.1/",
                                 "http://[ff02::1]/", "http://[::ffff:0.0.0.0]/"])
def test_addresses_one_cannot_call_are_refused(url: str) -> None:
    # 0.0.0.0 reaches the local host on Linux: refused like any non-unicast address.
    for allow in (False, True):
        assert refused(url, allow).reason == "not_unicast"


# --- loopback and private: only when allowed --------------------------------------------


LOOPBACK_FORMS = ["http://127.0.0.1:6379/", "http://127.1/", "http://2130706433/",
                  "http://0x7f000001/", "http://017700000001/", "http://127.0.0.1./",
                  "http://[::1]/", "http://[::ffff:127.0.0.1]/", "http://[::ffff:7f00:1]/"]


@pytest.mark.parametrize("url", LOOPBACK_FORMS)
def test_loopback_in_any_spelling_is_refused_unless_allowed(url: str) -> None:
    error = refused(url)
    assert error.reason == "loopback"
    assert "allowed private networks" in str(error)
    check_upstream_url(url, allow_private=True)
    check_upstream_url(url, allow_private=["127.0.0.0/8", "::1/128"])
    assert refused(url, ["10.0.0.0/8"]).reason == "loopback"


@pytest.mark.parametrize("url,network", [
    ("http://10.1.2.3/", "10.0.0.0/8"), ("http://172.16.0.9/", "172.16.0.0/12"),
    ("http://192.168.1.10/", "192.168.0.0/16"), ("http://[fd12:3456::1]/", "fc00::/7"),
    ("http://100.64.0.1/", "100.64.0.0/10"), ("http://3232235786/", "192.168.1.0/24"),
    ("http://[::ffff:10.1.2.3]/", "10.1.0.0/16")])
def test_private_ranges_need_their_network_listed(url: str, network: str) -> None:
    assert refused(url).reason == "private"
    check_upstream_url(url, allow_private=True)
    check_upstream_url(url, allow_private=[network])
    assert refused(url, ["203.0.113.0/24", "fd99::/16"]).reason == "private"


def test_a_single_listed_address_allows_that_address_only() -> None:
    check_upstream_url("http://127.0.0.1:8000", allow_private=["127.0.0.1"])
    assert refused("http://127.0.0.2:8000", ["127.0.0.1"]).reason == "loopback"
    check_upstream_url("http://10.0.0.5", allow_private=[ipaddress.ip_network("10.0.0.0/24")])


def test_a_bad_allow_list_is_refused_naming_the_entry() -> None:
    with pytest.raises(InvalidInput) as caught:
        check_upstream_url("http://10.0.0.1", allow_private=["10.0.0.0/8", "ten"])
    assert caught.value.field == "allow_private" and "'ten'" in str(caught.value)
    with pytest.raises(InvalidInput):
        check_upstream_url("http://10.0.0.1", allow_private="10.0.0.0/8")


# --- hostnames: resolved once, every address judged -------------------------------------


def test_a_hostname_resolving_to_a_forbidden_address_is_refused() -> None:
    table = {"evil.example": ["169.254.169.254"], "mixed.example": ["93.184.216.34", "10.0.0.7"],
             "redis.example": ["127.0.0.1"], "mapped.example": ["::ffff:169.254.169.254"]}
    assert refused("http://evil.example/", True, table).reason == "metadata"
    error = refused("http://mixed.example/", False, table)
    assert error.reason == "private" and error.fields["address"] == "10.0.0.7"
    assert refused("http://redis.example:6379/", False, table).reason == "loopback"
    assert refused("http://mapped.example/", True, table).reason == "metadata"
    asked, resolve = resolver(table)
    check_upstream_url("http://mixed.example/", allow_private=["10.0.0.0/8"],
                       resolver=resolve)
    assert asked == [("mixed.example", 80)], "resolved once"


def test_a_hostname_that_does_not_resolve_is_refused() -> None:
    error = refused("https://nowhere.invalid/")
    assert error.reason == "unresolvable" and "nowhere.invalid" in str(error)
    assert refused("https://empty.example/", False, {"empty.example": []}).reason == \
        "unresolvable"


def test_localhost_through_the_real_resolver_is_loopback() -> None:
    with pytest.raises(UpstreamURLRefused) as caught:
        check_upstream_url("http://localhost:6379/", allow_private=False)
    assert caught.value.reason == "loopback"
    target = resolve_upstream("http://localhost:8000", allow_private=["127.0.0.0/8", "::1"])
    assert target.addresses and all(a.is_loopback for a in target.addresses)


# --- the pieces --------------------------------------------------------------------------


@pytest.mark.parametrize("host,address", [
    ("1.2.3.4", "1.2.3.4"), ("0x01020304", "1.2.3.4"), ("16909060", "1.2.3.4"),
    ("1.2.772", "1.2.3.4"), ("1.131844", "1.2.3.4"), ("01.02.03.04", "1.2.3.4"),
    ("0x1.0x2.0x3.0x4", "1.2.3.4"), ("[::1]", "::1"), ("::1", "::1"), ("0", "0.0.0.0"),
    ("0x", "0.0.0.0")])
def test_ip_literals_are_read_as_inet_aton_reads_them(host: str, address: str) -> None:
    assert parse_ip_literal(host) == ipaddress.ip_address(address)


@pytest.mark.parametrize("host", ["api.example.com", "1.2.3.4.5", "256.1.1.1", "1.2.3.256",
                                  "4294967296", "1.16777216", "08.1.1.1", "1e3",
                                  "[nonsense]", "-1"])
def test_names_and_out_of_range_numbers_are_not_literals(host: str) -> None:
    assert parse_ip_literal(host) is None


def test_classify_names_the_rule_of_each_range() -> None:
    table = {"169.254.169.254": "metadata", "169.254.3.3": "link_local",
             "127.9.9.9": "loopback", "::1": "loopback", "10.0.0.1": "private",
             "0.0.0.0": "not_unicast", "8.8.8.8": None, "2001:4860:4860::8888": None}
    for address, reason in table.items():
        assert classify(ipaddress.ip_address(address)) == reason, address
