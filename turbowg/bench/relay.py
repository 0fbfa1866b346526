"""`turbowg bench relay` (being written; this placeholder keeps the CLI importable)."""

from __future__ import annotations

import argparse
from typing import Any


def add_relay_bench(bench_subparsers: Any) -> None:
    p = bench_subparsers.add_parser("relay", help="DERP relay throughput/latency benchmark")
    p.set_defaults(func=_not_yet)


def _not_yet(args: argparse.Namespace) -> int:
    print("turbowg bench relay: not available yet")
    return 2
