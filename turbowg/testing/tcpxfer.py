"""A TCP transfer through a tunnel whose two ends print `<bytes> <sha256>` of what they sent / received.

    python -m turbowg.testing.tcpxfer serve HOST PORT --timeout 120    # prints "ready", then "n sha"
    python -m turbowg.testing.tcpxfer send HOST PORT --bytes N         # prints "n sha"

`tcp_transfer(sender, receiver, ...)` runs both ends in their namespaces and returns both lines.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import select
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from turbowg.testing.netns import exec_args

if TYPE_CHECKING:
    from turbowg.testing.tunnel import Side

CHUNK = 1 << 16
MODULE = [sys.executable, "-m", "turbowg.testing.tcpxfer"]


def payload_chunks(total: int, seed: int):
    rng = random.Random(seed)
    sent = 0
    while sent < total:
        n = min(CHUNK, total - sent)
        yield rng.randbytes(n)
        sent += n


def accept_one(host: str, port: int, timeout: float) -> socket.socket:
    """Listen on host:port, say "ready" on stdout, accept one connection within `timeout` (then stop listening)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((host, port))
        srv.listen(1)
        srv.settimeout(timeout)
        print("ready", flush=True)
        conn, _ = srv.accept()
    return conn


def serve_tcp(host: str, port: int, timeout: float) -> None:
    conn = accept_one(host, port, timeout)
    conn.settimeout(timeout)
    digest = hashlib.sha256()
    total = 0
    with conn:
        while True:
            data = conn.recv(1 << 20)
            if not data:
                break
            digest.update(data)
            total += len(data)
    print(f"{total} {digest.hexdigest()}", flush=True)


def connect_retrying(host: str, port: int, deadline: float) -> socket.socket:
    """A TCP connection to host:port, tried every 0.2 s until `deadline` (the other end may not listen yet)."""
    for _ in range(int(max(0.0, deadline - time.monotonic()) / 0.2) + 1):
        try:
            return socket.create_connection((host, port), timeout=5)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    raise TimeoutError(f"no connection to {host}:{port}")


def send_tcp(host: str, port: int, total: int, seed: int, timeout: float, seconds: float | None = None) -> None:
    """Send `total` bytes, or with `seconds`, as many as fit in that time (then print what was sent)."""
    digest = hashlib.sha256()
    sock = connect_retrying(host, port, time.monotonic() + timeout)
    sock.settimeout(timeout)
    sent = 0
    stop_at = time.monotonic() + seconds if seconds else None
    with sock:
        for chunk in payload_chunks(total if stop_at is None else 1 << 50, seed):
            digest.update(chunk)
            sock.sendall(chunk)
            sent += len(chunk)
            if stop_at is not None and time.monotonic() >= stop_at:
                break
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)
    print(f"{sent} {digest.hexdigest()}", flush=True)


def wait_ready(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait (bounded) for a helper started with stdout=PIPE, text=True to print its "ready" line."""
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], timeout)
    return bool(readable) and proc.stdout.readline().strip() == "ready"


def tcp_transfer(sender: Side, receiver: Side, dst_ip: str, nbytes: int, port: int = 5201,
                 timeout: float = 240, seconds: float | None = None) -> tuple[str, str]:
    """Send `nbytes` (or for `seconds`) over TCP through the tunnel; return (sent "n sha", received "n sha")."""
    limit = ["--seconds", f"{seconds:g}"] if seconds else []
    server = subprocess.Popen(exec_args(receiver.ns, *MODULE, "serve", dst_ip, str(port), "--timeout", str(timeout)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_ready(server, 15), "receiver did not get ready"
        sent = sender.sh(*MODULE, "send", dst_ip, str(port), "--bytes", str(nbytes), "--timeout", str(timeout),
                         *limit, timeout=timeout + 10).stdout.strip()
        received, err = server.communicate(timeout=timeout)
        assert server.returncode == 0, err
        return sent, received.strip()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m turbowg.testing.tcpxfer")
    parser.add_argument("mode", choices=["serve", "send"])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--bytes", type=int, default=50 * 1024 * 1024)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument("--seconds", type=float, help="send: for this long instead of --bytes")
    args = parser.parse_args(argv)
    if args.mode == "serve":
        serve_tcp(args.host, args.port, args.timeout)
    else:
        send_tcp(args.host, args.port, args.bytes, args.seed, args.timeout, args.seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
