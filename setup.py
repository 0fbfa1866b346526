"""Optional C accelerators for the data path; every one has a pure-Python fallback.

Every extension is `optional=True`: if a compiler or the OpenSSL headers are missing, `pip install`
still succeeds and turbowg runs on the Python implementations (slower, same bytes on the wire).
"""

from setuptools import Extension, setup

_CFLAGS = ["-O3", "-std=c11", "-Wall", "-Wno-unused-function"]

setup(
    ext_modules=[
        # GSO split / checksum completion on TUN reads, GRO coalescing on TUN writes.
        Extension("turbowg.tun._offload", ["turbowg/tun/_offload.c"], extra_compile_args=_CFLAGS,
                  optional=True),
        # Batched ChaCha20-Poly1305 seal/open of transport messages (OpenSSL libcrypto) + replay window.
        Extension("turbowg.noise._aead", ["turbowg/noise/_aead.c"], extra_compile_args=_CFLAGS,
                  libraries=["crypto"], optional=True),
        # Inner IP header + allowed-source checks of opened packets (the device's side of the receive path).
        Extension("turbowg.device._route", ["turbowg/device/_route.c"], extra_compile_args=_CFLAGS,
                  optional=True),
        # The handshake worker's screening of a recvmmsg batch: header, size, mac1 (BLAKE2s), per-source limiter.
        Extension("turbowg.conn._hsscreen", ["turbowg/conn/_hsscreen.c"], extra_compile_args=_CFLAGS,
                  optional=True),
        # The relay's forwarding plane: an epoll loop owning authenticated DERP client sockets.
        Extension("turbowg.relay._fastpath", ["turbowg/relay/_fastpath.c"], extra_compile_args=_CFLAGS,
                  optional=True),
    ],
)
