"""`turbowg demo` judges its own pings: any loss (also 100%, which contains "0% loss") is a failure."""

from __future__ import annotations

import argparse
import re

import pytest

from turbowg import demo
from turbowg.testing.marks import needs_netns
from turbowg.testing.netns import namespaces


@pytest.mark.parametrize(("text", "loss"), [
    ("5 packets transmitted, 5 received, 0% packet loss, time 801ms", 0.0),
    ("5 packets transmitted, 0 received, 100% packet loss, time 4090ms", 100.0),
    ("5 packets transmitted, 4 received, 20% packet loss, time 812ms", 20.0),
    ("5 packets transmitted, 0 received, +5 errors, 100% packet loss, time 4090ms", 100.0),
    ("ping: connect: Network is unreachable", None),
])
def test_parse_ping_reads_the_loss(text: str, loss: float | None) -> None:
    assert demo.parse_ping(text)[0] == loss


def _own_namespaces(out: str) -> set[str]:
    """The two namespaces the demo says it built (other tests may build and remove theirs meanwhile)."""
    match = re.search(r"\) in (\S+)  <->  .*\) in (\S+)$", out, re.M)
    assert match, out
    return {match.group(1), match.group(2)}


@needs_netns
@pytest.mark.netns
def test_demo_passes_on_a_working_tunnel_and_cleans_up(capsys) -> None:
    assert demo.run_demo(argparse.Namespace(duration=1.0)) == 0
    out = capsys.readouterr().out
    assert out.count(" 0% loss") == 4 and "SHA-256 equal on both ends" in out and "latest handshake" in out
    assert not _own_namespaces(out) & namespaces()


@needs_netns
@pytest.mark.netns
def test_demo_exits_non_zero_when_pings_are_lost(monkeypatch, capsys) -> None:
    """One ping aimed at a tunnel address nobody has: 100% loss, and the demo must fail."""
    real = demo.ping_targets

    def one_lost(tun):
        targets = real(tun)
        label, ns, _ = targets[1]
        return [targets[0], (label, ns, "10.201.0.3"), *targets[2:]]

    monkeypatch.setattr(demo, "ping_targets", one_lost)
    assert demo.run_demo(argparse.Namespace(duration=0.5)) == 1
    captured = capsys.readouterr()
    assert "ping IPv4 b->a: 100% loss" in captured.out and "FAILED" in captured.err
    assert not _own_namespaces(captured.out) & namespaces()
