"""TLS terminated by the relay, in the C forwarding plane (_fastpath.c driving OpenSSL on the SSL object of the
handshake; fastpath.take hands TLS clients over).

First the C loop alone with real TLS sessions: the handshake is done in Python on memory BIOs (as asyncio and
uvloop do it), then the server's SSL object and its socket go to the C loop and the test talks TLS to it
from the client's SSLObject over a socketpair. Frames split across TLS records and across reads (against
the plain C loop as the reference), bytes already in the SSL's read BIO at the handover, 64 KiB frames, a
destination that never reads, a client that disconnects mid-record, a corrupted record, close_notify in both
directions, a TLS 1.3 KeyUpdate, TLS 1.2, and that the loop holds the SSL object exactly as long as it uses
it. Then the whole relay serving TLS: Python's ssl and `openssl s_client` as clients, frames pipelined behind
ClientInfo, a never-reading TLS client, the default asyncio loop, and a differential run against the Python
path (TLS kept in Python: fastpath.TLS_IN_C off).
"""

from __future__ import annotations

import _ssl
import asyncio
import ctypes
import gc
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turbowg.derp import codec, keys
from turbowg.derp.client import DerpClient
from turbowg.derp.client_proto import ClientConnection
from turbowg.relay import fastpath
from turbowg.relay.shards.peer import ShardPeer
from turbowg.testing.relay import exchange, relay, run, server_tls, until

pytestmark = pytest.mark.skipif(not fastpath.HAVE_C, reason="turbowg.relay._fastpath not built or TURBOWG_NO_C set")

if fastpath.HAVE_C:
    from turbowg.relay._fastpath import EV_CLOSED, EV_PROTOCOL, EV_WRITE_TIMEOUT, Loop

MAX_PACKET = codec.MAX_PACKET_SIZE


def key(i: int) -> bytes:
    return i.to_bytes(4, "big") * 8


@pytest.fixture(scope="module")
def sctx(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    return server_tls(tmp_path_factory.mktemp("tls"))


def client_ctx(version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


class Peer:
    """The test's end of one TLS client of the loop: a client SSLObject over memory BIOs and a socket."""

    def __init__(self, sock: socket.socket, cli: ssl.SSLObject, cin: ssl.MemoryBIO, cout: ssl.MemoryBIO) -> None:
        self.sock, self.cli, self.cin, self.cout = sock, cli, cin, cout
        self.plain = bytearray()  # decrypted, not yet taken by the test
        self.closed_by_server = False

    def seal(self, data: bytes, record: int = 16384) -> bytes:
        """data as TLS records of at most `record` plaintext bytes each (one SSLObject.write per record)."""
        for off in range(0, len(data), record):
            self.cli.write(data[off : off + record])
        return self.cout.read()


class TlsNet:
    """A C loop whose clients are TLS sessions on socketpairs; handshakes done in Python before the handover."""

    def __init__(self, sctx: ssl.SSLContext, n: int = 2, version: ssl.TLSVersion | None = None,
                 **kw: object) -> None:
        self.loop = Loop(**kw)
        self.sctx, self.version = sctx, version
        self.peers: list[Peer] = []
        self.ids: list[int] = []
        self.events: list[tuple[int, int, bytes]] = []
        for i in range(n):
            self.add(key(i))

    def handshake(self) -> tuple[ssl.SSLObject, ssl.MemoryBIO, Peer, socket.socket]:
        sin, sout, cin, cout = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
        srv = self.sctx.wrap_bio(sin, sout, server_side=True)
        cli = client_ctx(self.version).wrap_bio(cin, cout, server_hostname="localhost")
        done = {id(srv): False, id(cli): False}
        for _ in range(20):
            for obj in (cli, srv):
                try:
                    obj.do_handshake()
                    done[id(obj)] = True
                except ssl.SSLWantReadError:
                    pass
            sin.write(cout.read())
            cin.write(sout.read())
            if all(done.values()) and not sin.pending:
                break
        assert all(done.values()), "handshake did not finish"
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        return srv, sin, Peer(ours, cli, cin, cout), theirs

    def add(self, k: bytes, before: bytes = b"", inbytes: bytes = b"", route: bool = True) -> int:
        """A new TLS client with key k; `before`: ciphertext already in the server's read BIO at the handover."""
        srv, sin, peer, theirs = self.handshake()
        if before:
            sin.write(before)
        cid = self.loop.add(theirs.detach(), k, inbytes, tls=srv._sslobj)  # type: ignore[attr-defined]
        if route:
            self.loop.route(k, cid)
        self.peers.append(peer)
        self.ids.append(cid)
        return cid

    def poll(self, times: int = 1) -> list[tuple[int, int, bytes]]:
        got = []
        for _ in range(times):
            got += self.loop.poll()
        self.events += got
        return got

    def push(self, i: int, ciphertext: bytes, cut: int | None = None, timeout: float = 10.0) -> None:
        """Write ciphertext to the loop from peer i (in pieces of `cut` bytes, one poll after each)."""
        view = memoryview(ciphertext)
        step = cut or len(view) or 1
        deadline = time.monotonic() + timeout
        while view:
            try:
                sent = self.peers[i].sock.send(view[:step])
                view = view[sent:]
            except BlockingIOError:
                assert time.monotonic() < deadline, "the loop stopped reading"
                time.sleep(0.0005)
            self.poll()

    def pump(self, i: int) -> None:
        """Read what the loop wrote to peer i and decrypt it into peer.plain."""
        p = self.peers[i]
        while True:
            try:
                ct = p.sock.recv(1 << 20)
            except BlockingIOError:
                break
            if not ct:
                break
            p.cin.write(ct)
        while True:
            try:
                data = p.cli.read(1 << 20)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                p.closed_by_server = True
                break
            if not data:
                p.closed_by_server = True
                break
            p.plain += data

    def recv_plain(self, i: int, want: int, timeout: float = 10.0) -> bytes:
        deadline = time.monotonic() + timeout
        p = self.peers[i]
        while len(p.plain) < want and time.monotonic() < deadline:
            self.poll()
            self.pump(i)
            if len(p.plain) < want:
                time.sleep(0.0005)
        out = bytes(p.plain[:want])
        del p.plain[:want]
        return out

    def close(self) -> None:
        self.loop.close()
        for p in self.peers:
            p.sock.close()


@pytest.fixture
def tnet(sctx: ssl.SSLContext) -> Iterator:
    nets: list[TlsNet] = []

    def make(n: int = 2, **kw: object) -> TlsNet:
        nets.append(TlsNet(sctx, n, **kw))  # type: ignore[arg-type]
        return nets[-1]

    yield make
    for n in nets:
        n.close()


def frames_of(data: bytes) -> list[tuple[int, bytes]]:
    out, off = [], 0
    while off + 5 <= len(data):
        t, n = data[off], int.from_bytes(data[off + 1 : off + 5], "big")
        out.append((t, data[off + 5 : off + 5 + n]))
        off += 5 + n
    assert off == len(data), "a partial frame at the end"
    return out


def handed_up(events: list[tuple[int, int, bytes]], cid: int | None = None) -> bytes:
    return b"".join(d for c, k, d in events if k < 256 and (cid is None or c == cid))


def closes(events: list[tuple[int, int, bytes]]) -> list[tuple[int, bytes]]:
    return [(c, d) for c, k, d in events if k == EV_CLOSED]


# ---------------------------------------------------------------------------------------------------
# The C loop alone


@pytest.mark.parametrize("version", [None, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"])
def test_tls_send_packet_is_forwarded_and_control_frames_handed_up(tnet, version) -> None:
    n = tnet(3, version=version)
    pkts = [bytes([i]) * (10 + 29 * i) for i in range(60)]
    stream = b"".join(codec.encode_send_packet(key(1), p) for p in pkts) + codec.encode_ping(b"12345678")
    n.push(0, n.peers[0].seal(stream))
    n.push(2, n.peers[2].seal(codec.encode_send_packet(key(1), b"from two")))
    got = frames_of(n.recv_plain(1, sum(5 + 32 + len(p) for p in pkts) + 5 + 32 + 8))
    assert [p[32:] for _, p in got if p[:32] == key(0)] == pkts
    assert [p[32:] for _, p in got if p[:32] == key(2)] == [b"from two"]
    assert all(t == codec.FrameType.RECV_PACKET for t, _ in got)
    n.poll(2)
    assert handed_up(n.events, n.ids[0]) == codec.encode_ping(b"12345678")
    # output Python writes down (a Pong) is encrypted by the loop too
    n.loop.write(n.ids[0], codec.encode_pong(b"12345678"))
    n.loop.flush()
    assert n.recv_plain(0, 13) == codec.encode_pong(b"12345678")
    st_ = n.loop.stats()
    assert st_["tls_records_in"] >= 2 and st_["tls_bytes_out"] > st_["bytes_sent"]
    assert n.loop.conn_info(n.ids[0])["tls"] is True


_frames = st.lists(st.one_of(
    st.binary(max_size=3000).map(lambda p: codec.encode_send_packet(key(1), p)),
    st.binary(max_size=300).map(lambda p: codec.encode_send_packet(key(9), p)),
    st.binary(min_size=8, max_size=8).map(codec.encode_ping),
    st.just(codec.encode_keep_alive()),
), max_size=25)


@settings(max_examples=40, deadline=None)
@given(_frames, st.lists(st.integers(1, 5000), min_size=1, max_size=8),
       st.lists(st.integers(1, 3000), min_size=1, max_size=8))
def test_frames_split_across_records_and_reads_as_the_plain_loop_sees_them(
        sctx: ssl.SSLContext, frames: list[bytes], records: list[int], cuts: list[int]) -> None:
    """Reference: the plain C loop given the same plaintext. The TLS loop gets it as records of varying
    sizes (a frame across many records, many frames in one) written in cuts that split records anywhere."""
    stream = b"".join(frames)
    n = TlsNet(sctx, 2)
    ref = Loop()
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    try:
        rid = [ref.add(a.detach(), key(0)), ref.add(c.detach(), key(1))]
        ref.route(key(0), rid[0])
        ref.route(key(1), rid[1])
        b.sendall(stream)
        ref_events = []
        for _ in range(5):
            ref_events += ref.poll()
        d.setblocking(False)
        ref_out = b""
        try:
            ref_out = d.recv(1 << 22)
        except BlockingIOError:
            pass

        off, i = 0, 0
        cipher = b""
        while off < len(stream):  # records of varying sizes
            size = records[i % len(records)]
            cipher += n.peers[0].seal(stream[off : off + size], record=size)
            off += size
            i += 1
        off, i = 0, 0
        while off < len(cipher):  # cut anywhere, a poll after each cut
            step = cuts[i % len(cuts)]
            n.push(0, cipher[off : off + step])
            off += step
            i += 1
        n.poll(3)
        got = n.recv_plain(1, len(ref_out))
        assert got == ref_out
        assert handed_up(n.events) == handed_up(ref_events)
    finally:
        n.close()
        ref.close()
        b.close()
        d.close()


def test_ciphertext_in_the_read_bio_at_the_handover_is_not_lost(tnet) -> None:
    """What Python had read from the socket but not decrypted (a whole record and half of the next) is in
    the SSL's read BIO: the loop decrypts it first, then the rest from the socket; plaintext Python had
    read after the last whole frame comes in as inbytes."""
    n = tnet(2)
    n.add(key(5))  # index 2: the sender, handed over below with bytes in flight
    srv, sin, peer, theirs = n.handshake()
    f = [codec.encode_send_packet(key(1), bytes([i]) * 700) for i in range(6)]
    inbytes = f[0][:300]  # Python parsed up to here: the rest of frame 0 is in the records below
    recs = peer.seal(f[0][300:] + f[1]) + peer.seal(f[2]) + peer.seal(f[3] + f[4] + f[5])
    cut = len(recs) // 2 + 7
    sin.write(recs[:cut])
    cid = n.loop.add(theirs.detach(), key(6), inbytes, tls=srv._sslobj)  # type: ignore[attr-defined]
    n.peers.append(peer)
    n.ids.append(cid)
    n.poll(2)
    n.push(3, recs[cut:])
    got = frames_of(n.recv_plain(1, 6 * (5 + 32 + 700)))
    assert [p[32:] for _, p in got] == [bytes([i]) * 700 for i in range(6)]
    assert all(p[:32] == key(6) for _, p in got)
    # whole records only, and nothing more ever comes on the socket: decrypted at the handover all the same
    srv, sin, peer, theirs = n.handshake()
    sin.write(peer.seal(codec.encode_send_packet(key(1), b"only in the bio")))
    cid = n.loop.add(theirs.detach(), key(7), tls=srv._sslobj)  # type: ignore[attr-defined]
    n.peers.append(peer)
    n.ids.append(cid)
    assert frames_of(n.recv_plain(1, 5 + 32 + 15)) == [(5, key(7) + b"only in the bio")]


def test_64k_packets_both_ways_and_a_frame_over_the_limit(tnet) -> None:
    n = tnet(2)
    pkts = [bytes([i]) * MAX_PACKET for i in range(12)]
    for p in pkts:
        n.push(0, n.peers[0].seal(codec.encode_send_packet(key(1), p)))
    got = frames_of(n.recv_plain(1, len(pkts) * (5 + 32 + MAX_PACKET)))
    assert [p[32:] for _, p in got] == pkts
    n.push(1, n.peers[1].seal(b"".join(codec.encode_send_packet(key(0), p) for p in pkts[:4]), record=1000))
    back = frames_of(n.recv_plain(0, 4 * (5 + 32 + MAX_PACKET)))
    assert [p[32:] for _, p in back] == pkts[:4]
    # idle again: at most a small ciphertext buffer each (reads and writes go through the loop's shared
    # buffers; a conn keeps only what its socket did not take)
    n.poll(2)
    assert all(n.loop.conn_info(i)["tls_buffers"] <= 64 << 10 for i in n.ids)
    over = bytes([codec.FrameType.SEND_PACKET]) + (32 + MAX_PACKET + 1).to_bytes(4, "big")
    n.push(0, n.peers[0].seal(over + key(1)))
    n.poll(2)
    assert [(c, k) for c, k, _ in n.events if k == EV_PROTOCOL] == [(n.ids[0], EV_PROTOCOL)]


def test_destination_that_never_reads_pauses_the_tls_sender_then_times_out(tnet) -> None:
    bound = 256 << 10
    n = tnet(3, bound=bound, write_timeout=0.5)
    sink, src, other = n.ids
    n.peers[0].sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # never read
    pkt = b"q" * 1200
    frame = codec.encode_send_packet(key(0), pkt)
    start = time.monotonic()
    paused_seen = False
    view = memoryview(b"")
    while time.monotonic() - start < 0.4:
        if not view:
            view = memoryview(n.peers[1].seal(frame * 64))  # fresh records (a replayed one would not decrypt)
        try:
            view = view[n.peers[1].sock.send(view):]
        except BlockingIOError:
            pass
        n.poll()
        paused_seen |= n.loop.conn_info(src)["paused"]
        assert n.loop.queue_bytes(sink) <= bound + len(frame)  # memory per client is bounded
        assert n.loop.conn_info(sink)["tls_unsent"] <= 300 << 10  # and the ciphertext waiting for it
    assert paused_seen, "the sender was never paused"
    st_ = n.loop.stats()
    assert st_["sender_pauses"] > 0
    assert sum(p for p, _ in st_["dropped"].values()) == 0  # backpressure, not loss
    n.push(2, n.peers[2].seal(codec.encode_send_packet(key(2), b"self")))
    assert frames_of(n.recv_plain(2, 5 + 32 + 4)) == [(5, key(2) + b"self")]
    deadline = time.monotonic() + 3
    while not any(k == EV_WRITE_TIMEOUT for _, k, _ in n.events) and time.monotonic() < deadline:
        n.poll()
        time.sleep(0.01)
    assert [(c, k) for c, k, _ in n.events if k == EV_WRITE_TIMEOUT] == [(sink, EV_WRITE_TIMEOUT)]
    dropped = n.loop.stats()["dropped"][("queue_head", "other")]
    assert dropped[0] > 0 and dropped[1] == dropped[0] * len(pkt)
    assert not n.loop.conn_info(src)["paused"]


def test_slow_tls_reader_gets_everything_in_order(tnet) -> None:
    n = tnet(2, bound=64 << 10)
    n.peers[1].sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    pkts = [i.to_bytes(4, "big") * 300 for i in range(3000)]
    cipher = n.peers[0].seal(b"".join(codec.encode_send_packet(key(1), p) for p in pkts))
    want = len(pkts) * (5 + 32 + 1200)
    got = b""
    view = memoryview(cipher)
    deadline = time.monotonic() + 30
    while len(got) < want and time.monotonic() < deadline:
        if view:
            try:
                view = view[n.peers[0].sock.send(view[:65536]):]
            except BlockingIOError:
                pass
        got += n.recv_plain(1, min(want - len(got), 20_000), timeout=0.01)
    assert [p[32:] for _, p in frames_of(got)] == pkts
    assert n.loop.stats()["sender_pauses"] > 0
    assert sum(p for p, _ in n.loop.stats()["dropped"].values()) == 0


def test_client_disconnecting_mid_record_is_reported_and_nothing_half_is_forwarded(tnet) -> None:
    n = tnet(3)
    whole = n.peers[0].seal(codec.encode_send_packet(key(1), b"whole"))
    nxt = n.peers[0].seal(codec.encode_send_packet(key(1), b"x" * 1000))
    n.push(0, whole + nxt[: len(nxt) // 2])
    n.peers[0].sock.close()
    n.poll(3)
    assert frames_of(n.recv_plain(1, 5 + 32 + 5)) == [(5, key(0) + b"whole")]
    assert closes(n.events) == [(n.ids[0], b"eof mid-record")]
    n.loop.remove(n.ids[0])
    n.push(2, n.peers[2].seal(codec.encode_send_packet(key(1), b"still here")))
    assert frames_of(n.recv_plain(1, 5 + 32 + 10)) == [(5, key(2) + b"still here")]
    n.poll(2)
    assert n.recv_plain(1, 1, timeout=0.05) == b""  # nothing half of the lost record


def test_a_corrupted_record_closes_only_that_client_after_the_frames_before_it(tnet) -> None:
    n = tnet(3)
    good = n.peers[0].seal(codec.encode_send_packet(key(1), b"good"))
    bad = bytearray(n.peers[0].seal(codec.encode_send_packet(key(1), b"bad" * 100)))
    bad[len(bad) // 2] ^= 0x40
    n.push(0, good + bytes(bad))
    n.poll(2)
    assert frames_of(n.recv_plain(1, 5 + 32 + 4)) == [(5, key(0) + b"good")]
    assert closes(n.events) == [(n.ids[0], b"tls: bad record")]
    n.push(2, n.peers[2].seal(codec.encode_send_packet(key(1), b"other")))
    assert frames_of(n.recv_plain(1, 5 + 32 + 5)) == [(5, key(2) + b"other")]
    # the loop left nothing in OpenSSL's error queue for Python's ssl to trip over
    s2, _, p2, t2 = n.handshake()
    assert p2.cli.version() is not None and s2.version() is not None
    t2.close()
    p2.sock.close()


def test_close_notify_from_the_client_is_answered_after_its_frames(tnet) -> None:
    n = tnet(2)
    p = n.peers[0]
    stream = p.seal(codec.encode_send_packet(key(1), b"last words"))
    with pytest.raises(ssl.SSLWantReadError):
        p.cli.unwrap()  # writes close_notify, waits for the server's
    n.push(0, stream + p.cout.read())
    n.poll(2)
    assert frames_of(n.recv_plain(1, 5 + 32 + 10)) == [(5, key(0) + b"last words")]
    assert closes(n.events) == [(n.ids[0], b"tls close_notify")]
    deadline = time.monotonic() + 5
    answered = False
    while not answered and time.monotonic() < deadline:
        try:
            p.cin.write(p.sock.recv(65536))
        except BlockingIOError:
            time.sleep(0.005)
            continue
        try:
            p.cli.unwrap()
            answered = True
        except ssl.SSLWantReadError:
            pass
    assert answered, "the loop did not answer the close_notify"


def _ssl_ptr(obj: ssl.SSLObject) -> int:
    """The SSL* of an SSLObject (the same layout the C loop checks; here checked against libssl too)."""
    lib = ctypes.CDLL(_ssl.__file__)
    ptr = ctypes.c_void_p.from_address(id(obj._sslobj) + 3 * ctypes.sizeof(ctypes.c_void_p)).value  # type: ignore[attr-defined]
    lib.SSL_get_SSL_CTX.argtypes = [ctypes.c_void_p]
    lib.SSL_get_SSL_CTX.restype = ctypes.c_void_p
    ctx_ptr = ctypes.c_void_p.from_address(id(obj.context) + 2 * ctypes.sizeof(ctypes.c_void_p)).value
    assert ptr and lib.SSL_get_SSL_CTX(ptr) == ctx_ptr
    return ptr  # type: ignore[return-value]


def test_key_update_requested_by_the_client_is_answered_and_traffic_goes_on(tnet) -> None:
    """TLS 1.3 KeyUpdate (update_requested): OpenSSL in the C loop answers with its own KeyUpdate (written
    from SSL_read's output or before its next record); both directions keep decrypting afterwards."""
    n = tnet(2)
    lib = ctypes.CDLL(_ssl.__file__)
    lib.SSL_key_update.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.SSL_get_key_update_type.argtypes = [ctypes.c_void_p]
    for rnd in range(3):
        ptr = _ssl_ptr(n.peers[0].cli)
        assert lib.SSL_key_update(ptr, 1) == 1  # SSL_KEY_UPDATE_REQUESTED
        n.push(0, n.peers[0].seal(codec.encode_send_packet(key(1), b"after update %d" % rnd)))
        assert frames_of(n.recv_plain(1, 5 + 32 + 14)) == [(5, key(0) + b"after update %d" % rnd)]
        n.push(1, n.peers[1].seal(codec.encode_send_packet(key(0), b"reply %d" % rnd)))
        assert frames_of(n.recv_plain(0, 5 + 32 + 7)) == [(5, key(1) + b"reply %d" % rnd)]
    assert closes(n.events) == []


def test_the_loop_holds_the_ssl_object_until_remove(sctx) -> None:
    n = TlsNet(sctx, 0)
    try:
        srv, _, peer, theirs = n.handshake()
        sslsock = srv._sslobj  # type: ignore[attr-defined]
        del srv  # the loop's reference keeps the session alive, as when asyncio forgets the transport
        gc.collect()
        before = sys.getrefcount(sslsock)
        cid = n.loop.add(theirs.detach(), key(0), tls=sslsock)
        n.peers.append(peer)
        n.ids.append(cid)
        assert sys.getrefcount(sslsock) == before + 1
        n.loop.route(key(0), cid)
        n.push(0, peer.seal(codec.encode_send_packet(key(0), b"to myself")))
        assert frames_of(n.recv_plain(0, 5 + 32 + 9)) == [(5, key(0) + b"to myself")]
        n.loop.remove(cid)
        assert sys.getrefcount(sslsock) == before
        # not an _SSLSocket, or a plain channel with tls: refused before the fd is taken
        a, b = socket.socketpair()
        with pytest.raises(ValueError):
            n.loop.add(a.fileno(), key(1), tls=object())
        with pytest.raises(ValueError):
            n.loop.add(a.fileno(), key(1), channel=1, tls=sslsock)
        assert n.loop.stats()["conns"] == 0
        a.close()
        b.close()
    finally:
        n.close()


# ---------------------------------------------------------------------------------------------------
# The relay serving TLS, clients handed over with their TLS sessions


def test_app_tls_clients_are_handed_over_and_exchange_without_loss(tmp_path: Path) -> None:
    async def main() -> None:
        async with relay(server_tls(tmp_path)) as (server, url):
            a, b = DerpClient(), DerpClient()
            await a.connect(url, verify=False)
            await b.connect(url, verify=False)
            await until(lambda: server.fast.tls_handovers == 2, "both TLS sessions in the C loop")
            await exchange(a, b, 20_000)
            await exchange(b, a, 1_000)
            assert await a.ping(timeout=2) < 2  # Ping handed up, Pong encrypted by the C loop
            server.sync_metrics()
            assert server.metrics.packets_sent == server.metrics.packets_received == 21_000
            assert server.metrics.total_dropped() == 0
            assert server.fast.stats()["tls_bytes_out"] > 21_000 * 4
            g = server.gauges()  # what /debug/varz and the Prometheus page show
            assert (g.fast_conns, g.fast_tls_conns, g.fast_handovers, g.fast_tls_handovers) == (2, 2, 2, 2)
            await a.close()
            await b.close()
            await until(lambda: server.conns == set() and server.fast.conns == {}, "both gone")

    run(main)


def test_app_frames_pipelined_behind_client_info_over_tls_are_not_lost(tmp_path: Path) -> None:
    async def main() -> None:
        async with relay(server_tls(tmp_path)) as (server, url):
            b = DerpClient()
            await b.connect(url, verify=False)
            port = int(url.rsplit(":", 1)[1].split("/")[0])
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx(),
                                                           server_hostname="localhost")
            writer.write(b"GET /derp HTTP/1.1\r\nHost: x\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
            proto = ClientConnection(keys.generate_private_key())
            proto.receive_data(await reader.readexactly(45))
            stream = proto.data_to_send() + b"".join(codec.encode_send_packet(b.public_key, bytes([i]) * 300)
                                                     for i in range(200))
            writer.write(stream[:-150])  # some parsed by Python before the handover, the rest by C
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(stream[-150:])
            got: list[bytes] = []
            while len(got) < 200:
                for m in await asyncio.wait_for(b.recv_many(), 5):
                    if isinstance(m, codec.ReceivedPacket):
                        got.append(m.data)
            assert got == [bytes([i]) * 300 for i in range(200)]
            assert server.fast.tls_handovers == 2
            writer.close()
            await b.close()

    run(main)


def test_app_never_reading_tls_client_pauses_the_sender_then_times_out(tmp_path: Path) -> None:
    async def main() -> None:
        async with relay(server_tls(tmp_path), write_timeout=1.0) as (server, url):
            stalled = DerpClient()
            await stalled.connect(url, verify=False)
            flood, a, b = DerpClient(), DerpClient(), DerpClient()
            for c in (flood, a, b):
                await c.connect(url, verify=False)
            await until(lambda: server.fast.tls_handovers == 4, "all in the C loop")
            stalled._protocol.transport.pause_reading()  # type: ignore[union-attr]
            flood.send_many(stalled.public_key, [bytes(1200)] * 10_000)
            await until(lambda: server.fast.stats()["sender_pauses"] > 0, "the flood's sender to be paused")
            server.sync_metrics()
            assert server.metrics.total_dropped() == 0 and server.metrics.write_timeouts == 0
            await exchange(a, b, 300)  # the other pair flows
            await until(lambda: stalled.public_key not in server.clients, "the stalled client closed", timeout=10)
            assert server.metrics.write_timeouts == 1
            server.sync_metrics()
            assert server.metrics.dropped("queue_head") > 0
            await exchange(a, b, 100)
            for c in (flood, a, b):
                await c.close()

    run(main)


def test_app_tls_handover_on_the_default_asyncio_loop_too(tmp_path: Path) -> None:
    async def main() -> None:
        async with relay(server_tls(tmp_path)) as (server, url):
            a, b = DerpClient(), DerpClient()
            await a.connect(url, verify=False)
            await b.connect(url, verify=False)
            await until(lambda: server.fast.tls_handovers == 2, "both TLS sessions in the C loop")
            await exchange(a, b, 5000)
            assert await a.ping(timeout=2) < 2
            await a.close()
            await b.close()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_app_tls_clients_on_two_shards_forward_through_the_c_channel(tmp_path: Path) -> None:
    """Two shards (DerpServers joined by a C channel, as `--workers 2`), one TLS client on each: both sessions
    are in C and packets cross in C both ways (PACKET records), none handed up to Python."""
    async def main() -> None:
        tls = server_tls(tmp_path)
        async with AsyncExitStack() as stack:
            servers, urls = {}, {}
            for name in "AB":
                servers[name], urls[name] = await stack.enter_async_context(relay(tls))
            a_sock, b_sock = socket.socketpair()
            peers = {}
            for name, sock, other in (("A", a_sock, 1), ("B", b_sock, 0)):
                peer = ShardPeer(servers[name], other)
                peer.attach_c(servers[name].fast, sock)  # type: ignore[arg-type]
                peers[name] = peer
                stack.callback(peer.close)
                servers[name].add_conn_listener(lambda k, present, peer=peer: peer.announce(k, present))
            x, y = DerpClient(), DerpClient()
            await x.connect(urls["A"], verify=False)
            await y.connect(urls["B"], verify=False)
            stack.push_async_callback(x.close)
            stack.push_async_callback(y.close)
            await until(lambda: y.public_key in peers["A"].remote_keys and x.public_key in peers["B"].remote_keys,
                        "announcements")
            await until(lambda: servers["A"].fast.tls_handovers == servers["B"].fast.tls_handovers == 1,
                        "both sessions in C")  # type: ignore[union-attr]
            await exchange(x, y, 20_000)
            await exchange(y, x, 2_000)
            for s in servers.values():
                s.sync_metrics()
            a, b = servers["A"].metrics, servers["B"].metrics
            assert (a.packets_forwarded_out, b.packets_forwarded_in) == (20_000, 20_000)
            assert (b.packets_forwarded_out, a.packets_forwarded_in) == (2_000, 2_000)
            assert a.total_dropped() + b.total_dropped() == 0

    run(main)


async def _scenario(url: str, server: object) -> list[object]:
    """A fixed mix of traffic among TLS clients (and a plain-free relay): what every client received, in order."""
    clients = [DerpClient(keys.generate_private_key()) for _ in range(4)]
    for c in clients:
        await c.connect(url, verify=False)
    await until(lambda: len(server.clients) == 4, "all registered")  # type: ignore[attr-defined]
    names = {c.public_key: i for i, c in enumerate(clients)}
    plan = [(s, d, n) for s in range(4) for d in range(4) if s != d for n in (1, 50, 300)]
    seen: list[list[tuple[int, bytes]]] = [[] for _ in clients]
    for s, d, count in plan:
        src, dst = clients[s], clients[d]
        pkts = [b"%d>%d:%d:" % (s, d, i) + bytes(i % 1400) for i in range(count)]
        src.send_many(dst.public_key, pkts)
        await src.drain()
        got = 0
        while got < count:
            for m in await asyncio.wait_for(dst.recv_many(), 5):
                if isinstance(m, codec.ReceivedPacket):
                    seen[d].append((names[m.source], m.data))
                    got += 1
    await clients[0].ping(timeout=2)
    rtts = [await c.ping(timeout=2) < 2 for c in clients]
    for c in clients:
        await c.close()
    return [seen, rtts]


def test_app_differential_tls_in_c_against_tls_in_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same traffic through the relay with TLS sessions in the C loop and with them kept in Python: every
    client receives the same packets in the same order, and the relay counts the same."""
    results = {}
    for in_c in (True, False):
        monkeypatch.setattr(fastpath, "TLS_IN_C", in_c)

        async def main() -> tuple[list[object], tuple[int, int, int, int]]:
            async with relay(server_tls(tmp_path)) as (server, url):
                out = await _scenario(url, server)
                assert server.fast.tls_handovers == (4 if in_c else 0)  # noqa: B023
                server.sync_metrics()
                m = server.metrics
                return out, (m.packets_received, m.packets_sent, m.bytes_sent, m.total_dropped())

        results[in_c] = run(main)
    assert results[True] == results[False]
    assert results[True][1][3] == 0


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")
def test_app_openssl_s_client_speaks_derp_through_the_c_loop(tmp_path: Path) -> None:
    """An independent TLS implementation's client (OpenSSL's s_client, its own process) as a DERP client:
    upgrade, ClientInfo, then packets both ways with a Python client, after the handover to the C loop."""
    async def main() -> None:
        async with relay(server_tls(tmp_path)) as (server, url):
            port = int(url.rsplit(":", 1)[1].split("/")[0])
            peer = DerpClient()
            await peer.connect(url, verify=False)
            proc = await asyncio.create_subprocess_exec(
                "openssl", "s_client", "-quiet", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(b"GET /derp HTTP/1.1\r\nHost: localhost\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n\r\n")
                head = await asyncio.wait_for(proc.stdout.readuntil(b"\r\n\r\n"), 10)
                assert head.startswith(b"HTTP/1.1 101 ")
                proto = ClientConnection(keys.generate_private_key())
                proto.receive_data(await asyncio.wait_for(proc.stdout.readexactly(45), 10))
                proc.stdin.write(proto.data_to_send())
                proto.receive_data(await asyncio.wait_for(proc.stdout.readexactly(5 + 24 + 16 + 13), 10))
                await until(lambda: server.fast.tls_handovers == 2, "s_client's session in the C loop")
                me = proto.public_key
                pkts = [bytes([i]) * (100 + 97 * i) for i in range(40)]
                proc.stdin.write(b"".join(codec.encode_send_packet(peer.public_key, p) for p in pkts))
                got = []
                while len(got) < len(pkts):
                    for m in await asyncio.wait_for(peer.recv_many(), 5):
                        if isinstance(m, codec.ReceivedPacket):
                            assert m.source == me
                            got.append(m.data)
                assert got == pkts
                peer.send_many(me, pkts)
                want = sum(5 + 32 + len(p) for p in pkts)
                data = await asyncio.wait_for(proc.stdout.readexactly(want), 10)
                assert [p[32:] for _, p in frames_of(data)] == pkts
            finally:
                proc.kill()
                await proc.wait()
            await until(lambda: me not in server.clients, "s_client gone")
            await peer.close()

    run(main)


def test_relay_tls_tests_pass_with_tls_kept_in_python() -> None:
    """The relay's TLS tests with TURBOWG_RELAY_TLS_IN_C=0 (TLS sessions stay in Python, as before)."""
    env = dict(os.environ, TURBOWG_RELAY_TLS_IN_C="0")
    tests = Path(__file__).parent
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         str(tests / "test_relay_app.py"), "-k", "tls"],
        env=env, capture_output=True, text=True, timeout=600, cwd=tests.parent,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout
