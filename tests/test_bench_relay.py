"""`turbowg bench relay` end to end, shortened: every configuration runs, the table/JSON/chart appear."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_relay_short_run(tmp_path) -> None:  # type: ignore[no-untyped-def]
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    proc = subprocess.run(
        [sys.executable, "-m", "turbowg", "bench", "relay", "--duration", "0.5", "--runs", "1", "--workers", "1",
         "--pairs", "2", "--rate-mbit", "20", "--json", str(out_json), "--png", str(out_png)],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert "[4/4] 1w tls paced, run 1/1" in proc.stderr  # progress line
    for name in ("1w plain unpaced", "1w tls unpaced", "1w plain paced", "1w tls paced"):
        assert name in proc.stdout
    runs = json.loads(out_json.read_text())["runs"]
    assert len(runs) == 4
    for run in runs:
        assert run["received"] > 0 and run["bad"] == 0 and run["reordered"] == 0
        assert run["pings"] > 0 and run["relay_cpu_s"] >= 0
    paced = [r for r in runs if r["paced"]]
    assert all(r["loss_pct"] == 0 for r in paced)  # 20 Mbit/s is far below what the relay carries
    assert out_png.exists() or "matplotlib is not installed" in proc.stdout


def test_bench_relay_rejects_bad_options() -> None:
    proc = subprocess.run([sys.executable, "-m", "turbowg", "bench", "relay", "--workers", "0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "worker counts must be >= 1" in proc.stderr and "Traceback" not in proc.stderr
