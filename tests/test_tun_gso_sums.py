"""The GSO split's per-segment payload sums: the vectorised (numpy) path and the pure-Python path agree and
both give valid transport checksums."""

from __future__ import annotations

import pytest
from test_tun_offload import (
    assert_exact_checksum,
    gso_type_of,
    make_payload,
    tcp_packet,
    udp_packet,
    zero_sum_payload,
)

from turbowg.tun import gso
from turbowg.tun.checksum import transport_checksum_ok


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("udp", [False, True])
@pytest.mark.parametrize("gso_size,total", [(1368, 60000), (1367, 40000), (1000, 1000), (1400, 2801), (2, 127)])
def test_vectorised_and_plain_sums_agree(monkeypatch: pytest.MonkeyPatch, v6: bool, udp: bool, gso_size: int,
                                         total: int) -> None:
    payload = make_payload(total, total)
    monster = udp_packet(v6, payload, partial=True) if udp else tcp_packet(v6, payload, seq=7, flags=0x10,
                                                                            options=b"", partial=True)
    t = 40 if v6 else 20
    results = []
    for numpy_module in (gso._np, None):
        monkeypatch.setattr(gso, "_np", numpy_module)
        segs: list = []
        gso.split(memoryview(monster), gso_type_of(monster), gso_size, t, segs)
        assert all(transport_checksum_ok(s) for s in segs)
        for s in segs:
            assert_exact_checksum(s)
        results.append([bytes(s) for s in segs])
    assert results[0] == results[1]


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("udp", [False, True])
@pytest.mark.parametrize("total", [0, 1, 2, 1391, 1392, 9001])
def test_finish_checksum_vectorised_and_plain_agree(monkeypatch: pytest.MonkeyPatch, v6: bool, udp: bool,
                                                    total: int) -> None:
    payload = make_payload(total, total + 1)
    pkt = udp_packet(v6, payload, partial=True) if udp else tcp_packet(v6, payload, seq=1, flags=0x18,
                                                                       options=b"", partial=True)
    t = 40 if v6 else 20
    offset = 6 if udp else 16
    results = []
    for numpy_module in (gso._np, None):
        monkeypatch.setattr(gso, "_np", numpy_module)
        done = gso.finish_checksum(memoryview(pkt), t, offset)
        assert transport_checksum_ok(done)
        assert_exact_checksum(done)
        results.append(bytes(done))
    assert results[0] == results[1]


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("udp", [False, True])
@pytest.mark.parametrize("vectorised", [True, False])
def test_checksum_computing_to_zero_on_both_paths(monkeypatch: pytest.MonkeyPatch, v6: bool, udp: bool,
                                                  vectorised: bool) -> None:
    """Segments and packets whose checksum computes to 0: UDP sends 0xFFFF, TCP 0x0000, on the numpy path
    and the plain one (the two fold differently: a sum that is a multiple of 0xFFFF must not come out as 0)."""
    if vectorised and gso._np is None:
        pytest.skip("numpy not installed: vectorised path absent")
    if not vectorised:
        monkeypatch.setattr(gso, "_np", None)
    t = 40 if v6 else 20
    at = t + (6 if udp else 16)
    want = 0xFFFF if udp else 0
    size = 1368
    body = zero_sum_payload(v6, udp, size, 11)
    build = udp_packet if udp else tcp_packet
    done = gso.finish_checksum(memoryview(build(v6, body, partial=True)), t, at - t)
    assert int.from_bytes(done[at:at + 2], "big") == want
    # Three equal segments, the middle one zero-sum (TCP: its sequence number moves, so only UDP can put the
    # zero on a later segment with the same payload; for TCP the first segment carries it).
    parts = [make_payload(size, 1), body, make_payload(size, 2)] if udp else [body, make_payload(size, 1),
                                                                               make_payload(size, 2)]
    monster = build(v6, b"".join(parts), partial=True)
    segs: list = []
    gso.split(memoryview(monster), gso_type_of(monster), size, t, segs)
    zero_at = 1 if udp else 0
    assert int.from_bytes(segs[zero_at][at:at + 2], "big") == want
    for s in segs:
        assert_exact_checksum(s)
