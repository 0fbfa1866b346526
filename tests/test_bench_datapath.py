"""`turbowg bench datapath`: a short real run prints the table and writes the JSON; bad options are refused."""

from __future__ import annotations

import json
import subprocess
import sys

from turbowg.noise import transport
from turbowg.tun import fast


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "turbowg", "bench", "datapath", *args],
                          capture_output=True, text=True, timeout=120)


def test_short_run_reports_every_loop(tmp_path) -> None:
    out = tmp_path / "dp.json"
    proc = run_bench("--runs", "2", "--seconds", "0.01", "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"seal", "open", "split", "coalesce"}
    impls = {"c", "python"} if transport.HAVE_C and fast.HAVE_C else {"python"}
    for name, per_impl in results.items():
        assert impls <= set(per_impl), name
        for stats in per_impl.values():
            assert len(stats["runs_us"]) == 2 and stats["median_us"] > 0
    assert "x python" in proc.stdout
    runs = 2 * 4 * len(impls)
    assert f"[run {runs}/{runs}]" in proc.stdout


def test_bad_options_are_refused() -> None:
    proc = run_bench("--tests", "nope")
    assert proc.returncode == 2 and "unknown test" in proc.stdout and "Traceback" not in proc.stderr
    proc = run_bench("--runs", "0")
    assert proc.returncode == 2 and "--runs" in proc.stdout
