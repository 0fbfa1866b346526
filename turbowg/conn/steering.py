"""Handshake messages steered away from the data socket in the kernel: a SO_REUSEPORT pair + a BPF program.

The program is the eBPF one of turbowg/conn/ebpf.py where the kernel takes it (the same steering, plus the
per-source limit of zero-mac2 handshakes under load, dropped in the kernel through a third member of the
group, the sink socket of `make_sink`, which joins after the classic program is attached and is checked
against /proc/net/udp like the others); else the classic program below (PROGRAM), which this text
describes, with the reason logged once (TURBOWG_HANDSHAKE_EBPF=0 forces it).

The device's UDP port is held by two sockets in one SO_REUSEPORT group:

* socket 0, the data socket (turbowg/conn/udp.py `UDPBind`), read by the main process;
* socket 1, the handshake socket (`HandshakeSocket`), read by the handshake worker process
  (turbowg/daemon/handshake_worker.py), which also sends its cookie replies from it (same port).

A classic BPF program attached to the group (SO_ATTACH_REUSEPORT_CBPF) picks the socket per datagram. For
UDP the kernel pulls the UDP header before running it, so offset 0 is the first byte of the UDP payload
(tests/test_reuseport_steering.py checks this on the running kernel). The program loads the first 32-bit
word (network order) and returns 1 for the three handshake message headers (01 00 00 00 initiation,
02 00 00 00 response, 03 00 00 00 cookie reply: type byte + the 3 reserved zero bytes) and 0 for
everything else: transport data, disco, STUN, junk and datagrams shorter than 4 bytes (a failed load
returns 0) stay on the data socket, where the main process reads them as before. So the worker only
ever reads what it can serve, and nothing it would have to pass back.

When the program returns an index the group does not hold (the handshake socket closed), the kernel falls
back to its 4-tuple hash over the sockets left (reuseport_select_sock: run_bpf_filter returns NULL for
index >= socks, then select_by_hash): with the data socket alone, everything goes to it (tested). The
daemon does not rely on that when its worker dies (see "Who may join" below): it keeps the handshake
socket and reads it in the event loop until the worker is back. The GRO path looks the socket up without the skb (by hash
only), so both sockets get UDP_GRO: a flow hashed to either is coalesced, and each reader splits by the
segment size.

Who may join: the data socket is bound WITHOUT SO_REUSEPORT (so its bind refuses a taken port exactly as
before, errno 98, and port 0 gets a free port), and only then gets SO_REUSEPORT; the handshake socket binds
with SO_REUSEPORT and joins (the kernel creates the group around the data socket, which stays index 0).
Right after, we count the sockets bound to the port in /proc/net/udp{,6} against our two inodes: a
foreign one (a process of the same uid that bound that very port with SO_REUSEPORT in between) makes us
close the handshake socket, take SO_REUSEPORT off the data socket and fail with EADDRINUSE.
Both sockets must keep SO_REUSEPORT: the lookup asks the best-scoring socket of the port (the score
includes "last packet came in on this CPU", so it may be either) and uses the group only if that socket has
the flag; and clearing it on the handshake socket does not stop joins (measured on 6.18: the bind conflict
check stops at the first socket of the hash chain, the data socket). Remaining race, documented: a root
process binding the port with SO_REUSEPORT after our check joins the group. It gets nothing while our two
sockets live (the program returns 0 or 1, never its index); the GRO lookup (by hash, without the skb) may
pick it and only decides whether to coalesce. If the handshake socket closed, the kernel would move the
last member into its slot, so the handshake socket is never closed while the data socket lives: when the
worker is gone, the main process reads the handshake socket itself (turbowg/daemon/handshake_offload.py).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import socket
import struct

from turbowg.conn.ebpf import BpfUnavailable, KernelSteering
from turbowg.linux import SO_MARK, SO_RCVBUFFORCE, SO_SNDBUFFORCE, SOL_UDP, UDP_GRO

log = logging.getLogger("turbowg.steering")
# TURBOWG_HANDSHAKE_EBPF=0: the classic program only (no kernel limiter), for A/B runs and old kernels.
EBPF = os.environ.get("TURBOWG_HANDSHAKE_EBPF", "1").strip().lower() not in ("0", "off", "no", "false")
_fallback_logged = False

SO_ATTACH_REUSEPORT_CBPF = 51
SO_REUSEPORT = getattr(socket, "SO_REUSEPORT", 15)
SO_MEMINFO = 55  # u32[SK_MEMINFO_VARS]: rmem_alloc, rcvbuf, ..., drops (index 8)
SK_MEMINFO_VARS = 9
SK_MEMINFO_RMEM_ALLOC = 0
SK_MEMINFO_RCVBUF = 1
SK_MEMINFO_DROPS = 8

# The handshake socket holds about this many handshake messages before the kernel drops (wireguard-go's
# handshake queue: 4096). A queued datagram costs its skb's truesize, not its length: 832 bytes for a
# 148-byte initiation over loopback or veth (measured with SO_MEMINFO), more from a NIC's page fragments;
# 1280 is the estimate. SO_RCVBUF(FORCE) is doubled by the kernel: 4096 * 1280 bytes of room (~6300
# initiations at 832).
QUEUE_MESSAGES = 4096
SKB_TRUESIZE_ESTIMATE = 1280
HANDSHAKE_RCVBUF = QUEUE_MESSAGES * SKB_TRUESIZE_ESTIMATE // 2
HANDSHAKE_SNDBUF = 1 << 20

# BPF opcodes (linux/filter.h)
_BPF_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_BPF_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_BPF_RET_K = 0x06  # BPF_RET | BPF_K
DATA_INDEX = 0
HANDSHAKE_INDEX = 1
HANDSHAKE_HEADERS = (0x01000000, 0x02000000, 0x03000000)  # first word, network order

PROGRAM: list[tuple[int, int, int, int]] = [
    (_BPF_LD_W_ABS, 0, 0, 0),  # A = payload[0:4] (big endian); out of bounds: return 0
    (_BPF_JEQ_K, 3, 0, HANDSHAKE_HEADERS[0]),  # -> ret HANDSHAKE_INDEX
    (_BPF_JEQ_K, 2, 0, HANDSHAKE_HEADERS[1]),
    (_BPF_JEQ_K, 1, 0, HANDSHAKE_HEADERS[2]),
    (_BPF_RET_K, 0, 0, DATA_INDEX),
    (_BPF_RET_K, 0, 0, HANDSHAKE_INDEX),
]


def steer(payload: bytes) -> int:
    """What PROGRAM returns for a UDP payload (the same decision in Python, for tests and documentation)."""
    if len(payload) < 4:
        return DATA_INDEX
    return HANDSHAKE_INDEX if int.from_bytes(payload[:4], "big") in HANDSHAKE_HEADERS else DATA_INDEX


def attach_program(sock: socket.socket, program: list[tuple[int, int, int, int]] = PROGRAM) -> None:
    """SO_ATTACH_REUSEPORT_CBPF: attach `program` to the reuseport group `sock` belongs to."""
    code = b"".join(struct.pack("=HBBI", *insn) for insn in program)
    buf = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("@HP", len(program), ctypes.addressof(buf))  # struct sock_fprog, native layout
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


_DROP_ALL = [(_BPF_RET_K, 0, 0, 0)]  # a socket filter that keeps nothing
SO_ATTACH_FILTER = 26


def make_sink(data_sock: socket.socket, gro: bool) -> socket.socket:
    """The third member of the group for the eBPF program: over-limit datagrams are steered to it and dropped
    by its filter before they are queued. (SK_DROP would make UDP take its "no socket" path, an ICMP port
    unreachable attempt per datagram: measured ~1 us more softirq per flood datagram on this machine.) It
    joins last, so the classic program's indexes 0 and 1 never move, and it has UDP_GRO as the others
    (the GRO lookup picks a member by hash, without the datagram, and coalesces only if it has the flag)."""
    sink = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sink.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sink.setblocking(False)
        code = b"".join(struct.pack("=HBBI", *insn) for insn in _DROP_ALL)
        buf = ctypes.create_string_buffer(code, len(code))
        sink.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, struct.pack("@HP", len(_DROP_ALL), ctypes.addressof(buf)))
        sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        if gro:
            _try(sink, SOL_UDP, UDP_GRO, 1)
        sink.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, 1)
        sink.bind(("::", data_sock.getsockname()[1]))
    except BaseException:
        sink.close()
        raise
    return sink


def attach_steering(data_sock: socket.socket, handshake_sock: socket.socket, *, ebpf: bool = True,
                    gro: bool = True) -> tuple[KernelSteering | None, socket.socket | None]:
    """The classic PROGRAM, then, if this kernel takes it, the eBPF program with the kernel limiter
    (turbowg/conn/ebpf.py) and its sink socket in its place (the reason it does not logged once per process).
    Returns (the eBPF objects, the sink), or (None, None). OSError(EADDRINUSE) if a foreign socket joined."""
    global _fallback_logged
    attach_program(data_sock)  # from now on, 0 or 1: the sink joining next gets nothing from it
    if not ebpf:
        return None, None
    port = data_sock.getsockname()[1]
    try:
        sink = make_sink(data_sock, gro)
    except OSError as exc:
        if not _fallback_logged:
            log.warning("handshake steering: classic BPF, no kernel limiter (no sink socket: %s)", exc)
            _fallback_logged = True
        return None, None
    try:
        if sorted(bound_inodes(port)) != sorted([inode(data_sock), inode(handshake_sock), inode(sink)]):
            raise _foreign_error(port)
        return KernelSteering(data_sock, handshake_sock, sink), sink
    except BpfUnavailable as exc:
        sink.close()  # the last member: leaving moves no other socket's index
        if not _fallback_logged:
            log.warning("handshake steering: classic BPF, no kernel limiter (%s)", exc)
            _fallback_logged = True
        return None, None
    except BaseException:
        sink.close()
        raise


def inode(sock: socket.socket | int) -> int:
    return os.fstat(sock if isinstance(sock, int) else sock.fileno()).st_ino


def bound_inodes(port: int) -> list[int]:
    """Inodes of all UDP sockets in this network namespace bound to local `port` (any address)."""
    found: list[int] = []
    for path in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(path) as f:
                next(f, None)
                for line in f:
                    fields = line.split()
                    if len(fields) < 10:
                        continue
                    local = fields[1]
                    if int(local.rsplit(":", 1)[1], 16) == port:
                        found.append(int(fields[9]))
        except FileNotFoundError:
            continue
    return found


def meminfo(sock: socket.socket) -> tuple[int, ...]:
    data = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 4 * SK_MEMINFO_VARS)
    return struct.unpack(f"={len(data) // 4}I", data[:len(data) - len(data) % 4])


def _foreign_error(port: int) -> OSError:
    return OSError(errno.EADDRINUSE, f"cannot bind UDP port {port}: another socket shares it (SO_REUSEPORT)")


def make_shareable(data_sock: socket.socket) -> None:
    """Let the bound data socket be joined (SO_REUSEPORT after its bind; see the module doc)."""
    data_sock.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, 1)


def make_unshareable(data_sock: socket.socket) -> None:
    """Nobody may join the data socket's port (its group, if any, is no longer used for lookups)."""
    data_sock.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, 0)


class HandshakeSocket:
    """Socket 1 of the pair: joins the data socket's port, steered handshake messages arrive here.

    `data_sock` is the bound data socket (dual-stack AF_INET6 on [::]:port, as UDPBind makes it). Raises
    OSError(EADDRINUSE) if a foreign socket shares the port, leaving the data socket unshareable again."""

    def __init__(self, data_sock: socket.socket, *, fwmark: int = 0, gro: bool = True,
                 rcvbuf: int = HANDSHAKE_RCVBUF) -> None:
        port = data_sock.getsockname()[1]
        self.port = port
        self.kernel: KernelSteering | None = None  # the eBPF program's maps (None: the classic program)
        self.sink: socket.socket | None = None  # where the eBPF program sends what it drops (make_sink)
        data_inode = inode(data_sock)
        others = [i for i in bound_inodes(port) if i != data_inode]
        if others:  # someone is on the port already (we are not sharing it yet: it joined a while ago)
            make_unshareable(data_sock)
            raise _foreign_error(port)
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setblocking(False)
            for force, plain, size in ((SO_RCVBUFFORCE, socket.SO_RCVBUF, rcvbuf),
                                       (SO_SNDBUFFORCE, socket.SO_SNDBUF, HANDSHAKE_SNDBUF)):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, force, size)
                except OSError:
                    sock.setsockopt(socket.SOL_SOCKET, plain, size)
            if fwmark:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, fwmark)
            sock.setsockopt(socket.SOL_SOCKET, SO_REUSEPORT, 1)
            make_shareable(data_sock)
            sock.bind(("::", port))
            present = bound_inodes(port)
            if sorted(present) != sorted([data_inode, inode(sock)]):
                raise _foreign_error(port)
            self.gro = gro and _try(sock, SOL_UDP, UDP_GRO, 1)
            self.kernel, self.sink = attach_steering(data_sock, sock, ebpf=EBPF, gro=gro)
        except BaseException:
            self._drop_kernel_steering()
            sock.close()
            make_unshareable(data_sock)
            raise
        self.sock = sock
        self.data_sock = data_sock
        self.fwmark = fwmark

    def _drop_kernel_steering(self) -> None:
        """Our descriptors of the eBPF program's maps, and the sink socket."""
        if self.kernel is not None:
            self.kernel.close()
            self.kernel = None
        if self.sink is not None:
            self.sink.close()
            self.sink = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def set_fwmark(self, mark: int) -> None:
        self.sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        self.fwmark = mark

    def kernel_counters(self) -> dict[str, int]:
        """The eBPF program's counters (none with the classic program): initiations/responses it dropped over
        the per-source limit, and those it let through under load."""
        if self.kernel is None:
            return {}
        try:
            dropped, admitted = self.kernel.limiter.stats()
        except OSError:
            return {}
        return {"rx_handshake_kernel_ratelimited": dropped, "rx_handshake_kernel_admitted": admitted}

    def close(self) -> None:
        """Leave the group (with the data socket closing too, or about to: see the module doc)."""
        self._drop_kernel_steering()
        if self.sock.fileno() >= 0:
            self.sock.close()
        if self.data_sock.fileno() >= 0:
            make_unshareable(self.data_sock)


def _try(sock: socket.socket, level: int, opt: int, value: int) -> bool:
    try:
        sock.setsockopt(level, opt, value)
    except OSError:
        return False
    return True
