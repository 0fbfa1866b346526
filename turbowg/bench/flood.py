"""`turbowg bench flood`: goodput of an established tunnel while its responder is flooded with handshakes.

Topology: namespaces a and b joined by veth, one tunnel per implementation over it (turbowgd on both
ends, wireguard-go on both ends: the same topology as `bench tunnel`), plus a third namespace f (the
flooder) joined to b by a second veth. f's interface holds 64 addresses (10.203.0.1-64/24; b's side is
10.203.0.254) and the flooder (flooder.py) sends from them x 8 source ports: initiations with a valid
mac1 for the responder's (b's) public key and random content, paced at each `--rates` value (initiations/s;
`max` = as fast as one sendmmsg loop goes). The responder's cookie replies come back to those addresses.

For each repetition, implementation (order rotated per repetition) and flood rate (`none` first):
one iperf3 TCP stream a -> b through the tunnel for `--duration` seconds (the flood starts 0.5 s before
and ends after it), and concurrently a ping a -> b through the tunnel every 20 ms (so the RTT is under
the TCP load as well as the flood). Measured:

- goodput (iperf3 receiver side) and the fraction kept = goodput under flood / goodput without flood in
  the same repetition;
- ping RTT p50/p99 (ms) and ping loss;
- the flood really sent (flooder's count) and delivered (packets received by b's veth from f);
- the responder's CPU (utime+stime of the daemon and its children from /proc/PID/stat, % of one core);
- the flooder's own CPU (% of one core, its report): it shares the 2 cores with the tunnel, and the kernel's
  delivery of the flood into the responder's namespace is mostly charged to it;
- cookie replies: UDP datagrams arriving in f (/proc/net/snmp there: nothing else sends to f);
- kernel drops: UDP receive-buffer overflows in b (RcvbufErrors: the daemon did not read in time);
- daemon drops: turbowgd's own counters of handshake messages it dropped (queue full, rate limited,
  bad mac1...), read over UAPI (`stats=1`); `-` for wireguard-go, which exposes none.

Median and 95% CI over the repetitions (turbowg/bench/stats.py), a table, JSON and a PNG.

Why one file (~560 lines): one benchmark; the flooder's namespace, the measured run, the row it reduces to
and its table/chart share the snapshot and row records (the flooder process itself is bench/flooder.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from turbowg.bench.cli import add_bench, bench_command, standalone_main
from turbowg.bench.report import NO_MATPLOTLIB, pyplot, save_figure, table
from turbowg.bench.stats import median_ci_with_coverage
from turbowg.testing.cpu import process_tree_cpu_seconds
from turbowg.testing.netns import HarnessError, check_prerequisites, delete_namespace, run
from turbowg.testing.tunnel import Implementation, Topology, build_topology, known_implementations

IMPLS = ("turbowg", "wireguard-go")
# Extra variants for A/B runs: turbowgd with handshakes served in its event loop (no worker process); with
# the worker fed through the data path (no handshake socket: the socketpair hand-off); with the worker at
# SCHED_IDLE (only CPU nobody else wants); at SCHED_BATCH (no wakeup preemption of the data path);
# without the worker's C batch screener (each flood message made into Python objects, then checked); with the
# classic BPF steering program (no per-source limit in the kernel: every flood datagram is read and screened).
VARIANTS = {"turbowg-inloop": ("turbowg", {"TURBOWG_HANDSHAKE_WORKER": "0"}),
            "turbowg-nosteer": ("turbowg", {"TURBOWG_HANDSHAKE_STEERING": "0"}),
            "turbowg-idle": ("turbowg", {"TURBOWG_HANDSHAKE_WORKER_SCHED": "idle"}),
            "turbowg-batch": ("turbowg", {"TURBOWG_HANDSHAKE_WORKER_SCHED": "batch"}),
            "turbowg-noscreen": ("turbowg", {"TURBOWG_HANDSHAKE_WORKER_SCREEN": "0"}),
            "turbowg-closedport": ("turbowg", {}),
            "turbowg-cbpf": ("turbowg", {"TURBOWG_HANDSHAKE_EBPF": "0"})}
# Control: the same flood sent to a port nobody listens on in the responder's namespace (the kernel drops it
# and answers ICMP, rate-limited): what the flood costs the machine (flooder, softirq) without any daemon
# work, to compare the other rows' "kept" with.
CONTROL_FLOOD_PORT = {"turbowg-closedport": 9}
DEFAULT_RATES = ("20000", "40000", "max")
# How the flooder sends (TURBOWG_BENCH_FLOODER): "packet" = prebuilt Ethernet frames on AF_PACKET with qdisc
# bypass (the responder gets the same datagrams; the flooder, whose CPU a real attacker spends elsewhere,
# costs this shared machine ~20-30% less per packet: tests/test_bench_flood.py, README), "raw" = IP_HDRINCL.
FLOODER_MODE = "raw" if os.environ.get("TURBOWG_BENCH_FLOODER", "packet").strip().lower() == "raw" else "packet"
NO_FLOOD = "none"
IPERF_PORT = 5211
FLOOD_NET = "10.203.0"
FLOOD_SOURCES = 64
FLOOD_PORTS = 8
FLOOD_LEAD = 0.5  # seconds of flood before the measurement starts (under-load state reached)
PING_INTERVAL = 0.02
UAPI_DIR = "/var/run/wireguard"
# turbowgd counters that count a handshake message it dropped without answering it.
DAEMON_DROP_COUNTERS = ("rx_handshake_queue_full", "rx_handshake_ratelimited", "rx_bad_mac1",
                        "rx_initiation_rejected", "rx_handshake_bad_size", "tx_cookie_reply_ratelimited",
                        "rx_handshake_kernel_ratelimited")


class RunFailed(Exception):
    pass


# ---------------------------------------------------------------- the flooder's namespace


@dataclass
class FloodSide:
    ns: str  # the flooder's namespace
    veth_f: str  # its interface
    veth_b: str  # the other end, in the responder's namespace
    target: str  # the responder's address on that link
    sources: list[str]


@contextlib.contextmanager
def flooder_namespace(ns_b: str, *, sources: int = FLOOD_SOURCES, tag: str | None = None) -> Iterator[FloodSide]:
    """Namespace f joined to `ns_b` by veth; f holds `sources` addresses FLOOD_NET.1.., b FLOOD_NET.254.
    Deleted on exit (with whatever runs in it), also when set-up or the body raises."""
    tag = tag or uuid.uuid4().hex[:6]
    ns, veth_f, veth_b = f"twflood-{tag}", f"twff{tag}", f"twfb{tag}"
    created = False
    try:
        run("ip", "netns", "add", ns)
        created = True
        run("ip", "link", "add", veth_f, "netns", ns, "type", "veth", "peer", "name", veth_b, "netns", ns_b)
        addresses = [f"{FLOOD_NET}.{i}" for i in range(1, sources + 1)]
        batch = "".join(f"addr add {a}/24 dev {veth_f}\n" for a in addresses)
        run("ip", "-n", ns, "-batch", "-", input=batch)
        run("ip", "-n", ns, "link", "set", "lo", "up")
        run("ip", "-n", ns, "link", "set", veth_f, "up")
        run("ip", "-n", ns_b, "addr", "add", f"{FLOOD_NET}.254/24", "dev", veth_b)
        run("ip", "-n", ns_b, "link", "set", veth_b, "up")
        yield FloodSide(ns, veth_f, veth_b, f"{FLOOD_NET}.254", addresses)
    finally:
        if created:
            delete_namespace(ns)  # takes the veth pair with it


# ---------------------------------------------------------------- counters


def _snmp_udp(ns: str) -> dict[str, int]:
    text = run("ip", "netns", "exec", ns, "cat", "/proc/net/snmp", timeout=10).stdout
    lines = [line.split() for line in text.splitlines() if line.startswith("Udp:")]
    if len(lines) < 2:
        return {}
    return {k: int(v) for k, v in zip(lines[0][1:], lines[1][1:], strict=False)}


def _link_rx_packets(ns: str, dev: str) -> int:
    out = run("ip", "-j", "-s", "-n", ns, "link", "show", dev, timeout=10).stdout
    info = json.loads(out)[0]
    return int(info["stats64"]["rx"]["packets"])


def uapi_stats(ifname: str, timeout: float = 2.0) -> dict[str, int] | None:
    """turbowgd's counters (`stats=1` on the UAPI socket); None when the daemon does not answer it."""
    path = os.path.join(UAPI_DIR, f"{ifname}.sock")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(b"stats=1\n\n")
            data = b""
            deadline = time.monotonic() + timeout
            while b"errno=" not in data and time.monotonic() < deadline and len(data) < 1 << 20:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    counters: dict[str, int] = {}
    for line in data.decode(errors="replace").splitlines():
        key, _, value = line.partition("=")
        if key == "errno":
            return counters if value.strip() == "0" else None
        with contextlib.suppress(ValueError):
            counters[key] = int(value)
    return None


@dataclass
class Snapshot:
    time: float
    cpu: float
    udp_b: dict[str, int]
    udp_f: dict[str, int]
    flood_rx: int
    daemon: dict[str, int] | None


def _snapshot(topo: Topology, side: FloodSide, pid: int, ifname: str) -> Snapshot:
    return Snapshot(time.monotonic(), process_tree_cpu_seconds([pid]), _snmp_udp(topo.ns_b), _snmp_udp(side.ns),
                    _link_rx_packets(topo.ns_b, side.veth_b), uapi_stats(ifname))


# ---------------------------------------------------------------- one run


@dataclass
class FloodRun:
    impl: str
    rate: str  # "none", an integer rate, or "max"
    rep: int
    ok: bool = False
    gbps: float = 0.0
    kept: float | None = None  # gbps / gbps without flood in the same repetition
    rtt_p50_ms: float | None = None
    rtt_p99_ms: float | None = None
    ping_loss_percent: float | None = None
    flood_sent: int = 0
    flood_rate: float = 0.0  # what the flooder really sent per second
    flood_delivered_rate: float = 0.0  # packets/s b received from f
    responder_cpu_percent: float | None = None
    flooder_cpu_percent: float | None = None
    cookie_replies_per_s: float | None = None
    kernel_drops_per_s: float | None = None
    daemon_drops_per_s: float | None = None
    daemon_counters: dict[str, int] = field(default_factory=dict)
    error: str = ""


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(round(q * (len(ordered) - 1)))))]


def _stop(proc: subprocess.Popen[str], timeout: float = 5.0) -> tuple[str, str]:
    if proc.poll() is None:
        proc.kill()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        return "", ""
    return out or "", err or ""


def _wait_listening(topo: Topology, port: int, proc: subprocess.Popen[str], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(200):
        if proc.poll() is not None:
            raise RunFailed("iperf3 server exited early")
        if topo.run(topo.ns_b, "ss", "-Hltn", f"sport = :{port}", check=False, timeout=5).stdout.strip():
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise RunFailed(f"iperf3 server did not listen on port {port}")


@dataclass
class Responder:
    ifname: str
    pid: int
    port: int
    public_key: str
    server_v4: str


def responder_of(topo: Topology, impl: str) -> Responder:
    path = topo.paths[impl]
    ifname = path.ifname_b
    port = int(topo.run(topo.ns_b, "wg", "show", ifname, "listen-port").stdout.strip())
    public = topo.run(topo.ns_b, "wg", "show", ifname, "public-key").stdout.strip()
    return Responder(ifname, path.daemon_pids[-1], port, public, path.server_v4)


def run_one(topo: Topology, side: FloodSide, impl: str, rate: str, rep: int, duration: float) -> FloodRun:
    result = FloodRun(impl, rate, rep)
    resp = responder_of(topo, impl)
    with contextlib.ExitStack() as stack:
        server = subprocess.Popen(topo.exec_args(topo.ns_b, "iperf3", "-s", "-1", "-p", str(IPERF_PORT)),
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True)
        stack.callback(_stop, server)
        flooder = None
        try:
            _wait_listening(topo, IPERF_PORT, server)
            if rate != NO_FLOOD:
                flooder = subprocess.Popen(
                    topo.exec_args(side.ns, sys.executable, "-m", "turbowg.bench.flooder", "--dst", side.target,
                                   "--port", str(CONTROL_FLOOD_PORT.get(impl, resp.port)),
                                   "--public-key", resp.public_key,
                                   "--source-net", f"{FLOOD_NET}.0/24", "--sources", str(len(side.sources)),
                                   "--ports", str(FLOOD_PORTS), "--rate", "0" if rate == "max" else rate,
                                   "--duration", f"{duration + FLOOD_LEAD + 1.5:g}",
                                   *(("--interface", side.veth_f) if FLOODER_MODE == "packet" else ())),
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                stack.callback(_stop, flooder)
                time.sleep(FLOOD_LEAD)
                if flooder.poll() is not None:
                    raise RunFailed(f"flooder exited: {_stop(flooder)[1].strip()[-300:]}")
            before = _snapshot(topo, side, resp.pid, resp.ifname)
            count = max(1, int(duration / PING_INTERVAL))
            ping = subprocess.Popen(topo.exec_args(topo.ns_a, "ping", "-4", "-n", "-i", f"{PING_INTERVAL:g}",
                                                   "-c", str(count), "-W", "1", resp.server_v4),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
            stack.callback(_stop, ping)
            client = topo.run(topo.ns_a, "iperf3", "-c", resp.server_v4, "-p", str(IPERF_PORT),
                              "-t", f"{duration:g}", "-J", check=False, timeout=duration + 30)
            after = _snapshot(topo, side, resp.pid, resp.ifname)
            try:
                ping_out, _ = ping.communicate(timeout=duration + 10)
            except subprocess.TimeoutExpired:
                ping_out = _stop(ping)[0]
            flood_report: dict[str, Any] = {}
            if flooder is not None:
                try:
                    flood_out, flood_err = flooder.communicate(timeout=duration + 15)
                    flood_report = json.loads(flood_out)
                except (subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
                    raise RunFailed(f"flooder gave no report: {exc}") from exc
        except HarnessError as exc:
            result.error = str(exc)
            return result
        except RunFailed as exc:
            result.error = str(exc)
            return result
    try:
        report = json.loads(client.stdout)
        received = report["end"]["sum_received"]
        result.gbps = float(received["bits_per_second"]) / 1e9
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        result.error = f"iperf3 gave no result (exit {client.returncode}): {client.stderr.strip()[-300:]}"
        return result
    rtts = [float(m) for m in re.findall(r"time=([\d.]+) ms", ping_out)]
    result.rtt_p50_ms = _percentile(rtts, 0.50)
    result.rtt_p99_ms = _percentile(rtts, 0.99)
    result.ping_loss_percent = 100.0 * (count - len(rtts)) / count
    window = max(after.time - before.time, 1e-6)
    result.responder_cpu_percent = 100.0 * (after.cpu - before.cpu) / window
    result.flood_sent = int(flood_report.get("sent", 0))
    result.flood_rate = float(flood_report.get("rate", 0.0))
    if "cpu_percent" in flood_report:
        result.flooder_cpu_percent = float(flood_report["cpu_percent"])
    result.flood_delivered_rate = (after.flood_rx - before.flood_rx) / window

    def delta(a: dict[str, int], b: dict[str, int], *keys: str) -> int:
        return sum(b.get(k, 0) - a.get(k, 0) for k in keys)

    result.cookie_replies_per_s = delta(before.udp_f, after.udp_f, "InDatagrams", "NoPorts", "InErrors") / window
    result.kernel_drops_per_s = delta(before.udp_b, after.udp_b, "RcvbufErrors") / window
    if before.daemon is not None and after.daemon is not None:
        result.daemon_counters = {k: v - before.daemon.get(k, 0) for k, v in after.daemon.items()
                                  if v != before.daemon.get(k, 0)}
        result.daemon_drops_per_s = sum(result.daemon_counters.get(k, 0) for k in DAEMON_DROP_COUNTERS) / window
    result.ok = True
    return result


# ---------------------------------------------------------------- report


@dataclass
class Row:
    impl: str
    rate: str
    n_ok: int
    n_failed: int
    gbps: tuple[float, float, float] | None
    kept: tuple[float, float, float] | None
    rtt_p50_ms: float | None
    rtt_p99_ms: float | None
    flood_rate: float | None
    responder_cpu_percent: float | None
    flooder_cpu_percent: float | None
    cookie_replies_per_s: float | None
    kernel_drops_per_s: float | None
    daemon_drops_per_s: float | None
    coverage: float | None


def _med(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return median_ci_with_coverage(present)[0] if present else None


def summarize(runs: Sequence[FloodRun], impls: Sequence[str], rates: Sequence[str]) -> list[Row]:
    rows = []
    for impl in impls:
        for rate in (NO_FLOOD, *rates):
            ok = [r for r in runs if r.impl == impl and r.rate == rate and r.ok]
            failed = sum(1 for r in runs if r.impl == impl and r.rate == rate and not r.ok)
            gbps = kept = None
            coverage = None
            if ok:
                med, lo, hi, coverage = median_ci_with_coverage([r.gbps for r in ok])
                gbps = (med, lo, hi)
                fractions = [r.kept for r in ok if r.kept is not None]
                if fractions:
                    kept = median_ci_with_coverage(fractions)[:3]
            rows.append(Row(impl, rate, len(ok), failed, gbps, kept, _med([r.rtt_p50_ms for r in ok]),
                            _med([r.rtt_p99_ms for r in ok]),
                            _med([r.flood_rate for r in ok]) if rate != NO_FLOOD else None,
                            _med([r.responder_cpu_percent for r in ok]), _med([r.flooder_cpu_percent for r in ok]),
                            _med([r.cookie_replies_per_s for r in ok]),
                            _med([r.kernel_drops_per_s for r in ok]), _med([r.daemon_drops_per_s for r in ok]),
                            coverage))
    return rows


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def format_table(rows: Sequence[Row]) -> str:
    header = ("impl", "flood/s", "sent/s", "Gbit/s median [95% CI]", "kept % [95% CI]", "RTT p50/p99 ms",
              "resp CPU %", "flooder CPU %", "cookie/s", "kdrop/s", "ddrop/s", "runs")
    lines = [header]
    for row in rows:
        gbps = "-" if row.gbps is None else f"{row.gbps[0]:.2f} [{row.gbps[1]:.2f}, {row.gbps[2]:.2f}]"
        kept = "-" if row.kept is None or row.rate == NO_FLOOD else \
            f"{100 * row.kept[0]:.0f} [{100 * row.kept[1]:.0f}, {100 * row.kept[2]:.0f}]"
        rtt = f"{_f(row.rtt_p50_ms, '{:.2f}')}/{_f(row.rtt_p99_ms, '{:.1f}')}"
        runs = f"{row.n_ok}" + (f" ({row.n_failed} failed)" if row.n_failed else "")
        lines.append((row.impl, row.rate, _f(row.flood_rate, "{:.0f}"), gbps, kept, rtt,
                      _f(row.responder_cpu_percent, "{:.0f}"), _f(row.flooder_cpu_percent, "{:.0f}"),
                      _f(row.cookie_replies_per_s, "{:.0f}"),
                      _f(row.kernel_drops_per_s, "{:.0f}"), _f(row.daemon_drops_per_s, "{:.0f}"), runs))
    out = table(lines)
    short = [r.coverage for r in rows if r.coverage is not None and r.coverage < 0.95]
    if short:
        out.append(f"note: with fewer than 6 runs the interval is [min, max] (covers the median with probability "
                   f"{min(short):.0%}, not 95%)")
    out.append("kept = goodput under flood / without flood (same repetition); flooder CPU = the flooder "
               "process (same flooder for every implementation; turbowg-closedport = same flood to a closed "
               "port: the machine's own cost); cookie/s = UDP datagrams back at "
               "the flooder; kdrop/s = kernel receive-buffer drops at the responder; ddrop/s = handshake "
               "messages the daemon dropped (its own counters, with its eBPF program's drops in the kernel)")
    return "\n".join(out)


def write_chart(rows: Sequence[Row], impls: Sequence[str], rates: Sequence[str], filename: str) -> str | None:
    plt = pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    fig, (ax, rtt_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(1, len(impls))
    for index, impl in enumerate(impls):
        xs, heights, err_lo, err_hi, p99 = [], [], [], [], []
        for r_index, rate in enumerate(rates):
            row = next((r for r in rows if r.impl == impl and r.rate == rate), None)
            if row is None or row.kept is None:
                continue
            xs.append(r_index + (index - (len(impls) - 1) / 2) * width)
            heights.append(100 * row.kept[0])
            err_lo.append(100 * (row.kept[0] - row.kept[1]))
            err_hi.append(100 * (row.kept[2] - row.kept[0]))
            p99.append(row.rtt_p99_ms or 0.0)
        ax.bar(xs, heights, width, yerr=[err_lo, err_hi], capsize=3, label=impl)
        rtt_ax.bar(xs, p99, width, label=impl)
    for axis in (ax, rtt_ax):
        axis.set_xticks(range(len(rates)), [f"{r}/s" if r != "max" else "max" for r in rates])
        axis.set_xlabel("handshake initiations per second")
        axis.legend()
    ax.axhline(100, color="black", linewidth=0.8)
    ax.set_ylabel("goodput kept, % (median, 95% CI)")
    ax.set_title("TCP goodput under flood / without")
    rtt_ax.set_ylabel("ping RTT p99 through the tunnel, ms")
    rtt_ax.set_title("latency under flood (and TCP load)")
    save_figure(fig, "turbowg bench flood", filename)
    return None


# ---------------------------------------------------------------- command


def implementations() -> dict[str, Implementation]:
    known = known_implementations()
    for name, (base, env) in VARIANTS.items():
        known[name] = dataclasses.replace(known[base], name=name, env={**known[base].env, **env})
    return known


def run_bench(impls: Sequence[str], rates: Sequence[str], runs: int, duration: float, output_dir: str,
              log=print) -> int:
    check_prerequisites(("ip", "wg", "iperf3", "ss", "ping"))
    known = implementations()
    chosen = [known[i] for i in impls]
    if "wireguard-go" in impls:
        check_prerequisites(("wireguard-go",))
    os.makedirs(output_dir, exist_ok=True)
    results: list[FloodRun] = []
    started = time.time()
    interrupted = False
    log(f"building topology: {', '.join(impls)} + flooder namespace", file=sys.stderr)
    with build_topology(chosen) as topo, flooder_namespace(topo.ns_b) as side:
        schedule = [(rep, impl, rate) for rep in range(runs) for impl in _rotated(impls, rep)
                    for rate in (NO_FLOOD, *rates)]
        try:
            for count, (rep, impl, rate) in enumerate(schedule, 1):
                log(f"[run {count}/{len(schedule)}] {impl} flood={rate} (repetition {rep + 1}/{runs}) ...",
                    end=" ", flush=True, file=sys.stderr)
                result = run_one(topo, side, impl, rate, rep, duration)
                if rate != NO_FLOOD and result.ok:
                    base = next((r for r in results if r.impl == impl and r.rep == rep and r.rate == NO_FLOOD
                                 and r.ok and r.gbps > 0), None)
                    if base is not None:
                        result.kept = result.gbps / base.gbps
                results.append(result)
                log(f"{result.gbps:.2f} Gbit/s" + (f" ({100 * result.kept:.0f}% kept, flood {result.flood_rate:.0f}/s)"
                                                   if result.kept is not None else "")
                    if result.ok else f"FAILED: {result.error}", file=sys.stderr)
        except KeyboardInterrupt:
            interrupted = True
            log(f"\ninterrupted after {len(results)} of {len(schedule)} runs", file=sys.stderr)
    if not results:
        return 130 if interrupted else 1
    rows = summarize(results, impls, rates)
    log(format_table(rows))
    raw = {"meta": {"started": started, "interrupted": interrupted, "kernel": platform.release(),
                    "duration": duration, "runs": runs, "rates": list(rates), "impls": list(impls),
                    "flood_sources": FLOOD_SOURCES, "flood_ports": FLOOD_PORTS, "flooder_mode": FLOODER_MODE,
                    "commands": {i.name: {"command": list(i.command), "env": dict(i.env)} for i in chosen}},
           "runs": [asdict(r) for r in results], "summary": [asdict(r) for r in rows]}
    json_path = os.path.join(output_dir, "flood-runs.json")
    with open(json_path, "w") as f:
        json.dump(raw, f, indent=2)
    log(f"raw runs: {json_path}")
    note = write_chart(rows, impls, rates, os.path.join(output_dir, "flood.png"))
    log(note if note else f"chart: {os.path.join(output_dir, 'flood.png')}")
    if interrupted:
        return 130
    return 0 if all(r.ok for r in results) else 1


def _rotated(items: Sequence[str], rep: int) -> list[str]:
    shift = rep % len(items)
    return list(items[shift:]) + list(items[:shift])


def _split(values: Sequence[str] | None, default: Sequence[str]) -> list[str]:
    if not values:
        return list(default)
    out: list[str] = []
    for value in values:
        out += [v.strip() for v in value.split(",") if v.strip() and v.strip() not in out]
    return out


def _check_rates(rates: Sequence[str]) -> list[str]:
    for rate in rates:
        if rate != "max" and not (rate.isdigit() and 0 < int(rate) <= 10_000_000):
            raise ValueError(f"bad flood rate {rate!r}: a positive integer (initiations/s) or 'max'")
    return list(rates)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per run (default 5)")
    parser.add_argument("--runs", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--impl", action="append", metavar="IMPL",
                        help=f"implementations, repeatable or comma-separated: {', '.join((*IMPLS, *VARIANTS))} "
                             f"(default {', '.join(IMPLS)})")
    parser.add_argument("--rates", action="append", metavar="RATE",
                        help="flood rates in initiations/s or 'max', comma-separated (default 20000,40000,max)")
    parser.add_argument("--output-dir", default="bench-results", help="where JSON and PNG go (default ./bench-results)")
    parser.set_defaults(func=command)


@bench_command("flood", (ValueError, HarnessError, OSError))
def command(args: argparse.Namespace) -> int:
    impls = _split(args.impl, IMPLS)
    unknown = [i for i in impls if i not in implementations()]
    if unknown:
        raise ValueError(f"unknown implementation(s) {', '.join(unknown)}")
    rates = _check_rates(_split(args.rates, DEFAULT_RATES))
    if not 0 < args.duration <= 600 or not 1 <= args.runs <= 100:
        raise ValueError("--duration must be in (0, 600] and --runs in [1, 100]")
    return run_bench(impls, rates, args.runs, args.duration, args.output_dir)


def add_flood_bench(bench_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return add_bench(bench_subparsers, "flood",
                     "tunnel goodput while the responder is flooded with handshake initiations",
                     __doc__, add_arguments)


def main(argv: list[str] | None = None) -> int:
    return standalone_main("python -m turbowg.bench.flood", add_arguments, argv)


if __name__ == "__main__":
    sys.exit(main())
