"""The relay sweep's bulk load generator: one process holding sender->receiver DERP client pairs.

`python -m turbowg.bench.relay_loadgen --loadgen CONFIG` connects its pairs (a blocking DERP handshake per
client, then non-blocking sockets in one epoll loop; or, with "direct", senders straight into receivers
over loopback: the generator's own ceiling), says {"ready": true}, then runs one step per
{"op": "step", "rate_per_pair": R, "duration": S} line on stdin and answers each with one JSON line of
counts. Bulk work only, so it can offer more than the relay carries: per sender a token bucket (Pacer)
against the monotonic clock decides each ~1 ms tick how many pre-built frames are due and writes them in
sends of up to 64 KB; receivers recv_into one buffer and count fixed-size frames by their tagged header
(FrameCounter), never parsing a frame. relay_sweep.py drives it and turns the counts into loss and knees.
Loss accounting per step: sent + refused (the socket was full) + shortfall (more than MAX_LAG late) =
scheduled, exactly; delivered = this step's frames counted by the receivers until all that was sent came
or the streams were quiet for DRAIN_QUIET.
"""

from __future__ import annotations

import json
import os
import resource
import select
import socket
import ssl
import struct
import sys
import time
from typing import Any

TICK = 0.001  # pacing step (seconds)
MAX_LAG = 0.05  # frames due longer than this are the generator's shortfall, not sent in a burst
DRAIN_QUIET = 0.5
DRAIN_MAX = 3.0
CHUNK_BYTES = 1 << 16  # most bytes one send() carries; TLS records and partial writes stay small
RECV_BYTES = 1 << 20
UNPACED_CHUNKS = 16  # chunks per sender per tick when unpaced: up to 1 MB per ms per sender
KEY_SIZE = 32
_HEADER = struct.Struct(">BI")
SEND_PACKET, RECV_PACKET = 0x04, 0x05


class Pacer:
    """Token bucket against the monotonic clock: floor(rate x elapsed) frames are due by `now`.

    `take(now)` returns how many frames to offer now and marks them offered. Frames more than `max_lag`
    seconds overdue are not offered in a burst: they are counted in `shortfall` (the generator was late).
    Nothing is due after `duration`, so a whole step schedules exactly floor(rate x duration) frames.
    """

    __slots__ = ("rate", "start", "duration", "cap", "offered", "shortfall")

    def __init__(self, rate: float, start: float, duration: float, max_lag: float = MAX_LAG) -> None:
        self.rate, self.start, self.duration = rate, start, duration
        self.cap = max(1, int(rate * max_lag))
        self.offered = 0
        self.shortfall = 0

    @property
    def scheduled(self) -> int:
        return int(self.rate * self.duration)

    def take(self, now: float) -> int:
        elapsed = min(max(0.0, now - self.start), self.duration)
        due = int(self.rate * elapsed) - self.offered - self.shortfall
        if due > self.cap:
            self.shortfall += due - self.cap
            due = self.cap
        if due > 0:
            self.offered += due
            return due
        return 0


class FrameCounter:
    """Counts fixed-size data frames in a byte stream by their header, without parsing frames.

    The header (type, length, 32-byte key, then the 4-byte step tag that starts the payload) is 41 bytes
    that no other frame and no payload contains, so `bytearray.count` over what arrived finds exactly the
    data frames of the current step (`frames`); frames of the step before that arrive late are counted
    apart (`late`). The last 40 bytes of each read stay at the front of the buffer so a header split across
    two reads is found once (40 bytes cannot hold a whole header, so none is counted twice). Other frames
    (KeepAlive, ...) only add to `other_bytes`.
    """

    __slots__ = ("header", "prev_header", "frame_len", "buf", "view", "carry", "frames", "late", "bytes")

    def __init__(self, header: bytes, frame_len: int, size: int = RECV_BYTES) -> None:
        self.header, self.frame_len = header, frame_len
        self.prev_header: bytes | None = None
        self.buf = bytearray(size + len(header))
        self.view = memoryview(self.buf)
        self.carry = 0
        self.frames = 0
        self.late = 0
        self.bytes = 0

    def next_step(self, header: bytes) -> None:
        """Count `header` from now on; the frames of the current header still arriving go to `late`."""
        assert len(header) == len(self.header)
        self.prev_header, self.header = self.header, header
        self.frames = self.late = self.bytes = 0

    @property
    def other_bytes(self) -> int:
        return self.bytes - (self.frames + self.late) * self.frame_len

    def _count(self, n: int) -> None:
        end = self.carry + n
        self.frames += self.buf.count(self.header, 0, end)
        if self.prev_header is not None:
            self.late += self.buf.count(self.prev_header, 0, end)
        self.bytes += n
        keep = min(len(self.header) - 1, end)
        self.buf[0:keep] = self.buf[end - keep : end]
        self.carry = keep

    def feed(self, data: bytes) -> None:
        """Count `data` as if it had been read (tests, and TLS reads that return bytes)."""
        pos = 0
        while pos < len(data):
            part = data[pos : pos + len(self.buf) - self.carry]
            self.buf[self.carry : self.carry + len(part)] = part
            self._count(len(part))
            pos += len(part)

    def recv(self, sock: socket.socket) -> int:
        """One recv_into the buffer; returns bytes read (0 at EOF). Raises BlockingIOError when empty."""
        n = sock.recv_into(self.view[self.carry :])
        if n:
            self._count(n)
        return n


TAG_SIZE = 4
TAGGED_HEADER = _HEADER.size + KEY_SIZE + TAG_SIZE  # what FrameCounter looks for


def frame_base(frame_type: int, key: bytes, size: int) -> bytes:
    """Frame header and key: SendPacket + destination as sent, RecvPacket + source as received."""
    return _HEADER.pack(frame_type, KEY_SIZE + size) + key


def step_payload(seen_base: bytes, size: int, tag: int, avoid: bytes = b"") -> tuple[bytes, bytes]:
    """(the 41 bytes a receiver counts, the `size`-byte payload) of one step's frames.

    The tag is 3 bytes of 7 bits (the step number) and a last byte >= 0x80 that the header and key lack;
    the rest is a filler byte that is in neither this needle nor `avoid` (the previous step's needle), not
    even in their 64-bit bloom masks (byte & 63). Why: `bytearray.count` then skips a whole needle length
    per filler byte it looks at, instead of stepping a byte at a time through a payload of zeros.
    """
    tag3 = bytes((tag >> shift) & 0x7F for shift in (0, 7, 14))
    last = next(b for b in range(0x80, 0x100) if b not in seen_base)
    needle = seen_base + tag3 + bytes([last])
    used = {b & 63 for b in needle + avoid}
    filler = next(b for b in range(256) if (b & 63) not in used)
    return needle, tag3 + bytes([last]) + bytes([filler]) * (size - TAG_SIZE)


def data_frame(frame_type: int, key: bytes, size: int, tag: int = 0) -> bytes:
    """A whole data frame of step `tag` as its sender writes it (SendPacket) or its receiver reads it."""
    base = frame_base(frame_type, key, size)
    return base + step_payload(base, size, tag)[1]


def _connect(host: str, port: int, tls: bool) -> tuple[socket.socket, bytes]:
    """A blocking DERP handshake (HTTP upgrade, ServerKey/ClientInfo/ServerInfo); (socket, own public key)."""
    from turbowg.derp import keys
    from turbowg.derp.client_proto import ClientConnection
    from turbowg.derp.handshake import UpgradeResponse, upgrade_request

    sock: socket.socket = socket.create_connection((host, port), timeout=15)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        sock = ctx.wrap_socket(sock, server_hostname=host)
    sock.sendall(upgrade_request(host, port, tls=tls, user_agent="turbowg-bench"))
    response = UpgradeResponse()
    data: bytes | None = None
    while data is None:
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise EOFError("relay closed the connection before the DERP upgrade")
        data = response.feed(chunk)
    private = keys.generate_private_key()
    conn = ClientConnection(private)
    while True:
        connected, _ = conn.receive_frames(data)
        out = conn.data_to_send()
        if out:
            sock.sendall(out)
        if connected is not None:
            break
        data = sock.recv(1 << 16)
        if not data:
            raise EOFError("relay closed the connection during the DERP handshake")
    sock.setblocking(False)
    return sock, keys.public_key(private)


class _Sender:
    """One sender: pre-built frames, written `n` at a time; what the socket refuses is dropped (counted)."""

    __slots__ = ("sock", "frame_len", "view", "per_chunk", "pending", "sent", "refused", "tls", "dead")

    def __init__(self, sock: socket.socket, frame: bytes, tls: bool) -> None:
        self.sock, self.frame_len, self.tls = sock, len(frame), tls
        self.per_chunk = max(1, CHUNK_BYTES // len(frame))
        self.view = memoryview(frame * self.per_chunk)
        self.pending: memoryview | None = None  # the rest of a started write, finished before anything else
        self.sent = 0  # frames whose first byte went out (a started frame is always finished)
        self.refused = 0
        self.dead = False  # the relay closed this connection: everything offered is refused

    def next_step(self, frame: bytes) -> None:
        """Frames with the next step's tag (a new buffer: a pending write still points into the old one)."""
        self.view = memoryview(frame * self.per_chunk)

    def _flush(self) -> bool:
        if self.dead:
            return False
        if self.pending is None:
            return True
        try:
            written = self.sock.send(self.pending)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return False
        except OSError:
            self.dead, self.pending = True, None
            return False
        self.pending = None if written >= len(self.pending) else self.pending[written:]
        return self.pending is None

    def offer(self, n: int) -> None:
        if not self._flush():
            self.refused += n
            return
        while n > 0:
            k = min(n, self.per_chunk)
            chunk = self.view[: k * self.frame_len]
            try:
                written = self.sock.send(chunk)
            except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
                if self.tls:  # OpenSSL may have taken part of it and wants the same buffer again
                    self.pending, self.sent, n = chunk, self.sent + k, n - k
                self.refused += n
                return
            except OSError:
                self.dead = True
                self.refused += n
                return
            started = -(-written // self.frame_len)
            self.sent += started
            n -= started
            if written < started * self.frame_len:
                self.pending = chunk[written : started * self.frame_len]
            if written < len(chunk):
                self.refused += n
                return

    def unpaced(self) -> None:
        """Write until the socket is full or UNPACED_CHUNKS went out (the probe and the calibration).

        Why the bound: writing until every socket is full starves this process's receivers for many ms,
        so the relay stalls on them and the probe under-reports what it carries."""
        for _ in range(UNPACED_CHUNKS):
            before = self.refused
            self.offer(self.per_chunk)
            if self.refused != before:
                self.refused = before  # unpaced: a full socket is the limit, not a loss
                return


class Generator:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        size, pairs, tls = cfg["size"], cfg["pairs"], cfg["tls"]
        self.frame_len = _HEADER.size + KEY_SIZE + size
        self.ep = select.epoll()
        self.senders: list[_Sender] = []
        self.counters: list[FrameCounter] = []
        self.keys: list[tuple[bytes, bytes]] = []  # (what the sender writes, what its receiver sees) before the payload
        self.tag = 0
        self.stdin_buf = b""
        self.reported: list[int] = []  # per pair, the frames the last step's answer counted
        self.closed = 0  # connections the relay closed (a sweep after that is not comparable)
        self.rx: dict[int, tuple[socket.socket, FrameCounter | None]] = {}
        self.scratch = FrameCounter(b"\xff" * TAGGED_HEADER, 1, 1 << 16)  # sender sockets: whatever the relay says
        listener = None
        if cfg.get("direct"):  # calibration: sender -> receiver over loopback, no relay in between
            listener = socket.create_server(("127.0.0.1", 0))
        for _ in range(pairs):
            if listener is not None:
                dst_key = os.urandom(KEY_SIZE)
                tx = socket.create_connection(listener.getsockname())
                tx.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                rxs, _ = listener.accept()
                tx.setblocking(False)
                rxs.setblocking(False)
                seen = (SEND_PACKET, dst_key)  # the stream arrives unchanged
            else:
                tx, src_key = _connect(cfg["host"], cfg["port"], tls)
                rxs, dst_key = _connect(cfg["host"], cfg["port"], tls)
                seen = (RECV_PACKET, src_key)
            self.keys.append((frame_base(SEND_PACKET, dst_key, size), frame_base(*seen, size)))
            self.senders.append(_Sender(tx, data_frame(SEND_PACKET, dst_key, size), tls))
            counter = FrameCounter(step_payload(self.keys[-1][1], size, 0)[0], self.frame_len)
            self.counters.append(counter)
            self.rx[rxs.fileno()] = (rxs, counter)
            self.rx[tx.fileno()] = (tx, None)
            self.ep.register(rxs.fileno(), select.EPOLLIN)
            self.ep.register(tx.fileno(), select.EPOLLIN)
        self.reported = [0] * pairs
        if listener is not None:
            listener.close()

    def _read(self, fd: int) -> None:
        sock, counter = self.rx[fd]
        c = counter or self.scratch
        for _ in range(8):
            try:
                if c.recv(sock) == 0:
                    raise ConnectionResetError
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except OSError:
                self.ep.unregister(fd)
                self.closed += 1
                return

    def wait_command(self, fd: int) -> bytes:
        """The next line from `fd` (b"" at EOF), reading the receivers meanwhile.

        Why: a relay with a backlog must be able to deliver it between steps (and so go idle, which the
        sweep waits for), not stall on receivers nobody reads."""
        self.ep.register(fd, select.EPOLLIN)
        try:
            while b"\n" not in self.stdin_buf:
                for ready, _ in self.ep.poll(1.0):
                    if ready != fd:
                        self._read(ready)
                        continue
                    chunk = os.read(fd, 4096)
                    if not chunk:
                        return b""
                    self.stdin_buf += chunk
            line, _, self.stdin_buf = self.stdin_buf.partition(b"\n")
            return line
        finally:
            self.ep.unregister(fd)

    def _poll(self, timeout: float) -> None:
        for fd, _ in self.ep.poll(max(0.0, timeout)):
            self._read(fd)

    def delivered(self) -> int:
        return sum(c.frames for c in self.counters)

    def sent(self) -> int:
        return sum(s.sent for s in self.senders)

    def step(self, rate_per_pair: float, duration: float) -> dict[str, Any]:
        """One step: paced at `rate_per_pair` frames/s per pair (0: unpaced) for `duration` seconds."""
        self.tag += 1
        size = self.cfg["size"]
        for i, (sender, counter, (sent_base, seen_base)) in enumerate(
                zip(self.senders, self.counters, self.keys, strict=True)):
            needle, payload = step_payload(seen_base, size, self.tag, avoid=counter.header)
            sender.next_step(sent_base + payload)
            after_report = counter.frames - self.reported[i]  # came between the steps: late for the one before
            counter.next_step(needle)
            counter.late = after_report
        sent0 = self.sent()
        refused0 = sum(s.refused for s in self.senders)
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        start = time.monotonic()
        end = start + duration
        pacers = [Pacer(rate_per_pair, start, duration) for _ in self.senders] if rate_per_pair else []
        next_tick, max_late = start, 0.0
        while True:
            now = time.monotonic()
            if now >= next_tick:
                max_late = max(max_late, now - next_tick)
                if pacers:
                    for sender, pacer in zip(self.senders, pacers, strict=True):
                        n = pacer.take(now)
                        if n:
                            sender.offer(n)
                else:
                    for sender in self.senders:
                        sender.unpaced()
                if now >= end:
                    break
                next_tick += TICK
                if next_tick < now:
                    next_tick = now + TICK
            self._poll(min(next_tick, end) - time.monotonic())
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        # Finish started frames, then wait until every frame written has arrived (or the stream is quiet).
        deadline = time.monotonic() + DRAIN_MAX
        while any(s.pending is not None for s in self.senders) and time.monotonic() < deadline:
            for s in self.senders:
                s._flush()
            self._poll(TICK)
        last_change, last_seen, drained = time.monotonic(), self.delivered(), True
        while self.delivered() < self.sent() - sent0:
            now = time.monotonic()
            if now > deadline or now - last_change > DRAIN_QUIET:
                drained = False
                break
            self._poll(0.01)
            if self.delivered() != last_seen:
                last_seen, last_change = self.delivered(), time.monotonic()
        sent = self.sent() - sent0
        refused = sum(s.refused for s in self.senders) - refused0
        delivered = self.delivered()
        self.reported = [c.frames for c in self.counters]
        scheduled = sum(p.scheduled for p in pacers) if pacers else sent
        shortfall = sum(p.shortfall for p in pacers)
        return {
            "scheduled": scheduled, "sent": sent, "refused": refused, "shortfall": shortfall,
            "delivered": delivered, "drained": drained, "max_late_ms": max_late * 1e3,
            "closed": self.closed + sum(s.dead for s in self.senders),
            "late_prev": sum(c.late for c in self.counters),  # the step before's frames that came during this one
            "other_bytes": sum(c.other_bytes for c in self.counters),
            "gen_cpu_s": (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime),
            "seconds": duration,
        }


def _loadgen_entry(cfg_json: str) -> int:
    cfg = json.loads(cfg_json)
    if cfg.get("cpus"):
        os.sched_setaffinity(0, set(cfg["cpus"]))
    gen = Generator(cfg)
    print(json.dumps({"ready": True}), flush=True)
    while True:
        line = gen.wait_command(sys.stdin.fileno())
        if not line:
            return 0
        cmd = json.loads(line)
        if cmd.get("op") != "step":
            return 0
        print(json.dumps(gen.step(float(cmd["rate_per_pair"]), float(cmd["duration"]))), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--loadgen":
        sys.exit(_loadgen_entry(sys.argv[2]))
    print("usage: python -m turbowg.bench.relay_loadgen --loadgen CONFIG  (started by turbowg bench relay --sweep)",
          file=sys.stderr)
    sys.exit(2)
