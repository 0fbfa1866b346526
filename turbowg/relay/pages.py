"""The relay's HTTP pages besides /derp, as derper serves them: home, robots.txt, bootstrap DNS, /debug/.

  /             `-home`: "" derper's default page, "blank" an empty page, or a URL to redirect to
  /robots.txt   disallow everything
  /bootstrap-dns  JSON {name: [ip, ...]} for the `-bootstrap-dns-names` (resolved by the relay every
                10 minutes; `?q=name` answers one name, as derper)
  /debug/...    only for requests from a loopback address that did not come through a proxy
                (no X-Forwarded-For), else 403: derper's tsweb.AllowDebugAccess without the Tailscale IPs

Also the Go `time.Duration` syntax derper's duration flags take ("10m", "15s", "1h2m", "500ms").
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import ipaddress
import json
import logging
import re
import socket
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

log = logging.getLogger("turbowg.relay.pages")

BOOTSTRAP_DNS_REFRESH = 600.0  # derper's refreshBootstrapDNSLoop: every 10 minutes


# -- durations -------------------------------------------------------------------------------------------

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Seconds from a Go duration ("10m", "1h30m", "1.5s", "0") or a plain number of seconds."""
    t = text.strip()
    if not t:
        raise ValueError("empty duration")
    try:
        value = float(t)
    except ValueError:
        pass
    else:
        if value < 0 or value != value or value == float("inf"):
            raise ValueError(f"bad duration {text!r}")
        return value
    pos, total = 0, 0.0
    while pos < len(t):
        m = _DURATION_PART.match(t, pos)
        if m is None:
            raise ValueError(f"bad duration {text!r} (e.g. 10m, 15s, 1h30m, 500ms)")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return total


# -- who may see /debug/ ---------------------------------------------------------------------------------

def is_loopback_peer(peer: object) -> bool:
    if not isinstance(peer, tuple) or not peer:
        return False
    try:
        addr = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def allow_debug_access(peer: object, headers: dict[str, str]) -> bool:
    """From this machine, directly (a reverse proxy on localhost would make everyone local)."""
    if "x-forwarded-for" in headers:
        return False
    return is_loopback_peer(peer)


# -- home page -------------------------------------------------------------------------------------------

def check_home(home: str) -> str:
    """derper accepts "", "blank" or an absolute http(s) URL for -home."""
    if home in ("", "blank"):
        return home
    parts = urlsplit(home)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"-home must be empty, 'blank' or an http(s) URL to redirect to, not {home!r}")
    return home


def default_home_page(hostname: str, debug_link: bool) -> bytes:
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head><meta charset=\"utf-8\"><title>DERP</title></head>\n<body>\n",
        "<h1>DERP</h1>\n<p>This is a <a href=\"https://tailscale.com/\">Tailscale</a> DERP server (turbowg).</p>\n",
        "<p>It provides STUN, interactive connectivity establishment, and relaying of end-to-end encrypted "
        "WireGuard traffic for Tailscale clients.</p>\n",
    ]
    if debug_link:
        parts.append("<p>Debug info at <a href='/debug/'>/debug/</a>.</p>\n")
    parts.append("</body>\n</html>\n")
    return "".join(parts).encode()


# -- bootstrap DNS -----------------------------------------------------------------------------------------

@dataclass
class BootstrapDNS:
    """Names the relay resolves for clients whose own DNS is broken (derper's -bootstrap-dns-names)."""

    names: list[str]
    cache: dict[str, list[str]] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None

    @classmethod
    def from_flag(cls, text: str) -> BootstrapDNS | None:
        names = [n.strip() for n in text.split(",") if n.strip()]
        return cls(names) if names else None

    async def refresh(self) -> None:
        loop = asyncio.get_running_loop()
        fresh: dict[str, list[str]] = {}
        for name in self.names:
            try:
                infos = await asyncio.wait_for(
                    loop.getaddrinfo(name, None, type=socket.SOCK_STREAM), 10.0)
            except (OSError, TimeoutError) as exc:
                log.info("bootstrap DNS: cannot resolve %s: %s", name, exc)
                if name in self.cache:
                    fresh[name] = self.cache[name]  # keep the last good answer
                continue
            ips: list[str] = []
            for family, *_rest, sockaddr in infos:
                ip = str(sockaddr[0]).split("%", 1)[0]
                if family in (socket.AF_INET, socket.AF_INET6) and ip not in ips:
                    ips.append(ip)
            fresh[name] = ips
        self.cache = fresh

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(Exception):
                await self.refresh()
            await asyncio.sleep(BOOTSTRAP_DNS_REFRESH)

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._loop_after_first())

    async def _loop_after_first(self) -> None:
        await asyncio.sleep(BOOTSTRAP_DNS_REFRESH)
        await self._loop()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def answer(self, query: str) -> bytes:
        q = parse_qs(query).get("q", [""])[0].strip()
        if q:
            body: dict[str, list[str]] = {q: self.cache[q]} if q in self.cache else {}
        else:
            body = dict(self.cache)
        return json.dumps(body, indent=1).encode() + b"\n"


# -- /debug/ ---------------------------------------------------------------------------------------------

def debug_index(hostname: str, facts: list[tuple[str, str]]) -> bytes:
    rows = "".join(f"<li><b>{html.escape(k)}:</b> {html.escape(v)}</li>\n" for k, v in facts)
    return (
        "<html><body>\n<h1>DERP debug</h1>\n<ul>\n"
        f"<li><b>Hostname:</b> {html.escape(hostname)}</li>\n{rows}"
        "<li><a href=\"/debug/varz\">/debug/varz</a> (Prometheus)</li>\n"
        "<li><a href=\"/debug/clients\">/debug/clients</a></li>\n"
        "</ul>\n</body></html>\n"
    ).encode()
