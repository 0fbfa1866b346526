"""TCP or UDP transfer helper run inside a namespace: `serve` prints the SHA-256 of what arrived,
`send` sends N bytes of deterministic pseudo-random data and prints their SHA-256."""

from __future__ import annotations

import argparse
import hashlib
import random
import socket
import sys
import time

CHUNK = 1 << 16


def payload_chunks(total: int, seed: int):
    rng = random.Random(seed)
    sent = 0
    while sent < total:
        n = min(CHUNK, total - sent)
        yield rng.randbytes(n)
        sent += n


def serve_tcp(host: str, port: int, timeout: float) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((host, port))
        srv.listen(1)
        srv.settimeout(timeout)
        print("ready", flush=True)
        conn, _ = srv.accept()
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


def send_tcp(host: str, port: int, total: int, seed: int, timeout: float) -> None:
    digest = hashlib.sha256()
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    sock.settimeout(timeout)
    with sock:
        for chunk in payload_chunks(total, seed):
            digest.update(chunk)
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        sock.recv(1)
    print(f"{total} {digest.hexdigest()}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["serve", "send"])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--bytes", type=int, default=50 * 1024 * 1024)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=120)
    args = parser.parse_args()
    if args.mode == "serve":
        serve_tcp(args.host, args.port, args.timeout)
    else:
        send_tcp(args.host, args.port, args.bytes, args.seed, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
