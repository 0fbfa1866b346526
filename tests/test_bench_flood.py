"""`turbowg bench flood` end to end, tiny: a 1 s flood at 2000 initiations/s against a turbowgd responder."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import pytest

from turbowg.bench import flood
from turbowg.bench.flooder import build_initiation, build_packets, ethernet_frame, mac1_key_for
from turbowg.noise.cookie import CookieChecker
from turbowg.testing.marks import needs_iperf3, needs_netns
from turbowg.testing.netns import namespaces


def test_flooder_packets_carry_a_valid_mac1():
    public = os.urandom(32)
    checker = CookieChecker(public)
    assert checker.check_mac1(build_initiation(mac1_key_for(public)))
    assert not CookieChecker(os.urandom(32)).check_mac1(build_initiation(mac1_key_for(public)))
    packets = build_packets(public, "10.203.0.254", 51821, ["10.203.0.1", "10.203.0.2"], [40000, 40001], 8)
    assert len(packets) == 8 and all(len(p) == 20 + 8 + 148 for p in packets)
    sources = {(p[12:16], p[20:22]) for p in packets}
    assert len(sources) == 4  # every address x port
    assert all(checker.check_mac1(p[28:]) for p in packets)


@needs_netns
@needs_iperf3
def test_tiny_flood_reaches_the_responder_and_is_torn_down(tmp_path):
    before = namespaces()
    code = flood.run_bench(["turbowg"], ["2000"], runs=1, duration=2.0, output_dir=str(tmp_path),
                           log=lambda *a, **k: None)
    assert code == 0
    report = json.loads((tmp_path / "flood-runs.json").read_text())
    runs = {r["rate"]: r for r in report["runs"]}
    assert set(runs) == {"none", "2000"} and all(r["ok"] for r in runs.values())
    flooded = runs["2000"]
    assert flooded["gbps"] > 0 and runs["none"]["gbps"] > 0
    # The flooder sent about what it was asked and the responder's namespace received it.
    assert 1500 <= flooded["flood_rate"] <= 2100
    assert flooded["flood_delivered_rate"] > 1000
    # The responder saw the messages: its handshake counters moved (mac1 is valid, so each one is either
    # answered with a cookie, rate limited, dropped with the queue full, or fails identification -- or still
    # waits in the worker's queue at the end of the 2 s window: ~4000 sent, so > 1000 leaves room for a
    # worker at nice 10 that the tunnel's own iperf3 keeps off the CPU for a while).
    counters = flooded["daemon_counters"]
    seen = sum(counters.get(k, 0) for k in ("tx_cookie_reply", "tx_cookie_reply_ratelimited", "rx_initiation_rejected",
                                            "rx_handshake_queue_full", "rx_handshake_ratelimited",
                                            "handshake_queue_backlog", "rx_handshake_kernel_ratelimited"))
    assert seen > 1000, counters
    assert counters.get("rx_initiation_rejected", 0) + counters.get("tx_cookie_reply", 0) > 0, counters
    assert counters.get("rx_bad_mac1", 0) == 0
    assert runs["none"]["flood_delivered_rate"] < 50  # no flood: only neighbour discovery and such
    # Everything the benchmark created is gone.
    leftover = {ns for ns in namespaces() - before if ns.startswith(("twflood-", "twt"))}
    assert not leftover


def test_bad_rates_are_refused():
    with pytest.raises(ValueError):
        flood._check_rates(["fast"])
    assert flood._check_rates(["20000", "max"]) == ["20000", "max"]


def test_ethernet_frames_carry_the_same_datagram_with_a_valid_ip_header():
    public = os.urandom(32)
    [packet] = build_packets(public, "10.203.0.254", 51821, ["10.203.0.7"], [40003], 1)
    frame = ethernet_frame(packet, b"\x02" * 6, b"\x04" * 6)
    assert frame[:12] == b"\x04" * 6 + b"\x02" * 6 and frame[12:14] == b"\x08\x00"
    ip = frame[14:34]
    assert struct.unpack("!H", ip[2:4])[0] == len(packet)  # total length
    total = sum(struct.unpack("!10H", ip))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    assert total == 0xFFFF  # the header checksum verifies
    assert ip[12:20] == packet[12:20] and frame[34:] == packet[20:]  # same addresses, UDP header and payload


_RECEIVER = """
import json, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(0.5)
print("ready", flush=True)
seen = {}
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    try:
        data, (host, port) = s.recvfrom(2048)
    except TimeoutError:
        continue
    key = f"{host}:{port}:{len(data)}:{data[0]}"
    seen[key] = seen.get(key, 0) + 1
print(json.dumps(seen), flush=True)
"""


@needs_netns
@pytest.mark.parametrize("mode", ["raw", "packet"])
def test_both_flooder_modes_deliver_the_same_datagrams(mode):
    """The responder's side receives, from either way of sending, one 148-byte initiation per datagram from
    every spoofed address x port, at the asked rate."""
    from turbowg.testing.netns import delete_namespace, run

    ns_b = f"twfm-{os.urandom(3).hex()}"
    run("ip", "netns", "add", ns_b)
    try:
        run("ip", "-n", ns_b, "link", "set", "lo", "up")
        with flood.flooder_namespace(ns_b, sources=4) as side:
            receiver = subprocess.Popen(["ip", "netns", "exec", ns_b, sys.executable, "-c", _RECEIVER, "5599", "3"],
                                        stdout=subprocess.PIPE, text=True)
            try:
                assert receiver.stdout is not None and receiver.stdout.readline().strip() == "ready"
                cmd = ["ip", "netns", "exec", side.ns, sys.executable, "-m", "turbowg.bench.flooder", "--dst",
                       side.target, "--port", "5599", "--public-key", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                       "--source-net", f"{flood.FLOOD_NET}.0/24", "--sources", "4", "--ports", "2", "--rate", "2000",
                       "--duration", "1"]
                if mode == "packet":
                    cmd += ["--interface", side.veth_f]
                report = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout)
                seen = json.loads(receiver.communicate(timeout=10)[0])
            finally:
                if receiver.poll() is None:
                    receiver.kill()
                    receiver.wait()
        assert report["mode"] == mode and 1500 <= report["sent"] <= 2100
        expected = {f"{flood.FLOOD_NET}.{i}:{p}:148:1" for i in range(1, 5) for p in (40000, 40001)}
        assert set(seen) == expected, seen
        assert sum(seen.values()) >= 0.95 * report["sent"]
    finally:
        delete_namespace(ns_b)
