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
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import pytest

SOCKET_DIR = "/var/run/wireguard"
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


def turbowgd_command() -> list[str]:
    exe = shutil.which("turbowgd")
    return [exe] if exe else [sys.executable, "-m", "turbowg.turbowgd"]


class Daemon:
    def __init__(self, ns: str, ifname: str) -> None:
        self.ns = ns
        self.ifname = ifname
        self.path = f"{SOCKET_DIR}/{ifname}.sock"

    def wg(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run("ip", "netns", "exec", self.ns, "wg", *args, check=check)

    def reported_port(self) -> int:
        return int(self.wg("show", self.ifname, "listen-port").stdout.strip() or 0)

    def udp_ports(self) -> set[int]:
        """The UDP ports bound in the namespace (only turbowgd binds any)."""
        out = run("ip", "netns", "exec", self.ns, "ss", "-Huln").stdout
        return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()}

    def uapi(self, text: str) -> bytes:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(self.path)
            sock.sendall(text.encode())
            answer = b""
            while not answer.endswith(b"\n\n"):
                chunk = sock.recv(65536)
                assert chunk, answer
                answer += chunk
            return answer


@contextlib.contextmanager
def daemon() -> Iterator[Daemon]:
    ns = f"twgport{uuid.uuid4().hex[:5]}"
    ifname = f"twp{uuid.uuid4().hex[:6]}"
    env = dict(os.environ)
    env.pop("LOG_LEVEL", None)
    run("ip", "netns", "add", ns)
    proc = subprocess.Popen(["ip", "netns", "exec", ns, *turbowgd_command(), "-f", ifname], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    d = Daemon(ns, ifname)
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(d.path):
            assert time.monotonic() < deadline and proc.poll() is None, "turbowgd did not start"
            time.sleep(0.05)
        yield d
        assert proc.poll() is None, "turbowgd died"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for pid in run("ip", "netns", "pids", ns, check=False).stdout.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
        run("ip", "netns", "del", ns, check=False)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(d.path)


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
        assert d.reported_port() == 40001 and d.udp_ports() == {40001}
        with port_taken(d.ns, 40002):
            refused = d.wg("set", d.ifname, "listen-port", "40002", check=False)
            assert refused.returncode != 0 and "Address already in use" in refused.stderr, refused.stderr
            # The old socket is still there, and that is the port reported.
            assert d.udp_ports() == {40001, 40002}
            assert d.reported_port() == 40001
            # Raw UAPI: the refusal is errno=-98 for that request only; the next request is fine.
            assert d.uapi("set=1\nlisten_port=40002\n\n") == f"errno={-errno.EADDRINUSE}\n\n".encode()
            assert d.uapi("get=1\n\n").splitlines()[0] == b"listen_port=40001"
            # Later sets work (they used to fail with errno 98 forever).
            d.wg("set", d.ifname, "peer", PEER, "allowed-ips", "10.5.0.0/24")
            d.wg("set", d.ifname, "fwmark", "0x10")
            assert d.wg("show", d.ifname, "allowed-ips").stdout.split() == [PEER, "10.5.0.0/24"]
            assert d.reported_port() == 40001 and 40001 in d.udp_ports()
        # Once the port is free the change goes through.
        d.wg("set", d.ifname, "listen-port", "40002")
        assert d.reported_port() == 40002 and d.udp_ports() == {40002}


@needs_daemon
def test_listen_port_zero_reports_the_port_the_kernel_chose() -> None:
    with daemon() as d:
        first = d.reported_port()
        assert first != 0 and d.udp_ports() == {first}  # bound at start on a kernel-chosen port
        d.wg("set", d.ifname, "listen-port", "40003")
        assert d.reported_port() == 40003
        d.wg("set", d.ifname, "listen-port", "0")
        chosen = d.reported_port()
        assert chosen not in (0, 40003)
        assert d.udp_ports() == {chosen}
        # A set that does not name the port leaves it alone.
        d.wg("set", d.ifname, "peer", PEER, "allowed-ips", "10.6.0.0/24")
        assert d.reported_port() == chosen and d.udp_ports() == {chosen}


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
