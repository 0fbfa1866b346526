"""The README's first command: `turbowg demo` runs end to end and cleans up after itself."""

from __future__ import annotations

import subprocess
import sys

from test_demo import _own_namespaces

from turbowg.testing.marks import needs_netns
from turbowg.testing.netns import namespaces


@needs_netns
def test_demo_runs_and_cleans_up() -> None:
    proc = subprocess.run([sys.executable, "-m", "turbowg", "demo", "--duration", "1"], capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Summary" in proc.stdout and "Gbit/s received" in proc.stdout
    assert "latest handshake" in proc.stdout
    assert not _own_namespaces(proc.stdout) & namespaces()  # only its own: other tests may run meanwhile


def test_help_lists_every_command() -> None:
    proc = subprocess.run([sys.executable, "-m", "turbowg", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for command in ("demo", "bench", "doctor", "relay", "derp-client"):
        assert command in proc.stdout
