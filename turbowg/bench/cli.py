"""`turbowg bench tunnel|relay|datapath`: the benchmarks, each comparing against a peer measured in the same run."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="run a benchmark (tunnel: vs wireguard-go; relay: DERP relay)")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    from turbowg.bench.datapath import add_datapath_bench
    from turbowg.bench.flood import add_flood_bench
    from turbowg.bench.relay import add_relay_bench
    from turbowg.bench.tunnel import add_tunnel_bench

    add_tunnel_bench(bench_sub)
    add_relay_bench(bench_sub)
    add_datapath_bench(bench_sub)
    add_flood_bench(bench_sub)
