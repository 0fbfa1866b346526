"""The relay's HTTP/1.1 front, as derper's: `GET /derp` upgrades to DERP (or a WebSocket), plus its pages.

Routes (main listener, `-a`):
  registered prefixes            `HTTPFront.routes` (path prefix -> handler), checked first: how other
                                 parts plug pages in (e.g. the ACME HTTP-01 challenge on the http port)
  /derp (Upgrade: DERP)          101 Switching Protocols (Derp-Version, Derp-Public-Key), then DERP;
                                 with `Derp-Fast-Start: 1` no HTTP response at all, straight to frames
  /derp (Upgrade: websocket, Sec-WebSocket-Protocol: derp)
                                 101 WebSocket (derp subprotocol), DERP in binary messages
  /derp otherwise                426 Upgrade Required
  /derp/probe, /derp/latency-check   200
  /generate_204                  204, echoing X-Tailscale-Challenge as X-Tailscale-Response
  /metrics                       Prometheus text
  /bootstrap-dns                 JSON {name: [ips]} for -bootstrap-dns-names (pages.py)
  /                              -home: the default page, "blank", or a redirect
  /robots.txt                    disallow all
  /debug/, /debug/varz, /debug/clients   only from loopback without X-Forwarded-For, else 403

The `-http-port` listener of a TLS relay (`redirect_to_https`) serves registered prefixes,
/generate_204 and /debug/ as above and redirects every other GET/HEAD to https://<hostname><path>
(derper's tsweb.Port80Handler); other methods get 400 "Use HTTPS".

Every accepted connection first passes the `-accept-connection-limit` bucket (closed at once when it
is empty, as derper's rateLimitedListener) and gets the TCP keepalive / user timeout options.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from turbowg.derp.codec import PROTOCOL_VERSION
from turbowg.relay.accept_limit import TokenBucket
from turbowg.relay.conn import ClientConn
from turbowg.relay.pages import BootstrapDNS, allow_debug_access, debug_index, default_home_page
from turbowg.relay.server import DerpServer

log = logging.getLogger("turbowg.relay.http")

MAX_REQUEST_HEAD = 16 << 10
HEADER_TIMEOUT = 30.0
_CHALLENGE_OK = re.compile(r"^[A-Za-z0-9._-]{1,64}$")  # derper only echoes tame challenges
_REASONS = {
    101: "Switching Protocols", 200: "OK", 204: "No Content", 302: "Found", 400: "Bad Request",
    403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 426: "Upgrade Required",
    431: "Request Header Fields Too Large",
}
_HOME_PAGE = default_home_page("", False)  # kept for importers


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-case names
    peer: object  # the transport's peername

    @property
    def from_localhost(self) -> bool:
        return allow_debug_access(self.peer, self.headers)


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Response]


@dataclass
class HTTPFront:
    """What the HTTP front serves besides DERP; one per listener (the http port's is a `redirect` copy)."""

    hostname: str = ""
    home: str = ""  # "", "blank" or a URL (pages.check_home)
    bootstrap_dns: BootstrapDNS | None = None
    routes: dict[str, Handler] = field(default_factory=dict)  # path prefix -> handler, longest prefix first
    conn_factory: Callable[[], ClientConn] | None = None  # default: the server's (policy.py makes others)
    accept_limiter: TokenBucket | None = None
    tcp_keepalive: float = 0.0  # seconds, 0 = leave the socket alone
    tcp_user_timeout: float = 0.0
    redirect_to_https: bool = False
    started: float = field(default_factory=time.monotonic)

    def http_port_front(self) -> HTTPFront:
        """The same pages and route table (shared: routes added later show on both), in redirect mode."""
        return replace(self, redirect_to_https=True, accept_limiter=None, routes=self.routes)

    def route(self, path: str) -> Handler | None:
        best: tuple[int, Handler] | None = None
        for prefix, handler in self.routes.items():
            if path.startswith(prefix) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), handler)
        return best[1] if best else None


_DEFAULT_FRONT = HTTPFront()


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


def set_tcp_options(sock: object, keepalive: float, user_timeout: float) -> None:
    """derper's listener settings on one accepted socket: keepalive idle=interval, TCP_USER_TIMEOUT."""
    if sock is None:
        return
    try:
        if keepalive > 0:
            secs = max(1, int(round(keepalive)))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # type: ignore[attr-defined]
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, secs)  # type: ignore[attr-defined]
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, secs)  # type: ignore[attr-defined]
        if user_timeout > 0:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,  # type: ignore[attr-defined]
                            max(1, int(user_timeout * 1000)))
    except (OSError, AttributeError) as exc:
        log.debug("cannot set TCP options: %s", exc)


class RelayHTTPProtocol(asyncio.Protocol):
    """One TCP/TLS connection to the relay: HTTP until a DERP (or WebSocket) upgrade, then a ClientConn."""

    def __init__(self, server: DerpServer, front: HTTPFront | None = None) -> None:
        self.server = server
        self.front = front or _DEFAULT_FRONT
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.derp: ClientConn | None = None
        self.ws = None  # derp.websocket.ServerWebSocket once upgraded to a WebSocket
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        front = self.front
        limiter = front.accept_limiter
        if limiter is not None:
            if not limiter.allow():
                self.server.metrics.accept_limit_rejected += 1
                self.transport = None
                transport.abort()
                return
            self.server.metrics.accept_limit_accepted += 1
        if front.tcp_keepalive > 0 or front.tcp_user_timeout > 0:
            set_tcp_options(transport.get_extra_info("socket"), front.tcp_keepalive, front.tcp_user_timeout)
        self._timer = asyncio.get_running_loop().call_later(HEADER_TIMEOUT, self._header_timeout)

    def data_received(self, data: bytes) -> None:
        ws = self.ws
        if ws is not None:
            ws.data_received(data)
            return
        derp = self.derp
        if derp is not None:
            derp.data_received(data)
            return
        self.buf += data
        while self.derp is None and self.ws is None and self.transport is not None:
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
        path, _, query = target.partition("?")
        keep_alive = headers.get("connection", "").lower() != "close" and version == "HTTP/1.1"
        if headers.get("content-length", "0") not in ("", "0") or "transfer-encoding" in headers:
            keep_alive = False  # we never read request bodies; don't try to parse one as a request
        head_only = method == "HEAD"
        front = self.front
        assert self.transport is not None
        req = Request(method, path, query, headers, self.transport.get_extra_info("peername"))

        handler = front.route(path) if front.routes else None
        if handler is not None:
            try:
                r = handler(req)
            except Exception:
                log.exception("HTTP handler for %s failed", path)
                r = Response(500, b"internal error\n")
            self._finish(_response(r.status, r.body, r.headers, keep_alive=keep_alive, head_only=head_only),
                         close=not keep_alive)
            return
        if front.redirect_to_https:
            self._http_port(req, keep_alive, head_only)
            return

        if path == "/derp":
            upgrade = headers.get("upgrade", "").lower()
            if upgrade == "websocket" and "derp" in headers.get("sec-websocket-protocol", ""):
                self._upgrade_websocket(head)
                return
            if upgrade != "derp":
                self._finish(_response(426, b"DERP requires connection upgrade\n", keep_alive=False), close=True)
                return
            self._upgrade(fast_start=headers.get("derp-fast-start") == "1")
            return
        if method not in ("GET", "HEAD"):
            self._finish(_response(405, b"method not allowed\n", keep_alive=keep_alive), close=not keep_alive)
            return
        if path in ("/derp/probe", "/derp/latency-check"):
            resp = _response(200, b"", {"Access-Control-Allow-Origin": "*"}, keep_alive=keep_alive, head_only=head_only)
        elif path == "/generate_204":
            resp = self._generate_204(headers, keep_alive)
        elif path == "/metrics":
            resp = _response(200, self.server.render_metrics(), {"Content-Type": "text/plain; version=0.0.4"},
                             keep_alive=keep_alive, head_only=head_only)
        elif path == "/":
            resp = self._home(req, keep_alive, head_only)
        elif path == "/robots.txt":
            resp = _response(200, b"User-agent: *\nDisallow: /\n", keep_alive=keep_alive, head_only=head_only)
        elif path == "/bootstrap-dns":
            dns = front.bootstrap_dns
            body = dns.answer(query) if dns is not None else b"{}\n"
            resp = _response(200, body, {"Content-Type": "application/json"}, keep_alive=keep_alive,
                             head_only=head_only)
        elif path == "/debug" or path.startswith("/debug/"):
            resp = self._debug(req, keep_alive, head_only)
        else:
            resp = _response(404, b"not found\n", keep_alive=keep_alive, head_only=head_only)
        self._finish(resp, close=not keep_alive)

    # -- pages -----------------------------------------------------------------------------------------

    @staticmethod
    def _generate_204(headers: dict[str, str], keep_alive: bool) -> bytes:
        extra: dict[str, str] = {}
        challenge = headers.get("x-tailscale-challenge", "")
        if challenge and _CHALLENGE_OK.match(challenge):
            extra["X-Tailscale-Response"] = "response " + challenge
        return _response(204, b"", extra, keep_alive=keep_alive)

    def _home(self, req: Request, keep_alive: bool, head_only: bool) -> bytes:
        home = self.front.home
        if home == "blank":
            return _response(200, b"", {"Content-Type": "text/html; charset=utf-8"}, keep_alive=keep_alive,
                             head_only=head_only)
        if home:
            return _response(302, b"", {"Location": home}, keep_alive=keep_alive, head_only=head_only)
        page = default_home_page(self.front.hostname, req.from_localhost)
        return _response(200, page, {"Content-Type": "text/html; charset=utf-8"}, keep_alive=keep_alive,
                         head_only=head_only)

    def _debug(self, req: Request, keep_alive: bool, head_only: bool) -> bytes:
        if not req.from_localhost:
            return _response(403, b"debug access denied\n", keep_alive=keep_alive, head_only=head_only)
        path = req.path
        if path in ("/debug", "/debug/"):
            g = self.server.gauges()
            facts = [("Clients here", str(g.clients_local)), ("Clients elsewhere in the region", str(g.clients_remote)),
                     ("Mesh key", "yes" if self.server.mesh_key else "no")]
            return _response(200, debug_index(self.front.hostname, facts), {"Content-Type": "text/html; charset=utf-8"},
                             keep_alive=keep_alive, head_only=head_only)
        if path == "/debug/varz":
            return _response(200, self.server.render_metrics(), {"Content-Type": "text/plain; version=0.0.4"},
                             keep_alive=keep_alive, head_only=head_only)
        if path == "/debug/clients":
            lines = [f"{c.describe()} {'mesh ' if c.can_mesh else ''}{'home' if c.preferred else ''}".rstrip()
                     for c in self.server.clients.values()]
            return _response(200, ("\n".join(sorted(lines)) + "\n").encode(), keep_alive=keep_alive,
                             head_only=head_only)
        return _response(404, b"not found\n", keep_alive=keep_alive, head_only=head_only)

    def _http_port(self, req: Request, keep_alive: bool, head_only: bool) -> None:
        """derper's port-80 handler: 204 and debug served, everything else sent to https."""
        if req.path == "/generate_204":
            resp = self._generate_204(req.headers, keep_alive)
        elif req.path == "/debug" or req.path.startswith("/debug/"):
            resp = self._debug(req, keep_alive, head_only)
        elif req.method not in ("GET", "HEAD"):
            resp = _response(400, b"Use HTTPS\n", keep_alive=keep_alive)
        else:
            host = self.front.hostname or req.headers.get("host", "")
            target = req.path + ("?" + req.query if req.query else "")
            resp = _response(302, b"", {"Location": f"https://{host}{target}"}, keep_alive=keep_alive,
                             head_only=head_only)
        self._finish(resp, close=not keep_alive)

    # -- upgrades ----------------------------------------------------------------------------------------

    def _new_conn(self) -> ClientConn:
        factory = self.front.conn_factory
        return factory() if factory is not None else self.server.protocol_factory()

    def _upgrade(self, fast_start: bool) -> None:
        t = self.transport
        assert t is not None
        self._cancel_timer()
        if not fast_start:
            t.write(
                (
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
                    f"Derp-Version: {PROTOCOL_VERSION}\r\nDerp-Public-Key: {self.server.public_key.hex()}\r\n\r\n"
                ).encode()
            )
        conn = self._new_conn()
        self.derp = conn
        conn.connection_made(t)
        rest = bytes(self.buf)
        self.buf = bytearray()
        if rest:
            conn.data_received(rest)

    def _upgrade_websocket(self, head: bytes) -> None:
        from turbowg.derp.websocket import ServerWebSocket

        t = self.transport
        assert t is not None
        ws = ServerWebSocket(t)
        if not ws.accept(head):
            self.transport = None  # ws answered and closed it
            return
        self._cancel_timer()
        self.server.metrics.websocket_accepts += 1
        conn = self._new_conn()
        self.ws = ws
        self.derp = conn
        ws.on_data = conn.data_received
        conn.connection_made(ws.transport)
        rest = bytes(self.buf)
        self.buf = bytearray()
        if rest:
            ws.data_received(rest)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

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
        self._cancel_timer()
        self.transport = None
        self.ws = None
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
