"""`turbowg bench relay --sweep`: the relay's knee under a paced rate sweep, and the bulk load generator it uses.

For each configuration (relay path C or Python, worker count, plain or TLS, pairs, packet size, optionally
pinned) one sweep starts a fresh relay, bulk load generator processes (`python -m turbowg.bench.relay_sweep
--loadgen ...`, this file) holding the sender->receiver pairs, and a DERP pinger in this process. The first
repetition of a configuration probes the carried rate with an unpaced step and fixes a geometric ladder
of offered rates around it (ratio 2^(1/4) by default, the probe rate at the third step from the top); every
repetition then climbs that ladder, one step of `--step-seconds` each, and stops after two lossy steps in a
row (going on up past the ladder while nothing is lost, and down below it when every step lost). The knee
of a sweep is the highest offered rate carried with < LOSS_LIMIT_PCT % loss; if no step lies at half the
knee, one more step measures the ping RTT there.

Loss is counted exactly, in frames. Per sender a token bucket against the monotonic clock schedules
floor(rate x seconds) frames; each ~1 ms tick the sender writes what is due, from pre-built frames. Frames
the socket does not accept (the relay is not reading: TCP backpressure) are refused, i.e. dropped at the
sender like a full NIC queue; frames the generator was too late to present (more than MAX_LAG behind the
schedule) are its shortfall. Receivers count the bytes of fixed-size RecvPacket frames by a 41-byte header
(type, length, source key, step tag) that no other frame and no payload contains, so they never parse a
frame in Python. After the step the generator waits until every frame written has arrived (or the stream
has been quiet for DRAIN_QUIET): what arrives later is lost (and, during the next step, counted apart as that
step's "late", by its tag, not as the next step's). After a lossy step the next waits until the relay is idle.
loss = (scheduled - delivered) / scheduled; scheduled - delivered = refused + shortfall + lost in the relay.

A sweep whose first lossy step lost only what the generator failed to present (the relay refused and
dropped less than LOSS_LIMIT_PCT), or whose knee is within one ladder step of what the generator offers
with no relay at all (the calibration: senders straight into receivers over loopback, unpaced), is marked
"generator-bound": its knee is then a lower bound for the relay.

Why its own file: the generator and the sweep are the two ends of one step protocol and one step record;
relay.py keeps the fixed-rate benchmark and the shared relay/pinger/CPU helpers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import select
import signal
import socket
import ssl
import struct
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from turbowg.bench.report import NO_MATPLOTLIB, pyplot, save_figure, table
from turbowg.bench.stats import summarize

LOSS_LIMIT_PCT = 0.1  # the knee: highest offered rate carried with less loss than this
TICK = 0.001  # pacing step (seconds)
MAX_LAG = 0.05  # frames due longer than this are the generator's shortfall, not sent in a burst
DRAIN_QUIET = 0.5
DRAIN_MAX = 3.0
SETTLE_MAX = 10.0  # most seconds to wait for an overloaded relay to go idle before the next step
CHUNK_BYTES = 1 << 16  # most bytes one send() carries; TLS records and partial writes stay small
RECV_BYTES = 1 << 20
UNPACED_CHUNKS = 16  # chunks per sender per tick when unpaced: up to 1 MB per ms per sender
EXTRA_STEPS = 4  # the ladder goes on up (down) by this many steps while the relay loses nothing (everything)
LADDER_RATIO = 2 ** 0.25
PROBE_AT_FROM_TOP = 2  # the probe rate is this many steps below the top of the ladder
DEFAULT_STEPS = 8
DEFAULT_STEP_SECONDS = 1.2
PROBE_SECONDS = 1.0
KEY_SIZE = 32
_HEADER = struct.Struct(">BI")
SEND_PACKET, RECV_PACKET = 0x04, 0x05


# ------------------------------------------------------------------------------------------------
# Pure pieces: token bucket, frame counter, loss and knee (tested on synthetic data)


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


def step_loss(scheduled: int, sent: int, refused: int, shortfall: int, delivered: int) -> dict[str, float]:
    """Loss of one step in percent of the scheduled frames, and where it went."""
    if scheduled <= 0:
        return {"loss_pct": float("nan"), "refused_pct": float("nan"), "shortfall_pct": float("nan"),
                "relay_lost_pct": float("nan")}
    return {
        "loss_pct": 100.0 * (scheduled - delivered) / scheduled,
        "refused_pct": 100.0 * refused / scheduled,
        "shortfall_pct": 100.0 * shortfall / scheduled,
        "relay_lost_pct": 100.0 * (sent - delivered) / scheduled,
    }


def is_clean(step: dict[str, Any]) -> bool:
    loss = step.get("loss_pct")
    return loss is not None and loss == loss and loss < LOSS_LIMIT_PCT


def pick_knee(steps: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The step with the highest offered rate (`rate_fps`) and loss < LOSS_LIMIT_PCT, or None."""
    clean = [s for s in steps if is_clean(s) and not s.get("unpaced")]
    return max(clean, key=lambda s: s["rate_fps"]) if clean else None


def step_near(steps: Sequence[dict[str, Any]], rate: float, tolerance: float = 0.02) -> dict[str, Any] | None:
    """The paced step whose offered rate is within `tolerance` of `rate`."""
    for s in steps:
        if not s.get("unpaced") and abs(s["rate_fps"] - rate) <= tolerance * rate:
            return s
    return None


def make_ladder(probe_fps: float, steps: int, ratio: float = LADDER_RATIO) -> list[float]:
    """Geometric offered rates with the probe rate PROBE_AT_FROM_TOP steps below the top (fewer steps: the top ones)."""
    top = probe_fps * ratio ** PROBE_AT_FROM_TOP
    return [top / ratio ** (steps - 1 - i) for i in range(steps)]


def should_stop(steps: Sequence[dict[str, Any]], past_knee: int = 2) -> bool:
    """Stop climbing once the last `past_knee` paced steps all lost >= LOSS_LIMIT_PCT."""
    paced = [s for s in steps if not s.get("unpaced")]
    return len(paced) >= past_knee and not any(is_clean(s) for s in paced[-past_knee:])


async def climb(ladder: Sequence[float], measure: Callable[[float], Awaitable[dict[str, Any]]], ratio: float,
                extra: int = EXTRA_STEPS) -> list[dict[str, Any]]:
    """Offer the ladder's rates from the bottom; returns the paced steps in the order they ran.

    Stops two lossy steps past the knee (or when the relay hung up: a step with "closed"); goes on up by
    `ratio` past the top until then, and down below the bottom while no step was clean (at most `extra`
    steps each way); then measures half the knee when no step lies there (its RTT is reported).
    """
    steps: list[dict[str, Any]] = []
    rates = list(ladder)
    while rates:
        steps.append(await measure(rates.pop(0)))
        if should_stop(steps) or steps[-1].get("closed"):
            break
        if not rates and len(steps) < len(ladder) + extra:
            rates.append(steps[-1]["rate_fps"] * ratio)  # not two lossy steps past a knee yet
    lowest = min(s["rate_fps"] for s in steps)
    for _ in range(extra):
        if steps[-1].get("closed") or pick_knee(steps) is not None:
            break
        lowest /= ratio
        steps.append(await measure(lowest))
    knee = pick_knee(steps)
    if knee is not None and not steps[-1].get("closed") and step_near(steps, knee["rate_fps"] / 2) is None:
        steps.append(await measure(knee["rate_fps"] / 2))
    return steps


def generator_bound(steps: Sequence[dict[str, Any]], knee: dict[str, Any] | None, ceiling_fps: float | None,
                    ratio: float = LADDER_RATIO) -> str:
    """Why this sweep's knee may be the generator's limit rather than the relay's ('' when it is the relay's)."""
    paced = sorted((s for s in steps if not s.get("unpaced")), key=lambda s: s["rate_fps"])
    above = [s for s in paced if knee is None or s["rate_fps"] > knee["rate_fps"]]
    if above and above[0]["refused_pct"] + above[0]["relay_lost_pct"] < LOSS_LIMIT_PCT:
        return "the first lossy step lost only what the generator was late with"
    if knee is not None and not above:
        return "no lossy step: the relay was not saturated"
    if knee is not None and ceiling_fps is not None and knee["rate_fps"] * ratio > ceiling_fps:
        return f"generator ceiling {ceiling_fps / 1e3:.0f} kpkt/s is within a step of the knee"
    return ""


# ------------------------------------------------------------------------------------------------
# Bulk load generator (its own process)


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


class _Generator:
    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        size, pairs, tls = cfg["size"], cfg["pairs"], cfg["tls"]
        self.frame_len = _HEADER.size + KEY_SIZE + size
        self.ep = select.epoll()
        self.senders: list[_Sender] = []
        self.counters: list[FrameCounter] = []
        self.keys: list[tuple[bytes, bytes]] = []  # (what the sender writes, what its receiver sees) before the payload
        self.tag = 0
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
        for sender, counter, (sent_base, seen_base) in zip(self.senders, self.counters, self.keys, strict=True):
            needle, payload = step_payload(seen_base, size, self.tag, avoid=counter.header)
            sender.next_step(sent_base + payload)
            counter.next_step(needle)
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
    gen = _Generator(cfg)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("op") != "step":
            break
        print(json.dumps(gen.step(float(cmd["rate_per_pair"]), float(cmd["duration"]))), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------
# Orchestration


@dataclass(frozen=True)
class SweepConfig:
    path: str  # "c": the relay as shipped (C plane for plain clients); "py": TURBOWG_NO_C=1
    workers: int
    tls: bool
    pairs: int
    size: int
    pinned: bool = False  # relay on CPU 0, load generators and pinger on CPU 1

    @property
    def name(self) -> str:
        return (f"{'C' if self.path == 'c' else 'Py'} {self.workers}w {'tls' if self.tls else 'plain'} "
                f"{self.pairs}p {self.size}B{' pin' if self.pinned else ''}")


class _Gens:
    """The load generator processes of one sweep and the step protocol to them (a JSON line each way)."""

    def __init__(self, procs: list[asyncio.subprocess.Process], pairs: list[int]) -> None:
        self.procs, self.pairs = procs, pairs

    @classmethod
    async def start(cls, base: dict[str, Any], pairs: int, nprocs: int) -> _Gens:
        split = [n for n in (pairs // nprocs + (1 if i < pairs % nprocs else 0) for i in range(nprocs)) if n]
        procs = []
        for n in split:
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "turbowg.bench.relay_sweep", "--loadgen", json.dumps({**base, "pairs": n}),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            ))
        gens = cls(procs, split)
        for p in procs:
            assert p.stdout is not None
            line = await asyncio.wait_for(p.stdout.readline(), 60)
            if not line or not json.loads(line).get("ready"):
                await gens.close()
                raise RuntimeError("load generator failed to connect")
        return gens

    async def step(self, rate_fps: float, duration: float) -> dict[str, Any]:
        """Total offered `rate_fps` (0: unpaced) split evenly over the pairs; the summed counts."""
        per_pair = rate_fps / sum(self.pairs)
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(json.dumps({"op": "step", "rate_per_pair": per_pair, "duration": duration}).encode() + b"\n")
            await p.stdin.drain()
        total: dict[str, Any] = {}
        for p in self.procs:
            assert p.stdout is not None
            line = await asyncio.wait_for(p.stdout.readline(), duration + DRAIN_MAX + 30)
            if not line:
                raise RuntimeError("load generator died")
            for key, value in json.loads(line).items():
                if key == "drained":
                    total[key] = total.get(key, True) and value
                elif key in ("max_late_ms", "seconds"):
                    total[key] = max(total.get(key, 0.0), value)
                else:
                    total[key] = total.get(key, 0) + value
        return total

    async def close(self) -> None:
        for p in self.procs:
            if p.returncode is None and p.stdin is not None:
                with contextlib.suppress(OSError, RuntimeError):
                    p.stdin.close()
        for p in self.procs:
            try:
                await asyncio.wait_for(p.wait(), 5)
            except TimeoutError:
                p.kill()
                await p.wait()


async def _pinger(host: str, port: int, tls: bool, stop: asyncio.Event, out: list[tuple[float, float]],
                  interval: float) -> None:
    """DERP pings every `interval` s on a client of its own: (send time, RTT ms); a lost pong counts as 2 s."""
    from turbowg.derp.client import DerpClient, DerpClientError

    async with DerpClient() as client:
        await client.connect(host=host, port=port, tls=tls, verify=False)
        while not stop.is_set():
            t = time.monotonic()
            try:
                out.append((t, await client.ping(timeout=2.0) * 1000.0))
            except DerpClientError:
                out.append((t, 2000.0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _pin(cpus: set[int]) -> Callable[[], None]:
    def apply() -> None:
        os.sched_setaffinity(0, cpus)
    return apply


async def _sweep_once(cfg: SweepConfig, args: argparse.Namespace, tmp: Path, ladder: list[float] | None,
                      ceiling: float | None) -> dict[str, Any]:
    from turbowg.bench.relay import BenchConfig, _cpu_seconds, _relay_command, _relay_pids, _wait_listening

    began = time.monotonic()
    port = _free_port()
    env = dict(os.environ)
    env.pop("TURBOWG_NO_C", None)
    if cfg.path == "py":
        env["TURBOWG_NO_C"] = "1"
    relay = await asyncio.create_subprocess_exec(
        *_relay_command(BenchConfig(cfg.workers, cfg.tls, True), port, tmp), env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        preexec_fn=_pin({0}) if cfg.pinned else None,
    )
    gens: _Gens | None = None
    stop = asyncio.Event()
    pings: list[tuple[float, float]] = []
    ping_task: asyncio.Task[None] | None = None
    steps: list[dict[str, Any]] = []
    try:
        await _wait_listening(port, relay)
        await asyncio.sleep(0.3 if cfg.workers > 1 else 0.05)  # let every worker bind
        base = {"host": "127.0.0.1", "port": port, "tls": cfg.tls, "size": cfg.size,
                "cpus": [1] if cfg.pinned else []}
        gens = await _Gens.start(base, cfg.pairs, 1 if cfg.pinned else args.gen_procs)
        ping_task = asyncio.create_task(_pinger("127.0.0.1", port, cfg.tls, stop, pings, args.ping_interval))
        pids = _relay_pids(relay.pid)

        measured = [0]

        async def settle() -> None:
            """Until the relay is idle (bounded): an overloaded step's backlog must not load the next one."""
            deadline = time.monotonic() + SETTLE_MAX
            while time.monotonic() < deadline:
                before = _cpu_seconds(pids)
                await asyncio.sleep(0.2)
                if _cpu_seconds(pids) - before <= 0.02:
                    return

        async def step(rate: float, seconds: float) -> dict[str, Any]:
            settled = time.monotonic()
            if steps and not is_clean(steps[-1]):
                await settle()
            cpu0, t0 = _cpu_seconds(pids), time.monotonic()
            settled = t0 - settled
            counts = await gens.step(rate, seconds)
            if steps:  # the step before's frames that came only during this one: lost for it, but say so
                steps[-1]["late"] = counts["late_prev"]
            cpu1 = _cpu_seconds(pids)  # includes the drain: the relay's work for this step's frames
            t1 = t0 + seconds
            rtts = [rtt for t, rtt in pings if t0 <= t < t1]
            gb = counts["delivered"] * cfg.size / 1e9
            rec = {**counts, "rate_fps": rate, "unpaced": rate == 0, "settle_s": settled,
                   "step_wall_s": time.monotonic() - t0, "at_s": t0 - began,
                   "delivered_fps": counts["delivered"] / seconds,
                   **step_loss(counts["scheduled"], counts["sent"], counts["refused"], counts["shortfall"],
                               counts["delivered"]),
                   "ping_p50_ms": _pct(rtts, 0.5), "ping_p99_ms": _pct(rtts, 0.99), "pings": len(rtts),
                   "relay_cpu_s": cpu1 - cpu0, "cpu_s_per_gb": (cpu1 - cpu0) / gb if gb else float("nan")}
            steps.append(rec)
            measured[0] += 1
            print(f"    {'unpaced probe' if rate == 0 else f'{rate / 1e3:8.1f} kpkt/s'}: delivered "
                  f"{rec['delivered_fps'] / 1e3:.1f} kpkt/s, loss {rec['loss_pct']:.3f}% (refused "
                  f"{rec['refused_pct']:.3f}, relay {rec['relay_lost_pct']:.3f}, generator {rec['shortfall_pct']:.3f}), "
                  f"ping p99 {rec['ping_p99_ms']:.2f} ms [at {rec['at_s']:.1f} s, settled {settled:.1f} s, "
                  f"took {rec['step_wall_s']:.1f} s]", file=sys.stderr, flush=True)
            return rec

        await asyncio.sleep(0.1)  # the pinger connects
        probe_fps = None
        if ladder is None:
            probe = await step(0.0, args.probe_seconds)
            probe_fps = probe["delivered_fps"]
            if probe_fps <= 0:
                raise RuntimeError("the unpaced probe delivered nothing")
            ladder = make_ladder(probe_fps, args.steps, args.ladder_ratio)
        await climb(ladder, lambda rate: step(rate, args.step_seconds), args.ladder_ratio)
        if steps[-1]["closed"]:
            steps[:] = [s for s in steps if not s["closed"]]  # not comparable: some pairs were gone
        knee = pick_knee(steps)
    finally:
        stop.set()
        if ping_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ping_task, 5)
        if gens is not None:
            await gens.close()
        if relay.returncode is None:
            relay.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(relay.wait(), 15)
            except TimeoutError:
                relay.kill()
                await relay.wait()
    closed = any(s["closed"] for s in steps) or len(steps) < measured[0]
    half = step_near(steps, knee["rate_fps"] / 2) if knee else None
    return {
        "config": cfg.name, "path": cfg.path, "workers": cfg.workers, "tls": cfg.tls, "pairs": cfg.pairs,
        "size": cfg.size, "pinned": cfg.pinned, "ladder_fps": ladder, "probe_fps": probe_fps, "steps": steps,
        "knee_fps": knee["rate_fps"] if knee else float("nan"),
        "knee_mbit": knee["rate_fps"] * cfg.size * 8 / 1e6 if knee else float("nan"),
        "knee_ping_p50_ms": knee["ping_p50_ms"] if knee else float("nan"),
        "knee_ping_p99_ms": knee["ping_p99_ms"] if knee else float("nan"),
        "half_ping_p50_ms": half["ping_p50_ms"] if half else float("nan"),
        "half_ping_p99_ms": half["ping_p99_ms"] if half else float("nan"),
        "knee_cpu_s_per_gb": knee["cpu_s_per_gb"] if knee else float("nan"),
        "generator_ceiling_fps": ceiling,
        "generator_bound": generator_bound(steps, knee, ceiling, args.ladder_ratio),
        "closed": closed,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def calibrate(pairs: int, size: int, seconds: float, nprocs: int, pinned: bool) -> dict[str, Any]:
    """The generator's own ceiling: unpaced, senders straight into receivers over loopback (no relay)."""
    gens = await _Gens.start({"direct": True, "size": size, "tls": False, "cpus": [1] if pinned else []},
                             pairs, 1 if pinned else nprocs)
    try:
        counts = await gens.step(0.0, seconds)
    finally:
        await gens.close()
    fps = counts["delivered"] / seconds
    return {"pairs": pairs, "size": size, "pinned": pinned, "ceiling_fps": fps,
            "gen_cpu_s": counts["gen_cpu_s"], "seconds": seconds,
            "gen_cpu_us_per_frame": 1e6 * counts["gen_cpu_s"] / counts["delivered"] if counts["delivered"] else None}


def sweep_configs(args: argparse.Namespace) -> list[SweepConfig]:
    configs = [SweepConfig(path, w, False, pairs, size)
               for size in args.sizes for pairs in args.pair_counts for path in args.paths for w in args.workers]
    if args.tls_rows and "c" in args.paths:
        configs += [SweepConfig("c", w, True, max(args.pair_counts), max(args.sizes)) for w in args.workers]
    if args.pin and "c" in args.paths:  # the per-core number is the C plane's (the Python path: 2 workers' rows)
        configs += [SweepConfig("c", 1, False, pairs, size, pinned=True)
                    for size in args.sizes for pairs in args.pair_counts]
    return configs


METRICS = [
    ("knee_fps", "knee kpkt/s", "{:.0f}", 1e-3),
    ("knee_mbit", "knee Mbit/s", "{:.0f}", 1.0),
    ("half_ping_p50_ms", "p50 ms @knee/2", "{:.2f}", 1.0),
    ("half_ping_p99_ms", "p99 ms @knee/2", "{:.2f}", 1.0),
    ("knee_ping_p50_ms", "p50 ms @knee", "{:.2f}", 1.0),
    ("knee_ping_p99_ms", "p99 ms @knee", "{:.2f}", 1.0),
    ("knee_cpu_s_per_gb", "CPU s/GB @knee", "{:.1f}", 1.0),
]


def sweep_table(configs: list[SweepConfig], runs: list[dict[str, Any]]) -> str:
    rows = [["config"] + [label for _, label, _, _ in METRICS] + ["note"]]
    for cfg in configs:
        mine = [r for r in runs if r["config"] == cfg.name]
        row = [f"{cfg.name} (n={len(mine)})"]
        for key, _, fmt, scale in METRICS:
            values = [r[key] * scale for r in mine if r[key] == r[key]]
            row.append(summarize(values).format(fmt) if values else "-")
        bound = sorted({r["generator_bound"] for r in mine if r["generator_bound"]})
        no_knee = sum(1 for r in mine if r["knee_fps"] != r["knee_fps"])
        note = []
        if bound:
            note.append(f"generator-bound in {sum(1 for r in mine if r['generator_bound'])}/{len(mine)}: "
                        + "; ".join(bound))
        if no_knee:
            note.append(f"{no_knee} run(s) lossy at every step")
        closed = sum(1 for r in mine if r.get("closed"))
        if closed:
            note.append(f"{closed} run(s) ended early: the relay closed generator connections")
        row.append(", ".join(note))
        rows.append(row)
    return "\n".join(table(rows))


def sweep_chart(configs: list[SweepConfig], runs: list[dict[str, Any]], path: str) -> str:
    """Per packet size: delivered vs offered (knees marked) and ping p99 vs offered, medians per step."""
    plt = pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    sizes = sorted({c.size for c in configs}, reverse=True)
    fig, axes = plt.subplots(len(sizes), 2, figsize=(13, 4.8 * len(sizes)), squeeze=False)
    for row, size in enumerate(sizes):
        ax_rate, ax_rtt = axes[row]
        for cfg in (c for c in configs if c.size == size):
            mine = [r for r in runs if r["config"] == cfg.name]
            by_rate: dict[float, list[dict[str, Any]]] = {}
            for r in mine:
                for s in r["steps"]:
                    if not s["unpaced"]:
                        by_rate.setdefault(round(s["rate_fps"], 3), []).append(s)
            if not by_rate:
                continue
            rates = sorted(by_rate)
            offered = [x / 1e3 for x in rates]
            delivered = [summarize([s["delivered_fps"] for s in by_rate[x]]).median / 1e3 for x in rates]
            p99 = [summarize([s["ping_p99_ms"] for s in by_rate[x] if s["ping_p99_ms"] == s["ping_p99_ms"]]
                             or [float("nan")]).median for x in rates]
            (line,) = ax_rate.plot(offered, delivered, marker=".", label=cfg.name)
            ax_rtt.plot(offered, p99, marker=".", color=line.get_color(), label=cfg.name)
            knees = [r["knee_fps"] for r in mine if r["knee_fps"] == r["knee_fps"]]
            if knees:
                k = summarize(knees)
                ax_rate.errorbar([k.median / 1e3], [k.median / 1e3], xerr=[[(k.median - k.lo) / 1e3],
                                 [(k.hi - k.median) / 1e3]], marker="o", color=line.get_color(), capsize=3)
        lim = ax_rate.get_xlim()
        ax_rate.plot(lim, lim, color="grey", lw=0.6, ls=":")
        for ax, ylabel in ((ax_rate, "delivered kpkt/s"), (ax_rtt, "ping p99 ms")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(f"offered kpkt/s ({size}-byte packets)")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=6)
        ax_rate.set_title(f"{size} B: carried vs offered (o: knee, median and 95% CI)")
        ax_rtt.set_title(f"{size} B: DERP ping p99 under load")
    save_figure(fig, "turbowg DERP relay rate sweep", path, dpi=100)
    return f"chart written to {path}"


LOSS_NOTE = (f"Knee = highest offered rate carried with < {LOSS_LIMIT_PCT:g}% loss. Loss = (scheduled - delivered) / "
             "scheduled frames, counted exactly on both sides: scheduled = floor(rate x seconds) by each sender's "
             "token bucket; not delivered = refused by the sender's full socket (relay backpressure) + dropped "
             "in the relay + generator shortfall (more than 50 ms behind its schedule). Ping = a separate DERP "
             "client's Ping/Pong RTT every few ms during the step.")


async def run_sweep(args: argparse.Namespace) -> int:
    configs = sweep_configs(args)
    began = time.monotonic()
    calib: dict[tuple[int, int, bool], dict[str, Any]] = {}
    for pinned in sorted({c.pinned for c in configs}):
        for size in args.sizes:
            for pairs in args.pair_counts:
                c = await calibrate(pairs, size, args.probe_seconds, args.gen_procs, pinned)
                calib[(pairs, size, pinned)] = c
                print(f"generator ceiling (no relay, {pairs} pairs, {size} B{', CPU 1' if pinned else ''}): "
                      f"{c['ceiling_fps'] / 1e3:.0f} kpkt/s, {c['gen_cpu_us_per_frame'] or 0:.2f} CPU us/frame",
                      file=sys.stderr, flush=True)
    runs: list[dict[str, Any]] = []
    ladders: dict[str, list[float]] = {}
    total, n = len(configs) * args.runs, 0
    with tempfile.TemporaryDirectory(prefix="turbowg-bench-relay-") as tmpdir:
        tmp = Path(tmpdir)
        if any(c.tls for c in configs):
            from turbowg.bench.relay import _make_tls_files

            _make_tls_files(tmp, "localhost")
        for rep in range(args.runs):
            for cfg in configs:  # interleaved: every configuration once per repetition
                n += 1
                print(f"[{n}/{total}] {cfg.name}, run {rep + 1}/{args.runs} ({time.monotonic() - began:.0f} s)",
                      file=sys.stderr, flush=True)
                if cfg.pinned:
                    os.sched_setaffinity(0, {1})  # the pinger shares CPU 1 with the load generators
                try:
                    result = await _sweep_once(cfg, args, tmp, ladders.get(cfg.name),
                                               calib[(cfg.pairs, cfg.size, cfg.pinned)]["ceiling_fps"])
                except (RuntimeError, OSError, TimeoutError, EOFError, json.JSONDecodeError) as exc:
                    print(f"    sweep failed: {exc!r}", file=sys.stderr, flush=True)
                    continue
                finally:
                    if cfg.pinned:
                        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
                ladders.setdefault(cfg.name, result["ladder_fps"])
                result["repetition"] = rep
                runs.append(result)
                print(f"    knee {result['knee_fps'] / 1e3:.1f} kpkt/s {result['generator_bound']}",
                      file=sys.stderr, flush=True)
    wall = time.monotonic() - began
    meta = {
        "command": " ".join(["turbowg", "bench", "relay"] + sys.argv[3:]) if len(sys.argv) > 2 else "",
        "steps": args.steps, "step_seconds": args.step_seconds, "ladder_ratio": args.ladder_ratio,
        "probe_seconds": args.probe_seconds, "runs": args.runs, "gen_procs": args.gen_procs,
        "loss_limit_pct": LOSS_LIMIT_PCT, "tick_s": TICK, "max_lag_s": MAX_LAG, "cpus": os.cpu_count(),
        "kernel": os.uname().release, "python": sys.version.split()[0], "wall_s": wall,
        "calibration": list(calib.values()), "loss": LOSS_NOTE,
    }
    print()
    print(f"DERP relay rate sweep: up to {args.steps} offered rates per sweep (ratio {args.ladder_ratio:.3f}, "
          f"{args.step_seconds:g} s each), {args.runs} interleaved sweeps per configuration. Median [95% CI] "
          "over sweeps.")
    print(sweep_table(configs, runs))
    print()
    print(LOSS_NOTE)
    print("Generator ceiling (unpaced, senders straight into receivers, no relay): " + ", ".join(
        f"{c['pairs']}p {c['size']}B{' CPU1' if c['pinned'] else ''} {c['ceiling_fps'] / 1e3:.0f} kpkt/s"
        for c in calib.values()))
    print(f"C = the relay as shipped (plain clients on the C plane; TLS clients on its Python path), Py = "
          f"TURBOWG_NO_C=1. Load generators ({args.gen_procs} processes) and the pinger share the machine's "
          f"{os.cpu_count()} CPUs with the relay; 'pin' rows: relay on CPU 0, everything else on CPU 1 (the "
          "per-core number). CPU s/GB: relay processes' CPU seconds per GB of packet payload delivered.")
    print(f"wall time {wall:.0f} s")
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "runs": runs}, f, indent=1)
    print(f"raw sweeps written to {args.json}")
    if args.png:
        print(sweep_chart(configs, runs, args.png))
    return 0 if runs else 1


def positive_list(kind: Callable[[str], Any], minimum: float = 1) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
        if not values or any(v < minimum for v in values):
            raise argparse.ArgumentTypeError(f"values must be >= {minimum:g}")
        return values
    return parse


def path_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or any(v not in ("c", "py") for v in values):
        raise argparse.ArgumentTypeError("paths are 'c' and/or 'py'")
    return values


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--loadgen":
        sys.exit(_loadgen_entry(sys.argv[2]))
    print("usage: turbowg bench relay --sweep [options]  (this module's own entry is for load generators)",
          file=sys.stderr)
    sys.exit(2)
