"""`turbowg relay` (a drop-in for derper's command line) and `turbowg derp-client`.

derper uses Go's flag package, so its flags are single-dash words (`-hostname=x`, `-stun=false`);
both that form and `--hostname x` are accepted here.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from typing import Any

from turbowg.derp import keys


def _bool(text: str) -> bool:
    v = text.strip().lower()
    if v in ("1", "t", "true", "yes", "on"):
        return True
    if v in ("0", "f", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def _flag(parser: argparse.ArgumentParser, name: str, *aliases: str, **kw: Any) -> None:
    """Register `-name` and `--name` (derper/Go style and GNU style) plus any aliases."""
    parser.add_argument(f"-{name}", f"--{name}", *aliases, **kw)


def register(subparsers: Any) -> None:
    relay = subparsers.add_parser(
        "relay", help="run a DERP relay (derper-compatible flags)",
        description="DERP relay, wire-compatible with Tailscale's derper (protocol version 2).",
    )
    relay.add_argument("-a", "--a", "--addr", dest="addr", default=None,
                       help="listen address, e.g. ':443' (default :443, or :3340 with -dev)")
    relay.add_argument("-c", "--c", "--config", dest="config", default="",
                       help="derper JSON key file {\"PrivateKey\": \"privkey:...\"}, created if missing")
    _flag(relay, "hostname", default="derp.example.com", help="TLS host name (certificate file stem)")
    _flag(relay, "certmode", default="manual", help="only 'manual' (cert files in -certdir)")
    _flag(relay, "certdir", default=".", help="directory with <hostname>.crt and <hostname>.key")
    _flag(relay, "stun", type=_bool, nargs="?", const=True, default=True, help="run STUN (default true)")
    _flag(relay, "stun-port", dest="stun_port", type=int, default=3478, help="STUN UDP port (default 3478)")
    _flag(relay, "mesh-with", dest="mesh_with", default="", help="comma-separated peer relays of this region")
    _flag(relay, "mesh-psk-file", dest="mesh_psk_file", default="", help="file with the region's mesh key")
    _flag(relay, "dev", type=_bool, nargs="?", const=True, default=False,
          help="plain HTTP on :3340 with an ephemeral key unless -c is given")
    _flag(relay, "http-port", dest="http_port", type=int, default=-1,
          help="also serve plain HTTP on this port (default off)")
    relay.add_argument("--workers", type=int, default=0, help="worker processes (default: CPU count)")
    relay.add_argument("--send-queue-depth", type=int, default=32, help="packets queued per client (default 32)")
    relay.add_argument("-v", "--verbose", action="store_true")
    relay.set_defaults(func=run_relay_command)

    client = subparsers.add_parser("derp-client", help="talk to a DERP relay (send, recv, ping, info)")
    csub = client.add_subparsers(dest="derp_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("url", help="relay URL, e.g. https://derp.example.com or http://127.0.0.1:3340")
        p.add_argument("--private-key", default="", help="privkey:<hex> (default: a fresh key)")
        p.add_argument("--verify", action="store_true", help="verify the relay's TLS certificate")
        p.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")

    p = csub.add_parser("info", help="connect and print the relay's public key and ours")
    common(p)
    p = csub.add_parser("send", help="send packets to a peer key")
    common(p)
    p.add_argument("--to", required=True, help="destination nodekey:<hex>")
    p.add_argument("--data", default="hello", help="packet payload text (default 'hello')")
    p.add_argument("--count", type=int, default=1)
    p = csub.add_parser("recv", help="print packets received (until --count or --timeout)")
    common(p)
    p.add_argument("--count", type=int, default=0, help="stop after this many packets (0 = until timeout)")
    p = csub.add_parser("ping", help="measure Ping/Pong round trips through the relay")
    common(p)
    p.add_argument("--count", type=int, default=3)
    client.set_defaults(func=run_client_command)


def run_relay_command(args: argparse.Namespace) -> int:
    from turbowg.derp.app import RelayConfig, RelayConfigError, run_relay

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s")
    config = RelayConfig(
        addr=args.addr if args.addr is not None else (":3340" if args.dev else ":443"),
        config_path=args.config, hostname=args.hostname, certmode=args.certmode, certdir=args.certdir,
        stun=args.stun, stun_port=args.stun_port,
        mesh_with=[p.strip() for p in args.mesh_with.split(",") if p.strip()],
        mesh_psk_file=args.mesh_psk_file, dev=args.dev, http_port=args.http_port, workers=args.workers,
        send_queue_depth=args.send_queue_depth,
    )
    try:
        return run_relay(config)
    except RelayConfigError as exc:
        print(f"turbowg relay: {exc}", file=sys.stderr)
        return 2


def run_client_command(args: argparse.Namespace) -> int:
    from turbowg.derp.client import DerpClientError

    try:
        private = keys.parse_private_key(args.private_key) if args.private_key else None
        dst = keys.parse_public_key(args.to) if getattr(args, "to", None) else None
    except keys.KeyFormatError as exc:
        print(f"turbowg derp-client: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_client_main(args, private, dst))
    except DerpClientError as exc:
        print(f"turbowg derp-client: {exc}", file=sys.stderr)
        return 1


async def _client_main(args: argparse.Namespace, private: bytes | None, dst: bytes | None) -> int:
    from turbowg.derp.client import DerpClient
    from turbowg.derp.codec import PeerGone, ReceivedPacket

    client = DerpClient(private)
    await client.connect(args.url, verify=args.verify, timeout=args.timeout)
    try:
        cmd = args.derp_command
        if cmd == "info":
            assert client.server_key is not None
            print(f"relay {keys.format_public_key(client.server_key)}")
            print(f"me    {keys.format_public_key(client.public_key)}")
        elif cmd == "send":
            assert dst is not None
            for _ in range(args.count):
                client.send(dst, args.data.encode())
                await client.drain()
            await client.ping(args.timeout)  # the relay has handled everything before the pong
            print(f"sent {args.count} packet(s) to {keys.format_public_key(dst)}")
        elif cmd == "recv":
            print(f"listening as {keys.format_public_key(client.public_key)}", flush=True)
            got = 0
            deadline = time.monotonic() + args.timeout
            while args.count == 0 or got < args.count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    msg = await asyncio.wait_for(client.recv(), remaining)
                except TimeoutError:
                    break
                if isinstance(msg, ReceivedPacket):
                    got += 1
                    print(f"from {keys.format_public_key(msg.source)} {len(msg.data)} bytes: {msg.data!r}", flush=True)
                elif isinstance(msg, PeerGone):
                    print(f"peer gone {keys.format_public_key(msg.peer)} reason {msg.reason}", flush=True)
            if args.count and got < args.count:
                print(f"received {got} of {args.count} packet(s)", file=sys.stderr)
                return 1
        elif cmd == "ping":
            for _ in range(args.count):
                rtt = await client.ping(args.timeout)
                print(f"pong in {rtt * 1000:.2f} ms", flush=True)
        return 0
    finally:
        await client.close()
