"""`turbowg doctor`: is this host set up for a fast userspace WireGuard data plane?

Checks, each with the exact command that fixes what it finds:
- kernel version;
- TUN with IFF_VNET_HDR and TUNSETOFFLOAD (TSO, and USO4/USO6 from Linux 6.2), probed by opening a TUN
  device without TUNSETPERSIST: it exists only while the probe holds its fd and vanishes on close, so
  the probe leaves the host unchanged;
- UDP GSO (UDP_SEGMENT) and GRO (UDP_GRO) socket options;
- on the default-route interface, the ethtool features rx-udp-gro-forwarding and rx-gro-list, which
  Tailscale recommends as on / off on subnet routers and exit nodes;
- the CPU idle (C-state) configuration: deep C-states add wake-up latency to every packet burst;
- whether turbowgd's eBPF handshake steering loads (per-source flood limit in the kernel);
- whether the kernel offers kTLS (the `tls` TCP ULP), which the relay's TLS could be offloaded to.

Nothing here raises for a missing tool or file: the finding says "unknown" and why.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import platform
import re
import shutil
import socket
import struct
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from turbowg import accel
from turbowg.linux import (
    IFF_NO_PI,
    IFF_TUN,
    IFF_VNET_HDR,
    SOL_UDP,
    TUN_F_CSUM,
    TUN_F_TSO4,
    TUN_F_TSO6,
    TUN_F_USO4,
    TUN_F_USO6,
    TUNSETIFF,
    TUNSETOFFLOAD,
    UDP_GRO,
    UDP_SEGMENT,
)

OK, WARN, UNKNOWN, INFO = "ok", "warn", "unknown", "info"

DEEP_CSTATE_LATENCY_US = 10  # idle states slower than this to wake up are "deep"


@dataclass(frozen=True)
class Finding:
    section: str
    status: str  # ok | warn | unknown | info
    message: str
    fix: str | None = None


def _run(*args: str, timeout: float = 10) -> tuple[int, str, str]:
    """(returncode, stdout, stderr); returncode -1 with the reason in stderr if it could not run."""
    if shutil.which(args[0]) is None:
        return -1, "", f"{args[0]} not found in PATH"
    try:
        result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return -1, "", str(exc)
    return result.returncode, result.stdout, result.stderr


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


# ---------------------------------------------------------------- kernel


def kernel_version_tuple(release: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", release)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def check_kernel() -> list[Finding]:
    release = platform.release()
    version = _read("/proc/version") or f"Linux {release}"
    findings = [Finding("kernel", INFO, version)]
    if kernel_version_tuple(release) < (6, 2):
        findings.append(Finding("kernel", WARN, f"kernel {release} is older than 6.2: no UDP segmentation "
                                "offload (USO) on TUN, so UDP through the tunnel is not batched",
                                "upgrade to Linux 6.2 or later (e.g. apt-get install -t bookworm-backports linux-image-amd64)"))
    else:
        findings.append(Finding("kernel", OK, f"kernel {release} >= 6.2 (TUN USO available in principle)"))
    return findings


# ---------------------------------------------------------------- TUN


def _try_offload(fd: int, flags: int) -> int:
    """0 if TUNSETOFFLOAD accepted `flags`, else the errno."""
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
    except OSError as exc:
        return exc.errno or errno.EINVAL
    return 0


def check_tun(device: str = "/dev/net/tun") -> list[Finding]:
    section = "tun"
    note = "(probe: a non-persistent TUN that vanishes when its fd closes; nothing is left behind)"
    if not os.path.exists(device):
        return [Finding(section, WARN, f"{device} does not exist: no TUN support",
                        "modprobe tun  # or: mkdir -p /dev/net && mknod /dev/net/tun c 10 200 && chmod 0666 /dev/net/tun")]
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        fix = "run as root or grant CAP_NET_ADMIN (e.g. setcap cap_net_admin+ep on the daemon)" \
            if exc.errno in (errno.EPERM, errno.EACCES) else "modprobe tun"
        return [Finding(section, UNKNOWN, f"cannot open {device}: {exc.strerror}", fix)]
    try:
        ifreq = struct.pack("16sH22x", b"", IFF_TUN | IFF_NO_PI | IFF_VNET_HDR)
        try:
            fcntl.ioctl(fd, TUNSETIFF, ifreq)
        except OSError as exc:
            if exc.errno in (errno.EPERM, errno.EACCES):
                return [Finding(section, UNKNOWN, f"cannot create a TUN device: {exc.strerror} (needs CAP_NET_ADMIN)",
                                "run `turbowg doctor` as root")]
            return [Finding(section, WARN, f"TUN with IFF_VNET_HDR refused: {exc.strerror}",
                            "upgrade the kernel; meanwhile run turbowgd with TURBOWG_OFFLOADS=0")]
        findings = [Finding(section, OK, f"TUN with IFF_VNET_HDR works {note}")]
        tcp = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
        err = _try_offload(fd, tcp)
        if err:
            findings.append(Finding(section, WARN, f"TUNSETOFFLOAD TSO4/TSO6 refused: {os.strerror(err)}",
                                    "upgrade the kernel; meanwhile run turbowgd with TURBOWG_OFFLOADS=0"))
            return findings
        findings.append(Finding(section, OK, "TUNSETOFFLOAD CSUM+TSO4+TSO6 (TCP segmentation offload) usable"))
        err = _try_offload(fd, tcp | TUN_F_USO4 | TUN_F_USO6)
        if err:
            findings.append(Finding(section, WARN, f"TUNSETOFFLOAD USO4/USO6 refused ({os.strerror(err)}): "
                                    "UDP through the tunnel is not batched",
                                    "upgrade to Linux 6.2 or later"))
        else:
            findings.append(Finding(section, OK, "TUNSETOFFLOAD USO4+USO6 (UDP segmentation offload) usable"))
        return findings
    finally:
        os.close(fd)


# ---------------------------------------------------------------- UDP sockets


def check_udp() -> list[Finding]:
    findings: list[Finding] = []
    for family, label in ((socket.AF_INET, "IPv4"), (socket.AF_INET6, "IPv6")):
        try:
            sock = socket.socket(family, socket.SOCK_DGRAM)
        except OSError as exc:
            findings.append(Finding("udp", UNKNOWN, f"{label}: cannot create a UDP socket: {exc.strerror}"))
            continue
        with sock:
            for option, value, name, what in ((UDP_SEGMENT, 1400, "UDP_SEGMENT", "GSO (batched sends)"),
                                              (UDP_GRO, 1, "UDP_GRO", "GRO (batched receives)")):
                try:
                    sock.setsockopt(SOL_UDP, option, value)
                    readback = sock.getsockopt(SOL_UDP, option)
                except OSError as exc:
                    findings.append(Finding("udp", WARN, f"{label}: {name} refused ({exc.strerror}): no UDP {what}",
                                            "upgrade to Linux 5.0 or later (UDP_GRO), 4.18 or later (UDP_SEGMENT)"))
                    continue
                if readback != value:
                    findings.append(Finding("udp", WARN, f"{label}: {name} set to {value} but reads back {readback}"))
                else:
                    findings.append(Finding("udp", OK, f"{label}: {name} usable: UDP {what}"))
    return findings


# ---------------------------------------------------------------- default-route interface


def default_route_devices() -> tuple[list[str], str | None]:
    """Devices of the IPv4/IPv6 default routes, or ([], reason) when unknown."""
    devices: list[str] = []
    for family in ("-4", "-6"):
        code, out, err = _run("ip", family, "route", "show", "default")
        if code != 0:
            return [], f"`ip {family} route show default` failed: {err.strip() or code}"
        for match in re.finditer(r"\bdev\s+(\S+)", out):
            if match.group(1) not in devices:
                devices.append(match.group(1))
    return devices, None


def parse_ethtool_features(text: str) -> dict[str, tuple[bool, bool]]:
    """feature -> (on, fixed) from `ethtool -k` output."""
    features: dict[str, tuple[bool, bool]] = {}
    for line in text.splitlines():
        match = re.match(r"\s*([\w-]+):\s+(on|off)(\s+\[fixed\])?", line)
        if match:
            features[match.group(1)] = (match.group(2) == "on", bool(match.group(3)))
    return features


def check_default_route() -> list[Finding]:
    section = "default-route"
    devices, reason = default_route_devices()
    if reason:
        return [Finding(section, UNKNOWN, f"default-route interface unknown: {reason}",
                        "apt-get install -y iproute2")]
    if not devices:
        return [Finding(section, INFO, "no default route: nothing to check for subnet routers / exit nodes")]
    findings: list[Finding] = []
    for dev in devices:
        code, out, err = _run("ethtool", "-k", dev)
        if code != 0:
            fix = "apt-get install -y ethtool" if code == -1 else None
            findings.append(Finding(section, UNKNOWN, f"{dev}: ethtool -k failed: {err.strip() or code}", fix))
            continue
        features = parse_ethtool_features(out)
        fix = f"ethtool -K {dev} rx-udp-gro-forwarding on rx-gro-list off"
        forwarding, gro_list = features.get("rx-udp-gro-forwarding"), features.get("rx-gro-list")
        if forwarding is None or gro_list is None:
            missing = [n for n, v in (("rx-udp-gro-forwarding", forwarding), ("rx-gro-list", gro_list)) if v is None]
            findings.append(Finding(section, UNKNOWN, f"{dev}: ethtool does not report {', '.join(missing)} "
                                    "(kernel or driver too old?)"))
            continue
        if forwarding[0] and not gro_list[0]:
            findings.append(Finding(section, OK, f"{dev}: rx-udp-gro-forwarding on, rx-gro-list off "
                                    "(good for a subnet router or exit node)"))
            continue
        state = f"rx-udp-gro-forwarding {'on' if forwarding[0] else 'off'}, rx-gro-list {'on' if gro_list[0] else 'off'}"
        fixed = [n for n, v in (("rx-udp-gro-forwarding", forwarding), ("rx-gro-list", gro_list)) if v[1]]
        if fixed:
            findings.append(Finding(section, WARN, f"{dev}: {state}; {', '.join(fixed)} [fixed] by the driver, "
                                    "cannot be changed on this interface"))
        else:
            findings.append(Finding(section, WARN, f"{dev}: {state}; for a subnet router or exit node turn UDP GRO "
                                    "forwarding on and GRO list off, as Tailscale recommends (not persistent: "
                                    "add it to a networkd-dispatcher/ifupdown hook)", fix))
    return findings


# ---------------------------------------------------------------- CPU idle


def check_cpu_idle(sysfs: str = "/sys") -> list[Finding]:
    section = "cpu-idle"
    findings: list[Finding] = []
    max_cstate = _read(f"{sysfs}/module/intel_idle/parameters/max_cstate")
    driver = _read(f"{sysfs}/devices/system/cpu/cpuidle/current_driver")
    governor = _read(f"{sysfs}/devices/system/cpu/cpuidle/current_governor") or \
        _read(f"{sysfs}/devices/system/cpu/cpuidle/current_governor_ro")
    if driver is None:
        return [Finding(section, UNKNOWN, f"no cpuidle information ({sysfs}/devices/system/cpu/cpuidle missing): "
                        "C-state limits unknown")]
    findings.append(Finding(section, INFO, f"cpuidle driver {driver}, governor {governor or 'unknown'}"
                            + (f", intel_idle.max_cstate={max_cstate}" if max_cstate is not None else "")))
    state_dir = f"{sysfs}/devices/system/cpu/cpu0/cpuidle"
    try:
        names = sorted((n for n in os.listdir(state_dir) if n.startswith("state")), key=lambda n: int(n[5:] or 0))
    except (OSError, ValueError):
        findings.append(Finding(section, UNKNOWN, f"cannot list {state_dir}: idle states unknown"))
        return findings
    deep: list[str] = []
    described: list[str] = []
    for name in names:
        label = _read(f"{state_dir}/{name}/name") or name
        latency = _read(f"{state_dir}/{name}/latency")
        disabled = _read(f"{state_dir}/{name}/disable") == "1"
        described.append(f"{label} ({latency or '?'} us{', disabled' if disabled else ''})")
        if not disabled and latency is not None and latency.isdigit() and int(latency) > DEEP_CSTATE_LATENCY_US:
            deep.append(f"{label} ({latency} us)")
    findings.append(Finding(section, INFO, "idle states: " + (", ".join(described) or "none")))
    if deep:
        if driver == "intel_idle":
            param = "intel_idle.max_cstate=1"
        elif driver.startswith("acpi"):
            param = "processor.max_cstate=1"
        else:
            param = "intel_idle.max_cstate=1 processor.max_cstate=1"
        findings.append(Finding(
            section, WARN,
            f"deep idle states enabled: {', '.join(deep)}; waking from them adds latency to every packet burst",
            f"now: for s in /sys/devices/system/cpu/cpu*/cpuidle/state*; do [ \"$(cat $s/latency)\" -gt "
            f"{DEEP_CSTATE_LATENCY_US} ] && echo 1 > $s/disable; done  # persistent: add kernel parameter "
            f"'{param}' to GRUB_CMDLINE_LINUX in /etc/default/grub, then update-grub and reboot"))
    else:
        findings.append(Finding(section, OK, f"no enabled idle state wakes slower than {DEEP_CSTATE_LATENCY_US} us"))
    return findings


def check_accelerators() -> list[Finding]:
    """Whether the C data path (batched AEAD, GSO split / GRO coalesce, the relay's forwarding plane) is built;
    without it turbowg runs the same protocol in pure Python, several times slower."""
    from turbowg.conn import recvmmsg
    from turbowg.device import route
    from turbowg.noise import transport
    from turbowg.relay import fastpath
    from turbowg.tun import fast

    fix = ("apt-get install -y gcc libssl-dev && python3 -m pip install --force-reinstall --no-deps -e . "
           "(in the turbowg checkout)")
    findings = []
    for label, have in (("batched ChaCha20-Poly1305 (turbowg.noise._aead)", transport.HAVE_C),
                        ("GSO split / GRO coalesce (turbowg.tun._offload)", fast.HAVE_C),
                        ("inner-packet checks (turbowg.device._route)", route.HAVE_C),
                        ("the DERP relay's forwarding plane (turbowg.relay._fastpath)", fastpath.HAVE_C),
                        ("handshake screening under a flood (turbowg.conn._hsscreen)", recvmmsg.HAVE_C)):
        if have:
            findings.append(Finding("accel", OK, f"C accelerator for {label} in use"))
        elif accel.forced_python():
            findings.append(Finding("accel", INFO, f"C accelerator for {label} switched off by TURBOWG_NO_C",
                                    "unset TURBOWG_NO_C"))
        else:
            findings.append(Finding("accel", WARN, f"C accelerator for {label} not built: pure-Python fallback",
                                    fix))
    return findings


# ---------------------------------------------------------------- kTLS

TCP_AVAILABLE_ULP = "/proc/sys/net/ipv4/tcp_available_ulp"


def check_ktls(ulp_path: str = TCP_AVAILABLE_ULP, module_dir: str = "/sys/module/tls") -> list[Finding]:
    """kTLS is informational: `turbowg relay` serves TLS in user space either way (OpenSSL called from its C
    forwarding plane); it says whether a kernel TLS path would be there to use (docs/DESIGN.md: what it needs)."""
    ulps = _read(ulp_path)
    if ulps is None:  # the sysctl is only shown in the first network namespace
        if os.path.isdir(module_dir):
            return [Finding("ktls", INFO, "kTLS available (tls module loaded)")]
        return [Finding("ktls", INFO, f"kTLS unknown: {ulp_path} not readable here and no tls module loaded",
                        "modprobe tls")]
    if "tls" in ulps.split():
        return [Finding("ktls", INFO, f"kTLS available (tcp_available_ulp: {ulps})")]
    return [Finding("ktls", INFO, f"no kTLS: tcp_available_ulp lists {ulps or 'nothing'}, not tls "
                    "(turbowg relay does TLS in user space)", "modprobe tls (kernel built with CONFIG_TLS)")]


# ---------------------------------------------------------------- eBPF handshake steering


def check_ebpf() -> list[Finding]:
    """Whether turbowgd can load its eBPF SK_REUSEPORT program (turbowg/conn/ebpf.py), tried for real on a
    loopback socket trio: with it, a handshake flood over the per-source limit is dropped in the kernel;
    without it the classic BPF program steers and the worker reads and screens every flood datagram."""
    from turbowg.conn.ebpf import BpfUnavailable, KernelSteering

    socks: list[socket.socket] = []
    try:
        for _ in range(3):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind(("0.0.0.0", socks[0].getsockname()[1] if len(socks) > 1 else 0))  # lo may be down (netns)
        steering = KernelSteering(socks[0], socks[1], socks[2])
        steering.close()
    except BpfUnavailable as exc:
        return [Finding("ebpf", WARN, f"eBPF handshake steering unavailable ({exc.strerror or exc}): classic BPF "
                        "steering, flood datagrams are read and screened in user space",
                        "run as root on Linux >= 5.8 (bpf(2), SK_REUSEPORT programs)")]
    except OSError as exc:
        return [Finding("ebpf", WARN, f"eBPF handshake steering not tried: {exc.strerror or exc}")]
    finally:
        for s in socks:
            s.close()
    return [Finding("ebpf", OK, "eBPF handshake steering loads: floods over the per-source limit are dropped "
                    "in the kernel under load")]


# ---------------------------------------------------------------- report

CHECKS = (("kernel", check_kernel), ("tun", check_tun), ("udp", check_udp),
          ("default-route", check_default_route), ("cpu-idle", check_cpu_idle), ("accel", check_accelerators),
          ("ebpf", check_ebpf), ("ktls", check_ktls))
TITLES = {"kernel": "Kernel", "tun": "TUN offloads", "udp": "UDP GSO/GRO",
          "default-route": "Default-route interface (subnet router / exit node)", "cpu-idle": "CPU idle states",
          "accel": "Data path accelerators",
          "ebpf": "Handshake flood defence (eBPF)", "ktls": "Kernel TLS (kTLS) for the relay"}


def collect() -> list[Finding]:
    findings: list[Finding] = []
    for section, check in CHECKS:
        try:
            findings.extend(check())
        except Exception as exc:  # a doctor never crashes: an unexpected failure is itself a finding
            findings.append(Finding(section, UNKNOWN, f"check failed unexpectedly: {type(exc).__name__}: {exc}"))
    return findings


def render(findings: Sequence[Finding]) -> str:
    lines: list[str] = []
    for section, _ in CHECKS:
        lines.append(f"== {TITLES[section]} ==")
        for finding in (f for f in findings if f.section == section):
            lines.append(f"  [{finding.status}] {finding.message}")
            if finding.fix:
                lines.append(f"      fix: {finding.fix}")
    warnings = sum(1 for f in findings if f.status == WARN)
    lines.append(f"{warnings} warning(s)" if warnings else "no warnings")
    return "\n".join(lines)


def command(args: argparse.Namespace) -> int:
    findings = collect()
    if getattr(args, "json", False):
        print(json.dumps([asdict(f) for f in findings], indent=2))
    else:
        print(render(findings))
    return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("doctor", help="check kernel, TUN/UDP offloads, NIC features and C-states",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="machine-readable findings")
    parser.set_defaults(func=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="turbowg")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["doctor", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
