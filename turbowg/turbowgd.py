"""`turbowgd IFNAME`: a drop-in for `wireguard-go IFNAME`.

It creates the TUN interface and the UAPI socket, then goes to the background once both are ready
(so `wg-quick` can configure it the moment the command returns). `-f`/`--foreground` or
`WG_PROCESS_FOREGROUND=1` keeps it in the foreground. `LOG_LEVEL` is `verbose`/`debug`, `error`
(default) or `silent`, as wireguard-go. It exits on SIGTERM/SIGINT or when the interface is deleted,
removing its UAPI socket.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from turbowg import __version__

# The kernel's dev_valid_name(): what it refuses, we refuse before creating anything.
IFNAMSIZ = 16


def interface_name_error(name: str) -> str | None:
    """Why `name` cannot be a Linux interface name (None if it can).

    The kernel (net/core/dev.c dev_valid_name) refuses an empty name, one of IFNAMSIZ-1 = 15 bytes or more
    after encoding, "." and "..", and any '/', ':' or whitespace byte. turbowgd also refuses a leading '-' (an
    option typed where the name goes, e.g. `turbowgd --hlep`) and '%' (TUNSETIFF would expand "%d" into a
    number, so the interface would not be the one the UAPI socket is named after).
    """
    if not name:
        return "the interface name is empty"
    encoded = name.encode("utf-8", "surrogateescape")
    if len(encoded) >= IFNAMSIZ:
        return f"the interface name is {len(encoded)} bytes; Linux allows at most {IFNAMSIZ - 1} bytes"
    if name in (".", ".."):
        return f"the interface name cannot be {name!r}"
    if name.startswith("-"):
        return "the interface name starts with '-' (an option where the name goes?)"
    for char in ("/", ":", "%", "\0"):
        if char in name:
            return f"the interface name contains {char!r}"
    # The kernel's isspace() is byte-wise and counts 0xA0 too (lib/ctype.c).
    if any(byte in b" \t\n\v\f\r\xa0" for byte in encoded) or any(c.isspace() for c in name):
        return "the interface name contains whitespace (a byte the kernel's isspace() accepts)"
    return None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="turbowgd",
        description="Userspace WireGuard daemon, a drop-in for wireguard-go: creates the TUN interface "
                    "INTERFACE-NAME and its UAPI socket /var/run/wireguard/INTERFACE-NAME.sock, then goes to the "
                    "background. Configure it with wg(8) or wg-quick(8).",
        epilog="Environment: WG_PROCESS_FOREGROUND=1 (as -f), LOG_LEVEL=verbose|debug|info|error|silent "
               "(default error), TURBOWG_OFFLOADS=0 (no TUN/UDP offloads), TURBOWG_DERP=URL (as --derp), "
               "TURBOWG_DERP_CA=FILE (as --derp-ca), TURBOWG_NO_C=1 (pure-Python data path), "
               "TURBOWG_HANDSHAKE_WORKER=0 (handshakes in the event loop, no worker process), "
               "TURBOWG_HANDSHAKE_STEERING=0 (no kernel steering of handshakes to the worker's socket), "
               "TURBOWG_TRACE_LATENCY=1 (per-stage latency table on SIGUSR1 and at exit), "
               "TURBOWG_BUSY_POLL_US=N (spin N us after a wake; off by default).")
    parser.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    parser.add_argument("-v", "--version", action="version", version=f"turbowgd v{__version__}")
    parser.add_argument("--derp", metavar="URL", default=None,
                        help="home DERP relay (http://10.0.0.3:3340, https://relay.example.net): peers that UDP "
                             "cannot reach go through it, and move to a direct path when one opens")
    parser.add_argument("--derp-ca", metavar="FILE", default=None,
                        help="PEM CA certificate(s) the https relay's certificate must chain to "
                             "(default: the system trust store)")
    parser.add_argument("ifname", metavar="INTERFACE-NAME", help="the interface to create (at most 15 bytes)")
    return parser


def _log_level() -> int | None:
    level = os.environ.get("LOG_LEVEL", "error").strip().lower()
    if level in ("verbose", "debug"):
        return logging.DEBUG
    if level == "info":
        return logging.INFO
    if level == "silent":
        return None
    return logging.ERROR


def _setup_logging(ifname: str) -> None:
    level = _log_level()
    if level is None:
        logging.disable(logging.CRITICAL)
        return
    logging.basicConfig(level=level, format=f"%(levelname)s: ({ifname}) %(asctime)s %(message)s",
                        stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)  # --help/--version/usage exit here
    ifname = args.ifname
    problem = interface_name_error(ifname)
    if problem is not None:
        print(f"turbowgd: invalid interface name {ifname!r}: {problem}", file=sys.stderr)
        return 1
    foreground = args.foreground or os.environ.get("WG_PROCESS_FOREGROUND") == "1"
    derp = args.derp or os.environ.get("TURBOWG_DERP", "").strip() or None
    derp_ca = args.derp_ca or os.environ.get("TURBOWG_DERP_CA", "").strip() or None
    if derp is not None:
        from turbowg.daemon.derp_link import check_url

        problem = check_url(derp)
        if problem is not None:
            print(f"turbowgd: {problem}", file=sys.stderr)
            return 1
        if derp_ca is not None and not os.path.isfile(derp_ca):
            print(f"turbowgd: --derp-ca {derp_ca}: no such file", file=sys.stderr)
            return 1

    from turbowg.daemon import runtime

    offloads = runtime.offloads_from_env()
    if foreground:
        _setup_logging(ifname)
        return runtime.run(ifname, offloads=offloads, derp=derp, derp_ca=derp_ca)
    return _daemonize(ifname, offloads, derp, derp_ca)


def _daemonize(ifname: str, offloads: bool, derp: str | None = None, derp_ca: str | None = None) -> int:
    """Fork; the child runs the interface and tells the parent through a pipe when it is ready."""
    from turbowg.daemon import runtime

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid > 0:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            answer = pipe.read()
        if answer.startswith(b"ok"):
            return 0
        message = answer.decode(errors="replace").strip() or "the daemon exited before it was ready"
        print(f"turbowgd: {message}", file=sys.stderr)
        return 1

    # Child: a session of its own, stdin from /dev/null. As wireguard-go, stdout/stderr stay attached only
    # when LOG_LEVEL is set explicitly (and not silent): otherwise a caller reading our output would wait
    # for the daemon to exit.
    os.close(read_fd)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    if "LOG_LEVEL" not in os.environ or _log_level() is None:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
    os.close(devnull)
    _setup_logging(ifname)
    status = {"told": False}

    def tell(message: bytes) -> None:
        if not status["told"]:
            status["told"] = True
            try:
                os.write(write_fd, message)
            finally:
                os.close(write_fd)

    def ready() -> None:
        tell(b"ok\n")

    code = 1
    try:
        code = runtime.run(ifname, offloads=offloads, on_ready=ready, on_error=lambda m: tell(m.encode()),
                           derp=derp, derp_ca=derp_ca)
    finally:
        tell(b"the daemon failed to start\n")
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
