"""The relay's HTTP/1.1 front, as derper's: `GET /derp` upgrades to DERP, plus probe/204/metrics.

Routes:
  /derp (Upgrade: DERP)          101 Switching Protocols (Derp-Version, Derp-Public-Key), then DERP;
                                 with `Derp-Fast-Start: 1` no HTTP response at all, straight to frames
  /derp otherwise                426 Upgrade Required
  /derp/probe, /derp/latency-check   200
  /generate_204                  204, echoing X-Tailscale-Challenge as X-Tailscale-Response
  /debug/varz, /metrics          Prometheus text
  /                              a short page
"""

from __future__ import annotations

import asyncio
import logging
import re

from turbowg.derp.codec import PROTOCOL_VERSION
from turbowg.relay.acme import CHALLENGE_PREFIX, acme_http01_handler
from turbowg.relay.conn import ClientConn
from turbowg.relay.server import DerpServer

log = logging.getLogger("turbowg.relay.http")

MAX_REQUEST_HEAD = 16 << 10
HEADER_TIMEOUT = 30.0
_CHALLENGE_OK = re.compile(r"^[A-Za-z0-9._-]{1,64}$")  # derper only echoes tame challenges
_REASONS = {
    200: "OK", 204: "No Content", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    426: "Upgrade Required", 431: "Request Header Fields Too Large",
}
_HOME_PAGE = (
    b"<html><body>\n<h1>DERP</h1>\n<p>This is a <a href=\"https://tailscale.com/\">Tailscale</a>"
    b" DERP server (turbowg).</p>\n</body></html>\n"
)


def _response(status: int, body: bytes = b"", headers: dict[str, str] | None = None, *, keep_alive: bool = True,
              head_only: bool = False) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
    hdrs = dict(headers or {})
    if status != 204:
        hdrs.setdefault("Content-Type", "text/plain; charset=utf-8")
        hdrs["Content-Length"] = str(len(body))
    if not keep_alive:
        hdrs["Connection"] = "close"
    lines += [f"{k}: {v}" for k, v in hdrs.items()]
    out = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return out if head_only or status == 204 else out + body


class RelayHTTPProtocol(asyncio.Protocol):
    """One TCP/TLS connection to the relay: HTTP until a DERP upgrade, then a ClientConn."""

    def __init__(self, server: DerpServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.derp: ClientConn | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._timer = asyncio.get_running_loop().call_later(HEADER_TIMEOUT, self._header_timeout)

    def data_received(self, data: bytes) -> None:
        derp = self.derp
        if derp is not None:
            derp.data_received(data)
            return
        self.buf += data
        while self.derp is None and self.transport is not None:
            end = self.buf.find(b"\r\n\r\n", 0, MAX_REQUEST_HEAD + 4)  # a longer head is refused, even whole
            if end < 0:
                if len(self.buf) > MAX_REQUEST_HEAD:
                    self._finish(_response(431, b"request header too large\n", keep_alive=False), close=True)
                return
            head = bytes(self.buf[:end])
            del self.buf[: end + 4]
            self._handle(head)

    def _handle(self, head: bytes) -> None:
        try:
            text = head.decode("latin-1")
            request_line, *header_lines = text.split("\r\n")
            method, target, version = request_line.split(" ")
            if not version.startswith("HTTP/1."):
                raise ValueError(version)
            headers: dict[str, str] = {}
            for line in header_lines:
                name, _, value = line.partition(":")
                if not _:
                    raise ValueError(line)
                headers[name.strip().lower()] = value.strip()
        except ValueError:
            self._finish(_response(400, b"bad request\n", keep_alive=False), close=True)
            return
        path = target.split("?", 1)[0]
        keep_alive = headers.get("connection", "").lower() != "close" and version == "HTTP/1.1"
        if headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in headers:
            keep_alive = False  # we never read request bodies; don't try to parse one as a request
        head_only = method == "HEAD"

        if path == "/derp":
            upgrade = headers.get("upgrade", "").lower()
            if upgrade != "derp":
                self._finish(_response(426, b"DERP requires connection upgrade\n", keep_alive=False), close=True)
                return
            self._upgrade(fast_start=headers.get("derp-fast-start") == "1")
            return
        if method not in ("GET", "HEAD"):
            self._finish(_response(405, b"method not allowed\n", keep_alive=keep_alive), close=not keep_alive)
            return
        if path.startswith(CHALLENGE_PREFIX) and (answer := acme_http01_handler(path)) is not None:
            resp = _response(200, answer, keep_alive=keep_alive, head_only=head_only)  # ACME HTTP-01
        elif path in ("/derp/probe", "/derp/latency-check"):
            resp = _response(200, b"", {"Access-Control-Allow-Origin": "*"}, keep_alive=keep_alive, head_only=head_only)
        elif path == "/generate_204":
            extra: dict[str, str] = {}
            challenge = headers.get("x-tailscale-challenge", "")
            if challenge and _CHALLENGE_OK.match(challenge):
                extra["X-Tailscale-Response"] = "response " + challenge
            resp = _response(204, b"", extra, keep_alive=keep_alive)
        elif path in ("/debug/varz", "/metrics"):
            resp = _response(200, self.server.render_metrics(), {"Content-Type": "text/plain; version=0.0.4"},
                             keep_alive=keep_alive, head_only=head_only)
        elif path == "/":
            resp = _response(200, _HOME_PAGE, {"Content-Type": "text/html; charset=utf-8"}, keep_alive=keep_alive,
                             head_only=head_only)
        elif path == "/robots.txt":
            resp = _response(200, b"User-agent: *\nDisallow: /\n", keep_alive=keep_alive, head_only=head_only)
        else:
            resp = _response(404, b"not found\n", keep_alive=keep_alive, head_only=head_only)
        self._finish(resp, close=not keep_alive)

    def _upgrade(self, fast_start: bool) -> None:
        t = self.transport
        assert t is not None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not fast_start:
            t.write(
                (
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
                    f"Derp-Version: {PROTOCOL_VERSION}\r\nDerp-Public-Key: {self.server.public_key.hex()}\r\n\r\n"
                ).encode()
            )
        conn = self.server.protocol_factory()
        self.derp = conn
        conn.connection_made(t)
        rest = bytes(self.buf)
        self.buf = bytearray()
        if rest:
            conn.data_received(rest)

    def _finish(self, response: bytes, close: bool) -> None:
        t = self.transport
        if t is None:
            return
        t.write(response)
        if close:
            t.close()
            self.transport = None

    def _header_timeout(self) -> None:
        self._timer = None
        if self.derp is None and self.transport is not None:
            self.transport.abort()

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.transport = None
        derp = self.derp
        if derp is not None:
            derp.connection_lost(exc)
            self.derp = None

    def pause_writing(self) -> None:
        if self.derp is not None:
            self.derp.pause_writing()

    def resume_writing(self) -> None:
        if self.derp is not None:
            self.derp.resume_writing()
