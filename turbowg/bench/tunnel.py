"""`turbowg bench tunnel`: throughput through each WireGuard implementation in one topology, one run.

All tunnels (turbowg with offloads, turbowg without (TURBOWG_OFFLOADS=0), turbowg with offloads but without
its C accelerators (TURBOWG_NO_C=1, the pure-Python fallback), Debian wireguard-go) and the bare veth live in
the same two namespaces at once (see topology.py), and repetitions are interleaved: every repetition
runs every test on every path, with the path order rotated per repetition, so slow drift of the
machine (thermal, noisy neighbours) hits all implementations alike. Tests:

- tcp1 / tcp4: iperf3 TCP with 1 or 4 streams; goodput is the receiver side (end.sum_received).
- udp:         iperf3 -u -b 0 with 1392-byte payloads (fits the 1420 tunnel MTU over IPv4 without
               fragmenting); received rate and loss as the server saw them.
- udp-gso:     the QUIC-style load of turbowg.testing.udpgen (UDP_SEGMENT sends, UDP_GRO receive), unpaced:
               as fast as the sender can, which overruns the tunnel and loses most of it.
- udp-gso-paced: the same load paced in time, swept over offered rates from low to past saturation
               (doubling from SWEEP_START_MBIT, then two bisection steps); the figure is the highest
               rate delivered with less than 1% loss.
- rtt-idle / rtt-tcp / rtt-paced400 / rtt-paced100: round-trip times of ping (56-byte payload, one every
               RTT_INTERVAL, for the run's duration) from a to b through the path: idle, while one unpaced
               iperf3 TCP stream runs a -> b, and while one iperf3 TCP stream paced at 400 or 100 Mbit/s runs
               (100: a rate every path here carries, so the paths answer under the same load). Each run gives
               its p50/p99/p99.9; the table shows the median of those over the runs with its CI. Under load
               the Recv-Q of each daemon's UDP socket is sampled (`ss`, every RTT_QUEUE_SAMPLE s).

CPU cost is utime+stime of the daemon processes (both ends of the tunnel, children included) read
from /proc/<pid>/stat around each run, divided by the gigabytes received. The traffic ends report
their own CPU time (iperf3's cpu_utilization_percent, udpgen's os.times()), so the table can say which
process was CPU-bound: the busiest of daemon a (sending side), daemon b, sender and receiver, when it
used at least CPU_BOUND of a core.

Every path is labelled with its implementation's version (`wireguard-go --version`), and `--peer-bin
PATH` adds any other wireguard-go build (or compatible binary) as a path of its own.

Why one file (~980 lines): one benchmark; its runs, per-test parsers, the rows they reduce to and the
table/chart of those rows share the test list and the row records, and change together when a test is
added (charts are drawn through bench/report.py, statistics in bench/stats.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from turbowg.bench.cli import add_bench, bench_command, standalone_main
from turbowg.bench.report import NO_MATPLOTLIB, pyplot, save_figure, table
from turbowg.bench.stats import median_ci, median_ci_with_coverage
from turbowg.testing.cpu import alive as _alive
from turbowg.testing.cpu import process_tree_cpu_seconds
from turbowg.testing.netns import HarnessError, check_prerequisites
from turbowg.testing.tunnel import (
    UNDERLAY,
    Implementation,
    NetPath,
    Topology,
    Tunnel,
    TunnelSpec,
    build_topology,
    derp_spec,
    implementation_from_binary,
    known_implementations,
)

THROUGHPUT_TESTS = ("tcp1", "tcp4", "udp", "udp-gso", "udp-gso-paced")
# Round-trip time through the tunnel: idle, under one unpaced iperf3 TCP stream, under a paced one (400 Mbit/s).
RTT_TESTS = ("rtt-idle", "rtt-tcp", "rtt-paced400", "rtt-paced100")
TESTS = THROUGHPUT_TESTS + RTT_TESTS
PATHS = ("turbowg", "turbowg-nooffload", "turbowg-python", "wireguard-go", UNDERLAY)
# --path derp: turbowg over a local DERP relay (`turbowg relay -dev` in namespace b; UDP between the two tunnel
# ports dropped by nftables, so the relay is the only path, checked by `turbowg status` around every run),
# with its batch receive path and with the per-message one it replaced (TURBOWG_DERP_BATCH=0), beside the
# direct turbowg tunnel, which is their baseline.
DERP_PATHS = ("turbowg-derp", "turbowg-derp-perframe")
DERP_ENV = {"turbowg-derp": {}, "turbowg-derp-perframe": {"TURBOWG_DERP_BATCH": "0"}}
DERP_DEFAULT_PATHS = ("turbowg", *DERP_PATHS)
DERP_DEFAULT_TESTS = ("tcp1", "tcp4", "udp-gso-paced")
DERP_BASELINE = "turbowg"
BASELINE = "wireguard-go"
SWEEP_START_MBIT = 50.0
SWEEP_MAX_STEPS = 12  # doubling steps plus the bisection, whatever the rates
SWEEP_BISECTIONS = 2
LOSS_LIMIT = 1.0  # percent: a paced rate counts as delivered below this loss
SENDER_SHORT = 0.9  # a sender that reached less than this share of the offered rate was the limit
CPU_BOUND = 0.85  # share of one core at which a process counts as CPU-bound
UDPGEN = [sys.executable, "-m", "turbowg.testing.udpgen"]
UDP_PAYLOAD = 1420 - 28  # IPv4 + UDP headers inside the tunnel MTU: no fragmentation
UDP_PAYLOAD_V6 = 1420 - 48  # IPv6 + UDP headers
IPERF_PORT = 5201
UDPGEN_PORT = 5301


@dataclass
class RunResult:
    path: str
    test: str
    rep: int
    ok: bool
    gbps: float = 0.0
    bytes_received: int = 0
    loss_percent: float | None = None
    cpu_seconds: float | None = None
    cpu_seconds_per_gb: float | None = None
    error: str = ""
    # Share of one core each process used while traffic ran: "daemon a" (sending side), "daemon b",
    # "sender", "receiver" (for the paced sweep: at the first rate past the limit, where it saturates).
    cpu_share: dict[str, float] = field(default_factory=dict)
    detail: dict[str, Any] = field(default_factory=dict)


class RunFailed(Exception):
    pass


# ---------------------------------------------------------------- one run


def _wait_listening(topo: Topology, proto: str, port: int, proc: subprocess.Popen[str], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    flag = "-Hltn" if proto == "tcp" else "-Hlun"
    for _ in range(int(timeout / 0.05) + 10):
        if proc.poll() is not None:
            raise RunFailed(f"server exited early: {_read(proc)[1].strip()[-300:]}")
        result = topo.run(topo.ns_b, "ss", flag, f"sport = :{port}", check=False, timeout=5)
        if result.stdout.strip():
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    raise RunFailed(f"server did not listen on {proto} port {port} within {timeout} s")


def _read(proc: subprocess.Popen[str], timeout: float = 10.0) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=5)
    return out or "", err or ""


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=5)


def _payload(ipv6: bool) -> int:
    return UDP_PAYLOAD_V6 if ipv6 else UDP_PAYLOAD


@dataclass
class Measured:
    """What one traffic run gave: bytes and rate received, loss, the ends' CPU seconds, details."""

    nbytes: int
    bps: float
    loss: float | None
    sender_cpu: float | None
    receiver_cpu: float | None
    detail: dict[str, Any]


def _iperf3(topo: Topology, path: Tunnel | NetPath, test: str, duration: float, ipv6: bool) -> Measured:
    server = subprocess.Popen(topo.exec_args(topo.ns_b, "iperf3", "-s", "-1", "-p", str(IPERF_PORT)),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_listening(topo, "tcp", IPERF_PORT, server)
        args = ["iperf3", "-c", path.server_v6 if ipv6 else path.server_v4, "-p", str(IPERF_PORT),
                "-t", f"{duration:g}", "-J"]
        if test == "tcp4":
            args += ["-P", "4"]
        elif test == "udp":
            args += ["-u", "-b", "0", "-l", str(_payload(ipv6))]
        client = topo.run(topo.ns_a, *args, check=False, timeout=duration + 30)
    except HarnessError as exc:
        raise RunFailed(str(exc)) from exc
    finally:
        _stop(server)
    try:
        report = json.loads(client.stdout)
    except json.JSONDecodeError as exc:
        raise RunFailed(f"iperf3 gave no JSON (exit {client.returncode}): {client.stderr.strip()[-300:]}") from exc
    if "error" in report:
        raise RunFailed(f"iperf3: {report['error']}")
    received = report.get("end", {}).get("sum_received")
    if not received:
        raise RunFailed("iperf3 report has no end.sum_received")
    loss = float(received.get("lost_percent", 0.0)) if test == "udp" else None
    cpu = report["end"].get("cpu_utilization_percent") or {}
    seconds = float(received.get("seconds") or duration)
    # iperf3's client sends; host_total / remote_total are percent of one core over the test.
    sender = cpu.get("host_total")
    receiver = cpu.get("remote_total")
    return Measured(int(received["bytes"]), float(received["bits_per_second"]), loss,
                    None if sender is None else sender / 100 * seconds,
                    None if receiver is None else receiver / 100 * seconds,
                    {"seconds": received.get("seconds"), "cpu": cpu})


def _udpgen(topo: Topology, path: Tunnel | NetPath, duration: float, ipv6: bool,
            rate_mbit: float | None = None) -> Measured:
    ready = os.path.join(topo.workdir, f"udpgen-ready-{time.monotonic_ns()}")
    receiver = subprocess.Popen(
        topo.exec_args(topo.ns_b, *UDPGEN, "recv", "--port", str(UDPGEN_PORT),
                       "--timeout", f"{duration + 15:g}", "--ready-file", ready),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        for _ in range(1000):
            if os.path.exists(ready):
                break
            if receiver.poll() is not None or time.monotonic() > deadline:
                raise RunFailed(f"udpgen receiver did not start: {_read(receiver)[1].strip()[-300:]}")
            time.sleep(0.02)
        host = path.server_v6 if ipv6 else path.server_v4
        args = ["send", "--host", host, "--port", str(UDPGEN_PORT), "--duration", f"{duration:g}",
                "--size", str(_payload(ipv6))]
        if rate_mbit is not None:
            args += ["--rate-mbit", f"{rate_mbit:g}"]
        sender = topo.run(topo.ns_a, *UDPGEN, *args, check=False, timeout=duration + 30)
        out, err = _read(receiver, timeout=duration + 20)
    except HarnessError as exc:
        raise RunFailed(str(exc)) from exc
    finally:
        _stop(receiver)
    try:
        sent = json.loads(sender.stdout)
        got = json.loads(out)
    except json.JSONDecodeError as exc:
        raise RunFailed(f"udpgen gave no JSON: {sender.stderr.strip()[-200:]} {err.strip()[-200:]}") from exc
    loss = 100.0 * max(0, sent["datagrams"] - got["datagrams"]) / sent["datagrams"] if sent["datagrams"] else None
    return Measured(int(got["bytes"]), float(got["goodput_bps"]), loss, sent.get("cpu_seconds"),
                    got.get("cpu_seconds"), {"sender": sent, "receiver": got})


RTT_INTERVAL = 0.005  # seconds between pings (ping's -i; root may go this fast)
RTT_WARMUP = 1.0  # seconds of load before the first ping (TCP slow start)
RTT_QUEUE_SAMPLE = 0.1  # seconds between `ss` samples of the daemons' UDP Recv-Q under load
PACED_MBIT = {"rtt-paced400": 400, "rtt-paced100": 100}  # the paced RTT tests' TCP load
_PING_LINE = re.compile(r"icmp_seq=(\d+) .*time=([\d.]+) ms")


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank on the sorted values (no interpolation: a real sample)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("percentile of no values")
    rank = max(1, math.ceil(q * len(ordered) / 100 - 1e-9))  # 99.9% of 1000 is rank 999, not 1000
    return ordered[min(rank, len(ordered)) - 1]


def parse_ping(text: str) -> dict[int, float]:
    """icmp_seq -> RTT in ms from ping's per-reply lines (duplicates keep the first)."""
    out: dict[int, float] = {}
    for match in _PING_LINE.finditer(text):
        out.setdefault(int(match.group(1)), float(match.group(2)))
    return out


def _udp_recvq(topo: Topology, path: Tunnel | NetPath) -> list[tuple[str, str, int]]:
    """(namespace, side, port) of each daemon's UDP socket, whose Recv-Q is sampled under load."""
    if not isinstance(path, Tunnel):
        return []
    return [(side.ns, name, side.port) for name, side in (("a", path.a), ("b", path.b))]


def _sample_recvq(topo: Topology, sockets: list[tuple[str, str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for ns, name, port in sockets:
        res = topo.run(ns, "ss", "-Huan", f"sport = :{port}", check=False, timeout=5)
        total = 0
        for line in res.stdout.splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[1].isdigit():
                total += int(fields[1])
        out[f"daemon {name}"] = total
    return out


def _rtt(topo: Topology, path: Tunnel | NetPath, test: str, duration: float, ipv6: bool,
         interval: float = RTT_INTERVAL) -> Measured:
    """Ping through `path` for `duration` seconds, idle or under an iperf3 TCP load a -> b."""
    host = path.server_v6 if ipv6 else path.server_v4
    count = max(10, int(duration / interval))
    server = client = None
    load: dict[str, Any] = {}
    recvq: list[dict[str, int]] = []
    try:
        if test != "rtt-idle":
            server = subprocess.Popen(topo.exec_args(topo.ns_b, "iperf3", "-s", "-1", "-p", str(IPERF_PORT)),
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
            _wait_listening(topo, "tcp", IPERF_PORT, server)
            args = ["iperf3", "-c", host, "-p", str(IPERF_PORT), "-t", f"{duration + RTT_WARMUP + 1.5:g}", "-J"]
            if test in PACED_MBIT:
                args += ["-b", f"{PACED_MBIT[test]}M"]
            client = subprocess.Popen(topo.exec_args(topo.ns_a, *args), stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(RTT_WARMUP)
            if client.poll() is not None:
                raise RunFailed(f"iperf3 load exited early: {_read(client)[0][-300:]}")
        ping = subprocess.Popen(topo.exec_args(topo.ns_a, "ping", "-6" if ipv6 else "-4", "-n", "-i", f"{interval:g}",
                                               "-c", str(count), "-s", "56", "-W", "1", host),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        sockets = _udp_recvq(topo, path) if client is not None else []
        deadline = time.monotonic() + duration + 15
        while ping.poll() is None and time.monotonic() < deadline:
            if sockets:
                recvq.append(_sample_recvq(topo, sockets))
            time.sleep(RTT_QUEUE_SAMPLE)
        out, err = _read(ping, timeout=5)
        if client is not None:
            report_text, client_err = _read(client, timeout=duration + 30)
            try:
                report = json.loads(report_text)
                received = report["end"]["sum_received"]
                load = {"bits_per_second": float(received["bits_per_second"]), "bytes": int(received["bytes"])}
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise RunFailed(f"iperf3 load gave no report: {client_err.strip()[-300:]}") from exc
    except HarnessError as exc:
        raise RunFailed(str(exc)) from exc
    finally:
        for proc in (client, server):
            if proc is not None:
                _stop(proc)
    rtts = parse_ping(out)
    if len(rtts) < max(3, count // 2):
        raise RunFailed(f"ping: {len(rtts)} of {count} replies: {err.strip()[-300:]}")
    values = list(rtts.values())
    detail: dict[str, Any] = {
        "pings": count, "replies": len(rtts), "interval": interval,
        "rtt_ms": {"p50": percentile(values, 50), "p99": percentile(values, 99), "p99.9": percentile(values, 99.9),
                   "min": min(values), "max": max(values)},
        "load": load,
    }
    if recvq:
        names = sorted({name for sample in recvq for name in sample})
        detail["udp_recvq_bytes"] = {
            name: {"median": percentile([s[name] for s in recvq if name in s], 50),
                   "max": max(s[name] for s in recvq if name in s), "samples": len(recvq)} for name in names}
    loss = 100.0 * (count - len(rtts)) / count
    nbytes = load.get("bytes", 0)
    return Measured(nbytes, load.get("bits_per_second", 0.0), loss, None, None, detail)


def sweep_rates(measure, start_mbit: float = SWEEP_START_MBIT, max_steps: int = SWEEP_MAX_STEPS,
                bisections: int = SWEEP_BISECTIONS) -> tuple[dict[str, Any] | None, dict[str, Any] | None, list]:
    """Offer rates from `start_mbit` up, doubling, until one loses >= LOSS_LIMIT % (or the sender, short of
    the offer, sent no more than at the step before: nothing faster can be offered), then bisect between
    the last good and the first bad.

    `measure(rate_mbit)` returns (loss_percent, sent_bps, step_record). Returns (best good step, first bad
    step, all steps); a step is the record plus "rate_mbit", "loss_percent", "ok", "sender_short".
    """
    steps: list[dict[str, Any]] = []

    def step(rate: float) -> dict[str, Any]:
        loss, sent_bps, record = measure(rate)
        short = sent_bps < SENDER_SHORT * rate * 1e6
        entry = {**record, "rate_mbit": rate, "loss_percent": loss, "sender_short": short, "sent_bps": sent_bps,
                 "ok": loss is not None and loss < LOSS_LIMIT}
        steps.append(entry)
        return entry

    good: dict[str, Any] | None = None
    bad: dict[str, Any] | None = None
    rate = start_mbit
    while len(steps) < max_steps:
        entry = step(rate)
        if not entry["ok"]:
            bad = entry
            break
        previous = good
        good = entry
        if entry["sender_short"] and previous is not None and entry["sent_bps"] < 1.1 * previous["sent_bps"]:
            break  # the sender is the limit: a higher offered rate would not be sent either
        rate *= 2
    for _ in range(bisections):
        if bad is None or len(steps) >= max_steps:
            break
        low = good["rate_mbit"] if good else 0.0
        entry = step((low + bad["rate_mbit"]) / 2)
        if entry["ok"]:
            good = entry
        else:
            bad = entry
    return good, bad, steps


def _cpu_by_process(path: Tunnel | NetPath) -> dict[str, float]:
    pids = list(path.daemon_pids)
    return {f"daemon {side}": process_tree_cpu_seconds([pid]) for side, pid in zip("ab", pids, strict=False)}


def _shares(before: dict[str, float], after: dict[str, float], measured: Measured, seconds: float) -> dict[str, float]:
    shares = {name: (after[name] - before[name]) / seconds for name in after if name in before}
    if measured.sender_cpu is not None:
        shares["sender"] = measured.sender_cpu / seconds
    if measured.receiver_cpu is not None:
        shares["receiver"] = measured.receiver_cpu / seconds
    return {name: round(value, 3) for name, value in shares.items()}


def _tunnel_rx(topo: Topology, path: Tunnel | NetPath) -> int | None:
    """Bytes the server side of a tunnel has received from its peer (the daemon's own counter)."""
    if not isinstance(path, Tunnel):
        return None
    out = topo.run(path.b.ns, "wg", "show", path.ifname_b, "transfer", check=False, timeout=10).stdout.split()
    return int(out[1]) if len(out) >= 3 else None


def _derp_status(path: Tunnel) -> list[dict[str, Any]]:
    """Each side's `turbowg status --json` view of its (only) peer; RunFailed unless the path is the relay."""
    from turbowg.daemon.status import StatusError, fetch

    out = []
    for side in (path.a, path.b):
        try:
            peers = fetch(side.ifname)["peers"]
        except StatusError as exc:
            raise RunFailed(f"turbowg status {side.ifname}: {exc}") from exc
        if len(peers) != 1 or peers[0]["path"] != "derp":
            raise RunFailed(f"{side.ifname}: path is {[p['path'] for p in peers]}, not the relay")
        out.append(peers[0])
    return out


def _check_derp_carried(before: list[dict[str, Any]], after: list[dict[str, Any]], measured: Measured,
                        test: str) -> dict[str, Any]:
    """The receiving side's relay counters must account for what was received (payload <= WireGuard bytes)."""
    rx = after[1]["traffic"]["derp"]["rx_bytes"] - before[1]["traffic"]["derp"]["rx_bytes"]
    direct = sum(a["traffic"]["direct"]["rx_bytes"] - b["traffic"]["direct"]["rx_bytes"]
                 for a, b in zip(after, before, strict=True))
    if test not in RTT_TESTS and measured.nbytes and rx < 0.9 * measured.nbytes:
        raise RunFailed(f"the relay carried {rx} bytes to the receiver, the test received {measured.nbytes}")
    return {"derp_rx_bytes": rx, "direct_rx_bytes": direct}


def run_one(topo: Topology, path_name: str, test: str, rep: int, duration: float, ipv6: bool = False,
            sweep_step: float = 1.0) -> RunResult:
    path = topo.paths[path_name]
    result = RunResult(path_name, test, rep, ok=False)
    dead = [pid for pid in path.daemon_pids if not _alive(pid)]
    if dead:
        result.error = f"daemon process(es) {dead} exited"
        return result
    cpu_before = process_tree_cpu_seconds(path.daemon_pids) if path.daemon_pids else None
    rx_before = _tunnel_rx(topo, path)
    derp = isinstance(path, Tunnel) and path.derp
    try:
        derp_before = _derp_status(path) if derp else None  # type: ignore[arg-type]
        if test == "udp-gso-paced":
            measured, shares = _paced_sweep(topo, path, sweep_step, ipv6)
        else:
            before = _cpu_by_process(path)
            if test in RTT_TESTS:
                measured = _rtt(topo, path, test, duration, ipv6)
            elif test == "udp-gso":
                measured = _udpgen(topo, path, duration, ipv6)
            else:
                measured = _iperf3(topo, path, test, duration, ipv6)
            shares = _shares(before, _cpu_by_process(path), measured, duration)
        if derp_before is not None:
            derp_detail = _check_derp_carried(derp_before, _derp_status(path), measured, test)  # type: ignore[arg-type]
    except (RunFailed, subprocess.TimeoutExpired, KeyError, TypeError, ValueError) as exc:
        result.error = str(exc) or type(exc).__name__
        return result
    rx_after = _tunnel_rx(topo, path)
    result.ok = True
    result.bytes_received = measured.nbytes
    result.gbps = measured.bps / 1e9
    result.loss_percent = measured.loss
    result.cpu_share = shares
    result.detail = measured.detail
    if derp_before is not None:
        result.detail["derp"] = derp_detail
    if rx_before is not None and rx_after is not None:
        # What the tunnel's receiving daemon itself counted: proof that this path carried the traffic.
        result.detail["tunnel_rx_bytes"] = rx_after - rx_before
    if cpu_before is not None:
        result.cpu_seconds = process_tree_cpu_seconds(path.daemon_pids) - cpu_before
        if measured.nbytes > 0:
            result.cpu_seconds_per_gb = result.cpu_seconds / (measured.nbytes / 1e9)
    return result


def _paced_sweep(topo: Topology, path: Tunnel | NetPath, step_seconds: float,
                 ipv6: bool) -> tuple[Measured, dict[str, float]]:
    def measure(rate: float) -> tuple[float | None, float, dict[str, Any]]:
        before = _cpu_by_process(path)
        m = _udpgen(topo, path, step_seconds, ipv6, rate_mbit=rate)
        shares = _shares(before, _cpu_by_process(path), m, step_seconds)
        sent = m.detail["sender"]
        return m.loss, float(sent["sent_bps"]), {
            "measured": m, "received_gbps": m.bps / 1e9, "sent_gbps": sent["sent_bps"] / 1e9,
            "bytes_received": m.nbytes, "cpu_share": shares}

    good, bad, steps = sweep_rates(measure)
    if good is None:
        raise RunFailed(f"no paced rate delivered with < {LOSS_LIMIT:g}% loss (from {SWEEP_START_MBIT:g} Mbit/s: "
                        f"{steps[0]['loss_percent']}% lost)")
    # Which process limits: look where the tunnel saturates (the first bad step), else at the best one.
    limit = bad if bad is not None else good
    record = [{k: v for k, v in s.items() if k != "measured"} for s in steps]
    best: Measured = good["measured"]
    detail = {"paced": True, "best_rate_mbit": good["rate_mbit"],
              "first_lossy_rate_mbit": bad["rate_mbit"] if bad else None,
              "limited_by_sender": bad is None and good["sender_short"], "steps": record,
              "sender": best.detail["sender"], "receiver": best.detail["receiver"]}
    return Measured(best.nbytes, best.bps, best.loss, None, None, detail), limit["cpu_share"]


# ---------------------------------------------------------------- report


@dataclass
class Row:
    path: str
    test: str
    n_ok: int
    n_failed: int
    median_gbps: float | None
    lo_gbps: float | None
    hi_gbps: float | None
    ratio_to_baseline: float | None
    cpu_seconds_per_gb: float | None
    loss_percent: float | None
    coverage: float | None = None  # what [lo, hi] really covers: below 0.95 when there are fewer than 6 runs
    label: str = ""  # the path with its version, as the table shows it
    cpu_bound: str | None = None  # "daemon b 98%": the busiest process if it used >= CPU_BOUND of a core
    cpu_share: dict[str, float] = field(default_factory=dict)  # median share of a core per process


def _median(values: Sequence[float]) -> float | None:
    return median_ci(values)[0] if values else None


def cpu_bound(shares: dict[str, float]) -> str | None:
    """"daemon b 98%" if the busiest process used at least CPU_BOUND of one core, else "none (daemon b 60%)"."""
    if not shares:
        return None
    name, share = max(shares.items(), key=lambda item: item[1])
    return f"{name} {share:.0%}" if share >= CPU_BOUND else f"none ({name} {share:.0%})"


def summarize_runs(runs: Sequence[RunResult], paths: Sequence[str], tests: Sequence[str],
                   labels: dict[str, str] | None = None, baseline: str | None = BASELINE) -> list[Row]:
    labels = labels or {}
    rows: list[Row] = []
    for test in tests:
        medians: dict[str, float | None] = {}
        for path in paths:
            ok = [r for r in runs if r.path == path and r.test == test and r.ok]
            failed = sum(1 for r in runs if r.path == path and r.test == test and not r.ok)
            med = lo = hi = coverage = None
            if ok:
                med, lo, hi, coverage = median_ci_with_coverage([r.gbps for r in ok])
            medians[path] = med
            names = sorted({name for r in ok for name in r.cpu_share})
            shares = {name: _median([r.cpu_share[name] for r in ok if name in r.cpu_share]) for name in names}
            shares = {name: value for name, value in shares.items() if value is not None}
            rows.append(Row(path, test, len(ok), failed, med, lo, hi, None,
                            _median([r.cpu_seconds_per_gb for r in ok if r.cpu_seconds_per_gb is not None]),
                            _median([r.loss_percent for r in ok if r.loss_percent is not None]), coverage,
                            labels.get(path, path), cpu_bound(shares), shares))
            if ok and all(r.detail.get("limited_by_sender") for r in ok):
                rows[-1].cpu_bound = "sender: could not offer more"  # the path was never saturated
        base = medians.get(baseline) if baseline else None
        for row in rows:
            if row.test == test and base and row.median_gbps is not None:
                row.ratio_to_baseline = row.median_gbps / base
    return rows


RTT_STATS = ("p50", "p99", "p99.9")


@dataclass
class RttRow:
    """One path in one RTT test: per statistic (p50, p99, p99.9 of each run's RTTs) the median over the runs
    and its CI, in ms; the load's throughput; the daemons' UDP Recv-Q (bytes) and CPU share under it."""

    path: str
    test: str
    n_ok: int
    n_failed: int
    rtt_ms: dict[str, list[float]] = field(default_factory=dict)  # stat -> [median, lo, hi]
    coverage: float | None = None
    load_gbps: float | None = None
    loss_percent: float | None = None
    udp_recvq_bytes: dict[str, float] = field(default_factory=dict)  # "daemon a" -> median of the runs' medians
    udp_recvq_max: dict[str, float] = field(default_factory=dict)
    cpu_share: dict[str, float] = field(default_factory=dict)
    label: str = ""


def summarize_rtt(runs: Sequence[RunResult], paths: Sequence[str], tests: Sequence[str],
                  labels: dict[str, str] | None = None) -> list[RttRow]:
    labels = labels or {}
    rows: list[RttRow] = []
    for test in tests:
        if test not in RTT_TESTS:
            continue
        for path in paths:
            ok = [r for r in runs if r.path == path and r.test == test and r.ok and "rtt_ms" in r.detail]
            failed = sum(1 for r in runs if r.path == path and r.test == test and not r.ok)
            row = RttRow(path, test, len(ok), failed, label=labels.get(path, path))
            if ok:
                for stat in RTT_STATS:
                    med, lo, hi, coverage = median_ci_with_coverage([r.detail["rtt_ms"][stat] for r in ok])
                    row.rtt_ms[stat] = [med, lo, hi]
                    row.coverage = coverage
                if test != "rtt-idle":
                    row.load_gbps = _median([r.gbps for r in ok])
                row.loss_percent = _median([r.loss_percent for r in ok if r.loss_percent is not None])
                queues = [r.detail.get("udp_recvq_bytes", {}) for r in ok]
                for name in sorted({n for q in queues for n in q}):
                    row.udp_recvq_bytes[name] = _median([q[name]["median"] for q in queues if name in q])
                    row.udp_recvq_max[name] = max(q[name]["max"] for q in queues if name in q)
                names = sorted({name for r in ok for name in r.cpu_share})
                row.cpu_share = {name: _median([r.cpu_share[name] for r in ok if name in r.cpu_share])
                                 for name in names}
            rows.append(row)
    return rows


def format_rtt_table(rows: Sequence[RttRow]) -> str:
    header = ("test", "path", "RTT p50 ms [95% CI]", "p99 ms [95% CI]", "p99.9 ms [95% CI]", "load Gbit/s",
              "ping loss %", "UDP Recv-Q KiB a/b (max)", "daemon CPU a/b", "runs")
    lines = [header]
    for row in rows:
        cells = []
        for stat in RTT_STATS:
            value = row.rtt_ms.get(stat)
            cells.append("-" if value is None else f"{value[0]:.3f} [{value[1]:.3f}, {value[2]:.3f}]")
        if row.udp_recvq_bytes:
            queue = "/".join(f"{row.udp_recvq_bytes.get(n, 0) / 1024:.0f}" for n in ("daemon a", "daemon b"))
            queue += " (" + "/".join(f"{row.udp_recvq_max.get(n, 0) / 1024:.0f}" for n in ("daemon a", "daemon b")) + ")"
        else:
            queue = "-"
        cpu = "/".join(f"{row.cpu_share[n]:.0%}" for n in ("daemon a", "daemon b") if row.cpu_share.get(n) is not None)
        runs = f"{row.n_ok}" + (f" ({row.n_failed} failed)" if row.n_failed else "")
        lines.append((row.test, row.label or row.path, *cells, _fmt(row.load_gbps, "{:.2f}"),
                      _fmt(row.loss_percent, "{:.1f}"), queue, cpu or "-", runs))
    out = table(lines)
    out.append(f"RTT: ping -s 56 every {RTT_INTERVAL * 1000:g} ms a -> b; per run p50/p99/p99.9, then the median over "
               f"runs [CI]; rtt-tcp: under one unpaced iperf3 TCP stream, rtt-pacedN: one paced at N "
               "Mbit/s; Recv-Q: the daemons' UDP socket under load (median of samples, max)")
    short = [r.coverage for r in rows if r.coverage is not None and r.coverage < 0.95]
    if short:
        out.append(f"note: with fewer than 6 runs the interval is [min, max]; it covers the median with "
                   f"probability {min(short):.0%}, not 95% (use --runs 6 or more)")
    return "\n".join(out)


def write_rtt_chart(rows: Sequence[RttRow], paths: Sequence[str], tests: Sequence[str], filename: str) -> str | None:
    """p50 / p99 / p99.9 bars per test and path with CI error bars (log scale)."""
    plt = pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    tests = [t for t in tests if t in RTT_TESTS]
    fig, axes = plt.subplots(1, len(tests), figsize=(5 * len(tests), 4.5), squeeze=False)
    for t_index, test in enumerate(tests):
        ax = axes[0][t_index]
        width = 0.8 / max(1, len(paths))
        for index, path in enumerate(paths):
            row = next((r for r in rows if r.path == path and r.test == test), None)
            if row is None or not row.rtt_ms:
                continue
            xs = [s + (index - (len(paths) - 1) / 2) * width for s in range(len(RTT_STATS))]
            meds = [row.rtt_ms[s][0] for s in RTT_STATS]
            err = [[row.rtt_ms[s][0] - row.rtt_ms[s][1] for s in RTT_STATS],
                   [row.rtt_ms[s][2] - row.rtt_ms[s][0] for s in RTT_STATS]]
            ax.bar(xs, meds, width, yerr=err, capsize=3, label=row.label or path)
        ax.set_xticks(range(len(RTT_STATS)), RTT_STATS)
        ax.set_yscale("log")
        ax.set_ylabel("RTT ms (median over runs, 95% CI; log scale)")
        ax.set_title(test)
        ax.legend(fontsize="small")
    save_figure(fig, "turbowg bench tunnel: round-trip time", filename)
    return None


def _fmt(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def format_table(rows: Sequence[Row], baseline_label: str = BASELINE) -> str:
    header = ("test", "path", "Gbit/s median [95% CI]", f"x {baseline_label}", "CPU s/GB", "loss %", "CPU-bound?",
              "runs")
    lines = [header]
    for row in rows:
        ci = "-" if row.median_gbps is None else f"{row.median_gbps:.2f} [{row.lo_gbps:.2f}, {row.hi_gbps:.2f}]"
        runs = f"{row.n_ok}" + (f" ({row.n_failed} failed)" if row.n_failed else "")
        lines.append((row.test, row.label or row.path, ci, _fmt(row.ratio_to_baseline, "{:.2f}"),
                      _fmt(row.cpu_seconds_per_gb, "{:.2f}"), _fmt(row.loss_percent, "{:.2f}"),
                      row.cpu_bound or "-", runs))
    out = table(lines)
    if any(r.test == "udp-gso-paced" for r in rows):
        out.append(f"udp-gso-paced: the highest paced rate delivered with < {LOSS_LIMIT:g}% loss (udp-gso: unpaced)")
    if any(r.cpu_share for r in rows):
        out.append(f"CPU-bound?: the busiest process and its share of one core, bound at >= {CPU_BOUND:.0%} (daemon a: "
                   "sending side, daemon b: receiving side; udp-gso-paced: at the first lossy rate)")
    short = [r.coverage for r in rows if r.coverage is not None and r.coverage < 0.95]
    if short:
        out.append(f"note: with fewer than 6 runs the interval is [min, max]; it covers the median with "
                   f"probability {min(short):.0%}, not 95% (use --runs 6 or more)")
    return "\n".join(out)


def write_chart(rows: Sequence[Row], paths: Sequence[str], tests: Sequence[str], filename: str,
                baseline_label: str = BASELINE) -> str | None:
    """Grouped bar chart with CI error bars; returns a note instead when matplotlib is missing."""
    plt = pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    labels = {r.path: r.label or r.path for r in rows}
    # The bare veth is often 10-50x faster than any tunnel: a log axis keeps the tunnels readable, and a
    # second panel shows the ratio to the baseline peer, which is what the comparison is about.
    has_ratio = any(r.ratio_to_baseline is not None and r.path != BASELINE for r in rows)
    fig, axes = plt.subplots(1, 2 if has_ratio else 1, figsize=(max(6, 2.2 * len(tests)) * (2 if has_ratio else 1), 4.5),
                             squeeze=False)
    ax = axes[0][0]
    width = 0.8 / max(1, len(paths))
    for index, path in enumerate(paths):
        xs, heights, err_lo, err_hi = [], [], [], []
        for t_index, test in enumerate(tests):
            row = next((r for r in rows if r.path == path and r.test == test), None)
            if row is None or row.median_gbps is None:
                continue
            xs.append(t_index + (index - (len(paths) - 1) / 2) * width)
            heights.append(row.median_gbps)
            err_lo.append(row.median_gbps - row.lo_gbps)
            err_hi.append(row.hi_gbps - row.median_gbps)
        ax.bar(xs, heights, width, yerr=[err_lo, err_hi], capsize=3, label=labels.get(path, path))
    ax.set_xticks(range(len(tests)), tests)
    ax.set_yscale("log")
    ax.set_ylabel("Gbit/s (median, 95% CI; log scale)")
    ax.set_title("throughput")
    ax.legend(fontsize="small")
    if has_ratio:
        ratio_ax = axes[0][1]
        tunnels = [p for p in paths if p != UNDERLAY]
        width = 0.8 / max(1, len(tunnels))
        for index, path in enumerate(tunnels):
            xs, heights = [], []
            for t_index, test in enumerate(tests):
                row = next((r for r in rows if r.path == path and r.test == test), None)
                if row is not None and row.ratio_to_baseline is not None:
                    xs.append(t_index + (index - (len(tunnels) - 1) / 2) * width)
                    heights.append(row.ratio_to_baseline)
            ratio_ax.bar(xs, heights, width, label=labels.get(path, path))
        ratio_ax.axhline(1.0, color="black", linewidth=0.8)
        ratio_ax.set_xticks(range(len(tests)), tests)
        ratio_ax.set_ylabel(f"median throughput / {baseline_label}")
        ratio_ax.set_title(f"ratio to {baseline_label}")
        ratio_ax.legend(fontsize="small")
    save_figure(fig, "turbowg bench tunnel", filename)
    return None


# ---------------------------------------------------------------- command


def _split_choices(values: Sequence[str] | None, allowed: Sequence[str], what: str,
                   default: Sequence[str] | None = None) -> list[str]:
    if not values:
        return list(allowed if default is None else default)
    chosen: list[str] = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            if item not in allowed:
                raise ValueError(f"unknown {what} {item!r}; choose from {', '.join(allowed)}")
            if item not in chosen:
                chosen.append(item)
    return chosen


def choose_baseline(paths: Sequence[str], peer_paths: Sequence[str]) -> str | None:
    """wireguard-go (Debian) when measured, else the first --peer-bin build, else the direct turbowg tunnel
    when relay paths are measured, else none."""
    if BASELINE in paths:
        return BASELINE
    if peer_paths:
        return peer_paths[0]
    if DERP_BASELINE in paths and any(p in DERP_PATHS for p in paths):
        return DERP_BASELINE
    return None


def run_bench(paths: Sequence[str], tests: Sequence[str], runs: int, duration: float,
              output_dir: str, log=print, ipv6: bool = False, peer_bins: Sequence[str] = (),
              sweep_step: float = 1.0) -> int:
    check_prerequisites(("ip", "wg", "iperf3", "ss", "ping"))
    known = known_implementations()
    turbo = known["turbowg"]
    for name in DERP_PATHS:
        known[name] = Implementation(name, turbo.command, DERP_ENV[name], turbo.version)
    if any(p in DERP_PATHS for p in paths):
        check_prerequisites(("nft",))
    impls: list[Implementation] = [known[p] for p in paths if p != UNDERLAY]
    if any(i.name == "wireguard-go" for i in impls):
        check_prerequisites(("wireguard-go",))
    peers = [implementation_from_binary(p) for p in peer_bins]
    for peer in peers:
        if any(peer.name == i.name for i in impls):
            raise ValueError(f"--peer-bin {peer.command[0]}: a path named {peer.name!r} is measured already")
        impls.append(peer)
    paths = [*[p for p in paths if p != UNDERLAY], *[p.name for p in peers], *[p for p in paths if p == UNDERLAY]]
    labels = {i.name: i.label for i in impls}
    baseline = choose_baseline(paths, [p.name for p in peers])
    baseline_label = labels.get(baseline, baseline) if baseline else "(no baseline)"
    os.makedirs(output_dir, exist_ok=True)
    total = runs * len(tests) * len(paths)
    results: list[RunResult] = []
    started = time.time()
    log(f"building topology: {', '.join(labels.get(p, p) for p in paths)} "
        f"(measuring over IPv{6 if ipv6 else 4})", file=sys.stderr)
    interrupted = False
    specs = [derp_spec(i.name, i) if i.name in DERP_PATHS else TunnelSpec(i.name, i, i) for i in impls]
    with build_topology(specs, prefix="twbench") as topo:
        log(f"namespaces {topo.ns_a} (client) and {topo.ns_b} (server) ready", file=sys.stderr)
        schedule = [(rep, test, path) for rep in range(runs) for test in tests
                    for path in _rotated(paths, rep)]
        try:
            for count, (rep, test, path) in enumerate(schedule, 1):
                log(f"[run {count}/{total}] {path} {test} (repetition {rep + 1}/{runs}) ...",
                    end=" ", flush=True, file=sys.stderr)
                result = run_one(topo, path, test, rep, duration, ipv6, sweep_step)
                results.append(result)
                log(_progress(result), file=sys.stderr)
        except KeyboardInterrupt:
            # Tear down (the with block does) and still report what was measured.
            interrupted = True
            log(f"\ninterrupted after {len(results)} of {total} runs", file=sys.stderr)
    if not results:
        return 130 if interrupted else 1
    throughput_tests = [t for t in tests if t not in RTT_TESTS]
    rtt_tests = [t for t in tests if t in RTT_TESTS]
    rows = summarize_runs(results, paths, throughput_tests, labels, baseline)
    rtt_rows = summarize_rtt(results, paths, rtt_tests, labels)
    if rows:
        log(format_table(rows, baseline_label))
    if rtt_rows:
        if rows:
            log("")
        log(format_rtt_table(rtt_rows))
    raw = {
        "meta": {"started": started, "interrupted": interrupted, "kernel": platform.release(), "duration": duration,
                 "runs": runs, "tests": list(tests), "paths": list(paths), "ip_version": 6 if ipv6 else 4,
                 "udp_payload": _payload(ipv6), "baseline": baseline, "labels": labels,
                 "versions": {i.name: i.version for i in impls}, "sweep_step": sweep_step,
                 "sweep": {"start_mbit": SWEEP_START_MBIT, "loss_limit_percent": LOSS_LIMIT,
                           "max_steps": SWEEP_MAX_STEPS, "bisections": SWEEP_BISECTIONS},
                 "derp": {"relay": topo.relay_url, "paths": [p for p in paths if p in DERP_PATHS]},
                 "commands": {i.name: {"command": list(i.command), "env": dict(i.env)} for i in impls}},
        "runs": [asdict(r) for r in results],
        "summary": [asdict(r) for r in rows],
        "rtt_summary": [asdict(r) for r in rtt_rows],
    }
    json_path = os.path.join(output_dir, "tunnel-runs.json")
    with open(json_path, "w") as f:
        json.dump(raw, f, indent=2)
    log(f"raw runs: {json_path}")
    if rows:
        chart_path = os.path.join(output_dir, "tunnel.png")
        note = write_chart(rows, paths, throughput_tests, chart_path, baseline_label)
        log(note if note else f"chart: {chart_path}")
    if rtt_rows:
        chart_path = os.path.join(output_dir, "tunnel-rtt.png")
        note = write_rtt_chart(rtt_rows, paths, rtt_tests, chart_path)
        log(note if note else f"chart: {chart_path}")
    if interrupted:
        return 130
    return 0 if all(r.ok for r in results) else 1


def _progress(result: RunResult) -> str:
    if not result.ok:
        return f"FAILED: {result.error}"
    rtt = result.detail.get("rtt_ms")
    if rtt is None:
        return f"{result.gbps:.2f} Gbit/s"
    text = f"RTT p50 {rtt['p50']:.3f} p99 {rtt['p99']:.3f} p99.9 {rtt['p99.9']:.3f} ms"
    return text + (f" at {result.gbps:.2f} Gbit/s" if result.test != "rtt-idle" else "")


def _rotated(paths: Sequence[str], rep: int) -> list[str]:
    """Round-robin order for one repetition, starting one path later each time (no fixed position bias)."""
    shift = rep % len(paths)
    return list(paths[shift:]) + list(paths[:shift])


def _positive(kind: type, upper: float):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not 0 < value <= upper:
            raise argparse.ArgumentTypeError(f"must be in (0, {upper}]")
        return value

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--duration", type=_positive(float, 600), default=5.0, help="seconds per run (default 5)")
    parser.add_argument("--runs", type=_positive(int, 1000), default=5, help="repetitions per path and test (default 5)")
    parser.add_argument("--impl", action="append", metavar="PATH",
                        help=f"path to measure, repeatable or comma-separated: {', '.join(PATHS + DERP_PATHS)} "
                             f"(default all direct paths; with --path derp: {', '.join(DERP_DEFAULT_PATHS)})")
    parser.add_argument("--path", choices=("direct", "derp"), default="direct",
                        help="derp: measure turbowg through a local DERP relay (UDP between the peers blocked by "
                             "nftables; the relay path is checked around every run) beside the direct tunnel; "
                             f"default tests then {', '.join(DERP_DEFAULT_TESTS)}")
    parser.add_argument("--peer-bin", action="append", default=[], metavar="PATH",
                        help="also measure this wireguard-go build (any binary run as `BIN IFNAME`), labelled "
                             "with what `BIN --version` says; repeatable")
    parser.add_argument("--tests", action="append", metavar="TEST",
                        help=f"tests, repeatable or comma-separated: {', '.join(TESTS)} (default all)")
    parser.add_argument("--sweep-step", type=_positive(float, 60), default=1.0,
                        help="seconds per offered rate in udp-gso-paced (default 1)")
    parser.add_argument("--output-dir", default="bench-results", help="where JSON and PNG go (default ./bench-results)")
    parser.add_argument("--ipv6", action="store_true",
                        help=f"measure over the tunnels' IPv6 addresses (UDP payload {UDP_PAYLOAD_V6} bytes)")
    parser.set_defaults(func=command)


@bench_command("tunnel", (ValueError, HarnessError, OSError))
def command(args: argparse.Namespace) -> int:
    # With --peer-bin and no --impl, measure turbowg, the given builds and the underlay.
    default = [p for p in PATHS if p in ("turbowg", UNDERLAY)] if args.peer_bin else None
    derp = getattr(args, "path", "direct") == "derp"
    if derp:
        default = list(DERP_DEFAULT_PATHS)
    elif default is None:
        default = list(PATHS)
    paths = _split_choices(args.impl, PATHS + DERP_PATHS, "implementation", default)
    tests = _split_choices(args.tests, TESTS, "test", DERP_DEFAULT_TESTS if derp else None)
    return run_bench(paths, tests, args.runs, args.duration, args.output_dir, ipv6=args.ipv6,
                     peer_bins=args.peer_bin, sweep_step=args.sweep_step)


def add_tunnel_bench(bench_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return add_bench(bench_subparsers, "tunnel",
                     "iperf3/UDP throughput through turbowg vs wireguard-go vs the bare veth",
                     __doc__, add_arguments)


def main(argv: list[str] | None = None) -> int:
    return standalone_main("python -m turbowg.bench.tunnel", add_arguments, argv)


if __name__ == "__main__":
    sys.exit(main())
