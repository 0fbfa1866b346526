"""The C accelerators are optional in setup.py, so a broken build would quietly leave every C-vs-Python
comparison skipped and every benchmark on the slow path. Under CI (`CI` set) this test fails unless the
extensions are built, except in the run that tests the fallback on purpose (`TURBOWG_NO_C` set)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from turbowg import accel
from turbowg.conn import recvmmsg
from turbowg.device import route
from turbowg.noise import transport
from turbowg.relay import fastpath
from turbowg.tun import fast

EXTENSIONS = {
    "turbowg.noise._aead": lambda: transport.HAVE_C,
    "turbowg.tun._offload": lambda: fast.HAVE_C,
    "turbowg.device._route": lambda: route.HAVE_C,
    "turbowg.relay._fastpath": lambda: fastpath.HAVE_C,
    "turbowg.conn._hsscreen": lambda: recvmmsg.HAVE_C,
}


def ci_requires_c(environ=os.environ) -> bool:
    """CI wants the C data path unless this is the pure-Python run."""
    return environ.get("CI", "").strip().lower() not in ("", "0", "false") and not accel.forced_python()


def test_ci_has_the_c_extensions() -> None:
    missing = [name for name, have in EXTENSIONS.items() if not have()]
    if accel.forced_python():
        assert set(missing) == set(EXTENSIONS), "TURBOWG_NO_C is set but a C accelerator is still in use"
        pytest.skip("TURBOWG_NO_C set: this run tests the pure-Python fallback")
    if not ci_requires_c():
        if missing:
            pytest.skip(f"C extensions not built: {', '.join(missing)} (CI would fail here)")
        return
    assert not missing, (f"CI run without the C extensions {', '.join(missing)}: the build failed silently "
                         "(see `pip install -e .` output; needs gcc and libssl-dev), or set TURBOWG_NO_C=1 "
                         "for the pure-Python run")


def test_ci_switch_reads_the_environment() -> None:
    """The gate itself: CI=true/1 requires C, an unset/empty/false CI does not."""
    if accel.forced_python():
        pytest.skip("TURBOWG_NO_C set")
    assert ci_requires_c({"CI": "true"}) and ci_requires_c({"CI": "1"})
    assert not ci_requires_c({}) and not ci_requires_c({"CI": ""}) and not ci_requires_c({"CI": "false"})


def run_gate(env_extra: dict[str, str], block_c: bool) -> subprocess.CompletedProcess:
    """This test file's CI check in a fresh interpreter, with the C extensions made unimportable if asked."""
    code = ""
    if block_c:
        code += ("import sys\n"
                 "class _Block:\n"
                 "    def find_spec(self, name, path=None, target=None):\n"
                 f"        if name in {tuple(EXTENSIONS)!r}:\n"
                 "            raise ImportError('blocked: ' + name)\n"
                 "sys.meta_path.insert(0, _Block())\n")
    code += ("import sys, pytest\n"
             f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', {__file__!r} + '::test_ci_has_the_c_extensions']))\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TURBOWG_NO_C")}
    env.update(env_extra)
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(os.environ.get("TURBOWG_GATE_CHILD") == "1", reason="no recursion")
def test_gate_fails_under_ci_without_c_and_passes_otherwise() -> None:
    """Proof that the check can fail: with the extensions unimportable, CI=true fails, CI unset skips,
    CI=true with TURBOWG_NO_C=1 skips (the fallback run); with them built, CI=true passes."""
    child = {"TURBOWG_GATE_CHILD": "1"}
    failed = run_gate({**child, "CI": "true"}, block_c=True)
    assert failed.returncode == 1 and "CI run without the C extensions" in failed.stdout, failed.stdout
    skipped = run_gate(child, block_c=True)
    assert skipped.returncode == 0 and "1 skipped" in skipped.stdout, skipped.stdout
    fallback = run_gate({**child, "CI": "true", "TURBOWG_NO_C": "1"}, block_c=False)
    assert fallback.returncode == 0 and "1 skipped" in fallback.stdout, fallback.stdout
    if all(have() for have in EXTENSIONS.values()):
        built = run_gate({**child, "CI": "true"}, block_c=False)
        assert built.returncode == 0 and "1 passed" in built.stdout, built.stdout
