"""UDP load the QUIC way, and a verified file transfer over it: sends hand the kernel one buffer per
sendmsg with a UDP_SEGMENT control message (GSO: the kernel cuts it into equal datagrams), receivers turn
on UDP_GRO and get coalesced runs back with the segment size in a control message. iperf3 sends one
datagram per syscall, so it measures a different (and, for QUIC, unrepresentative) load.

Load (counts only):

    python -m turbowg.testing.udpgen recv --port 9000 --timeout 20          # JSON when traffic stops
    python -m turbowg.testing.udpgen send --host 10.0.0.2 --port 9000 --duration 5 --size 1392
    python -m turbowg.testing.udpgen send ... --rate-mbit 500               # paced: 500 Mbit/s offered

Unpaced, the sender sends 64 datagrams per call (or as many as fit in one 64 KiB GSO buffer) as fast
as the kernel takes them. Paced, it sends a burst about every millisecond (as many datagrams as the
rate allows in 1 ms, up to that limit) on a schedule; it catches up on at most 20 ms it fell behind (a
bounded burst), so `sent_bps` below the offered rate means the sender itself could not keep up.

File (every datagram self-describing and checked, missing ones resent over a TCP control channel):

    python -m turbowg.testing.udpgen file-serve HOST UDP_PORT CTL_PORT --timeout 40   # "ready", then JSON
    python -m turbowg.testing.udpgen file-send HOST UDP_PORT CTL_PORT --bytes N --rate-mbit 200

Every result is one JSON line on stdout and includes the process's own CPU seconds (user + system).

Why one file (~520 lines): it is one program, run as `python -m` inside namespaces; the load sender and
receiver and the file transfer share the datagram format, the socket set-up and the JSON report.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import random
import select
import socket
import struct
import sys
import time

from turbowg.linux import SO_RCVBUFFORCE, SO_SNDBUFFORCE, SOL_UDP, UDP_GRO, UDP_SEGMENT
from turbowg.testing.tcpxfer import accept_one, connect_retrying

SEGMENTS_PER_CALL = 64
# The kernel refuses a GSO buffer whose UDP payload plus headers does not fit in 16 bits.
GSO_MAX_PAYLOAD = 65535 - 8 - 40
RECV_BUFFER = 1 << 17
IDLE_AFTER_TRAFFIC = 1.0  # seconds without a datagram after traffic began: the sender is done
SOCKET_BUFFER = 32 << 20
PACING_BURST = 0.001  # seconds of traffic per paced sendmsg
MAX_LAG = 0.02  # a paced sender this far behind (descheduled) restarts its schedule: bursts stay bounded
_TRANSIENT = (errno.ENOBUFS, errno.ECONNREFUSED, errno.EAGAIN)  # qdisc full; ICMP error from an earlier send


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def grow_buffer(sock: socket.socket, send: bool) -> None:
    """Ask for SOCKET_BUFFER bytes (root may exceed [rw]mem_max with the FORCE option)."""
    force, plain = (SO_SNDBUFFORCE, socket.SO_SNDBUF) if send else (SO_RCVBUFFORCE, socket.SO_RCVBUF)
    for option in (force, plain):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            return
        except OSError:
            continue


def segments_per_call(size: int) -> int:
    return max(1, min(SEGMENTS_PER_CALL, GSO_MAX_PAYLOAD // size))


def gso_cmsg(size: int) -> list[tuple[int, int, bytes]]:
    return [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))]


def gro_segment_size(cmsgs: list[tuple[int, int, bytes]], nbytes: int) -> int:
    """The segment size of one UDP_GRO read (nbytes if the read was a single datagram)."""
    for level, kind, data in cmsgs:
        if level == SOL_UDP and kind == UDP_GRO and len(data) >= 2:
            return int.from_bytes(data[:4] if len(data) >= 4 else data[:2], sys.byteorder) or nbytes
    return nbytes


def open_gro_socket(bind: str, port: int) -> tuple[socket.socket, bool]:
    """A bound UDP socket with UDP_GRO on if the kernel has it; (socket, gro_enabled)."""
    family = family_of(bind) if bind else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    grow_buffer(sock, send=False)
    gro = True
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        gro = False
    sock.bind((bind, port))
    return sock, gro


# ---------------------------------------------------------------- load


def send(host: str, port: int, duration: float, size: int, rate_bps: float | None = None) -> dict[str, object]:
    """Send for `duration` seconds, unpaced (rate_bps None) or paced at `rate_bps` of UDP payload."""
    if not 1 <= size <= 65000:
        raise ValueError("datagram size must be 1..65000")
    if rate_bps is not None and rate_bps <= 0:
        raise ValueError("rate must be positive")
    cpu0 = cpu_seconds()
    sock = socket.socket(family_of(host), socket.SOCK_DGRAM)
    grow_buffer(sock, send=True)
    sock.connect((host, port))
    per_call = segments_per_call(size)
    if rate_bps is not None:
        per_call = max(1, min(per_call, round(rate_bps * PACING_BURST / 8 / size)))
    buffer = bytearray(size * per_call)
    view = memoryview(buffer)
    cmsg = gso_cmsg(size)
    gso = True
    datagrams = calls = errors = 0
    try:
        sock.sendmsg([view], cmsg)
        datagrams, calls = per_call, 1
    except OSError as exc:
        if exc.errno in _TRANSIENT:
            errors += 1
        elif exc.errno in (errno.EIO, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT):
            gso = False  # no UDP_SEGMENT here: fall back to one datagram per call
        else:
            raise
    if not gso:
        per_call = 1
        view = view[:size]
    sendmsg = sock.sendmsg
    monotonic = time.monotonic

    def burst(n: int) -> None:
        """`n` sends; a full queue or an ICMP error from an earlier send counts as an error, not a stop."""
        nonlocal datagrams, calls, errors
        for _ in range(n):
            try:
                if gso:
                    sendmsg([view], cmsg)
                else:
                    sock.send(view)
                datagrams += per_call
                calls += 1
            except OSError as exc:
                if exc.errno not in _TRANSIENT:
                    raise
                errors += 1

    start = monotonic()
    deadline = start + duration
    if rate_bps is None:
        while True:
            burst(16)  # check the clock every 16 calls: a syscall is cheap, time.monotonic() in Python less so
            if monotonic() >= deadline:
                break
    else:
        interval = per_call * size * 8 / rate_bps
        next_send = start
        sleep = time.sleep
        while True:
            now = monotonic()
            if now >= deadline:
                break
            if next_send > now:
                sleep(min(next_send - now, deadline - now))
                continue
            if now - next_send > MAX_LAG:
                next_send = now  # behind: do not burst to catch up
            burst(1)
            next_send += interval
    elapsed = monotonic() - start
    sock.close()
    return {"role": "send", "gso": gso, "size": size, "segments_per_call": per_call,
            "calls": calls, "datagrams": datagrams, "bytes": datagrams * size, "errors": errors,
            "seconds": elapsed, "offered_bps": rate_bps, "sent_bps": datagrams * size * 8 / elapsed if elapsed else 0.0,
            "cpu_seconds": cpu_seconds() - cpu0}


def receive(port: int, timeout: float, bind: str = "::", ready_file: str | None = None) -> dict[str, object]:
    """Count datagrams until traffic stops for IDLE_AFTER_TRAFFIC s, or `timeout` s pass in total."""
    cpu0 = cpu_seconds()
    sock, gro = open_gro_socket(bind, port)
    if ready_file:
        with open(ready_file + ".tmp", "w") as f:
            f.write("ready\n")
        os.rename(ready_file + ".tmp", ready_file)  # appears complete, never half-written
    buffer = bytearray(RECV_BUFFER)
    ancillary = socket.CMSG_SPACE(4)
    recvmsg_into = sock.recvmsg_into
    datagrams = received = 0
    first = last = 0.0
    started = time.monotonic()
    hard_deadline = started + timeout
    sock.settimeout(0.2)
    while True:
        now = time.monotonic()
        if now >= hard_deadline or (datagrams and now - last >= IDLE_AFTER_TRAFFIC):
            break
        try:
            nbytes, cmsgs, _flags, _addr = recvmsg_into([buffer], ancillary)
        except TimeoutError:
            continue
        last = time.monotonic()
        if not datagrams:
            first = last
        segment = gro_segment_size(cmsgs, nbytes)
        received += nbytes
        datagrams += -(-nbytes // segment) if segment else 1
    sock.close()
    active = last - first
    return {"role": "recv", "gro": gro, "datagrams": datagrams, "bytes": received, "seconds": active,
            "goodput_bps": received * 8 / active if active > 0 else 0.0,
            "timed_out": time.monotonic() >= hard_deadline, "cpu_seconds": cpu_seconds() - cpu0}


# ---------------------------------------------------------------- file transfer with resends
#
# Every datagram: magic, sequence number, datagram count, payload length and a BLAKE2b digest of all of
# it, so the receiver checks each one on arrival and counts corrupt ones and duplicates. Control protocol
# (one JSON object per line over TCP): sender -> {"count", "bytes"}; receiver -> {"go": true}; then per
# round sender -> {"end": round}; receiver (once the UDP flow has gone quiet) -> {"missing": [[start,
# stop), ...]}. An empty list ends the transfer.

DATAGRAM = 1392  # largest inner UDP payload over IPv4 with the tunnel MTU of 1420 (1420 - 20 - 8)
FILE_SEGMENTS_PER_CALL = segments_per_call(DATAGRAM)  # 47
HEADER = struct.Struct("!4sIIH8s")  # magic, seq, count, payload length, digest
MAGIC = b"TWU1"
CHUNK = DATAGRAM - HEADER.size
QUIET = 0.3  # seconds without a datagram after the sender's "end": the round has drained
MAX_DRAIN = 5.0


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


def file_serve(host: str, udp_port: int, ctl_port: int, timeout: float) -> dict[str, object]:
    cpu0 = cpu_seconds()
    deadline = time.monotonic() + timeout
    udp, _gro = open_gro_socket(host, udp_port)
    udp.setblocking(False)
    conn = accept_one(host, ctl_port, timeout)
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
    buf = bytearray(RECV_BUFFER)
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
            seg = gro_segment_size(cmsgs, n)
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
    # Late stragglers (resent datagrams that had not been lost, only late) still count as duplicates.
    drain_udp()
    udp.close()
    data = b"".join(c for c in chunks if c is not None)
    return {"role": "serve", "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "count": count,
            "unique": have, **stats, "cpu_seconds": cpu_seconds() - cpu0}


def file_send(host: str, udp_port: int, ctl_port: int, nbytes: int, seed: int, rate_mbit: float, max_rounds: int,
              timeout: float, withhold_every: int = 0) -> dict[str, object]:
    """`withhold_every` N > 0: the first round leaves out every Nth datagram, so the resend path always runs
    (the namespaces have no netem to lose packets on purpose)."""
    cpu0 = cpu_seconds()
    start = time.monotonic()
    deadline = start + timeout
    data = random.Random(seed).randbytes(nbytes)
    count = -(-nbytes // CHUNK)
    datagrams = [make_datagram(i, count, data[i * CHUNK:(i + 1) * CHUNK]) for i in range(count)]
    conn = connect_retrying(host, ctl_port, deadline)
    conn.settimeout(max(1.0, deadline - time.monotonic()))
    ctl = LineChannel(conn)
    ctl.send({"count": count, "bytes": nbytes})
    assert ctl.recv() == {"go": True}

    udp = socket.socket(family_of(host), socket.SOCK_DGRAM)
    grow_buffer(udp, send=True)
    dest = (host, udp_port)
    cmsg = gso_cmsg(DATAGRAM)
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
            # Full-size datagrams per call; a short one (the file's last) may only end a batch.
            batch = []
            while i < len(todo) and len(batch) < FILE_SEGMENTS_PER_CALL:
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
            "complete": complete, "still_missing": len(todo), "seconds": time.monotonic() - start, **stats,
            "cpu_seconds": cpu_seconds() - cpu0}


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m turbowg.testing.udpgen", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="role", required=True)
    s = sub.add_parser("send", help="send with UDP_SEGMENT for --duration seconds")
    s.add_argument("--host", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--duration", type=float, default=5.0)
    s.add_argument("--size", type=int, default=1392, help="UDP payload bytes per datagram")
    s.add_argument("--rate-mbit", type=float, help="pace at this many Mbit/s of UDP payload (default: unpaced)")
    r = sub.add_parser("recv", help="receive with UDP_GRO and count")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--bind", default="::")
    r.add_argument("--timeout", type=float, default=60.0, help="give up after this many seconds in total")
    r.add_argument("--ready-file", help="create this file once the socket is bound")
    for name in ("file-serve", "file-send"):
        f = sub.add_parser(name, help="verified file transfer with resends (receiving / sending end)")
        f.add_argument("host")
        f.add_argument("udp_port", type=int)
        f.add_argument("ctl_port", type=int)
        f.add_argument("--timeout", type=float, default=40.0)
        if name == "file-send":
            f.add_argument("--bytes", type=int, default=32 << 20)
            f.add_argument("--seed", type=int, default=1)
            f.add_argument("--rate-mbit", type=float, default=200.0, help="pace every round at this rate")
            f.add_argument("--rounds", type=int, default=10, help="at most this many rounds (first + resends)")
            f.add_argument("--withhold-every", type=int, default=0,
                           help="first round: leave out every Nth datagram")
    args = parser.parse_args(argv)
    try:
        if args.role == "send":
            if not 0 < args.duration <= 3600:
                parser.error("--duration must be in (0, 3600]")
            rate = args.rate_mbit * 1e6 if args.rate_mbit is not None else None
            result = send(args.host, args.port, args.duration, args.size, rate)
        elif args.role == "recv":
            result = receive(args.port, args.timeout, args.bind, args.ready_file)
        elif args.role == "file-serve":
            result = file_serve(args.host, args.udp_port, args.ctl_port, args.timeout)
        else:
            result = file_send(args.host, args.udp_port, args.ctl_port, args.bytes, args.seed, args.rate_mbit,
                               args.rounds, args.timeout, args.withhold_every)
    except (OSError, ValueError) as exc:
        print(f"udpgen: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
