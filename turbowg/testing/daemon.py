"""One WireGuard daemon (turbowgd, wireguard-go or any binary with the same command line) in a namespace,
and raw UAPI text to it.

An `Implementation` is a command that takes the interface name last, as `wireguard-go IFNAME` does. A
`Daemon` runs one in the foreground (`WG_PROCESS_FOREGROUND=1`) as a process we started, so its pid is
known and tear-down can always stop it. `turbowgd_in_namespace()` is the whole life of one turbowgd in a
namespace of its own, for tests that talk to it with `wg` or `Daemon.uapi`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from turbowg.testing.netns import HarnessError, delete_namespace, exec_args, ns_run, run

UAPI_DIR = "/var/run/wireguard"
SOCKET_DIR = UAPI_DIR


# ---------------------------------------------------------------- implementations


@dataclass(frozen=True)
class Implementation:
    """A userspace WireGuard implementation: a command that takes the interface name last.

    `version` is what the binary says about itself (`wireguard-go 0.0.20220316`), for reports."""

    name: str
    command: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    version: str = ""

    @property
    def label(self) -> str:
        """The name, with the version when it adds something: `wireguard-go (0.0.20220316)`."""
        if not self.version or self.version in self.name:
            return self.name
        return f"{self.name} ({self.version.split()[-1]})"


def turbowgd_command() -> tuple[str, ...]:
    found = shutil.which("turbowgd")
    if found:
        return (found,)
    beside_python = os.path.join(os.path.dirname(sys.executable), "turbowgd")
    if os.access(beside_python, os.X_OK):
        return (beside_python,)
    return (sys.executable, "-m", "turbowg.turbowgd")


def impl_command(impl: str) -> list[str]:
    """The command line of a known implementation by name (for tests that start daemons by hand)."""
    return list(known_implementations(with_versions=False)[impl].command)


_VERSION = re.compile(r"v?(\d+(?:\.\d+)+\S*)")


def binary_version(command: Sequence[str], timeout: float = 10) -> str:
    """`<program> <version>` from `<command> --version` (`wireguard-go 0.0.20220316`), or "" if it says none."""
    try:
        proc = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    for line in (proc.stdout + "\n" + proc.stderr).splitlines():
        words = line.split()
        for index, word in enumerate(words):
            match = _VERSION.fullmatch(word)
            if match:
                program = words[index - 1] if index else os.path.basename(command[-1])
                return f"{program} {match.group(1)}"
    return ""


def known_implementations(with_versions: bool = True) -> dict[str, Implementation]:
    turbowgd = turbowgd_command()
    turbo_version = binary_version(turbowgd) if with_versions else ""
    wggo_version = binary_version(("wireguard-go",)) if with_versions and shutil.which("wireguard-go") else ""
    return {
        "turbowg": Implementation("turbowg", turbowgd, {}, turbo_version),
        "turbowg-nooffload": Implementation("turbowg-nooffload", turbowgd, {"TURBOWG_OFFLOADS": "0"}, turbo_version),
        # Offloads on, C accelerators off: the pure-Python fallback of the same data path.
        "turbowg-python": Implementation("turbowg-python", turbowgd, {"TURBOWG_NO_C": "1"}, turbo_version),
        "wireguard-go": Implementation("wireguard-go", ("wireguard-go",), {}, wggo_version),
    }


def implementation_from_binary(path: str) -> Implementation:
    """Any wireguard-go compatible binary; named `<basename> <version>` (plus the path if it says no version)."""
    resolved = shutil.which(path) or path
    if not (os.path.isfile(resolved) and os.access(resolved, os.X_OK)):
        raise HarnessError(f"not an executable file: {path}")
    resolved = os.path.abspath(resolved)
    version = binary_version((resolved,))
    name = version or f"{os.path.basename(resolved)} ({resolved})"
    return Implementation(name, (resolved,), {}, version)


def resolve_implementation(impl: str | Implementation) -> Implementation:
    if isinstance(impl, Implementation):
        return impl
    known = known_implementations(with_versions=False)
    if impl in known:
        return known[impl]
    if os.sep in impl:
        return implementation_from_binary(impl)
    raise HarnessError(f"unknown implementation {impl!r}; choose from {', '.join(known)} or give a path")


# ---------------------------------------------------------------- one daemon


def log_tail(path: str, limit: int = 1500) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()[-limit:].strip()
    except OSError:
        return ""


class Daemon:
    """One implementation running on interface `ifname` in namespace `ns`, in the foreground."""

    def __init__(self, impl: Implementation, ns: str, ifname: str, workdir: str,
                 env: Mapping[str, str] | None = None) -> None:
        self.impl, self.ns, self.ifname, self.workdir = impl, ns, ifname, workdir
        self.extra_env = dict(env or {})
        self.socket = os.path.join(UAPI_DIR, f"{ifname}.sock")
        self.log_path = os.path.join(workdir, f"{ifname}.log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 15.0) -> None:
        """Start and wait (bounded) until the interface and the UAPI socket exist."""
        if os.path.exists(self.socket):
            raise HarnessError(f"UAPI socket {self.socket} already exists; refusing to reuse {self.ifname}")
        env = dict(os.environ)
        env.setdefault("LOG_LEVEL", "error")
        env["WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD"] = "1"
        env.update(self.impl.env)
        env.update(self.extra_env)
        env["WG_PROCESS_FOREGROUND"] = "1"  # keep the pid: the daemon is the process we started
        with open(self.log_path, "wb") as log:
            try:
                self.proc = subprocess.Popen(exec_args(self.ns, *self.impl.command, self.ifname), env=env,
                                             stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True)
            except OSError as exc:
                raise HarnessError(f"cannot start {self.impl.name}: {exc}") from exc
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.05) + 10):
            if self.proc.poll() is not None:
                raise HarnessError(f"{self.impl.name} exited with {self.proc.returncode} before it was ready:\n"
                                   f"{log_tail(self.log_path)}")
            if os.path.exists(self.socket) and self.link_exists():
                return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        raise HarnessError(f"{self.impl.name} did not create {self.ifname} and {self.socket} within {timeout} s:\n"
                           f"{log_tail(self.log_path)}")

    def link_exists(self) -> bool:
        return run("ip", "-n", self.ns, "link", "show", self.ifname, check=False, timeout=10).returncode == 0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return log_tail(self.log_path)

    def stop(self, timeout: float = 3.0) -> None:
        """SIGTERM (then SIGKILL) the daemon's process group, delete the interface, remove the socket."""
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=timeout)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=2.0)
        run("ip", "-n", self.ns, "link", "del", self.ifname, check=False, timeout=10)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)


    def uapi(self, text: str) -> bytes:
        return uapi_request(self.socket, text)

    def wg(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return ns_run(self.ns, "wg", *args, check=check)


def uapi_request(path: str, text: str, timeout: float = 10) -> bytes:
    """Send raw UAPI text (`set=1\n...\n\n` or `get=1\n\n`) to the socket at `path`; the whole answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(text.encode())
        answer = b""
        while not answer.endswith(b"\n\n"):
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
        return answer


@contextlib.contextmanager
def turbowgd_in_namespace(prefix: str = "twgd", env: Mapping[str, str] | None = None,
                          timeout: float = 15.0) -> Iterator[Daemon]:
    """A fresh namespace `<prefix><tag>` with one turbowgd on interface `<prefix[:3]><tag>` in it.

    On exit the daemon must still be running (unless the body raised); then it is stopped, its socket
    removed and the namespace deleted, also when the body or the set-up raises.
    """
    tag = uuid.uuid4().hex[:6]
    ns = f"{prefix}{tag}"
    impl = Implementation("turbowg", turbowgd_command(), {})
    workdir = tempfile.mkdtemp(prefix=f"turbowg-{prefix}-")
    run("ip", "netns", "add", ns)
    daemon = Daemon(impl, ns, f"{prefix[:3]}{tag}", workdir, env)
    try:
        daemon.start(timeout)
        yield daemon
        assert daemon.alive(), f"turbowgd died:\n{daemon.log()}"
    finally:
        daemon.stop()
        delete_namespace(ns)
        shutil.rmtree(workdir, ignore_errors=True)
