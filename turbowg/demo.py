"""`turbowg demo`: two namespaces, a turbowg tunnel between them, traffic across it, a summary.

Everything it creates (namespaces, veth, interfaces, UAPI sockets, daemons) is removed at the end,
also on Ctrl-C or failure. It exits non-zero unless every ping got every reply and the TCP transfer
arrived intact (same byte count and SHA-256 on both ends).
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


def parse_ping(output: str) -> tuple[float | None, str]:
    """(packet loss in percent, average rtt in ms as printed) from ping's summary; None if there is none."""
    loss = re.search(r"(\d+(?:\.\d+)?)% packet loss", output)
    rtt = re.search(r"= [\d.]+/([\d.]+)/", output)
    return (float(loss.group(1)) if loss else None), (rtt.group(1) if rtt else "?")


def ping_targets(tun) -> list[tuple[str, str, str]]:
    """(label, namespace, destination) of the demo's pings: both directions, IPv4 and IPv6."""
    return [("IPv4 a->b", tun.a.ns, tun.b.inner_ip), ("IPv4 b->a", tun.b.ns, tun.a.inner_ip),
            ("IPv6 a->b", tun.a.ns, tun.b.inner_ip6), ("IPv6 b->a", tun.b.ns, tun.a.inner_ip6)]


def run_demo(args: argparse.Namespace) -> int:
    from turbowg.testing.cpu import process_tree_cpu_seconds
    from turbowg.testing.netns import HarnessError, ns_run
    from turbowg.testing.tcpxfer import tcp_transfer
    from turbowg.testing.tunnel import tunnel, wait_for_ping

    if os.geteuid() != 0:
        print("turbowg demo: needs root (it creates network namespaces and TUN devices)", file=sys.stderr)
        return 1
    if not 0 < args.duration <= 600:
        print("turbowg demo: --duration must be in (0, 600]", file=sys.stderr)
        return 2
    print("turbowg demo: building namespaces a and b, joined by a veth pair, with a turbowg tunnel between them")
    pings: dict[str, tuple[float | None, str]] = {}
    try:
        with tunnel("turbowg", "turbowg") as tun:
            print(f"  tunnel: {tun.a.ifname} ({tun.a.inner_ip}, {tun.a.inner_ip6}) in {tun.a.ns}"
                  f"  <->  {tun.b.ifname} ({tun.b.inner_ip}, {tun.b.inner_ip6}) in {tun.b.ns}")
            wait_for_ping(tun.a.ns, tun.b.inner_ip, 15)  # the first handshake; the pings below count
            for label, ns, dst in ping_targets(tun):
                proc = ns_run(ns, "ping", "-c", "5", "-i", "0.2", "-W", "2", dst, check=False, timeout=20)
                pings[label] = parse_ping(proc.stdout)
            cpu_before = process_tree_cpu_seconds(tun.daemon_pids)
            tcp_error = ""
            try:
                sent, received = tcp_transfer(tun.a, tun.b, tun.b.inner_ip, 0, seconds=args.duration,
                                              timeout=args.duration + 60)
            except (AssertionError, HarnessError) as exc:
                sent, received, tcp_error = "", "", str(exc) or "transfer failed"
            cpu = process_tree_cpu_seconds(tun.daemon_pids) - cpu_before
            show = tun.a.wg("show", tun.a.ifname, check=False).stdout
    except HarnessError as exc:
        print(f"turbowg demo: {exc}", file=sys.stderr)
        return 1
    ok = True
    print("\nSummary")
    for label, (loss, rtt) in pings.items():
        shown = "no summary from ping" if loss is None else f"{loss:g}% loss, avg rtt {rtt} ms"
        print(f"  ping {label}: {shown}")
        ok = ok and loss == 0.0
    if not tcp_error and sent and sent == received:
        nbytes = int(sent.split()[0])
        print(f"  TCP a->b ({args.duration:g} s): {nbytes * 8 / args.duration / 1e9:.2f} Gbit/s received, "
              f"{nbytes / 1e6:.0f} MB, SHA-256 equal on both ends"
              + (f", daemon CPU {cpu / (nbytes / 1e9):.1f} s/GB" if nbytes else ""))
    else:
        ok = False
        print(f"  TCP a->b: failed: {tcp_error or f'sent {sent!r}, received {received!r}'}")
    print("  wg show (side a):")
    for line in show.strip().splitlines():
        print(f"    {line}")
    print("\nAll namespaces, interfaces and sockets have been removed.")
    if not ok:
        print("turbowg demo: FAILED (packet loss or a broken transfer, see above)", file=sys.stderr)
    return 0 if ok else 1
