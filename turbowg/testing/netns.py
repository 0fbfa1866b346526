"""Network namespaces and veth pairs, created with unique names and always deleted, even on failure.

Everything is bounded: every command has a timeout and every wait has a deadline and an attempt limit.
`/var/run/netns` and `/var/run/wireguard` are shared by the whole machine, so names carry a random tag
and tear-down removes only what this process created.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass


class HarnessError(RuntimeError):
    """Something the harness needs failed; the message says what (with a log tail when there is one)."""


def run(*args: str, check: bool = True, timeout: float = 30, input: str | None = None,
        **kw) -> subprocess.CompletedProcess[str]:
    """Run a command, capture text output. A missing command or a timeout is a HarnessError."""
    try:
        result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, input=input, **kw)
    except FileNotFoundError as exc:
        raise HarnessError(f"command not found: {args[0]}") from exc
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"timed out after {timeout} s: {' '.join(args)}") from exc
    if check and result.returncode != 0:
        raise HarnessError(f"`{' '.join(args)}` failed ({result.returncode}): {result.stderr.strip()}")
    return result


def exec_args(ns: str, *args: str) -> list[str]:
    """The argv that runs `args` inside namespace `ns` (for Popen)."""
    return ["ip", "netns", "exec", ns, *args]


def ns_run(ns: str, *args: str, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess[str]:
    return run(*exec_args(ns, *args), check=check, timeout=timeout, **kw)


def can_use_netns() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None and os.path.exists("/dev/net/tun")


def check_prerequisites(need: Sequence[str] = ("ip", "wg")) -> None:
    """Raise HarnessError naming what is missing (root, tools, /dev/net/tun)."""
    if os.geteuid() != 0:
        raise HarnessError("needs root (network namespaces and TUN devices)")
    missing = [tool for tool in need if shutil.which(tool) is None]
    if missing:
        raise HarnessError(
            f"missing tools: {', '.join(missing)} (install: apt-get install -y wireguard-tools iproute2 iperf3)")
    if not os.path.exists("/dev/net/tun"):
        raise HarnessError("/dev/net/tun is missing (fix: modprobe tun)")


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05,
               max_attempts: int = 100_000) -> bool:
    """Poll `condition` until it is true; False after `timeout` seconds or `max_attempts` polls."""
    deadline = time.monotonic() + timeout
    for _ in range(max_attempts):
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return False


def namespaces() -> set[str]:
    """Names of all namespaces on the machine (other users' too)."""
    return {line.split()[0] for line in run("ip", "netns", "list").stdout.splitlines() if line.strip()}


def kill_namespace_processes(ns: str) -> None:
    """SIGKILL whatever still runs in `ns` (it would pin the namespace)."""
    for pid in run("ip", "netns", "pids", ns, check=False, timeout=10).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
            os.kill(int(pid), signal.SIGKILL)


def delete_namespace(ns: str) -> None:
    kill_namespace_processes(ns)
    run("ip", "netns", "del", ns, check=False, timeout=10)


@dataclass
class Pair:
    """Two namespaces joined by one veth pair. Addresses: a = <v4>.1/24, <v6>1/64; b = <v4>.2, <v6>2."""

    a: str
    b: str
    veth_a: str
    veth_b: str
    a_ip: str
    b_ip: str
    a_ip6: str
    b_ip6: str
    tag: str


@contextlib.contextmanager
def namespace_pair(prefix: str = "twg", *, v4: str = "10.77.0", v6: str = "fd77::",
                   tag: str | None = None) -> Iterator[Pair]:
    """Namespaces `<prefix>a<tag>` and `<prefix>b<tag>` joined by veth `va<tag>`/`vb<tag>`, lo up.

    Deleted again on exit, also when the body (or the set-up) raises: processes still running inside
    are killed first so nothing pins them.
    """
    tag = tag or uuid.uuid4().hex[:6]
    pair = Pair(a=f"{prefix}a{tag}", b=f"{prefix}b{tag}", veth_a=f"va{tag}", veth_b=f"vb{tag}",
                a_ip=f"{v4}.1", b_ip=f"{v4}.2", a_ip6=f"{v6}1", b_ip6=f"{v6}2", tag=tag)
    created: list[str] = []
    try:
        for ns in (pair.a, pair.b):
            run("ip", "netns", "add", ns)
            created.append(ns)
        run("ip", "link", "add", pair.veth_a, "netns", pair.a, "type", "veth", "peer", "name", pair.veth_b,
            "netns", pair.b)
        for ns, dev, ip4, ip6 in ((pair.a, pair.veth_a, pair.a_ip, pair.a_ip6),
                                  (pair.b, pair.veth_b, pair.b_ip, pair.b_ip6)):
            run("ip", "-n", ns, "link", "set", "lo", "up")
            run("ip", "-n", ns, "addr", "add", f"{ip4}/24", "dev", dev)
            run("ip", "-n", ns, "-6", "addr", "add", f"{ip6}/64", "dev", dev, "nodad")
            run("ip", "-n", ns, "link", "set", dev, "up")
        yield pair
    finally:
        for ns in created:
            delete_namespace(ns)


CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def entered(ns: str) -> Iterator[None]:
    """Switch the calling thread into namespace `ns` and back; sockets created inside stay bound to it."""
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net", "rb") as home, open(f"/var/run/netns/{ns}", "rb") as target:
        if libc.setns(target.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {ns} failed")
        try:
            yield
        finally:
            if libc.setns(home.fileno(), CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back failed")
