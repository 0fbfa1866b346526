"""UDP load the QUIC way: a sender that batches datagrams with UDP_SEGMENT and a receiver with UDP_GRO.

QUIC stacks (msquic's secnetperf, quic-go) hand the kernel one large buffer per sendmsg call with a
UDP_SEGMENT control message, and the kernel cuts it into equal datagrams; receivers turn on UDP_GRO
and get coalesced runs of datagrams back with the segment size in a control message. iperf3 sends one
datagram per syscall, so it measures a different (and, for QUIC, unrepresentative) load.

    python -m turbowg.bench.udpgen recv --port 9000 --timeout 20      # prints JSON when traffic stops
    python -m turbowg.bench.udpgen send --host 10.0.0.2 --port 9000 --duration 5 --size 1392

Both print one JSON object on stdout. The sender sends 64 datagrams per call, or as many as fit in
one 64 KiB GSO buffer when 64 would not.
"""

from __future__ import annotations

import argparse
import errno
import json
import socket
import struct
import sys
import time

SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
UDP_GRO = getattr(socket, "UDP_GRO", 104)
SEGMENTS_PER_CALL = 64
# The kernel refuses a GSO buffer whose UDP payload plus headers does not fit in 16 bits.
GSO_MAX_PAYLOAD = 65535 - 8 - 40
RECV_BUFFER = 1 << 16
IDLE_AFTER_TRAFFIC = 1.0  # seconds without a datagram after traffic began: the sender is done
SOCKET_BUFFER = 8 << 20


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _grow_buffer(sock: socket.socket, option: int, force_option: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, force_option, SOCKET_BUFFER)  # root may exceed rmem_max
    except OSError:
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        except OSError:
            pass


def segments_per_call(size: int) -> int:
    return max(1, min(SEGMENTS_PER_CALL, GSO_MAX_PAYLOAD // size))


def send(host: str, port: int, duration: float, size: int) -> dict[str, object]:
    """Send as fast as the kernel takes it for `duration` seconds; returns counts."""
    if not 1 <= size <= 65000:
        raise ValueError("datagram size must be 1..65000")
    sock = socket.socket(_family(host), socket.SOCK_DGRAM)
    _grow_buffer(sock, socket.SO_SNDBUF, getattr(socket, "SO_SNDBUFFORCE", 32))
    sock.connect((host, port))
    per_call = segments_per_call(size)
    buffer = bytearray(size * per_call)
    view = memoryview(buffer)
    cmsg = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))]
    gso = True
    datagrams = calls = errors = 0
    try:
        sock.sendmsg([view], cmsg)
        datagrams, calls = per_call, 1
    except OSError as exc:
        if exc.errno in (errno.ENOBUFS, errno.ECONNREFUSED, errno.EAGAIN):
            errors += 1
        elif exc.errno in (errno.EIO, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT):
            gso = False  # no UDP_SEGMENT here: fall back to one datagram per call
        else:
            raise
    one = view[:size]
    start = time.monotonic()
    deadline = start + duration
    sendmsg = sock.sendmsg
    monotonic = time.monotonic
    while True:
        # Check the clock every 16 calls: a syscall is cheap, time.monotonic() in Python less so.
        for _ in range(16):
            try:
                if gso:
                    sendmsg([view], cmsg)
                    datagrams += per_call
                else:
                    sock.send(one)
                    datagrams += 1
                calls += 1
            except OSError as exc:
                # ENOBUFS: qdisc full; ECONNREFUSED: an ICMP error from an earlier datagram. Keep going.
                if exc.errno not in (errno.ENOBUFS, errno.ECONNREFUSED, errno.EAGAIN):
                    raise
                errors += 1
        if monotonic() >= deadline:
            break
    elapsed = monotonic() - start
    sock.close()
    return {"role": "send", "gso": gso, "size": size, "segments_per_call": per_call if gso else 1,
            "calls": calls, "datagrams": datagrams, "bytes": datagrams * size, "errors": errors,
            "seconds": elapsed}


def receive(port: int, timeout: float, bind: str = "::", ready_file: str | None = None) -> dict[str, object]:
    """Count datagrams until traffic stops for IDLE_AFTER_TRAFFIC s, or `timeout` s pass in total."""
    family = _family(bind) if bind else socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    _grow_buffer(sock, socket.SO_RCVBUF, getattr(socket, "SO_RCVBUFFORCE", 33))
    gro = True
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        gro = False
    sock.bind((bind, port))
    if ready_file:
        with open(ready_file, "w") as f:
            f.write("ready\n")
    buffer = bytearray(RECV_BUFFER)
    ancillary = socket.CMSG_SPACE(4)
    recvmsg_into = sock.recvmsg_into
    datagrams = 0
    received = 0
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
        segment = nbytes
        for level, kind, data in cmsgs:
            if level == SOL_UDP and kind == UDP_GRO and len(data) >= 2:
                segment = int.from_bytes(data[:4] if len(data) >= 4 else data[:2], sys.byteorder) or nbytes
        received += nbytes
        datagrams += -(-nbytes // segment) if segment else 1
    sock.close()
    active = last - first
    return {"role": "recv", "gro": gro, "datagrams": datagrams, "bytes": received, "seconds": active,
            "goodput_bps": received * 8 / active if active > 0 else 0.0,
            "timed_out": time.monotonic() >= hard_deadline}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m turbowg.bench.udpgen", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="role", required=True)
    s = sub.add_parser("send", help="send with UDP_SEGMENT for --duration seconds")
    s.add_argument("--host", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--duration", type=float, default=5.0)
    s.add_argument("--size", type=int, default=1392, help="UDP payload bytes per datagram")
    r = sub.add_parser("recv", help="receive with UDP_GRO and count")
    r.add_argument("--port", type=int, required=True)
    r.add_argument("--bind", default="::")
    r.add_argument("--timeout", type=float, default=60.0, help="give up after this many seconds in total")
    r.add_argument("--ready-file", help="write 'ready' to this file once the socket is bound")
    args = parser.parse_args(argv)
    try:
        if args.role == "send":
            if args.duration <= 0 or args.duration > 3600:
                parser.error("--duration must be in (0, 3600]")
            result = send(args.host, args.port, args.duration, args.size)
        else:
            result = receive(args.port, args.timeout, args.bind, args.ready_file)
    except (OSError, ValueError) as exc:
        print(f"udpgen: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
