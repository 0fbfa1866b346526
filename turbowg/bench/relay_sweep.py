"""`turbowg bench relay --sweep`: the relay's knee under a paced rate sweep.

For each configuration (relay path C or Python, worker count, plain or TLS, pairs, packet size, optionally
pinned) one sweep starts a fresh relay, bulk load generator processes (relay_loadgen.py) holding the
sender->receiver pairs, and a DERP pinger in this process. The first
repetition of a configuration probes the carried rate with an unpaced step and fixes a geometric ladder
of offered rates around it (ratio 2^(1/4) by default, the probe rate at the third step from the top); every
repetition then climbs that ladder, one step of `--step-seconds` each, and stops after two lossy steps in a
row (going on up past the ladder while nothing is lost, and down below it when every step lost). The knee
of a sweep is the highest offered rate carried with < LOSS_LIMIT_PCT % loss; if no step lies at half the
knee, one more step measures the ping RTT there.

Loss is counted exactly, in frames. Per sender a token bucket against the monotonic clock schedules
floor(rate x seconds) frames; each ~1 ms tick the sender writes what is due, from pre-built frames. Frames
the socket does not accept (the relay is not reading: TCP backpressure) are refused, i.e. dropped at the
sender like a full NIC queue; frames the generator was too late to present (more than MAX_LAG behind the
schedule) are its shortfall. Receivers count the bytes of fixed-size RecvPacket frames by a 41-byte header
(type, length, source key, step tag) that no other frame and no payload contains, so they never parse a
frame in Python. After the step the generator waits until every frame written has arrived (or the stream
has been quiet for DRAIN_QUIET): what arrives later is lost (and, during the next step, counted apart as that
step's "late", by its tag, not as the next step's). After a lossy step the next waits until the relay is idle.
loss = (scheduled - delivered) / scheduled; scheduled - delivered = refused + shortfall + lost in the relay.

A sweep whose first lossy step lost only what the generator failed to present (the relay refused and
dropped less than LOSS_LIMIT_PCT), or whose knee is within one ladder step of what the generator offers
with no relay at all (the calibration: senders straight into receivers over loopback, unpaced), is marked
"generator-bound": its knee is then a lower bound for the relay.

Why one file (~580 lines): the climb, the per-sweep run and the table/chart read and write one step record;
relay.py keeps the fixed-rate benchmark and the relay/CPU helpers both use.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from turbowg.bench.relay import stop_relay
from turbowg.bench.relay_loadgen import DRAIN_MAX, MAX_LAG, TICK
from turbowg.bench.report import NO_MATPLOTLIB, pyplot, save_figure, table
from turbowg.bench.stats import summarize

LOSS_LIMIT_PCT = 0.1  # the knee: highest offered rate carried with less loss than this
SETTLE_MAX = 10.0  # most seconds to wait for an overloaded relay to go idle before the next step
EXTRA_STEPS = 4  # the ladder goes on up (down) by this many steps while the relay loses nothing (everything)
LADDER_RATIO = 2 ** 0.25
PROBE_AT_FROM_TOP = 2  # the probe rate is this many steps below the top of the ladder
DEFAULT_STEPS = 8
DEFAULT_STEP_SECONDS = 1.0  # with ~8 steps, 54 sweeps of the default configurations take ~14 min here
PROBE_SECONDS = 1.0


# ------------------------------------------------------------------------------------------------
# Loss, the knee and the climb (pure; tested on synthetic steps)


def step_loss(scheduled: int, sent: int, refused: int, shortfall: int, delivered: int) -> dict[str, float]:
    """Loss of one step in percent of the scheduled frames, and where it went."""
    if scheduled <= 0:
        return {"loss_pct": float("nan"), "refused_pct": float("nan"), "shortfall_pct": float("nan"),
                "relay_lost_pct": float("nan")}
    return {
        "loss_pct": 100.0 * (scheduled - delivered) / scheduled,
        "refused_pct": 100.0 * refused / scheduled,
        "shortfall_pct": 100.0 * shortfall / scheduled,
        "relay_lost_pct": 100.0 * (sent - delivered) / scheduled,
    }


def is_clean(step: dict[str, Any]) -> bool:
    loss = step.get("loss_pct")
    return loss is not None and loss == loss and loss < LOSS_LIMIT_PCT


def pick_knee(steps: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The step with the highest offered rate (`rate_fps`) and loss < LOSS_LIMIT_PCT, or None."""
    clean = [s for s in steps if is_clean(s) and not s.get("unpaced")]
    return max(clean, key=lambda s: s["rate_fps"]) if clean else None


def step_near(steps: Sequence[dict[str, Any]], rate: float, tolerance: float = 0.02) -> dict[str, Any] | None:
    """The paced step whose offered rate is within `tolerance` of `rate`."""
    for s in steps:
        if not s.get("unpaced") and abs(s["rate_fps"] - rate) <= tolerance * rate:
            return s
    return None


def make_ladder(probe_fps: float, steps: int, ratio: float = LADDER_RATIO) -> list[float]:
    """Geometric offered rates with the probe rate PROBE_AT_FROM_TOP steps below the top (fewer steps: the top ones)."""
    top = probe_fps * ratio ** PROBE_AT_FROM_TOP
    return [top / ratio ** (steps - 1 - i) for i in range(steps)]


def should_stop(steps: Sequence[dict[str, Any]], past_knee: int = 2) -> bool:
    """Stop climbing once the last `past_knee` paced steps all lost >= LOSS_LIMIT_PCT."""
    paced = [s for s in steps if not s.get("unpaced")]
    return len(paced) >= past_knee and not any(is_clean(s) for s in paced[-past_knee:])


async def climb(ladder: Sequence[float], measure: Callable[[float], Awaitable[dict[str, Any]]], ratio: float,
                extra: int = EXTRA_STEPS) -> list[dict[str, Any]]:
    """Offer the ladder's rates from the bottom; returns the paced steps in the order they ran.

    Stops two lossy steps past the knee (or when the relay hung up: a step with "closed"); goes on up by
    `ratio` past the top until then, and down below the bottom while no step was clean (at most `extra`
    steps each way); then measures half the knee when no step lies there (its RTT is reported).
    """
    steps: list[dict[str, Any]] = []
    rates = list(ladder)
    while rates:
        steps.append(await measure(rates.pop(0)))
        if should_stop(steps) or steps[-1].get("closed"):
            break
        if not rates and len(steps) < len(ladder) + extra:
            rates.append(steps[-1]["rate_fps"] * ratio)  # not two lossy steps past a knee yet
    lowest = min(s["rate_fps"] for s in steps)
    for _ in range(extra):
        if steps[-1].get("closed") or pick_knee(steps) is not None:
            break
        lowest /= ratio
        steps.append(await measure(lowest))
    knee = pick_knee(steps)
    if knee is not None and not steps[-1].get("closed") and step_near(steps, knee["rate_fps"] / 2) is None:
        steps.append(await measure(knee["rate_fps"] / 2))
    return steps


def generator_bound(steps: Sequence[dict[str, Any]], knee: dict[str, Any] | None, ceiling_fps: float | None,
                    ratio: float = LADDER_RATIO, gen_cpus: int | None = None) -> str:
    """Why this sweep's knee may be the generator's limit rather than the relay's ('' when it is the relay's).

    `gen_cpus`: the CPUs the generators have to themselves (pinned rows), for the CPU test: they used all
    of it at the first lossy step while the relay did not use its core."""
    paced = sorted((s for s in steps if not s.get("unpaced")), key=lambda s: s["rate_fps"])
    above = [s for s in paced if knee is None or s["rate_fps"] > knee["rate_fps"]]
    if above and above[0]["refused_pct"] + above[0]["relay_lost_pct"] < LOSS_LIMIT_PCT:
        return "the first lossy step lost only what the generator was late with"
    if (above and gen_cpus and above[0].get("gen_cores", 0.0) >= 0.95 * gen_cpus
            and above[0].get("relay_cores", 1.0) < 0.9):
        return "the generator had all its CPU at the first lossy step, the relay not"
    if knee is not None and not above:
        return "no lossy step: the relay was not saturated"
    if knee is not None and ceiling_fps is not None and knee["rate_fps"] * ratio > ceiling_fps:
        return f"generator ceiling {ceiling_fps / 1e3:.0f} kpkt/s is within a step of the knee"
    return ""


# ------------------------------------------------------------------------------------------------
# Orchestration


@dataclass(frozen=True)
class SweepConfig:
    path: str  # "c": the relay as shipped (C plane for plain clients); "py": TURBOWG_NO_C=1
    workers: int
    tls: bool
    pairs: int
    size: int
    pinned: bool = False  # relay on CPU 0, load generators and pinger on CPU 1

    @property
    def name(self) -> str:
        return (f"{'C' if self.path == 'c' else 'Py'} {self.workers}w {'tls' if self.tls else 'plain'} "
                f"{self.pairs}p {self.size}B{' pin' if self.pinned else ''}")


class _Gens:
    """The load generator processes of one sweep and the step protocol to them (a JSON line each way)."""

    def __init__(self, procs: list[asyncio.subprocess.Process], pairs: list[int]) -> None:
        self.procs, self.pairs = procs, pairs

    @classmethod
    async def start(cls, base: dict[str, Any], pairs: int, nprocs: int) -> _Gens:
        split = [n for n in (pairs // nprocs + (1 if i < pairs % nprocs else 0) for i in range(nprocs)) if n]
        procs = []
        for n in split:
            procs.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "turbowg.bench.relay_loadgen", "--loadgen", json.dumps({**base, "pairs": n}),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            ))
        gens = cls(procs, split)
        for p in procs:
            assert p.stdout is not None
            line = await asyncio.wait_for(p.stdout.readline(), 60)
            if not line or not json.loads(line).get("ready"):
                await gens.close()
                raise RuntimeError("load generator failed to connect")
        return gens

    async def step(self, rate_fps: float, duration: float) -> dict[str, Any]:
        """Total offered `rate_fps` (0: unpaced) split evenly over the pairs; the summed counts."""
        per_pair = rate_fps / sum(self.pairs)
        for p in self.procs:
            assert p.stdin is not None
            p.stdin.write(json.dumps({"op": "step", "rate_per_pair": per_pair, "duration": duration}).encode() + b"\n")
            await p.stdin.drain()
        total: dict[str, Any] = {}
        for p in self.procs:
            assert p.stdout is not None
            line = await asyncio.wait_for(p.stdout.readline(), duration + DRAIN_MAX + 30)
            if not line:
                raise RuntimeError("load generator died")
            for key, value in json.loads(line).items():
                if key == "drained":
                    total[key] = total.get(key, True) and value
                elif key in ("max_late_ms", "seconds"):
                    total[key] = max(total.get(key, 0.0), value)
                else:
                    total[key] = total.get(key, 0) + value
        return total

    async def close(self) -> None:
        for p in self.procs:
            if p.returncode is None and p.stdin is not None:
                with contextlib.suppress(OSError, RuntimeError):
                    p.stdin.close()
        for p in self.procs:
            try:
                await asyncio.wait_for(p.wait(), 5)
            except TimeoutError:
                p.kill()
                await p.wait()


async def _pinger(host: str, port: int, tls: bool, stop: asyncio.Event, out: list[tuple[float, float]],
                  interval: float) -> None:
    """DERP pings every `interval` s on a client of its own: (send time, RTT ms); a lost pong counts as 2 s."""
    from turbowg.derp.client import DerpClient, DerpClientError

    async with DerpClient() as client:
        await client.connect(host=host, port=port, tls=tls, verify=False)
        while not stop.is_set():
            t = time.monotonic()
            try:
                out.append((t, await client.ping(timeout=2.0) * 1000.0))
            except DerpClientError:
                out.append((t, 2000.0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def machine_busy_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine was busy, of which in softirq): /proc/stat, all CPUs; busy is all
    but idle and iowait. Softirq is mostly the loopback TCP of the benchmark's own traffic."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return float("nan"), float("nan")
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields[:8]) - fields[3] - fields[4]) / tick, fields[6] / tick


def source_version() -> dict[str, Any]:
    """The commit of the code measured and the files that differed from it (the relay runs from this tree)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"commit": head, "modified": [line[3:] for line in dirty if line.strip()]}


def load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def _affinity(pid: int) -> set[int]:
    try:
        return os.sched_getaffinity(pid)
    except OSError:
        return set()


def _pin(cpus: set[int]) -> Callable[[], None]:
    def apply() -> None:
        os.sched_setaffinity(0, cpus)
    return apply


async def _sweep_once(cfg: SweepConfig, args: argparse.Namespace, tmp: Path, ladder: list[float] | None,
                      ceiling: float | None) -> dict[str, Any]:
    from turbowg.bench.relay import BenchConfig, _cpu_seconds, _relay_command, _relay_pids, _wait_listening

    began = time.monotonic()
    port = _free_port()
    env = dict(os.environ)
    env.pop("TURBOWG_NO_C", None)
    if cfg.path == "py":
        env["TURBOWG_NO_C"] = "1"
    relay = await asyncio.create_subprocess_exec(
        *_relay_command(BenchConfig(cfg.workers, cfg.tls, True), port, tmp), env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        preexec_fn=_pin({0}) if cfg.pinned else None,
    )
    gens: _Gens | None = None
    relay_cpus: list[int] = []
    stop = asyncio.Event()
    pings: list[tuple[float, float]] = []
    ping_task: asyncio.Task[None] | None = None
    steps: list[dict[str, Any]] = []
    try:
        await _wait_listening(port, relay)
        await asyncio.sleep(0.3 if cfg.workers > 1 else 0.05)  # let every worker bind
        base = {"host": "127.0.0.1", "port": port, "tls": cfg.tls, "size": cfg.size,
                "cpus": [1] if cfg.pinned else []}
        gens = await _Gens.start(base, cfg.pairs, 1 if cfg.pinned else args.gen_procs)
        ping_task = asyncio.create_task(_pinger("127.0.0.1", port, cfg.tls, stop, pings, args.ping_interval))
        pids = _relay_pids(relay.pid)
        relay_cpus = sorted(set().union(*(_affinity(pid) for pid in pids)))

        measured = [0]

        async def settle() -> None:
            """Until the relay is idle (bounded): an overloaded step's backlog must not load the next one."""
            deadline = time.monotonic() + SETTLE_MAX
            while time.monotonic() < deadline:
                before = _cpu_seconds(pids)
                await asyncio.sleep(0.2)
                if _cpu_seconds(pids) - before <= 0.02:
                    return

        async def step(rate: float, seconds: float) -> dict[str, Any]:
            settled = time.monotonic()
            if steps and not is_clean(steps[-1]):
                await settle()
            cpu0, t0, busy0 = _cpu_seconds(pids), time.monotonic(), machine_busy_seconds()
            settled = t0 - settled
            counts = await gens.step(rate, seconds)
            if steps:  # the step before's frames that came only during this one: lost for it, but say so
                steps[-1]["late"] = counts["late_prev"]
            cpu1 = _cpu_seconds(pids)  # includes the drain: the relay's work for this step's frames
            busy1 = machine_busy_seconds()
            t1 = t0 + seconds
            rtts = [rtt for t, rtt in pings if t0 <= t < t1]
            gb = counts["delivered"] * cfg.size / 1e9
            rec = {**counts, "rate_fps": rate, "unpaced": rate == 0, "settle_s": settled,
                   "step_wall_s": time.monotonic() - t0, "at_s": t0 - began,
                   "delivered_fps": counts["delivered"] / seconds,
                   **step_loss(counts["scheduled"], counts["sent"], counts["refused"], counts["shortfall"],
                               counts["delivered"]),
                   "ping_p50_ms": _pct(rtts, 0.5), "ping_p99_ms": _pct(rtts, 0.99), "pings": len(rtts),
                   "relay_cpu_s": cpu1 - cpu0, "cpu_s_per_gb": (cpu1 - cpu0) / gb if gb else float("nan")}
            rec["relay_cores"] = rec["relay_cpu_s"] / rec["step_wall_s"]  # over the step and its drain
            rec["gen_cores"] = counts["gen_cpu_s"] / seconds  # the generators' own, over the paced part
            # the rest of the machine: softirq (loopback TCP), then other processes and this one's pinger.
            # Softirq work done in a process's context is in that process's stime and in the machine's softirq
            # both (tick accounting), so the remainder can come out below zero: it is at least 0.
            rec["softirq_cores"] = (busy1[1] - busy0[1]) / rec["step_wall_s"]
            rec["other_cores"] = max(0.0, (busy1[0] - busy0[0]) / rec["step_wall_s"] - rec["relay_cores"]
                                     - rec["gen_cores"] - rec["softirq_cores"])
            steps.append(rec)
            measured[0] += 1
            print(f"    {'unpaced probe' if rate == 0 else f'{rate / 1e3:8.1f} kpkt/s'}: delivered "
                  f"{rec['delivered_fps'] / 1e3:.1f} kpkt/s, loss {rec['loss_pct']:.3f}% (refused "
                  f"{rec['refused_pct']:.3f}, relay {rec['relay_lost_pct']:.3f}, generator {rec['shortfall_pct']:.3f}), "
                  f"ping p99 {rec['ping_p99_ms']:.2f} ms [at {rec['at_s']:.1f} s, settled {settled:.1f} s, "
                  f"took {rec['step_wall_s']:.1f} s]", file=sys.stderr, flush=True)
            return rec

        await asyncio.sleep(0.1)  # the pinger connects
        probe_fps = None
        if ladder is None:
            probe = await step(0.0, args.probe_seconds)
            probe_fps = probe["delivered_fps"]
            if probe_fps <= 0:
                raise RuntimeError("the unpaced probe delivered nothing")
            ladder = make_ladder(probe_fps, args.steps, args.ladder_ratio)
        await climb(ladder, lambda rate: step(rate, args.step_seconds), args.ladder_ratio)
        if steps[-1]["closed"]:
            steps[:] = [s for s in steps if not s["closed"]]  # not comparable: some pairs were gone
        knee = pick_knee(steps)
    finally:
        stop.set()
        if ping_task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ping_task, 5)
        if gens is not None:
            await gens.close()
        await stop_relay(relay)
    closed = any(s["closed"] for s in steps) or len(steps) < measured[0]
    half = step_near(steps, knee["rate_fps"] / 2) if knee else None
    return {
        "config": cfg.name, "path": cfg.path, "workers": cfg.workers, "tls": cfg.tls, "pairs": cfg.pairs,
        "size": cfg.size, "pinned": cfg.pinned, "ladder_fps": ladder, "probe_fps": probe_fps, "steps": steps,
        "knee_fps": knee["rate_fps"] if knee else float("nan"),
        "knee_mbit": knee["rate_fps"] * cfg.size * 8 / 1e6 if knee else float("nan"),
        "knee_ping_p50_ms": knee["ping_p50_ms"] if knee else float("nan"),
        "knee_ping_p99_ms": knee["ping_p99_ms"] if knee else float("nan"),
        "half_ping_p50_ms": half["ping_p50_ms"] if half else float("nan"),
        "half_ping_p99_ms": half["ping_p99_ms"] if half else float("nan"),
        "knee_cpu_s_per_gb": knee["cpu_s_per_gb"] if knee else float("nan"),
        "knee_relay_cores": knee["relay_cores"] if knee else float("nan"),
        "knee_gen_cores": knee["gen_cores"] if knee else float("nan"),
        "knee_softirq_cores": knee["softirq_cores"] if knee else float("nan"),
        "knee_other_cores": knee["other_cores"] if knee else float("nan"),
        "generator_ceiling_fps": ceiling,
        "generator_bound": generator_bound(steps, knee, ceiling, args.ladder_ratio, 1 if cfg.pinned else None),
        "closed": closed, "relay_cpus": relay_cpus,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def calibrate(pairs: int, size: int, seconds: float, nprocs: int, pinned: bool) -> dict[str, Any]:
    """The generator's own ceiling: unpaced, senders straight into receivers over loopback (no relay)."""
    gens = await _Gens.start({"direct": True, "size": size, "tls": False, "cpus": [1] if pinned else []},
                             pairs, 1 if pinned else nprocs)
    try:
        counts = await gens.step(0.0, seconds)
    finally:
        await gens.close()
    fps = counts["delivered"] / seconds
    return {"pairs": pairs, "size": size, "pinned": pinned, "ceiling_fps": fps,
            "gen_cpu_s": counts["gen_cpu_s"], "seconds": seconds,
            "gen_cpu_us_per_frame": 1e6 * counts["gen_cpu_s"] / counts["delivered"] if counts["delivered"] else None}


def sweep_configs(args: argparse.Namespace) -> list[SweepConfig]:
    configs = [SweepConfig(path, w, False, pairs, size)
               for size in args.sizes for pairs in args.pair_counts for path in args.paths for w in args.workers]
    if args.tls_rows and "c" in args.paths:
        configs += [SweepConfig("c", w, True, max(args.pair_counts), max(args.sizes)) for w in args.workers]
    if args.pin and "c" in args.paths:  # the per-core number is the C plane's (the Python path: 2 workers' rows)
        configs += [SweepConfig("c", 1, False, pairs, size, pinned=True)
                    for size in args.sizes for pairs in args.pair_counts]
    return configs


METRICS = [
    ("knee_fps", "knee kpkt/s", "{:.0f}", 1e-3),
    ("knee_mbit", "knee Mbit/s", "{:.0f}", 1.0),
    ("half_ping_p50_ms", "p50 ms @knee/2", "{:.2f}", 1.0),
    ("half_ping_p99_ms", "p99 ms @knee/2", "{:.2f}", 1.0),
    ("knee_ping_p50_ms", "p50 ms @knee", "{:.2f}", 1.0),
    ("knee_ping_p99_ms", "p99 ms @knee", "{:.2f}", 1.0),
    ("knee_cpu_s_per_gb", "CPU s/GB @knee", "{:.1f}", 1.0),
]


def _cores(runs: list[dict[str, Any]]) -> str:
    """'relay/gen/softirq/other' CPU cores at the knee, medians (who was busy where the relay stopped carrying)."""
    out = []
    for key in ("knee_relay_cores", "knee_gen_cores", "knee_softirq_cores", "knee_other_cores"):
        values = [r.get(key, float("nan")) for r in runs]
        values = [v for v in values if v == v]
        out.append(f"{summarize(values).median:.2f}" if values else "-")
    return "/".join(out)


def sweep_table(configs: list[SweepConfig], runs: list[dict[str, Any]]) -> str:
    rows = [["config"] + [label for _, label, _, _ in METRICS] + ["cores relay/gen/sirq/other @knee", "note"]]
    for cfg in configs:
        mine = [r for r in runs if r["config"] == cfg.name]
        row = [f"{cfg.name} (n={len(mine)})"]
        for key, _, fmt, scale in METRICS:
            values = [r[key] * scale for r in mine if r[key] == r[key]]
            row.append(summarize(values).format(fmt) if values else "-")
        row.append(_cores(mine))
        bound = sorted({r["generator_bound"] for r in mine if r["generator_bound"]})
        no_knee = sum(1 for r in mine if r["knee_fps"] != r["knee_fps"])
        note = []
        if bound:
            note.append(f"generator-bound in {sum(1 for r in mine if r['generator_bound'])}/{len(mine)}: "
                        + "; ".join(bound))
        if no_knee:
            note.append(f"{no_knee} run(s) lossy at every step")
        closed = sum(1 for r in mine if r.get("closed"))
        if closed:
            note.append(f"{closed} run(s) ended early: the relay closed generator connections")
        row.append(", ".join(note))
        rows.append(row)
    return "\n".join(table(rows))


def sweep_chart(configs: list[SweepConfig], runs: list[dict[str, Any]], path: str) -> str:
    """Per packet size: delivered vs offered (knees marked), ping p99 vs offered (medians per step), and the
    knee of every configuration (median, 95% CI; generator-bound rows hatched)."""
    plt = pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    sizes = sorted({c.size for c in configs}, reverse=True)
    fig, axes = plt.subplots(len(sizes), 3, figsize=(19, 5.2 * len(sizes)), squeeze=False)
    for row, size in enumerate(sizes):
        ax_rate, ax_rtt, ax_knee = axes[row]
        names, meds, lo, hi, colors, hatches = [], [], [], [], [], []
        for index, cfg in enumerate(c for c in configs if c.size == size):
            color = plt.get_cmap("tab20")(index % 20)  # up to 20 rows per size, each its own colour
            mine = [r for r in runs if r["config"] == cfg.name]
            by_rate: dict[float, list[dict[str, Any]]] = {}
            for r in mine:
                for s in r["steps"]:
                    if not s["unpaced"]:
                        by_rate.setdefault(round(s["rate_fps"], 3), []).append(s)
            if not by_rate:
                continue
            rates = sorted(by_rate)
            offered = [x / 1e3 for x in rates]
            delivered = [summarize([s["delivered_fps"] for s in by_rate[x]]).median / 1e3 for x in rates]
            p99 = [summarize([s["ping_p99_ms"] for s in by_rate[x] if s["ping_p99_ms"] == s["ping_p99_ms"]]
                             or [float("nan")]).median for x in rates]
            ax_rate.plot(offered, delivered, marker=".", color=color, label=cfg.name)
            ax_rtt.plot(offered, p99, marker=".", color=color, label=cfg.name)
            knees = [r["knee_fps"] for r in mine if r["knee_fps"] == r["knee_fps"]]
            if knees:
                k = summarize(knees)
                ax_rate.errorbar([k.median / 1e3], [k.median / 1e3], xerr=[[(k.median - k.lo) / 1e3],
                                 [(k.hi - k.median) / 1e3]], marker="o", color=color, capsize=3)
                names.append(cfg.name.replace(f" {size}B", ""))
                meds.append(k.median / 1e3)
                lo.append((k.median - k.lo) / 1e3)
                hi.append((k.hi - k.median) / 1e3)
                colors.append(color)
                hatches.append("//" if any(r["generator_bound"] for r in mine) else "")
        lim = ax_rate.get_xlim()
        ax_rate.plot(lim, lim, color="grey", lw=0.6, ls=":")
        for ax, ylabel in ((ax_rate, "delivered kpkt/s"), (ax_rtt, "ping p99 ms")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(f"offered kpkt/s ({size}-byte packets)")
            ax.set_ylabel(ylabel)
            ax.legend(fontsize=6)
        ax_rate.set_title(f"{size} B: carried vs offered (o: knee, median and 95% CI)")
        ax_rtt.set_title(f"{size} B: DERP ping p99 under load")
        bars = ax_knee.bar(range(len(names)), meds, yerr=[lo, hi], capsize=3, color=colors)
        for bar, hatch in zip(bars, hatches, strict=True):
            bar.set_hatch(hatch)
        ax_knee.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=7)
        ax_knee.set_ylabel("knee kpkt/s")
        ax_knee.set_title(f"{size} B: knee (< {LOSS_LIMIT_PCT:g}% loss; hatched: generator-bound)")
    save_figure(fig, "turbowg DERP relay rate sweep", path, dpi=100)
    return f"chart written to {path}"


LOSS_NOTE = (f"Knee = highest offered rate carried with < {LOSS_LIMIT_PCT:g}% loss. Loss = (scheduled - delivered) / "
             "scheduled frames, counted exactly on both sides: scheduled = floor(rate x seconds) by each sender's "
             "token bucket; not delivered = refused by the sender's full socket (relay backpressure) + dropped "
             "in the relay + generator shortfall (more than 50 ms behind its schedule). Ping = a separate DERP "
             "client's Ping/Pong RTT every few ms during the step.")


async def run_sweep(args: argparse.Namespace) -> int:
    configs = sweep_configs(args)
    began = time.monotonic()
    load_before = load_average()
    source = source_version()
    calib: dict[tuple[int, int, bool], dict[str, Any]] = {}
    for pinned in sorted({c.pinned for c in configs}):
        for size in args.sizes:
            for pairs in args.pair_counts:
                c = await calibrate(pairs, size, args.probe_seconds, args.gen_procs, pinned)
                calib[(pairs, size, pinned)] = c
                print(f"generator ceiling (no relay, {pairs} pairs, {size} B{', CPU 1' if pinned else ''}): "
                      f"{c['ceiling_fps'] / 1e3:.0f} kpkt/s, {c['gen_cpu_us_per_frame'] or 0:.2f} CPU us/frame",
                      file=sys.stderr, flush=True)
    runs: list[dict[str, Any]] = []
    ladders: dict[str, list[float]] = {}
    total, n = len(configs) * args.runs, 0
    with tempfile.TemporaryDirectory(prefix="turbowg-bench-relay-") as tmpdir:
        tmp = Path(tmpdir)
        if any(c.tls for c in configs):
            from turbowg.bench.relay import _make_tls_files

            _make_tls_files(tmp, "localhost")
        for rep in range(args.runs):
            for cfg in configs:  # interleaved: every configuration once per repetition
                n += 1
                print(f"[{n}/{total}] {cfg.name}, run {rep + 1}/{args.runs} ({time.monotonic() - began:.0f} s)",
                      file=sys.stderr, flush=True)
                if cfg.pinned:
                    os.sched_setaffinity(0, {1})  # the pinger shares CPU 1 with the load generators
                try:
                    result = await _sweep_once(cfg, args, tmp, ladders.get(cfg.name),
                                               calib[(cfg.pairs, cfg.size, cfg.pinned)]["ceiling_fps"])
                except (RuntimeError, OSError, TimeoutError, EOFError, json.JSONDecodeError) as exc:
                    print(f"    sweep failed: {exc!r}", file=sys.stderr, flush=True)
                    continue
                finally:
                    if cfg.pinned:
                        os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
                ladders.setdefault(cfg.name, result["ladder_fps"])
                result["repetition"] = rep
                runs.append(result)
                print(f"    knee {result['knee_fps'] / 1e3:.1f} kpkt/s {result['generator_bound']}",
                      file=sys.stderr, flush=True)
    wall = time.monotonic() - began
    meta = {
        "command": " ".join(["turbowg", "bench", "relay"] + sys.argv[3:]) if len(sys.argv) > 2 else "",
        "steps": args.steps, "step_seconds": args.step_seconds, "ladder_ratio": args.ladder_ratio,
        "probe_seconds": args.probe_seconds, "runs": args.runs, "gen_procs": args.gen_procs,
        "loss_limit_pct": LOSS_LIMIT_PCT, "tick_s": TICK, "max_lag_s": MAX_LAG, "cpus": os.cpu_count(),
        "kernel": os.uname().release, "python": sys.version.split()[0], "wall_s": wall,
        "calibration": list(calib.values()), "loss": LOSS_NOTE,
        "loadavg_before": load_before, "loadavg_after": load_average(), "source": source,
    }
    print()
    print(f"DERP relay rate sweep: up to {args.steps} offered rates per sweep (ratio {args.ladder_ratio:.3f}, "
          f"{args.step_seconds:g} s each), {args.runs} interleaved sweeps per configuration. Median [95% CI] "
          "over sweeps (distribution-free; with fewer than 6 sweeps the interval is [min, max]).")
    print(sweep_table(configs, runs))
    for cfg in (c for c in configs if c.pinned):
        knees = [r["knee_fps"] for r in runs if r["config"] == cfg.name and r["knee_fps"] == r["knee_fps"]]
        if knees:
            k = summarize(knees)
            print(f"per-core knee ({cfg.pairs} pairs, {cfg.size} B, C plane pinned to CPU 0, load on CPU 1): "
                  f"{k.median / 1e3:.0f} kpkt/s = {k.median * cfg.size * 8 / 1e9:.2f} Gbit/s of packets "
                  f"[{k.lo / 1e3:.0f}, {k.hi / 1e3:.0f}] kpkt/s")
    print()
    print(LOSS_NOTE)
    print("Generator ceiling (unpaced, senders straight into receivers, no relay): " + ", ".join(
        f"{c['pairs']}p {c['size']}B{' CPU1' if c['pinned'] else ''} {c['ceiling_fps'] / 1e3:.0f} kpkt/s"
        for c in calib.values()))
    print(f"C = the relay as shipped (plain and TLS clients on the C plane, TLS through OpenSSL called from C), Py = "
          f"TURBOWG_NO_C=1. Load generators ({args.gen_procs} processes) and the pinger share the machine's "
          f"{os.cpu_count()} CPUs with the relay; 'pin' rows: relay on CPU 0, everything else on CPU 1 (the "
          "per-core number). CPU s/GB: relay processes' CPU seconds per GB of packet payload delivered.")
    print("cores relay/gen/sirq/other @knee: CPU cores kept busy during the knee step by the relay processes, the "
          "load generators, softirq (mostly loopback TCP) and everything else (other processes, the pinger).")
    print(f"wall time {wall:.0f} s; load average before {load_before}, after {meta['loadavg_after']} "
          f"({os.cpu_count()} CPUs); code at {source.get('commit', '?')}"
          + (f" with uncommitted changes to {', '.join(source['modified'])}" if source.get("modified") else ""))
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "runs": runs}, f, indent=1)
    print(f"raw sweeps written to {args.json}")
    if args.png:
        print(sweep_chart(configs, runs, args.png))
    return 0 if runs else 1


def positive_list(kind: Callable[[str], Any], minimum: float = 1) -> Callable[[str], list[Any]]:
    def parse(text: str) -> list[Any]:
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from None
        if not values or any(v < minimum for v in values):
            raise argparse.ArgumentTypeError(f"values must be >= {minimum:g}")
        return values
    return parse


def path_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values or any(v not in ("c", "py") for v in values):
        raise argparse.ArgumentTypeError("paths are 'c' and/or 'py'")
    return values
