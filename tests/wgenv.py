"""A WireGuard tunnel between two namespaces for integration tests, configured only with stock `wg`.

Each side runs one implementation: "turbowg" (our `turbowgd`) or "wireguard-go" (Debian's). Interface
names are unique per test because `/var/run/wireguard/<iface>.sock` is one path for all namespaces.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from netns import Pair, namespace_pair, ns_run, run

SOCKET_DIR = "/var/run/wireguard"


def impl_command(impl: str) -> list[str]:
    if impl == "turbowg":
        exe = shutil.which("turbowgd")
        return [exe] if exe else [sys.executable, "-m", "turbowg.turbowgd"]
    if impl == "wireguard-go":
        return ["wireguard-go"]
    raise ValueError(impl)


def genkey() -> tuple[str, str]:
    private = run("wg", "genkey").stdout.strip()
    public = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True, check=True).stdout.strip()
    return private, public


@dataclass
class Side:
    ns: str
    ifname: str
    impl: str
    private: str
    public: str
    port: int
    underlay_ip: str
    underlay_ip6: str
    inner_ip: str
    inner_ip6: str
    keyfile: str

    def wg(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return ns_run(self.ns, "wg", *args, check=check)

    def sh(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return ns_run(self.ns, *args, check=check, timeout=timeout)


@dataclass
class Tunnel:
    pair: Pair
    a: Side
    b: Side


def start_daemon(side: Side, env: dict[str, str] | None = None) -> None:
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.pop("LOG_LEVEL", None)  # with LOG_LEVEL set, daemons keep our pipes open
    proc = subprocess.run(["ip", "netns", "exec", side.ns, *impl_command(side.impl), side.ifname],
                          env=full_env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, f"{side.impl} failed to start: {proc.stderr}"
    assert os.path.exists(f"{SOCKET_DIR}/{side.ifname}.sock"), "UAPI socket missing after start"


def configure(side: Side, peer: Side, *, endpoint: bool = True, keepalive: int = 0, psk_file: str | None = None,
              v6_endpoint: bool = False) -> None:
    args = ["set", side.ifname, "private-key", side.keyfile, "listen-port", str(side.port),
            "peer", peer.public, "allowed-ips", f"{peer.inner_ip}/32,{peer.inner_ip6}/128"]
    if endpoint:
        host = f"[{peer.underlay_ip6}]" if v6_endpoint else peer.underlay_ip
        args += ["endpoint", f"{host}:{peer.port}"]
    if keepalive:
        args += ["persistent-keepalive", str(keepalive)]
    if psk_file:
        args += ["preshared-key", psk_file]
    side.wg(*args)
    side.sh("ip", "addr", "add", f"{side.inner_ip}/24", "dev", side.ifname)
    side.sh("ip", "-6", "addr", "add", f"{side.inner_ip6}/64", "dev", side.ifname, "nodad")
    side.sh("ip", "link", "set", side.ifname, "mtu", "1420", "up")


def stop_daemon(side: Side, timeout: float = 5.0) -> bool:
    """Delete the interface; the daemon must notice and remove its socket. True if it did in time."""
    side.sh("ip", "link", "del", side.ifname, check=False)
    sock = f"{SOCKET_DIR}/{side.ifname}.sock"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.exists(sock):
            return True
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def tunnel(impl_a: str, impl_b: str, *, endpoints: str = "both", env_a: dict[str, str] | None = None,
           env_b: dict[str, str] | None = None, tmp_path: str = "/tmp", psk: bool = False,
           v6_endpoint: bool = False) -> Iterator[Tunnel]:
    """Two namespaces, one tunnel. endpoints: "both", "a" (only a knows b's endpoint), "b"."""
    tag = uuid.uuid4().hex[:5]
    sides: list[Side] = []
    with namespace_pair() as pair:
        try:
            for name, ns, impl, ul4, ul6, in4, in6, port in (
                ("a", pair.a, impl_a, pair.a_ip, pair.a_ip6, "10.99.0.1", "fd99::1", 51820),
                ("b", pair.b, impl_b, pair.b_ip, pair.b_ip6, "10.99.0.2", "fd99::2", 51821),
            ):
                private, public = genkey()
                keyfile = os.path.join(tmp_path, f"key-{tag}-{name}")
                with open(keyfile, "w") as f:
                    f.write(private + "\n")
                sides.append(Side(ns, f"tw{tag}{name}", impl, private, public, port, ul4, ul6, in4, in6, keyfile))
            a, b = sides
            start_daemon(a, env_a)
            start_daemon(b, env_b)
            psk_file = None
            if psk:
                psk_file = os.path.join(tmp_path, f"psk-{tag}")
                with open(psk_file, "w") as f:
                    f.write(run("wg", "genpsk").stdout)
            configure(a, b, endpoint=endpoints in ("both", "a"), psk_file=psk_file, v6_endpoint=v6_endpoint)
            configure(b, a, endpoint=endpoints in ("both", "b"), psk_file=psk_file, v6_endpoint=v6_endpoint)
            yield Tunnel(pair, a, b)
        finally:
            for side in sides:
                stop_daemon(side, timeout=3.0)
            for side in sides:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{SOCKET_DIR}/{side.ifname}.sock")


def ping(side: Side, dst: str, count: int = 3, timeout: float = 20) -> bool:
    """Ping until `count` replies in a row arrive or `timeout` passes (a first handshake takes a moment)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc = side.sh("ping", "-c", str(count), "-i", "0.2", "-W", "1", dst, check=False, timeout=count + 5)
        if proc.returncode == 0:
            return True
        time.sleep(0.2)
    return False


def wg_dump(side: Side) -> list[list[str]]:
    return [line.split("\t") for line in side.wg("show", side.ifname, "dump").stdout.strip().splitlines()]


XFER = os.path.join(os.path.dirname(__file__), "xfer.py")


def wait_ready(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait (bounded) for a helper started with stdout=PIPE, text=True to print its "ready" line."""
    assert proc.stdout is not None
    readable, _, _ = select.select([proc.stdout], [], [], timeout)
    return bool(readable) and proc.stdout.readline().strip() == "ready"


def tcp_transfer(sender: Side, receiver: Side, dst_ip: str, nbytes: int, port: int = 5201,
                 timeout: float = 240) -> tuple[str, str]:
    """Send `nbytes` over TCP through the tunnel; return (sent "n sha", received "n sha")."""
    server = subprocess.Popen(["ip", "netns", "exec", receiver.ns, sys.executable, XFER, "serve", dst_ip, str(port),
                               "--timeout", str(timeout)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        assert wait_ready(server, 15), "receiver did not get ready"
        sent = sender.sh(sys.executable, XFER, "send", dst_ip, str(port), "--bytes", str(nbytes),
                         "--timeout", str(timeout), timeout=timeout + 10).stdout.strip()
        received, err = server.communicate(timeout=timeout)
        assert server.returncode == 0, err
        return sent, received.strip()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
