"""A handshake-initiation flooder for `turbowg bench flood`: `python -m turbowg.bench.flooder ...`.

Every packet is a 148-byte WireGuard initiation with a valid mac1 for the responder's public key (so it
passes the first, cheap check and costs the responder real work), zero mac2 and random everything else
(sender index, ephemeral, encrypted static and timestamp), sent from one of `--sources` x `--ports`
source addresses. The packets are built once (IPv4 + UDP + initiation, `--pool` of them cycling over
all sources) and sent with sendmmsg(2) on one raw IPPROTO_RAW socket (IP_HDRINCL: the source address
is ours to choose; the kernel fills in the IP checksum, total length and id), up to BATCH per system
call, so one process reaches several hundred thousand packets per second. `--rate 0` sends as fast as it
can; a positive rate is paced against the monotonic clock in ticks of PACE_TICK: each tick sends what is
due, then the flooder sleeps to the next tick. The flooder is part of the benchmark, not of the victim (a
real attacker's CPU is not the responder's), but here it shares the 2 cores with the tunnel: a tick per
packet (one wake per 50 us at 20k/s) cost it ~30% of a core, coarse ticks a fraction of that.
The addresses must route back to the flooder's namespace (the benchmark puts them on its interface),
or the responder's cookie replies go nowhere.

Prints one JSON object: packets the kernel accepted (`sent`), send errors, the real duration and rate,
and the flooder's own CPU (`cpu_percent`: user + system of this process, % of one core; the kernel's
delivery of the packets into the responder's namespace runs mostly in this process's send calls).
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import ipaddress
import json
import os
import resource
import socket
import struct
import sys
import time

from turbowg.conn.recvmmsg import Iovec, Mmsghdr
from turbowg.noise.handshake import INITIATION_SIZE, LABEL_MAC1, MESSAGE_INITIATION
from turbowg.noise.primitives import MAC_SIZE, hash_, mac

BATCH = 256
# Pacing granularity: at 20,000/s a tick sends 40 packets in one call (wireguard-go and turbowgd see the same
# flood; a real flood arrives in bursts too, from NIC interrupt coalescing).
PACE_TICK = 0.002
MAX_DURATION = 3600.0


def build_initiation(mac1_key: bytes, rng: object = os.urandom) -> bytes:
    """A random initiation whose mac1 is valid for the responder whose mac1 key is `mac1_key`."""
    body = struct.pack("<I", MESSAGE_INITIATION) + rng(INITIATION_SIZE - 4 - 2 * MAC_SIZE)  # type: ignore[operator]
    return body + mac(mac1_key, body) + bytes(MAC_SIZE)


def mac1_key_for(public_key: bytes) -> bytes:
    return hash_(LABEL_MAC1, public_key)


def _ipv4_udp(src: bytes, sport: int, dst: bytes, dport: int, payload: bytes) -> bytes:
    # Total length, id and checksum are filled in by the kernel for IP_HDRINCL; a zero UDP checksum
    # means "none" over IPv4.
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 0, 0, 0, 64, socket.IPPROTO_UDP, 0, src, dst)
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
    return ip + udp + payload


class _SockaddrIn(ctypes.Structure):
    _fields_ = [("sin_family", ctypes.c_ushort), ("sin_port", ctypes.c_uint16),
                ("sin_addr", ctypes.c_ubyte * 4), ("sin_zero", ctypes.c_ubyte * 8)]


class RawSender:
    """Pre-built packets sent with sendmmsg on a raw socket, cycling through the pool."""

    def __init__(self, packets: list[bytes], dst: bytes) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        self._sendmmsg = libc.sendmmsg
        self._sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
        self._sendmmsg.restype = ctypes.c_int
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.sock.setblocking(False)
        with_tail = packets + packets[:BATCH]  # the last batch of a cycle need not wrap around
        self.count = len(packets)
        self._buffers = [ctypes.create_string_buffer(p, len(p)) for p in with_tail]
        self._addr = _SockaddrIn(socket.AF_INET, 0, (ctypes.c_ubyte * 4)(*dst))
        self._iovs = (Iovec * len(with_tail))()
        self._msgs = (Mmsghdr * len(with_tail))()
        for i, buf in enumerate(self._buffers):
            self._iovs[i].iov_base = ctypes.addressof(buf)
            self._iovs[i].iov_len = len(with_tail[i])
            hdr = self._msgs[i].msg_hdr
            hdr.msg_name = ctypes.addressof(self._addr)
            hdr.msg_namelen = ctypes.sizeof(_SockaddrIn)
            hdr.msg_iov = ctypes.pointer(self._iovs[i])
            hdr.msg_iovlen = 1
        self._base = ctypes.addressof(self._msgs)
        self._size = ctypes.sizeof(Mmsghdr)
        self.position = 0
        self.errors = 0

    def send(self, n: int) -> int:
        """Send up to min(n, BATCH) packets; returns how many the kernel took (0 on a full queue)."""
        n = min(n, BATCH)
        got = self._sendmmsg(self.sock.fileno(), self._base + self.position * self._size, n, 0)
        if got < 0:
            err = ctypes.get_errno()
            if err not in (errno.EAGAIN, errno.ENOBUFS, errno.EINTR):
                raise OSError(err, os.strerror(err))
            self.errors += 1
            return 0
        self.position = (self.position + got) % self.count
        return got

    def close(self) -> None:
        self.sock.close()


def _ipv4_checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ethernet_frame(packet: bytes, src_mac: bytes, dst_mac: bytes) -> bytes:
    """An IPv4 packet of build_packets as a complete Ethernet frame (what IP_HDRINCL has the kernel fill in,
    total length and header checksum, done here; id 0 with DF, as the kernel leaves a DF datagram)."""
    header = bytearray(packet[:20])
    struct.pack_into("!HHH", header, 2, len(packet), 0, 0x4000)
    struct.pack_into("!H", header, 10, 0)
    struct.pack_into("!H", header, 10, _ipv4_checksum(bytes(header)))
    return dst_mac + src_mac + b"\x08\x00" + bytes(header) + packet[20:]


class _SockaddrLl(ctypes.Structure):
    _fields_ = [("sll_family", ctypes.c_ushort), ("sll_protocol", ctypes.c_uint16), ("sll_ifindex", ctypes.c_int),
                ("sll_hatype", ctypes.c_ushort), ("sll_pkttype", ctypes.c_ubyte), ("sll_halen", ctypes.c_ubyte),
                ("sll_addr", ctypes.c_ubyte * 8)]


SOL_PACKET = 263
PACKET_QDISC_BYPASS = 20
_ETH_P_IP = 0x0800


def neighbour_mac(dst: str, interface: str, timeout: float = 2.0) -> bytes:
    """The link-layer address of `dst` on `interface` from the ARP table, resolved first if needed (one
    empty UDP datagram to its discard port makes the kernel ask)."""
    deadline = time.monotonic() + timeout
    primed = False
    while True:
        with open("/proc/net/arp") as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) >= 6 and fields[0] == dst and fields[5] == interface and fields[3] != "00:00:00:00:00:00":
                    return bytes.fromhex(fields[3].replace(":", ""))
        if time.monotonic() > deadline:
            raise OSError(errno.EHOSTUNREACH, f"no ARP entry for {dst} on {interface}")
        if not primed:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as prime:
                prime.sendto(b"", (dst, 9))
            primed = True
        time.sleep(0.01)


class PacketSender(RawSender):
    """RawSender's packets as prebuilt Ethernet frames on an AF_PACKET socket with PACKET_QDISC_BYPASS: the
    same datagrams reach the responder (one per skb, same sources, same pacing), without the sender's IP
    output path (route lookup, netfilter, neighbour, qdisc) per packet. Bound to no protocol: it receives
    nothing (the cookie replies are not copied to it)."""

    def __init__(self, packets: list[bytes], dst: bytes, interface: str) -> None:
        with open(f"/sys/class/net/{interface}/address") as f:
            src_mac = bytes.fromhex(f.read().strip().replace(":", ""))
        dst_mac = neighbour_mac(socket.inet_ntoa(dst), interface)
        frames = [ethernet_frame(p, src_mac, dst_mac) for p in packets]
        super().__init__(frames, dst)
        self.sock.close()
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        self.sock.setblocking(False)
        try:
            self.sock.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
        except OSError:
            pass  # older kernel: through the device's qdisc (veth has none by default)
        self._ll = _SockaddrLl(socket.AF_PACKET, socket.htons(_ETH_P_IP), socket.if_nametoindex(interface), 0, 0, 6,
                               (ctypes.c_ubyte * 8)(*dst_mac, 0, 0))
        for i in range(len(self._msgs)):
            hdr = self._msgs[i].msg_hdr
            hdr.msg_name = ctypes.addressof(self._ll)
            hdr.msg_namelen = ctypes.sizeof(_SockaddrLl)


def build_packets(public_key: bytes, dst: str, dport: int, sources: list[str], ports: list[int],
                  pool: int) -> list[bytes]:
    """`pool` packets (at least one per source address and port), sources interleaved."""
    key = mac1_key_for(public_key)
    dst_b = socket.inet_aton(dst)
    pairs = [(socket.inet_aton(s), p) for p in ports for s in sources]
    pool = max(pool, len(pairs))
    return [_ipv4_udp(pairs[i % len(pairs)][0], pairs[i % len(pairs)][1], dst_b, dport,
                      build_initiation(key)) for i in range(pool)]


def flood(sender: RawSender, rate: float, duration: float, clock=time.monotonic, sleep=time.sleep,
          tick: float = PACE_TICK) -> dict:
    """Send for `duration` seconds at `rate` packets/s (0: as fast as possible), paced in ticks of `tick`."""
    duration = min(max(duration, 0.0), MAX_DURATION)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = clock()
    sent = 0
    calls = 0
    while True:
        elapsed = clock() - start
        if elapsed >= duration:
            break
        if rate > 0:
            due = int(rate * elapsed) + 1 - sent
            if due <= 0:
                # Nothing due: sleep a tick (or to the next packet, at rates below one per tick); what falls
                # due meanwhile goes out in one call.
                sleep(max(tick, (sent - rate * elapsed) / rate))
                continue
            got = sender.send(due)
        else:
            got = sender.send(BATCH)
        calls += 1
        sent += got
        if got == 0:
            sleep(0.0001)  # the device queue is full: let it drain
    elapsed = clock() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    return {"sent": sent, "calls": calls, "send_errors": sender.errors, "seconds": elapsed,
            "rate": sent / elapsed if elapsed > 0 else 0.0, "target_rate": rate,
            "cpu_percent": 100.0 * cpu / elapsed if elapsed > 0 else 0.0}


def source_addresses(network: str, count: int) -> list[str]:
    """The first `count` host addresses of `network` (the benchmark assigns the same ones)."""
    net = ipaddress.IPv4Network(network)
    hosts = []
    for address in net.hosts():
        if len(hosts) == count:
            break
        hosts.append(str(address))
    if len(hosts) < count:
        raise ValueError(f"{network} has fewer than {count} host addresses")
    return hosts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m turbowg.bench.flooder", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dst", required=True, help="responder IPv4 address")
    parser.add_argument("--port", type=int, required=True, help="responder UDP port")
    parser.add_argument("--public-key", required=True, help="responder public key (base64)")
    parser.add_argument("--source-net", default="10.203.0.0/24", help="spoofed sources: first hosts of this net")
    parser.add_argument("--sources", type=int, default=64, help="number of source addresses (default 64)")
    parser.add_argument("--ports", type=int, default=8, help="source ports per address (default 8)")
    parser.add_argument("--port-base", type=int, default=40000)
    parser.add_argument("--rate", type=float, default=0.0, help="initiations per second, 0 = as fast as possible")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--pool", type=int, default=4096, help="distinct packets built (default 4096)")
    parser.add_argument("--interface", help="send prebuilt Ethernet frames on this interface (AF_PACKET, qdisc "
                                            "bypass) instead of the raw IP socket: the same datagrams, less CPU")
    args = parser.parse_args(argv)
    import base64

    public_key = base64.b64decode(args.public_key)
    if len(public_key) != 32:
        parser.error("public key must be 32 bytes of base64")
    if not 1 <= args.sources <= 250 or not 1 <= args.ports <= 1000:
        parser.error("sources must be 1..250 and ports 1..1000")
    sources = source_addresses(args.source_net, args.sources)
    ports = [args.port_base + i for i in range(args.ports)]
    packets = build_packets(public_key, args.dst, args.port, sources, ports, args.pool)
    if args.interface:
        sender: RawSender = PacketSender(packets, socket.inet_aton(args.dst), args.interface)
    else:
        sender = RawSender(packets, socket.inet_aton(args.dst))
    try:
        result = flood(sender, args.rate, args.duration)
    finally:
        sender.close()
    result.update(sources=len(sources), ports=len(ports), mode="packet" if args.interface else "raw")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
