"""The daemon's relay link (turbowg/daemon/derp_link.py) against an in-process TLS relay, without TUN or UDP,
and `turbowg status` (turbowg/daemon/status.py): the status socket, its JSON, the text form, the errors."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from test_relay_mesh_tls import self_signed, tls_relay, until

from turbowg.daemon import derp_link
from turbowg.daemon.derp_link import DerpLink, backoff_delay, check_url, ssl_context_for
from turbowg.daemon.status import StatusError, fetch, format_status, status_path
from turbowg.device import Device
from turbowg.noise.primitives import generate_private_key, public_key
from turbowg.uapi.model import DeviceUpdate, PeerUpdate


class FakeRuntime:
    """What DerpLink uses of the Runtime, without TUN or UDP."""

    def __init__(self, socket_dir: str, ifname: str = "twgstat0") -> None:
        self.ifname = ifname
        self.socket_dir = socket_dir
        self.device = Device(private_key=generate_private_key())
        self._loop = asyncio.get_running_loop()
        self.udp = None
        self.tun = None
        self.sent: list = []
        self.stopped = ""

    def _send(self, transmits) -> None:
        self.sent += transmits

    def _reschedule_timer(self) -> None:
        pass

    def stop(self, reason: str = "") -> None:
        self.stopped = reason


def test_backoff_is_exponential_capped_and_jittered() -> None:
    rng = random.Random(7)
    delays = [backoff_delay(n, rng) for n in range(1, 12)]
    for n, delay in enumerate(delays, start=1):
        full = min(derp_link.RECONNECT_MAX, derp_link.RECONNECT_MIN * 2 ** (n - 1))
        assert full * (1 - derp_link.RECONNECT_JITTER) <= delay <= full
    assert max(delays) <= derp_link.RECONNECT_MAX


def test_url_checks_and_tls_context(tmp_path: Path) -> None:
    assert check_url("http://10.0.0.3:3340") is None
    assert check_url("https://relay.example.net") is None
    assert "scheme" in check_url("ftp://relay")
    assert "no host" in check_url("http://:3340")
    assert "port" in check_url("http://relay:99999")
    assert ssl_context_for("http://10.0.0.3:3340", None) is None
    ctx = ssl_context_for("https://relay.example.net", None)
    assert ctx is not None and ctx.verify_mode.name == "CERT_REQUIRED" and ctx.check_hostname


def test_turbowgd_refuses_a_bad_relay_url() -> None:
    proc = subprocess.run([sys.executable, "-m", "turbowg.turbowgd", "-f", "--derp", "ftp://x", "twgbadurl0"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "scheme" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "turbowg.turbowgd", "-f", "--derp", "https://x",
                           "--derp-ca", "/nonexistent/ca.pem", "twgbadurl0"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 1 and "no such file" in proc.stderr


def test_link_uses_the_wireguard_key_verifies_tls_and_follows_key_changes(tmp_path: Path) -> None:
    crt, key = self_signed(tmp_path)

    async def scenario() -> None:
        async with tls_relay(crt, key) as (server, port):
            runtime = FakeRuntime(str(tmp_path))
            link = DerpLink(runtime, f"https://127.0.0.1:{port}", ca_file=str(crt))
            runtime.derp_link = link
            link.start()
            try:
                await until(lambda: link.paths.derp_up)
                first = runtime.device.public_key
                assert first in server.clients  # the relay knows us by our WireGuard public key
                # a private key change through UAPI: a new relay identity at once
                runtime.device.apply_update(DeviceUpdate(private_key=generate_private_key()))
                link.after_set()
                second = runtime.device.public_key
                await until(lambda: second in server.clients and link.paths.derp_up)
                await until(lambda: first not in server.clients)
                assert link.connects == 2

                # the status socket answers with the paths
                peer_key = public_key(generate_private_key())
                runtime.device.apply_update(DeviceUpdate(peers=[PeerUpdate(
                    public_key=peer_key, endpoint=("192.0.2.9", 51820),
                    allowed_ips=[ipaddress.ip_network("10.9.0.2/32")])]))
                doc = await asyncio.to_thread(fetch, runtime.ifname, str(tmp_path))
                assert doc["relay"]["connected"] and doc["relay"]["connects"] == 2
                assert doc["interface"] == runtime.ifname
                [peer] = doc["peers"]
                assert peer["path"] == "direct" and peer["endpoint"] == "192.0.2.9:51820"
                assert set(peer["traffic"]) == {"direct", "derp"}
                text = format_status(doc)
                assert "direct 192.0.2.9:51820" in text and "connected" in text
                assert json.loads(json.dumps(doc)) == doc
            finally:
                await link.close()
            assert not os.path.exists(status_path(runtime.ifname, str(tmp_path)))
            assert not link.paths.derp_up

    asyncio.run(scenario())


def test_link_refuses_a_relay_certificate_it_cannot_verify(tmp_path: Path, monkeypatch) -> None:
    crt, key = self_signed(tmp_path)
    monkeypatch.setattr(derp_link, "RECONNECT_MIN", 0.05)

    async def scenario() -> None:
        async with tls_relay(crt, key) as (server, port):
            runtime = FakeRuntime(str(tmp_path), "twgstat1")
            link = DerpLink(runtime, f"https://127.0.0.1:{port}")  # system store: the self-signed cert fails
            runtime.derp_link = link
            link.start()
            try:
                await until(lambda: link.counters.get("derp_connect_failures", 0) >= 2)
                assert not link.paths.derp_up and not server.clients
            finally:
                await link.close()

    asyncio.run(scenario())


def test_no_key_no_connection_until_one_is_set(tmp_path: Path) -> None:
    crt, key = self_signed(tmp_path)

    async def scenario() -> None:
        async with tls_relay(crt, key) as (server, port):
            runtime = FakeRuntime(str(tmp_path), "twgstat2")
            runtime.device = Device()
            link = DerpLink(runtime, f"https://127.0.0.1:{port}", ca_file=str(crt))
            runtime.derp_link = link
            link.start()
            try:
                await asyncio.sleep(0.3)
                assert not server.clients and link.connects == 0
                runtime.device.apply_update(DeviceUpdate(private_key=generate_private_key()))
                link.after_set()
                await until(lambda: runtime.device.public_key in server.clients)
            finally:
                await link.close()

    asyncio.run(scenario())


def test_fetch_errors(tmp_path: Path) -> None:
    with pytest.raises(StatusError, match="no such interface"):
        fetch("nope0", str(tmp_path))
    (tmp_path / "plain0.sock").write_text("")
    with pytest.raises(StatusError, match="without a DERP relay"):
        fetch("plain0", str(tmp_path))


def test_status_command_exit_code_without_interface(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "turbowg", "status", "nope0", "--socket-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "no such interface" in proc.stderr


def test_format_status_of_a_relay_peer() -> None:
    doc = {
        "interface": "wg0", "relay": {"url": "http://10.0.0.3:3340", "connected": True}, "stun": "198.51.100.7:51820",
        "local_candidates": ["192.168.1.2:51820"], "counters": {"tx_packets_derp": 5, "path_changes": 1},
        "peers": [{"public_key": "K=", "path": "derp", "endpoint": None, "state": "probing", "direct_rtt": None,
                   "probe_rtts": {"203.0.113.5:51820": None, "[2001:db8::5]:51820": 0.0123},
                   "last_path_change": 1000.0,
                   "traffic": {"direct": {"tx_packets": 0, "tx_bytes": 0, "rx_packets": 0, "rx_bytes": 0},
                               "derp": {"tx_packets": 5, "tx_bytes": 3 << 20, "rx_packets": 2, "rx_bytes": 96}},
                   "probes": {"sent": 4, "answered": 0}}],
    }
    text = format_status(doc, now=1010.0)
    assert "path: relay http://10.0.0.3:3340 (probing), changed 10 s ago" in text
    assert "probe [2001:db8::5]:51820: 12.30 ms" in text
    assert "derp: sent 3.00 MiB (5 pkts)" in text
