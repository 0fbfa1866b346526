"""The GSO split's per-segment payload sums: the vectorised (numpy) path and the pure-Python path agree and
both give valid transport checksums."""

from __future__ import annotations

import pytest
from test_tun_offload import gso_type_of, make_payload, tcp_packet, udp_packet

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
        results.append(bytes(done))
    assert results[0] == results[1]
