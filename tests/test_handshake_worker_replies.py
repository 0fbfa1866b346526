"""recvmmsg.py ReplySender: the worker's cookie replies, many per sendmmsg(2), arrive as sendto would send
them (bytes, destination, source port), IPv4 (v4-mapped) and IPv6, more than a batch of slots; a refused
datagram is counted and the others still go; the sendto fallback does the same."""

from __future__ import annotations

import os
import socket
import time

import pytest

from turbowg.conn import recvmmsg
from turbowg.conn.recvmmsg import ReplySender


def _receiver(family: int, host: str) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


def _drain(sock: socket.socket) -> list[tuple[bytes, int]]:
    out = []
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            data, addr = sock.recvfrom(2048)
        except BlockingIOError:
            if out:
                time.sleep(0.02)
                try:
                    data, addr = sock.recvfrom(2048)
                except BlockingIOError:
                    break
            else:
                time.sleep(0.01)
                continue
        out.append((data, addr[1]))
    return out


@pytest.mark.parametrize("batched", [True, False])
def test_replies_arrive_as_sent(batched, monkeypatch):
    if not batched:
        monkeypatch.setattr(recvmmsg, "libc_sendmmsg", lambda: None)
    sender = ReplySender(slots=8)
    assert (sender._sendmmsg is not None) == batched
    out = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    out.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    out.bind(("::", 0))
    v4 = _receiver(socket.AF_INET, "127.0.0.1")
    v6 = _receiver(socket.AF_INET6, "::1")
    try:
        replies = []
        for i in range(21):  # more than two batches of 8, the two families interleaved
            target = v4 if i % 2 else v6
            addr = socket.inet_aton("127.0.0.1") if i % 2 else socket.inet_pton(socket.AF_INET6, "::1")
            size = 64 if i != 5 else 100  # one larger than a slot: sent alone
            replies.append((bytes([3, 0, 0, 0, i]) + os.urandom(size - 5), addr, target.getsockname()[1]))
        replies.insert(7, (b"\x03" + bytes(63), socket.inet_aton("127.0.0.1"), 0))  # port 0: refused
        assert sender.send(out, replies) == 1
        got4, got6 = _drain(v4), _drain(v6)
        src = out.getsockname()[1]
        assert sorted(got4) == sorted((r, src) for r, a, _p in replies if len(a) == 4 and _p)
        assert sorted(got6) == sorted((r, src) for r, a, _p in replies if len(a) == 16)
    finally:
        for sock in (out, v4, v6):
            sock.close()
