"""turbowg against real peers in real network namespaces, configured only with the stock `wg` tools."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid

import pytest

from turbowg.testing.marks import needs_netns
from turbowg.testing.netns import namespace_pair, ns_run, wait_until
from turbowg.testing.tcpxfer import tcp_transfer
from turbowg.testing.tunnel import SOCKET_DIR, impl_command, ping, stop_daemon, tunnel, wg_dump

pytestmark = [needs_netns, pytest.mark.netns]
have_wggo = pytest.mark.skipif(shutil.which("wireguard-go") is None, reason="needs Debian wireguard-go")


def assert_pings_both_ways(tun) -> None:
    a, b = tun.a, tun.b
    assert ping(a, b.inner_ip), "IPv4 ping a -> b failed"
    assert ping(b, a.inner_ip), "IPv4 ping b -> a failed"
    assert ping(a, b.inner_ip6), "IPv6 ping a -> b failed"
    assert ping(b, a.inner_ip6), "IPv6 ping b -> a failed"


@have_wggo
@pytest.mark.parametrize("initiator", ["turbowg", "wireguard-go"])
def test_interop_with_wireguard_go(initiator: str, tmp_path) -> None:
    # Only the initiator knows the other's endpoint, so it must be the one that starts the handshake.
    endpoints = "a" if initiator == "turbowg" else "b"
    with tunnel("turbowg", "wireguard-go", endpoints=endpoints, tmp_path=str(tmp_path)) as tun:
        first, second = (tun.a, tun.b) if initiator == "turbowg" else (tun.b, tun.a)
        assert ping(first, second.inner_ip), f"{initiator} could not reach its peer"
        assert_pings_both_ways(tun)
        sent, received = tcp_transfer(tun.a, tun.b, tun.b.inner_ip, 50 * 1024 * 1024)
        assert sent == received
        sent, received = tcp_transfer(tun.b, tun.a, tun.a.inner_ip6, 50 * 1024 * 1024, port=5202)
        assert sent == received
        peer = wg_dump(tun.a)[1]
        # public-key psk endpoint allowed-ips latest-handshake rx tx keepalive
        assert peer[0] == tun.b.public
        assert time.time() - int(peer[4]) < 120
        assert int(peer[5]) > 50 * 1024 * 1024 and int(peer[6]) > 50 * 1024 * 1024


@pytest.mark.parametrize("psk", [False, True])
def test_turbowg_to_turbowg(psk: bool, tmp_path) -> None:
    with tunnel("turbowg", "turbowg", tmp_path=str(tmp_path), psk=psk) as tun:
        assert_pings_both_ways(tun)
        if psk:
            return
        sent, received = tcp_transfer(tun.a, tun.b, tun.b.inner_ip, 50 * 1024 * 1024)
        assert sent == received
        # Counters: what a sent is what b received (no loss on a veth), and both are well above the payload.
        time.sleep(0.5)
        a_peer, b_peer = wg_dump(tun.a)[1], wg_dump(tun.b)[1]
        a_rx, a_tx = int(a_peer[5]), int(a_peer[6])
        b_rx, b_tx = int(b_peer[5]), int(b_peer[6])
        assert a_tx > 50 * 1024 * 1024
        assert abs(a_tx - b_rx) <= 2 * 148 + 32 * 10, (a_tx, b_rx)
        assert abs(b_tx - a_rx) <= 2 * 148 + 32 * 10, (b_tx, a_rx)
        assert time.time() - int(a_peer[4]) < 60
        show = tun.a.wg("show", tun.a.ifname).stdout
        assert "latest handshake" in show and "transfer" in show


def test_pure_python_data_path_interoperates_with_the_c_one(tmp_path) -> None:
    """a runs without the C accelerators (TURBOWG_NO_C=1), b with them: the same bytes on the wire, both
    directions, 20 MB each way intact."""
    with tunnel("turbowg", "turbowg", tmp_path=str(tmp_path), env_a={"TURBOWG_NO_C": "1"}) as tun:
        assert_pings_both_ways(tun)
        sent, received = tcp_transfer(tun.a, tun.b, tun.b.inner_ip, 20 * 1024 * 1024)
        assert sent == received
        sent, received = tcp_transfer(tun.b, tun.a, tun.a.inner_ip, 20 * 1024 * 1024, port=5203)
        assert sent == received


def test_v6_underlay(tmp_path) -> None:
    with tunnel("turbowg", "turbowg", tmp_path=str(tmp_path), v6_endpoint=True) as tun:
        assert_pings_both_ways(tun)
        endpoint = wg_dump(tun.a)[1][2]
        assert endpoint == f"[{tun.b.underlay_ip6}]:{tun.b.port}"


def test_daemon_lifecycle_sigterm_and_link_delete() -> None:
    with namespace_pair() as pair:
        name = f"twl{uuid.uuid4().hex[:6]}"
        sock = f"{SOCKET_DIR}/{name}.sock"
        try:
            proc = subprocess.run(["ip", "netns", "exec", pair.a, *impl_command("turbowg"), name],
                                  capture_output=True, text=True, timeout=30)
            assert proc.returncode == 0, proc.stderr
            assert os.path.exists(sock)
            assert ns_run(pair.a, "ip", "link", "show", name).returncode == 0
            # Deleting the interface makes the daemon exit and remove its socket.
            ns_run(pair.a, "ip", "link", "del", name)
            assert wait_until(lambda: not os.path.exists(sock), 5)
            # Foreground mode, then SIGTERM: exits 0 and removes the socket and the interface.
            fg = subprocess.Popen(["ip", "netns", "exec", pair.a, *impl_command("turbowg"), "-f", name],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            assert wait_until(lambda: os.path.exists(sock), 15)
            fg.terminate()
            assert fg.wait(timeout=10) == 0
            assert not os.path.exists(sock)
            assert ns_run(pair.a, "ip", "link", "show", name, check=False).returncode != 0
        finally:
            ns_run(pair.a, "ip", "link", "del", name, check=False)
            if os.path.exists(sock):
                os.unlink(sock)


def test_bad_interface_name_is_refused() -> None:
    proc = subprocess.run([*impl_command("turbowg"), "this-name-is-far-too-long"], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "interface name" in proc.stderr


def raw_uapi(ifname: str, request: bytes) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(f"{SOCKET_DIR}/{ifname}.sock")
        s.sendall(request)
        data = b""
        while not data.endswith(b"\n\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.decode()


def test_malformed_set_gets_errno(tmp_path) -> None:
    with tunnel("turbowg", "turbowg", tmp_path=str(tmp_path)) as tun:
        for bad in (b"set=1\nlisten_port=notanumber\n\n", b"set=1\nprivate_key=zz\n\n",
                    b"set=1\nbogus_key=1\n\n", b"set=1\npublic_key=" + b"00" * 32 + b"\nallowed_ip=1.2.3.4/99\n\n",
                    b"set=1\npublic_key=" + b"11" * 32 + b"\nendpoint=nohost\n\n"):
            answer = raw_uapi(tun.a.ifname, bad)
            assert answer.startswith("errno=") and answer.strip() != "errno=0", (bad, answer)
        # The device still answers and still works.
        assert wg_dump(tun.a)[1][0] == tun.b.public
        assert ping(tun.a, tun.b.inner_ip)


def test_wg_quick_up_and_down(tmp_path) -> None:
    if shutil.which("wg-quick") is None:
        pytest.skip("needs wg-quick")
    with tunnel("turbowg", "turbowg", tmp_path=str(tmp_path)) as tun:
        # Replace side a's daemon with one brought up by wg-quick from a config file.
        a, b = tun.a, tun.b
        assert stop_daemon(a)
        name = f"twq{uuid.uuid4().hex[:6]}"
        conf = tmp_path / f"{name}.conf"
        conf.write_text(
            "[Interface]\n"
            f"PrivateKey = {a.private}\n"
            f"Address = {a.inner_ip}/24, {a.inner_ip6}/64\n"
            f"ListenPort = {a.port}\n"
            "MTU = 1420\n\n"
            "[Peer]\n"
            f"PublicKey = {b.public}\n"
            f"AllowedIPs = {b.inner_ip}/32, {b.inner_ip6}/128\n"
            f"Endpoint = {b.underlay_ip}:{b.port}\n"
        )
        env = dict(os.environ, WG_QUICK_USERSPACE_IMPLEMENTATION=" ".join(impl_command("turbowg")))
        sock = f"{SOCKET_DIR}/{name}.sock"
        try:
            up = subprocess.run(["ip", "netns", "exec", a.ns, "wg-quick", "up", str(conf)], env=env,
                                capture_output=True, text=True, timeout=60)
            assert up.returncode == 0, up.stderr
            a.ifname = name
            assert ping(a, b.inner_ip) and ping(a, b.inner_ip6)
            assert ping(b, a.inner_ip)
            down = subprocess.run(["ip", "netns", "exec", a.ns, "wg-quick", "down", str(conf)], env=env,
                                  capture_output=True, text=True, timeout=60)
            assert down.returncode == 0, down.stderr
            assert wait_until(lambda: not os.path.exists(sock), 5)
        finally:
            ns_run(a.ns, "ip", "link", "del", name, check=False)
            if os.path.exists(sock):
                os.unlink(sock)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def device_stats(ifname: str) -> dict[str, int]:
    """Drop counters through turbowg's UAPI extension `stats=1` (stock tools never send it)."""
    answer = raw_uapi(ifname, b"stats=1\n\n")
    stats: dict[str, int] = {}
    for line in answer.splitlines():
        key, _, value = line.partition("=")
        if key and key != "errno":
            stats[key] = int(value)
    assert "errno=0" in answer, answer
    return stats


def test_bad_input_is_dropped_counted_and_unanswered(tmp_path) -> None:
    import json

    here = os.path.dirname(__file__)
    with tunnel("turbowg", "turbowg", tmp_path=str(tmp_path)) as tun:
        a, b = tun.a, tun.b
        veth_b = b.veth
        sniffer = subprocess.Popen(["ip", "netns", "exec", b.ns, sys.executable, os.path.join(here, "sniff.py"),
                                    veth_b, str(b.port), "20"], stdout=subprocess.PIPE, text=True)
        try:
            assert sniffer.stdout is not None and sniffer.stdout.readline().strip() == "ready"
            assert ping(a, b.inner_ip)
            captured, _ = sniffer.communicate(timeout=25)
        finally:
            if sniffer.poll() is None:
                sniffer.kill()
                sniffer.wait()
        captured = captured.strip()
        assert captured, "no data packet captured"
        before = device_stats(b.ifname)
        out = a.sh(sys.executable, os.path.join(here, "junk.py"), b.underlay_ip, str(b.port), b.public, captured,
                   timeout=60).stdout
        result = json.loads(out.strip().splitlines()[-1])
        assert result["answers"] == 0, "an unauthenticated packet got an answer"
        after = device_stats(b.ifname)
        dropped = {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}
        # Every rx_* counter but these two names a reason for dropping a datagram.
        events = {"rx_keepalive", "rx_cookie_reply"}
        drops = sum(v for k, v in dropped.items() if k.startswith("rx_") and k not in events)
        assert drops >= result["sent"] - 5, dropped
        assert dropped.get("rx_replay", 0) >= 5, dropped
        # The tunnel keeps working.
        assert ping(a, b.inner_ip) and ping(b, a.inner_ip)
