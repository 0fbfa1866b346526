"""Latency work on the daemon (issue 13): the TURBOWG_TRACE_LATENCY stage trace, the lone-packet read, the answer
taken from the TUN in the same wake, and the TURBOWG_BUSY_POLL_US switch, each checked on a real turbowgd tunnel
between two namespaces (traffic through the tunnel, the daemons' own counters), plus the pieces on their own."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from turbowg.daemon import runtime as runtime_mod
from turbowg.daemon import trace as trace_mod
from turbowg.testing.marks import needs_netns
from turbowg.testing.netns import wait_until
from turbowg.testing.tunnel import ping, transfer, tunnel, wg_dump


def test_switches_are_read_from_the_environment(monkeypatch) -> None:
    monkeypatch.delenv("TURBOWG_TRACE_LATENCY", raising=False)
    monkeypatch.delenv("TURBOWG_BUSY_POLL_US", raising=False)
    default = runtime_mod.BUSY_POLL_DEFAULT_US
    assert not trace_mod.enabled_from_env() and runtime_mod.busy_poll_from_env() == default
    rt = runtime_mod.Runtime("twtest0", socket_dir="/nonexistent")
    assert rt.trace is None and rt.busy_poll == default
    # Off: the readers the loop gets are the plain bound methods (nothing wrapped, no per-packet check).
    assert rt._tun_reader == rt._on_tun_readable and rt._udp_reader == rt._on_udp_readable
    for value in ("1", "yes", "on"):
        monkeypatch.setenv("TURBOWG_TRACE_LATENCY", value)
        assert trace_mod.enabled_from_env()
    for value in ("0", "", "off"):
        monkeypatch.setenv("TURBOWG_TRACE_LATENCY", value)
        assert not trace_mod.enabled_from_env()
    monkeypatch.setenv("TURBOWG_TRACE_LATENCY", "1")
    assert isinstance(runtime_mod.Runtime("twtest0", socket_dir="/nonexistent").trace, trace_mod.LatencyTrace)
    monkeypatch.setenv("TURBOWG_BUSY_POLL_US", "250")
    assert runtime_mod.busy_poll_from_env() == 250
    monkeypatch.setenv("TURBOWG_BUSY_POLL_US", "99999999")
    assert runtime_mod.busy_poll_from_env() == runtime_mod.BUSY_POLL_MAX_US
    monkeypatch.setenv("TURBOWG_BUSY_POLL_US", "0")
    assert runtime_mod.busy_poll_from_env() == 0  # off
    monkeypatch.setenv("TURBOWG_BUSY_POLL_US", "-5")
    assert runtime_mod.busy_poll_from_env() == 0
    monkeypatch.setenv("TURBOWG_BUSY_POLL_US", "fast")
    assert runtime_mod.busy_poll_from_env() == default


def test_trace_summary_of_recorded_stages() -> None:
    trace = trace_mod.LatencyTrace()
    for value in range(1, 101):
        trace.samples["tun.device"].append(value * 1000)  # ns
    trace.samples["udp.packets"].extend([1] * 9 + [40])
    summary = trace.summary()
    assert summary["tun.device"]["count"] == 100
    assert summary["tun.device"]["p50"] == pytest.approx(51.0) and summary["tun.device"]["max"] == pytest.approx(100.0)
    assert summary["udp.packets"]["p50"] == 1 and summary["udp.packets"]["max"] == 40  # counts are not scaled
    assert "tun.read1" not in summary  # nothing recorded, nothing reported
    text = trace.format()
    assert "tun.device" in text and "single-packet wakes" in text


def _daemon_log(side) -> str:
    return side.daemon.log() if side.daemon else ""


@needs_netns
@pytest.mark.parametrize("lone", ["1", "0"])
def test_trace_times_every_stage_of_pings_through_the_tunnel(tmp_path, lone) -> None:
    files = {side: str(tmp_path / f"trace-{side}.json") for side in "ab"}
    env = {"TURBOWG_TRACE_LATENCY": "1", "TURBOWG_LONE_PATH": lone}
    with tunnel("turbowg", "turbowg", env_a={**env, "TURBOWG_TRACE_LATENCY_FILE": files["a"]},
                env_b={**env, "TURBOWG_TRACE_LATENCY_FILE": files["b"]}) as tun:
        assert ping(tun.a, tun.server_v4, count=3)
        rx_before = transfer(tun.b)[0]
        count = 30
        result = tun.a.sh("ping", "-n", "-c", str(count), "-i", "0.01", "-W", "1", tun.server_v4, check=False)
        assert result.returncode == 0, result.stdout
        assert transfer(tun.b)[0] - rx_before >= count * 84  # the echo requests came through b's daemon
        for side in (tun.a, tun.b):
            os.kill(side.daemon.pid, signal.SIGUSR1)
        assert wait_until(lambda: all(os.path.exists(f) for f in files.values()), 10)
        summaries = {side: json.load(open(path)) for side, path in files.items()}
        # SIGUSR1 also writes the table to the daemon's log.
        assert wait_until(lambda: "latency trace" in _daemon_log(tun.a), 10)
    # The lone path (default) does device + send / device + TUN write in one call each: one stage for both.
    if lone == "1":
        tun_stages = ("tun.read1", "tun.lone", "tun.exit", "tun.total")
        udp_stages = ("udp.read", "udp.lone", "udp.total")
        tun_work, udp_work = "tun.lone", "udp.lone"
    else:
        tun_stages = tuple(s for s in trace_mod.TUN_STAGES if s != "tun.lone")
        udp_stages = ("udp.read", "udp.device", "udp.write", "udp.total")
        tun_work, udp_work = "tun.device", "udp.device"
    for side, summary in summaries.items():
        # Each side sealed (TUN -> UDP) and opened (UDP -> TUN) about one packet per ping, one per wake.
        for stage in (*tun_stages, *udp_stages):
            assert summary[stage]["count"] >= count // 2, (side, stage, summary)
            assert 0 <= summary[stage]["p50"] < 1e6, (side, stage)
        assert summary["tun.total"]["p50"] >= summary[tun_work]["p50"] > 0
        assert summary["udp.total"]["p50"] >= summary[udp_work]["p50"] > 0
        assert summary["tun.packets"]["p50"] == 1 and summary["udp.packets"]["p50"] == 1
        if lone == "0":  # A lone packet costs one read: the read that only says EAGAIN is skipped.
            assert summary["tun.read_more"]["p50"] == 0
        else:  # ... and the lone path never takes the batch path's stages for a ping
            assert summary.get("tun.device", {}).get("count", 0) <= 3, summary
            assert summary.get("udp.device", {}).get("count", 0) <= 3, summary
    # The kernel's receive stamp of the datagram (SIOCGSTAMPNS): the loop's wakeup latency, on at least one side.
    assert any(s.get("udp.kernel", {}).get("count", 0) > 0 for s in summaries.values())


@needs_netns
def test_untraced_daemon_writes_no_trace(tmp_path) -> None:
    path = str(tmp_path / "trace.json")
    with tunnel("turbowg", "turbowg", env_a={"TURBOWG_TRACE_LATENCY_FILE": path}) as tun:
        assert ping(tun.a, tun.server_v4, count=3)
        os.kill(tun.a.daemon.pid, signal.SIGUSR1)  # not handled when tracing is off: the default action ends it
        assert wait_until(lambda: not tun.a.daemon.alive(), 10)
    assert not os.path.exists(path)


@needs_netns
def test_a_burst_after_idle_all_arrives(tmp_path) -> None:
    """The lone-packet read stops after one packet; a burst behind it must still be drained at once."""
    with tunnel("turbowg", "turbowg") as tun:
        assert ping(tun.a, tun.server_v4, count=2)
        for _ in range(3):
            time.sleep(0.05)  # idle: the next wake counts as lone
            flood = tun.a.sh("ping", "-n", "-f", "-c", "300", "-s", "200", "-W", "1", tun.server_v4, check=False)
            assert flood.returncode == 0 and " 0% packet loss" in flood.stdout, flood.stdout
        rx_b = int(wg_dump(tun.b)[1][5])
        assert rx_b >= 900 * 228  # all requests went through b's daemon


@needs_netns
@pytest.mark.parametrize("spin_us", ["5000"])
def test_busy_poll_carries_traffic_and_survives_a_port_change(spin_us) -> None:
    """A's daemon sends each echo request from an idle wake and spins for the reply (a hit: the reply was
    taken by the spin, not by a wake); b's daemon takes each echo reply from its TUN in the wake of the
    request and never spins (an answer, not a request). After a listen-port change the spin polls the new
    socket."""
    from test_integration import device_stats

    env = {"TURBOWG_BUSY_POLL_US": spin_us}
    count = 30
    keys = ("lone_busy_poll_hits", "lone_busy_poll_misses", "lone_answers_taken")
    with tunnel("turbowg", "turbowg", env_a=env, env_b=env) as tun:
        assert ping(tun.a, tun.server_v4, count=3)
        before = {side: device_stats(getattr(tun, side).ifname) for side in "ab"}
        rx_before = transfer(tun.a)[0]
        # 20 ms apart: every request leaves from an idle wake (> LONE_GAP after the previous one).
        result = tun.a.sh("ping", "-n", "-c", str(count), "-i", "0.02", "-W", "1", tun.server_v4, check=False)
        assert result.returncode == 0 and " 0% packet loss" in result.stdout, result.stdout
        assert transfer(tun.a)[0] - rx_before >= count * 84  # the replies came back through a's daemon
        after = {side: device_stats(getattr(tun, side).ifname) for side in "ab"}
        delta = {side: {k: after[side].get(k, 0) - before[side].get(k, 0) for k in keys} for side in "ab"}
        # The spin was tried once per request (a reply later than 5 ms is a miss, rare: a loaded machine).
        assert count - 3 <= delta["a"]["lone_busy_poll_hits"] + delta["a"]["lone_busy_poll_misses"] <= count + 3
        assert delta["a"]["lone_busy_poll_hits"] >= count // 2, delta
        assert delta["b"]["lone_busy_poll_hits"] + delta["b"]["lone_busy_poll_misses"] <= 3, delta
        assert delta["b"]["lone_answers_taken"] >= count // 2, delta
        # A new listen port: the spin polls the new socket.
        tun.b.wg("set", tun.b.ifname, "listen-port", str(tun.b.port + 100))
        tun.a.wg("set", tun.a.ifname, "peer", tun.b.public, "endpoint", f"{tun.b.underlay_ip}:{tun.b.port + 100}")
        tun.a.wg("set", tun.a.ifname, "listen-port", str(tun.a.port + 100))
        tun.b.wg("set", tun.b.ifname, "peer", tun.a.public, "endpoint", f"{tun.a.underlay_ip}:{tun.a.port + 100}")
        assert ping(tun.a, tun.server_v4, count=3)
        hits = device_stats(tun.a.ifname)["lone_busy_poll_hits"]
        result = tun.a.sh("ping", "-n", "-c", "10", "-i", "0.02", "-W", "1", tun.server_v4, check=False)
        assert result.returncode == 0 and " 0% packet loss" in result.stdout, result.stdout
        assert device_stats(tun.a.ifname)["lone_busy_poll_hits"] - hits >= 5
        assert tun.a.daemon.alive() and tun.b.daemon.alive()


@needs_netns
@pytest.mark.parametrize("lone", ["1", "0"])
def test_lone_path_keeps_the_io_counters(lone) -> None:
    """Pings through the one-call lone path move the daemons' UDP and TUN counters (stats=1) as the batch
    path does: one datagram sent and received, one packet read and written, per echo on each side."""
    from test_integration import device_stats

    env = {"TURBOWG_LONE_PATH": lone}
    keys = ("udp_send_datagrams", "udp_send_calls", "udp_recv_datagrams", "udp_recv_calls", "tunio_read_packets",
            "tunio_write_packets", "tunio_write_frames")
    with tunnel("turbowg", "turbowg", env_a=env, env_b=env) as tun:
        assert ping(tun.a, tun.server_v4, count=3)
        before = {side: device_stats(getattr(tun, side).ifname) for side in "ab"}
        count = 20
        result = tun.a.sh("ping", "-n", "-c", str(count), "-i", "0.01", "-W", "1", tun.server_v4, check=False)
        assert result.returncode == 0, result.stdout
        after = {side: device_stats(getattr(tun, side).ifname) for side in "ab"}
    for side in "ab":
        delta = {k: after[side].get(k, 0) - before[side].get(k, 0) for k in keys}
        # Each side sent and received one datagram per echo, read one packet from its TUN and wrote one
        # (a few more for the odd IPv6 housekeeping packet the interfaces send on their own).
        for key in keys:
            assert count <= delta[key] <= count + 4, (side, key, delta)
    if lone == "1":
        # b took each echo reply from its TUN in the wake of the request; a, whose writes (the replies)
        # never have a local answer, stopped looking after a few (ANSWER_MISS_STREAK) but for the probes.
        # (Bounds with room: on a loaded machine the kernel may defer the reply to ksoftirqd now and then.)
        assert after["b"]["lone_answers_taken"] - before["b"].get("lone_answers_taken", 0) >= count // 2
        assert after["b"]["lone_answer_looks_skipped"] <= count // 4
        skipped = after["a"]["lone_answer_looks_skipped"] - before["a"].get("lone_answer_looks_skipped", 0)
        streak, every = runtime_mod.ANSWER_MISS_STREAK, runtime_mod.ANSWER_PROBE_EVERY
        assert skipped >= count - streak - count // every - 2, after["a"]
        assert after[side].get("send_errors", 0) == after[side].get("udp_send_errors", 0) == 0


def test_answer_look_backs_off_while_it_finds_nothing() -> None:
    """_answer_ready: one poll(0) per lone TUN write while answers come; after ANSWER_MISS_STREAK misses in a
    row only every ANSWER_PROBE_EVERY-th write polls, and the first hit restores polling every time."""
    rt = runtime_mod.Runtime("twtest0", socket_dir="/nonexistent")
    ready: list[bool] = []
    polls: list[int] = []

    def fake_poll(timeout: int) -> list:
        polls.append(timeout)
        return [(3, 1)] if ready[-1] else []

    rt._reply_poll = fake_poll
    streak, every = runtime_mod.ANSWER_MISS_STREAK, runtime_mod.ANSWER_PROBE_EVERY
    for _ in range(5):  # answers: every write polls and finds one
        ready.append(True)
        assert rt._answer_ready()
    assert len(polls) == 5
    writes = streak + 3 * every
    for _ in range(writes):  # no answers: the streak, then one poll per `every` writes
        ready.append(False)
        assert not rt._answer_ready()
    assert len(polls) - 5 == streak + 3
    assert rt.lone_counters["answer_looks_skipped"] == writes - streak - 3
    ready.append(True)  # an answer comes while skipping: missed by this write (the loop takes it) ...
    hits = [rt._answer_ready() for _ in range(every)]
    assert any(hits)  # ... found by the next probe, and from then on every write polls again
    assert rt._answer_ready() and rt._answer_ready()
    assert polls[-2:] == [0, 0]


def _slice_ns(pid: int) -> int | None:
    """se.slice of a task from /proc/<pid>/sched (None when the kernel does not show it)."""
    try:
        text = open(f"/proc/{pid}/sched").read()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("se.slice"):
            return int(line.split(":")[1])
    return None


def test_sched_slice_switch_and_request(monkeypatch) -> None:
    monkeypatch.delenv("TURBOWG_SCHED_SLICE_US", raising=False)
    assert runtime_mod.sched_slice_from_env() == runtime_mod.SCHED_SLICE_DEFAULT_US
    for value, want in (("0", 0), ("250", 250), ("-3", 0), ("soon", runtime_mod.SCHED_SLICE_DEFAULT_US)):
        monkeypatch.setenv("TURBOWG_SCHED_SLICE_US", value)
        assert runtime_mod.sched_slice_from_env() == want
    assert not runtime_mod.request_sched_slice(0)  # off: nothing asked
    # In a child process (the slice is the calling thread's; the test runner keeps its own).
    pid = os.fork()
    if pid == 0:
        ok = runtime_mod.request_sched_slice(300)
        os._exit(0 if ok and _slice_ns(os.getpid()) in (300_000, None) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@needs_netns
def test_daemon_runs_with_the_short_slice() -> None:
    """turbowgd's event-loop thread has the slice asked for (default) or the kernel's (switched off)."""
    with tunnel("turbowg", "turbowg", env_b={"TURBOWG_SCHED_SLICE_US": "0"}) as tun:
        assert ping(tun.a, tun.server_v4, count=3)
        a_slice, b_slice = _slice_ns(tun.a.daemon.pid), _slice_ns(tun.b.daemon.pid)
    if a_slice is None:
        pytest.skip("the kernel does not report se.slice")
    assert a_slice == runtime_mod.SCHED_SLICE_DEFAULT_US * 1000
    assert b_slice != a_slice
