"""Send bad datagrams to a WireGuard port and report whether anything came back.

Run inside a namespace: `python3 junk.py HOST PORT PEER_PUBLIC_B64 [REPLAY_HEX]`. Prints a JSON line
{"sent": n, "answers": m}. Nothing here is authenticated, so a correct peer answers none of it.
"""

from __future__ import annotations

import json
import os
import random
import socket
import sys
import time

from turbowg.noise.cookie import CookieGenerator
from turbowg.noise.handshake import Handshake, LocalIdentity, create_initiation
from turbowg.noise.keys import decode_key
from turbowg.noise.primitives import generate_private_key


def bad_datagrams(peer_public: bytes) -> list[bytes]:
    rng = random.Random(7)
    out = [
        b"\x01",  # truncated to one byte
        b"\x01\x00\x00\x00" + os.urandom(60),  # truncated initiation
        b"\x01\x00\x00\x00" + os.urandom(200),  # oversized initiation
        b"\x02\x00\x00\x00" + os.urandom(40),  # truncated response
        b"\x03\x00\x00\x00" + os.urandom(100),  # oversized cookie reply
        b"\x04\x00\x00\x00" + os.urandom(8),  # truncated data
        b"\x04\x00\x00\x00" + os.urandom(1500),  # data for an unknown index
        b"\x04\x00\x00\x00" + os.urandom(60000),  # oversized data
        b"\x09\x00\x00\x00" + os.urandom(100),  # unknown type
        b"",  # empty
    ]
    out += [rng.randbytes(rng.randrange(1, 1500)) for _ in range(200)]
    # A well-formed initiation with a valid mac1 from a key the peer does not know.
    stranger = LocalIdentity(generate_private_key())
    hs = Handshake(peer_public, local=stranger)
    msg = create_initiation(hs, rng.randrange(1 << 32), time.time())
    CookieGenerator(peer_public).add_macs(msg, time.monotonic())
    out.append(bytes(msg))
    return out


def main() -> int:
    host, port, peer_b64 = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    replay = bytes.fromhex(sys.argv[4]) if len(sys.argv) > 4 else None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        datagrams = bad_datagrams(decode_key(peer_b64))
        if replay:
            datagrams += [replay] * 5
        for d in datagrams:
            s.sendto(d, (host, port))
        s.settimeout(0.2)
        answers = 0
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            try:
                s.recv(65535)
                answers += 1
            except TimeoutError:
                pass
    print(json.dumps({"sent": len(datagrams), "answers": answers}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
