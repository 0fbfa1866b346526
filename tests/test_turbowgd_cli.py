"""`turbowgd`'s command line: --help/--version print and exit, bad interface names are refused before
anything is created, and the wireguard-go contract (`turbowgd IFNAME`, `-f`/`--foreground`) still works."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from turbowg.testing.daemon import SOCKET_DIR, turbowgd_command
from turbowg.testing.netns import delete_namespace, ns_run, run, wait_until

needs_netns = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or not os.path.exists("/dev/net/tun"),
    reason="needs root, iproute2 and /dev/net/tun")


@contextlib.contextmanager
def namespace() -> Iterator[str]:
    ns = f"twgcli{uuid.uuid4().hex[:6]}"
    run("ip", "netns", "add", ns)
    try:
        yield ns
    finally:
        delete_namespace(ns)


def links(ns: str) -> set[str]:
    out = ns_run(ns, "ip", "-o", "link", "show").stdout
    return {line.split(":", 2)[1].strip().split("@")[0] for line in out.splitlines() if line.strip()}


def turbowgd(ns: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.pop("LOG_LEVEL", None)  # with LOG_LEVEL set, the daemon would keep our pipes open
    full_env.pop("WG_PROCESS_FOREGROUND", None)
    full_env.update(env or {})
    return subprocess.run(["ip", "netns", "exec", ns, *turbowgd_command(), *args], env=full_env,
                          capture_output=True, text=True, timeout=30)


def remaining_processes(ns: str) -> list[str]:
    time.sleep(0.3)  # a daemon that forked would be up by now
    return run("ip", "netns", "pids", ns, check=False).stdout.split()


@needs_netns
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_usage_and_creates_nothing(flag: str) -> None:
    with namespace() as ns:
        try:
            proc = turbowgd(ns, flag)
            assert proc.returncode == 0, proc.stderr
            assert "usage" in proc.stdout.lower() and "INTERFACE" in proc.stdout.upper()
            assert links(ns) == {"lo"}
            assert not os.path.lexists(f"{SOCKET_DIR}/{flag}.sock")
            assert remaining_processes(ns) == []
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{SOCKET_DIR}/{flag}.sock")


@needs_netns
@pytest.mark.parametrize("flag", ["--version", "-v"])
def test_version_prints_and_exits(flag: str) -> None:
    with namespace() as ns:
        proc = turbowgd(ns, flag)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("turbowgd v")
        assert links(ns) == {"lo"}
        assert remaining_processes(ns) == []


BAD_NAMES = [
    ("-x", "starts with '-'"),
    ("--foo", None),
    ("x" * 16, "15 bytes"),
    ("é" * 8, "15 bytes"),  # 8 characters, 16 bytes
    ("a/b", "'/'"),
    ("a b", "whitespace"),
    ("a\tb", "whitespace"),
    ("a:b", "':'"),
    ("wg%d", "'%'"),
    (".", "'.'"),
    ("..", "'..'"),
    ("", "empty"),
]


@needs_netns
@pytest.mark.parametrize("name, reason", BAD_NAMES)
def test_bad_interface_names_are_refused_before_anything_is_created(name: str, reason: str | None) -> None:
    with namespace() as ns:
        try:
            # "--" so a name starting with '-' reaches the name check, and once without it.
            for args in (["--", name], [name]):
                proc = turbowgd(ns, *args)
                assert proc.returncode in (1, 2), (args, proc.stdout, proc.stderr)
                assert proc.stderr.strip(), args
                if reason is not None and args[0] == "--":
                    assert reason in proc.stderr, proc.stderr
                assert links(ns) == {"lo"}
                assert not os.path.lexists(os.path.join(SOCKET_DIR, f"{name}.sock"))
            assert remaining_processes(ns) == []
        finally:
            if "/" not in name:  # a daemon the unfixed turbowgd left behind (killed with the namespace)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(SOCKET_DIR, f"{name}.sock"))


@needs_netns
def test_usage_errors_exit_2() -> None:
    with namespace() as ns:
        for args in ([], ["a", "b"], ["--no-such-flag", "wgx"]):
            proc = turbowgd(ns, *args)
            assert proc.returncode == 2, (args, proc.stderr)
            assert "usage" in proc.stderr.lower()
        assert links(ns) == {"lo"}
        assert remaining_processes(ns) == []


@needs_netns
@pytest.mark.parametrize("how", ["daemon", "-f", "--foreground", "WG_PROCESS_FOREGROUND"])
def test_valid_name_still_starts(how: str) -> None:
    ifname = f"twc{uuid.uuid4().hex[:6]}"
    sock = f"{SOCKET_DIR}/{ifname}.sock"
    with namespace() as ns:
        try:
            if how == "daemon":
                proc = turbowgd(ns, ifname)
                assert proc.returncode == 0, proc.stderr
            else:
                env = dict(os.environ)
                env.pop("LOG_LEVEL", None)
                args = [ifname] if how == "WG_PROCESS_FOREGROUND" else [how, ifname]
                if how == "WG_PROCESS_FOREGROUND":
                    env["WG_PROCESS_FOREGROUND"] = "1"
                fg = subprocess.Popen(["ip", "netns", "exec", ns, *turbowgd_command(), *args], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                assert wait_until(lambda: os.path.exists(sock), 10), "no UAPI socket"
                assert fg.poll() is None, "a foreground daemon must not return"
            assert wait_until(lambda: os.path.exists(sock), 10), "no UAPI socket"
            assert ifname in links(ns)
            assert ns_run(ns, "wg", "show", ifname).returncode == 0
            ns_run(ns, "ip", "link", "del", ifname)
            assert wait_until(lambda: not os.path.exists(sock), 10), "daemon did not remove its socket"
            if how != "daemon":
                fg.wait(timeout=10)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sock)
