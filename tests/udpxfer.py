"""A UDP file transfer run inside a namespace, for the offload tests: the sender hands the kernel up to 64
datagrams per sendmsg with UDP_SEGMENT (GSO; 47 of
1392 bytes fit in one buffer), the receiver reads with UDP_GRO; a TCP control connection
carries the receiver's list of missing sequence numbers back, and the sender resends those (bounded rounds).

    python udpxfer.py serve HOST UDP_PORT CTL_PORT --timeout 40       # prints "ready", then one JSON line
    python udpxfer.py send HOST UDP_PORT CTL_PORT --bytes N --rate-mbit 200 --timeout 40   # one JSON line

Every datagram is self-describing: magic, sequence number, datagram count, payload length and a BLAKE2b
digest of all of it, so the receiver checks each one on arrival (length and content) and counts corrupt
ones and duplicates. The receiver reassembles the file and prints its SHA-256; the sender prints the
SHA-256 of what it sent.

Control protocol (one JSON object per line): sender -> {"count", "bytes"}; receiver -> {"go": true};
then per round sender -> {"end": round}; receiver (once the UDP flow has gone quiet) -> {"missing": [[start,
stop), ...]}. An empty list ends the transfer.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import random
import select
import socket
import struct
import sys
import time

SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
UDP_GRO = getattr(socket, "UDP_GRO", 104)
DATAGRAM = 1392  # largest inner UDP payload over IPv4 with the tunnel MTU of 1420 (1420 - 20 - 8)
# Up to 64 datagrams per sendmsg, as turbowg.bench.udpgen, but the kernel refuses a GSO buffer whose UDP
# payload does not fit in 16 bits with the headers: 47 datagrams of 1392 bytes.
SEGMENTS_PER_CALL = min(64, (65535 - 8 - 20) // DATAGRAM)
HEADER = struct.Struct("!4sIIH8s")  # magic, seq, count, payload length, digest
MAGIC = b"TWU1"
CHUNK = DATAGRAM - HEADER.size
QUIET = 0.3  # seconds without a datagram after the sender's "end": the round has drained
MAX_DRAIN = 5.0
SOCKET_BUFFER = 32 << 20


def digest(seq: int, count: int, payload: bytes) -> bytes:
    return hashlib.blake2b(struct.pack("!II", seq, count) + payload, digest_size=8).digest()


def make_datagram(seq: int, count: int, payload: bytes) -> bytes:
    return HEADER.pack(MAGIC, seq, count, len(payload), digest(seq, count, payload)) + payload


def to_ranges(seqs: list[int]) -> list[list[int]]:
    ranges: list[list[int]] = []
    for s in seqs:
        if ranges and ranges[-1][1] == s:
            ranges[-1][1] = s + 1
        else:
            ranges.append([s, s + 1])
    return ranges


def force_buffer(sock: socket.socket, force: int, plain: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)


class LineChannel:
    """JSON lines over a TCP socket, each read bounded by the socket's timeout."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def send(self, obj: object) -> None:
        self.sock.sendall(json.dumps(obj).encode() + b"\n")

    def has_line(self) -> bool:
        return b"\n" in self.buf

    def feed(self) -> bool:
        """One recv into the buffer; False on EOF."""
        data = self.sock.recv(1 << 16)
        self.buf += data
        return bool(data)

    def recv(self) -> object:
        while not self.has_line():
            if not self.feed():
                raise ConnectionError("control connection closed")
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)


def serve(host: str, udp_port: int, ctl_port: int, timeout: float) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    force_buffer(udp, getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF)
    udp.setsockopt(SOL_UDP, UDP_GRO, 1)
    udp.bind((host, udp_port))
    udp.setblocking(False)
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, ctl_port))
    srv.listen(1)
    srv.settimeout(timeout)
    print("ready", flush=True)
    conn, _ = srv.accept()
    conn.settimeout(max(1.0, deadline - time.monotonic()))
    ctl = LineChannel(conn)
    hello = ctl.recv()
    assert isinstance(hello, dict)
    count, nbytes = int(hello["count"]), int(hello["bytes"])
    last_len = nbytes - (count - 1) * CHUNK
    chunks: list[bytes | None] = [None] * count
    have = 0
    stats = {"received": 0, "duplicates": 0, "corrupt": 0, "recv_calls": 0, "gro_buffers": 0, "truncated": 0,
             "max_segments": 0, "rounds": 0, "missing_per_round": []}
    buf = bytearray(1 << 17)
    view = memoryview(buf)
    ancillary = socket.CMSG_SPACE(4)

    def take(segment: bytes) -> None:
        nonlocal have
        stats["received"] += 1
        if len(segment) < HEADER.size:
            stats["corrupt"] += 1
            return
        magic, seq, cnt, length, dig = HEADER.unpack_from(segment)
        payload = segment[HEADER.size:]
        if (magic != MAGIC or cnt != count or seq >= count or length != len(payload)
                or length != (last_len if seq == count - 1 else CHUNK) or dig != digest(seq, cnt, payload)):
            stats["corrupt"] += 1
            return
        old = chunks[seq]
        if old is not None:
            stats["duplicates"] += 1
            if old != payload:
                stats["corrupt"] += 1
            return
        chunks[seq] = payload
        have += 1

    def drain_udp() -> int:
        """Read every datagram queued now; returns how many arrived."""
        got = 0
        while True:
            try:
                n, cmsgs, flags, _addr = udp.recvmsg_into([buf], ancillary)
            except BlockingIOError:
                return got
            stats["recv_calls"] += 1
            if flags & socket.MSG_TRUNC:
                stats["truncated"] += 1
                stats["corrupt"] += 1
                continue
            seg = n
            for level, kind, data in cmsgs:
                if level == SOL_UDP and kind == UDP_GRO:
                    seg = int.from_bytes(data[:4] if len(data) >= 4 else data[:2], sys.byteorder) or n
            segments = 0
            for off in range(0, n, seg):
                take(bytes(view[off:min(off + seg, n)]))
                segments += 1
            got += segments
            if segments > 1:
                stats["gro_buffers"] += 1
            stats["max_segments"] = max(stats["max_segments"], segments)

    ctl.send({"go": True})
    finished = False
    while not finished:
        if time.monotonic() > deadline:
            raise TimeoutError(f"transfer not finished in {timeout} s ({have}/{count} datagrams)")
        if not ctl.has_line():
            readable, _, _ = select.select([udp, conn], [], [], 0.2)
            if udp in readable:
                drain_udp()
            if conn in readable and not ctl.feed():
                raise ConnectionError("control connection closed before the end")
            if not ctl.has_line():
                continue
        msg = ctl.recv()
        assert isinstance(msg, dict) and "end" in msg, msg
        # The round is over on the sender's side; wait until what is still in flight has arrived.
        drain_until = min(time.monotonic() + MAX_DRAIN, deadline)
        quiet_since = time.monotonic()
        while time.monotonic() < drain_until and time.monotonic() - quiet_since < QUIET:
            readable, _, _ = select.select([udp], [], [], 0.05)
            if readable and drain_udp():
                quiet_since = time.monotonic()
        missing = [i for i, c in enumerate(chunks) if c is None]
        stats["rounds"] += 1
        stats["missing_per_round"].append(len(missing))
        ctl.send({"missing": to_ranges(missing)})
        finished = not missing
    conn.close()
    srv.close()
    # Late stragglers (resent datagrams that had not been lost, only late) still count as duplicates.
    drain_udp()
    udp.close()
    data = b"".join(c for c in chunks if c is not None)
    return {"role": "serve", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "count": count,
            "unique": have, **stats}


def send(host: str, udp_port: int, ctl_port: int, nbytes: int, seed: int, rate_mbit: float, max_rounds: int,
         timeout: float, withhold_every: int = 0) -> dict[str, object]:
    """`withhold_every` N > 0: the first round leaves out every Nth datagram, so the resend path always runs
    (the namespaces have no netem to lose packets on purpose)."""
    start = time.monotonic()
    deadline = start + timeout
    data = random.Random(seed).randbytes(nbytes)
    count = -(-nbytes // CHUNK)
    datagrams = [make_datagram(i, count, data[i * CHUNK:(i + 1) * CHUNK]) for i in range(count)]
    while True:
        try:
            conn = socket.create_connection((host, ctl_port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    conn.settimeout(max(1.0, deadline - time.monotonic()))
    ctl = LineChannel(conn)
    ctl.send({"count": count, "bytes": nbytes})
    assert ctl.recv() == {"go": True}

    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    force_buffer(udp, getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF)
    dest = (host, udp_port)
    cmsg = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", DATAGRAM))]
    stats = {"sendmsg_calls": 0, "gso_calls": 0, "sent": 0, "resent": 0, "errors": 0, "rounds": 0,
             "withheld": 0}
    seconds_per_bit = 1.0 / (rate_mbit * 1e6)
    todo = list(range(count))
    withheld = todo[withhold_every - 1::withhold_every] if withhold_every > 0 else []
    if withheld:
        todo = sorted(set(todo) - set(withheld))
        stats["withheld"] = len(withheld)
    complete = False
    while stats["rounds"] < max_rounds and time.monotonic() < deadline:
        stats["rounds"] += 1
        if stats["rounds"] > 1:
            stats["resent"] += len(todo)
        next_send = time.monotonic()
        i = 0
        while i < len(todo) and time.monotonic() < deadline:
            # Up to SEGMENTS_PER_CALL full-size datagrams per call; a short one (the file's last) may only end a batch.
            batch = []
            while i < len(todo) and len(batch) < SEGMENTS_PER_CALL:
                dgram = datagrams[todo[i]]
                batch.append(dgram)
                i += 1
                if len(dgram) != DATAGRAM:
                    break
            payload = b"".join(batch)
            now = time.monotonic()
            if next_send > now:
                time.sleep(next_send - now)
            next_send = max(next_send, now) + len(payload) * 8 * seconds_per_bit
            try:
                udp.sendmsg([payload], cmsg, 0, dest)
            except OSError as exc:
                if exc.errno not in (errno.ENOBUFS, errno.EAGAIN):
                    raise  # EIO/EINVAL here means no UDP_SEGMENT: the test wants GSO, so fail loudly
                stats["errors"] += 1  # those datagrams are lost; the receiver will ask for them again
                time.sleep(0.002)
            stats["sendmsg_calls"] += 1
            stats["gso_calls"] += len(batch) > 1
            stats["sent"] += len(batch)
        ctl.send({"end": stats["rounds"]})
        reply = ctl.recv()
        assert isinstance(reply, dict), reply
        todo = [s for start_, stop in reply["missing"] for s in range(start_, stop)]
        if not todo:
            complete = True
            break
    udp.close()
    conn.close()
    return {"role": "send", "bytes": nbytes, "sha256": hashlib.sha256(data).hexdigest(), "count": count,
            "complete": complete, "still_missing": len(todo), "seconds": time.monotonic() - start, **stats}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["serve", "send"])
    parser.add_argument("host")
    parser.add_argument("udp_port", type=int)
    parser.add_argument("ctl_port", type=int)
    parser.add_argument("--bytes", type=int, default=32 << 20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--rate-mbit", type=float, default=200.0, help="pace every round at this rate")
    parser.add_argument("--rounds", type=int, default=10, help="at most this many rounds (first + resends)")
    parser.add_argument("--timeout", type=float, default=40.0)
    parser.add_argument("--withhold-every", type=int, default=0, help="first round: leave out every Nth datagram")
    args = parser.parse_args()
    if args.mode == "serve":
        result = serve(args.host, args.udp_port, args.ctl_port, args.timeout)
    else:
        result = send(args.host, args.udp_port, args.ctl_port, args.bytes, args.seed, args.rate_mbit,
                      args.rounds, args.timeout, args.withhold_every)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
