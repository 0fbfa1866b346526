"""The one client-side DERP handshake: HTTP upgrade, then ServerKey -> ClientInfo -> ServerInfo.

Every client of a relay connects the same way: the asyncio `DerpClient` (client.py), the relay's mesh
links to the other relays of its region (turbowg/relay/mesh.py) and the relay benchmark's load
generator. The HTTP part is here (`upgrade_request`, `UpgradeResponse`); the DERP part is the sans-IO
`ClientConnection` of client_proto.py. `derp_handshake` runs both over an asyncio stream and hands the
stream back for callers that read raw frames afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from turbowg.derp.client_proto import ClientConnection
from turbowg.derp.codec import FrameDecoder

MAX_HTTP_RESPONSE = 16 << 10
_READ_SIZE = 1 << 16


class HandshakeError(Exception):
    """The relay refused the DERP upgrade or answered it with something that is not HTTP."""


class SelfConnectError(HandshakeError):
    """The relay answered with a key the caller refuses (a mesh link that dialled its own relay)."""


def upgrade_request(
    host: str, port: int | None = None, *, tls: bool = True, path: str = "/derp", fast_start: bool = False,
    user_agent: str = "turbowg-derp",
) -> bytes:
    """`GET /derp` with `Upgrade: DERP`; the Host header carries the port when it is not the scheme's default."""
    host_header = f"[{host}]" if ":" in host else host
    if port is not None and port != (443 if tls else 80):
        host_header += f":{port}"
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: {user_agent}\r\n"
        "Upgrade: DERP\r\nConnection: Upgrade\r\n"
        + ("Derp-Fast-Start: 1\r\n" if fast_start else "")
        + "\r\n"
    ).encode()


class UpgradeResponse:
    """Sans-IO reader of the relay's answer to `upgrade_request` (anything but 101 is a refusal)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> bytes | None:
        """None while the header is incomplete; then the bytes after it (the first DERP frames)."""
        self._buf += data
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > MAX_HTTP_RESPONSE:
                raise HandshakeError("HTTP response header too long")
            return None
        head = bytes(self._buf[:end]).decode("latin-1")
        rest = bytes(self._buf[end + 4 :])
        self._buf.clear()
        status = head.split("\r\n", 1)[0].split(" ", 2)
        if len(status) < 2 or status[1] != "101":
            raise HandshakeError(f"relay refused the DERP upgrade: {head.splitlines()[0] if head else ''!r}")
        return rest


async def derp_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, private_key: bytes,
    mesh_key: str = "", refuse_server_keys: Iterable[bytes | None] = (), *, port: int | None = None,
    tls: bool = True, user_agent: str = "turbowg-mesh",
) -> tuple[bytes, FrameDecoder, list[tuple[int, bytes]]]:
    """HTTP upgrade + ServerKey/ClientInfo/ServerInfo on a fresh stream.

    Returns (server key, the decoder to keep feeding, frames that arrived after ServerInfo). Raises
    HandshakeError (SelfConnectError for a key in `refuse_server_keys`, checked before ClientInfo is
    sent), ClientProtocolError for a DERP violation, EOFError if the relay hangs up.
    """
    writer.write(upgrade_request(host, port, tls=tls, user_agent=user_agent))
    response = UpgradeResponse()
    data: bytes | None = None
    while data is None:
        chunk = await reader.read(_READ_SIZE)
        if not chunk:
            raise EOFError("relay closed the connection before the DERP upgrade")
        data = response.feed(chunk)
    conn = ClientConnection(private_key, mesh_key=mesh_key)
    refused = set(refuse_server_keys)
    while True:
        connected, frames = conn.receive_frames(data)
        if conn.server_key is not None and conn.server_key in refused:
            raise SelfConnectError("the relay's key is one this link refuses (it is this relay itself)")
        out = conn.data_to_send()
        if out:
            writer.write(out)
        if connected is not None:
            return connected.server_key, conn.decoder, frames
        data = await reader.read(_READ_SIZE)
        if not data:
            if conn.server_key is None:
                raise EOFError("closed before ServerKey")
            raise EOFError("relay closed the connection after ClientInfo (wrong mesh key?)")
