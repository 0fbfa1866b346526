"""Benchmark topology (namespaces + veth + one tunnel per implementation), the UDP_SEGMENT generator and
`turbowg bench tunnel` end to end, against Debian wireguard-go."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest
from netns import needs_netns, run

from turbowg.bench import tunnel, udpgen
from turbowg.bench.topology import (
    UAPI_DIR,
    UNDERLAY,
    Implementation,
    TopologyError,
    build_topology,
    known_implementations,
)

needs_wireguard_go = pytest.mark.skipif(shutil.which("wireguard-go") is None or shutil.which("wg") is None,
                                        reason="needs wireguard-go and wireguard-tools")


def _namespaces() -> set[str]:
    return {line.split()[0] for line in run("ip", "netns", "list").stdout.splitlines() if line.strip()}


def _announced_namespaces(stderr: str) -> set[str]:
    """The namespaces a bench run says it built (others may build their own at the same time)."""
    match = re.search(r"namespaces (\S+) \(client\) and (\S+) \(server\) ready", stderr)
    assert match, stderr
    return {match.group(1), match.group(2)}


def _gone(topo_namespaces: tuple[str, str], sockets: list[str], pids: list[int]) -> None:
    assert not set(topo_namespaces) & _namespaces()
    for sock in sockets:
        assert not os.path.exists(sock), sock
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), f"daemon {pid} still running"


@needs_netns
@needs_wireguard_go
def test_wireguard_go_tunnel_pings_and_is_torn_down() -> None:
    wg_go = known_implementations()["wireguard-go"]
    with build_topology([wg_go]) as topo:
        namespaces = (topo.ns_a, topo.ns_b)
        path = topo.paths["wireguard-go"]
        sockets = [os.path.join(UAPI_DIR, f"{name}.sock") for name in (path.ifname_a, path.ifname_b)]
        assert all(os.path.exists(s) for s in sockets)
        assert len(path.daemon_pids) == 2
        for address in (path.server_v4, path.server_v6):
            assert topo.run(topo.ns_a, "ping", "-c", "2", "-i", "0.2", "-W", "2", address, check=False).returncode == 0
        # Both directions, and the bare veth too.
        assert topo.run(topo.ns_b, "ping", "-c", "1", "-W", "2", path.client_v4, check=False).returncode == 0
        underlay = topo.paths[UNDERLAY]
        assert topo.run(topo.ns_a, "ping", "-c", "1", "-W", "2", underlay.server_v4, check=False).returncode == 0
        link = topo.run(topo.ns_a, "ip", "-o", "link", "show", path.ifname_a).stdout
        assert "mtu 1420" in link
        show = topo.run(topo.ns_a, "wg", "show", path.ifname_a, "latest-handshakes").stdout.split()
        assert len(show) == 2 and int(show[1]) > 0
    _gone(namespaces, sockets, path.daemon_pids)


@needs_netns
@needs_wireguard_go
def test_teardown_when_body_raises() -> None:
    wg_go = known_implementations()["wireguard-go"]
    seen: dict[str, object] = {}
    with pytest.raises(RuntimeError, match="body failed"):
        with build_topology([wg_go]) as topo:
            path = topo.paths["wireguard-go"]
            seen["ns"] = (topo.ns_a, topo.ns_b)
            seen["sockets"] = [os.path.join(UAPI_DIR, f"{n}.sock") for n in (path.ifname_a, path.ifname_b)]
            seen["pids"] = list(path.daemon_pids)
            # Something left running inside a namespace must not keep it alive.
            subprocess.Popen(topo.exec_args(topo.ns_b, "sleep", "300"))
            raise RuntimeError("body failed")
    _gone(seen["ns"], seen["sockets"], seen["pids"])  # type: ignore[arg-type]


@needs_netns
def test_implementation_that_fails_to_start_gives_clear_error_and_cleans_up() -> None:
    tag = uuid.uuid4().hex[:6]
    broken = Implementation("broken", (sys.executable, "-c", "import sys; print('no TUN for you'); sys.exit(3)"))
    with pytest.raises(TopologyError) as info:
        with build_topology([broken], start_timeout=10, tag=tag):
            pytest.fail("must not get here")
    assert "broken exited with 3" in str(info.value) and "no TUN for you" in str(info.value)
    assert not {f"twbench-a-{tag}", f"twbench-b-{tag}"} & _namespaces()
    with pytest.raises(TopologyError, match="bad topology tag"):
        with build_topology([], tag="../x"):
            pass


@needs_netns
def test_udpgen_over_underlay_counts_what_arrives() -> None:
    with build_topology([]) as topo:
        ready = os.path.join(topo.workdir, "ready")
        module = [sys.executable, "-m", "turbowg.bench.udpgen"]
        receiver = subprocess.Popen(topo.exec_args(topo.ns_b, *module, "recv", "--port", "5999", "--timeout", "20",
                                                   "--ready-file", ready), stdout=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 10
            while not os.path.exists(ready) and time.monotonic() < deadline:
                time.sleep(0.02)
            sent = json.loads(topo.run(topo.ns_a, *module, "send", "--host", topo.paths[UNDERLAY].server_v4,
                                       "--port", "5999", "--duration", "0.5", "--size", "1200").stdout)
            got = json.loads(receiver.communicate(timeout=20)[0])
        finally:
            receiver.kill()
            receiver.wait()
    assert sent["gso"] is True and sent["segments_per_call"] == 54  # 64 would exceed one 64 KiB GSO buffer
    assert sent["datagrams"] == sent["segments_per_call"] * sent["calls"]
    assert got["gro"] is True and not got["timed_out"]
    assert 0 < got["datagrams"] <= sent["datagrams"]
    assert got["bytes"] == got["datagrams"] * 1200
    assert got["goodput_bps"] > 0


def test_segments_per_call() -> None:
    assert udpgen.segments_per_call(1000) == 64
    assert udpgen.segments_per_call(1392) == 47
    assert udpgen.segments_per_call(65000) == 1


def test_process_tree_cpu_seconds_includes_children() -> None:
    parent = subprocess.Popen([sys.executable, "-c",
                               "import subprocess, sys; subprocess.run([sys.executable, '-c', "
                               "'import time\\nend = time.process_time() + 0.6\\nwhile time.process_time() < end: pass'])"])
    try:
        time.sleep(0.3)
        start = tunnel.process_tree_cpu_seconds([parent.pid])
        parent.wait(timeout=30)
    finally:
        parent.kill()
    assert start > 0.05  # the busy grandchild was counted while alive


def test_summary_ratio_and_table() -> None:
    runs = [tunnel.RunResult("wireguard-go", "tcp1", i, True, gbps=g, bytes_received=10**9, cpu_seconds_per_gb=2.0)
            for i, g in enumerate((1.0, 1.1, 0.9))]
    runs += [tunnel.RunResult("turbowg", "tcp1", i, True, gbps=g, bytes_received=10**9, cpu_seconds_per_gb=1.0)
             for i, g in enumerate((2.0, 2.2, 1.8))]
    runs.append(tunnel.RunResult("turbowg", "tcp1", 3, False, error="iperf3: boom"))
    rows = tunnel.summarize_runs(runs, ["turbowg", "wireguard-go"], ["tcp1"])
    by_path = {r.path: r for r in rows}
    assert by_path["turbowg"].ratio_to_baseline == pytest.approx(2.0)
    assert by_path["wireguard-go"].ratio_to_baseline == pytest.approx(1.0)
    assert (by_path["turbowg"].lo_gbps, by_path["turbowg"].hi_gbps) == (1.8, 2.2)
    assert by_path["turbowg"].n_failed == 1
    table = tunnel.format_table(rows)
    assert "2.00 [1.80, 2.20]" in table and "3 (1 failed)" in table
    assert "probability 75%, not 95%" in table  # 3 runs: [min, max] covers 1 - 2/8
    many = [tunnel.RunResult("wireguard-go", "tcp1", i, True, gbps=1.0 + i / 10) for i in range(6)]
    assert "note:" not in tunnel.format_table(tunnel.summarize_runs(many, ["wireguard-go"], ["tcp1"]))


def test_bad_choices_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown test 'tcp9'"):
        tunnel._split_choices(["tcp1,tcp9"], tunnel.TESTS, "test")
    assert tunnel._split_choices(["tcp1,udp", "tcp1"], tunnel.TESTS, "test") == ["tcp1", "udp"]
    result = subprocess.run([sys.executable, "-m", "turbowg.bench.tunnel", "--impl", "kernel"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "unknown implementation 'kernel'" in result.stderr
    assert "Traceback" not in result.stderr


@needs_netns
@needs_wireguard_go
@pytest.mark.skipif(shutil.which("iperf3") is None, reason="needs iperf3")
def test_bench_tunnel_end_to_end_wireguard_go_vs_underlay(tmp_path) -> None:
    result = subprocess.run([sys.executable, "-m", "turbowg.bench.tunnel", "--impl", "wireguard-go",
                             "--impl", "underlay", "--runs", "1", "--duration", "1", "--output-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert "[run 8/8]" in result.stderr
    assert not _announced_namespaces(result.stderr) & _namespaces()
    raw = json.loads((tmp_path / "tunnel-runs.json").read_text())
    assert [(r["path"], r["test"]) for r in raw["runs"]] == [
        (p, t) for t in tunnel.TESTS for p in ("wireguard-go", "underlay")]
    assert all(r["ok"] and r["gbps"] > 0 and r["bytes_received"] > 0 for r in raw["runs"]), raw["runs"]
    for r in raw["runs"]:
        if r["path"] == "wireguard-go":
            assert r["cpu_seconds"] > 0 and r["cpu_seconds_per_gb"] > 0  # the daemons did the crypto
        else:
            assert r["cpu_seconds"] is None
        assert (r["loss_percent"] is not None) == r["test"].startswith("udp")
    summary = {(s["path"], s["test"]): s for s in raw["summary"]}
    assert summary[("wireguard-go", "tcp1")]["ratio_to_baseline"] == pytest.approx(1.0)
    assert "x wireguard-go" in result.stdout
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no chart" in result.stdout
    else:
        assert (tmp_path / "tunnel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rotation_is_round_robin_with_shifting_start() -> None:
    paths = ["turbowg", "turbowg-nooffload", "wireguard-go", "underlay"]
    orders = [tunnel._rotated(paths, rep) for rep in range(5)]
    assert all(sorted(order) == sorted(paths) for order in orders)
    assert [order[0] for order in orders] == ["turbowg", "turbowg-nooffload", "wireguard-go", "underlay", "turbowg"]


def test_registers_under_a_bench_parser() -> None:
    parser = argparse.ArgumentParser(prog="turbowg")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench").add_subparsers(dest="bench_command", required=True)
    tunnel.add_tunnel_bench(bench)
    args = parser.parse_args(["bench", "tunnel", "--tests", "tcp1", "--runs", "3", "--impl", "wireguard-go"])
    assert (args.func, args.runs, args.duration, args.tests, args.impl, args.output_dir) == (
        tunnel.command, 3, 5.0, ["tcp1"], ["wireguard-go"], "bench-results")
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "tunnel", "--runs", "0"])


@needs_netns
@needs_wireguard_go
@pytest.mark.skipif(shutil.which("iperf3") is None, reason="needs iperf3")
def test_minimal_issue_case_turbowg_vs_wireguard_go_tcp_ratio(tmp_path) -> None:
    """iperf3 TCP through turbowg and through wireguard-go, same topology, same run, as a ratio."""
    result = subprocess.run([sys.executable, "-m", "turbowg.bench.tunnel", "--impl", "turbowg,wireguard-go",
                             "--tests", "tcp1", "--runs", "1", "--duration", "1", "--output-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    summary = {s["path"]: s for s in json.loads((tmp_path / "tunnel-runs.json").read_text())["summary"]}
    assert summary["turbowg"]["n_ok"] == 1 and summary["turbowg"]["median_gbps"] > 0
    ratio = summary["turbowg"]["median_gbps"] / summary["wireguard-go"]["median_gbps"]
    assert summary["turbowg"]["ratio_to_baseline"] == pytest.approx(ratio)


@needs_netns
@needs_wireguard_go
@pytest.mark.skipif(shutil.which("iperf3") is None, reason="needs iperf3")
def test_ctrl_c_tears_down_and_keeps_finished_runs(tmp_path) -> None:
    errlog = tmp_path / "stderr"
    with open(errlog, "w") as err_file:
        proc = subprocess.Popen([sys.executable, "-m", "turbowg.bench.tunnel", "--impl", "underlay,wireguard-go",
                                 "--tests", "tcp1", "--runs", "3", "--duration", "2", "--output-dir", str(tmp_path)],
                                stdout=subprocess.PIPE, stderr=err_file, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "(server) ready" not in errlog.read_text():
            time.sleep(0.1)
        time.sleep(3.0)  # past the first 2 s run, into the second
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    err = errlog.read_text()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert not _announced_namespaces(err) & _namespaces()
    report = tmp_path / "tunnel-runs.json"
    if report.exists():  # present whenever at least one run had finished
        raw = json.loads(report.read_text())
        assert raw["meta"]["interrupted"] is True and 1 <= len(raw["runs"]) < 6


@needs_netns
@needs_wireguard_go
def test_ipv6_udp_gso_through_wireguard_go(tmp_path) -> None:
    result = subprocess.run([sys.executable, "-m", "turbowg.bench.tunnel", "--ipv6", "--impl", "wireguard-go",
                             "--tests", "udp-gso", "--runs", "1", "--duration", "1", "--output-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    raw = json.loads((tmp_path / "tunnel-runs.json").read_text())
    assert raw["meta"]["ip_version"] == 6
    (run_,) = raw["runs"]
    assert run_["ok"] and run_["detail"]["sender"]["size"] == tunnel.UDP_PAYLOAD_V6
    assert 0 < run_["detail"]["receiver"]["datagrams"] <= run_["detail"]["sender"]["datagrams"]


def test_exited_daemon_is_not_alive_even_as_zombie() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 20
    while tunnel._alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not tunnel._alive(child.pid)  # exited but not yet reaped: a zombie
    assert os.path.exists(f"/proc/{child.pid}")
    child.wait()
    assert tunnel._alive(os.getpid())


@needs_netns
@needs_wireguard_go
@pytest.mark.skipif(shutil.which("iperf3") is None, reason="needs iperf3")
def test_dead_daemon_fails_its_runs_only() -> None:
    with build_topology([known_implementations()["wireguard-go"]]) as topo:
        victim = topo.paths["wireguard-go"].daemon_pids[1]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while tunnel._alive(victim) and time.monotonic() < deadline:
            time.sleep(0.05)
        failed = tunnel.run_one(topo, "wireguard-go", "tcp1", 0, 1.0)
        fine = tunnel.run_one(topo, UNDERLAY, "tcp1", 0, 1.0)
    assert not failed.ok and f"[{victim}] exited" in failed.error
    assert fine.ok and fine.gbps > 0 and fine.cpu_seconds is None
