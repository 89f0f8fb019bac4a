"""Where a key may be used from: client addresses (CIDR networks) and web page origins.

An origin pattern is `scheme://host[:port]` (http or https), its host exact or `*.` and a
domain (any subdomain, not the domain itself). A browser says where a request comes from in
its `Origin` header (or, without one, its `Referer`); a script can say anything: origin
checks stop other web pages from using a key, not scripts (as Google Maps keys do).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

MAX_ENTRIES = 100
VERDICTS_KEPT = 16
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_HOST = r"(?:\*\.)?[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
_PATTERN = re.compile(rf"(https?)://({_HOST})(?::([0-9]{{1,5}}))?")
_EXAMPLE = '{"ips": ["203.0.113.0/24"], "origins": ["https://maps.example.com"]}'


@dataclass(frozen=True)
class Restrictions:
    ips: tuple[IpNetwork, ...] = ()
    origins: tuple[str, ...] = ()
    # each client address's verdict, worked out once (a key's requests mostly come from a
    # few addresses; forgotten all at once past VERDICTS_KEPT, which bounds the memory of
    # a cached key used from many addresses)
    _verdicts: dict[str, bool] = field(default_factory=dict, init=False, repr=False,
                                       compare=False)

    def allows_address(self, address: str) -> bool:
        if not self.ips:
            return True
        verdict = self._verdicts.get(address)
        if verdict is None:
            client = _address(address)
            verdict = client is not None and any(client in network for network in self.ips)
            if len(self._verdicts) >= VERDICTS_KEPT:
                self._verdicts.clear()
            self._verdicts[address] = verdict
        return verdict

    def allows_origin(self, origin: str | None) -> bool:
        if not self.origins:
            return True
        return origin is not None and any(_matches(pattern, origin) for pattern in self.origins)

    def document(self) -> dict[str, Any]:
        return {"ips": [str(network) for network in self.ips], "origins": list(self.origins)}


@functools.lru_cache(maxsize=4096)
def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A client address parsed once (an IPv4-mapped IPv6 address as its IPv4 one)."""
    try:
        client = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(client, ipaddress.IPv6Address) and client.ipv4_mapped is not None:
        return client.ipv4_mapped
    return client


def _matches(pattern: str, origin: str) -> bool:
    scheme, _, rest = pattern.partition("://")
    if not origin.startswith(scheme + "://"):
        return False
    host_port = origin[len(scheme) + 3:]
    if rest.startswith("*."):
        suffix = rest[1:]  # ".example.com[:port]"
        head = host_port[: len(host_port) - len(suffix)]
        return host_port.endswith(suffix) and bool(head) and "/" not in head and ":" not in head
    return host_port == rest


def request_origin(origin: str | None, referer: str | None) -> str | None:
    """The origin a browser gives (`Origin`, else `Referer`'s), lowercased and without a
    default port; None when there is none (or it is `null`: a sandboxed or file page)."""
    raw = origin if origin else referer
    if not raw or raw == "null":
        return None
    try:
        parts = urlsplit(raw.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    default = {"http": 80, "https": 443}[parts.scheme]
    shown = "" if port in (None, default) else f":{port}"
    return f"{parts.scheme}://{parts.hostname.lower()}{shown}"


def read_restrictions(raw: object) -> tuple[Restrictions | None, list[str]]:
    """A key's `restrictions`, and what is wrong with them."""
    if raw is None:
        return None, []
    if not isinstance(raw, dict):
        return None, [f"Restrictions must be an object, e.g. {_EXAMPLE}"]
    unknown = sorted(str(name)[:64] for name in raw if name not in ("ips", "origins"))
    if unknown:
        return None, [f"Restrictions has no option {', '.join(unknown)} (known: ips, origins)"]
    ips, problems = _networks(raw.get("ips", []))
    origins, origin_problems = _origins(raw.get("origins", []))
    problems += origin_problems
    if problems:
        return None, problems
    return (Restrictions(ips, origins) if ips or origins else None), []


def _entries(raw: object, name: str) -> tuple[list[str], list[str]]:
    if not isinstance(raw, list) or not all(isinstance(item, str) for item in raw):
        return [], [f"Restrictions {name} must be a list of strings"]
    if len(raw) > MAX_ENTRIES:
        return [], [f"Restrictions {name} can have at most {MAX_ENTRIES} entries"]
    return list(raw), []


def _networks(raw: object) -> tuple[tuple[IpNetwork, ...], list[str]]:
    items, problems = _entries(raw, "ips")
    networks = []
    for item in items:
        try:
            networks.append(_unmapped(ipaddress.ip_network(item.strip(), strict=False)))
        except ValueError:
            problems.append(f"Restrictions ips {item[:64]!r} is not an IP address or CIDR network")
    return tuple(dict.fromkeys(networks)), problems


def _unmapped(network: IpNetwork) -> IpNetwork:
    """`::ffff:a.b.c.d/n` as the IPv4 network it names (clients are compared as IPv4)."""
    mapped = (network.network_address.ipv4_mapped
              if isinstance(network, ipaddress.IPv6Network) else None)
    if mapped is not None and network.prefixlen >= 96:
        return ipaddress.IPv4Network(f"{mapped}/{network.prefixlen - 96}", strict=False)
    return network


def _origins(raw: object) -> tuple[tuple[str, ...], list[str]]:
    items, problems = _entries(raw, "origins")
    origins = []
    for item in items:
        normal = item.strip().lower().rstrip("/")
        found = _PATTERN.fullmatch(normal)
        if found is None or (found.group(3) is not None and not 0 < int(found.group(3)) < 65536):
            problems.append(f"Restrictions origins {item[:64]!r} is not an origin such as "
                            "https://maps.example.com or https://*.example.com")
            continue
        scheme, host, port = found.groups()
        default = {"http": "80", "https": "443"}[scheme]
        origins.append(f"{scheme}://{host}" + ("" if port in (None, default) else f":{port}"))
    return tuple(dict.fromkeys(origins)), problems


def restrictions_from_document(document: object) -> Restrictions | None:
    """Stored restrictions (jsonb), or None."""
    if not isinstance(document, dict):
        return None
    return Restrictions(tuple(ipaddress.ip_network(n, strict=False) for n in document.get("ips", [])),
                        tuple(document.get("origins", [])))
