"""`turbowg bench relay`: DERP relay throughput, loss, latency under load and CPU cost per GB.

Each run starts a fresh relay (`python -m turbowg relay`, plain HTTP or TLS, 1 or 2 workers) and
load generator processes (`python -m turbowg.bench.relay --loadgen ...`, this file) that hold N
sender->receiver client pairs. Senders write 1400-byte packets either as fast as TCP backpressure
allows (unpaced) or at a fixed total rate (paced). Every packet carries a sequence number and the
send time, so receivers count loss (sequence gaps plus what never arrived) and one-way latency.
Meanwhile a separate client in this process sends DERP Ping frames every 10 ms: its round-trip
time is the latency another user of the relay sees while it is loaded.

Configurations are interleaved (run 1 of every configuration, then run 2, ...), so slow drift of
the machine affects all alike; every metric is reported as the median over runs with a
distribution-free 95% CI (stats.py). CPU cost is utime+stime of the relay's processes (parent and
workers) from /proc/<pid>/stat over the measurement window, per GB of packet payload delivered.

Caveat printed with the results: load generators run on the same machine as the relay, so on a
2-core box they compete with it for CPU; absolute numbers are a lower bound for the relay alone.

`--sweep` (relay_sweep.py) instead climbs a ladder of paced offered rates per configuration and reports
the knee (highest rate carried with < 0.1% loss), the ping RTT at half the knee and at it, and CPU per GB,
for the C path and the Python path (TURBOWG_NO_C=1), with a bulk load generator of its own.

Why one file (~620 lines): the benchmark driver and the load generator it starts (`--loadgen`, this same
file) are the two ends of one packet format and one per-run record; one file keeps them in step.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import signal
import socket
import struct
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from turbowg.bench.report import NO_MATPLOTLIB, pyplot, save_figure, table
from turbowg.bench.stats import summarize

PACKET_SIZE = 1400
_STAMP = struct.Struct(">QQ")  # sequence number, send time (CLOCK_MONOTONIC ns; shared by all processes)
LATENCY_SAMPLE_EVERY = 16
MAX_LATENCY_SAMPLES = 5000
PING_INTERVAL = 0.01
DRAIN_QUIET = 0.3
DRAIN_MAX = 3.0


# ------------------------------------------------------------------------------------------------
# Load generator (runs in its own process)


@dataclass
class _PairStats:
    sent: int = 0
    received: int = 0
    received_in_window: int = 0
    bytes_in_window: int = 0
    gaps: int = 0  # packets skipped in the sequence (lost inside the relay)
    reordered: int = 0
    bad: int = 0  # wrong length or source
    last_rx: float = 0.0


async def _open_raw(host: str, port: int, tls: bool) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """A DERP connection after the handshake as a raw stream: (reader, writer, own public key).

    The load generator skips DerpClient's per-message objects on purpose: it must be much cheaper
    per packet than the relay it measures, or it would measure itself.
    """
    import ssl

    from turbowg.derp import keys
    from turbowg.derp.handshake import derp_handshake

    ctx = None
    if tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=host if ctx else None,
                                                   limit=1 << 20)
    private = keys.generate_private_key()
    _, decoder, _ = await derp_handshake(reader, writer, host, private)
    if decoder.buffered:
        raise RuntimeError("unexpected data after the DERP handshake")
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    return reader, writer, keys.public_key(private)


async def _loadgen(cfg: dict[str, Any]) -> dict[str, Any]:
    from turbowg.derp.codec import FrameType, encode_pong

    pairs: int = cfg["pairs"]
    size: int = cfg["size"]
    duration: float = cfg["duration"]
    pps_per_pair: float = cfg["pps_per_pair"]  # 0 = unpaced
    senders = [await _open_raw(cfg["host"], cfg["port"], cfg["tls"]) for _ in range(pairs)]
    receivers = [await _open_raw(cfg["host"], cfg["port"], cfg["tls"]) for _ in range(pairs)]
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    print(json.dumps({"ready": True}), flush=True)
    if (await stdin.readline()).strip() != b"go":
        raise SystemExit("loadgen: expected 'go'")
    stats = [_PairStats() for _ in range(pairs)]
    latencies: list[int] = []
    start = time.monotonic()
    end = start + duration
    end_ns = int(end * 1e9)
    stop_sending = asyncio.Event()
    header = struct.Struct(">BI")
    frame_len = header.size + 32 + size
    stamp_at = header.size + 32

    async def send(i: int) -> None:
        _, writer, _ = senders[i]
        st = stats[i]
        per_batch = 64
        frame = header.pack(FrameType.SEND_PACKET, 32 + size) + receivers[i][2] + bytes(size)
        batch = bytearray(frame * per_batch)
        pack_into = _STAMP.pack_into
        seq = 0
        while not stop_sending.is_set():
            if pps_per_pair:
                due = int((time.monotonic() - start) * pps_per_pair) - seq
                if due <= 0:
                    await asyncio.sleep(0.002)
                    continue
                n = min(due, per_batch)
            else:
                n = per_batch
            now_ns = time.monotonic_ns()
            for k in range(n):
                pack_into(batch, k * frame_len + stamp_at, seq + k, now_ns)
            writer.write(bytes(batch[: n * frame_len]))
            seq += n
            st.sent = seq
            await writer.drain()
            await asyncio.sleep(0)  # let receivers in this process run between batches

    async def receive(i: int) -> None:
        reader, writer, _ = receivers[i]
        src = senders[i][2]
        st = stats[i]
        expected = 0
        unpack_header = header.unpack_from
        unpack_stamp = _STAMP.unpack_from
        recv_type, ping_type = FrameType.RECV_PACKET, FrameType.PING
        want_len = 32 + size
        rest = b""
        while True:
            data = await reader.read(1 << 18)
            if not data:
                return
            now_ns = time.monotonic_ns()
            st.last_rx = time.monotonic()
            if rest:
                data = rest + data
            pos, stop_at = 0, len(data)
            while stop_at - pos >= 5:
                ftype, flen = unpack_header(data, pos)
                nxt = pos + 5 + flen
                if nxt > stop_at:
                    break
                if ftype == recv_type:
                    if flen != want_len or data[pos + 5 : pos + 37] != src:
                        st.bad += 1
                    else:
                        seq, sent_ns = unpack_stamp(data, pos + 37)
                        if seq >= expected:
                            st.gaps += seq - expected
                            expected = seq + 1
                        else:
                            st.reordered += 1
                        st.received += 1
                        if now_ns <= end_ns:
                            st.received_in_window += 1
                            st.bytes_in_window += size
                        if st.received % LATENCY_SAMPLE_EVERY == 0 and len(latencies) < MAX_LATENCY_SAMPLES:
                            latencies.append(now_ns - sent_ns)
                elif ftype == ping_type and flen >= 8:
                    writer.write(encode_pong(data[pos + 5 : pos + 13]))
                pos = nxt
            rest = data[pos:]

    tasks = [asyncio.create_task(send(i)) for i in range(pairs)]
    tasks += [asyncio.create_task(receive(i)) for i in range(pairs)]
    await asyncio.sleep(max(0.0, end - time.monotonic()))
    stop_sending.set()
    drain_deadline = time.monotonic() + DRAIN_MAX
    while time.monotonic() < drain_deadline:
        await asyncio.sleep(DRAIN_QUIET / 3)
        if time.monotonic() - max((s.last_rx for s in stats), default=0.0) > DRAIN_QUIET:
            break
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for _, writer, _ in senders + receivers:
        writer.close()
    return {
        "sent": sum(s.sent for s in stats),
        "received": sum(s.received for s in stats),
        "received_in_window": sum(s.received_in_window for s in stats),
        "bytes_in_window": sum(s.bytes_in_window for s in stats),
        "gaps": sum(s.gaps for s in stats),
        "reordered": sum(s.reordered for s in stats),
        "bad": sum(s.bad for s in stats),
        "latency_ns": latencies,
    }


def _loadgen_entry(cfg_json: str) -> int:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        result = runner.run(_loadgen(json.loads(cfg_json)))
    print(json.dumps(result), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------
# Orchestration


@dataclass(frozen=True)
class BenchConfig:
    workers: int
    tls: bool
    paced: bool

    @property
    def name(self) -> str:
        return f"{self.workers}w {'tls' if self.tls else 'plain'} {'paced' if self.paced else 'unpaced'}"


def _cpu_seconds(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / ticks


def _relay_pids(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [pid] + [int(p) for p in f.read().split()]
    except OSError:
        return [pid]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _make_tls_files(directory: Path, hostname: str) -> None:
    """Self-signed certificate for the TLS runs (derper's certmode manual layout)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=7))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (directory / f"{hostname}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{hostname}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def _relay_command(cfg: BenchConfig, port: int, tmp: Path) -> list[str]:
    cmd = [sys.executable, "-m", "turbowg", "relay", "-a", f"127.0.0.1:{port}", "--stun", "false",
           "--workers", str(cfg.workers)]
    if cfg.tls:
        cmd += ["-c", str(tmp / "derper.json"), "--hostname", "localhost", "--certmode", "manual",
                "--certdir", str(tmp)]
    else:
        cmd += ["--dev"]
    return cmd


async def _wait_listening(port: int, proc: asyncio.subprocess.Process, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"relay exited with {proc.returncode} before listening")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError("relay did not start listening")


async def stop_relay(relay: asyncio.subprocess.Process, timeout: float = 15.0) -> None:
    """SIGTERM the relay (its workers stop with it) and wait; SIGKILL if it has not exited within `timeout`."""
    if relay.returncode is None:
        relay.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(relay.wait(), timeout)
        except TimeoutError:
            relay.kill()
            await relay.wait()


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[idx]


async def _ping_loop(host: str, port: int, tls: bool, stop: asyncio.Event) -> list[float]:
    from turbowg.derp.client import DerpClient, DerpClientError

    rtts: list[float] = []
    async with DerpClient() as client:
        await client.connect(host=host, port=port, tls=tls, verify=False)
        while True:  # at least one ping, even when connecting under load outlasted a short run
            try:
                rtts.append(await client.ping(timeout=2.0) * 1000.0)
            except DerpClientError:
                rtts.append(2000.0)  # a lost pong counts as the timeout, not as nothing
            if stop.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), PING_INTERVAL)
    return rtts


async def _one_run(cfg: BenchConfig, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    port = _free_port()
    relay = await asyncio.create_subprocess_exec(
        *_relay_command(cfg, port, tmp), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    gens: list[asyncio.subprocess.Process] = []
    try:
        await _wait_listening(port, relay)
        await asyncio.sleep(0.3 if cfg.workers > 1 else 0.05)  # let every worker bind
        total_pps = args.rate_mbit * 1e6 / 8 / args.size if cfg.paced else 0.0
        split = [args.pairs // args.gen_procs + (1 if i < args.pairs % args.gen_procs else 0)
                 for i in range(args.gen_procs)]
        for n in split:
            if n == 0:
                continue
            gen_cfg = {"host": "127.0.0.1", "port": port, "tls": cfg.tls, "pairs": n, "size": args.size,
                       "duration": args.duration, "pps_per_pair": total_pps / args.pairs}
            gens.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "turbowg.bench.relay", "--loadgen", json.dumps(gen_cfg),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            ))
        for g in gens:
            assert g.stdout is not None
            line = await asyncio.wait_for(g.stdout.readline(), 30)
            if not line or not json.loads(line).get("ready"):
                raise RuntimeError("load generator failed to connect")
        stop = asyncio.Event()
        ping_task = asyncio.create_task(_ping_loop("127.0.0.1", port, cfg.tls, stop))
        await asyncio.sleep(0.1)  # pinger connected
        pids = _relay_pids(relay.pid)
        cpu0, t0 = _cpu_seconds(pids), time.monotonic()
        for g in gens:
            assert g.stdin is not None
            g.stdin.write(b"go\n")
            await g.stdin.drain()
        await asyncio.sleep(args.duration)
        cpu1, t1 = _cpu_seconds(pids), time.monotonic()
        stop.set()
        rtts = await ping_task
        results = []
        for g in gens:
            assert g.stdout is not None
            line = await asyncio.wait_for(g.stdout.readline(), 30 + DRAIN_MAX)
            if not line:
                raise RuntimeError("load generator died")
            results.append(json.loads(line))
            await g.wait()
    finally:
        for g in gens:
            if g.returncode is None:
                g.kill()
                await g.wait()
        await stop_relay(relay)
    window = t1 - t0
    sent = sum(r["sent"] for r in results)
    received = sum(r["received"] for r in results)
    bytes_in_window = sum(r["bytes_in_window"] for r in results)
    latencies_ms = [ns / 1e6 for r in results for ns in r["latency_ns"]]
    gb = bytes_in_window / 1e9
    return {
        "config": cfg.name, "workers": cfg.workers, "tls": cfg.tls, "paced": cfg.paced,
        "window_s": window, "sent": sent, "received": received,
        "received_in_window": sum(r["received_in_window"] for r in results),
        "gaps": sum(r["gaps"] for r in results), "reordered": sum(r["reordered"] for r in results),
        "bad": sum(r["bad"] for r in results),
        "mbit_s": bytes_in_window * 8 / window / 1e6,
        "kpps": sum(r["received_in_window"] for r in results) / window / 1e3,
        "loss_pct": 100.0 * (1 - received / sent) if sent else float("nan"),
        "ping_p50_ms": _percentile(rtts, 0.50), "ping_p99_ms": _percentile(rtts, 0.99), "pings": len(rtts),
        "oneway_p50_ms": _percentile(latencies_ms, 0.50), "oneway_p99_ms": _percentile(latencies_ms, 0.99),
        "relay_cpu_s": cpu1 - cpu0,
        "cpu_s_per_gb": (cpu1 - cpu0) / gb if gb > 0 else float("nan"),
    }


METRICS = [
    ("mbit_s", "Mbit/s", "{:.0f}"),
    ("kpps", "kpkt/s", "{:.1f}"),
    ("loss_pct", "loss %", "{:.2f}"),
    ("ping_p50_ms", "ping p50 ms", "{:.2f}"),
    ("ping_p99_ms", "ping p99 ms", "{:.1f}"),
    ("oneway_p99_ms", "1-way p99 ms", "{:.1f}"),
    ("cpu_s_per_gb", "CPU s/GB", "{:.1f}"),
]


def _table(configs: list[BenchConfig], runs: list[dict[str, Any]]) -> str:
    header = ["config"] + [label for _, label, _ in METRICS]
    rows = [header]
    for cfg in configs:
        mine = [r for r in runs if r["config"] == cfg.name]
        row = [f"{cfg.name} (n={len(mine)})"]
        for key, _, fmt in METRICS:
            values = [r[key] for r in mine if r[key] == r[key]]  # drop NaN
            row.append(summarize(values).format(fmt) if values else "-")
        rows.append(row)
    return "\n".join(table(rows))


def _chart(configs: list[BenchConfig], runs: list[dict[str, Any]], path: str) -> str:
    plt = pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    panels = [("mbit_s", "received Mbit/s"), ("ping_p99_ms", "ping p99 under load (ms)"),
              ("cpu_s_per_gb", "relay CPU seconds per GB")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5))
    names = [c.name for c in configs]
    for ax, (key, title) in zip(axes, panels, strict=True):
        meds, errs_lo, errs_hi = [], [], []
        for cfg in configs:
            values = [r[key] for r in runs if r["config"] == cfg.name and r[key] == r[key]]
            s = summarize(values) if values else None
            meds.append(s.median if s else 0.0)
            errs_lo.append(s.median - s.lo if s else 0.0)
            errs_hi.append(s.hi - s.median if s else 0.0)
        ax.bar(range(len(names)), meds, yerr=[errs_lo, errs_hi], capsize=4,
               color=["#4c72b0" if "1w" in n else "#dd8452" for n in names])
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title)
    save_figure(fig, "turbowg DERP relay (median, 95% CI)", path, dpi=110)
    return f"chart written to {path}"


async def _bench(args: argparse.Namespace) -> int:
    configs = [BenchConfig(w, tls, paced) for paced in (False, True) for tls in (False, True) for w in args.workers]
    runs: list[dict[str, Any]] = []
    total = len(configs) * args.runs
    with tempfile.TemporaryDirectory(prefix="turbowg-bench-relay-") as tmpdir:
        tmp = Path(tmpdir)
        _make_tls_files(tmp, "localhost")
        n = 0
        for rep in range(args.runs):
            for cfg in configs:  # interleaved: every configuration once per repetition
                n += 1
                print(f"[{n}/{total}] {cfg.name}, run {rep + 1}/{args.runs} ...", file=sys.stderr, flush=True)
                try:
                    result = await _one_run(cfg, args, tmp)
                except (RuntimeError, OSError, TimeoutError, json.JSONDecodeError) as exc:
                    print(f"    run failed: {exc}", file=sys.stderr, flush=True)
                    continue
                result["repetition"] = rep
                runs.append(result)
                print(f"    {result['mbit_s']:.0f} Mbit/s, loss {result['loss_pct']:.2f}%, "
                      f"ping p99 {result['ping_p99_ms']:.1f} ms, {result['cpu_s_per_gb']:.1f} CPU s/GB",
                      file=sys.stderr, flush=True)
    meta = {
        "command": " ".join(["turbowg", "bench", "relay"] + sys.argv[3:]) if len(sys.argv) > 2 else "",
        "pairs": args.pairs, "size": args.size, "duration_s": args.duration, "runs": args.runs,
        "paced_total_mbit": args.rate_mbit, "gen_procs": args.gen_procs, "cpus": os.cpu_count(),
        "kernel": os.uname().release, "python": sys.version.split()[0],
    }
    print()
    print(f"DERP relay benchmark: {args.pairs} sender->receiver pairs, {args.size}-byte packets, "
          f"{args.duration:g} s per run, {args.runs} interleaved runs per configuration; paced = "
          f"{args.rate_mbit:g} Mbit/s total. Median [95% CI].")
    print(_table(configs, runs))
    print(f"\nLoad generators ({args.gen_procs} processes) share the machine's {os.cpu_count()} CPUs with the "
          "relay; CPU s/GB counts the relay processes only.")
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "runs": runs}, f, indent=1)
    print(f"raw runs written to {args.json}")
    if args.png:
        print(_chart(configs, runs, args.png))
    return 0 if runs else 1


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


def _worker_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated worker counts, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("worker counts must be >= 1")
    return values


def run_relay_bench(args: argparse.Namespace) -> int:
    sizes = args.sizes if args.sweep else [args.size]
    if any(size < 16 or size > 65536 for size in sizes):
        print("turbowg bench relay: --size/--sizes must be between 16 and 65536", file=sys.stderr)
        return 2
    if args.sweep and args.ladder_ratio <= 1.0:
        print("turbowg bench relay: --ladder-ratio must be > 1", file=sys.stderr)
        return 2
    if args.sweep and args.pin and (os.cpu_count() or 1) < 2:
        print("turbowg bench relay: --pin needs at least 2 CPUs", file=sys.stderr)
        return 2
    if args.sweep:
        from turbowg.bench.relay_sweep import run_sweep

        args.runs = args.runs or 3
        args.json = args.json or "bench-relay-sweep.json"
        args.png = "bench-relay-sweep.png" if args.png is None else args.png
        main = run_sweep(args)
    else:
        args.runs = args.runs or 5
        args.json = args.json or "bench-relay.json"
        args.png = "bench-relay.png" if args.png is None else args.png
        main = _bench(args)
    try:
        return asyncio.run(main)
    except KeyboardInterrupt:
        return 130


def add_relay_bench(bench_subparsers: Any) -> None:
    p = bench_subparsers.add_parser(
        "relay", help="DERP relay: throughput, loss, latency under load, CPU per GB",
        description="Benchmark the turbowg DERP relay on loopback with its own load generator.",
    )
    p.add_argument("--duration", type=_positive_float, default=5.0, help="seconds per run (default 5)")
    p.add_argument("--runs", type=_positive_int, default=None,
                   help="runs (sweeps with --sweep) per configuration (default 5; with --sweep 3)")
    p.add_argument("--pairs", type=_positive_int, default=4, help="sender->receiver client pairs (default 4)")
    p.add_argument("--size", type=int, default=PACKET_SIZE, help=f"packet bytes (default {PACKET_SIZE})")
    p.add_argument("--workers", type=_worker_list, default=[1, 2], help="relay worker counts (default 1,2)")
    p.add_argument("--rate-mbit", type=_positive_float, default=200.0,
                   help="total offered load of the paced runs in Mbit/s (default 200)")
    p.add_argument("--gen-procs", type=_positive_int, default=2, help="load generator processes (default 2)")
    p.add_argument("--json", default=None, help="raw runs (default bench-relay.json; bench-relay-sweep.json)")
    p.add_argument("--png", default=None,
                   help="chart (default bench-relay.png; bench-relay-sweep.png; '' for none)")
    from turbowg.bench import relay_sweep as sw

    s = p.add_argument_group(
        "rate sweep (--sweep): the knee per relay path, worker count, pairs and size",
        "The default sweep takes ~15 minutes here; a quick look (~2-3 minutes): --sweep --runs 1 --steps 5 "
        "--step-seconds 0.6 --probe-seconds 0.5.")
    s.add_argument("--sweep", action="store_true",
                   help="paced offered load from low to past saturation; reports the knee (highest load carried "
                        f"with < {sw.LOSS_LIMIT_PCT:g}%% loss), ping RTT at half the knee and at it, CPU s/GB")
    s.add_argument("--steps", type=_positive_int, default=sw.DEFAULT_STEPS,
                   help=f"offered rates per sweep (default {sw.DEFAULT_STEPS}; it stops two lossy steps past the knee)")
    s.add_argument("--step-seconds", type=_positive_float, default=sw.DEFAULT_STEP_SECONDS,
                   help=f"seconds per offered rate (default {sw.DEFAULT_STEP_SECONDS:g})")
    s.add_argument("--probe-seconds", type=_positive_float, default=sw.PROBE_SECONDS,
                   help=f"unpaced probe that places the ladder, and the generator calibration (default {sw.PROBE_SECONDS:g})")
    s.add_argument("--ladder-ratio", type=_positive_float, default=sw.LADDER_RATIO,
                   help=f"ratio between offered rates (default 2^(1/4) = {sw.LADDER_RATIO:.3f})")
    s.add_argument("--sizes", type=sw.positive_list(int), default=[1400, 64], help="packet sizes (default 1400,64)")
    s.add_argument("--pair-counts", type=sw.positive_list(int), default=[10, 2], help="pair counts (default 10,2)")
    s.add_argument("--paths", type=sw.path_list, default=["c", "py"],
                   help="relay paths: c (as shipped), py (TURBOWG_NO_C=1) (default c,py)")
    s.add_argument("--no-tls", dest="tls_rows", action="store_false",
                   help="skip the TLS rows (C path, largest size and pair count, each worker count)")
    s.add_argument("--pin", action="store_true",
                   help="also C-path 1-worker rows with the relay on CPU 0 (sched_setaffinity, as taskset -c 0) "
                        "and the generators and pinger on CPU 1: the per-core knee")
    s.add_argument("--ping-interval", type=_positive_float, default=0.005,
                   help="seconds between DERP pings of the latency client (default 0.005)")
    p.set_defaults(func=run_relay_bench)


def register(subparsers: Any) -> None:
    """`turbowg bench relay` when a caller has a bench subparser group (same as add_relay_bench)."""
    add_relay_bench(subparsers)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--loadgen":
        sys.exit(_loadgen_entry(sys.argv[2]))
    print("usage: turbowg bench relay [options]  (this module's own entry is for load generators)", file=sys.stderr)
    sys.exit(2)
