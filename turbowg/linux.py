"""Linux socket and ioctl constants that Python's `socket` module does not export on every version, in
one place (linux/udp.h, asm-generic/socket.h, linux/if_tun.h, linux/sockios.h)."""

from __future__ import annotations

import socket

# linux/udp.h
SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)  # send: one buffer cut into equal datagrams (GSO)
UDP_GRO = getattr(socket, "UDP_GRO", 104)  # receive: several datagrams of one flow in one read

# asm-generic/socket.h
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
SO_MARK = getattr(socket, "SO_MARK", 36)
SO_BUSY_POLL = getattr(socket, "SO_BUSY_POLL", 46)

# linux/if_tun.h
TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_USO4 = 0x20
TUN_F_USO6 = 0x40

# linux/if.h, linux/sockios.h
IFF_UP = 0x1
IFNAMSIZ = 16
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCGIFMTU = 0x8921
SIOCSIFMTU = 0x8922
