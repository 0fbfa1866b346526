"""`turbowg bench relay --sweep`: pacing, exact frame counting, loss accounting and the knee, then the
bulk generator's counts against a real relay (C and Python paths) and a tiny sweep end to end."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from turbowg.bench import relay_loadgen as lg
from turbowg.bench import relay_sweep as sw

# ------------------------------------------------------------------------------------------------
# Pacer


def test_pacer_schedules_floor_rate_times_duration_and_nothing_after() -> None:
    pacer = lg.Pacer(1000.0, start=10.0, duration=1.0)
    total = 0
    for ms in range(0, 1200):  # a tick every ms, 200 ms past the end
        total += pacer.take(10.0 + ms / 1000.0)
    assert total == pacer.scheduled == 1000 and pacer.shortfall == 0
    assert pacer.take(12.0) == 0


def test_pacer_counts_what_is_too_late_as_shortfall_not_a_burst() -> None:
    pacer = lg.Pacer(1000.0, start=0.0, duration=1.0, max_lag=0.05)
    assert pacer.take(0.0) == 0
    assert pacer.take(0.2) == 50  # 200 due, only 50 ms worth may go at once
    assert pacer.shortfall == 150
    assert pacer.take(0.201) == 1  # back on schedule: the late ones are not owed again
    rest = sum(pacer.take(0.2 + ms / 1000.0) for ms in range(2, 900))
    assert pacer.offered + pacer.shortfall == pacer.scheduled == 1000 and pacer.offered == 51 + rest


# ------------------------------------------------------------------------------------------------
# FrameCounter and the step payload


def _stream(key: bytes, size: int, tag: int, frames: int, keepalives: int, rng: random.Random) -> tuple[bytes, bytes]:
    base = lg.frame_base(lg.RECV_PACKET, key, size)
    needle, payload = lg.step_payload(base, size, tag)
    parts = [base + payload] * frames + [b"\x06\x00\x00\x00\x00"] * keepalives  # KeepAlive frames
    rng.shuffle(parts)
    return needle, b"".join(parts)


def _chunks(data: bytes, rng: random.Random) -> Iterator[bytes]:
    pos = 0
    while pos < len(data):
        n = rng.choice([1, 2, 5, 36, 40, 41, 42, 100, 1437, 5000])
        yield data[pos : pos + n]
        pos += n


@pytest.mark.parametrize("size", [16, 64, 1400])
def test_frame_counter_is_exact_across_any_split(size: int) -> None:
    rng = random.Random(size)
    key = os.urandom(32)
    needle, data = _stream(key, size, 3, 500, 37, rng)
    counter = lg.FrameCounter(needle, len(lg.frame_base(lg.RECV_PACKET, key, size)) + size, size=4096)
    for chunk in _chunks(data, rng):
        counter.feed(chunk)
    assert counter.frames == 500 and counter.other_bytes == 37 * 5 and counter.late == 0


def test_frame_counter_credits_the_previous_step_apart_and_ignores_other_frames() -> None:
    rng = random.Random(1)
    key = os.urandom(32)
    size = 64
    old_needle, old = _stream(key, size, 1, 100, 0, rng)
    new_needle, new = _stream(key, size, 2, 70, 0, rng)
    _, other = _stream(key, size + 1, 2, 9, 0, rng)  # a different length is not a data frame of this step
    frame_len = lg.TAGGED_HEADER - 4 + size
    counter = lg.FrameCounter(old_needle, frame_len)
    counter.feed(old[: 50 * frame_len + 7])
    assert counter.frames == 50
    counter.next_step(new_needle)
    counter.feed(old[50 * frame_len + 7 :] + new + other)
    assert (counter.frames, counter.late) == (70, 50)
    assert counter.other_bytes == len(other) - 7  # 7 bytes of a late frame arrived before next_step


def test_step_payload_filler_is_outside_the_needles_bloom_and_never_forms_a_header() -> None:
    for tag in range(1, 40):
        base = lg.frame_base(lg.RECV_PACKET, os.urandom(32), 64)
        prev, _ = lg.step_payload(base, 64, tag - 1)
        needle, payload = lg.step_payload(base, 64, tag, avoid=prev)
        assert len(needle) == lg.TAGGED_HEADER and len(payload) == 64
        filler = payload[-1]
        assert (filler & 63) not in {b & 63 for b in needle + prev}
        assert (base + payload).count(needle) == 1 and ((base + payload) * 3).count(needle) == 3
        assert needle[-1] not in needle[:-1]  # the unique last byte the search keys on


# ------------------------------------------------------------------------------------------------
# Loss accounting and the knee on synthetic steps


def _step(rate: float, loss: float, **extra: Any) -> dict[str, Any]:
    scheduled = 100_000
    delivered = scheduled - round(scheduled * loss / 100)
    refused = scheduled - delivered
    rec = {"rate_fps": rate, "unpaced": False, "scheduled": scheduled, "sent": delivered, "refused": refused,
           "shortfall": 0, "delivered": delivered}
    rec.update(extra)
    rec.update(sw.step_loss(rec["scheduled"], rec["sent"], rec["refused"], rec["shortfall"], rec["delivered"]))
    return rec


def test_step_loss_counts_every_scheduled_frame_not_delivered() -> None:
    loss = sw.step_loss(scheduled=10_000, sent=9_800, refused=150, shortfall=50, delivered=9_790)
    assert loss["loss_pct"] == pytest.approx(2.1)
    assert loss["refused_pct"] == pytest.approx(1.5) and loss["shortfall_pct"] == pytest.approx(0.5)
    assert loss["relay_lost_pct"] == pytest.approx(0.1)
    assert loss["refused_pct"] + loss["shortfall_pct"] + loss["relay_lost_pct"] == pytest.approx(loss["loss_pct"])


def test_knee_is_the_highest_step_below_the_loss_limit_never_a_lossy_one() -> None:
    steps = [_step(100, 0.0), _step(119, 0.0), _step(141, 0.05), _step(168, 0.1), _step(200, 0.3),
             _step(238, 2.0), _step(283, 9.0)]
    knee = sw.pick_knee(steps)
    assert knee is not None and knee["rate_fps"] == 141 and knee["loss_pct"] < sw.LOSS_LIMIT_PCT
    # 0.1% exactly is not "< 0.1%"; an unpaced probe is never the knee, however clean
    assert sw.pick_knee([_step(100, 0.1), {**_step(500, 0.0), "unpaced": True}]) is None
    # a clean step above a lossy one counts (the highest offered load carried), a lossy top does not
    knee = sw.pick_knee([_step(100, 0.0), _step(119, 0.5), _step(141, 0.0), _step(168, 0.2)])
    assert knee is not None and knee["rate_fps"] == 141
    for trial in range(200):  # random ladders: the knee is never lossy and nothing clean is above it
        rng = random.Random(trial)
        ladder = [_step(100 * 1.19**i, rng.choice([0.0, 0.0, 0.02, 0.099, 0.1, 0.11, 3.0])) for i in range(8)]
        knee = sw.pick_knee(ladder)
        clean = [s for s in ladder if s["loss_pct"] < 0.1]
        if knee is None:
            assert not clean
        else:
            assert knee["loss_pct"] < 0.1 and all(s["rate_fps"] <= knee["rate_fps"] for s in clean)


def test_climbing_stops_two_lossy_steps_past_the_knee() -> None:
    assert not sw.should_stop([_step(100, 0.0), _step(119, 1.0)])
    assert sw.should_stop([_step(100, 0.0), _step(119, 1.0), _step(141, 2.0)])
    assert not sw.should_stop([_step(100, 0.0), _step(119, 1.0), _step(141, 0.0)])


def _climb(ladder: list[float], capacity: float) -> list[dict[str, Any]]:
    import asyncio

    async def measure(rate: float) -> dict[str, Any]:  # a relay that carries `capacity` and refuses the rest
        return _step(rate, 0.0 if rate <= capacity else 100.0 * (1 - capacity / rate))

    return asyncio.run(sw.climb(ladder, measure, 2**0.25))


def test_climb_stops_two_steps_past_the_knee_and_measures_half_the_knee() -> None:
    ladder = sw.make_ladder(1000.0, 8, 2**0.25)
    steps = _climb(ladder, capacity=1000.0)
    rates = [s["rate_fps"] for s in steps]
    assert rates[:8] == ladder[:8] and len(rates) == 8  # the knee is the probe: two lossy steps above, done
    knee = sw.pick_knee(steps)
    assert knee is not None and knee["rate_fps"] == pytest.approx(1000.0)
    assert sw.step_near(steps, 500.0) is not None  # on the ladder already: 4 steps below


def test_climb_goes_on_up_while_nothing_is_lost_and_down_while_everything_is() -> None:
    ladder = sw.make_ladder(1000.0, 8, 2**0.25)
    up = _climb(ladder, capacity=2000.0)
    knee = sw.pick_knee(up)
    assert knee is not None and knee["rate_fps"] == pytest.approx(2000.0)
    assert sw.should_stop(up) and len(up) == 8 + 4  # up past the top (1414) to 2000, then 2 lossy steps
    down = _climb(ladder, capacity=300.0)
    knee = sw.pick_knee(down)
    assert knee is not None and 300.0 / 2**0.25 < knee["rate_fps"] <= 300.0
    half = sw.step_near(down, knee["rate_fps"] / 2)
    assert half is not None and half is down[-1]  # below the ladder: measured at the end
    assert len(_climb(ladder, capacity=1.0)) == 2 + sw.EXTRA_STEPS  # gives up: no knee, bounded


def test_ladder_is_geometric_with_the_probe_below_the_top() -> None:
    ladder = sw.make_ladder(1000.0, 8, 2**0.25)
    assert len(ladder) == 8
    assert ladder[8 - 1 - sw.PROBE_AT_FROM_TOP] == pytest.approx(1000.0)
    assert all(b / a == pytest.approx(2**0.25) for a, b in zip(ladder, ladder[1:], strict=False))
    assert ladder[4] / ladder[0] == pytest.approx(2.0)  # half the knee is 4 steps below it


def test_generator_bound_verdicts() -> None:
    relay_limited = [_step(100, 0.0), _step(119, 0.0), _step(141, 1.0), _step(168, 5.0)]
    assert sw.generator_bound(relay_limited, sw.pick_knee(relay_limited), ceiling_fps=1000.0) == ""
    late = [_step(100, 0.0), {**_step(119, 0.0), "shortfall": 500, "sent": 99_500, "delivered": 99_500}]
    late[1].update(sw.step_loss(100_000, 99_500, 0, 500, 99_500))
    assert "generator" in sw.generator_bound(late, sw.pick_knee(late), ceiling_fps=1000.0)
    assert "ceiling" in sw.generator_bound(relay_limited, sw.pick_knee(relay_limited), ceiling_fps=130.0)
    assert "not saturated" in sw.generator_bound(relay_limited[:2], sw.pick_knee(relay_limited[:2]), None)
    busy = [dict(s, gen_cores=0.99, relay_cores=0.5) for s in relay_limited]  # pinned: CPU 1 full, CPU 0 not
    assert "all its CPU" in sw.generator_bound(busy, sw.pick_knee(busy), ceiling_fps=1000.0, gen_cpus=1)
    assert sw.generator_bound(busy, sw.pick_knee(busy), ceiling_fps=1000.0) == ""  # unpinned: not this test


# ------------------------------------------------------------------------------------------------
# The bulk generator against a real relay, and the sweep end to end


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(params=["c", "py"])
def relay_port(request: pytest.FixtureRequest) -> Iterator[int]:
    port = _free_port()
    env = dict(os.environ)
    env.pop("TURBOWG_NO_C", None)
    if request.param == "py":
        env["TURBOWG_NO_C"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "turbowg", "relay", "--dev", "-a", f"127.0.0.1:{port}",
                             "--stun", "false", "--workers", "1"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, "relay exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "relay did not listen"
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(15)


def test_generator_counts_every_frame_exactly_through_a_real_relay(relay_port: int) -> None:
    gen = lg.Generator({"host": "127.0.0.1", "port": relay_port, "tls": False, "pairs": 3, "size": 64})
    for rate, seconds in ((3000.0, 0.4), (7001.0, 0.3)):
        r = gen.step(rate, seconds)
        assert r["scheduled"] == 3 * int(rate * seconds)
        assert r["sent"] + r["refused"] + r["shortfall"] == r["scheduled"]  # every scheduled frame accounted for
        assert r["sent"] >= 0.9 * r["scheduled"] and r["refused"] == 0  # far below what the relay carries
        assert r["delivered"] == r["sent"] and r["drained"] and r["closed"] == 0
        assert r["other_bytes"] >= 0 and r["late_prev"] == 0


def test_generator_direct_mode_is_its_own_ceiling() -> None:
    gen = lg.Generator({"direct": True, "tls": False, "pairs": 2, "size": 1400})
    r = gen.step(0.0, 0.3)  # unpaced
    assert r["sent"] > 0 and r["delivered"] == r["sent"] and r["refused"] == 0 and r["other_bytes"] == 0


def test_sweep_end_to_end_on_a_tiny_ladder(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out_json, out_png = tmp_path / "s.json", tmp_path / "s.png"
    proc = subprocess.run(
        [sys.executable, "-m", "turbowg", "bench", "relay", "--sweep", "--runs", "1", "--steps", "2",
         "--step-seconds", "0.3", "--probe-seconds", "0.3", "--workers", "1", "--paths", "c,py", "--sizes", "64",
         "--pair-counts", "2", "--no-tls", "--pin", "--json", str(out_json), "--png", str(out_png)],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("C 1w plain 2p 64B (n=1)", "Py 1w plain 2p 64B (n=1)", "C 1w plain 2p 64B pin (n=1)",
                 "knee kpkt/s", "p99 ms @knee/2", "cores relay/gen/sirq/other @knee", "load average before",
                 "Loss = (scheduled - delivered) / scheduled", "Generator ceiling"):
        assert name in proc.stdout
    data = json.loads(out_json.read_text())
    assert data["meta"]["calibration"][0]["ceiling_fps"] > 0
    runs = data["runs"]
    assert {r["path"] for r in runs} == {"c", "py"}
    assert [r["relay_cpus"] for r in runs if r["pinned"]] == [[0]]  # the per-core row: the relay on CPU 0 only
    assert all(len(r["relay_cpus"]) == os.cpu_count() for r in runs if not r["pinned"])
    for run in runs:
        assert run["steps"][0]["unpaced"] and run["probe_fps"] > 0
        paced = [s for s in run["steps"] if not s["unpaced"]]
        assert len(paced) >= 2
        for s in paced:
            assert s["sent"] + s["refused"] + s["shortfall"] == s["scheduled"] and s["delivered"] <= s["sent"]
        if run["knee_fps"] == run["knee_fps"]:
            knee = next(s for s in paced if s["rate_fps"] == run["knee_fps"])
            assert knee["loss_pct"] < sw.LOSS_LIMIT_PCT
    assert out_png.exists() or "matplotlib is not installed" in proc.stdout


@pytest.mark.parametrize(("flags", "message"), [
    (["--paths", "c,rust"], "paths are 'c' and/or 'py'"),
    (["--sizes", "64,0"], "values must be >= 1"),
    (["--sizes", "8"], "between 16 and 65536"),
    (["--ladder-ratio", "0.9"], "--ladder-ratio must be > 1"),
])
def test_sweep_rejects_bad_options(flags: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "turbowg", "bench", "relay", "--sweep", *flags],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
