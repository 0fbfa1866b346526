"""Listen-port changes against a real turbowgd in a namespace, with the stock `wg`.

A refused change (the port is taken) must leave the old socket in place, fail that request only with
errno=-98 (EADDRINUSE, as wireguard-go's IpcErrorPortInUse), and `get` must keep reporting the port really
held; later sets work. `listen-port 0` binds a port the kernel chooses and reports that port.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from turbowg.testing.daemon import Daemon, turbowgd_in_namespace

needs_daemon = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("wg") is None or shutil.which("ss") is None
    or not os.path.exists("/dev/net/tun"), reason="needs root, iproute2 (ip, ss), wg and /dev/net/tun")

PEER = base64.b64encode(bytes([7]) * 32).decode()

HOLD_PORT = """
import socket, sys, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1])))
print("ready", flush=True)
time.sleep(120)
"""


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, timeout=30, capture_output=True, text=True)


def reported_port(d: Daemon) -> int:
    return int(d.wg("show", d.ifname, "listen-port").stdout.strip() or 0)


def udp_ports(d: Daemon) -> set[int]:
    """The UDP ports bound in the namespace (only turbowgd binds any)."""
    out = run("ip", "netns", "exec", d.ns, "ss", "-Huln").stdout
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}


def daemon() -> contextlib.AbstractContextManager[Daemon]:
    return turbowgd_in_namespace("twgport")


@contextlib.contextmanager
def port_taken(ns: str, port: int) -> Iterator[None]:
    holder = subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, "-c", HOLD_PORT, str(port)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        yield
    finally:
        holder.kill()
        holder.wait()


@needs_daemon
def test_refused_listen_port_keeps_the_old_socket() -> None:
    with daemon() as d:
        d.wg("set", d.ifname, "listen-port", "40001")
        assert reported_port(d) == 40001 and udp_ports(d) == {40001}
        with port_taken(d.ns, 40002):
            refused = d.wg("set", d.ifname, "listen-port", "40002", check=False)
            assert refused.returncode != 0 and "Address already in use" in refused.stderr, refused.stderr
            # The old socket is still there, and that is the port reported.
            assert udp_ports(d) == {40001, 40002}
            assert reported_port(d) == 40001
            # Raw UAPI: the refusal is errno=-98 for that request only; the next request is fine.
            assert d.uapi("set=1\nlisten_port=40002\n\n") == f"errno={-errno.EADDRINUSE}\n\n".encode()
            assert d.uapi("get=1\n\n").splitlines()[0] == b"listen_port=40001"
            # Later sets work (they used to fail with errno 98 forever).
            d.wg("set", d.ifname, "peer", PEER, "allowed-ips", "10.5.0.0/24")
            d.wg("set", d.ifname, "fwmark", "0x10")
            assert d.wg("show", d.ifname, "allowed-ips").stdout.split() == [PEER, "10.5.0.0/24"]
            assert reported_port(d) == 40001 and 40001 in udp_ports(d)
        # Once the port is free the change goes through.
        d.wg("set", d.ifname, "listen-port", "40002")
        assert reported_port(d) == 40002 and udp_ports(d) == {40002}


@needs_daemon
def test_listen_port_zero_reports_the_port_the_kernel_chose() -> None:
    with daemon() as d:
        first = reported_port(d)
        assert first != 0 and udp_ports(d) == {first}  # bound at start on a kernel-chosen port
        d.wg("set", d.ifname, "listen-port", "40003")
        assert reported_port(d) == 40003
        d.wg("set", d.ifname, "listen-port", "0")
        chosen = reported_port(d)
        assert chosen not in (0, 40003)
        assert udp_ports(d) == {chosen}
        # A set that does not name the port leaves it alone.
        d.wg("set", d.ifname, "peer", PEER, "allowed-ips", "10.6.0.0/24")
        assert reported_port(d) == chosen and udp_ports(d) == {chosen}


# ------------------------------------------------------------------------------------------------
# Hole 7: the link check stops the runtime (which then releases everything) when it fails
# ------------------------------------------------------------------------------------------------

class VanishingTun:
    """A TUN whose interface disappears between the existence check and the MTU read."""

    def exists(self) -> bool:
        return True

    @property
    def mtu(self) -> int:
        raise OSError(errno.ENODEV, "No such device")


def test_failing_link_check_stops_the_runtime() -> None:
    from turbowg.daemon.runtime import Runtime

    async def main() -> None:
        runtime = Runtime("twgnolink")
        runtime._loop = asyncio.get_running_loop()
        runtime._stopped = asyncio.Event()
        runtime.tun = VanishingTun()  # type: ignore[assignment]
        runtime._on_link_check()  # must not raise out of the loop callback (the check would never run again)
        await asyncio.wait_for(runtime.wait_stopped(), 2)
        assert "was deleted" in runtime.stop_reason or "failed" in runtime.stop_reason
        runtime.tun = None

    asyncio.run(main())
