"""The client address of a request: the TCP peer, or behind trusted proxies X-Forwarded-For."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from starlette.requests import Request

from services.api.state import api_state

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def trusted_networks(setting: str | None) -> tuple[Network, ...]:
    """TRUSTED_PROXIES as networks (validated by the settings already)."""
    if not setting:
        return ()
    return tuple(ipaddress.ip_network(item.strip(), strict=False) for item in setting.split(","))


def _trusted(address: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_address(request: Request) -> str:
    """Who is asking. ``X-Forwarded-For`` counts only when the peer is a trusted proxy; then the
    right-most entry that is not itself a trusted proxy is the client (entries to its left were
    written by the client and prove nothing)."""
    networks = api_state(request).trusted_proxies
    peer = request.client.host if request.client else "unknown"
    if not networks or not _trusted(peer, networks):
        return peer
    hops = [
        hop.strip()
        for header in request.headers.getlist("x-forwarded-for")
        for hop in header.split(",")
    ]
    for hop in reversed(hops):
        if not hop:
            continue
        if not _trusted(hop, networks):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # garbage from a client behind the proxy: fall back to the proxy
    return peer


def public_origin(request: Request) -> str:
    """The base of absolute URLs (links, static assets): PUBLIC_URL, else the address the server
    listens on. Never the Host header, which the client chooses."""
    public_url = api_state(request).settings.public_url
    if public_url:
        return public_url.rstrip("/") + "/"
    scheme = request.url.scheme
    server = request.scope.get("server")
    if not server:
        return "/"
    host, port = server[0], server[1]
    if ":" in host:
        host = f"[{host}]"
    default = {"http": 80, "https": 443}.get(scheme)
    return f"{scheme}://{host}" + ("" if port in (None, default) else f":{port}") + "/"
