"""`turbowg doctor`: every section reported, in fresh namespaces with and without a default route,
with tools missing, and against sysfs trees with and without deep C-states."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from turbowg import doctor
from turbowg.testing.marks import needs_netns
from turbowg.testing.netns import ns_run, run

SECTIONS = {"kernel", "tun", "udp", "default-route", "cpu-idle", "accel", "ebpf", "ktls"}


@contextlib.contextmanager
def fresh_namespace(with_default_route: bool) -> Iterator[tuple[str, str]]:
    """A new namespace; with a default route via a veth whose peer stays in the same namespace."""
    tag = uuid.uuid4().hex[:6]
    ns, dev, peer = f"twdoc{tag}", f"dd{tag}", f"de{tag}"
    try:
        run("ip", "netns", "add", ns)
        if with_default_route:
            ns_run(ns, "ip", "link", "add", dev, "type", "veth", "peer", "name", peer)
            ns_run(ns, "ip", "link", "set", dev, "up")
            ns_run(ns, "ip", "link", "set", peer, "up")
            ns_run(ns, "ip", "addr", "add", "10.93.0.1/24", "dev", dev)
            ns_run(ns, "ip", "route", "add", "default", "via", "10.93.0.2")
        yield ns, dev
    finally:
        run("ip", "netns", "del", ns, check=False)


def run_doctor_in(ns: str, *extra: str) -> subprocess.CompletedProcess:
    return ns_run(ns, sys.executable, "-m", "turbowg.doctor", *extra, timeout=60)


def findings_of(result: subprocess.CompletedProcess) -> list[dict]:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout)


@needs_netns
def test_without_default_route_every_section_reported() -> None:
    with fresh_namespace(with_default_route=False) as (ns, _):
        findings = findings_of(run_doctor_in(ns, "--json"))
        text = run_doctor_in(ns).stdout
    assert {f["section"] for f in findings} == SECTIONS
    route = [f for f in findings if f["section"] == "default-route"]
    assert route == [{"section": "default-route", "status": "info",
                      "message": "no default route: nothing to check for subnet routers / exit nodes", "fix": None}]
    # This kernel is >= 6.2 and the test runs as root, so the TUN probe must succeed, and leave nothing.
    tun = {f["message"].split(" (")[0]: f["status"] for f in findings if f["section"] == "tun"}
    assert tun["TUN with IFF_VNET_HDR works"] == "ok"
    # ... and turbowgd's eBPF steering program loads (its own tests: tests/test_ebpf_steering.py)
    assert [f["status"] for f in findings if f["section"] == "ebpf"] == ["ok"]
    for title in doctor.TITLES.values():
        assert f"== {title} ==" in text


@needs_netns
def test_tun_probe_leaves_no_interface_behind() -> None:
    with fresh_namespace(with_default_route=False) as (ns, _):
        before = ns_run(ns, "ip", "-o", "link").stdout
        findings_of(run_doctor_in(ns, "--json"))
        after = ns_run(ns, "ip", "-o", "link").stdout
    assert before == after


@needs_netns
def test_default_route_device_checked_and_fix_command_works() -> None:
    with fresh_namespace(with_default_route=True) as (ns, dev):
        ns_run(ns, "ethtool", "-K", dev, "rx-udp-gro-forwarding", "off", "rx-gro-list", "off")
        before = [f for f in findings_of(run_doctor_in(ns, "--json")) if f["section"] == "default-route"]
        assert len(before) == 1 and before[0]["status"] == "warn" and dev in before[0]["message"]
        fix = before[0]["fix"]
        assert fix == f"ethtool -K {dev} rx-udp-gro-forwarding on rx-gro-list off"
        ns_run(ns, *fix.split())
        after = [f for f in findings_of(run_doctor_in(ns, "--json")) if f["section"] == "default-route"]
    assert len(after) == 1 and after[0]["status"] == "ok" and dev in after[0]["message"]


@needs_netns
def test_missing_tools_say_unknown_without_traceback() -> None:
    with fresh_namespace(with_default_route=True) as (ns, _):
        # `ip netns exec` needs PATH to find env; the doctor inside runs with no usable PATH (no ip, no ethtool).
        result = ns_run(ns, "/usr/bin/env", "PATH=/nonexistent", sys.executable, "-m", "turbowg.doctor", "--json",
                        timeout=60)
    findings = findings_of(result)
    assert {f["section"] for f in findings} == SECTIONS
    route = [f for f in findings if f["section"] == "default-route"]
    assert route[0]["status"] == "unknown" and "not found in PATH" in route[0]["message"]


def test_ethtool_k_parsing() -> None:
    text = "Features for eth0:\nrx-gro-hw: on [fixed]\nrx-gro-list: off\nrx-udp-gro-forwarding: on\nhighdma: on [fixed]\n"
    assert doctor.parse_ethtool_features(text) == {
        "rx-gro-hw": (True, True), "rx-gro-list": (False, False), "rx-udp-gro-forwarding": (True, False),
        "highdma": (True, True)}


def _fake_sysfs(root, driver: str, states: list[tuple[str, int, int]], max_cstate: str | None) -> str:
    idle = root / "devices/system/cpu/cpuidle"
    idle.mkdir(parents=True)
    (idle / "current_driver").write_text(driver + "\n")
    (idle / "current_governor").write_text("menu\n")
    for index, (name, latency, disabled) in enumerate(states):
        state = root / f"devices/system/cpu/cpu0/cpuidle/state{index}"
        state.mkdir(parents=True)
        (state / "name").write_text(name + "\n")
        (state / "latency").write_text(f"{latency}\n")
        (state / "disable").write_text(f"{disabled}\n")
    if max_cstate is not None:
        params = root / "module/intel_idle/parameters"
        params.mkdir(parents=True)
        (params / "max_cstate").write_text(max_cstate + "\n")
    return str(root)


def test_deep_cstates_warned_with_kernel_parameter(tmp_path) -> None:
    sysfs = _fake_sysfs(tmp_path, "intel_idle", [("POLL", 0, 0), ("C1", 2, 0), ("C6", 133, 0), ("C10", 890, 1)], "9")
    findings = doctor.check_cpu_idle(sysfs)
    assert "intel_idle.max_cstate=9" in findings[0].message
    warn = [f for f in findings if f.status == "warn"]
    assert len(warn) == 1
    assert "C6 (133 us)" in warn[0].message and "C10" not in warn[0].message  # disabled states do not count
    assert "intel_idle.max_cstate=1" in warn[0].fix and "/cpuidle/state" in warn[0].fix


def test_shallow_cstates_ok(tmp_path) -> None:
    sysfs = _fake_sysfs(tmp_path, "acpi_idle", [("POLL", 0, 0), ("C1", 1, 0), ("C3", 100, 1)], None)
    statuses = [f.status for f in doctor.check_cpu_idle(sysfs)]
    assert statuses == ["info", "info", "ok"]


def test_no_cpuidle_is_unknown(tmp_path) -> None:
    findings = doctor.check_cpu_idle(str(tmp_path))
    assert [f.status for f in findings] == ["unknown"]


def test_missing_tun_device_gives_fix() -> None:
    findings = doctor.check_tun("/nonexistent/tun")
    assert findings[0].status == "warn" and "modprobe tun" in findings[0].fix


@pytest.mark.parametrize("release,expected", [("6.18.44-fc", (6, 18)), ("5.10.0-21-amd64", (5, 10)), ("weird", (0, 0))])
def test_kernel_version_parsing(release: str, expected: tuple[int, int]) -> None:
    assert doctor.kernel_version_tuple(release) == expected


def test_ktls_reported_as_info(tmp_path) -> None:
    ulp = tmp_path / "tcp_available_ulp"
    ulp.write_text("mptcp\n")
    no_module = str(tmp_path / "no-module")
    [without] = doctor.check_ktls(str(ulp), no_module)
    assert (without.section, without.status) == ("ktls", doctor.INFO) and "no kTLS" in without.message
    assert without.fix and "modprobe tls" in without.fix
    ulp.write_text("mptcp tls\n")
    [with_tls] = doctor.check_ktls(str(ulp), no_module)
    assert with_tls.status == doctor.INFO and "kTLS available" in with_tls.message
    [unknown] = doctor.check_ktls(str(tmp_path / "missing"), no_module)
    assert unknown.status == doctor.INFO and "unknown" in unknown.message
    [module] = doctor.check_ktls(str(tmp_path / "missing"), str(tmp_path))
    assert "kTLS available" in module.message
    # this machine, first namespace: the real file says whether tls is offered; always INFO, never a warning
    [here] = doctor.check_ktls()
    assert here.status == doctor.INFO
    offered = "tls" in open(doctor.TCP_AVAILABLE_ULP).read().split()
    assert ("kTLS available" in here.message) == offered


def test_ebpf_unavailable_is_a_warning_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    from turbowg.conn import ebpf

    def refuse(*_args: object) -> None:
        raise ebpf.BpfUnavailable(1, "bpf(2): Operation not permitted")

    monkeypatch.setattr(ebpf, "KernelSteering", refuse)
    [finding] = doctor.check_ebpf()
    assert finding.status == doctor.WARN and "Operation not permitted" in finding.message
    assert "classic BPF" in finding.message and finding.fix
