"""UAPI codec (fixed strings) and server (driven by the stock `wg` tool over the real socket)."""

from __future__ import annotations

import asyncio
import base64
import errno
import ipaddress
import os
import shutil
import socket
import stat
import uuid
from collections.abc import Awaitable, Callable

import pytest
import uvloop
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from turbowg.device import Device
from turbowg.uapi.model import (
    DeviceSnapshot,
    DeviceUpdate,
    PeerSnapshot,
    PeerUpdate,
    UAPIError,
)
from turbowg.uapi.protocol import (
    MAX_LINE_LENGTH,
    UAPIConnection,
    format_get,
    get_reply,
    parse_set,
    stats_reply,
    status_reply,
)
from turbowg.uapi.server import UAPIServer, start_uapi_server

K1 = bytes(range(32))
K2 = bytes(range(32, 64))
K3 = bytes([0xAB] * 32)
PSK = bytes([0x11] * 32)
net = ipaddress.ip_network


def public_of(private: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


# ------------------------------------------------------------------------------------------------
# parse_set
# ------------------------------------------------------------------------------------------------

def test_parse_every_key() -> None:
    lines = [
        f"private_key={K1.hex()}",
        "listen_port=51820",
        "fwmark=4660",
        "replace_peers=true",
        f"public_key={K2.hex()}",
        "update_only=true",
        f"preshared_key={PSK.hex().upper()}",
        "endpoint=192.0.2.1:51820",
        "persistent_keepalive_interval=25",
        "replace_allowed_ips=true",
        "allowed_ip=10.0.0.0/24",
        "allowed_ip=fd00::/64",
        "protocol_version=1",
        f"public_key={K3.hex()}",
        "remove=true",
    ]
    assert parse_set(lines) == DeviceUpdate(
        private_key=K1,
        listen_port=51820,
        fwmark=4660,
        replace_peers=True,
        peers=[
            PeerUpdate(public_key=K2, update_only=True, preshared_key=PSK, endpoint=("192.0.2.1", 51820),
                       persistent_keepalive_interval=25, replace_allowed_ips=True,
                       allowed_ips=[net("10.0.0.0/24"), net("fd00::/64")], protocol_version=1),
            PeerUpdate(public_key=K3, remove=True),
        ],
    )


def test_parse_empty_set_changes_nothing() -> None:
    assert parse_set([]) == DeviceUpdate()


def test_parse_zero_keys_mean_clear() -> None:
    update = parse_set([f"private_key={'0' * 64}", f"public_key={K2.hex()}", f"preshared_key={'0' * 64}"])
    assert update.private_key == bytes(32)
    assert update.peers[0].preshared_key == bytes(32)


def test_parse_limits_inclusive() -> None:
    update = parse_set(["listen_port=65535", "fwmark=4294967295", f"public_key={K2.hex()}",
                        "persistent_keepalive_interval=65535"])
    assert (update.listen_port, update.fwmark) == (65535, 4294967295)
    assert update.peers[0].persistent_keepalive_interval == 65535
    update = parse_set(["listen_port=0", "fwmark=0", f"public_key={K2.hex()}", "persistent_keepalive_interval=0"])
    assert (update.listen_port, update.fwmark, update.peers[0].persistent_keepalive_interval) == (0, 0, 0)


def test_parse_replace_allowed_ips_drops_earlier_ones() -> None:
    update = parse_set([f"public_key={K2.hex()}", "allowed_ip=10.1.0.0/16", "replace_allowed_ips=true",
                        "allowed_ip=10.2.0.0/16"])
    peer = update.peers[0]
    assert peer.replace_allowed_ips and peer.allowed_ips == [net("10.2.0.0/16")]


def test_parse_allowed_ip_masks_host_bits() -> None:
    update = parse_set([f"public_key={K2.hex()}", "allowed_ip=10.0.0.7/24", "allowed_ip=fd00::1234/64",
                        "allowed_ip=0.0.0.0/0", "allowed_ip=::/0", "allowed_ip=192.0.2.9/32",
                        "allowed_ip=2001:DB8::1/128"])
    assert update.peers[0].allowed_ips == [net("10.0.0.0/24"), net("fd00::/64"), net("0.0.0.0/0"), net("::/0"),
                                           net("192.0.2.9/32"), net("2001:db8::1/128")]


def test_parse_allowed_ip_removal() -> None:
    """`allowed_ip=-PREFIX` (wireguard-go since 2025, `wg set ... allowed-ips -PREFIX`) removes one prefix."""
    update = parse_set([f"public_key={K2.hex()}", "allowed_ip=-10.0.0.7/24", "allowed_ip=-fd00::1/64",
                        "allowed_ip=10.9.0.0/16"])
    assert update.peers == [PeerUpdate(public_key=K2, allowed_ips=[net("10.9.0.0/16")],
                                       remove_allowed_ips=[net("10.0.0.0/24"), net("fd00::/64")])]


def test_parse_allowed_ip_removal_in_line_order() -> None:
    # A removal cancels an addition of the same prefix earlier in the section; an addition after a removal
    # stands (the device removes first, then adds).
    update = parse_set([f"public_key={K2.hex()}", "allowed_ip=10.1.0.0/16", "allowed_ip=10.2.0.0/16",
                        "allowed_ip=-10.1.0.0/16", "allowed_ip=-10.3.0.0/16", "allowed_ip=10.3.0.0/16"])
    peer = update.peers[0]
    assert peer.allowed_ips == [net("10.2.0.0/16"), net("10.3.0.0/16")]
    assert peer.remove_allowed_ips == [net("10.1.0.0/16"), net("10.3.0.0/16")]
    # replace_allowed_ips drops every earlier line about allowed IPs, removals included.
    update = parse_set([f"public_key={K2.hex()}", "allowed_ip=-10.1.0.0/16", "replace_allowed_ips=true",
                        "allowed_ip=-10.2.0.0/16"])
    assert update.peers[0].replace_allowed_ips and update.peers[0].remove_allowed_ips == [net("10.2.0.0/16")]
    # remove=true wins over removals too.
    update = parse_set([f"public_key={K2.hex()}", "allowed_ip=-10.1.0.0/16", "remove=true",
                        "allowed_ip=-10.2.0.0/16"])
    assert update.peers == [PeerUpdate(public_key=K2, remove=True)]


@pytest.mark.parametrize("value", ["-", "--10.0.0.0/24", "-10.0.0.0", "- 10.0.0.0/24", "-10.0.0.0/33"])
def test_parse_refuses_malformed_allowed_ip_removal(value: str) -> None:
    with pytest.raises(UAPIError) as info:
        parse_set([f"public_key={K2.hex()}", f"allowed_ip={value}"])
    assert info.value.errno == errno.EINVAL and "allowed_ip" in str(info.value)


def test_parse_remove_wins_over_other_lines_of_that_peer() -> None:
    update = parse_set([f"public_key={K2.hex()}", "endpoint=192.0.2.1:1", "allowed_ip=10.0.0.0/8", "remove=true",
                        "allowed_ip=10.9.0.0/16", "persistent_keepalive_interval=5", f"public_key={K3.hex()}",
                        "allowed_ip=10.3.0.0/16"])
    assert update.peers == [PeerUpdate(public_key=K2, remove=True),
                            PeerUpdate(public_key=K3, allowed_ips=[net("10.3.0.0/16")])]


def test_parse_lines_after_remove_are_still_validated() -> None:
    with pytest.raises(UAPIError) as info:
        parse_set([f"public_key={K2.hex()}", "remove=true", "allowed_ip=nonsense"])
    assert info.value.errno == errno.EINVAL and "line 3" in str(info.value)


def test_parse_same_peer_twice_gives_two_updates_in_order() -> None:
    update = parse_set([f"public_key={K2.hex()}", "allowed_ip=10.0.0.0/8", f"public_key={K2.hex()}", "remove=true"])
    assert [p.remove for p in update.peers] == [False, True]


@pytest.mark.parametrize(("text", "expected"), [
    ("192.0.2.1:51820", ("192.0.2.1", 51820)),
    ("[2001:db8::1]:51820", ("2001:db8::1", 51820)),
    ("[2001:DB8:0:0::1]:1", ("2001:db8::1", 1)),
    ("[::1]:0", ("::1", 0)),
    ("[fe80::1%eth0]:51820", ("fe80::1%eth0", 51820)),
    ("[::ffff:192.0.2.1]:7", ("::ffff:192.0.2.1", 7)),
    ("127.0.0.1:00080", ("127.0.0.1", 80)),
])
def test_parse_endpoints(text: str, expected: tuple[str, int]) -> None:
    assert parse_set([f"public_key={K2.hex()}", f"endpoint={text}"]).peers[0].endpoint == expected


BAD_REQUESTS = [
    # (lines, errno, fragment of the message)
    (["listen_port"], errno.EPROTO, "no '='"),
    (["private_key=abc"], errno.EINVAL, "private_key"),
    ([f"private_key={K1.hex()}00"], errno.EINVAL, "private_key"),
    ([f"private_key={'g' * 64}"], errno.EINVAL, "private_key"),
    ([f"private_key= {K1.hex()[1:]}"], errno.EINVAL, "private_key"),
    (["listen_port=65536"], errno.EINVAL, "listen_port"),
    (["listen_port=-1"], errno.EINVAL, "listen_port"),
    (["listen_port=+1"], errno.EINVAL, "listen_port"),
    (["listen_port="], errno.EINVAL, "listen_port"),
    (["listen_port=0x10"], errno.EINVAL, "listen_port"),
    (["listen_port=５"], errno.EINVAL, "listen_port"),
    (["fwmark=4294967296"], errno.EINVAL, "fwmark"),
    (["replace_peers=false"], errno.EINVAL, "replace_peers"),
    (["bogus=1"], errno.EINVAL, "invalid UAPI device key 'bogus'"),
    (["=1"], errno.EINVAL, "invalid UAPI device key ''"),
    (["remove=true"], errno.EINVAL, "invalid UAPI device key 'remove'"),
    (["public_key=1234"], errno.EINVAL, "public_key"),
    ([f"public_key={K2.hex()}", "listen_port=1"], errno.EINVAL, "invalid UAPI peer key 'listen_port'"),
    ([f"public_key={K2.hex()}", "bogus=1"], errno.EINVAL, "invalid UAPI peer key 'bogus'"),
    ([f"public_key={K2.hex()}", "update_only=yes"], errno.EINVAL, "update_only"),
    ([f"public_key={K2.hex()}", "remove=1"], errno.EINVAL, "remove"),
    ([f"public_key={K2.hex()}", "replace_allowed_ips=TRUE"], errno.EINVAL, "replace_allowed_ips"),
    ([f"public_key={K2.hex()}", "preshared_key=zz"], errno.EINVAL, "preshared_key"),
    ([f"public_key={K2.hex()}", "persistent_keepalive_interval=65536"], errno.EINVAL, "persistent_keepalive"),
    ([f"public_key={K2.hex()}", "persistent_keepalive_interval=1.5"], errno.EINVAL, "persistent_keepalive"),
    ([f"public_key={K2.hex()}", "protocol_version=2"], errno.EINVAL, "protocol_version"),
    ([f"public_key={K2.hex()}", "endpoint=localhost:51820"], errno.EINVAL, "endpoint"),
    ([f"public_key={K2.hex()}", "endpoint=example.com:51820"], errno.EINVAL, "endpoint"),
    ([f"public_key={K2.hex()}", "endpoint=192.0.2.1"], errno.EINVAL, "endpoint"),
    ([f"public_key={K2.hex()}", "endpoint=192.0.2.1:"], errno.EINVAL, "endpoint"),
    ([f"public_key={K2.hex()}", "endpoint=192.0.2.1:65536"], errno.EINVAL, "endpoint"),
    ([f"public_key={K2.hex()}", "endpoint=[192.0.2.1]:1"], errno.EINVAL, "endpoint"),
    ([f"public_key={K2.hex()}", "endpoint=2001:db8::1:51820"], errno.EINVAL, "endpoint"),
    ([f"public_key={K2.hex()}", "endpoint=[2001:db8::1]51820"], errno.EINVAL, "endpoint"),
    ([f"public_key={K2.hex()}", "endpoint=192.0.2.1%eth0:1"], errno.EINVAL, "endpoint"),
    ([f"public_key={K2.hex()}", "endpoint=01.2.3.4:1"], errno.EINVAL, "endpoint"),
    ([f"public_key={K2.hex()}", "allowed_ip=10.0.0.0"], errno.EINVAL, "allowed_ip"),
    ([f"public_key={K2.hex()}", "allowed_ip=10.0.0.0/33"], errno.EINVAL, "allowed_ip"),
    ([f"public_key={K2.hex()}", "allowed_ip=10.0.0.0/024"], errno.EINVAL, "allowed_ip"),
    ([f"public_key={K2.hex()}", "allowed_ip=10.0.0.0/255.255.255.0"], errno.EINVAL, "allowed_ip"),
    ([f"public_key={K2.hex()}", "allowed_ip=fd00::/129"], errno.EINVAL, "allowed_ip"),
    ([f"public_key={K2.hex()}", "allowed_ip=fe80::%eth0/64"], errno.EINVAL, "allowed_ip"),
    ([f"public_key={K2.hex()}", "allowed_ip=example.com/24"], errno.EINVAL, "allowed_ip"),
    ([f"public_key={K2.hex()}", "allowed_ip=10.0.0.0/"], errno.EINVAL, "allowed_ip"),
]


@pytest.mark.parametrize(("lines", "code", "fragment"), BAD_REQUESTS)
def test_parse_refuses_malformed_lines(lines: list[str], code: int, fragment: str) -> None:
    with pytest.raises(UAPIError) as info:
        parse_set(lines)
    assert info.value.errno == code
    message = str(info.value)
    assert f"line {len(lines)} " in message and fragment in message


def test_parse_error_names_line_but_never_prints_secrets() -> None:
    secret = "f" * 63 + "x"
    with pytest.raises(UAPIError) as info:
        parse_set(["listen_port=1", f"private_key={secret}"])
    assert "line 2 'private_key=<redacted>'" in str(info.value) and secret not in str(info.value)
    with pytest.raises(UAPIError) as info:
        parse_set([f"public_key={K2.hex()}", f"preshared_key={secret}"])
    assert secret not in str(info.value) and "line 2" in str(info.value)


# ------------------------------------------------------------------------------------------------
# format_get
# ------------------------------------------------------------------------------------------------

def test_format_get_exact_text() -> None:
    snapshot = DeviceSnapshot(private_key=K1, listen_port=51820, fwmark=0, peers=[
        PeerSnapshot(public_key=K2, preshared_key=PSK, endpoint=("2001:db8::1", 51820),
                     last_handshake_time_sec=1700000000, last_handshake_time_nsec=123456789, tx_bytes=10,
                     rx_bytes=20, persistent_keepalive_interval=25,
                     allowed_ips=[net("10.0.0.0/24"), net("fd00::/64")]),
        PeerSnapshot(public_key=K3, preshared_key=bytes(32), endpoint=None, last_handshake_time_sec=0,
                     last_handshake_time_nsec=0, tx_bytes=0, rx_bytes=0, persistent_keepalive_interval=0,
                     allowed_ips=[net("::ffff:192.0.2.0/120")]),
    ])
    assert format_get(snapshot) == (
        f"private_key={K1.hex()}\n"
        "listen_port=51820\n"
        f"public_key={K2.hex()}\n"
        f"preshared_key={PSK.hex()}\n"
        "protocol_version=1\n"
        "endpoint=[2001:db8::1]:51820\n"
        "last_handshake_time_sec=1700000000\n"
        "last_handshake_time_nsec=123456789\n"
        "tx_bytes=10\n"
        "rx_bytes=20\n"
        "persistent_keepalive_interval=25\n"
        "allowed_ip=10.0.0.0/24\n"
        "allowed_ip=fd00::/64\n"
        f"public_key={K3.hex()}\n"
        f"preshared_key={'0' * 64}\n"
        "protocol_version=1\n"
        "last_handshake_time_sec=0\n"
        "last_handshake_time_nsec=0\n"
        "tx_bytes=0\n"
        "rx_bytes=0\n"
        "persistent_keepalive_interval=0\n"
        "allowed_ip=::ffff:192.0.2.0/120\n"
    )


def test_format_get_omits_unset_device_fields_and_writes_fwmark() -> None:
    assert format_get(DeviceSnapshot(private_key=None, listen_port=0, fwmark=0, peers=[])) == ""
    assert format_get(DeviceSnapshot(private_key=bytes(32), listen_port=0, fwmark=7, peers=[])) == "fwmark=7\n"
    peer = PeerSnapshot(public_key=K2, preshared_key=bytes(32), endpoint=("192.0.2.1", 9), last_handshake_time_sec=0,
                        last_handshake_time_nsec=0, tx_bytes=0, rx_bytes=0, persistent_keepalive_interval=0,
                        allowed_ips=[])
    reply = get_reply(DeviceSnapshot(private_key=None, listen_port=0, fwmark=0, peers=[peer]))
    assert b"endpoint=192.0.2.1:9\n" in reply and reply.endswith(b"persistent_keepalive_interval=0\nerrno=0\n\n")


def test_status_reply_negates_errno_like_wireguard_go() -> None:
    assert status_reply() == b"errno=0\n\n"
    assert status_reply(errno.EINVAL) == b"errno=-22\n\n"


# ------------------------------------------------------------------------------------------------
# UAPIConnection framing
# ------------------------------------------------------------------------------------------------

def test_connection_frames_byte_by_byte_and_pipelined() -> None:
    stream = b"get=1\n\nset=1\nlisten_port=1\r\nfwmark=2\n\nset=1\n\nget=1\n\n"
    one = UAPIConnection()
    byte_by_byte = [r for i in range(len(stream)) for r in one.receive_data(stream[i:i + 1])]
    whole = UAPIConnection().receive_data(stream)
    for requests in (byte_by_byte, whole):
        assert [(r.kind, r.lines, r.error) for r in requests] == [
            ("get", [], None), ("set", ["listen_port=1", "fwmark=2"], None), ("set", [], None), ("get", [], None)]


def test_connection_stats_extension() -> None:
    requests = UAPIConnection().receive_data(b"stats=1\n\nstats=1\nx")
    assert [(r.kind, r.error is None) for r in requests] == [("stats", True), ("stats", False)]
    assert stats_reply({"drop_b": 2, "drop_a": 1, "bad name": 5, "x=y": 1}) == b"drop_a=1\ndrop_b=2\nerrno=0\n\n"


def test_connection_get_with_trailing_character_is_an_error() -> None:
    connection = UAPIConnection()
    requests = connection.receive_data(b"get=1\nx")
    assert len(requests) == 1 and requests[0].error is not None and requests[0].error.errno == errno.EINVAL
    assert not connection.closed


def test_connection_invalid_operation_closes() -> None:
    connection = UAPIConnection()
    requests = connection.receive_data(b"get=1\n\nhello\nget=1\n\n")
    assert [r.kind for r in requests] == ["get", "invalid"] and requests[1].operation == "hello"
    assert connection.closed and connection.receive_data(b"get=1\n\n") == []


def test_connection_eof_ends_a_partial_set() -> None:
    connection = UAPIConnection()
    assert connection.receive_data(b"set=1\nlisten_port=5\nfwmark=1") == []
    requests = connection.receive_eof()
    assert [(r.kind, r.lines) for r in requests] == [("set", ["listen_port=5", "fwmark=1"])]
    assert connection.closed
    assert UAPIConnection().receive_eof() == []


def test_connection_refuses_oversized_lines() -> None:
    connection = UAPIConnection()
    requests = connection.receive_data(b"set=1\nallowed_ip=" + b"1" * MAX_LINE_LENGTH)
    assert len(requests) == 1 and requests[0].kind == "set" and requests[0].error is not None
    assert requests[0].error.errno == errno.EIO and connection.closed
    connection = UAPIConnection()
    assert [r.kind for r in connection.receive_data(b"g" * (MAX_LINE_LENGTH + 1))] == ["invalid"]


# ------------------------------------------------------------------------------------------------
# Server, driven by the stock `wg` tool
# ------------------------------------------------------------------------------------------------

SOCKET_DIR = "/var/run/wireguard"  # compiled into wg; the server tests must use it
needs_wg = pytest.mark.skipif(shutil.which("wg") is None or os.geteuid() != 0, reason="needs root and wg(8)")
TIMEOUT = 20.0


def unique_iface() -> str:
    return f"twgu{uuid.uuid4().hex[:8]}"


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


async def wg(*args: str, check: bool = True) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec("wg", *args, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(process.communicate(), TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    code = process.returncode
    assert code is not None
    if check and code != 0:
        raise AssertionError(f"wg {' '.join(args)} failed ({code}): {err.decode()}")
    return code, out.decode(), err.decode()


async def raw_exchange(path: str, payload: bytes, replies: int) -> list[bytes]:
    """Send `payload` on one connection and read `replies` answers (each ends with a blank line)."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(payload)
        await writer.drain()
        answers = []
        for _ in range(replies):
            answers.append(await asyncio.wait_for(reader.readuntil(b"\n\n"), TIMEOUT))
        return answers
    finally:
        writer.close()


def run_with_server(body: Callable[[UAPIServer, Device, str], Awaitable[None]], *, use_uvloop: bool = False,
                    on_set: Callable[..., None] | None = None) -> None:
    iface = unique_iface()
    path = os.path.join(SOCKET_DIR, f"{iface}.sock")

    async def main() -> None:
        device = Device()
        server = await start_uapi_server(iface, device, socket_dir=SOCKET_DIR, on_set=on_set)
        try:
            await asyncio.wait_for(body(server, device, iface), 4 * TIMEOUT)
        finally:
            server.close()
            await server.wait_closed()
        assert not os.path.exists(path)

    try:
        if use_uvloop:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(main())
        else:
            asyncio.run(main())
    finally:
        if os.path.lexists(path):
            os.unlink(path)


@needs_wg
def test_server_with_wg_set_show_showconf_remove(tmp_path) -> None:
    private = X25519PrivateKey.generate().private_bytes_raw()
    peer_public = public_of(X25519PrivateKey.generate().private_bytes_raw())
    key_file = tmp_path / "private"
    key_file.write_text(b64(private) + "\n")
    key_file.chmod(0o600)

    async def body(server: UAPIServer, device: Device, iface: str) -> None:
        st = os.stat(server.path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o077 == 0
        await wg("set", iface, "private-key", str(key_file), "listen-port", "45678", "peer", b64(peer_public),
                 "allowed-ips", "10.0.0.0/24,fd00::/64", "endpoint", "127.0.0.1:51820", "persistent-keepalive", "25")
        assert device.listen_port == 45678 and device.private_key == private
        assert device.snapshot().peers[0].allowed_ips == [net("10.0.0.0/24"), net("fd00::/64")]

        _, dump, _ = await wg("show", iface, "dump")
        device_line, peer_line = dump.strip().split("\n")
        assert device_line.split("\t") == [b64(private), b64(public_of(private)), "45678", "off"]
        # The device may already count a handshake initiation it queued (keepalive switched on) as sent.
        tx_bytes = device.snapshot().peers[0].tx_bytes
        assert peer_line.split("\t") == [b64(peer_public), "(none)", "127.0.0.1:51820", "10.0.0.0/24,fd00::/64",
                                         "0", "0", str(tx_bytes), "25"]

        _, shown, _ = await wg("show", iface)
        assert f"interface: {iface}" in shown and "endpoint: 127.0.0.1:51820" in shown

        _, conf, _ = await wg("showconf", iface)
        assert f"PrivateKey = {b64(private)}" in conf and "ListenPort = 45678" in conf
        assert "AllowedIPs = 10.0.0.0/24, fd00::/64" in conf and "PersistentKeepalive = 25" in conf

        await wg("set", iface, "peer", b64(peer_public), "endpoint", "[2001:db8::7]:9", "allowed-ips", "192.0.2.0/24")
        _, endpoints, _ = await wg("show", iface, "endpoints")
        assert endpoints.split() == [b64(peer_public), "[2001:db8::7]:9"]
        _, ips, _ = await wg("show", iface, "allowed-ips")
        assert ips.split("\t")[1].split() == ["192.0.2.0/24"]  # allowed-ips replaces the list, as wg does

        await wg("set", iface, "peer", b64(peer_public), "remove")
        assert device.peers == {}
        _, peers, _ = await wg("show", iface, "peers")
        assert peers.strip() == ""

    run_with_server(body)


@needs_wg
def test_server_with_wg_setconf_replaces_peers(tmp_path) -> None:
    private = X25519PrivateKey.generate().private_bytes_raw()
    old_peer, new_peer = (public_of(X25519PrivateKey.generate().private_bytes_raw()) for _ in range(2))
    conf = tmp_path / "wg.conf"
    conf.write_text(
        f"[Interface]\nPrivateKey = {b64(private)}\nListenPort = 40001\nFwMark = 0x10\n\n"
        f"[Peer]\nPublicKey = {b64(new_peer)}\nPresharedKey = {b64(PSK)}\n"
        "AllowedIPs = 10.7.0.0/16, fd07::/48\nEndpoint = [::1]:40002\n")

    async def body(server: UAPIServer, device: Device, iface: str) -> None:
        await wg("set", iface, "peer", b64(old_peer), "allowed-ips", "10.9.0.0/16")
        await wg("setconf", iface, str(conf))
        assert list(device.peers) == [new_peer]
        _, dump, _ = await wg("show", iface, "dump")
        device_line, peer_line = dump.strip().split("\n")
        assert device_line.split("\t")[2:] == ["40001", "0x10"]
        assert peer_line.split("\t")[:4] == [b64(new_peer), b64(PSK), "[::1]:40002", "10.7.0.0/16,fd07::/48"]
        _, showconf, _ = await wg("showconf", iface)
        assert "FwMark = 0x10" in showconf and f"PresharedKey = {b64(PSK)}" in showconf

    run_with_server(body, use_uvloop=True)


@needs_wg
def test_server_malformed_set_gets_errno_and_connection_keeps_working() -> None:
    async def body(server: UAPIServer, device: Device, iface: str) -> None:
        await wg("set", iface, "listen-port", "40100")
        payload = (b"set=1\nlisten_port=40200\nlisten_port=banana\n\n"  # bad line: nothing applied
                   b"get=1\n\n"
                   b"set=1\nnonsense\n\n"
                   b"set=1\nfwmark=3\n\n"
                   b"get=1\n\n")
        bad, got, bad2, ok, got2 = await raw_exchange(server.path, payload, 5)
        assert bad == b"errno=-22\n\n" and bad2 == b"errno=-71\n\n" and ok == b"errno=0\n\n"
        assert got == b"listen_port=40100\nerrno=0\n\n"
        assert got2 == b"listen_port=40100\nfwmark=3\nerrno=0\n\n"
        assert device.listen_port == 40100
        # An unknown operation closes that connection only; the server still answers others.
        reader, writer = await asyncio.open_unix_connection(server.path)
        writer.write(b"frobnicate=1\n")
        assert await asyncio.wait_for(reader.read(), TIMEOUT) == b""
        writer.close()
        _, dump, _ = await wg("show", iface, "dump")
        assert dump.split("\t")[2] == "40100"

    run_with_server(body)


@needs_wg
def test_server_refusal_after_apply_is_reported_to_wg() -> None:
    def on_set() -> None:
        if device_ref[0].listen_port == 40300:
            raise OSError(errno.EADDRINUSE, "Address already in use")

    device_ref: list[Device] = []

    async def body(server: UAPIServer, device: Device, iface: str) -> None:
        device_ref.append(device)
        code, _, err = await wg("set", iface, "listen-port", "40300", check=False)
        assert code != 0 and "Address already in use" in err
        code, _, err = await wg("set", iface, "listen-port", "40301", check=False)
        assert code == 0, err

    run_with_server(body, on_set=on_set)


@needs_wg
def test_server_hands_what_the_device_queued_to_on_set(tmp_path) -> None:
    private = X25519PrivateKey.generate().private_bytes_raw()
    peer_public = public_of(X25519PrivateKey.generate().private_bytes_raw())
    key_file = tmp_path / "private"
    key_file.write_text(b64(private) + "\n")
    applied: list[object] = []

    async def body(server: UAPIServer, device: Device, iface: str) -> None:
        await wg("set", iface, "private-key", str(key_file), "peer", b64(peer_public), "endpoint", "127.0.0.1:9",
                 "persistent-keepalive", "25")
        # Switching the keepalive on queues a handshake initiation (148 bytes) for the runtime to send.
        (transmit,) = applied[-1]  # type: ignore[misc]
        assert transmit.endpoint == ("127.0.0.1", 9) and [len(d) for d in transmit.datagrams] == [148]

    run_with_server(body, on_set=applied.append)


@needs_wg
def test_server_device_uapi_error_is_reported_to_wg() -> None:
    async def body(server: UAPIServer, device: Device, iface: str) -> None:
        def refuse(update: DeviceUpdate) -> None:
            raise UAPIError(errno.EINVAL, "refused by device")

        device.apply_update = refuse  # type: ignore[method-assign]
        code, _, err = await wg("set", iface, "listen-port", "40400", check=False)
        assert code != 0 and "Invalid argument" in err

    run_with_server(body)


@needs_wg
def test_server_stats_extension_reports_device_counters() -> None:
    async def body(server: UAPIServer, device: Device, iface: str) -> None:
        device.handle_udp_batch([(b"\x09junk", ("127.0.0.1", 1))], 0.0)
        assert sum(device.counters.values()) > 0
        (answer,) = await raw_exchange(server.path, b"stats=1\n\n", 1)
        expected = "".join(f"{k}={v}\n" for k, v in sorted(device.counters.items()))
        assert answer.decode() == expected + "errno=0\n\n"

    run_with_server(body)


@needs_wg
def test_stale_socket_replaced_live_socket_refused() -> None:
    iface = unique_iface()
    path = os.path.join(SOCKET_DIR, f"{iface}.sock")

    async def main() -> None:
        os.makedirs(SOCKET_DIR, exist_ok=True)
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(path)
        stale.close()  # leaves the file behind, nobody listening
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        server = await start_uapi_server(iface, Device(), socket_dir=SOCKET_DIR)
        try:
            with pytest.raises(OSError) as info:
                await start_uapi_server(iface, Device(), socket_dir=SOCKET_DIR)
            assert info.value.errno == errno.EADDRINUSE
            assert (await raw_exchange(path, b"get=1\n\n", 1)) == [b"errno=0\n\n"]
        finally:
            server.close()
        assert not os.path.exists(path)

    try:
        asyncio.run(main())
    finally:
        if os.path.lexists(path):
            os.unlink(path)


def test_non_socket_file_is_left_alone(tmp_path) -> None:
    (tmp_path / "twgx.sock").write_text("not a socket")

    async def main() -> None:
        with pytest.raises(OSError):
            await start_uapi_server("twgx", Device(), socket_dir=str(tmp_path))

    asyncio.run(main())
    assert (tmp_path / "twgx.sock").read_text() == "not a socket"


@pytest.mark.parametrize("name", ["", "a/b", "..", "."])
def test_bad_interface_names_refused(tmp_path, name: str) -> None:
    with pytest.raises(ValueError):
        asyncio.run(start_uapi_server(name, Device(), socket_dir=str(tmp_path)))


def test_socket_dir_created_and_removal_reported(tmp_path) -> None:
    socket_dir = tmp_path / "run" / "wireguard"

    async def main() -> None:
        removed = asyncio.Event()
        server = await start_uapi_server("twgr", Device(), socket_dir=str(socket_dir), on_removed=removed.set)
        try:
            assert stat.S_IMODE(os.stat(socket_dir).st_mode) & 0o022 == 0
            os.unlink(server.path)
            await asyncio.wait_for(removed.wait(), 5)
        finally:
            server.close()

    asyncio.run(main())
    assert not (socket_dir / "twgr.sock").exists()
