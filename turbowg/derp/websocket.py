"""DERP over WebSocket, both ends (derper's cmd/derper/websocket.go, derphttp's websocket client), sans-IO via wsproto.

A client that asks `GET /derp` with `Upgrade: websocket` and the `derp` subprotocol in
`Sec-WebSocket-Protocol` (browsers, clients behind proxies that only pass WebSocket) gets a WebSocket
instead of the DERP upgrade. The DERP byte stream then rides in binary messages: every write of the
relay becomes one binary message, and the payloads of the client's binary messages, concatenated,
are the DERP stream the relay reads (derper's wsconn.NetConn does the same; message boundaries mean
nothing). As derper: no compression extension, a client without the `derp` subprotocol is refused
(`Upgrade: WebSocket` alone is the old non-WebSocket DERP upgrade of early clients), text messages
end the connection with 1008 (policy violation).

`WebSocketTransport` presents the WebSocket to a `ClientConn` as an ordinary asyncio transport, so the
DERP code is the same for both; `ServerWebSocket` is the relay's side, `ClientWebSocket` the client's
(turbowg/derp/client.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

log = logging.getLogger("turbowg.derp.websocket")

SUBPROTOCOL = "derp"
POLICY_VIOLATION = 1008
NORMAL_CLOSURE = 1000


def wants_websocket(headers: dict[str, str]) -> bool:
    """derper's test: Upgrade is websocket *and* the derp subprotocol is offered."""
    return headers.get("upgrade", "").lower() == "websocket" and SUBPROTOCOL in headers.get(
        "sec-websocket-protocol", "")


class WebSocketError(Exception):
    pass


class WebSocketTransport(asyncio.Transport):
    """An asyncio transport whose writes go out as binary WebSocket messages over `raw`."""

    def __init__(self, raw: asyncio.Transport, ws: WSConnection) -> None:
        super().__init__()
        self._raw = raw
        self._ws = ws
        self._closing = False

    # writing
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not data:
            return
        try:
            self._raw.write(self._ws.send(Message(data=bytes(data))))
        except LocalProtocolError:
            self._closing = True

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._raw.set_write_buffer_limits(high=high, low=low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._raw.get_write_buffer_limits()

    # reading
    def pause_reading(self) -> None:
        if not self._raw.is_closing():
            self._raw.pause_reading()

    def resume_reading(self) -> None:
        if not self._raw.is_closing():
            self._raw.resume_reading()

    def is_reading(self) -> bool:
        return self._raw.is_reading()

    # lifecycle
    def close(self, code: int = NORMAL_CLOSURE, reason: str = "") -> None:
        if not self._closing:
            self._closing = True
            try:
                self._raw.write(self._ws.send(CloseConnection(code=code, reason=reason)))
            except LocalProtocolError:
                pass
        self._raw.close()

    def abort(self) -> None:
        self._closing = True
        self._raw.abort()

    def is_closing(self) -> bool:
        return self._closing or self._raw.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "websocket":
            return True
        return self._raw.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        raise NotImplementedError

    def get_protocol(self) -> asyncio.BaseProtocol:
        raise NotImplementedError


class _Endpoint:
    """Feeds raw bytes through wsproto and hands the binary payloads to `on_data`."""

    def __init__(self, ws: WSConnection, raw: asyncio.Transport) -> None:
        self.ws = ws
        self.raw = raw
        self.transport = WebSocketTransport(raw, ws)
        self.on_data: Callable[[bytes], None] | None = None
        self.closed = False

    def _events(self, data: bytes) -> list[Any]:
        try:
            self.ws.receive_data(data)
            return list(self.ws.events())
        except RemoteProtocolError as exc:
            raise WebSocketError(str(exc)) from None

    def _handle_message_events(self, events: list[Any]) -> None:
        raw = self.raw
        for ev in events:
            if isinstance(ev, BytesMessage):
                if ev.data and self.on_data is not None and not self.closed:
                    self.on_data(bytes(ev.data))
            elif isinstance(ev, Ping):
                if not raw.is_closing():
                    raw.write(self.ws.send(ev.response()))
            elif isinstance(ev, TextMessage):
                self.transport.close(POLICY_VIOLATION, "DERP over WebSocket uses binary messages")
                self.closed = True
                return
            elif isinstance(ev, CloseConnection):
                try:
                    if not raw.is_closing():
                        raw.write(self.ws.send(ev.response()))
                except LocalProtocolError:
                    pass
                self.closed = True
                raw.close()
                return


class ServerWebSocket(_Endpoint):
    """The relay's side of one WebSocket. `accept(request_head)` answers the handshake."""

    def __init__(self, raw: asyncio.Transport) -> None:
        super().__init__(WSConnection(ConnectionType.SERVER), raw)

    def accept(self, request_head: bytes) -> bool:
        """Answer the upgrade request (the head without its blank line). False: refused (and answered)."""
        try:
            events = self._events(request_head + b"\r\n\r\n")
        except WebSocketError as exc:
            self._reject(400, f"bad WebSocket request: {exc}\n")
            return False
        req = next((e for e in events if isinstance(e, Request)), None)
        if req is None:
            self._reject(400, "bad WebSocket request\n")
            return False
        if SUBPROTOCOL not in req.subprotocols:
            self._reject(400, "client must speak the derp subprotocol\n")
            return False
        self.raw.write(self.ws.send(AcceptConnection(subprotocol=SUBPROTOCOL)))  # no extensions: no compression
        return True

    def _reject(self, status: int, body: str) -> None:
        data = body.encode()
        try:
            out = self.ws.send(RejectConnection(status_code=status, has_body=True, headers=[
                (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(data)).encode()),
                (b"connection", b"close")]))
            out += self.ws.send(RejectData(data=data, body_finished=True))
        except LocalProtocolError:
            out = f"HTTP/1.1 {status} Bad Request\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
            out += data
        self.raw.write(out)
        self.raw.close()
        self.closed = True

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self._events(data)
        except WebSocketError as exc:
            log.debug("websocket client: %s; closing", exc)
            self.closed = True
            self.raw.abort()
            return
        self._handle_message_events(events)


class ClientWebSocket(_Endpoint):
    """The client's side: `request(host, path)` bytes to send, then `data_received` until `accepted`."""

    def __init__(self, raw: asyncio.Transport) -> None:
        super().__init__(WSConnection(ConnectionType.CLIENT), raw)
        self.accepted = False
        self.on_accepted: Callable[[], None] | None = None
        self.on_error: Callable[[Exception], None] | None = None

    def request(self, host: str, path: str = "/derp") -> bytes:
        return self.ws.send(Request(host=host, target=path, subprotocols=[SUBPROTOCOL]))

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self._events(data)
        except WebSocketError as exc:
            self.closed = True
            if self.on_error is not None:
                self.on_error(WebSocketError(f"WebSocket protocol error: {exc}"))
            return
        if not self.accepted:
            for i, ev in enumerate(events):
                if isinstance(ev, AcceptConnection):
                    if ev.subprotocol != SUBPROTOCOL:
                        self.closed = True
                        if self.on_error is not None:
                            self.on_error(WebSocketError("relay did not accept the derp WebSocket subprotocol"))
                        return
                    self.accepted = True
                    if self.on_accepted is not None:
                        self.on_accepted()
                    events = events[i + 1:]
                    break
                if isinstance(ev, RejectConnection):
                    self.closed = True
                    if self.on_error is not None:
                        self.on_error(WebSocketError(f"relay refused the WebSocket upgrade: HTTP {ev.status_code}"))
                    return
            else:
                return
        self._handle_message_events(events)
