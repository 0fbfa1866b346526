"""`turbowg bench tunnel|relay|datapath`: the benchmarks, each comparing against a peer measured in the same run."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

Command = Callable[[argparse.Namespace], int]


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


def add_bench(bench_subparsers: argparse._SubParsersAction, name: str, help: str, doc: str,
              add_arguments: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    """`turbowg bench NAME`: its subparser, described by the first paragraph of the module's `doc`."""
    parser = bench_subparsers.add_parser(name, help=help, description=doc.split("\n\n")[0])
    add_arguments(parser)
    return parser


def bench_command(name: str, errors: tuple[type[BaseException], ...]) -> Callable[[Command], Command]:
    """Decorator of a bench's command: one of `errors` (bad arguments, a missing prerequisite) is printed
    as `turbowg bench NAME: <error>` and the command returns 2."""
    def wrap(command: Command) -> Command:
        @functools.wraps(command)
        def run(args: argparse.Namespace) -> int:
            try:
                return command(args)
            except errors as exc:
                print(f"turbowg bench {name}: {exc}", file=sys.stderr)
                return 2
        return run
    return wrap


def standalone_main(prog: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                    argv: list[str] | None = None) -> int:
    """`python -m turbowg.bench.X`: the same arguments as `turbowg bench X`, without the turbowg CLI."""
    parser = argparse.ArgumentParser(prog=prog)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
