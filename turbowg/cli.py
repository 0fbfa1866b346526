"""The `turbowg` command: demo, bench, doctor, relay, derp-client.

Each subsystem registers its own subcommands through a `register(subparsers)` function, so this file
only wires them together.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="turbowg", description="Userspace WireGuard and DERP relay")
    sub = parser.add_subparsers(dest="command", required=True)
    from turbowg import demo, doctor
    from turbowg.bench import cli as bench_cli
    from turbowg.daemon import status as status_cli
    from turbowg.derp import cli as derp_cli
    from turbowg.fuzz import runner as fuzz_cli
    from turbowg.relay import cli as relay_cli

    demo.register(sub)
    bench_cli.register(sub)
    doctor.register(sub)
    fuzz_cli.register(sub)
    relay_cli.register(sub)
    derp_cli.register(sub)
    status_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
