"""Latency tracing of one crossing of the daemon (TURBOWG_TRACE_LATENCY=1; off by default).

Where does the time go between "the TUN became readable" and "the datagram was sent", and between "the UDP
socket became readable" and "the packet was written to the TUN"? With the switch on, the runtime registers
wrapped reader callbacks and wraps the I/O and device calls they make (instance attributes shadowing the
methods), so the data path itself is the same code with timestamps around it. With the switch off nothing is
wrapped: the runtime binds its plain callbacks at start-up and pays nothing per packet.

Per wake that carried exactly one packet (the interactive case), the stages recorded are (microseconds):

    TUN -> UDP:  tun.read1     callback entry -> the first read returned (the packet)
                 tun.read_more first read -> last read returned (the read that only says EAGAIN)
                 tun.device    -> handle_tun_packed returned (route, seal)
                 tun.send      -> the last UDP send returned (includes the timer re-arm in between)
                 tun.exit      -> the callback returned
                 tun.total     callback entry -> exit
                 tun.lone      instead of device + send, when Device.send_lone took the packet: route,
                               seal and sendto in one call (tun.exit then counts from its return)
    UDP -> TUN:  udp.kernel    the datagram's kernel receive timestamp (SIOCGSTAMPNS) -> callback entry:
                               the wakeup latency of the loop (scheduler, epoll, uvloop dispatch)
                 udp.read      callback entry -> recv_packed returned (the datagram and the EAGAIN read)
                 udp.device    -> handle_udp_packed returned (open, replay check, allowed IPs)
                 udp.write     -> the TUN write returned
                 udp.exit      -> the callback returned (includes an answer the runtime took from the TUN in
                               the same wake, which is then also traced as a TUN wake of its own)
                 udp.total     callback entry -> the TUN write returned
                 udp.lone      instead of device + write, when Device.receive_lone took the datagram:
                               open, checks and TUN write in one call

Also per wake, whatever the packet count: packets per wake (tun.packets, udp.packets: how much the daemon
stages) and the UDP socket's next-datagram size at wake (udp.inq_bytes, SIOCINQ).

The summary (count, p50, p90, p99, max per stage) goes to stderr (the daemon log) on SIGUSR1 and at exit,
and as JSON to TURBOWG_TRACE_LATENCY_FILE when that is set.
"""

from __future__ import annotations

import fcntl
import json
import os
import struct
import sys
import termios
import time
from array import array
from collections.abc import Callable
from typing import Any

SIOCGSTAMPNS = 0x8907
MAX_SAMPLES = 1 << 18  # per stage; later samples are dropped (the first quarter million are plenty)

TUN_STAGES = ("tun.read1", "tun.read_more", "tun.device", "tun.send", "tun.lone", "tun.exit", "tun.total")
UDP_STAGES = ("udp.kernel", "udp.read", "udp.device", "udp.write", "udp.lone", "udp.exit", "udp.total")
COUNTS = ("tun.packets", "udp.packets", "udp.inq_bytes")


def enabled_from_env() -> bool:
    return os.environ.get("TURBOWG_TRACE_LATENCY", "").strip().lower() not in ("", "0", "off", "no", "false")


def _quantile(ordered: list[int], q: float) -> int:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class LatencyTrace:
    """Timestamps of the stages of single-packet wakes; see the module docstring."""

    def __init__(self) -> None:
        self.samples: dict[str, array] = {name: array("q") for name in (*TUN_STAGES, *UDP_STAGES, *COUNTS)}
        self._marks: list[int] = []  # perf_counter_ns at the end of each wrapped call in this wake
        self._kinds: list[str] = []
        self._packets = 0

    # ---- wrapping -------------------------------------------------------------------------------------
    def _wrap(self, func: Callable, kind: str, count_result: bool = False) -> Callable:
        marks = self._marks
        kinds = self._kinds
        clock = time.perf_counter_ns

        def traced(*args: Any, **kwargs: Any) -> Any:
            result = func(*args, **kwargs)
            marks.append(clock())
            kinds.append(kind)
            if count_result and result[0] > 0:
                self._packets += result[0]
            return result

        traced.__wrapped__ = func  # type: ignore[attr-defined]
        return traced

    def attach_tun(self, tun: Any, device: Any) -> None:
        tun.read_packed = self._wrap(tun.read_packed, "tun.read", count_result=True)
        tun.write_packed = self._wrap(tun.write_packed, "udp.write")
        if "handle_tun_packed" not in vars(device):
            device.handle_tun_packed = self._wrap(device.handle_tun_packed, "tun.device")
            device.handle_udp_packed = self._wrap(device.handle_udp_packed, "udp.device")
            device.send_lone = self._wrap(device.send_lone, "tun.lone")
            device.receive_lone = self._wrap(device.receive_lone, "udp.lone")

    def attach_udp(self, udp: Any) -> None:
        udp.recv_packed = self._wrap(udp.recv_packed, "udp.read")
        udp.send_packed = self._wrap(udp.send_packed, "tun.send")

    def tun_reader(self, callback: Callable[[], None]) -> Callable[[], None]:
        marks = self._marks
        kinds = self._kinds
        samples = self.samples
        clock = time.perf_counter_ns

        def on_tun_readable() -> None:
            base = len(marks)  # a TUN wake may run inside a UDP one (the runtime's reply poll)
            self._packets = 0
            start = clock()
            callback()
            end = clock()
            mine = list(zip(marks[base:], kinds[base:], strict=True))
            if not base:
                marks.clear()
                kinds.clear()
            packets = self._packets
            _add(samples["tun.packets"], packets)
            if packets != 1:
                return
            reads = [m for m, k in mine if k == "tun.read"]
            device = [m for m, k in mine if k == "tun.device"]
            sends = [m for m, k in mine if k == "tun.send"]
            lone = [m for m, k in mine if k == "tun.lone"]
            if reads and lone and not device:  # send_lone took it (a None answer is followed by device)
                _add(samples["tun.read1"], reads[0] - start)
                _add(samples["tun.lone"], lone[0] - reads[-1])
                _add(samples["tun.exit"], end - lone[0])
                _add(samples["tun.total"], end - start)
                return
            if not reads or not device or not sends:
                return
            _add(samples["tun.read1"], reads[0] - start)
            _add(samples["tun.read_more"], reads[-1] - reads[0])
            _add(samples["tun.device"], device[0] - reads[-1])
            _add(samples["tun.send"], sends[-1] - device[0])
            _add(samples["tun.exit"], end - sends[-1])
            _add(samples["tun.total"], end - start)

        return on_tun_readable

    def udp_reader(self, callback: Callable[[], None], runtime: Any) -> Callable[[], None]:
        recv_one = getattr(runtime, "_recv_one", None)
        if recv_one is not None and not hasattr(recv_one, "__wrapped__"):  # once, though every rebind comes here
            runtime._recv_one = self._wrap(recv_one, "udp.read")  # the lone read (C recv_one)
        marks = self._marks
        kinds = self._kinds
        samples = self.samples
        clock = time.perf_counter_ns
        stamp = bytearray(16)
        inq = bytearray(4)

        def on_udp_readable() -> None:
            marks.clear()
            kinds.clear()
            start = clock()
            wall = time.time_ns()
            udp = runtime.udp
            fd = udp.fileno() if udp is not None else -1
            callback()
            end = clock()
            if fd < 0:
                return
            # The measuring itself comes after the callback (SIOCINQ: after the reads, so mostly 0 when the
            # daemon keeps up; sampled at wake it would add a system call before the packet's own work).
            senders = len(runtime._senders)
            try:
                fcntl.ioctl(fd, termios.FIONREAD, inq)
                _add(samples["udp.inq_bytes"], struct.unpack("i", inq)[0])
            except OSError:
                pass
            chunks = runtime._chunks
            packets = sum(max(1, -(-(chunks[i + 1] - chunks[i]) // max(1, chunks[i + 2])))
                          for i in range(0, len(chunks), 3))
            _add(samples["udp.packets"], packets)
            if packets != 1 or senders != 1:
                return
            mine = list(zip(marks, kinds, strict=True))
            marks.clear()
            kinds.clear()
            reads = [m for m, k in mine if k == "udp.read"]
            device = [m for m, k in mine if k == "udp.device"]
            writes = [m for m, k in mine if k == "udp.write"]
            lone = [m for m, k in mine if k == "udp.lone"]
            if lone and not device:  # receive_lone took it: the TUN write happened inside
                device, writes = lone, lone
            if not reads or not device or not writes:
                return
            try:
                fcntl.ioctl(fd, SIOCGSTAMPNS, stamp)
            except OSError:
                pass
            else:
                sec, nsec = struct.unpack("qq", stamp)
                arrived = sec * 1_000_000_000 + nsec
                if 0 < arrived <= wall:
                    _add(samples["udp.kernel"], wall - arrived)
            _add(samples["udp.read"], reads[0] - start)
            if device is writes:
                _add(samples["udp.lone"], device[0] - reads[0])
            else:
                _add(samples["udp.device"], device[0] - reads[0])
                _add(samples["udp.write"], writes[-1] - device[0])
            _add(samples["udp.exit"], end - writes[-1])
            _add(samples["udp.total"], writes[-1] - start)

        return on_udp_readable

    # ---- report -----------------------------------------------------------------------------------------
    def summary(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for name, values in self.samples.items():
            if not values:
                continue
            ordered = sorted(values)
            scale = 1.0 if name in COUNTS else 1e-3  # ns -> us
            out[name] = {"count": len(ordered), "p50": _quantile(ordered, 0.5) * scale,
                         "p90": _quantile(ordered, 0.9) * scale, "p99": _quantile(ordered, 0.99) * scale,
                         "max": ordered[-1] * scale}
        return out

    def format(self) -> str:
        lines = ["latency trace (single-packet wakes; us; packets/bytes for the counts):",
                 f"  {'stage':<14} {'count':>8} {'p50':>9} {'p90':>9} {'p99':>9} {'max':>10}"]
        for name, row in self.summary().items():
            lines.append(f"  {name:<14} {row['count']:>8} {row['p50']:>9.1f} {row['p90']:>9.1f} "
                         f"{row['p99']:>9.1f} {row['max']:>10.1f}")
        return "\n".join(lines)

    def report(self) -> None:
        sys.stderr.write(self.format() + "\n")
        sys.stderr.flush()
        path = os.environ.get("TURBOWG_TRACE_LATENCY_FILE", "").strip()
        if path:
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(self.summary(), f, indent=1)
            os.replace(tmp, path)


def _add(values: array, value: int) -> None:
    if len(values) < MAX_SAMPLES:
        values.append(value)


def enable_kernel_timestamps(sock_fd: int) -> None:
    """Make the kernel keep receive timestamps for SIOCGSTAMPNS (the first such ioctl turns them on)."""
    try:
        fcntl.ioctl(sock_fd, SIOCGSTAMPNS, bytearray(16))
    except OSError:
        pass


