"""What one UAPI connection may make the daemon buffer: bounded, whatever the client does.

A client that pipelines many `get=1` without reading the answers must not grow the daemon (the server stops
reading while its answers are unread); a `set` larger than MAX_REQUEST_SIZE is refused with an error and the
connection closed; other connections are served meanwhile; a `set` with thousands of peers still works.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import shutil
import socket
import subprocess
import time

import pytest

from turbowg.testing.daemon import turbowgd_in_namespace
from turbowg.uapi.model import DeviceSnapshot, DeviceUpdate, PeerSnapshot
from turbowg.uapi.protocol import MAX_LINE_LENGTH, MAX_REQUEST_SIZE, UAPIConnection, get_reply
from turbowg.uapi.server import UAPIServer, start_uapi_server

needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or not os.path.exists("/dev/net/tun"),
    reason="needs root, iproute2 and /dev/net/tun")

PEERS = 20  # a get=1 answer of ~6 KB: a 7-byte request is amplified ~1000 times


class BigDevice:
    """A device whose every `get` answer is a few kilobytes; records the updates it is given."""

    def __init__(self, peers: int = PEERS) -> None:
        self.updates: list[DeviceUpdate] = []
        self.peers = [
            PeerSnapshot(public_key=i.to_bytes(32, "big"), preshared_key=bytes(32), endpoint=("192.0.2.1", 51820),
                         last_handshake_time_sec=0, last_handshake_time_nsec=0, tx_bytes=0, rx_bytes=0,
                         persistent_keepalive_interval=0,
                         allowed_ips=[ipaddress.ip_network(f"10.{i}.{j}.0/24") for j in range(4)])
            for i in range(1, peers + 1)
        ]

    def apply_update(self, update: DeviceUpdate) -> None:
        self.updates.append(update)

    def snapshot(self) -> DeviceSnapshot:
        return DeviceSnapshot(private_key=bytes([1]) * 32, listen_port=51820, fwmark=0, peers=self.peers)


def reply_size() -> int:
    return len(get_reply(BigDevice().snapshot()))


async def serve(tmp_path, device: BigDevice) -> UAPIServer:
    return await start_uapi_server("twgl", device, socket_dir=str(tmp_path))


def buffered(server: UAPIServer) -> int:
    return sum(writer.transport.get_write_buffer_size() for writer in server._writers)


async def get_once(path: str) -> bytes:
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(b"get=1\n\n")
        return await asyncio.wait_for(reader.readuntil(b"errno=0\n\n"), 10)
    finally:
        writer.close()


def test_pipelined_gets_without_reading_stay_bounded(tmp_path) -> None:
    async def main() -> None:
        server = await serve(tmp_path, BigDevice())
        flood = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            flood.setblocking(False)
            flood.connect(server.path)
            loop = asyncio.get_running_loop()
            payload = b"get=1\n\n" * 100_000
            sender = loop.create_task(loop.sock_sendall(flood, payload))  # never read what comes back
            await asyncio.sleep(1.0)
            # One answer over the transport's high-water mark at most, not thousands of answers.
            assert buffered(server) <= 256 * 1024 + reply_size(), buffered(server)
            # Another connection is still served meanwhile.
            answer = await get_once(server.path)
            assert answer.endswith(b"errno=0\n\n") and len(answer) == reply_size()
            assert buffered(server) <= 256 * 1024 + reply_size()
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
        finally:
            flood.close()
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_pipelined_gets_are_all_answered_once_the_client_reads(tmp_path) -> None:
    """Flow control loses nothing: a client that reads late still gets every answer, in order."""
    count = 3000

    async def main() -> None:
        server = await serve(tmp_path, BigDevice(peers=2))
        reader, writer = await asyncio.open_unix_connection(server.path)
        try:
            writer.write(b"get=1\n\n" * count + b"set=1\nlisten_port=7\n\n")
            await asyncio.sleep(0.5)  # the server stalls on its unread answers
            one = len(get_reply(BigDevice(peers=2).snapshot()))
            data = await asyncio.wait_for(reader.readexactly(one * count + len(b"errno=0\n\n")), 30)
            assert data.count(b"errno=0\n\n") == count + 1
        finally:
            writer.close()
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_oversized_set_is_refused_logged_and_the_connection_closed(tmp_path, caplog) -> None:
    line = b"allowed_ip=10.0.0.0/24\n"

    async def main() -> None:
        device = BigDevice()
        server = await serve(tmp_path, device)
        reader, writer = await asyncio.open_unix_connection(server.path)
        try:
            writer.write(b"set=1\npublic_key=" + b"ab" * 32 + b"\n")
            sent = 0
            while sent <= MAX_REQUEST_SIZE + len(line):
                writer.write(line * 4096)
                sent += len(line) * 4096
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                if reader.at_eof():
                    break
            answer = await asyncio.wait_for(reader.read(), 10)  # the answer, then EOF: closed
            assert answer == f"errno={-errno.EMSGSIZE}\n\n".encode()
            assert device.updates == []
            # The server is fine.
            assert (await get_once(server.path)).endswith(b"errno=0\n\n")
        finally:
            writer.close()
            server.close()
            await server.wait_closed()

    with caplog.at_level(logging.ERROR, logger="turbowg.uapi"):
        asyncio.run(main())
    assert any(str(MAX_REQUEST_SIZE) in record.getMessage() or "MiB" in record.getMessage()
               for record in caplog.records), [r.getMessage() for r in caplog.records]


def test_set_with_thousands_of_peers_is_accepted(tmp_path) -> None:
    """A `wg setconf` of 10,000 peers (~3 MB: psk, endpoint, keepalive, two allowed IPs each) fits."""
    peers = 10_000
    text = "".join(
        f"public_key={i:064x}\npreshared_key={'11' * 32}\nendpoint=192.0.2.{i % 250 + 1}:{10000 + i}\n"
        f"persistent_keepalive_interval=25\nreplace_allowed_ips=true\n"
        f"allowed_ip=10.{i // 256 % 256}.{i % 256}.0/24\nallowed_ip=fd00::{i:x}/128\n"
        for i in range(1, peers + 1))
    payload = ("set=1\nprivate_key=" + "22" * 32 + "\nreplace_peers=true\n" + text + "\n").encode()
    assert 2_500_000 < len(payload) < MAX_REQUEST_SIZE

    async def main() -> None:
        device = BigDevice()
        server = await serve(tmp_path, device)
        reader, writer = await asyncio.open_unix_connection(server.path)
        try:
            writer.write(payload)
            assert await asyncio.wait_for(reader.readuntil(b"\n\n"), 30) == b"errno=0\n\n"
            assert len(device.updates) == 1 and len(device.updates[0].peers) == peers
        finally:
            writer.close()
            server.close()
            await server.wait_closed()

    asyncio.run(main())


def test_codec_request_limit() -> None:
    connection = UAPIConnection()
    line = b"allowed_ip=10.0.0.0/24\n"
    lines_to_limit = MAX_REQUEST_SIZE // len(line)
    assert connection.receive_data(b"set=1\npublic_key=" + b"ab" * 32 + b"\n") == []
    assert connection.receive_data(line * (lines_to_limit - 10)) == []
    requests = connection.receive_data(line * 20)
    assert len(requests) == 1 and requests[0].kind == "set" and requests[0].error is not None
    assert requests[0].error.errno == errno.EMSGSIZE and connection.closed
    assert requests[0].lines == []  # nothing of the oversized request is kept
    assert MAX_REQUEST_SIZE >= 1024 * MAX_LINE_LENGTH // 16  # room for thousands of peers


def test_codec_hands_out_requests_one_at_a_time() -> None:
    connection = UAPIConnection()
    connection.feed(b"get=1\n\n" * 3 + b"set=1\nfwmark=1\n\n")
    kinds = []
    while (request := connection.next_request()) is not None:
        kinds.append(request.kind)
    assert kinds == ["get", "get", "get", "set"]
    assert connection.next_request() is None


# ------------------------------------------------------------------------------------------------
# A real turbowgd: its memory does not grow with a pipelining client that never reads
# ------------------------------------------------------------------------------------------------

def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@needs_netns
def test_real_daemon_memory_stays_bounded_under_a_pipelining_client() -> None:
    with turbowgd_in_namespace("twglim") as daemon, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as flood:
        config = "set=1\nprivate_key=" + "11" * 32 + "\n" + "".join(
            f"public_key={i:064x}\nendpoint=192.0.2.1:{1000 + i}\nallowed_ip=10.{i}.0.0/24\nallowed_ip=10.{i}.1.0/24\n"
            for i in range(1, PEERS + 1)) + "\n"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as setter:
            setter.connect(daemon.socket)
            setter.sendall(config.encode())
            assert setter.recv(64) == b"errno=0\n\n"
        before = rss_kib(daemon.pid)
        flood.connect(daemon.socket)
        flood.setblocking(False)
        payload = b"get=1\n\n" * 100_000
        sent = 0
        deadline = time.monotonic() + 5
        while sent < len(payload) and time.monotonic() < deadline:
            try:
                sent += flood.send(payload[sent:sent + 65536])
            except BlockingIOError:
                time.sleep(0.01)
        time.sleep(1.5)
        growth = rss_kib(daemon.pid) - before
        assert growth < 16 * 1024, f"turbowgd grew by {growth} KiB"
        shown = subprocess.run(["wg", "show", daemon.ifname, "peers"], capture_output=True, text=True, timeout=10)
        assert shown.returncode == 0 and len(shown.stdout.split()) == PEERS, shown.stderr
        assert rss_kib(daemon.pid) - before < 16 * 1024


@pytest.fixture(autouse=True)
def _quiet_asyncio(caplog):
    caplog.set_level(logging.CRITICAL, logger="asyncio")
