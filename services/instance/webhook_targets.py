"""Where webhooks (alert rules' and integrations') may go: public addresses only, checked when
a rule or an integration is made and again at each delivery.

A webhook URL's host name is resolved and every address it resolves to is checked; the POST then
goes to one of the addresses just checked (the name is kept for the Host header and TLS), so a
name that resolves elsewhere by the time of delivery cannot lead it into the instance's own
network. An IPv6 address that carries an IPv4 one (mapped, 6to4, NAT64) is judged as that IPv4
address. Operators may allow networks (``ALERT_WEBHOOK_ALLOWED_CIDRS``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

import httpx

from libs.config import ConfigError

RESOLVE_SECONDS = 5.0
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# NAT64's well-known prefix carries an IPv4 address in its last 32 bits.
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class WebhookRefused(Exception):
    """A webhook URL that leads somewhere webhooks may not go; the message says why."""


@dataclass(frozen=True)
class WebhookTarget:
    """A webhook URL whose host resolved to ``addresses``, every one of them allowed."""

    url: httpx.URL
    host: str
    addresses: tuple[str, ...]

    def via(self, address: str) -> tuple[httpx.URL, dict[str, str], dict[str, Any]]:
        """The URL to connect to ``address`` (one of ``addresses``), with the Host header and
        the TLS server name of the URL as given."""
        default = 443 if self.url.scheme == "https" else 80
        port = self.url.port
        name = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 literal
        host_header = name if port in (None, default) else f"{name}:{port}"
        extensions = {"sni_hostname": self.host} if self.url.scheme == "https" else {}
        return self.url.copy_with(host=address), {"Host": host_header}, extensions


def _embedded_ipv4(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, NAT64), else itself."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
        if address in NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


@dataclass(frozen=True)
class WebhookTargets:
    """Where alert webhooks may go: public unicast addresses, and the networks an operator
    allows although they are not (``ALERT_WEBHOOK_ALLOWED_CIDRS``)."""

    allowed: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_setting(cls, text: str) -> WebhookTargets:
        """From comma-separated CIDRs; a ``ConfigError`` names one that is not."""
        networks = []
        for item in (part.strip() for part in text.split(",")):
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ConfigError(
                    f"ALERT_WEBHOOK_ALLOWED_CIDRS: {item[:64]!r} is not a network in CIDR notation"
                ) from None
        return cls(tuple(networks))

    def refusal(self, address: IPAddress) -> str | None:
        """Why webhooks may not go to ``address`` (``loopback``, ``private``, ...), or None."""
        inner = _embedded_ipv4(address)
        if any(a in net for net in self.allowed for a in (address, inner)):
            return None
        for reason, refused in (
            ("unspecified", inner.is_unspecified),
            ("loopback", inner.is_loopback),
            ("link-local", inner.is_link_local),
            ("multicast", inner.is_multicast),
            ("reserved", inner.is_reserved),
            ("private", inner.is_private),
            ("non-public", not inner.is_global),
        ):
            if refused:
                return reason
        return None

    async def resolve(self, url: str) -> WebhookTarget:
        """Resolve the URL's host and check every address; ``WebhookRefused`` says why not."""
        try:
            parsed = httpx.URL(url)
            host = parsed.raw_host.decode("ascii")
        except (httpx.InvalidURL, UnicodeError):
            raise WebhookRefused("is not a valid URL") from None
        if parsed.scheme not in ("http", "https") or not host:
            raise WebhookRefused("must be an http(s) URL with a host")
        default = 443 if parsed.scheme == "https" else 80
        port = parsed.port if parsed.port is not None else default  # 0 is a port, not none
        if not 0 < port < 65536:
            raise WebhookRefused("has a port that is not from 1 to 65535")
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            addresses = [literal]
        else:
            addresses = await _resolved(host, port)
        for address in addresses:
            reason = self.refusal(address)
            if reason is not None:
                where = "is" if literal is not None else f"{host[:100]} resolves to"
                article = "an" if reason[0] in "aeiou" else "a"
                raise WebhookRefused(
                    f"{where} {article} {reason} address; webhooks go only to public addresses"
                )
        return WebhookTarget(parsed, host, tuple(dict.fromkeys(str(a) for a in addresses)))


async def _resolved(host: str, port: int) -> list[IPAddress]:
    try:
        async with asyncio.timeout(RESOLVE_SECONDS):
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
    except (OSError, TimeoutError, UnicodeError):
        raise WebhookRefused(f"{host[:100]} does not resolve") from None
    addresses = []
    for _family, _type, _proto, _name, sockaddr in infos:
        try:
            addresses.append(ipaddress.ip_address(str(sockaddr[0])))
        except ValueError:
            continue
    if not addresses:
        raise WebhookRefused(f"{host[:100]} does not resolve")
    return addresses
