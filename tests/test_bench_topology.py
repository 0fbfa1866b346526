"""Benchmark topology (namespaces + veth + one tunnel per implementation), the UDP_SEGMENT generator and
`turbowg bench tunnel` end to end, against Debian wireguard-go. Every wait is for an event with a bound."""

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

from turbowg.bench import tunnel
from turbowg.testing import udpgen
from turbowg.testing.marks import needs_iperf3, needs_netns, needs_wireguard_go
from turbowg.testing.netns import HarnessError, wait_until
from turbowg.testing.netns import namespaces as _namespaces
from turbowg.testing.tunnel import (
    UAPI_DIR,
    UNDERLAY,
    Implementation,
    binary_version,
    build_topology,
    known_implementations,
)

UDPGEN = [sys.executable, "-m", "turbowg.testing.udpgen"]


def _exe(pid: int) -> str:
    return os.path.basename(os.readlink(f"/proc/{pid}/exe"))


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
        assert [_exe(pid) for pid in path.daemon_pids] == ["wireguard-go", "wireguard-go"]  # not turbowgd
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
        rx, tx = topo.run(topo.ns_a, "wg", "show", path.ifname_a, "transfer").stdout.split()[1:]
        assert int(rx) > 0 and int(tx) > 0  # the pings went through wireguard-go's tunnel
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
    with pytest.raises(HarnessError) as info:
        with build_topology([broken], start_timeout=10, tag=tag):
            pytest.fail("must not get here")
    assert "broken exited with 3" in str(info.value) and "no TUN for you" in str(info.value)
    assert not {f"twta{tag}", f"twtb{tag}"} & _namespaces()
    with pytest.raises(HarnessError, match="bad topology tag"):
        with build_topology([], tag="../x"):
            pass


def _udpgen_once(topo, *send_args: str) -> tuple[dict, dict]:
    """One receiver and one sender over the underlay; waits for the receiver's ready file, not a sleep."""
    ready = os.path.join(topo.workdir, f"ready-{time.monotonic_ns()}")
    receiver = subprocess.Popen(topo.exec_args(topo.ns_b, *UDPGEN, "recv", "--port", "5999", "--timeout", "20",
                                               "--ready-file", ready), stdout=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: os.path.exists(ready) or receiver.poll() is not None, 15)
        assert os.path.exists(ready), "receiver did not start"
        sent = json.loads(topo.run(topo.ns_a, *UDPGEN, "send", "--host", topo.paths[UNDERLAY].server_v4,
                                   "--port", "5999", *send_args).stdout)
        got = json.loads(receiver.communicate(timeout=20)[0])
    finally:
        receiver.kill()
        receiver.wait()
    return sent, got


@needs_netns
def test_udpgen_over_underlay_counts_what_arrives() -> None:
    with build_topology([]) as topo:
        sent, got = _udpgen_once(topo, "--duration", "0.5", "--size", "1200")
        paced_sent, paced_got = _udpgen_once(topo, "--duration", "1", "--size", "1200", "--rate-mbit", "200")
    assert sent["gso"] is True and sent["segments_per_call"] == 54  # 64 would exceed one 64 KiB GSO buffer
    assert sent["datagrams"] == sent["segments_per_call"] * sent["calls"]
    assert got["gro"] is True and not got["timed_out"]
    assert 0 < got["datagrams"] <= sent["datagrams"]
    assert got["bytes"] == got["datagrams"] * 1200
    assert got["goodput_bps"] > 0
    # Paced at a modest 200 Mbit/s the veth carries (nearly) everything, and the pacing holds the rate.
    assert paced_sent["offered_bps"] == 200e6 and paced_sent["segments_per_call"] == 21  # ~1 ms per burst
    assert 0.9 * 200e6 <= paced_sent["sent_bps"] <= 1.1 * 200e6, paced_sent
    assert paced_got["datagrams"] >= 0.9 * paced_sent["datagrams"], (paced_sent, paced_got)
    assert paced_got["datagrams"] <= paced_sent["datagrams"]


def test_segments_per_call() -> None:
    assert udpgen.segments_per_call(1000) == 64
    assert udpgen.segments_per_call(1392) == 47
    assert udpgen.segments_per_call(65000) == 1


def test_process_tree_cpu_seconds_includes_children() -> None:
    parent = subprocess.Popen([sys.executable, "-c",
                               "import subprocess, sys; subprocess.run([sys.executable, '-c', "
                               "'import time\\nend = time.process_time() + 1.5\\nwhile time.process_time() < end: pass'])"])
    try:
        # The parent itself stays idle: only the busy grandchild can push the tree past 0.3 s.
        counted = wait_until(lambda: tunnel.process_tree_cpu_seconds([parent.pid]) > 0.3, 30, interval=0.1)
        parent.wait(timeout=30)
    finally:
        parent.kill()
        parent.wait()
    assert counted  # the busy grandchild was counted while alive


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


def test_cpu_bound_names_the_busiest_process_and_the_table_shows_it() -> None:
    runs = [tunnel.RunResult("wireguard-go", "udp-gso", i, True, gbps=1.0,
                             cpu_share={"daemon a": 0.97, "daemon b": 0.4, "sender": 0.3, "receiver": s})
            for i, s in enumerate((0.1, 0.2, 0.3))]
    runs += [tunnel.RunResult("underlay", "udp-gso", 0, True, gbps=9.0, cpu_share={"sender": 0.5, "receiver": 0.2})]
    rows = tunnel.summarize_runs(runs, ["wireguard-go", "underlay"], ["udp-gso"],
                                 {"wireguard-go": "wireguard-go (0.0.20220316)"})
    assert [r.cpu_bound for r in rows] == ["daemon a 97%", "none (sender 50%)"]
    table = tunnel.format_table(rows, "wireguard-go (0.0.20220316)")
    assert "x wireguard-go (0.0.20220316)" in table and "daemon a 97%" in table
    assert "wireguard-go (0.0.20220316)  1.00 [1.00, 1.00]" in table


def test_sweep_finds_the_highest_rate_under_one_percent_loss() -> None:
    capacity = 300.0  # Mbit/s this fake path carries without loss

    def measure(rate: float):
        return (0.0 if rate <= capacity else 5.0), rate * 1e6, {}

    good, bad, steps = tunnel.sweep_rates(measure)
    assert [s["rate_mbit"] for s in steps] == [50, 100, 200, 400, 300, 350]  # doubling, then bisection
    assert good["rate_mbit"] == 300 and bad["rate_mbit"] == 350
    assert len(steps) <= tunnel.SWEEP_MAX_STEPS

    def sender_limited(rate: float):  # the sender cannot offer more than 120 Mbit/s; nothing is ever lost
        return 0.0, min(rate, 120.0) * 1e6, {}

    good, bad, steps = tunnel.sweep_rates(sender_limited)
    # 200 is short of the offer but sends more than 100 did; 400 sends no more than 200: stop there.
    assert bad is None and good["sender_short"] and [s["rate_mbit"] for s in steps] == [50, 100, 200, 400]

    def always_lossy(rate: float):
        return 50.0, rate * 1e6, {}

    good, bad, steps = tunnel.sweep_rates(always_lossy)
    assert good is None and [s["rate_mbit"] for s in steps] == [50, 25, 12.5]  # bisecting down from 50
    assert bad["rate_mbit"] == 12.5


def _bench(tmp_path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "turbowg.bench.tunnel", *args, "--output-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=timeout)


def _table_row(stdout: str, test: str, label: str) -> list[str]:
    """The cells of one table row (cells are separated by two or more spaces)."""
    for line in stdout.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[:2] == [test, label]:
            return cells
    raise AssertionError(f"no row {test} / {label} in:\n{stdout}")


@needs_netns
@needs_wireguard_go
@needs_iperf3
def test_bench_tunnel_end_to_end_wireguard_go_vs_underlay(tmp_path) -> None:
    result = _bench(tmp_path, "--impl", "wireguard-go", "--impl", "underlay", "--runs", "1", "--duration", "1",
                    "--sweep-step", "0.5", "--tests", ",".join(tunnel.THROUGHPUT_TESTS), timeout=400)
    assert result.returncode == 0, result.stderr
    assert "[run 10/10]" in result.stderr
    assert not _announced_namespaces(result.stderr) & _namespaces()
    raw = json.loads((tmp_path / "tunnel-runs.json").read_text())
    assert [(r["path"], r["test"]) for r in raw["runs"]] == [
        (p, t) for t in tunnel.THROUGHPUT_TESTS for p in ("wireguard-go", "underlay")]
    assert all(r["ok"] and r["gbps"] > 0 and r["bytes_received"] > 0 for r in raw["runs"]), raw["runs"]
    # The version is the binary's own answer, and the table and JSON name it.
    version = binary_version(("wireguard-go",))
    assert re.fullmatch(r"wireguard-go \d+\.\d+\.\d+", version), version
    assert raw["meta"]["versions"]["wireguard-go"] == version
    label = raw["meta"]["labels"]["wireguard-go"]
    assert version.split()[1] in label and f"x {label}" in result.stdout
    for r in raw["runs"]:
        if r["path"] == "wireguard-go":
            assert r["cpu_seconds"] > 0 and r["cpu_seconds_per_gb"] > 0  # the daemons did the crypto
            # wireguard-go's own receive counter saw at least what the receiver got: this tunnel carried it.
            assert r["detail"]["tunnel_rx_bytes"] >= r["bytes_received"], r
            assert {"daemon a", "daemon b", "sender", "receiver"} <= set(r["cpu_share"]), r["cpu_share"]
        else:
            assert r["cpu_seconds"] is None and "tunnel_rx_bytes" not in r["detail"]
        assert (r["loss_percent"] is not None) == r["test"].startswith("udp")
        if r["test"] == "udp-gso-paced":
            best = r["detail"]["best_rate_mbit"]
            assert r["loss_percent"] < tunnel.LOSS_LIMIT and best > 0, r["detail"]
            # What arrived at the best step is about what was sent then (the sender may fall short of the offer).
            assert r["gbps"] * 1e9 >= 0.8 * r["detail"]["sender"]["sent_bps"] > 0, r["detail"]
            lossy = r["detail"]["first_lossy_rate_mbit"]
            assert lossy is None or lossy > best
    summary = {(s["path"], s["test"]): s for s in raw["summary"]}
    assert summary[("wireguard-go", "tcp1")]["ratio_to_baseline"] == pytest.approx(1.0)
    assert _table_row(result.stdout, "udp-gso-paced", label)[3] == "1.00"
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
    assert (args.peer_bin, args.sweep_step) == ([], 1.0)
    args = parser.parse_args(["bench", "tunnel", "--peer-bin", "/a/wireguard-go", "--peer-bin", "/b/wg-go"])
    assert args.peer_bin == ["/a/wireguard-go", "/b/wg-go"]
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "tunnel", "--runs", "0"])


@needs_netns
@needs_wireguard_go
@needs_iperf3
def test_minimal_issue_case_turbowg_vs_wireguard_go_tcp_ratio(tmp_path) -> None:
    """iperf3 TCP through turbowg and through wireguard-go, same topology, same run, as a ratio; the ratio
    printed must be the one of the measured runs, and each tunnel must have carried its own run."""
    result = _bench(tmp_path, "--impl", "turbowg,wireguard-go", "--tests", "tcp1", "--runs", "1", "--duration", "1",
                    timeout=180)
    assert result.returncode == 0, result.stderr
    raw = json.loads((tmp_path / "tunnel-runs.json").read_text())
    runs = {r["path"]: r for r in raw["runs"]}
    for path in ("turbowg", "wireguard-go"):
        assert runs[path]["ok"] and runs[path]["bytes_received"] > 10**6
        assert runs[path]["detail"]["tunnel_rx_bytes"] >= runs[path]["bytes_received"]
    expected = runs["turbowg"]["gbps"] / runs["wireguard-go"]["gbps"]
    assert _table_row(result.stdout, "tcp1", raw["meta"]["labels"]["turbowg"])[3] == f"{expected:.2f}"
    assert raw["meta"]["commands"]["wireguard-go"]["command"] == ["wireguard-go"]


@needs_netns
@needs_wireguard_go
@needs_iperf3
def test_peer_bin_is_measured_under_its_version(tmp_path) -> None:
    binary = shutil.which("wireguard-go")
    result = _bench(tmp_path, "--peer-bin", binary, "--impl", "underlay", "--tests", "tcp1", "--runs", "1",
                    "--duration", "1", timeout=180)
    assert result.returncode == 0, result.stderr
    raw = json.loads((tmp_path / "tunnel-runs.json").read_text())
    version = binary_version((binary,))
    assert raw["meta"]["paths"] == [version, "underlay"] and raw["meta"]["baseline"] == version
    assert raw["meta"]["commands"][version]["command"] == [os.path.abspath(binary)]
    run_ = next(r for r in raw["runs"] if r["path"] == version)
    assert run_["ok"] and run_["detail"]["tunnel_rx_bytes"] >= run_["bytes_received"] > 0
    assert _table_row(result.stdout, "tcp1", version)[3] == "1.00" and f"x {version}" in result.stdout
    bad = _bench(tmp_path, "--peer-bin", str(tmp_path / "missing"), timeout=60)
    assert bad.returncode == 2 and "not an executable file" in bad.stderr and "Traceback" not in bad.stderr


@needs_netns
@needs_wireguard_go
@needs_iperf3
def test_ctrl_c_tears_down_and_keeps_finished_runs(tmp_path) -> None:
    errlog = tmp_path / "stderr"
    with open(errlog, "w") as err_file:
        proc = subprocess.Popen([sys.executable, "-m", "turbowg.bench.tunnel", "--impl", "underlay,wireguard-go",
                                 "--tests", "tcp1", "--runs", "3", "--duration", "2", "--output-dir", str(tmp_path)],
                                stdout=subprocess.PIPE, stderr=err_file, text=True)
    try:
        # Interrupt once the first run has finished (the second has started), whenever that is.
        started = wait_until(lambda: "[run 2/6]" in errlog.read_text() or proc.poll() is not None, 120, 0.1)
        assert started and proc.poll() is None, errlog.read_text()
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    err = errlog.read_text()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert not _announced_namespaces(err) & _namespaces()
    raw = json.loads((tmp_path / "tunnel-runs.json").read_text())
    assert raw["meta"]["interrupted"] is True and 1 <= len(raw["runs"]) < 6


@needs_netns
@needs_wireguard_go
def test_ipv6_udp_gso_through_wireguard_go(tmp_path) -> None:
    result = _bench(tmp_path, "--ipv6", "--impl", "wireguard-go", "--tests", "udp-gso,udp-gso-paced", "--runs", "1",
                    "--duration", "1", "--sweep-step", "0.5", timeout=240)
    assert result.returncode == 0, result.stderr
    raw = json.loads((tmp_path / "tunnel-runs.json").read_text())
    assert raw["meta"]["ip_version"] == 6
    unpaced, paced = raw["runs"]
    assert unpaced["ok"] and unpaced["detail"]["sender"]["size"] == tunnel.UDP_PAYLOAD_V6
    assert 0 < unpaced["detail"]["receiver"]["datagrams"] <= unpaced["detail"]["sender"]["datagrams"]
    # Paced, at least the sweep's first rate gets through with (almost) nothing lost, through wireguard-go.
    assert paced["ok"] and paced["loss_percent"] < tunnel.LOSS_LIMIT, paced["detail"]
    assert paced["detail"]["sender"]["size"] == tunnel.UDP_PAYLOAD_V6
    received = paced["detail"]["receiver"]["datagrams"]
    assert received >= 0.99 * paced["detail"]["sender"]["datagrams"] > 0
    assert paced["detail"]["tunnel_rx_bytes"] >= paced["bytes_received"]


def test_exited_daemon_is_not_alive_even_as_zombie() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    assert wait_until(lambda: not tunnel._alive(child.pid), 20)  # exited but not yet reaped: a zombie
    assert os.path.exists(f"/proc/{child.pid}")
    child.wait()
    assert tunnel._alive(os.getpid())


@needs_netns
@needs_wireguard_go
@needs_iperf3
def test_dead_daemon_fails_its_runs_only() -> None:
    with build_topology([known_implementations()["wireguard-go"]]) as topo:
        victim = topo.paths["wireguard-go"].daemon_pids[1]
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: not tunnel._alive(victim), 10)
        failed = tunnel.run_one(topo, "wireguard-go", "tcp1", 0, 1.0)
        fine = tunnel.run_one(topo, UNDERLAY, "tcp1", 0, 1.0)
    assert not failed.ok and f"[{victim}] exited" in failed.error
    assert fine.ok and fine.gbps > 0 and fine.cpu_seconds is None


# ---------------------------------------------------------------- round-trip times


def test_percentile_and_ping_parsing() -> None:
    values = [float(v) for v in range(1, 1001)]
    assert tunnel.percentile(values, 50) == 500 and tunnel.percentile(values, 99) == 990
    assert tunnel.percentile(values, 99.9) == 999 and tunnel.percentile([3.0], 99.9) == 3.0
    text = ("PING 10.201.0.2 (10.201.0.2) 56(84) bytes of data.\n"
            "64 bytes from 10.201.0.2: icmp_seq=1 ttl=64 time=0.412 ms\n"
            "64 bytes from 10.201.0.2: icmp_seq=2 ttl=64 time=1.05 ms\n"
            "64 bytes from 10.201.0.2: icmp_seq=2 ttl=64 time=9.00 ms (DUP!)\n"
            "64 bytes from 10.201.0.2: icmp_seq=4 ttl=64 time=12.3 ms\n")
    assert tunnel.parse_ping(text) == {1: 0.412, 2: 1.05, 4: 12.3}


def _rtt_run(path: str, test: str, rep: int, p50: float, load: float = 0.0) -> tunnel.RunResult:
    detail = {"rtt_ms": {"p50": p50, "p99": 3 * p50, "p99.9": 5 * p50, "min": p50 / 2, "max": 9 * p50},
              "udp_recvq_bytes": {"daemon a": {"median": 2048, "max": 8192, "samples": 10},
                                  "daemon b": {"median": 0, "max": 1024, "samples": 10}}}
    return tunnel.RunResult(path, test, rep, True, gbps=load, loss_percent=0.0, detail=detail,
                            cpu_share={"daemon a": 0.1, "daemon b": 0.2})


def test_rtt_summary_and_table() -> None:
    runs = [_rtt_run("turbowg", "rtt-tcp", i, p, 2.0) for i, p in enumerate((0.4, 0.5, 0.6))]
    runs += [_rtt_run("wireguard-go", "rtt-tcp", i, p, 0.5) for i, p in enumerate((0.3, 0.35, 0.5))]
    runs.append(tunnel.RunResult("turbowg", "rtt-tcp", 3, False, error="ping: 0 of 200 replies"))
    runs.append(tunnel.RunResult("turbowg", "tcp1", 0, True, gbps=2.0))  # not an RTT test: not in the RTT rows
    rows = tunnel.summarize_rtt(runs, ["turbowg", "wireguard-go"], ["tcp1", "rtt-tcp"], {"turbowg": "turbowg (0.1.0)"})
    assert [(r.path, r.test) for r in rows] == [("turbowg", "rtt-tcp"), ("wireguard-go", "rtt-tcp")]
    turbo = rows[0]
    assert turbo.rtt_ms["p50"] == [0.5, 0.4, 0.6] and turbo.rtt_ms["p99.9"] == pytest.approx([2.5, 2.0, 3.0])
    assert (turbo.n_ok, turbo.n_failed, turbo.load_gbps) == (3, 1, 2.0)
    assert turbo.udp_recvq_bytes == {"daemon a": 2048, "daemon b": 0}
    assert turbo.udp_recvq_max == {"daemon a": 8192, "daemon b": 1024}
    table = tunnel.format_rtt_table(rows)
    assert "0.500 [0.400, 0.600]" in table and "1.500 [1.200, 1.800]" in table and "3 (1 failed)" in table
    assert "turbowg (0.1.0)" in table and "2/0 (8/1)" in table and "10%/20%" in table
    assert "probability 75%, not 95%" in table
    cells = _table_row(table, "rtt-tcp", "wireguard-go")
    assert cells[2:5] == ["0.350 [0.300, 0.500]", "1.050 [0.900, 1.500]", "1.750 [1.500, 2.500]"]


@needs_netns
@needs_wireguard_go
@needs_iperf3
def test_bench_rtt_through_turbowg_wireguard_go_and_underlay(tmp_path) -> None:
    """Tiny RTT runs on every path: the pings' answers came back through each tunnel (its receiving daemon's
    own counter moved by at least the echo requests), wireguard-go ran, the load ran, the table and chart."""
    result = _bench(tmp_path, "--impl", "turbowg,wireguard-go,underlay", "--tests",
                    "rtt-idle,rtt-tcp,rtt-paced400,rtt-paced100", "--runs", "1", "--duration", "1", timeout=300)
    assert result.returncode == 0, result.stderr + result.stdout
    assert not _announced_namespaces(result.stderr) & _namespaces()
    raw = json.loads((tmp_path / "tunnel-runs.json").read_text())
    assert raw["meta"]["commands"]["wireguard-go"]["command"] == ["wireguard-go"]
    runs = {(r["path"], r["test"]): r for r in raw["runs"]}
    assert len(runs) == 12
    for (path, test), r in runs.items():
        assert r["ok"], r
        detail = r["detail"]
        assert detail["replies"] >= 0.5 * detail["pings"] >= 0.5 * int(1 / tunnel.RTT_INTERVAL), detail
        rtt = detail["rtt_ms"]
        assert 0 < rtt["min"] <= rtt["p50"] <= rtt["p99"] <= rtt["p99.9"] <= rtt["max"] < 1000, rtt
        if path == "underlay":
            assert "tunnel_rx_bytes" not in detail and "udp_recvq_bytes" not in detail
        else:
            # 84-byte echo requests (IPv4 + ICMP + 56 bytes), each counted by the receiving daemon.
            assert detail["tunnel_rx_bytes"] >= detail["replies"] * 84 + r["bytes_received"], (path, test, detail)
            assert r["cpu_seconds"] > 0
        if test == "rtt-idle":
            assert r["gbps"] == 0 and detail["load"] == {}
        else:
            assert r["gbps"] > 0.01 and r["bytes_received"] > 10**5, r  # the iperf3 load ran alongside
            if path != "underlay":
                assert set(detail["udp_recvq_bytes"]) == {"daemon a", "daemon b"}
                assert all(q["samples"] > 0 for q in detail["udp_recvq_bytes"].values())
        if test in tunnel.PACED_MBIT:
            assert r["gbps"] < 1.5 * tunnel.PACED_MBIT[test] / 1000  # paced, not flat out
    labels = raw["meta"]["labels"]
    for path in ("turbowg", "wireguard-go", "underlay"):
        for test in ("rtt-idle", "rtt-tcp", "rtt-paced400", "rtt-paced100"):
            cells = _table_row(result.stdout, test, labels.get(path, path))
            assert cells[2].startswith(f"{runs[(path, test)]['detail']['rtt_ms']['p50']:.3f} ")
    assert {(s["path"], s["test"]) for s in raw["rtt_summary"]} == set(runs)
    assert raw["summary"] == []  # no throughput test was asked for
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "no chart" in result.stdout
    else:
        assert (tmp_path / "tunnel-rtt.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert not (tmp_path / "tunnel.png").exists()


@needs_netns
@needs_iperf3
@pytest.mark.skipif(shutil.which("nft") is None, reason="needs nftables")
def test_bench_tunnel_path_derp_smoke(tmp_path) -> None:
    """--path derp: turbowg through the local relay (batch and per-message receive) beside the direct tunnel,
    one tiny TCP run each; the relay carried the DERP runs (status said so before and after), not UDP."""
    result = _bench(tmp_path, "--path", "derp", "--tests", "tcp1", "--runs", "1", "--duration", "1", timeout=240)
    assert result.returncode == 0, result.stderr + result.stdout
    assert not _announced_namespaces(result.stderr) & _namespaces()
    raw = json.loads((tmp_path / "tunnel-runs.json").read_text())
    runs = {r["path"]: r for r in raw["runs"]}
    assert set(runs) == {"turbowg", *tunnel.DERP_PATHS}
    assert raw["meta"]["baseline"] == "turbowg" and raw["meta"]["derp"]["relay"].endswith(":3340")
    assert raw["meta"]["commands"]["turbowg-derp-perframe"]["env"] == {"TURBOWG_DERP_BATCH": "0"}
    for path in tunnel.DERP_PATHS:
        run = runs[path]
        assert run["ok"] and run["bytes_received"] > 10**5, run
        assert run["detail"]["derp"]["derp_rx_bytes"] >= run["bytes_received"], run["detail"]
        assert run["detail"]["tunnel_rx_bytes"] >= run["bytes_received"]
        assert _table_row(result.stdout, "tcp1", raw["meta"]["labels"][path])[-1] == "1"
    assert "derp" not in runs["turbowg"]["detail"]


def test_path_derp_defaults_and_choices() -> None:
    parser = argparse.ArgumentParser()
    tunnel.add_arguments(parser)
    args = parser.parse_args(["--path", "derp"])
    assert args.path == "derp"
    assert tunnel.choose_baseline(list(tunnel.DERP_DEFAULT_PATHS), []) == "turbowg"
    assert tunnel.choose_baseline(["turbowg", "wireguard-go", "turbowg-derp"], []) == "wireguard-go"
    assert tunnel.choose_baseline(["turbowg", "underlay"], []) is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--path", "relay"])
