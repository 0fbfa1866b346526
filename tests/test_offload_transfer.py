"""Large transfers through the tunnel with offloads on (the default) arrive intact, turbowg <-> turbowg and
turbowg <-> wireguard-go, both directions: 200 MB over TCP, and a file over UDP sent with UDP_SEGMENT and
received with UDP_GRO (with resends of what is missing), each compared by SHA-256. The daemon's `stats=1`
counters show that the turbowg side really used its offloads (GSO frames read from the TUN and split,
coalesced frames written, GSO on the underlay), and `ethtool -k` on its interface shows them on."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from test_integration import device_stats

from turbowg.testing.marks import needs_netns
from turbowg.testing.tcpxfer import tcp_transfer, wait_ready
from turbowg.testing.tunnel import Side, Tunnel, ping, tunnel, wg_dump

pytestmark = [needs_netns, pytest.mark.netns]
have_wggo = pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="needs Debian wireguard-go")

PAIRS = [pytest.param(("turbowg", "turbowg"), id="turbowg-turbowg"),
         pytest.param(("turbowg", "wireguard-go"), id="turbowg-wggo", marks=have_wggo)]
DIRECTIONS = ["a_to_b", "b_to_a"]

TCP_BYTES = 200 * 1024 * 1024
TCP_MSS_MAX = 1420 - 40  # no inner TCP segment carries more than this over the 1420-byte tunnel MTU
UDP_BYTES = 32 * 1024 * 1024
UDP_RATE_MBIT = 200  # first round paced well below what the tunnel carries (~0.5-1 Gbit/s here)
UDP_WITHHOLD_EVERY = 200  # the first round leaves out every 200th datagram, so the resend path always runs
UDP_MAX_ROUNDS = 8
UDP_HELPER = ["-m", "turbowg.testing.udpgen"]  # its file-serve / file-send modes
FEATURES = ("tx-checksumming", "tcp-segmentation-offload", "tx-udp-segmentation")


def ends(tun: Tunnel, direction: str) -> tuple[Side, Side]:
    return (tun.a, tun.b) if direction == "a_to_b" else (tun.b, tun.a)


def offload_features(side: Side, raw: bool = False) -> dict[str, str]:
    """`ethtool -k` inside the side's namespace: feature name -> "on"/"off" (without "[fixed]" etc.; with
    `raw`, the whole value, e.g. "off [fixed]")."""
    out = side.sh("ethtool", "-k", side.ifname).stdout
    features: dict[str, str] = {}
    for line in out.splitlines():
        name, sep, value = line.strip().partition(":")
        if sep and value.strip():
            features[name] = value.strip() if raw else value.split()[0]
    return features


def kernel_lacks_uso(value: str | None) -> bool:
    """What ethtool shows for tx-udp-segmentation on a TUN whose kernel cannot do USO (before Linux 6.2):
    no such line, or "off [fixed]". A plain "off" is turbowg not asking for it."""
    return value is None or "[fixed]" in value and not value.startswith("on")


def assert_offloads_on(side: Side, need_uso: bool = False) -> None:
    """Checksum, TSO and USO offloads on. Where the kernel cannot do USO, a test that needs it (`need_uso`) is
    skipped, saying so; the others check the rest. Where the kernel can, USO must be on."""
    features = offload_features(side, raw=True)
    for name in FEATURES:
        value = features.get(name)
        if name == "tx-udp-segmentation" and kernel_lacks_uso(value):
            if need_uso:
                pytest.skip(f"kernel without USO on TUN (before 6.2): {side.ifname} {name} is {value!r}")
            continue
        assert value is not None and value.split()[0] == "on", f"{side.ifname}: {name} is {value!r}"


def counters(tun: Tunnel) -> dict[str, dict[str, int]]:
    return {side.ifname: device_stats(side.ifname) for side in (tun.a, tun.b) if side.impl == "turbowg"}


def delta(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]], side: Side) -> dict[str, int]:
    b, a = before[side.ifname], after[side.ifname]
    return {k: a[k] - b.get(k, 0) for k in a}


def assert_offloads_used(tun: Tunnel, sender: Side, receiver: Side, before, after, min_packets: int) -> None:
    """What the turbowg end(s) of one transfer show: TUN reads of GSO frames split into many packets on the
    sending side, GSO sends on the underlay; coalesced TUN writes on the receiving side."""
    for side in (sender, receiver):
        if side.impl != "turbowg":
            continue
        d = delta(before, after, side)
        assert d.get("tunio_read_malformed", 0) == 0, d
        assert d.get("tunio_write_errors", 0) == 0, d
        assert d.get("tunio_gro_disabled", 0) == 0, d
        assert d.get("udp_send_errors", 0) == 0 and d.get("udp_gso_fallbacks", 0) == 0, d
        if side is sender:
            assert d["tunio_read_packets"] >= min_packets, d
            assert d["tunio_read_frames"] < d["tunio_read_packets"], f"no GSO frame was split: {d}"
            assert d["udp_send_calls"] < d["udp_send_datagrams"], f"no GSO send on the underlay: {d}"
        else:
            assert d["tunio_write_packets"] >= min_packets, d
            assert d["tunio_write_frames"] < d["tunio_write_packets"], f"no coalesced TUN write: {d}"
            if sender.impl == "turbowg":  # wireguard-go 0.0.20220316 sends one datagram per call: no GRO
                assert d["udp_recv_calls"] < d["udp_recv_datagrams"], f"no GRO on the underlay: {d}"


@contextlib.contextmanager
def ready_tunnel(impls: tuple[str, str], direction: str, tmp_path,
                 need_uso: bool = False) -> Iterator[tuple[Tunnel, Side, Side]]:
    """The tunnel, up and pinging, with offloads shown on by ethtool on every turbowg side."""
    with tunnel(*impls, tmp_path=str(tmp_path)) as tun:
        sender, receiver = ends(tun, direction)
        for side in (tun.a, tun.b):
            if side.impl == "turbowg":
                assert_offloads_on(side, need_uso)
        assert ping(sender, receiver.inner_ip), "no tunnel"
        yield tun, sender, receiver


def peer_counters(side: Side) -> tuple[int, int]:
    peer = wg_dump(side)[1]  # public-key psk endpoint allowed-ips latest-handshake rx tx keepalive
    return int(peer[5]), int(peer[6])


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("impls", PAIRS)
def test_tcp_200mb_with_offloads_arrives_intact(impls: tuple[str, str], direction: str, tmp_path) -> None:
    with ready_tunnel(impls, direction, tmp_path) as (tun, sender, receiver):
        before = counters(tun)
        started = time.monotonic()
        sent, received = tcp_transfer(sender, receiver, receiver.inner_ip, TCP_BYTES, timeout=60)
        seconds = time.monotonic() - started
        after = counters(tun)
        print(f"\n{impls} {direction}: {TCP_BYTES >> 20} MiB TCP in {seconds:.1f} s "
              f"({TCP_BYTES * 8 / seconds / 1e9:.2f} Gbit/s)")
        assert sent == received, (sent, received)
        assert sent.split()[0] == str(TCP_BYTES)
        assert_offloads_used(tun, sender, receiver, before, after, min_packets=TCP_BYTES // TCP_MSS_MAX)
        # The peer counters agree that the data went this way (WireGuard overhead per packet on top).
        assert peer_counters(sender)[1] > TCP_BYTES and peer_counters(receiver)[0] > TCP_BYTES


def udp_transfer(sender: Side, receiver: Side, timeout: float = 40) -> tuple[dict, dict, float]:
    """Run turbowg.testing.udpgen's file transfer: receiver in its namespace, sender in its; return both JSON results."""
    server = subprocess.Popen(["ip", "netns", "exec", receiver.ns, sys.executable, *UDP_HELPER, "file-serve",
                               receiver.inner_ip, "9000", "9001", "--timeout", str(timeout)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_ready(server, 15), "UDP receiver did not get ready"
        started = time.monotonic()
        proc = sender.sh(sys.executable, *UDP_HELPER, "file-send", receiver.inner_ip, "9000", "9001",
                         "--bytes", str(UDP_BYTES), "--rate-mbit", str(UDP_RATE_MBIT),
                         "--withhold-every", str(UDP_WITHHOLD_EVERY), "--rounds", str(UDP_MAX_ROUNDS),
                         "--timeout", str(timeout), check=False, timeout=timeout + 10)
        seconds = time.monotonic() - started
        out, err = server.communicate(timeout=timeout + 10)
        assert proc.returncode == 0, f"sender failed: {proc.stderr}\nreceiver: {err}"
        assert server.returncode == 0, f"receiver failed: {err}\nsender: {proc.stdout}"
        return json.loads(proc.stdout.strip().splitlines()[-1]), json.loads(out.strip().splitlines()[-1]), seconds
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("impls", PAIRS)
def test_udp_gso_gro_file_with_offloads_arrives_intact(impls: tuple[str, str], direction: str, tmp_path) -> None:
    with ready_tunnel(impls, direction, tmp_path, need_uso=True) as (tun, sender, receiver):
        before = counters(tun)
        sent, got, seconds = udp_transfer(sender, receiver)
        after = counters(tun)
        first_loss = got["missing_per_round"][0] - sent["withheld"]
        print(f"\n{impls} {direction}: {UDP_BYTES >> 20} MiB UDP in {seconds:.1f} s, {sent['rounds']} rounds, "
              f"first-round loss {first_loss}/{sent['count'] - sent['withheld']}, resent {sent['resent']}, "
              f"duplicates {got['duplicates']}, GRO buffers {got['gro_buffers']}/{got['recv_calls']}")
        summary = {"sent": sent, "received": got}
        # Nothing arrived damaged: every datagram had its length and digest right, no buffer was truncated.
        assert got["corrupt"] == 0 and got["truncated"] == 0, summary
        # A duplicate needs a resend of a datagram that was late rather than lost; more would be the tunnel's.
        assert got["duplicates"] <= sent["resent"], summary
        # The file is complete and the same.
        assert sent["complete"] and got["unique"] == got["count"] == sent["count"], summary
        assert got["bytes"] == sent["bytes"] == UDP_BYTES, summary
        assert got["sha256"] == sent["sha256"], summary
        # The resend path ran: the withheld datagrams were reported missing and sent in a later round.
        assert sent["withheld"] > 0 and sent["rounds"] >= 2, summary
        assert got["missing_per_round"][0] >= sent["withheld"], summary
        # The sender really used UDP_SEGMENT: up to 47 datagrams of 1392 bytes per sendmsg.
        assert sent["gso_calls"] > 0 and sent["sendmsg_calls"] * 10 < sent["sent"], summary
        if receiver.impl == "turbowg":
            # turbowg wrote coalesced UDP frames to its TUN, which the UDP_GRO socket received as such.
            assert got["gro_buffers"] > 0 and got["max_segments"] > 1, summary
        assert_offloads_used(tun, sender, receiver, before, after,
                             min_packets=sent["count"] - sent["withheld"] - max(first_loss, 0))


def test_ethtool_shows_offloads_on_the_daemon_interface(tmp_path) -> None:
    """The interface turbowgd creates (not only a TUN opened directly, as in test_tun_device) has the offload
    features on; with TURBOWG_OFFLOADS=0 they are off, so the check can tell the two apart."""
    with tunnel("turbowg", "turbowg", env_b={"TURBOWG_OFFLOADS": "0"}, tmp_path=str(tmp_path)) as tun:
        assert_offloads_on(tun.a)
        off = offload_features(tun.b)
        assert off["tx-checksumming"] == "off" and off["tcp-segmentation-offload"] == "off", off
        assert off.get("tx-udp-segmentation", "off") == "off", off
        # The two still talk, offloads on one side only.
        assert ping(tun.a, tun.b.inner_ip) and ping(tun.b, tun.a.inner_ip)


def test_uso_guard_only_excuses_what_the_kernel_cannot_do() -> None:
    """The ethtool reading above: only an absent line or "off [fixed]" (the kernel) excuses USO; "off" (turbowg
    did not negotiate it) fails; a UDP test skips, with the reason, instead of passing without USO."""
    class FakeSide:
        ifname = "wgtest"

        def __init__(self, uso_line: str | None) -> None:
            self.out = "tx-checksumming: on\ntcp-segmentation-offload: on\n" + (uso_line or "")

        def sh(self, *args: str):
            return type("Done", (), {"stdout": self.out})()

    assert_offloads_on(FakeSide("tx-udp-segmentation: on\n"), need_uso=True)
    assert_offloads_on(FakeSide("tx-udp-segmentation: off [fixed]\n"))
    assert_offloads_on(FakeSide(None))
    with pytest.raises(AssertionError, match="tx-udp-segmentation is 'off'"):
        assert_offloads_on(FakeSide("tx-udp-segmentation: off\n"))
    with pytest.raises(pytest.skip.Exception, match="kernel without USO"):
        assert_offloads_on(FakeSide("tx-udp-segmentation: off [fixed]\n"), need_uso=True)
    with pytest.raises(pytest.skip.Exception, match="kernel without USO"):
        assert_offloads_on(FakeSide(None), need_uso=True)
