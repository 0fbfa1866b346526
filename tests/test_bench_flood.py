"""`turbowg bench flood` end to end, tiny: a 1 s flood at 2000 initiations/s against a turbowgd responder."""

from __future__ import annotations

import json
import os

import pytest

from turbowg.bench import flood
from turbowg.bench.flooder import build_initiation, build_packets, mac1_key_for
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
                                            "handshake_queue_backlog"))
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
