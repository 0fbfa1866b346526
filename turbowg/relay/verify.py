"""derper's `-verify-client-url` admission controller and `-verify-client-url-fail-open`.

After a client's ClientInfo opens, and before the relay answers with ServerInfo, the relay POSTs
`{"NodePublic": "nodekey:<hex>", "Source": "<client ip>"}` (tailcfg.DERPAdmitClientRequest) to the URL
and admits the client only on a 200 answer whose JSON body has `"Allow": true`
(tailcfg.DERPAdmitClientResponse). As derper: mesh peers (clients with the mesh key) are not asked;
the request times out after 5 s; when the controller cannot be reached (connection refused, timeout,
DNS failure) the client is admitted if fail-open is set (derper's default) and refused otherwise; any
answer that is not 200 with valid JSON, or that does not allow, refuses the client.

The HTTP request runs on a worker thread (urllib: http and https, redirects, chunked bodies), so the
event loop never blocks on the controller.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass

from turbowg.derp import keys

log = logging.getLogger("turbowg.relay.verify")

VERIFY_TIMEOUT = 5.0  # derper's context.WithTimeout in verifyClient
MAX_RESPONSE = 4 << 10  # derper reads at most 4 KiB of the answer


@dataclass(frozen=True, slots=True)
class Verdict:
    allow: bool
    reason: str


class _Unreachable(Exception):
    pass


class ClientVerifier:
    def __init__(self, url: str, fail_open: bool = True, timeout: float = VERIFY_TIMEOUT) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"-verify-client-url must be an http:// or https:// URL, not {url!r}")
        self.url = url
        self.fail_open = fail_open
        self.timeout = timeout

    def request_body(self, key: bytes, source_ip: bytes | None) -> bytes:
        return json.dumps({"NodePublic": keys.format_public_key(key), "Source": _ip_text(source_ip)}).encode()

    def _post(self, body: bytes) -> tuple[int, bytes]:
        req = urllib.request.Request(self.url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "turbowg-relay"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310 (operator's URL)
                return resp.status, resp.read(MAX_RESPONSE)
        except urllib.error.HTTPError as exc:  # an answer, just not 200
            return exc.code, b""
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise _Unreachable(str(getattr(exc, "reason", exc))) from None

    async def verify(self, key: bytes, source_ip: bytes | None) -> Verdict:
        body = self.request_body(key, source_ip)
        loop = asyncio.get_running_loop()
        try:
            status, data = await loop.run_in_executor(None, self._post, body)
        except _Unreachable as exc:
            if self.fail_open:
                log.info("admission controller unreachable (%s); allowing client %s", exc,
                         keys.format_public_key(key))
                return Verdict(True, f"controller unreachable ({exc}); fail-open")
            return Verdict(False, f"controller unreachable ({exc})")
        if status != 200:
            return Verdict(False, f"admission controller: HTTP {status}")
        try:
            answer = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            return Verdict(False, "admission controller: answer is not JSON")
        if isinstance(answer, dict) and answer.get("Allow") is True:
            return Verdict(True, "allowed")
        return Verdict(False, f"admission controller: {keys.format_public_key(key)}/{_ip_text(source_ip)} "
                              "not allowed")


def _ip_text(ip16: bytes | None) -> str:
    if not ip16:
        return ""
    addr = ipaddress.IPv6Address(ip16)
    return str(addr.ipv4_mapped or addr)
