"""`turbowg demo`: two namespaces, a turbowg tunnel between them, traffic across it, a summary.

Everything it creates (namespaces, veth, interfaces, UAPI sockets, daemons) is removed at the end,
also on Ctrl-C or failure.
"""

from __future__ import annotations

import argparse
import os
import re
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="run a turbowg tunnel between two namespaces and print a summary")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of TCP traffic (default 3)")
    parser.set_defaults(func=run_demo)


def _ping_summary(output: str) -> str:
    loss = re.search(r"(\d+(?:\.\d+)?)% packet loss", output)
    rtt = re.search(r"= [\d.]+/([\d.]+)/", output)
    return f"{loss.group(1) if loss else '?'}% loss, avg rtt {rtt.group(1) if rtt else '?'} ms"


def run_demo(args: argparse.Namespace) -> int:
    from turbowg.bench.topology import TopologyError, build_topology, known_implementations
    from turbowg.bench.tunnel import run_one

    if os.geteuid() != 0:
        print("turbowg demo: needs root (it creates network namespaces and TUN devices)", file=sys.stderr)
        return 1
    impl = known_implementations()["turbowg"]
    print("turbowg demo: building namespaces a and b, joined by a veth pair, with a turbowg tunnel between them")
    try:
        with build_topology([impl]) as topo:
            path = topo.paths[impl.name]
            print(f"  tunnel: {path.ifname_a} ({path.client_v4}, {path.client_v6}) in {topo.ns_a}"
                  f"  <->  {path.ifname_b} ({path.server_v4}, {path.server_v6}) in {topo.ns_b}")
            pings = {}
            for family, ns, dst in (("IPv4 a->b", topo.ns_a, path.server_v4), ("IPv4 b->a", topo.ns_b, path.client_v4),
                                    ("IPv6 a->b", topo.ns_a, path.server_v6), ("IPv6 b->a", topo.ns_b, path.client_v6)):
                proc = topo.run(ns, "ping", "-c", "5", "-i", "0.2", "-W", "2", dst, check=False, timeout=20)
                pings[family] = _ping_summary(proc.stdout)
            tcp = run_one(topo, impl.name, "tcp1", 0, args.duration)
            show = topo.run(topo.ns_a, "wg", "show", path.ifname_a, check=False).stdout
    except TopologyError as exc:
        print(f"turbowg demo: {exc}", file=sys.stderr)
        return 1
    print("\nSummary")
    for family, text in pings.items():
        print(f"  ping {family}: {text}")
    if tcp.ok:
        print(f"  TCP a->b (iperf3, {args.duration:g} s): {tcp.gbps:.2f} Gbit/s received, "
              f"{tcp.bytes_received / 1e6:.0f} MB"
              + (f", daemon CPU {tcp.cpu_seconds_per_gb:.1f} s/GB" if tcp.cpu_seconds_per_gb else ""))
    else:
        print(f"  TCP a->b: failed: {tcp.error}")
    print("  wg show (side a):")
    for line in show.strip().splitlines():
        print(f"    {line}")
    print("\nAll namespaces, interfaces and sockets have been removed.")
    return 0 if tcp.ok and all("0% loss" in t for t in pings.values()) else 1
