"""The upstream URL policy: which URLs an endpoint may call, checked before any connection.

A cluster that lets operators and workers name upstream URLs must not become a way to
reach what sits beside it (the cloud metadata service, Redis on loopback, the pod
network). Every upstream URL, announced or added by hand, passes `check_upstream_url`:

| rule                              | refused                                              |
|-----------------------------------|------------------------------------------------------|
| scheme                            | anything but http:// and https://                    |
| credentials                       | `user:pass@` (keys travel in headers, from settings) |
| characters                        | whitespace, control characters, backslashes          |
| cloud metadata (always)           | 169.254.169.254, 169.254.170.2, fd00:ec2::254,       |
|                                   | 100.100.100.200, 192.0.0.192, metadata.google.internal |
| link-local (always)               | 169.254.0.0/16, fe80::/10                            |
| not unicast (always)              | 0.0.0.0/8, ::, multicast, 240.0.0.0/4, broadcast     |
| loopback, private (unless allowed)| 127.0.0.0/8, ::1, 10/8, 172.16/12, 192.168/16, fc00::/7, |
|                                   | 100.64/10 and every other range that is not global   |

An address is judged in every spelling a resolver accepts: IPv4 as a decimal, hex or
octal integer or a shortened dotted form (`2852039166`, `0xa9fea9fe`, `0251.0376.0251.0376`,
`169.254.43518`), and IPv6 forms that carry an IPv4 address (IPv4-mapped `::ffff:a.b.c.d`,
IPv4-compatible `::a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`) are judged as that
IPv4 address. A hostname is resolved once with getaddrinfo and refused if any of its
addresses is.

`allow_private` opens loopback and private ranges: False (none), True (all of them), or a
list of networks (`["127.0.0.0/8", "10.20.0.0/16"]`) of which only those. It never opens
link-local or metadata addresses.

DNS rebinding: the check resolves the name once; a name can resolve to another address a
moment later. A caller must connect to one of the addresses `resolve_upstream` returned
(pin them in its transport), or check again before each connection. Redirects are not
URLs this policy saw: a caller must not follow them (or check each Location).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal
from urllib.parse import SplitResult, urlsplit

from aimesh_tasks.errors import InvalidInput

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Iterable[str]]
"""(host, port) -> the addresses it resolves to, as text; raises OSError if it does not."""
AllowPrivate = bool | Sequence[str | IPNetwork]

Reason = Literal["scheme", "credentials", "characters", "host", "port", "unresolvable",
                 "metadata", "link_local", "not_unicast", "loopback", "private"]

SCHEMES = {"http": 80, "https": 443}
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, Azure, GCP, OpenStack, DigitalOcean
    "169.254.170.2",    # AWS ECS task metadata
    "fd00:ec2::254",    # AWS over IPv6
    "100.100.100.200",  # Alibaba Cloud
    "192.0.0.192",      # Oracle Cloud
))
METADATA_HOSTNAMES = frozenset({"metadata.google.internal", "metadata.goog"})
LINK_LOCAL = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")
_UNSAFE_CHARACTERS = re.compile(r"[\x00-\x20\x7f\\]")
# One part of an IPv4 address as inet_aton reads it: hex, octal (leading 0) or decimal.
_IPV4_PART = re.compile(r"^(?:0[xX][0-9a-fA-F]*|0[0-7]*|[1-9][0-9]*)$")


class UpstreamURLRefused(InvalidInput):
    """An upstream URL the policy refuses; `reason` is the rule, `host` and `address` what
    it saw (credentials are never repeated)."""

    code = "upstream_url_refused"

    @property
    def reason(self) -> str:
        return str(self.fields.get("reason", ""))


@dataclass(frozen=True)
class UpstreamTarget:
    """A URL that passed the policy, with the addresses a connection may use."""

    scheme: str
    host: str
    port: int
    addresses: tuple[IPAddress, ...]


def check_upstream_url(url: str, *, allow_private: AllowPrivate,
                       resolver: Resolver | None = None) -> None:
    """Raise UpstreamURLRefused unless `url` may be called (the rules in the module
    docstring). Resolves a hostname once: connect to the checked addresses or check again
    (`resolve_upstream` returns them)."""
    resolve_upstream(url, allow_private=allow_private, resolver=resolver)


def resolve_upstream(url: str, *, allow_private: AllowPrivate,
                     resolver: Resolver | None = None) -> UpstreamTarget:
    """Check `url` like `check_upstream_url` and return its host, port and the allowed
    addresses; `resolver` replaces getaddrinfo (tests)."""
    allowed = allowed_networks(allow_private)
    target = _before_resolving(url, allowed)
    if target.addresses:
        return target
    found = _resolve(url, target.host, target.port, resolver or _getaddrinfo)
    addresses = tuple(_judge(url, target.host, address, allowed) for address in found)
    return UpstreamTarget(target.scheme, target.host, target.port, addresses)


def check_before_resolving(url: str, *, allow_private: AllowPrivate) -> UpstreamTarget:
    """Everything `resolve_upstream` checks short of resolving a hostname: the scheme,
    credentials, characters, port, a literal address, a metadata service's name. The
    target has its address for a literal one, none for a hostname: for a caller whose
    connection judges each address the name resolves to when it connects."""
    return _before_resolving(url, allowed_networks(allow_private))


def _before_resolving(url: str, allowed: tuple[IPNetwork, ...] | bool) -> UpstreamTarget:
    parts = _split(url)
    host = _host(url, parts)
    port = _port(url, parts)
    literal = parse_ip_literal(host)
    if literal is not None:
        return UpstreamTarget(parts.scheme.lower(), host, port,
                              (_judge(url, host, literal, allowed),))
    if host.rstrip(".") in METADATA_HOSTNAMES:
        raise _refused(url, "metadata", host, None, "it is a cloud metadata service's name")
    return UpstreamTarget(parts.scheme.lower(), host, port, ())


def allowed_networks(allow_private: AllowPrivate) -> tuple[IPNetwork, ...] | bool:
    """`allow_private` validated: a bool as it is, a list as networks; a bad entry raises
    InvalidInput naming it."""
    if isinstance(allow_private, bool):
        return allow_private
    if isinstance(allow_private, str):
        raise InvalidInput("allow_private: give a list of networks, not one string",
                           field="allow_private", value=allow_private)
    networks = []
    for entry in allow_private:
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError as exc:
            raise InvalidInput(f"allow_private: {str(entry)!r} is not a network "
                               "(write '10.0.0.0/8', '127.0.0.1' or 'fd12::/16')",
                               field="allow_private", value=str(entry)) from exc
    return tuple(networks)


def parse_ip_literal(host: str) -> IPAddress | None:
    """The address `host` spells, in any form a resolver reads as a number (IPv6 with or
    without brackets, dotted IPv4, or IPv4 as one to four decimal, hex or octal parts);
    None for a hostname."""
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if ":" in text:
        try:
            return ipaddress.IPv6Address(text.split("%", 1)[0])
        except ValueError:
            return None
    return _parse_ipv4(text[:-1] if text.endswith(".") else text)


def _parse_ipv4(text: str) -> ipaddress.IPv4Address | None:
    parts = text.split(".")
    if not 1 <= len(parts) <= 4 or not all(_IPV4_PART.match(p) for p in parts):
        return None
    values = [int(p, 16) if p[:2].lower() == "0x" and len(p) > 2 else
              0 if p.lower() == "0x" else int(p, 8) if p.startswith("0") else int(p)
              for p in parts]
    # a.b.c.d; a.b.c (c fills 16 bits); a.b (b fills 24); a (32 bits), as inet_aton does
    last_bits = 8 * (5 - len(values))
    if any(v > 255 for v in values[:-1]) or values[-1] >= 1 << last_bits:
        return None
    number = values[-1]
    for index, value in enumerate(values[:-1]):
        number |= value << (24 - 8 * index)
    return ipaddress.IPv4Address(number)


def embedded_ipv4(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one carries (mapped, compatible, NAT64, 6to4), else itself."""
    if isinstance(address, ipaddress.IPv4Address):
        return address
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def classify(address: IPAddress) -> Reason | None:
    """The rule that refuses `address` before any allow-list is read ('loopback' and
    'private' can be allowed), or None for a global unicast address."""
    address = embedded_ipv4(address)
    if address in METADATA_ADDRESSES:
        return "metadata"
    if any(address in network for network in LINK_LOCAL):
        return "link_local"
    if address.is_loopback:
        return "loopback"
    if (address.is_unspecified or address.is_multicast or address.is_reserved
            or address in ipaddress.ip_network("0.0.0.0/8")
            or address == ipaddress.IPv4Address("255.255.255.255")):
        return "not_unicast"
    return None if address.is_global else "private"


_WHY = {
    "metadata": "it is a cloud metadata address (never allowed)",
    "link_local": "it is a link-local address (never allowed)",
    "not_unicast": "it is not a unicast address one can call (never allowed)",
    "loopback": "it is a loopback address; list it in the allowed private networks to "
                "call it",
    "private": "it is a private or non-global address; list its network in the allowed "
               "private networks to call it",
}


def _judge(url: str, host: str, address: IPAddress,
           allowed: tuple[IPNetwork, ...] | bool) -> IPAddress:
    reason = classify(address)
    if reason is None:
        return address
    if reason in ("loopback", "private") and _is_allowed(address, allowed):
        return address
    spelled = "" if str(address) == host.strip("[]") else f" ({host} is {address})"
    raise _refused(url, reason, host, address, _WHY[reason] + spelled)


def _is_allowed(address: IPAddress, allowed: tuple[IPNetwork, ...] | bool) -> bool:
    if isinstance(allowed, bool):
        return allowed
    plain = embedded_ipv4(address)
    return any(plain.version == n.version and plain in n for n in allowed)


def _split(url: str) -> SplitResult:
    if _UNSAFE_CHARACTERS.search(url):
        raise _refused(url, "characters", None, None,
                       "it holds whitespace, control characters or a backslash")
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # an unclosed IPv6 bracket
        raise _refused(url, "host", None, None, f"its host cannot be read ({exc})") from exc
    if parts.scheme.lower() not in SCHEMES:
        raise _refused(url, "scheme", None, None, "only http:// and https:// are allowed")
    if "@" in parts.netloc:
        raise _refused(url, "credentials", None, None,
                       "it carries credentials (user:password@); give API keys through "
                       "--api-key-env or --api-key-file")
    return parts


def _host(url: str, parts: SplitResult) -> str:
    host = parts.hostname
    if not host:
        raise _refused(url, "host", None, None, "it has no host")
    return f"[{host}]" if ":" in host else host


def _port(url: str, parts: SplitResult) -> int:
    try:
        port = parts.port
    except ValueError as exc:
        raise _refused(url, "port", None, None, "its port is not a number in 0-65535") from exc
    return port if port is not None else SCHEMES[parts.scheme.lower()]


def _resolve(url: str, host: str, port: int, resolver: Resolver) -> list[IPAddress]:
    try:
        found = [ipaddress.ip_address(a.split("%", 1)[0]) for a in resolver(host, port)]
    except (OSError, UnicodeError) as exc:
        raise _refused(url, "unresolvable", host, None,
                       f"its host does not resolve ({exc})") from exc
    if not found:
        raise _refused(url, "unresolvable", host, None, "its host resolves to no address")
    return found


def _getaddrinfo(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def shown_url(url: str) -> str:
    """`url` safe to print: scheme, host, port and path; no credentials, query or fragment."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rsplit("@", 1)[-1]
    except ValueError:
        return "<unparseable URL>"
    path = _UNSAFE_CHARACTERS.sub("?", parts.path)
    return f"{parts.scheme}://{_UNSAFE_CHARACTERS.sub('?', netloc)}{path}"


def _refused(url: str, reason: Reason, host: str | None, address: IPAddress | None,
             why: str) -> UpstreamURLRefused:
    return UpstreamURLRefused(
        f"url: {shown_url(url)!r} is refused: {why}", field="url", reason=reason,
        host=host, address=None if address is None else str(address))
