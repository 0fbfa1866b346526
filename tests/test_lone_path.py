"""The lone-packet path (issue 13): Aead.seal_sendto / open_write, C against Python, and Device.send_lone /
receive_lone against the batch path they stand in for (handle_tun_packed / handle_udp_packed): two identical
device pairs (same keys, same randomness), one driven through each path, must send the same bytes, write the
same packets and end in the same state (counters, byte counts, send counters, timers, endpoints)."""

from __future__ import annotations

import errno
import os
import random
import socket
import struct
import threading
import time
from array import array

import pytest
import test_device_core
from test_device_core import A_ENDPOINT, A_V4, A_V6, B_ENDPOINT, B_V4, B_V6, Pair, ipv4_packet, ipv6_packet

from turbowg.device.constants import REKEY_AFTER_MESSAGES
from turbowg.device.receive import LONE_NOTHING, LONE_WRITE, LONE_WRITTEN
from turbowg.device.replay import ReplayWindow as PyReplayWindow
from turbowg.noise import handshake as noise_handshake
from turbowg.noise import transport
from turbowg.noise.transport import PyAead, pack_sockaddr
from turbowg.tun.vnet import ZERO_HDR

KEY = bytes(range(32))
MTU = 1420


def implementations() -> list:
    """PyAead and the C Aead (a recorded skip when the extension is not built)."""
    if transport.HAVE_C:
        from turbowg.noise._aead import Aead

        c_case = pytest.param((Aead, transport.CReplayWindow), id="c")
    else:
        c_case = pytest.param(None, id="c", marks=pytest.mark.skip(reason="C extension not built: C case not run"))
    return [pytest.param((PyAead, PyReplayWindow), id="py"), c_case]


@pytest.fixture
def udp_pair():
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    tx.bind(("::", 0))
    rx.settimeout(2)
    try:
        yield tx, rx, pack_sockaddr("127.0.0.1", rx.getsockname()[1])
    finally:
        rx.close()
        tx.close()


@pytest.fixture
def pipe():
    r, w = os.pipe()
    os.set_blocking(r, False)
    try:
        yield r, w
    finally:
        os.close(r)
        os.close(w)


def _drain(fd: int) -> bytes:
    try:
        return os.read(fd, 1 << 16)
    except BlockingIOError:
        return b""


def test_pack_sockaddr_reaches_ipv4_and_ipv6(udp_pair) -> None:
    tx, rx, addr = udp_pair
    assert transport._sendto_fd(tx.fileno(), b"four", addr) == 4 and rx.recv(100) == b"four"
    rx6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    with rx6:
        rx6.bind(("::1", 0))
        rx6.settimeout(2)
        assert transport._sendto_fd(tx.fileno(), b"six", pack_sockaddr("::1", rx6.getsockname()[1])) == 3
        assert rx6.recv(100) == b"six"
    with pytest.raises(ValueError):
        pack_sockaddr("127.0.0.1", 0)
    with pytest.raises(OSError):
        pack_sockaddr("not an address", 1)


@pytest.mark.parametrize("impl", implementations())
def test_seal_sendto_sends_what_seal_batch_seals(impl, udp_pair) -> None:
    aead_type, _ = impl
    tx, rx, addr = udp_pair
    aead = aead_type(KEY)
    for counter, size in enumerate([0, 1, 20, 100, 1379, 1420]):
        src = bytearray(b"\x99" * 7 + bytes([counter]) * size)
        dst = bytearray(2048)
        sent = aead.seal_sendto(tx.fileno(), src, 7, size, MTU, 0x01020304, counter, dst, addr)
        ref = bytearray(2048)
        sizes = array("i", [0])
        n = PyAead(KEY).seal_batch(src, array("i", [7, size]), 0, 1, ref, 0, MTU, 0x01020304, counter, sizes, 0)
        assert sent == n == sizes[0]
        assert rx.recv(4096) == bytes(ref[:n]) == bytes(dst[:n])
    # A failed send still sealed (the counter is used): -errno back, the message in dst.
    dst = bytearray(2048)
    bad = pack_sockaddr("127.0.0.1", 9)[:4]  # a truncated sockaddr: EINVAL
    assert aead.seal_sendto(tx.fileno(), b"x" * 20, 0, 20, MTU, 1, 99, dst, bad) < 0
    with pytest.raises(BufferError):
        aead.seal_sendto(tx.fileno(), b"x" * 20, 10, 20, MTU, 1, 0, dst, addr)
    with pytest.raises(BufferError):
        aead.seal_sendto(tx.fileno(), b"x" * 20, 0, 20, MTU, 1, 0, bytearray(40), addr)


def _message(plain: bytes, receiver: int, counter: int) -> bytearray:
    out = bytearray(2048)
    sizes = array("i", [0])
    n = PyAead(KEY).seal_batch(plain, array("i", [0, len(plain)]), 0, 1, out, 0, MTU, receiver, counter, sizes, 0)
    return out[:n]


V4_SRC = bytes([10, 0, 0, 1])


def _ipv4(payload: bytes, src: bytes = V4_SRC) -> bytes:
    return bytes([0x45, 0]) + (20 + len(payload)).to_bytes(2, "big") + bytes(8) + src + bytes([10, 0, 0, 2]) + payload


# (name, plaintext, receiver offset, counter, allowed_src)
_CASES = [
    ("data", _ipv4(b"ping" * 10), 0, 0, V4_SRC),
    ("data_prefixless", _ipv4(b"x" * 3), 0, 1, V4_SRC),
    ("keepalive", b"", 0, 2, V4_SRC),
    ("replayed", _ipv4(b"again"), 0, 1, V4_SRC),
    ("mismatch", _ipv4(b"from elsewhere", bytes([10, 0, 0, 9])), 0, 3, V4_SRC),
    ("first_source", _ipv4(b"no source proved yet"), 0, 4, b""),
    ("bad_inner", b"\x10" * 40, 0, 5, V4_SRC),
    ("short_ipv4", b"\x45" + bytes(15), 0, 6, V4_SRC),
    ("ipv6", bytes([0x60, 0, 0, 0, 0, 4, 17, 64]) + bytes(32) + b"six!", 0, 7, bytes(16)),
    ("other_receiver", _ipv4(b"not mine"), 1, 8, V4_SRC),
    ("expired", _ipv4(b"old"), 0, 2**64 - 1, V4_SRC),
    ("forged", _ipv4(b"forged"), 0, 9, V4_SRC),
    ("truncated", _ipv4(b"cut"), 0, 10, V4_SRC),
]


@pytest.mark.skipif(not transport.HAVE_C, reason="C extension not built")
def test_open_write_c_matches_python(pipe) -> None:
    from turbowg.noise._aead import Aead

    r, w = pipe
    receiver = 0x0A0B0C0D
    results = {}
    for aead_type, replay in ((Aead, transport.CReplayWindow()), (PyAead, PyReplayWindow())):
        aead = aead_type(KEY)
        got = []
        for name, plain, other, counter, allowed in _CASES:
            message = _message(plain, receiver + other, min(counter, 2**64 - 1))
            if name == "forged":
                message[-1] ^= 1
            if name == "truncated":
                message = message[:31]
            buf = bytearray(b"\xee" * 5) + message + b"\xee" * 3
            original = bytes(buf)
            layout = array("i", [0, 0])
            prefix = b"" if name == "data_prefixless" else ZERO_HDR
            code = aead.open_write(buf, 5, len(message), receiver, replay, allowed, w, prefix, layout)
            written = _drain(r)
            got.append((name, code, written, bytes(buf) if code != transport.OW_AUTH_FAIL else None,
                        tuple(layout) if code in (transport.OW_WRITTEN, transport.OW_MISMATCH) else None))
            if name == "forged":
                assert bytes(buf) == original  # no unauthenticated plaintext left behind
        results[aead_type] = got
    assert results[Aead] == results[PyAead]
    codes = {name: code for name, code, *_ in results[Aead]}
    assert codes == {
        "data": transport.OW_WRITTEN, "data_prefixless": transport.OW_WRITTEN, "keepalive": transport.OW_KEEPALIVE,
        "replayed": transport.OW_REPLAY, "mismatch": transport.OW_MISMATCH, "first_source": transport.OW_MISMATCH,
        "bad_inner": transport.OW_BAD_INNER, "short_ipv4": transport.OW_BAD_INNER, "ipv6": transport.OW_WRITTEN,
        "other_receiver": transport.OW_NOT_MINE, "expired": transport.OW_EXPIRED, "forged": transport.OW_AUTH_FAIL,
        "truncated": transport.OW_NOT_MINE,
    }
    written = {name: data for name, _, data, *_ in results[Aead]}
    assert written["data"] == ZERO_HDR + _ipv4(b"ping" * 10)
    assert written["data_prefixless"] == _ipv4(b"x" * 3)
    assert written["ipv6"] == ZERO_HDR + bytes([0x60, 0, 0, 0, 0, 4, 17, 64]) + bytes(32) + b"six!"
    assert all(not data for name, _, data, *_ in results[Aead] if name not in ("data", "data_prefixless", "ipv6"))


@pytest.mark.parametrize("impl", implementations())
def test_open_write_reports_a_failed_tun_write(impl) -> None:
    aead_type, replay_type = impl
    r, w = os.pipe()
    os.close(r)  # writing now fails with EPIPE (SIGPIPE is ignored by Python)
    try:
        message = _message(_ipv4(b"lost"), 7, 0)
        layout = array("i", [0, 0])
        code = aead_type(KEY).open_write(message, 0, len(message), 7, replay_type(), V4_SRC, w, ZERO_HDR, layout)
    finally:
        os.close(w)
    assert code < 0 and -code == 32  # EPIPE; the packet is described for the caller's own write
    assert tuple(layout) == (16, 24)


# -- the device: send_lone / receive_lone against the batch path ----------------------------------------------

_KEYS = random.Random()


def _fake_private_key() -> bytes:
    return bytes(_KEYS.getrandbits(8) for _ in range(32))


def _reseed(seed: int) -> None:
    """The same randomness for the step on either pair (timer jitter, ephemeral keys of a rekey)."""
    random.seed(seed)
    _KEYS.seed(seed)


def _pair(monkeypatch) -> Pair:
    """A Pair whose keys and handshake randomness repeat: two of them are the same devices."""
    monkeypatch.setattr(test_device_core, "generate_private_key", _fake_private_key)
    monkeypatch.setattr(noise_handshake, "generate_private_key", _fake_private_key)
    _KEYS.seed(4242)
    random.seed(1)  # the timers' jitter
    return Pair()


def _state(pair: Pair) -> dict:
    out = {}
    for name, device, peer in (("a", pair.a, pair.a_peer), ("b", pair.b, pair.b_peer)):
        timers = peer.timers
        current = peer.keypairs.current
        out[name] = {
            "counters": dict(device.counters), "tx": peer.tx_bytes, "rx": peer.rx_bytes, "endpoint": peer.endpoint,
            "send_counter": current.send_counter if current else None, "allowed_src": peer.allowed_src,
            "keypairs": [kp.local_index if kp else None for kp in (current, peer.keypairs.previous,
                                                                  peer.keypairs.next)],
            "timers": {slot: getattr(timers, slot) for slot in type(timers).__slots__ if not slot.startswith("_")},
            # The peer's own earliest deadline (the device's is a lower bound, exact again after a tick).
            "deadline": timers.next_deadline(), "queued": bool(device._queued),
            "last_minute": peer.sent_last_minute_handshake, "staged": len(peer.staged),
        }
    return out


def _handshake_up_to_confirmation(pair: Pair) -> bytes:
    """Pair.handshake, but the last datagram (a's first data, which confirms b's keypair) is returned."""
    first = ipv4_packet(A_V4, B_V4, b"hello")
    _KEYS.seed(777)  # the ephemeral keys
    random.seed(2)
    initiation = pair.a.handle_tun_batch([first], pair.now)
    _, response = pair.a_to_b(initiation)
    _, staged = pair.b_to_a(response)
    (datagram,) = pair.datagrams(staged, B_ENDPOINT)
    return datagram


def test_send_and_receive_lone_match_the_batch_path(monkeypatch, udp_pair, pipe) -> None:
    tx, rx, addr = udp_pair
    r, w = pipe
    lone, ref = _pair(monkeypatch), _pair(monkeypatch)
    sockaddrs = {B_ENDPOINT: addr, A_ENDPOINT: addr}

    def receive_both(datagram: bytes, src=A_ENDPOINT) -> int | None:
        """One datagram into b: receive_lone on one pair, handle_udp_packed on the other; same outcome."""
        buf = bytearray(datagram)
        _reseed(len(datagram))
        got = lone.b.receive_lone(buf, 0, len(buf), src, lone.now, w, ZERO_HDR)
        written = _drain(r)
        if got == LONE_WRITE:
            layout = lone.b.rx_layout
            written = ZERO_HDR + bytes(buf[layout[0]:layout[0] + layout[1]])
        queued = lone.b.tick(lone.now) if lone.b._queued else []
        rbuf = bytearray(datagram)
        _reseed(len(datagram))
        n, out = ref.b.handle_udp_packed(rbuf, [0, len(rbuf), max(1, len(rbuf))], [src], ref.now)
        expected = b"".join(ZERO_HDR + bytes(p) for p in _inner(ref.b, rbuf, n))
        assert written == expected
        assert [(t.endpoint, [bytes(d) for d in t.datagrams]) for t in queued] == \
            [(t.endpoint, [bytes(d) for d in t.datagrams]) for t in out]
        assert _state(lone) == _state(ref)
        return got

    def send_both(packet: bytes) -> int | None:
        """One packet out of a: send_lone on one pair (captured from the socket), handle_tun_packed on the other."""
        buf = bytearray(packet)
        _reseed(len(packet))
        sent = lone.a.send_lone(buf, 0, len(buf), lone.now, tx.fileno(), sockaddrs)
        queued = lone.a.tick(lone.now) if lone.a._queued else []
        _reseed(len(packet))
        packed, other = ref.a.handle_tun_packed(bytearray(packet), array("i", [0, len(packet)]), [0, 1], ref.now)
        if sent is None:
            assert not packed or not lone.a_peer.keypairs.current  # the batch path takes it from here
            return None
        (item,) = packed
        message = bytes(ref.a.tx_buffer[item.offset:item.offset + item.nbytes])
        assert sent == len(message) and rx.recv(4096) == message
        assert [(t.endpoint, [bytes(d) for d in t.datagrams]) for t in queued] == \
            [(t.endpoint, [bytes(d) for d in t.datagrams]) for t in other]
        assert _state(lone) == _state(ref)
        return sent

    # No session yet: the lone path declines and changes nothing; the batch path starts the handshake.
    assert lone.a.send_lone(bytearray(ipv4_packet(A_V4, B_V4, b"x")), 0, 40, lone.now, tx.fileno(), sockaddrs) is None
    confirming = _handshake_up_to_confirmation(lone)
    assert _handshake_up_to_confirmation(ref) == confirming
    assert _state(lone) == _state(ref)
    # b's first data under its new keypair: the key confirmation (and b's roaming to a's endpoint).
    assert receive_both(confirming) == LONE_WRITE  # first packet from the peer: its source checked in Python
    assert lone.b_peer.keypairs.next is None and lone.b_peer.endpoint == A_ENDPOINT

    packets = [ipv4_packet(A_V4, B_V4, b"p" * n) for n in (0, 1, 56, 1000, 1380)]
    packets += [ipv6_packet(A_V6, B_V6, b"q" * 100)]
    for packet in packets:
        lone.now += 0.5
        ref.now += 0.5
        assert send_both(packet) is not None
    # Everything a sent, in order, into b: the same for both (the last one is replayed after).
    counter_before = lone.a_peer.keypairs.current.send_counter
    grams = []
    for k, packet in enumerate(packets):
        message = bytearray(2048)
        # Re-seal a's messages with its key (same on both pairs) to feed b the same datagrams.
        n = lone.a_peer.keypairs.current.send_aead.seal_list(
            [packet], message, 0, lone.a.mtu, lone.a_peer.keypairs.current.remote_index, counter_before + k,
            array("i", [0]), 0)
        grams.append(bytes(message[:n]))
    # The IPv6 packet's source is not the one last proved (an IPv4 one): checked in Python, written by the caller.
    assert [receive_both(g) for g in grams] == [LONE_WRITTEN] * (len(grams) - 1) + [LONE_WRITE]
    assert receive_both(grams[-1]) == LONE_NOTHING  # a replay: counted, nothing written
    forged = bytearray(grams[0])
    forged[-1] ^= 1
    assert receive_both(bytes(forged)) == LONE_NOTHING  # counted as rx_decrypt_failed
    keepalive = bytearray(64)
    kp = lone.a_peer.keypairs.current
    n = kp.send_aead.seal_list([b""], keepalive, 0, 1420, kp.remote_index, counter_before + 50, array("i", [0]), 0)
    assert receive_both(bytes(keepalive[:n])) == LONE_NOTHING
    bad = bytearray(128)
    n = kp.send_aead.seal_list([b"\x10" * 40], bad, 0, 1420, kp.remote_index, counter_before + 51, array("i", [0]), 0)
    assert receive_both(bytes(bad[:n])) == LONE_NOTHING  # rx_bad_inner_packet
    spoof = bytearray(128)
    n = kp.send_aead.seal_list([ipv4_packet("10.0.0.9", B_V4, b"spoof")], spoof, 0, 1420, kp.remote_index,
                               counter_before + 52, array("i", [0]), 0)
    assert receive_both(bytes(spoof[:n])) == LONE_NOTHING  # rx_source_not_allowed
    # From a new address: b roams there, as the batch path does.
    assert receive_both(_reseal(kp, packets[2], counter_before + 53), src=("192.0.2.7", 4000)) == LONE_WRITE
    assert lone.b_peer.endpoint == ("192.0.2.7", 4000)
    for key in ("rx_replay", "rx_decrypt_failed", "rx_keepalive", "rx_bad_inner_packet", "rx_source_not_allowed"):
        assert lone.b.counters[key] == 1, key
    # Not a transport message, or an unknown index: the batch path's, untouched.
    assert lone.b.receive_lone(bytearray(148), 0, 148, A_ENDPOINT, lone.now, w, ZERO_HDR) is None
    unknown = bytearray(_reseal(kp, packets[2], 99))
    unknown[4] ^= 0xFF
    before = _state(lone)
    assert lone.b.receive_lone(unknown, 0, len(unknown), A_ENDPOINT, lone.now, w, ZERO_HDR) is None
    assert _state(lone) == before and _drain(r) == b""

    # Rekey: past REKEY_AFTER_MESSAGES the packet still goes at once; the initiation follows it (next tick).
    for pair in (lone, ref):
        pair.a_peer.keypairs.current.send_counter = REKEY_AFTER_MESSAGES
        pair.a_peer.last_sent_handshake = None
    lone.now += 10
    ref.now += 10
    assert send_both(packets[2]) is not None
    assert lone.a.counters == ref.a.counters
    # No route, an unusable packet: declined, nothing changed (the batch path counts them).
    before = _state(lone)
    assert lone.a.send_lone(bytearray(ipv4_packet(A_V4, "10.9.9.9", b"")), 0, 20, lone.now, tx.fileno(),
                            sockaddrs) is None
    assert lone.a.send_lone(bytearray(b"\x10" * 30), 0, 30, lone.now, tx.fileno(), sockaddrs) is None
    assert _state(lone) == before


def _reseal(keypair, packet: bytes, counter: int) -> bytes:
    out = bytearray(2048)
    n = keypair.send_aead.seal_list([packet], out, 0, 1420, keypair.remote_index, counter, array("i", [0]), 0)
    return bytes(out[:n])


def _inner(device, buf: bytearray, n: int) -> list[bytes]:
    layout = device.rx_layout
    return [bytes(buf[layout[2 * k]:layout[2 * k] + layout[2 * k + 1]]) for k in range(n)]


# -- the lone read: transport.recv_one against UDPBind.recv_packed ------------------------------------------

@pytest.mark.skipif(transport.recv_one is None, reason="C extension not built")
def test_lone_read_matches_recv_packed() -> None:
    """Runtime._read_lone (C recv_one) gives the chunk, sender and counters UDPBind.recv_packed gives, for IPv4
    and IPv6 senders, an empty datagram and a UDP_GRO batch; nothing there is no chunk."""
    from turbowg.conn.udp import RECV_BUFFER, UDPBind
    from turbowg.daemon.runtime import Runtime
    from turbowg.linux import SOL_UDP, UDP_SEGMENT

    bind = UDPBind(0, gso=True, gro=True)
    rt = Runtime("twlone0", socket_dir="/nonexistent")
    rt.udp, rt._udp_fd = bind, bind.fileno()
    v4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    v6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        v6.bind(("::1", 0))
        sends = [
            lambda: v4.sendto(b"four" * 30, ("127.0.0.1", bind.port)),
            lambda: v6.sendto(b"six" * 40, ("::1", bind.port)),
            lambda: v4.sendto(b"", ("127.0.0.1", bind.port)),
            lambda: v4.sendmsg([b"g" * 300 + b"h" * 100], [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", 100))], 0,
                               ("127.0.0.1", bind.port)),
        ]
        for send in sends:
            results = []
            for reader in ("c", "py"):
                send()
                time.sleep(0.01)
                buf = bytearray(4 * RECV_BUFFER)
                chunks: list[int] = []
                senders: list = []
                before = dict(bind.counters)
                if reader == "c":
                    cursor = rt._read_lone(bind, buf, chunks, senders)
                else:
                    cursor = bind.recv_packed(buf, 0, RECV_BUFFER, chunks, senders, max_calls=1)
                delta = {k: v - before.get(k, 0) for k, v in bind.counters.items() if v != before.get(k, 0)}
                results.append((cursor, chunks, senders, bytes(buf[:cursor]), delta))
            assert results[0] == results[1]
            assert results[0][1]
        assert results[0][1] == [0, 400, 100]  # the GRO batch: four segments of 100 bytes
        assert rt._read_lone(bind, bytearray(RECV_BUFFER), [], []) == 0  # EAGAIN: nothing, not counted
    finally:
        v4.close()
        v6.close()
        bind.close()


def spin_implementations() -> list:
    """py_spin_poll and the C spin_poll (a recorded skip when the extension is not built)."""
    if transport.HAVE_C:
        from turbowg.noise._aead import spin_poll as c_spin_poll

        c_case = pytest.param(c_spin_poll, id="c")
    else:
        c_case = pytest.param(None, id="c", marks=pytest.mark.skip(reason="C extension not built: C case not run"))
    return [pytest.param(transport.py_spin_poll, id="py"), c_case]


@pytest.mark.parametrize("spin", spin_implementations())
def test_spin_poll_answers(spin, udp_pair, pipe) -> None:
    """spin_poll (C) and py_spin_poll answer alike: the readable fd (the first one when both are), -1 after
    the budget when neither became readable, -EBADF for a closed fd; a negative fd is ignored."""
    tx, rx, sockaddr = udp_pair
    r, w = pipe
    sock = rx.fileno()
    started = time.monotonic()
    assert spin(sock, r, 2000) == -1
    assert time.monotonic() - started >= 0.0019  # it did wait the budget out (a lower bound: not a speed test)
    assert spin(sock, r, 0) == -1  # no budget: one look
    os.write(w, b"x")
    assert spin(sock, r, 0) == r
    assert spin(-1, r, 0) == r
    tx.sendto(b"hello", ("::ffff:127.0.0.1", rx.getsockname()[1]))
    assert spin(sock, r, 1_000_000) == sock  # both readable: the first
    assert spin(r, sock, 1_000_000) == r
    assert _drain(r) == b"x"
    assert spin(r, sock, 1_000_000) == sock
    assert rx.recv(64) == b"hello"
    assert spin(sock, -1, 1000) == -1
    closed_r, closed_w = os.pipe()
    os.close(closed_r)
    os.close(closed_w)
    assert spin(closed_r, -1, 1000) == -errno.EBADF


@pytest.mark.parametrize("spin", spin_implementations())
def test_spin_poll_sees_what_arrives_while_it_spins(spin, udp_pair) -> None:
    """A datagram sent while the spin runs (from another thread: the C spin releases the GIL) ends it with
    that fd, long before the budget."""
    tx, rx, _ = udp_pair
    port = rx.getsockname()[1]
    sender = threading.Timer(0.01, lambda: tx.sendto(b"late", ("::ffff:127.0.0.1", port)))
    sender.start()
    try:
        assert spin(rx.fileno(), -1, 20_000_000) == rx.fileno()  # budget 20 s: a blind spin would take that long
    finally:
        sender.join()
    assert rx.recv(64) == b"late"
