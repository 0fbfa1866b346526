"""`turbowg derp-client`: connect to a DERP relay and send, receive, ping or print keys.

The relay itself (`turbowg relay`) is turbowg/relay/cli.py; this command only needs the protocol side.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from turbowg.derp import keys


def register(subparsers: Any) -> None:
    client = subparsers.add_parser("derp-client", help="talk to a DERP relay (send, recv, ping, info)")
    csub = client.add_subparsers(dest="derp_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("url", help="relay URL, e.g. https://derp.example.com or http://127.0.0.1:3340 "
                                   "(ws:// or wss:// for DERP over WebSocket)")
        p.add_argument("--websocket", action="store_true",
                       help="speak DERP over a WebSocket (derp subprotocol), as browsers and clients behind "
                            "WebSocket-only proxies do; same as a ws:// or wss:// URL")
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
    await client.connect(args.url, verify=args.verify, timeout=args.timeout, websocket=args.websocket)
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
