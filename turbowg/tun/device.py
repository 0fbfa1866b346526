"""TUN device I/O: the only module in turbowg.tun that touches the kernel.

Public API (stable; the device runtime drives it)::

    dev = open_tun("wg0", vnet_hdr=True, mtu=1420)   # create or attach to a TUN by name (IFF_TUN|IFF_NO_PI)
    dev.name, dev.ifindex, dev.fileno()                # fd is non-blocking: register it with the event loop
    dev.vnet_hdr: bool      # virtio-net headers in use (IFF_VNET_HDR + TUNSETVNETHDRSZ 10)
    dev.offloads: int       # TUN_F_* flags accepted by TUNSETOFFLOAD (0 when none)
    dev.gro_tcp, dev.gro_udp: bool   # write_batch coalesces TCP / UDP flows
    n = dev.read_batch(out)          # ONE read; appends plain IP packets (bytes/bytearray, owned by the
                                     # caller) to `out`, GSO monsters split, partial checksums completed;
                                     # returns how many were appended (0 when nothing was ready)
    dev.write_batch(packets)         # IP packets; coalesced per flow when vnet headers are on
    count, next_off = dev.read_packed(dst, dst_off, layout, idx)   # ONE read into a packed batch (see below);
                                     # count -1 when nothing was ready
    dev.write_packed(buf, layout, count)   # packets given as int32 (offset, length) pairs into buf
    dev.mtu; dev.set_mtu(1420); dev.set_up(); dev.exists() -> bool; dev.close()
    dev.counters: dict[str, int]     # read/write packets, frames, malformed and dropped counts

Offload negotiation with vnet headers: CSUM|TSO4|TSO6|USO4|USO6, else CSUM|TSO4|TSO6, else no flags; if the
kernel refuses vnet headers altogether the device is reopened without them. UDP GRO is only used when USO was
accepted. A GRO write refused with EINVAL turns GRO off for the device (logged once) and the rest of the
batch is written packet by packet.

The packed calls are the runtime's hot path: packets live back to back in one preallocated buffer and are
described by an int32 layout (`array('i')` of offset, length pairs), so a 64 KiB monster becomes ~45 packets
without a Python object each; splitting and coalescing run in C (turbowg/tun/fast.py picks C or Python).

Deletion of the interface: reads/writes then fail with EBADFD (or EIO); the device raises ``TunGone`` from
read_batch/write_batch and ``exists()`` returns False (it asks the kernel via TUNGETIFF, which works whatever
network namespace the caller is in now).

The MTU/flags ioctls go through a control socket opened together with the TUN, so they address the network
namespace the TUN was created in.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
from array import array

from turbowg.linux import (
    IFF_NO_PI,
    IFF_TUN,
    IFF_UP,
    IFF_VNET_HDR,
    SIOCGIFFLAGS,
    SIOCGIFMTU,
    SIOCSIFFLAGS,
    SIOCSIFMTU,
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_USO4,
    TUN_F_USO6,
    TUNGETIFF,
    TUNSETIFF,
    TUNSETOFFLOAD,
    TUNSETVNETHDRSZ,
)
from turbowg.packed import pack

from . import fast, vnet

log = logging.getLogger(__name__)

OFFLOAD_CHOICES = (
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_USO4 | TUN_F_USO6,
    TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6,
    0,
)

READ_BUFFER_SIZE = 65535 + vnet.VNET_HDR_LEN
# Room read_packed needs in the caller's buffers: a 64 KiB TSO monster cut at the smallest MSS Linux allows
# (48 bytes) is ~1400 segments, each with up to 120 bytes of IP+TCP header.
READ_ROOM_PACKETS = 2048
READ_ROOM_BYTES = 65536 + READ_ROOM_PACKETS * 128
# write_packed: frames of one call are built here; a call with more packets or bytes is cut into several.
WRITE_BUFFER_SIZE = 4 << 20
WRITE_MAX_FRAMES = 1 << 17
WRITE_MAX_BYTES = WRITE_BUFFER_SIZE - 10 * WRITE_MAX_FRAMES  # packet bytes; each frame adds a 10-byte header
_GONE_ERRNOS = (errno.EBADFD,)


class TunError(OSError):
    """The TUN could not be opened or configured (message says why)."""


class TunGone(OSError):
    """The interface behind this TUN fd was deleted."""


def _ifreq(name: str, flags: int = 0) -> bytes:
    return struct.pack("16sH22x", name.encode(), flags)


def _check_name(name: str) -> None:
    raw = name.encode()
    if not raw or len(raw) > 15 or b"/" in raw or b"\0" in raw or any(c <= 32 for c in raw):
        raise ValueError(f"invalid interface name {name!r} (1-15 characters, no '/' or whitespace)")


class TunDevice:
    def __init__(self, fd: int, name: str, vnet_hdr: bool, offloads: int) -> None:
        self._fd = fd
        self.name = name
        self.vnet_hdr = vnet_hdr
        self.offloads = offloads
        self.gro_tcp = vnet_hdr and bool(offloads & TUN_F_TSO4)
        self.gro_udp = vnet_hdr and bool(offloads & TUN_F_USO4)
        self._ctl = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.ifindex = socket.if_nametoindex(name)
        self._rbuf = bytearray(READ_BUFFER_SIZE)
        self._rmv = memoryview(self._rbuf)
        self._rlist = [self._rbuf]
        self._gone = False
        self._gro_warned = False
        self._wbuf = bytearray(WRITE_BUFFER_SIZE)
        self._wmv = memoryview(self._wbuf)
        self._frames = array("i", bytes(8 * WRITE_MAX_FRAMES))
        # One read's packets, for read_batch and for cutting up a refused GRO frame (never both at once).
        self._scratch = bytearray(READ_ROOM_BYTES)
        self._scratch_layout = array("i", bytes(8 * READ_ROOM_PACKETS))
        self.counters: dict[str, int] = {
            "read_frames": 0, "read_packets": 0, "read_malformed": 0, "read_dropped_no_room": 0,
            "write_frames": 0, "write_packets": 0, "write_dropped_eagain": 0, "write_errors": 0,
            "gro_disabled": 0,
        }

    # -- plumbing -------------------------------------------------------------------------------------------
    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._ctl.close()

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def exists(self) -> bool:
        if self._gone or self._fd < 0:
            return False
        try:
            fcntl.ioctl(self._fd, TUNGETIFF, _ifreq(""))
        except OSError:
            self._gone = True
            return False
        return True

    @property
    def mtu(self) -> int:
        res = fcntl.ioctl(self._ctl, SIOCGIFMTU, _ifreq(self.name))
        return struct.unpack_from("i", res, 16)[0]

    def set_mtu(self, mtu: int) -> None:
        if not 68 <= mtu <= 65535:
            raise ValueError(f"MTU {mtu} out of range 68..65535")
        fcntl.ioctl(self._ctl, SIOCSIFMTU, struct.pack("16si20x", self.name.encode(), mtu))

    def set_up(self) -> None:
        res = fcntl.ioctl(self._ctl, SIOCGIFFLAGS, _ifreq(self.name))
        flags = struct.unpack_from("H", res, 16)[0]
        fcntl.ioctl(self._ctl, SIOCSIFFLAGS, _ifreq(self.name, flags | IFF_UP))

    def _gone_error(self, exc: OSError) -> TunGone:
        self._gone = True
        return TunGone(exc.errno, f"TUN {self.name} is gone: {exc.strerror}")

    # -- data path ------------------------------------------------------------------------------------------
    def read_batch(self, out: list) -> int:
        """One read (see read_packed); appends the packets to `out` as bytearrays owned by the caller."""
        count, _ = self.read_packed(self._scratch, 0, self._scratch_layout, 0)
        if count <= 0:
            return 0
        layout = self._scratch_layout
        stage = self._scratch
        for k in range(count):
            off = layout[2 * k]
            out.append(stage[off:off + layout[2 * k + 1]])
        return count

    def read_packed(self, dst: bytearray, dst_off: int, layout: array, idx: int) -> tuple[int, int]:
        """One read; its packets (split, checksums completed) go to dst[dst_off:] and layout[2*idx:].
        Returns (count, next offset); count is -1 when nothing was ready, 0 for a dropped malformed frame.
        The caller leaves READ_ROOM_BYTES and READ_ROOM_PACKETS layout entries of room."""
        try:
            n = os.readv(self._fd, self._rlist)
        except BlockingIOError:
            return -1, dst_off
        except OSError as exc:
            if exc.errno in _GONE_ERRNOS or (exc.errno == errno.EIO and not self.exists()):
                raise self._gone_error(exc) from None
            raise
        counters = self.counters
        counters["read_frames"] += 1
        if not self.vnet_hdr:
            dst[dst_off:dst_off + n] = self._rmv[:n]
            layout[2 * idx] = dst_off
            layout[2 * idx + 1] = n
            counters["read_packets"] += 1
            return 1, dst_off + n
        try:
            count, next_off = fast.ingest(self._rbuf, n, dst, dst_off, layout, idx)
        except ValueError:
            counters["read_malformed"] += 1
            return 0, dst_off
        except BufferError:  # more segments than the room promised: drop the frame, count it, go on
            counters["read_dropped_no_room"] += 1
            return 0, dst_off
        counters["read_packets"] += count
        return count, next_off

    def write_packed(self, buf: bytearray, layout: array, count: int) -> None:
        """Write packets buf[layout[2k]:+layout[2k+1]], k < count: coalesced into GSO frames per flow where
        the device accepts them (GRO), else one frame per packet."""
        if count <= 0:
            return
        fd = self._fd
        if count == 1 and self.vnet_hdr:
            # One packet (the interactive case): a zero virtio header and the packet in one writev, no
            # copy into the write buffer (it is what coalesce would build: one GSO_NONE frame).
            off = layout[0]
            self._write(os.writev, fd, [vnet.ZERO_HDR, memoryview(buf)[off:off + layout[1]]], 1)
            return
        if not self.vnet_hdr:
            mv = memoryview(buf)
            for k in range(count):
                off = layout[2 * k]
                self._write(os.write, fd, mv[off:off + layout[2 * k + 1]], 1)
            return
        frames = self._frames
        # Packets lie within buf, so a buf that fits the write buffer needs no counting (the runtime's does).
        stop = self._fits(layout, count) if count > WRITE_MAX_FRAMES or len(buf) > WRITE_MAX_BYTES else count
        if stop < count:  # more than one write buffer: in order, a slice at a time
            view = memoryview(layout)
            self.write_packed(buf, layout, stop)
            self.write_packed(buf, view[2 * stop:], count - stop)
            return
        nframes = fast.coalesce(buf, layout, count, self._wbuf, frames, self.gro_tcp, self.gro_udp)
        wmv = self._wmv
        write = os.write
        unpack = vnet.unpack_from
        for j in range(nframes):
            off = frames[2 * j]
            size = frames[2 * j + 1]
            frame = wmv[off:off + size]
            if frame[1] == vnet.GSO_NONE:
                self._write(write, fd, frame, 1)
                continue
            _flags, _kind, hdr_len, gso_size, _start, _offset = unpack(frame, 0)
            segments = -(-(size - vnet.VNET_HDR_LEN - hdr_len) // gso_size)
            try:
                self._write(write, fd, frame, segments)
            except TunGone:
                raise
            except OSError:  # EINVAL: this kernel refuses coalesced writes
                self._refuse_gro()
                self._write_split(frame)

    @staticmethod
    def _fits(layout, count: int) -> int:
        """How many of the first `count` packets one coalesce into the write buffer takes."""
        if count > WRITE_MAX_FRAMES:
            count = WRITE_MAX_FRAMES
        total = 0
        for k in range(count):
            total += layout[2 * k + 1]
            if total > WRITE_MAX_BYTES:
                return max(k, 1)
        return count

    def _refuse_gro(self) -> None:
        if self.gro_tcp or self.gro_udp:
            self.gro_tcp = self.gro_udp = False
            self.counters["gro_disabled"] += 1
            if not self._gro_warned:
                self._gro_warned = True
                log.warning("TUN %s refused a coalesced write (EINVAL); GRO turned off", self.name)

    def _write_split(self, frame: memoryview) -> None:
        """Cut a refused coalesced frame back into its packets and write them one by one."""
        try:
            count, _ = fast.ingest(frame, len(frame), self._scratch, 0, self._scratch_layout, 0)
        except (ValueError, BufferError):
            self.counters["write_errors"] += 1
            return
        mv = memoryview(self._scratch)
        layout = self._scratch_layout
        zero = vnet.ZERO_HDR
        for k in range(count):
            off = layout[2 * k]
            self._write(os.writev, self._fd, [zero, mv[off:off + layout[2 * k + 1]]], 1)

    def write_batch(self, packets: list) -> None:
        """Write IP packets (bytes-like), coalesced as write_packed does."""
        buf, layout = pack(packets)
        self.write_packed(buf, layout, len(packets))

    def _write(self, write, fd: int, data, npackets: int) -> None:
        """One write; EAGAIN drops and counts. Raises OSError only for EINVAL (caller decides)."""
        counters = self.counters
        try:
            write(fd, data)
        except BlockingIOError:
            counters["write_dropped_eagain"] += npackets
            return
        except OSError as exc:
            if exc.errno in _GONE_ERRNOS or (exc.errno == errno.EIO and not self.exists()):
                raise self._gone_error(exc) from None
            if exc.errno == errno.EINVAL and npackets > 1:
                raise
            counters["write_errors"] += npackets
            return
        counters["write_frames"] += 1
        counters["write_packets"] += npackets


def open_tun(name: str, *, vnet_hdr: bool = True, mtu: int | None = None) -> TunDevice:
    """Create the TUN `name` (or attach to an existing one) in the caller's network namespace."""
    _check_name(name)
    try:
        fd, actual, use_vnet, offloads = _open(name, vnet_hdr)
    except PermissionError as exc:
        raise TunError(exc.errno, f"cannot open TUN {name!r}: {exc.strerror} (needs CAP_NET_ADMIN)") from None
    except FileNotFoundError as exc:
        raise TunError(exc.errno, "cannot open /dev/net/tun: TUN support missing") from None
    except OSError as exc:
        hint = " (already attached to another fd/process)" if exc.errno == errno.EBUSY else ""
        raise TunError(exc.errno, f"cannot open TUN {name!r}: {exc.strerror}{hint}") from None
    dev = TunDevice(fd, actual, use_vnet, offloads)
    if mtu is not None:
        dev.set_mtu(mtu)
    return dev


def _open(name: str, vnet_hdr: bool) -> tuple[int, str, bool, int]:
    flags = IFF_TUN | IFF_NO_PI
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if vnet_hdr:
            try:
                res = fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, flags | IFF_VNET_HDR))
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", vnet.VNET_HDR_LEN))
            except OSError as exc:
                if exc.errno in (errno.EPERM, errno.EACCES, errno.EBUSY):
                    raise
                log.info("TUN %s: vnet headers refused (%s); reopening without", name, exc.strerror)
                os.close(fd)
                fd = -1
                return _open(name, False)
            for offloads in OFFLOAD_CHOICES:
                try:
                    fcntl.ioctl(fd, TUNSETOFFLOAD, offloads)
                    break
                except OSError:
                    continue
            actual = res[:16].rstrip(b"\0").decode()
            return fd, actual, True, offloads
        res = fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, flags))
        return fd, res[:16].rstrip(b"\0").decode(), False, 0
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise
