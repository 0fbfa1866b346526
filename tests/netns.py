"""Network namespaces for tests: created with unique names, always deleted, even on failure."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest


def run(*args: str, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), check=check, timeout=timeout, capture_output=True, text=True, **kw)


def ns_run(ns: str, *args: str, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    return run("ip", "netns", "exec", ns, *args, check=check, timeout=timeout, **kw)


def can_use_netns() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None and os.path.exists("/dev/net/tun")


needs_netns = pytest.mark.skipif(not can_use_netns(), reason="needs root, iproute2 and /dev/net/tun")


@dataclass
class Pair:
    """Two namespaces joined by a veth pair: a=10.77.0.1/24, fd77::1/64 and b=10.77.0.2/24, fd77::2/64."""

    a: str
    b: str
    a_ip: str = "10.77.0.1"
    b_ip: str = "10.77.0.2"
    a_ip6: str = "fd77::1"
    b_ip6: str = "fd77::2"


@contextlib.contextmanager
def namespace_pair(prefix: str = "twg") -> Iterator[Pair]:
    tag = uuid.uuid4().hex[:6]
    pair = Pair(a=f"{prefix}a{tag}", b=f"{prefix}b{tag}")
    veth_a, veth_b = f"va{tag}", f"vb{tag}"
    try:
        run("ip", "netns", "add", pair.a)
        run("ip", "netns", "add", pair.b)
        run("ip", "link", "add", veth_a, "netns", pair.a, "type", "veth", "peer", "name", veth_b, "netns", pair.b)
        for ns, dev, ip4, ip6 in ((pair.a, veth_a, pair.a_ip, pair.a_ip6), (pair.b, veth_b, pair.b_ip, pair.b_ip6)):
            ns_run(ns, "ip", "link", "set", "lo", "up")
            ns_run(ns, "ip", "addr", "add", f"{ip4}/24", "dev", dev)
            ns_run(ns, "ip", "-6", "addr", "add", f"{ip6}/64", "dev", dev, "nodad")
            ns_run(ns, "ip", "link", "set", dev, "up")
        yield pair
    finally:
        for ns in (pair.a, pair.b):
            # Killing what still runs inside frees the namespace for deletion.
            pids = run("ip", "netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            run("ip", "netns", "del", ns, check=False)
