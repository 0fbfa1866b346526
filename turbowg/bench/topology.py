"""Two network namespaces joined by a veth pair, with one WireGuard tunnel per implementation over it.

`build_topology(impls)` is a context manager. Inside it every implementation runs as a daemon in each
namespace (`ip netns exec NS <cmd> IFNAME`, in the foreground so its pid is known for CPU accounting),
configured only through the stock `wg set` tool, so every implementation sees exactly the same
configuration. All tunnels share the same veth, so the underlay is identical for all of them, and the
bare veth is offered as the "underlay" path. Tear-down always happens, even when the body raises:
daemons are stopped, whatever still runs in the namespaces is killed, namespaces are deleted and any
leftover UAPI socket is removed (/var/run/wireguard is shared by all namespaces, hence unique names).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

UAPI_DIR = "/var/run/wireguard"
TUNNEL_MTU = 1420
UNDERLAY = "underlay"
LISTEN_PORT_BASE = 51820


class TopologyError(RuntimeError):
    """The topology could not be built; the message says what failed (with the daemon's log tail)."""


@dataclass(frozen=True)
class Implementation:
    """A userspace WireGuard implementation: a command that takes the interface name last."""

    name: str
    command: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)


def _turbowgd_command() -> tuple[str, ...]:
    found = shutil.which("turbowgd")
    if found:
        return (found,)
    beside_python = os.path.join(os.path.dirname(sys.executable), "turbowgd")
    if os.access(beside_python, os.X_OK):
        return (beside_python,)
    return (sys.executable, "-m", "turbowg.turbowgd")


def known_implementations() -> dict[str, Implementation]:
    turbowgd = _turbowgd_command()
    return {
        "turbowg": Implementation("turbowg", turbowgd),
        "turbowg-nooffload": Implementation("turbowg-nooffload", turbowgd, {"TURBOWG_OFFLOADS": "0"}),
        # Offloads on, C accelerators off: the pure-Python fallback of the same data path.
        "turbowg-python": Implementation("turbowg-python", turbowgd, {"TURBOWG_NO_C": "1"}),
        "wireguard-go": Implementation("wireguard-go", ("wireguard-go",)),
    }


@dataclass
class NetPath:
    """One way from namespace a (client) to namespace b (server): a tunnel or the bare veth."""

    name: str
    server_v4: str  # address of the b side, to connect to from a
    server_v6: str
    client_v4: str
    client_v6: str
    ifname_a: str
    ifname_b: str
    mtu: int
    daemon_pids: list[int] = field(default_factory=list)  # empty for the underlay


@dataclass
class Topology:
    ns_a: str
    ns_b: str
    paths: dict[str, NetPath]
    workdir: str

    def exec_args(self, ns: str, *args: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *args]

    def run(self, ns: str, *args: str, timeout: float = 30, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        return _run(*self.exec_args(ns, *args), timeout=timeout, check=check, input=input)


def _run(*args: str, timeout: float = 30, check: bool = True,
         input: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, input=input)
    except FileNotFoundError as exc:
        raise TopologyError(f"command not found: {args[0]}") from exc
    except subprocess.TimeoutExpired as exc:
        raise TopologyError(f"timed out after {timeout} s: {' '.join(args)}") from exc
    if check and result.returncode != 0:
        raise TopologyError(f"`{' '.join(args)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


def check_prerequisites(need: Sequence[str] = ("ip", "wg")) -> None:
    """Raise TopologyError naming what is missing (root, tools, /dev/net/tun)."""
    if os.geteuid() != 0:
        raise TopologyError("needs root (network namespaces and TUN devices)")
    missing = [tool for tool in need if shutil.which(tool) is None]
    if missing:
        raise TopologyError(
            f"missing tools: {', '.join(missing)} (install: apt-get install -y wireguard-tools iproute2 iperf3)")
    if not os.path.exists("/dev/net/tun"):
        raise TopologyError("/dev/net/tun is missing (fix: modprobe tun)")


def _log_tail(path: str, limit: int = 1500) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-limit:].strip()
    except OSError:
        return ""


class _Builder:
    """Keeps track of everything created, so tear-down removes exactly that."""

    def __init__(self, tag: str, workdir: str) -> None:
        self.tag = tag
        self.workdir = workdir
        self.namespaces: list[str] = []
        self.daemons: list[tuple[subprocess.Popen[bytes], str, str]] = []  # (proc, ns, ifname)
        self.sockets: list[str] = []

    def add_namespace(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self.namespaces.append(name)
        _run("ip", "-n", name, "link", "set", "lo", "up")

    def start_daemon(self, impl: Implementation, ns: str, ifname: str, timeout: float) -> subprocess.Popen[bytes]:
        sock = os.path.join(UAPI_DIR, f"{ifname}.sock")
        if os.path.exists(sock):
            raise TopologyError(f"UAPI socket {sock} already exists; refusing to reuse interface name {ifname}")
        env = dict(os.environ)
        env.update(impl.env)
        env["WG_PROCESS_FOREGROUND"] = "1"  # keep the pid: the daemon is the process we started
        log_path = os.path.join(self.workdir, f"{ifname}.log")
        with open(log_path, "wb") as log:
            try:
                proc = subprocess.Popen(["ip", "netns", "exec", ns, *impl.command, ifname], env=env,
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
            except FileNotFoundError as exc:
                raise TopologyError(f"cannot start {impl.name}: {exc}") from exc
        self.daemons.append((proc, ns, ifname))
        self.sockets.append(sock)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise TopologyError(f"{impl.name} exited with {proc.returncode} before it was ready:\n"
                                    f"{_log_tail(log_path)}")
            if os.path.exists(sock) and _run("ip", "-n", ns, "link", "show", ifname, check=False).returncode == 0:
                return proc
            time.sleep(0.05)
        raise TopologyError(f"{impl.name} did not create {ifname} and {sock} within {timeout} s:\n"
                            f"{_log_tail(log_path)}")

    def teardown(self) -> None:
        for proc, _, _ in self.daemons:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 3.0
        for proc, _, _ in self.daemons:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=2.0)
        for _, ns, ifname in self.daemons:
            _run("ip", "-n", ns, "link", "del", ifname, check=False, timeout=10)
        for ns in self.namespaces:
            # Whatever still runs inside (iperf3, generators, daemon children) would pin the namespace.
            pids = _run("ip", "netns", "pids", ns, check=False, timeout=10).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
                    os.kill(int(pid), signal.SIGKILL)
            _run("ip", "netns", "del", ns, check=False, timeout=10)
        for sock in self.sockets:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sock)


def _wg_keypair() -> tuple[str, str]:
    private = _run("wg", "genkey").stdout.strip()
    public = _run("wg", "pubkey", input=private + "\n").stdout.strip()
    return private, public


def _write_secret(workdir: str, name: str, text: str) -> str:
    path = os.path.join(workdir, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    return path


def wait_for_ping(topo: Topology, ns: str, address: str, timeout: float) -> bool:
    """Ping until a reply arrives (this also drives the WireGuard handshake); bounded by `timeout`."""
    deadline = time.monotonic() + timeout
    attempts = 0
    while time.monotonic() < deadline and attempts < 200:
        attempts += 1
        flag = "-6" if ":" in address else "-4"
        result = topo.run(ns, "ping", flag, "-c", "1", "-W", "1", address, check=False, timeout=5)
        if result.returncode == 0:
            return True
        time.sleep(0.1)
    return False


@contextlib.contextmanager
def build_topology(impls: Sequence[Implementation], *, handshake_timeout: float = 15.0,
                   start_timeout: float = 15.0, tag: str | None = None) -> Iterator[Topology]:
    """Namespaces a and b joined by veth; one tunnel per implementation; paths[UNDERLAY] is the bare veth.

    Tunnel i uses 10.201.i.0/24 and fd00:201:i::/64 (a = .1, b = .2) over the veth
    10.200.0.1 <-> 10.200.0.2 (fd00:200::1/2), UDP port 51820 + i on both sides. Namespaces are
    twbench-a-TAG and twbench-b-TAG; TAG (up to 6 characters of [0-9a-z]) is random unless given.
    """
    check_prerequisites()
    if len(impls) > 200:
        raise TopologyError("too many implementations")
    if tag is None:
        tag = uuid.uuid4().hex[:6]
    elif not re.fullmatch(r"[0-9a-z]{1,6}", tag):
        raise TopologyError(f"bad topology tag {tag!r}: 1-6 lowercase letters or digits")
    workdir = tempfile.mkdtemp(prefix=f"turbowg-topo-{tag}-")
    builder = _Builder(tag, workdir)
    ns_a, ns_b = f"twbench-a-{tag}", f"twbench-b-{tag}"
    veth_a, veth_b = f"twva{tag}", f"twvb{tag}"
    try:
        builder.add_namespace(ns_a)
        builder.add_namespace(ns_b)
        _run("ip", "link", "add", veth_a, "netns", ns_a, "type", "veth", "peer", "name", veth_b, "netns", ns_b)
        for ns, dev, host in ((ns_a, veth_a, 1), (ns_b, veth_b, 2)):
            _run("ip", "-n", ns, "addr", "add", f"10.200.0.{host}/24", "dev", dev)
            _run("ip", "-n", ns, "-6", "addr", "add", f"fd00:200::{host}/64", "dev", dev, "nodad")
            _run("ip", "-n", ns, "link", "set", dev, "up")
        topo = Topology(ns_a, ns_b, {}, workdir)
        topo.paths[UNDERLAY] = NetPath(UNDERLAY, "10.200.0.2", "fd00:200::2", "10.200.0.1", "fd00:200::1",
                                       veth_a, veth_b, 1500)
        for index, impl in enumerate(impls):
            try:
                topo.paths[impl.name] = _add_tunnel(builder, topo, impl, index, start_timeout)
            except TopologyError as exc:
                logs = "\n".join(_log_tail(os.path.join(workdir, f"tw{side}{index}{tag}.log"), 600)
                                 for side in ("a", "b"))
                raise TopologyError(f"{impl.name}: {exc}\n{logs}".rstrip()) from exc
        for impl in impls:
            path = topo.paths[impl.name]
            if not wait_for_ping(topo, ns_a, path.server_v4, handshake_timeout):
                logs = "\n".join(_log_tail(os.path.join(workdir, f"{i}.log"), 600)
                                 for i in (path.ifname_a, path.ifname_b))
                shows = "\n".join(topo.run(ns, "wg", "show", ifname, check=False).stdout.strip()
                                  for ns, ifname in ((ns_a, path.ifname_a), (ns_b, path.ifname_b)))
                raise TopologyError(f"{impl.name}: no ping reply across the tunnel within "
                                    f"{handshake_timeout} s (handshake failed?)\n{shows}\n{logs}".rstrip())
            if not wait_for_ping(topo, ns_a, path.server_v6, handshake_timeout):
                raise TopologyError(f"{impl.name}: no IPv6 ping reply across the tunnel")
        yield topo
    finally:
        builder.teardown()
        shutil.rmtree(workdir, ignore_errors=True)


def _add_tunnel(builder: _Builder, topo: Topology, impl: Implementation, index: int,
                start_timeout: float) -> NetPath:
    ifname_a, ifname_b = f"twa{index}{builder.tag}", f"twb{index}{builder.tag}"
    port = LISTEN_PORT_BASE + index
    keys = {side: _wg_keypair() for side in ("a", "b")}
    pids: list[int] = []
    for ns, ifname in ((topo.ns_a, ifname_a), (topo.ns_b, ifname_b)):
        pids.append(builder.start_daemon(impl, ns, ifname, start_timeout).pid)
    for side, ns, ifname, peer, peer_host in (("a", topo.ns_a, ifname_a, "b", 2), ("b", topo.ns_b, ifname_b, "a", 1)):
        host = 1 if side == "a" else 2
        key_file = _write_secret(builder.workdir, f"{ifname}.key", keys[side][0])
        topo.run(ns, "wg", "set", ifname, "private-key", key_file, "listen-port", str(port),
                 "peer", keys[peer][1], "endpoint", f"10.200.0.{peer_host}:{port}",
                 "allowed-ips", f"10.201.{index}.{peer_host}/32,fd00:201:{index}::{peer_host}/128")
        topo.run(ns, "ip", "addr", "add", f"10.201.{index}.{host}/24", "dev", ifname)
        topo.run(ns, "ip", "-6", "addr", "add", f"fd00:201:{index}::{host}/64", "dev", ifname, "nodad")
        topo.run(ns, "ip", "link", "set", ifname, "mtu", str(TUNNEL_MTU), "up")
    return NetPath(impl.name, f"10.201.{index}.2", f"fd00:201:{index}::2", f"10.201.{index}.1",
                   f"fd00:201:{index}::1", ifname_a, ifname_b, TUNNEL_MTU, pids)
