"""Capture one WireGuard data packet (type 4, not a keepalive) sent to a UDP port; print its payload as hex.

Run inside a namespace: `python3 sniff.py IFACE PORT TIMEOUT`. Uses an AF_PACKET socket, so no tcpdump.
"""

from __future__ import annotations

import socket
import struct
import sys
import time

ETH_P_IP = 0x0800


def main() -> int:
    iface, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    with socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IP)) as s:
        s.bind((iface, 0))
        s.settimeout(0.5)
        print("ready", flush=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                packet = s.recv(65535)
            except TimeoutError:
                continue
            if len(packet) < 28 or packet[9] != socket.IPPROTO_UDP:
                continue
            ihl = (packet[0] & 0x0F) * 4
            _sport, dport = struct.unpack_from("!HH", packet, ihl)
            payload = packet[ihl + 8:]
            if dport == port and payload[:1] == b"\x04" and len(payload) > 32:
                print(payload.hex(), flush=True)
                return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
