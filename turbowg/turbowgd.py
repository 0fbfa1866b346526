"""`turbowgd IFNAME`: a drop-in for `wireguard-go IFNAME`.

It creates the TUN interface and the UAPI socket, then goes to the background once both are ready
(so `wg-quick` can configure it the moment the command returns). `-f`/`--foreground` or
`WG_PROCESS_FOREGROUND=1` keeps it in the foreground. `LOG_LEVEL` is `verbose`/`debug`, `error`
(default) or `silent`, as wireguard-go. It exits on SIGTERM/SIGINT or when the interface is deleted,
removing its UAPI socket.
"""

from __future__ import annotations

import logging
import os
import sys

from turbowg import __version__

USAGE = "Usage: turbowgd [-f/--foreground] INTERFACE-NAME"


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


def _valid_ifname(name: str) -> bool:
    return 0 < len(name) < 16 and "/" not in name and not any(c.isspace() for c in name) and name not in (".", "..")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args in (["--version"], ["-v"]):
        print(f"turbowgd v{__version__}")
        return 0
    foreground = os.environ.get("WG_PROCESS_FOREGROUND") == "1"
    if args and args[0] in ("-f", "--foreground"):
        foreground = True
        args = args[1:]
    if len(args) != 1:
        print(USAGE, file=sys.stderr)
        return 2
    ifname = args[0]
    if not _valid_ifname(ifname):
        print(f"turbowgd: invalid interface name {ifname!r}", file=sys.stderr)
        return 2

    from turbowg.device import runtime

    offloads = runtime.offloads_from_env()
    if foreground:
        _setup_logging(ifname)
        return runtime.run(ifname, offloads=offloads)
    return _daemonize(ifname, offloads)


def _daemonize(ifname: str, offloads: bool) -> int:
    """Fork; the child runs the interface and tells the parent through a pipe when it is ready."""
    from turbowg.device import runtime

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
        code = runtime.run(ifname, offloads=offloads, on_ready=ready, on_error=lambda m: tell(m.encode()))
    finally:
        tell(b"the daemon failed to start\n")
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
