"""WireGuard tunnels between two namespaces, one implementation per side, configured only with stock `wg`.

Each side is one `Daemon` (turbowg.testing.daemon: the implementations, one daemon, raw UAPI), so its pid
is known (CPU accounting, "did it really run") and tear-down can always stop it.

`build_topology(specs)` is the general form: namespaces a and b joined by one veth (the "underlay"
path), and one tunnel per `TunnelSpec` over it. Tunnel i uses 10.201.i.0/24 and fd00:201:i::/64
(a = .1, b = .2) over the veth 10.200.0.1 <-> 10.200.0.2 (fd00:200::1/2); side a listens on UDP port
51820 + 2i, side b on 51821 + 2i. `tunnel(impl_a, impl_b)` is the one-tunnel shorthand the tests use.
Tear-down always happens, also when the body or the set-up raises: daemons are stopped, interfaces and
namespaces deleted, UAPI sockets (/var/run/wireguard is shared by all namespaces) removed.

Why one file (~450 lines): one topology; the tunnels, the DERP relay of DERP tunnels and the looking-at
helpers all work on the same `Topology` / `Side` records.
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
from dataclasses import dataclass, field, replace

from turbowg.testing.daemon import (  # noqa: F401 (re-exported: one import for the tunnel tests and benches)
    SOCKET_DIR,
    UAPI_DIR,
    Daemon,
    Implementation,
    binary_version,
    impl_command,
    implementation_from_binary,
    known_implementations,
    log_tail,
    resolve_implementation,
    turbowgd_command,
)
from turbowg.testing.netns import (
    HarnessError,
    Pair,
    check_prerequisites,
    exec_args,
    namespace_pair,
    ns_run,
    run,
    wait_until,
)

TUNNEL_MTU = 1420
LISTEN_PORT_BASE = 51820
UNDERLAY = "underlay"
RELAY_PORT = 3340  # the local DERP relay of DERP tunnels (`turbowg relay -dev` in namespace b)


# ---------------------------------------------------------------- tunnels


def genkey() -> tuple[str, str]:
    private = run("wg", "genkey").stdout.strip()
    public = run("wg", "pubkey", input=private + "\n").stdout.strip()
    return private, public


def genpsk() -> str:
    return run("wg", "genpsk").stdout.strip()


def write_secret(directory: str, name: str, text: str) -> str:
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text + "\n")
    return path


@dataclass
class Side:
    """One end of a tunnel. `impl` is the implementation's name; `implementation` the whole thing."""

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
    veth: str
    implementation: Implementation
    daemon: Daemon | None = None
    psk: str | None = None  # base64, as configured on this side (None: no preshared key)

    def wg(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return ns_run(self.ns, "wg", *args, check=check)

    def sh(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return ns_run(self.ns, *args, check=check, timeout=timeout)


@dataclass(frozen=True)
class TunnelSpec:
    """One tunnel to build. psk: None (none), "same" (one key, both sides) or "mismatch" (a key on side a
    only: side b has none); psk_a/psk_b (base64) set each side explicitly instead."""

    name: str
    impl_a: Implementation
    impl_b: Implementation
    endpoints: str = "both"  # "both", "a" (only a knows b's endpoint) or "b"
    psk: str | None = None
    psk_a: str | None = None
    psk_b: str | None = None
    v6_endpoint: bool = False
    keepalive: int = 0
    env_a: Mapping[str, str] = field(default_factory=dict)
    env_b: Mapping[str, str] = field(default_factory=dict)
    # WireGuard over DERP: both daemons get TURBOWG_DERP=<the topology's local relay>; with block_udp an
    # nftables table in each namespace drops UDP between the two tunnel ports on any address (WireGuard and
    # disco probes alike, also through the other tunnels; STUN and TCP to the relay pass), so the relay is
    # the only path.
    derp: bool = False
    block_udp: bool = False


def derp_spec(name: str, impl: Implementation, *, env: Mapping[str, str] | None = None) -> TunnelSpec:
    """A tunnel whose only path is the topology's local DERP relay: no endpoints, UDP between the peers blocked."""
    return TunnelSpec(name, impl, impl, endpoints="none", env_a=env or {}, env_b=env or {}, derp=True,
                      block_udp=True)


@dataclass
class Tunnel:
    """A tunnel from side a (client) to side b (server); also a bench path."""

    name: str
    pair: Pair
    a: Side
    b: Side
    mtu: int = TUNNEL_MTU
    derp: bool = False

    @property
    def server_v4(self) -> str:
        return self.b.inner_ip

    @property
    def server_v6(self) -> str:
        return self.b.inner_ip6

    @property
    def client_v4(self) -> str:
        return self.a.inner_ip

    @property
    def client_v6(self) -> str:
        return self.a.inner_ip6

    @property
    def ifname_a(self) -> str:
        return self.a.ifname

    @property
    def ifname_b(self) -> str:
        return self.b.ifname

    @property
    def daemon_pids(self) -> list[int]:
        return [side.daemon.pid for side in (self.a, self.b) if side.daemon is not None and side.daemon.proc]

    @property
    def implementations(self) -> tuple[Implementation, Implementation]:
        return self.a.implementation, self.b.implementation


@dataclass
class NetPath:
    """The bare veth between the namespaces, with the same attributes as a Tunnel used as a bench path."""

    name: str
    server_v4: str
    server_v6: str
    client_v4: str
    client_v6: str
    ifname_a: str
    ifname_b: str
    mtu: int
    daemon_pids: list[int] = field(default_factory=list)


@dataclass
class Topology:
    pair: Pair
    workdir: str
    tunnels: dict[str, Tunnel]
    paths: dict[str, Tunnel | NetPath]
    relay_url: str | None = None
    relay: subprocess.Popen[bytes] | None = None

    @property
    def ns_a(self) -> str:
        return self.pair.a

    @property
    def ns_b(self) -> str:
        return self.pair.b

    def exec_args(self, ns: str, *args: str) -> list[str]:
        return exec_args(ns, *args)

    def run(self, ns: str, *args: str, timeout: float = 30, check: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        return ns_run(ns, *args, timeout=timeout, check=check, input=input)


def _configure(side: Side, peer: Side, *, endpoint: bool, keepalive: int, psk_file: str | None,
               v6_endpoint: bool) -> None:
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
    side.sh("ip", "link", "set", side.ifname, "mtu", str(TUNNEL_MTU), "up")


def _psks(spec: TunnelSpec) -> tuple[str | None, str | None]:
    if spec.psk_a is not None or spec.psk_b is not None:
        return spec.psk_a, spec.psk_b
    if spec.psk == "same":
        key = genpsk()
        return key, key
    if spec.psk == "mismatch":
        return genpsk(), None
    if spec.psk is not None:
        raise HarnessError(f"psk must be None, 'same' or 'mismatch', not {spec.psk!r}")
    return None, None


def block_udp_between(ns: str, table: str, port: int, peer_port: int) -> None:
    """nftables table `table` in `ns`: drop UDP from local `port` to `peer_port` and back, whatever the
    addresses (disco would otherwise find a way round: the inner addresses of the other tunnels are candidates)."""
    rules = (f"table inet {table} {{\n"
             f"  chain out {{ type filter hook output priority 0; policy accept;\n"
             f"    udp sport {port} udp dport {peer_port} drop; }}\n"
             f"  chain in {{ type filter hook input priority 0; policy accept;\n"
             f"    udp sport {peer_port} udp dport {port} drop; }}\n"
             f"}}\n")
    ns_run(ns, "nft", "-f", "-", input=rules)


def start_relay(topo: Topology, timeout: float = 15.0) -> str:
    """`turbowg relay -dev` on namespace b's underlay address (RELAY_PORT; STUN on 3478); its URL."""
    if topo.relay_url is not None:
        return topo.relay_url
    log_path = os.path.join(topo.workdir, "relay.log")
    with open(log_path, "wb") as log:
        topo.relay = subprocess.Popen(
            exec_args(topo.ns_b, sys.executable, "-m", "turbowg", "relay", "-dev", "-a",
                      f"{topo.pair.b_ip}:{RELAY_PORT}", "--workers", "1"),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ok = wait_until(lambda: topo.relay is not None and (topo.relay.poll() is not None or bool(ns_run(
        topo.ns_b, "ss", "-Hltn", f"sport = :{RELAY_PORT}", check=False, timeout=5).stdout.strip())), timeout)
    if not ok or topo.relay.poll() is not None:
        raise HarnessError(f"DERP relay did not listen on {topo.pair.b_ip}:{RELAY_PORT}: {log_tail(log_path)}")
    topo.relay_url = f"http://{topo.pair.b_ip}:{RELAY_PORT}"
    return topo.relay_url


def stop_relay(topo: Topology) -> None:
    proc = topo.relay
    topo.relay = None
    if proc is None:
        return
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _add_tunnel(topo: Topology, spec: TunnelSpec, index: int, daemons: list[Daemon], start_timeout: float) -> Tunnel:
    pair = topo.pair
    psk_a, psk_b = _psks(spec)
    if spec.derp:
        url = start_relay(topo)
        spec = replace(spec, env_a={**spec.env_a, "TURBOWG_DERP": url}, env_b={**spec.env_b, "TURBOWG_DERP": url})
    if spec.block_udp:
        port_a, port_b = LISTEN_PORT_BASE + 2 * index, LISTEN_PORT_BASE + 2 * index + 1
        block_udp_between(pair.a, f"twblock{index}", port_a, port_b)
        block_udp_between(pair.b, f"twblock{index}", port_b, port_a)
    sides: list[Side] = []
    for name, ns, veth, impl, ul4, ul6, host, env, psk in (
            ("a", pair.a, pair.veth_a, spec.impl_a, pair.a_ip, pair.a_ip6, 1, spec.env_a, psk_a),
            ("b", pair.b, pair.veth_b, spec.impl_b, pair.b_ip, pair.b_ip6, 2, spec.env_b, psk_b)):
        private, public = genkey()
        ifname = f"tw{index}{name}{pair.tag}"
        keyfile = write_secret(topo.workdir, f"{ifname}.key", private)
        port = LISTEN_PORT_BASE + 2 * index + (host - 1)
        side = Side(ns, ifname, impl.name, private, public, port, ul4, ul6, f"10.201.{index}.{host}",
                    f"fd00:201:{index}::{host}", keyfile, veth, impl, psk=psk)
        side.daemon = Daemon(impl, ns, ifname, topo.workdir, env)
        daemons.append(side.daemon)
        side.daemon.start(start_timeout)
        sides.append(side)
    a, b = sides
    for side, peer, knows in ((a, b, spec.endpoints in ("both", "a")), (b, a, spec.endpoints in ("both", "b"))):
        psk_file = write_secret(topo.workdir, f"{side.ifname}.psk", side.psk) if side.psk else None
        _configure(side, peer, endpoint=knows, keepalive=spec.keepalive, psk_file=psk_file,
                   v6_endpoint=spec.v6_endpoint)
    return Tunnel(spec.name, pair, a, b, derp=spec.derp)


def wait_for_ping(ns: str, address: str, timeout: float) -> bool:
    """Ping until one reply arrives (this also drives the WireGuard handshake); bounded in time and count."""
    deadline = time.monotonic() + timeout
    flag = "-6" if ":" in address else "-4"
    for _ in range(200):
        if ns_run(ns, "ping", flag, "-c", "1", "-W", "1", address, check=False, timeout=5).returncode == 0:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return False


@contextlib.contextmanager
def build_topology(specs: Sequence[TunnelSpec] | Sequence[Implementation], *, handshake_timeout: float = 15.0,
                   start_timeout: float = 15.0, wait: bool = True, tag: str | None = None,
                   prefix: str = "twt", workdir: str | None = None) -> Iterator[Topology]:
    """Namespaces a and b joined by veth; one tunnel per spec (an Implementation means: that one on both
    sides, named after it). paths[UNDERLAY] is the bare veth. With `wait`, every tunnel must answer an
    IPv4 and an IPv6 ping from a within `handshake_timeout`, or HarnessError (with `wg show` and logs).
    Namespaces are <prefix>a<TAG> and <prefix>b<TAG>; TAG (1-6 of [0-9a-z]) is random unless given."""
    check_prerequisites()
    tunnel_specs = [TunnelSpec(s.name, s, s) if isinstance(s, Implementation) else s for s in specs]
    if len(tunnel_specs) > 200:
        raise HarnessError("too many tunnels")
    if len({s.name for s in tunnel_specs}) != len(tunnel_specs):
        raise HarnessError("tunnel names must be unique")
    if tag is None:
        tag = uuid.uuid4().hex[:6]
    elif not re.fullmatch(r"[0-9a-z]{1,6}", tag):
        raise HarnessError(f"bad topology tag {tag!r}: 1-6 lowercase letters or digits")
    own_workdir = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix=f"turbowg-topo-{tag}-")
    daemons: list[Daemon] = []
    try:
        with namespace_pair(prefix, v4="10.200.0", v6="fd00:200::", tag=tag) as pair:
            topo: Topology | None = None
            try:
                topo = Topology(pair, workdir, {}, {})
                topo.paths[UNDERLAY] = NetPath(UNDERLAY, pair.b_ip, pair.b_ip6, pair.a_ip, pair.a_ip6,
                                               pair.veth_a, pair.veth_b, 1500)
                for index, spec in enumerate(tunnel_specs):
                    try:
                        tun = _add_tunnel(topo, spec, index, daemons, start_timeout)
                    except HarnessError as exc:
                        raise HarnessError(f"{spec.name}: {exc}") from exc
                    topo.tunnels[spec.name] = tun
                    topo.paths[spec.name] = tun
                if wait:
                    for tun in topo.tunnels.values():
                        _wait_tunnel(tun, handshake_timeout)
                yield topo
            finally:
                for daemon in daemons:
                    daemon.stop()
                if topo is not None:
                    stop_relay(topo)
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _wait_tunnel(tun: Tunnel, timeout: float) -> None:
    for address in (tun.server_v4, tun.server_v6):
        if not wait_for_ping(tun.a.ns, address, timeout):
            shows = "\n".join(side.wg("show", side.ifname, check=False).stdout.strip() for side in (tun.a, tun.b))
            logs = "\n".join(side.daemon.log()[-600:] for side in (tun.a, tun.b) if side.daemon)
            raise HarnessError(f"{tun.name}: no ping reply from {address} across the tunnel within {timeout} s "
                               f"(handshake failed?)\n{shows}\n{logs}".rstrip())


@contextlib.contextmanager
def tunnel(impl_a: str | Implementation, impl_b: str | Implementation, *, endpoints: str = "both",
           env_a: Mapping[str, str] | None = None, env_b: Mapping[str, str] | None = None,
           tmp_path: str | None = None, psk: bool | str | None = None, psk_a: str | None = None,
           psk_b: str | None = None, v6_endpoint: bool = False, keepalive: int = 0) -> Iterator[Tunnel]:
    """Two namespaces, one tunnel, configured but not yet used (no handshake has happened)."""
    spec = TunnelSpec("tunnel", resolve_implementation(impl_a), resolve_implementation(impl_b), endpoints=endpoints,
                      psk="same" if psk is True else (psk or None), psk_a=psk_a, psk_b=psk_b,
                      v6_endpoint=v6_endpoint, keepalive=keepalive, env_a=env_a or {}, env_b=env_b or {})
    with build_topology([spec], wait=False, workdir=tmp_path) as topo:
        yield topo.tunnels["tunnel"]


# ---------------------------------------------------------------- looking at a tunnel


def ping(side: Side, dst: str, count: int = 3, timeout: float = 20) -> bool:
    """Ping until `count` replies in a row arrive or `timeout` passes (a first handshake takes a moment)."""
    deadline = time.monotonic() + timeout
    for _ in range(100):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        proc = side.sh("ping", "-c", str(count), "-i", "0.2", "-W", "1", "-w", str(max(1, int(left) + 1)), dst,
                       check=False, timeout=left + count + 5)
        if proc.returncode == 0:
            return True
        time.sleep(0.2)
    return False


def wg_dump(side: Side) -> list[list[str]]:
    """`wg show IF dump`: the interface line, then one line per peer (public-key psk endpoint allowed-ips
    latest-handshake rx tx keepalive)."""
    return [line.split("\t") for line in side.wg("show", side.ifname, "dump").stdout.strip().splitlines()]


def latest_handshake(side: Side) -> int:
    """Seconds since the epoch of the latest handshake with the (only) peer; 0 if there has been none."""
    return int(wg_dump(side)[1][4])


def transfer(side: Side) -> tuple[int, int]:
    """(rx, tx) bytes the (only) peer's counters show."""
    peer = wg_dump(side)[1]
    return int(peer[5]), int(peer[6])


def stop_daemon(side: Side, timeout: float = 5.0) -> bool:
    """Delete the interface; the daemon must notice, exit and remove its socket. True if it did in time."""
    side.sh("ip", "link", "del", side.ifname, check=False)
    sock = os.path.join(UAPI_DIR, f"{side.ifname}.sock")
    gone = wait_until(lambda: not os.path.exists(sock), timeout)
    if side.daemon is not None and side.daemon.proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            side.daemon.proc.wait(timeout=max(0.1, timeout))
    return gone
