"""A real turbowgd under a handshake flood keeps completing handshakes: the established peer's own rekeying
(REKEY_AFTER_TIME shortened to 3 s on the initiator with the test-only TURBOWG_REKEY_AFTER_TIME) goes on
while the responder is flooded with initiations that carry a valid mac1, through the cookie dance when
the responder is under load."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from turbowg.bench.flood import FLOOD_NET, FLOOD_PORTS, flooder_namespace, responder_of, uapi_stats
from turbowg.testing.marks import needs_netns
from turbowg.testing.tunnel import TunnelSpec, build_topology, known_implementations

FLOOD_RATE = 10_000
SECONDS = 22


def _delta(after: dict[str, int] | None, before: dict[str, int] | None, key: str) -> int:
    return (after or {}).get(key, 0) - (before or {}).get(key, 0)


@needs_netns
def test_rekeying_goes_on_under_a_handshake_flood():
    impl = known_implementations(with_versions=False)["turbowg"]
    spec = TunnelSpec("turbowg", impl, impl, env_a={"TURBOWG_REKEY_AFTER_TIME": "3"})
    with build_topology([spec]) as topo, flooder_namespace(topo.ns_b) as side:
        tun = topo.tunnels["turbowg"]
        resp = responder_of(topo, "turbowg")
        b_before = uapi_stats(tun.b.ifname)
        a_before = uapi_stats(tun.a.ifname)
        flooder = subprocess.Popen(
            topo.exec_args(side.ns, sys.executable, "-m", "turbowg.bench.flooder", "--dst", side.target,
                           "--port", str(resp.port), "--public-key", resp.public_key,
                           "--source-net", f"{FLOOD_NET}.0/24", "--sources", str(len(side.sources)),
                           "--ports", str(FLOOD_PORTS), "--rate", str(FLOOD_RATE), "--duration", str(SECONDS + 2)),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(0.5)
            count = int(SECONDS / 0.2)
            ping = topo.run(topo.ns_a, "ping", "-4", "-n", "-i", "0.2", "-c", str(count), "-W", "1",
                            tun.server_v4, check=False, timeout=SECONDS + 20)
            out, err = flooder.communicate(timeout=30)
        finally:
            if flooder.poll() is None:
                flooder.kill()
                flooder.communicate(timeout=5)
        report = json.loads(out)
        b_after = uapi_stats(tun.b.ifname)
        a_after = uapi_stats(tun.a.ifname)
        assert report["sent"] > FLOOD_RATE * SECONDS * 0.5, report
        # The responder was really flooded: it answered cookies (under load), ran out of queue, or its eBPF
        # steering program dropped over-limit sources in the kernel (turbowg/conn/ebpf.py).
        flood_seen = sum(_delta(b_after, b_before, k) for k in (
            "tx_cookie_reply", "tx_cookie_reply_ratelimited", "rx_handshake_queue_full", "rx_initiation_rejected",
            "rx_handshake_kernel_ratelimited"))
        assert flood_seen > FLOOD_RATE * SECONDS * 0.3, b_after
        assert _delta(b_after, b_before, "tx_cookie_reply") > 0, b_after
        # ... and still answered the real peer's rekeying initiations, several times.
        responses = _delta(b_after, b_before, "tx_response")
        print("rekey-under-flood:", responses, {k: _delta(a_after, a_before, k) for k in ("tx_initiation", "rx_cookie_reply")}, {k: _delta(b_after, b_before, k) for k in ("tx_cookie_reply", "rx_handshake_queue_full", "rx_initiation_rejected", "rx_handshake_ratelimited", "rx_handshake_kernel_ratelimited")})
        assert responses >= 2, (responses, a_after, b_after)
        assert _delta(a_after, a_before, "tx_initiation") >= responses
        # Data kept flowing through the tunnel all along (the old keypair stays usable while a rekey waits).
        received = ping.stdout.count("bytes from")
        assert received >= 0.8 * count, ping.stdout[-500:]
