"""The eBPF steering program of the handshake socket pair, with the per-source initiation limiter in the kernel.

steering.py holds the device's UDP port with two sockets in one SO_REUSEPORT group and picks the socket per
datagram with a classic BPF program. This module is the eBPF version of that program
(BPF_PROG_TYPE_SK_REUSEPORT, attached with SO_ATTACH_REUSEPORT_EBPF), loaded with the bpf(2) system call
through ctypes from instructions assembled here (no libbpf, no compiler: the program is ~100 instructions).
It does what the classic program does and one thing more:

* steering: the first payload word is a handshake header (type 1, 2 or 3 followed by three zero bytes) ->
  the handshake socket (index HANDSHAKE_INDEX of a REUSEPORT_SOCKARRAY map, bpf_sk_select_reuseport);
  anything else (and anything shorter than 4 bytes) -> the data socket (index DATA_INDEX). If the selected
  socket is gone (a closed socket leaves the map), the kernel picks one of the group by hash, as with the
  classic program's out-of-range index. A socket that joined the group without us is never selected.
* under load only (a flag in an ARRAY map that the handshake worker sets and clears with its own under-load
  state): an initiation or response of its exact size whose mac2 is all zero (a sender without our cookie:
  the messages the user-space screener would answer with a rate-limited cookie reply, recvmmsg.py
  PyScreener) goes through a per-source token bucket (source = IPv4 address or IPv6 /64, read from the
  network header with bpf_skb_load_bytes_relative; an LRU_HASH map of MAX_BUCKETS entries; bpf_ktime_get_ns,
  CLOCK_MONOTONIC as time.monotonic_ns; the same 20/s, burst 5 and the same arithmetic as
  turbowg/ratelimiter). Over the limit: dropped (see below), before the datagram is queued, woken for,
  copied and screened; counted per CPU (STAT_DROPPED) and read by the daemon (`rx_handshake_kernel_ratelimited`).
  What passes is admitted by the kernel (STAT_ADMITTED) and meets the user-space screener as before (which
  applies the same limit again: the kernel only drops what it would drop too, give or take the clock).

Not checked in the kernel: mac1 (BLAKE2s). So a flood with bad mac1 spends the kernel bucket of its source
address, which the user-space limiter (behind the mac1 check) would not: under load, a sender spoofing a
peer's address can keep that address's zero-mac2 handshakes to 20/s, which is what it can do to the cookie
replies in user space anyway. Handshakes with a cookie (non-zero mac2) are never limited here.

Limits of a per-source limit, here as in user space: a flood from ever new spoofed sources gets a fresh
bucket (a burst of 5) per source, so the kernel drops little of it and the worker screens the rest as before.
A UDP GRO run (a NIC's GRO coalescing one flow's datagrams for a socket with UDP_GRO) is one skb longer than
one message: not limited here (its size is not exact), screened and limited in user space.

Over the limit, the datagram goes to a third member of the group, the sink socket (steering.py make_sink),
whose socket filter drops it before it is queued (counted by the kernel as the sink's drops, UDP InErrors).
Not SK_DROP: for UDP that makes the lookup find no socket, so the kernel takes its closed-port path (an ICMP
port unreachable attempt per datagram, within the global ICMP limit): measured at 40k/s, the flooder's CPU
(its sends plus the receive softirq over veth) was 16.4% with SK_DROP, 12.2% with the sink, 11.4% with the
classic program queueing to a full socket, 15.0% for a closed port. SK_DROP stays for a missing sink.

Fallback: `load_steering` raises BpfUnavailable (no bpf(2), not root, an old kernel, the verifier says no),
and steering.py attaches the classic program instead, logging the reason once.
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
from collections.abc import Sequence

from turbowg.ratelimiter import PACKETS_BURSTABLE, PACKETS_PER_SECOND
from turbowg.wire import INITIATION_SIZE, RESPONSE_SIZE

SO_ATTACH_REUSEPORT_EBPF = 52
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "armv7l": 386, "ppc64le": 361, "s390x": 351}

# bpf(2) commands, map and program types (include/uapi/linux/bpf.h)
BPF_MAP_CREATE = 0
BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_PROG_LOAD = 5
MAP_ARRAY = 2
MAP_PERCPU_ARRAY = 6
MAP_LRU_HASH = 9
MAP_REUSEPORT_SOCKARRAY = 20
PROG_SK_REUSEPORT = 21
_ATTR_SIZE = 128

# helper function ids
F_MAP_LOOKUP_ELEM = 1
F_MAP_UPDATE_ELEM = 2
F_KTIME_GET_NS = 5
F_SKB_LOAD_BYTES = 26
F_SKB_LOAD_BYTES_RELATIVE = 68
F_SK_SELECT_REUSEPORT = 82
BPF_HDR_START_NET = 1
SK_DROP, SK_PASS = 0, 1

# struct sk_reuseport_md offsets: data, data_end (pointers), len, eth_protocol, ip_protocol, bind_inany, hash
MD_LEN = 16
MD_ETH_PROTOCOL = 20
# skb->protocol as the context gives it: the big-endian EtherType read as a little-endian u16
_ETH_P_IP = 0x0008
_ETH_P_IPV6 = 0xDD86
# For UDP the program runs with skb->data at the UDP header: the payload starts 8 bytes in, and the context's
# len counts the UDP header (checked on the running kernel by tests/test_ebpf_steering.py).
UDP_HEADER = 8
MAC_SIZE = 16

DATA_INDEX = 0
HANDSHAKE_INDEX = 1
SINK_INDEX = 2
STAT_DROPPED = 0  # over the limit: SK_DROP
STAT_ADMITTED = 1  # under load, zero mac2, within the limit: steered to the handshake socket
_STATS = 2
# As the user-space limiter (turbowg/ratelimiter MAX_ENTRIES); LRU: the least recent goes. An LRU hash is
# preallocated: 6.3 MB of kernel memory per socket pair at this size (fdinfo memlock, 6.18).
MAX_BUCKETS = 1 << 16
PACKET_COST_NS = 1_000_000_000 // PACKETS_PER_SECOND
MAX_TOKENS_NS = PACKET_COST_NS * PACKETS_BURSTABLE
_BUCKET_KEY = 12  # u32 family (4 or 6) + 8 address bytes (IPv4 address and 4 zero bytes, or the IPv6 /64)
_BUCKET_VALUE = 16  # u64 tokens (ns), u64 last time (ns)


class BpfUnavailable(OSError):
    """eBPF steering cannot be used here (the reason is the message)."""


_libc = ctypes.CDLL(None, use_errno=True)


def bpf(cmd: int, attr: bytes | bytearray) -> tuple[int, ctypes.Array]:
    """One bpf(2) call; returns (result, the attribute buffer as the kernel left it). Raises OSError."""
    number = _SYS_BPF.get(os.uname().machine)
    if number is None:
        raise BpfUnavailable(errno.ENOSYS, f"bpf(2) number unknown on {os.uname().machine}")
    buf = ctypes.create_string_buffer(bytes(attr).ljust(_ATTR_SIZE, b"\0"), _ATTR_SIZE)
    result = _libc.syscall(ctypes.c_long(number), ctypes.c_int(cmd), buf, ctypes.c_uint(_ATTR_SIZE))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result, buf


def create_map(kind: int, key_size: int, value_size: int, entries: int, name: bytes = b"") -> int:
    attr = struct.pack("=IIIIIII16s", kind, key_size, value_size, entries, 0, 0, 0, name[:15])
    return bpf(BPF_MAP_CREATE, attr)[0]


def map_update(fd: int, key: bytes, value: bytes, flags: int = 0) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    bpf(BPF_MAP_UPDATE_ELEM, struct.pack("=IxxxxQQQ", fd, ctypes.addressof(k), ctypes.addressof(v), flags))


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    bpf(BPF_MAP_LOOKUP_ELEM, struct.pack("=IxxxxQQQ", fd, ctypes.addressof(k), ctypes.addressof(v), 0))
    return v.raw


def possible_cpus() -> int:
    """How many values a per-CPU map returns per key (the kernel's possible CPUs)."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
    except OSError:
        return os.cpu_count() or 1
    count = 0
    for part in text.split(","):
        low, _, high = part.partition("-")
        count += int(high or low) - int(low) + 1
    return count


def percpu_sum(fd: int, index: int, cpus: int) -> int:
    raw = map_lookup(fd, index.to_bytes(4, "little"), 8 * cpus)
    return sum(struct.unpack(f"={cpus}Q", raw))


# ---------------------------------------------------------------- a small eBPF assembler

R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)
_ALU64, _JMP, _LDX, _STX, _ST, _LD = 0x07, 0x05, 0x01, 0x03, 0x02, 0x00
_K, _X = 0x00, 0x08
_W, _DW = 0x00, 0x18
_MEM = 0x60
_ADD, _SUB, _OR, _MOV = 0x00, 0x10, 0x40, 0xB0
JA, JEQ, JGT, JNE, JSGT, JLE = 0x00, 0x10, 0x20, 0x50, 0x60, 0xB0
_CALL, _EXIT = 0x80, 0x90
_PSEUDO_MAP_FD = 1


class Asm:
    """Instructions with symbolic jump targets; `code()` resolves them."""

    def __init__(self) -> None:
        self.insns: list[list] = []  # [code, dst, src, off | label, imm]
        self.labels: dict[str, int] = {}

    def _emit(self, code: int, dst: int = 0, src: int = 0, off: int | str = 0, imm: int = 0) -> None:
        self.insns.append([code, dst, src, off, imm])

    def label(self, name: str) -> None:
        self.labels[name] = len(self.insns)

    def mov(self, dst: int, imm: int) -> None:
        self._emit(_ALU64 | _MOV | _K, dst, imm=imm)

    def movr(self, dst: int, src: int) -> None:
        self._emit(_ALU64 | _MOV | _X, dst, src)

    def add(self, dst: int, imm: int) -> None:
        self._emit(_ALU64 | _ADD | _K, dst, imm=imm)

    def addr(self, dst: int, src: int) -> None:
        self._emit(_ALU64 | _ADD | _X, dst, src)

    def sub(self, dst: int, imm: int) -> None:
        self._emit(_ALU64 | _SUB | _K, dst, imm=imm)

    def subr(self, dst: int, src: int) -> None:
        self._emit(_ALU64 | _SUB | _X, dst, src)

    def orr(self, dst: int, src: int) -> None:
        self._emit(_ALU64 | _OR | _X, dst, src)

    def ldxw(self, dst: int, src: int, off: int) -> None:
        self._emit(_LDX | _MEM | _W, dst, src, off)

    def ldxdw(self, dst: int, src: int, off: int) -> None:
        self._emit(_LDX | _MEM | _DW, dst, src, off)

    def stxdw(self, dst: int, off: int, src: int) -> None:
        self._emit(_STX | _MEM | _DW, dst, src, off)

    def stw(self, dst: int, off: int, imm: int) -> None:
        self._emit(_ST | _MEM | _W, dst, off=off, imm=imm)

    def stdw(self, dst: int, off: int, imm: int) -> None:
        self._emit(_ST | _MEM | _DW, dst, off=off, imm=imm)

    def jmp(self, op: int, dst: int, imm: int, target: str) -> None:
        self._emit(_JMP | op | _K, dst, off=target, imm=imm)

    def ja(self, target: str) -> None:
        self._emit(_JMP | JA, off=target)

    def call(self, helper: int) -> None:
        self._emit(_JMP | _CALL, imm=helper)

    def exit(self) -> None:
        self._emit(_JMP | _EXIT)

    def ld_map(self, dst: int, fd: int) -> None:
        self._emit(_LD | _DW | 0x00, dst, _PSEUDO_MAP_FD, imm=fd)
        self._emit(0, imm=0)

    def code(self) -> bytes:
        out = []
        for at, (code, dst, src, off, imm) in enumerate(self.insns):
            if isinstance(off, str):
                off = self.labels[off] - at - 1
            out.append(struct.pack("<BBhi", code, (src << 4) | dst, off, imm))
        return b"".join(out)


def _count(a: Asm, stats_fd: int, index: int, skip: str) -> None:
    """stats[index] += 1 (per-CPU array: no other CPU writes this slot)."""
    a.stw(R10, -68, index)
    a.ld_map(R1, stats_fd)
    a.movr(R2, R10)
    a.add(R2, -68)
    a.call(F_MAP_LOOKUP_ELEM)
    a.jmp(JEQ, R0, 0, skip)
    a.ldxdw(R1, R0, 0)
    a.add(R1, 1)
    a.stxdw(R0, 0, R1)
    a.label(skip)


def _load_bytes(a: Asm, offset: int, stack: int, length: int, relative: bool = False) -> None:
    a.movr(R1, R6)
    a.mov(R2, offset)
    a.movr(R3, R10)
    a.add(R3, stack)
    a.mov(R4, length)
    if relative:
        a.mov(R5, BPF_HDR_START_NET)
        a.call(F_SKB_LOAD_BYTES_RELATIVE)
    else:
        a.call(F_SKB_LOAD_BYTES)


def _select(a: Asm, sockarray_fd: int) -> None:
    """bpf_sk_select_reuseport(ctx, sockarray, &index at fp-4, 0): R0 = 0 if that socket is in the map."""
    a.movr(R1, R6)
    a.ld_map(R2, sockarray_fd)
    a.movr(R3, R10)
    a.add(R3, -4)
    a.mov(R4, 0)
    a.call(F_SK_SELECT_REUSEPORT)


def program(sockarray_fd: int, flag_fd: int, buckets_fd: int, stats_fd: int, sink: bool = False) -> bytes:
    """The SK_REUSEPORT program (see the module doc). Stack: -4 socket index, -8 header word, -12 flag key,
    -32..-17 mac2, -48..-37 bucket key, -64..-49 new bucket, -68 stats key."""
    a = Asm()
    a.movr(R6, R1)  # the context, kept across helper calls
    _load_bytes(a, UDP_HEADER, -8, 4)
    a.jmp(JNE, R0, 0, "data")  # shorter than 4 bytes
    a.ldxw(R7, R10, -8)  # type byte + 3 reserved bytes, little endian: 1..3 only when the reserved are 0
    a.jmp(JEQ, R7, 0, "data")
    a.jmp(JGT, R7, 3, "data")
    a.jmp(JEQ, R7, 3, "handshake")  # cookie replies are never limited
    a.stw(R10, -12, 0)
    a.ld_map(R1, flag_fd)
    a.movr(R2, R10)
    a.add(R2, -12)
    a.call(F_MAP_LOOKUP_ELEM)
    a.jmp(JEQ, R0, 0, "handshake")
    a.ldxw(R1, R0, 0)
    a.jmp(JEQ, R1, 0, "handshake")  # not under load: steer only
    a.ldxw(R2, R6, MD_LEN)
    a.mov(R8, UDP_HEADER + INITIATION_SIZE - MAC_SIZE)
    a.jmp(JEQ, R7, 1, "initiation")
    a.mov(R8, UDP_HEADER + RESPONSE_SIZE - MAC_SIZE)
    a.jmp(JNE, R2, UDP_HEADER + RESPONSE_SIZE, "handshake")  # a bad size: the screener counts it
    a.ja("mac2")
    a.label("initiation")
    a.jmp(JNE, R2, UDP_HEADER + INITIATION_SIZE, "handshake")
    a.label("mac2")
    a.movr(R1, R6)
    a.movr(R2, R8)
    a.movr(R3, R10)
    a.add(R3, -32)
    a.mov(R4, MAC_SIZE)
    a.call(F_SKB_LOAD_BYTES)
    a.jmp(JNE, R0, 0, "handshake")
    a.ldxdw(R1, R10, -32)
    a.ldxdw(R2, R10, -24)
    a.orr(R1, R2)
    a.jmp(JNE, R1, 0, "handshake")  # a mac2: the user-space check and limiter decide
    # the source's bucket key
    a.stdw(R10, -48, 0)
    a.stdw(R10, -40, 0)
    a.ldxw(R1, R6, MD_ETH_PROTOCOL)
    a.jmp(JEQ, R1, _ETH_P_IP, "v4")
    a.jmp(JNE, R1, _ETH_P_IPV6, "handshake")
    a.stw(R10, -48, 6)
    _load_bytes(a, 8, -44, 8, relative=True)  # ipv6hdr.saddr, its /64
    a.jmp(JNE, R0, 0, "handshake")
    a.ja("bucket")
    a.label("v4")
    a.stw(R10, -48, 4)
    _load_bytes(a, 12, -44, 4, relative=True)  # iphdr.saddr
    a.jmp(JNE, R0, 0, "handshake")
    a.label("bucket")
    a.call(F_KTIME_GET_NS)
    a.movr(R9, R0)
    a.ld_map(R1, buckets_fd)
    a.movr(R2, R10)
    a.add(R2, -48)
    a.call(F_MAP_LOOKUP_ELEM)
    a.jmp(JEQ, R0, 0, "new")
    # tokens += elapsed (not below 0: another CPU may have stored a later time), capped; > cost: admit
    a.ldxdw(R1, R0, 0)
    a.ldxdw(R2, R0, 8)
    a.stxdw(R0, 8, R9)
    a.movr(R3, R9)
    a.subr(R3, R2)
    a.jmp(JSGT, R3, 0, "elapsed")
    a.mov(R3, 0)
    a.label("elapsed")
    a.addr(R1, R3)
    a.jmp(JLE, R1, MAX_TOKENS_NS, "capped")
    a.mov(R1, MAX_TOKENS_NS)
    a.label("capped")
    a.jmp(JGT, R1, PACKET_COST_NS, "admit")
    a.stxdw(R0, 0, R1)
    _count(a, stats_fd, STAT_DROPPED, "counted_drop")
    if sink:  # to the sink socket, which drops it at its filter (no "port unreachable" path); else SK_DROP
        a.stw(R10, -4, SINK_INDEX)
        _select(a, sockarray_fd)
        a.jmp(JNE, R0, 0, "drop")  # no sink in the map: never fall back to the hash (the data socket)
        a.mov(R0, SK_PASS)
        a.exit()
    a.label("drop")
    a.mov(R0, SK_DROP)
    a.exit()
    a.label("admit")
    a.sub(R1, PACKET_COST_NS)
    a.stxdw(R0, 0, R1)
    a.ja("admitted")
    a.label("new")  # a new source: a full bucket less this message
    a.stdw(R10, -64, MAX_TOKENS_NS - PACKET_COST_NS)
    a.stxdw(R10, -56, R9)
    a.ld_map(R1, buckets_fd)
    a.movr(R2, R10)
    a.add(R2, -48)
    a.movr(R3, R10)
    a.add(R3, -64)
    a.mov(R4, 0)
    a.call(F_MAP_UPDATE_ELEM)
    a.label("admitted")
    _count(a, stats_fd, STAT_ADMITTED, "counted_admit")
    a.label("handshake")
    a.stw(R10, -4, HANDSHAKE_INDEX)
    _select(a, sockarray_fd)
    a.jmp(JEQ, R0, 0, "pass")  # else the handshake socket is gone: to the data socket, not to a hash pick
    a.label("data")
    a.stw(R10, -4, DATA_INDEX)
    _select(a, sockarray_fd)
    a.label("pass")  # (no selection only if the data socket is gone too: the kernel picks by hash)
    a.mov(R0, SK_PASS)
    a.exit()
    return a.code()


def load_program(code: bytes, log_size: int = 1 << 16) -> int:
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"MIT")
    log = ctypes.create_string_buffer(log_size)
    attr = struct.pack("=IIQQIIQII16s", PROG_SK_REUSEPORT, len(code) // 8, ctypes.addressof(insns),
                       ctypes.addressof(license_), 1, log_size, ctypes.addressof(log), 0, 0, b"turbowg_steer")
    try:
        return bpf(BPF_PROG_LOAD, attr)[0]
    except OSError as exc:
        text = log.value.decode(errors="replace").strip().splitlines()
        raise BpfUnavailable(exc.errno, f"program refused: {exc.strerror}: {' | '.join(text[-4:])}") from None


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


class KernelLimiter:
    """Under-load flag and counters of a loaded program, from its map descriptors (the daemon's, or the
    worker's copies passed with SCM_RIGHTS). Owns the descriptors it is given."""

    def __init__(self, flag_fd: int, stats_fd: int) -> None:
        self.flag_fd = flag_fd
        self.stats_fd = stats_fd
        self.cpus = possible_cpus()
        self.flag = False

    def set_under_load(self, on: bool) -> None:
        """Turn the kernel limit on or off (a system call only on a change)."""
        if on == self.flag:
            return
        map_update(self.flag_fd, bytes(4), int(on).to_bytes(4, "little"))
        self.flag = on

    def read_flag(self) -> bool:
        return map_lookup(self.flag_fd, bytes(4), 4) != bytes(4)

    def stats(self) -> tuple[int, int]:
        """(dropped over the limit, admitted under load), summed over CPUs."""
        return (percpu_sum(self.stats_fd, STAT_DROPPED, self.cpus), percpu_sum(self.stats_fd, STAT_ADMITTED, self.cpus))

    def fds(self) -> list[int]:
        return [self.flag_fd, self.stats_fd]

    def close(self) -> None:
        _close_all([self.flag_fd, self.stats_fd])
        self.flag_fd = self.stats_fd = -1


class KernelSteering:
    """The program and its maps for one socket pair, attached to their reuseport group."""

    def __init__(self, data_sock: socket.socket, handshake_sock: socket.socket,
                 sink_sock: socket.socket | None = None) -> None:
        fds: list[int] = []
        try:
            try:
                sockarray = create_map(MAP_REUSEPORT_SOCKARRAY, 4, 4, 3, b"tw_socks")
            except OSError as exc:
                raise BpfUnavailable(exc.errno, f"no REUSEPORT_SOCKARRAY map: {exc.strerror}") from None
            fds.append(sockarray)
            flag = create_map(MAP_ARRAY, 4, 4, 1, b"tw_load")
            fds.append(flag)
            stats = create_map(MAP_PERCPU_ARRAY, 4, 8, _STATS, b"tw_stats")
            fds.append(stats)
            buckets = create_map(MAP_LRU_HASH, _BUCKET_KEY, _BUCKET_VALUE, MAX_BUCKETS, b"tw_buckets")
            fds.append(buckets)
            members = [(DATA_INDEX, data_sock), (HANDSHAKE_INDEX, handshake_sock)]
            if sink_sock is not None:
                members.append((SINK_INDEX, sink_sock))
            for index, sock in members:
                map_update(sockarray, index.to_bytes(4, "little"), sock.fileno().to_bytes(4, "little"))
            prog = load_program(program(sockarray, flag, buckets, stats, sink=sink_sock is not None))
            fds.append(prog)
            data_sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, prog)
        except BpfUnavailable:
            _close_all(fds)
            raise
        except OSError as exc:
            _close_all(fds)
            raise BpfUnavailable(exc.errno, f"eBPF steering: {exc.strerror}") from None
        self.sockarray_fd, self.buckets_fd, self.prog_fd = sockarray, buckets, prog
        self.limiter = KernelLimiter(flag, stats)

    def worker_fds(self) -> list[int]:
        """What the handshake worker needs (flag, counters): sent with its socket."""
        return self.limiter.fds()

    def bucket(self, key: bytes) -> tuple[int, int] | None:
        """(tokens ns, last ns) of a bucket key (family u32 + 8 address bytes), for tests; None if absent."""
        try:
            return struct.unpack("=QQ", map_lookup(self.buckets_fd, key, _BUCKET_VALUE))
        except OSError:
            return None

    def close(self) -> None:
        """Our descriptors go; the program stays attached to the group (it holds its own references)."""
        self.limiter.close()
        _close_all([self.sockarray_fd, self.buckets_fd, self.prog_fd])
        self.sockarray_fd = self.buckets_fd = self.prog_fd = -1


def classify(payload: bytes) -> tuple[int, bool]:
    """What the program decides for a UDP payload, in Python (tests, documentation): (socket index, whether
    it goes through the per-source bucket while the under-load flag is set)."""
    from turbowg import wire  # the sizes from the wire format itself, not the program's copies

    if len(payload) < 4 or payload[1:4] != b"\0\0\0" or not 1 <= payload[0] <= 3:
        return DATA_INDEX, False
    size = {wire.MESSAGE_INITIATION: wire.INITIATION_SIZE, wire.MESSAGE_RESPONSE: wire.RESPONSE_SIZE}.get(payload[0])
    return HANDSHAKE_INDEX, size == len(payload) and payload[-16:] == bytes(16)


def bucket_key(address: bytes) -> bytes:
    """The kernel bucket key of raw source address bytes (4, or 16 for IPv6: its /64)."""
    if len(address) == 4:
        return (4).to_bytes(4, "little") + address + bytes(4)
    return (6).to_bytes(4, "little") + address[:8]
