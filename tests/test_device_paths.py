"""turbowg/device/paths.py driven sans-IO: two devices with Paths, a simulated UDP network that can be blocked,
and a simulated relay (what turbowg/daemon/derp_link.py does: relay pseudo-endpoints out, RecvPacket in)."""

from __future__ import annotations

import ipaddress
import random

from test_device_core import ipv4_packet

from turbowg.device import Device
from turbowg.device.output import Out, transmits
from turbowg.device.paths import Paths, derp_endpoint, derp_key, interface_addresses, is_derp_endpoint
from turbowg.noise.primitives import generate_private_key, public_key
from turbowg.path.disco import MAGIC, is_disco
from turbowg.uapi.model import DeviceUpdate, PeerUpdate

A_ADDR, B_ADDR = ("192.0.2.1", 51820), ("192.0.2.2", 51821)
A_V4, B_V4 = "10.0.0.1", "10.0.0.2"


class Net:
    def __init__(self, *, with_paths: bool = True, endpoints: bool = True) -> None:
        self.now = 1000.0
        self.blocked = False
        self.a_key, self.b_key = generate_private_key(), generate_private_key()
        self.a_pub, self.b_pub = public_key(self.a_key), public_key(self.b_key)
        self.devices = {}
        self.tun: dict[str, list[bytes]] = {"a": [], "b": []}
        self.udp_datagrams: list[bytes] = []
        self.derp_packets = 0
        for name, key, other_pub, other_addr, other_ip, port in (
                ("a", self.a_key, self.b_pub, B_ADDR, B_V4, A_ADDR[1]),
                ("b", self.b_key, self.a_pub, A_ADDR, A_V4, B_ADDR[1])):
            dev = Device(private_key=key, clock=lambda: self.now, wall_clock=lambda: self.now + 1.7e9,
                         rng=random.Random(1 if name == "a" else 2))
            if with_paths:
                dev.paths = Paths(wall_clock=lambda: self.now + 1.7e9)
                dev.paths.derp_up = True
            dev.apply_update(DeviceUpdate(listen_port=port, peers=[PeerUpdate(
                public_key=other_pub, endpoint=other_addr if endpoints else None,
                allowed_ips=[ipaddress.ip_network(f"{other_ip}/32")])]), now=self.now)
            self.devices[name] = dev
        self.addr = {"a": A_ADDR, "b": B_ADDR}
        self.pub = {"a": self.a_pub, "b": self.b_pub}

    def other(self, name: str) -> str:
        return "b" if name == "a" else "a"

    def deliver(self, sender: str, sent: list) -> None:
        """Route what `sender` emitted; recursively deliver the answers (bounded)."""
        queue = [(sender, sent)]
        for _ in range(200):
            if not queue:
                return
            src, items = queue.pop(0)
            dst = self.other(src)
            dev = self.devices[dst]
            for transmit in items:
                endpoint = transmit.endpoint
                grams = [bytes(d) for d in transmit.datagrams]
                if is_derp_endpoint(endpoint):
                    assert derp_key(endpoint) == self.pub[dst]
                    self.derp_packets += len(grams)
                    out: Out = {}
                    data = []
                    for g in grams:
                        if is_disco(g):
                            dev.paths.receive_derp_disco(self.pub[src], g, self.now, out)
                        else:
                            data.append((g, derp_endpoint(self.pub[src])))
                    answers = transmits(out)
                    if data:
                        if dev.paths is not None:
                            dev.paths.rx_via_derp = True
                        try:
                            packets, more = dev.handle_udp_batch(data, self.now)
                        finally:
                            if dev.paths is not None:
                                dev.paths.rx_via_derp = False
                        self.tun[dst] += packets
                        answers += more
                    if answers:
                        queue.append((dst, answers))
                    continue
                self.udp_datagrams += grams
                if self.blocked or endpoint != self.addr[dst]:
                    continue  # dropped (the rule), or an address nobody has
                packets, answers = dev.handle_udp_batch([(g, self.addr[src]) for g in grams], self.now)
                self.tun[dst] += packets
                if answers:
                    queue.append((dst, answers))
        raise AssertionError("delivery did not settle")

    def send(self, src: str, payload: bytes = b"x" * 100) -> None:
        dst_ip = B_V4 if src == "a" else A_V4
        src_ip = A_V4 if src == "a" else B_V4
        self.deliver(src, self.devices[src].handle_tun_batch([ipv4_packet(src_ip, dst_ip, payload)], self.now))

    def advance(self, seconds: float, step: float = 0.25, traffic: bool = True) -> None:
        for _ in range(int(seconds / step)):
            self.now += step
            for name, dev in self.devices.items():
                out: Out = {}
                if dev.paths is not None:
                    dev.paths.tick(self.now, out)
                self.deliver(name, dev.tick(self.now) + transmits(out))
            if traffic:
                self.send("a")
                self.send("b")

    def path(self, name: str):
        dev = self.devices[name]
        peer = dev.peers[self.pub[self.other(name)]]
        return dev.paths.tx_endpoint(peer, self.now)


def test_blocked_udp_comes_up_over_derp_then_moves_direct_and_back() -> None:
    net = Net()
    net.blocked = True
    net.send("a", b"hello")
    # The initiation went direct (lost) and, the direct path being unproven, over the relay too: the response
    # comes back over the relay and the staged packet follows it there, no REKEY_TIMEOUT wait.
    assert [p for p in net.tun["b"] if p.endswith(b"hello")]
    assert is_derp_endpoint(net.path("a")) and is_derp_endpoint(net.path("b"))
    net.advance(12)
    assert is_derp_endpoint(net.path("a")) and is_derp_endpoint(net.path("b"))
    a = net.devices["a"]
    state = a.paths.peers[net.b_pub]
    assert state.derp.tx_packets > 0 and state.derp.rx_packets > 0 and state.direct.rx_packets == 0
    # the WireGuard endpoint (wg show) is still the configured one, never a relay pseudo-endpoint
    assert a.peers[net.b_pub].endpoint == B_ADDR
    assert net.devices["b"].peers[net.a_pub].endpoint == A_ADDR

    net.blocked = False
    for step in range(40):  # noqa: B007
        net.advance(0.25)
        if net.path("a") == B_ADDR and net.path("b") == A_ADDR:
            break
    assert net.path("a") == B_ADDR and net.path("b") == A_ADDR
    assert step * 0.25 <= 10
    direct_rx = state.direct.rx_packets
    net.advance(2)
    assert state.direct.rx_packets > direct_rx

    net.blocked = True
    for step in range(60):  # noqa: B007
        net.advance(0.25)
        if is_derp_endpoint(net.path("a")) and is_derp_endpoint(net.path("b")):
            break
    assert is_derp_endpoint(net.path("a")) and is_derp_endpoint(net.path("b"))
    assert step * 0.25 <= 10
    status = a.paths.status(a, net.now)
    assert status["counters"]["path_changes"] >= 2
    assert status["peers"][0]["path"] == "derp"


def test_relay_down_means_direct_paths_only() -> None:
    net = Net()
    for dev in net.devices.values():
        dev.paths.derp_up = False
    net.send("a", b"hello")
    net.advance(2)
    assert net.path("a") == B_ADDR
    assert net.derp_packets == 0
    assert net.tun["b"]


def test_no_paths_no_disco_on_the_wire() -> None:
    net = Net(with_paths=False)
    net.send("a", b"hello")
    net.advance(20)
    assert net.tun["b"] and net.derp_packets == 0
    assert net.udp_datagrams and not any(d.startswith(MAGIC) for d in net.udp_datagrams)


def test_private_key_change_rebuilds_disco_keys() -> None:
    net = Net()
    a = net.devices["a"]
    old = a.paths.keys
    assert old is not None and old.has_peer(net.b_pub)
    a.apply_update(DeviceUpdate(private_key=generate_private_key()), now=net.now)
    assert a.paths.keys is not old and a.paths.keys.has_peer(net.b_pub)
    a.apply_update(DeviceUpdate(peers=[PeerUpdate(public_key=net.b_pub, remove=True)]), now=net.now)
    assert net.b_pub not in a.paths.peers and not a.paths.keys.has_peer(net.b_pub)


def test_disco_over_derp_must_be_sealed_by_the_relay_source() -> None:
    net = Net()
    a, b = net.devices["a"], net.devices["b"]
    from turbowg.path.disco import Ping
    sealed = b.paths.keys.seal(net.a_pub, Ping(b"t" * 12))
    out: Out = {}
    a.paths.receive_derp_disco(b"\x01" * 32, sealed, net.now, out)  # claims another relay source
    assert a.paths.counters.get("disco_rx_dropped") == 1
    a.paths.receive_derp_disco(net.b_pub, sealed, net.now, out)
    assert a.paths.counters.get("disco_rx_derp") == 1


def test_pseudo_endpoints() -> None:
    key = bytes(range(32))
    ep = derp_endpoint(key)
    assert ep[1] == 0 and derp_key(ep) == key and is_derp_endpoint(ep)
    assert derp_key(("192.0.2.1", 0)) is None and not is_derp_endpoint(("192.0.2.1", 51820))
    assert all(not a.startswith("127.") for a in interface_addresses())
