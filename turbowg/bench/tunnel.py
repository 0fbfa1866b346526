"""`turbowg bench tunnel`: throughput through each WireGuard implementation in one topology, one run.

All tunnels (turbowg with offloads, turbowg without (TURBOWG_OFFLOADS=0), turbowg with offloads but without
its C accelerators (TURBOWG_NO_C=1, the pure-Python fallback), Debian wireguard-go) and the bare veth live in
the same two namespaces at once (see topology.py), and repetitions are interleaved: every repetition
runs every test on every path, with the path order rotated per repetition, so slow drift of the
machine (thermal, noisy neighbours) hits all implementations alike. Tests:

- tcp1 / tcp4: iperf3 TCP with 1 or 4 streams; goodput is the receiver side (end.sum_received).
- udp:         iperf3 -u -b 0 with 1392-byte payloads (fits the 1420 tunnel MTU over IPv4 without
               fragmenting); received rate and loss as the server saw them.
- udp-gso:     the QUIC-style load of udpgen.py (UDP_SEGMENT sends, UDP_GRO receive).

CPU cost is utime+stime of the daemon processes (both ends of the tunnel, children included) read
from /proc/<pid>/stat around each run, divided by the gigabytes received.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from turbowg.bench.stats import median_ci, median_ci_with_coverage
from turbowg.bench.topology import (
    UNDERLAY,
    NetPath,
    Topology,
    TopologyError,
    build_topology,
    check_prerequisites,
    known_implementations,
)

TESTS = ("tcp1", "tcp4", "udp", "udp-gso")
PATHS = ("turbowg", "turbowg-nooffload", "turbowg-python", "wireguard-go", UNDERLAY)
BASELINE = "wireguard-go"
UDP_PAYLOAD = 1420 - 28  # IPv4 + UDP headers inside the tunnel MTU: no fragmentation
UDP_PAYLOAD_V6 = 1420 - 48  # IPv6 + UDP headers
IPERF_PORT = 5201
UDPGEN_PORT = 5301
CLK_TCK = os.sysconf("SC_CLK_TCK")


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
    detail: dict[str, Any] = field(default_factory=dict)


class RunFailed(Exception):
    pass


# ---------------------------------------------------------------- CPU accounting


def _stat_fields(pid: int) -> tuple[int, float] | None:
    """(ppid, utime+stime seconds) from /proc/<pid>/stat, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after the last ')'.
    rest = raw[raw.rfind(")") + 2:].split()
    try:
        return int(rest[1]), (int(rest[11]) + int(rest[12])) / CLK_TCK
    except (IndexError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """True unless the process is gone or a zombie (our daemons stay unreaped until tear-down)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return False
    return raw[raw.rfind(b")") + 2:raw.rfind(b")") + 3] not in (b"Z", b"X")


def process_tree_cpu_seconds(roots: Sequence[int]) -> float:
    """CPU seconds (user + system, all threads) of `roots` and all their live descendants."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                stats[int(entry)] = fields
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total = 0.0
    seen: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        total += stats[pid][1]
        todo.extend(children.get(pid, ()))
    return total


# ---------------------------------------------------------------- one run


def _wait_listening(topo: Topology, proto: str, port: int, proc: subprocess.Popen[str], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    flag = "-Hltn" if proto == "tcp" else "-Hlun"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RunFailed(f"server exited early: {_read(proc)[1].strip()[-300:]}")
        result = topo.run(topo.ns_b, "ss", flag, f"sport = :{port}", check=False, timeout=5)
        if result.stdout.strip():
            return
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


def _iperf3(topo: Topology, path: NetPath, test: str, duration: float,
            ipv6: bool) -> tuple[int, float, float | None, dict]:
    server = subprocess.Popen(topo.exec_args(topo.ns_b, "iperf3", "-s", "-1", "-p", str(IPERF_PORT)),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_listening(topo, "tcp", IPERF_PORT, server)
        args = ["iperf3", "-c", path.server_v6 if ipv6 else path.server_v4, "-p", str(IPERF_PORT), "-t", f"{duration:g}", "-J"]
        if test == "tcp4":
            args += ["-P", "4"]
        elif test == "udp":
            args += ["-u", "-b", "0", "-l", str(_payload(ipv6))]
        client = topo.run(topo.ns_a, *args, check=False, timeout=duration + 30)
    except TopologyError as exc:
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
    return int(received["bytes"]), float(received["bits_per_second"]), loss, {
        "seconds": received.get("seconds"), "cpu": report["end"].get("cpu_utilization_percent")}


def _udpgen(topo: Topology, path: NetPath, duration: float, ipv6: bool) -> tuple[int, float, float | None, dict]:
    ready = os.path.join(topo.workdir, f"udpgen-ready-{time.monotonic_ns()}")
    module = [sys.executable, "-m", "turbowg.bench.udpgen"]
    receiver = subprocess.Popen(
        topo.exec_args(topo.ns_b, *module, "recv", "--port", str(UDPGEN_PORT),
                       "--timeout", f"{duration + 15:g}", "--ready-file", ready),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(ready):
            if receiver.poll() is not None or time.monotonic() > deadline:
                raise RunFailed(f"udpgen receiver did not start: {_read(receiver)[1].strip()[-300:]}")
            time.sleep(0.02)
        host = path.server_v6 if ipv6 else path.server_v4
        sender = topo.run(topo.ns_a, *module, "send", "--host", host, "--port", str(UDPGEN_PORT),
                          "--duration", f"{duration:g}", "--size", str(_payload(ipv6)), check=False,
                          timeout=duration + 30)
        out, err = _read(receiver, timeout=duration + 20)
    except TopologyError as exc:
        raise RunFailed(str(exc)) from exc
    finally:
        _stop(receiver)
    try:
        sent = json.loads(sender.stdout)
        got = json.loads(out)
    except json.JSONDecodeError as exc:
        raise RunFailed(f"udpgen gave no JSON: {sender.stderr.strip()[-200:]} {err.strip()[-200:]}") from exc
    loss = 100.0 * max(0, sent["datagrams"] - got["datagrams"]) / sent["datagrams"] if sent["datagrams"] else None
    return int(got["bytes"]), float(got["goodput_bps"]), loss, {"sender": sent, "receiver": got}


def run_one(topo: Topology, path_name: str, test: str, rep: int, duration: float, ipv6: bool = False) -> RunResult:
    path = topo.paths[path_name]
    result = RunResult(path_name, test, rep, ok=False)
    dead = [pid for pid in path.daemon_pids if not _alive(pid)]
    if dead:
        result.error = f"daemon process(es) {dead} exited"
        return result
    cpu_before = process_tree_cpu_seconds(path.daemon_pids) if path.daemon_pids else None
    try:
        if test == "udp-gso":
            nbytes, bps, loss, detail = _udpgen(topo, path, duration, ipv6)
        else:
            nbytes, bps, loss, detail = _iperf3(topo, path, test, duration, ipv6)
    except (RunFailed, subprocess.TimeoutExpired, KeyError, TypeError, ValueError) as exc:
        result.error = str(exc) or type(exc).__name__
        return result
    result.ok = True
    result.bytes_received = nbytes
    result.gbps = bps / 1e9
    result.loss_percent = loss
    result.detail = detail
    if cpu_before is not None:
        result.cpu_seconds = process_tree_cpu_seconds(path.daemon_pids) - cpu_before
        if nbytes > 0:
            result.cpu_seconds_per_gb = result.cpu_seconds / (nbytes / 1e9)
    return result


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


def _median(values: Sequence[float]) -> float | None:
    return median_ci(values)[0] if values else None


def summarize_runs(runs: Sequence[RunResult], paths: Sequence[str], tests: Sequence[str]) -> list[Row]:
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
            rows.append(Row(path, test, len(ok), failed, med, lo, hi, None,
                            _median([r.cpu_seconds_per_gb for r in ok if r.cpu_seconds_per_gb is not None]),
                            _median([r.loss_percent for r in ok if r.loss_percent is not None]), coverage))
        base = medians.get(BASELINE)
        for row in rows:
            if row.test == test and base and row.median_gbps is not None:
                row.ratio_to_baseline = row.median_gbps / base
    return rows


def _fmt(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def format_table(rows: Sequence[Row]) -> str:
    header = ("test", "path", "Gbit/s median [95% CI]", f"x {BASELINE}", "CPU s/GB", "loss %", "runs")
    lines = [header]
    for row in rows:
        ci = "-" if row.median_gbps is None else f"{row.median_gbps:.2f} [{row.lo_gbps:.2f}, {row.hi_gbps:.2f}]"
        runs = f"{row.n_ok}" + (f" ({row.n_failed} failed)" if row.n_failed else "")
        lines.append((row.test, row.path, ci, _fmt(row.ratio_to_baseline, "{:.2f}"),
                      _fmt(row.cpu_seconds_per_gb, "{:.2f}"), _fmt(row.loss_percent, "{:.2f}"), runs))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for index, line in enumerate(lines):
        out.append("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
        if index == 0:
            out.append("  ".join("-" * width for width in widths))
    short = [r.coverage for r in rows if r.coverage is not None and r.coverage < 0.95]
    if short:
        out.append(f"note: with fewer than 6 runs the interval is [min, max]; it covers the median with "
                   f"probability {min(short):.0%}, not 95% (use --runs 6 or more)")
    return "\n".join(out)


def write_chart(rows: Sequence[Row], paths: Sequence[str], tests: Sequence[str], filename: str) -> str | None:
    """Grouped bar chart with CI error bars; returns a note instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no chart (pip install matplotlib)"
    # The bare veth is often 10-50x faster than any tunnel: a log axis keeps the tunnels readable, and a
    # second panel shows the ratio to wireguard-go, which is what the comparison is about.
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
        ax.bar(xs, heights, width, yerr=[err_lo, err_hi], capsize=3, label=path)
    ax.set_xticks(range(len(tests)), tests)
    ax.set_yscale("log")
    ax.set_ylabel("Gbit/s (median, 95% CI; log scale)")
    ax.set_title("throughput")
    ax.legend()
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
            ratio_ax.bar(xs, heights, width, label=path)
        ratio_ax.axhline(1.0, color="black", linewidth=0.8)
        ratio_ax.set_xticks(range(len(tests)), tests)
        ratio_ax.set_ylabel(f"median throughput / {BASELINE}")
        ratio_ax.set_title(f"ratio to {BASELINE}")
        ratio_ax.legend()
    fig.suptitle("turbowg bench tunnel")
    fig.tight_layout()
    fig.savefig(filename, dpi=120)
    plt.close(fig)
    return None


# ---------------------------------------------------------------- command


def _split_choices(values: Sequence[str] | None, allowed: Sequence[str], what: str) -> list[str]:
    if not values:
        return list(allowed)
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


def run_bench(paths: Sequence[str], tests: Sequence[str], runs: int, duration: float,
              output_dir: str, log=print, ipv6: bool = False) -> int:
    check_prerequisites(("ip", "wg", "iperf3", "ss", "ping"))
    known = known_implementations()
    impls = [known[p] for p in paths if p != UNDERLAY]
    if any(i.name == "wireguard-go" for i in impls):
        check_prerequisites(("wireguard-go",))
    os.makedirs(output_dir, exist_ok=True)
    total = runs * len(tests) * len(paths)
    results: list[RunResult] = []
    started = time.time()
    log(f"building topology: {', '.join(paths)} (measuring over IPv{6 if ipv6 else 4})", file=sys.stderr)
    interrupted = False
    with build_topology(impls) as topo:
        log(f"namespaces {topo.ns_a} (client) and {topo.ns_b} (server) ready", file=sys.stderr)
        schedule = [(rep, test, path) for rep in range(runs) for test in tests
                    for path in _rotated(paths, rep)]
        try:
            for count, (rep, test, path) in enumerate(schedule, 1):
                log(f"[run {count}/{total}] {path} {test} (repetition {rep + 1}/{runs}) ...",
                    end=" ", flush=True, file=sys.stderr)
                result = run_one(topo, path, test, rep, duration, ipv6)
                results.append(result)
                log(f"{result.gbps:.2f} Gbit/s" if result.ok else f"FAILED: {result.error}", file=sys.stderr)
        except KeyboardInterrupt:
            # Tear down (the with block does) and still report what was measured.
            interrupted = True
            log(f"\ninterrupted after {len(results)} of {total} runs", file=sys.stderr)
    if not results:
        return 130 if interrupted else 1
    rows = summarize_runs(results, paths, tests)
    log(format_table(rows))
    raw = {
        "meta": {"started": started, "interrupted": interrupted, "kernel": platform.release(), "duration": duration, "runs": runs,
                 "tests": list(tests), "paths": list(paths), "ip_version": 6 if ipv6 else 4, "udp_payload": _payload(ipv6),
                 "commands": {i.name: {"command": list(i.command), "env": dict(i.env)} for i in impls}},
        "runs": [asdict(r) for r in results],
        "summary": [asdict(r) for r in rows],
    }
    json_path = os.path.join(output_dir, "tunnel-runs.json")
    with open(json_path, "w") as f:
        json.dump(raw, f, indent=2)
    log(f"raw runs: {json_path}")
    chart_path = os.path.join(output_dir, "tunnel.png")
    note = write_chart(rows, paths, tests, chart_path)
    log(note if note else f"chart: {chart_path}")
    if interrupted:
        return 130
    return 0 if all(r.ok for r in results) else 1


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
                        help=f"path to measure, repeatable or comma-separated: {', '.join(PATHS)} (default all)")
    parser.add_argument("--tests", action="append", metavar="TEST",
                        help=f"tests, repeatable or comma-separated: {', '.join(TESTS)} (default all)")
    parser.add_argument("--output-dir", default="bench-results", help="where JSON and PNG go (default ./bench-results)")
    parser.add_argument("--ipv6", action="store_true",
                        help=f"measure over the tunnels' IPv6 addresses (UDP payload {UDP_PAYLOAD_V6} bytes)")
    parser.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    try:
        paths = _split_choices(args.impl, PATHS, "implementation")
        tests = _split_choices(args.tests, TESTS, "test")
        return run_bench(paths, tests, args.runs, args.duration, args.output_dir, ipv6=args.ipv6)
    except (ValueError, TopologyError, OSError) as exc:
        print(f"turbowg bench tunnel: {exc}", file=sys.stderr)
        return 2


def add_tunnel_bench(bench_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = bench_subparsers.add_parser(
        "tunnel", help="iperf3/UDP throughput through turbowg vs wireguard-go vs the bare veth",
        description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m turbowg.bench.tunnel")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
