"""`turbowg bench datapath`: the C accelerators against their pure-Python fallbacks, measured in one run.

Each hot loop of the packed data path, on the batch it meets in a bulk transfer: sealing the ~46 packets of
one split 64 KiB TCP monster, opening one UDP_GRO read of those messages, splitting (ingest) the monster from
its virtio header, coalescing the 46 packets back into a GSO frame. Both implementations do the same work on
the same buffers and produce the same bytes (tests/test_transport.py, tests/test_tun_fast.py check that);
repetitions are interleaved C/Python, and each reports the median time per batch with a 95% confidence
interval, per packet, and the speed-up. No network, no root.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import time
from array import array
from collections.abc import Callable
from typing import Any

from turbowg.bench.report import table
from turbowg.bench.stats import median_ci_with_coverage
from turbowg.device.replay import ReplayWindow as PyReplayWindow
from turbowg.noise import transport
from turbowg.tun import fast
from turbowg.tun.checksum import ones_sum

MTU = 1420
MSS = MTU - 40
PAYLOAD = 64 * 1024 - 40 - 10 * 1024  # a typical monster: 45 segments of MSS and a shorter one
RECEIVER = 0x11223344


def tcp_monster(payload_len: int = PAYLOAD) -> bytearray:
    """A virtio header (TCPV4 GSO, NEEDS_CSUM) and a TCP/IPv4 monster as the kernel hands it to the TUN."""
    total = 40 + payload_len
    ip = bytearray(20)
    ip[0] = 0x45
    struct.pack_into("!HHHBB", ip, 2, total & 0xFFFF, 0x1234, 0x4000, 64, 6)
    ip[12:16] = bytes([10, 0, 0, 1])
    ip[16:20] = bytes([10, 0, 0, 2])
    struct.pack_into("!H", ip, 10, ~ones_sum(ip) & 0xFFFF)
    tcp = bytearray(20)
    struct.pack_into("!HHIIBBH", tcp, 0, 40000, 5201, 1_000_000, 2_000_000, 5 << 4, 0x18, 512)
    pseudo = ones_sum(ip[12:20], 6 + 20 + payload_len)
    struct.pack_into("!H", tcp, 16, pseudo)  # partial checksum: the pseudo-header sum, as NEEDS_CSUM says
    vnet = struct.pack("=BBHHHH", 1, 1, 40, MSS, 20, 16)
    return bytearray(vnet + ip + tcp + os.urandom(payload_len))


class Case:
    """One hot loop, runnable with either implementation."""

    def __init__(self, name: str, packets: int, c: Callable[[], object] | None, py: Callable[[], object]) -> None:
        self.name = name
        self.packets = packets
        self.impls = {"c": c, "python": py}


def build_cases() -> list[Case]:
    frame = tcp_monster()
    stage = bytearray(2 * 65536 + 8192)
    layout = array("i", bytes(8 * 512))
    count, _ = fast.ingest_py(frame, len(frame), stage, 0, layout, 0)
    key = os.urandom(32)
    sealed = bytearray(count * (MTU + 64))
    sizes = array("i", bytes(4 * count))
    nbytes = transport.PyAead(key).seal_batch(stage, layout, 0, count, sealed, 0, MTU, RECEIVER, 0, sizes, 0)
    stride = sizes[0]
    wbuf = bytearray(2 * 65536 + 10 * count)
    frames = array("i", bytes(8 * count))
    out_layout = array("i", bytes(8 * count))
    cases: list[Case] = []

    def seal(impl: Any) -> Callable[[], object]:
        dst = bytearray(len(sealed))
        return lambda: impl.seal_batch(stage, layout, 0, count, dst, 0, MTU, RECEIVER, 0, sizes, 0)

    def open_(impl: Any, window: Callable[[], Any]) -> Callable[[], object]:
        work = bytearray(nbytes)

        def run() -> object:
            work[:] = sealed[:nbytes]  # opening is in place: start from the sealed bytes every time
            return impl.open_batch(work, 0, nbytes, stride, RECEIVER, window(), out_layout, 0)

        return run

    c_aead = transport.Aead(key) if transport.HAVE_C else None
    py_aead = transport.PyAead(key)
    cases.append(Case("seal", count, seal(c_aead) if c_aead else None, seal(py_aead)))
    cases.append(Case("open", count,
                      open_(c_aead, transport.CReplayWindow) if c_aead and transport.CReplayWindow else None,
                      open_(py_aead, PyReplayWindow)))
    c_ingest = fast.ingest if fast.HAVE_C else None  # with the extension built, these are the C functions
    c_coalesce = fast.coalesce if fast.HAVE_C else None
    dst = bytearray(len(stage))
    lay = array("i", bytes(8 * 512))
    cases.append(Case("split", count,
                      (lambda: c_ingest(frame, len(frame), dst, 0, lay, 0)) if c_ingest else None,
                      lambda: fast.ingest_py(frame, len(frame), dst, 0, lay, 0)))
    cases.append(Case("coalesce", count,
                      (lambda: c_coalesce(stage, layout, count, wbuf, frames, True, True)) if c_coalesce else None,
                      lambda: fast.coalesce_py(stage, layout, count, wbuf, frames, True, True)))
    return cases


def time_batch(fn: Callable[[], object], min_seconds: float) -> float:
    """Seconds per call: calls in a loop for at least `min_seconds`."""
    fn()
    calls = 0
    start = time.perf_counter()
    elapsed = 0.0
    while elapsed < min_seconds:
        for _ in range(10):
            fn()
        calls += 10
        elapsed = time.perf_counter() - start
    return elapsed / calls


def run(args: argparse.Namespace) -> int:
    cases = build_cases()
    names = [c.name for c in cases]
    wanted = names if not args.tests else [t for part in args.tests for t in part.split(",") if t]
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        print(f"turbowg bench datapath: unknown test(s) {', '.join(unknown)} (choose from {', '.join(names)})")
        return 2
    if args.runs < 1:
        print("turbowg bench datapath: --runs must be at least 1")
        return 2
    results: dict[str, dict[str, list[float]]] = {}
    total = sum(len([i for i in c.impls.values() if i]) for c in cases if c.name in wanted) * args.runs
    done = 0
    for repetition in range(args.runs):
        for case in cases:
            if case.name not in wanted:
                continue
            for impl, fn in case.impls.items():
                if fn is None:
                    continue
                done += 1
                print(f"\r[run {done}/{total}] {case.name} {impl} (repetition {repetition + 1}/{args.runs})",
                      end="", flush=True)
                results.setdefault(case.name, {}).setdefault(impl, []).append(
                    time_batch(fn, args.seconds) * 1e6)
    print()
    rows = [("test", "impl", "us per batch median [95% CI]", "ns per packet", "x python", "runs")]
    summary: dict[str, Any] = {}
    for case in cases:
        if case.name not in results:
            continue
        py_median = median_ci_with_coverage(results[case.name]["python"])[0]
        for impl, values in results[case.name].items():
            med, lo, hi, coverage = median_ci_with_coverage(values)
            rows.append((case.name, impl, f"{med:.1f} [{lo:.1f}, {hi:.1f}]", f"{1000 * med / case.packets:.0f}",
                         f"{py_median / med:.1f}", str(len(values))))
            summary.setdefault(case.name, {})[impl] = {
                "median_us": med, "ci_lo_us": lo, "ci_hi_us": hi, "coverage": coverage,
                "packets_per_batch": case.packets, "runs_us": values}
    print("\n".join(table(rows)))
    if not transport.HAVE_C or not fast.HAVE_C:
        print("note: a C accelerator is not built here: only the Python fallback was measured (turbowg doctor)")
    if args.runs < 6:
        print("note: with fewer than 6 runs the interval is [min, max], covering the median with less than 95%")
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"mtu": MTU, "mss": MSS, "results": summary}, f, indent=2)
        print(f"raw runs: {args.output}")
    return 0


def add_datapath_bench(bench_subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = bench_subparsers.add_parser(
        "datapath", help="C accelerators vs their pure-Python fallbacks (seal, open, split, coalesce)",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=11, help="interleaved repetitions per test (default 11)")
    parser.add_argument("--seconds", type=float, default=0.3, help="seconds per repetition (default 0.3)")
    parser.add_argument("--tests", action="append", help="seal, open, split, coalesce (default all)")
    parser.add_argument("--output", help="write the raw runs as JSON here")
    parser.set_defaults(func=run)
    return parser
