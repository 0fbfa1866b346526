"""`turbowg status IFNAME [--json]`: the path of every peer of a turbowgd interface that uses a DERP relay.

The daemon (turbowg/daemon/derp_link.py) listens on ``/var/run/wireguard/IFNAME.status`` (a second unix
socket beside the UAPI one, so `wg` and its `.sock` enumeration see nothing new): a client connects and reads
one JSON document, then the daemon closes. Per peer: the path now (a direct endpoint or the relay), the last
probe RTT of every candidate endpoint, bytes and packets each way per path, when the path last changed; and
device counters (packets per path, path changes, probes sent / answered).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import stat
import sys
import time

SOCKET_DIR = "/var/run/wireguard"
MAX_STATUS_BYTES = 16 << 20  # a client reads at most this much (thousands of peers fit)


def status_path(ifname: str, socket_dir: str = SOCKET_DIR) -> str:
    return os.path.join(socket_dir, f"{ifname}.status")


class StatusServer:
    """Answers each connection with the runtime's status as JSON, then closes it."""

    def __init__(self, runtime, loop, path: str) -> None:
        self.runtime = runtime
        self.loop = loop
        self.path = path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(path)
            if stat.S_ISSOCK(st.st_mode):
                os.unlink(path)  # stale (the UAPI socket, bound first, proved nobody else serves IFNAME)
        old = os.umask(0o077)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        sock.listen(16)
        sock.setblocking(False)
        self.sock = sock
        st = os.stat(path)
        self._identity = (st.st_dev, st.st_ino)
        loop.add_reader(sock.fileno(), self._on_accept)

    def _on_accept(self) -> None:
        for _ in range(16):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            with conn:
                try:
                    data = json.dumps(self.runtime_status()).encode() + b"\n"
                    conn.settimeout(1.0)
                    conn.sendall(data)
                except (OSError, ValueError):
                    pass

    def runtime_status(self) -> dict:
        runtime = self.runtime
        link = runtime.derp_link
        status = link.paths.status(runtime.device, time.monotonic())
        status["interface"] = runtime.ifname
        status["listen_port"] = runtime.device.listen_port
        status["relay"]["connects"] = link.connects
        status["counters"].update(link.counters)
        return status

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self.path)


def start_status_server(runtime, loop) -> StatusServer:
    return StatusServer(runtime, loop, status_path(runtime.ifname, runtime.socket_dir))


# ---- client ------------------------------------------------------------------------------------------------
class StatusError(Exception):
    pass


def fetch(ifname: str, socket_dir: str = SOCKET_DIR, timeout: float = 5.0) -> dict:
    path = status_path(ifname, socket_dir)
    if not os.path.exists(path):
        if os.path.exists(os.path.join(socket_dir, f"{ifname}.sock")):
            raise StatusError(f"{ifname} has no path status: its daemon runs without a DERP relay "
                              f"(start it with turbowgd --derp URL, or TURBOWG_DERP=URL)")
        raise StatusError(f"no such interface: {ifname} ({path} does not exist)")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    chunks = []
    total = 0
    try:
        sock.connect(path)
        while total < MAX_STATUS_BYTES:
            data = sock.recv(1 << 16)
            if not data:
                break
            chunks.append(data)
            total += len(data)
    except OSError as exc:
        raise StatusError(f"cannot read {path}: {exc}") from None
    finally:
        sock.close()
    try:
        return json.loads(b"".join(chunks))
    except ValueError as exc:
        raise StatusError(f"{path}: not a status document: {exc}") from None


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _ms(rtt) -> str:
    return "-" if rtt is None else f"{rtt * 1000:.2f} ms"


def _ago(wall, now: float) -> str:
    if not wall:
        return "never"
    return f"{max(0.0, now - wall):.0f} s ago"


def format_status(status: dict, now: float | None = None) -> str:
    now = time.time() if now is None else now
    relay = status.get("relay", {})
    lines = [
        f"interface: {status.get('interface', '?')}",
        f"  relay: {relay.get('url', '')} ({'connected' if relay.get('connected') else 'down'})",
        f"  stun: {status.get('stun') or '-'}",
        f"  candidates: {', '.join(status.get('local_candidates', [])) or '-'}",
    ]
    counters = status.get("counters", {})
    lines.append("  packets: direct tx {} rx {}, derp tx {} rx {}; path changes {}; probes sent {} answered {}"
                 .format(counters.get("tx_packets_direct", 0), counters.get("rx_packets_direct", 0),
                         counters.get("tx_packets_derp", 0), counters.get("rx_packets_derp", 0),
                         counters.get("path_changes", 0), counters.get("probes_sent", 0),
                         counters.get("probes_answered", 0)))
    for peer in status.get("peers", []):
        lines.append("")
        lines.append(f"peer: {peer['public_key']}")
        if peer["path"] == "derp":
            path = f"relay {relay.get('url', '')}"
        elif peer.get("endpoint"):
            path = f"direct {peer['endpoint']}"
        else:
            path = "none"
        lines.append(f"  path: {path} ({peer['state']}), changed {_ago(peer.get('last_path_change'), now)}")
        lines.append(f"  direct rtt: {_ms(peer.get('direct_rtt'))}")
        for endpoint, rtt in peer.get("probe_rtts", {}).items():
            lines.append(f"    probe {endpoint}: {_ms(rtt)}")
        for name in ("direct", "derp"):
            t = peer["traffic"][name]
            lines.append(f"  {name}: sent {_bytes(t['tx_bytes'])} ({t['tx_packets']} pkts), "
                         f"received {_bytes(t['rx_bytes'])} ({t['rx_packets']} pkts)")
        probes = peer.get("probes", {})
        lines.append(f"  probes: sent {probes.get('sent', 0)}, answered {probes.get('answered', 0)}, "
                     f"path changes {probes.get('path_changes', 0)}, fallbacks {probes.get('fallbacks', 0)}")
    return "\n".join(lines)


def _cmd_status(args: argparse.Namespace) -> int:
    try:
        status = fetch(args.ifname, args.socket_dir)
    except StatusError as exc:
        print(f"turbowg status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(format_status(status))
    return 0


def register(sub) -> None:
    p = sub.add_parser("status", help="path per peer (direct or DERP relay) of a turbowgd interface",
                       description="Per peer: the path now (direct endpoint or the relay), the last probe RTT "
                                   "per path, bytes each way per path, when the path last changed.")
    p.add_argument("ifname", metavar="IFNAME")
    p.add_argument("--json", action="store_true", help="the daemon's JSON document as is")
    p.add_argument("--socket-dir", default=SOCKET_DIR, help=argparse.SUPPRESS)
    p.set_defaults(func=_cmd_status)
