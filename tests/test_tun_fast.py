"""turbowg.tun.fast: the C offload module (_offload) against the pure-Python fallback, byte for byte.

The C-vs-Python comparisons are skipped when the extension is not built; the Python fallback tests always
run. `python tests/test_tun_fast.py` prints a micro-benchmark instead of testing.
"""

from __future__ import annotations

import array
import os
import struct
import subprocess
import sys
import timeit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_tun_offload import (
    ACK,
    CWR,
    FIN,
    PSH,
    TCP,
    UDP,
    V4_DST,
    V4_SRC,
    addr_of,
    assert_exact_checksum,
    gso_type_of,
    make_payload,
    tcp_packet,
    udp_packet,
    zero_sum_payload,
)

from turbowg.tun import fast, vnet
from turbowg.tun.checksum import checksum, fold, ipv4_header_ok, pseudo_header_sum, transport_checksum_ok
from turbowg.tun.gro import coalesce as gro_coalesce
from turbowg.tun.gro import frame_iov
from turbowg.tun.gso import finish_checksum, split

try:
    from turbowg.tun import _offload
except ImportError:  # pragma: no cover - depends on the build
    _offload = None

needs_c = pytest.mark.skipif(
    _offload is None,
    reason="turbowg.tun._offload is not built (python setup.py build_ext --inplace); C-vs-Python skipped")

ECE, URG = 0x40, 0x20
FILL = 0xA5  # untouched dst bytes must stay this value in both implementations
def slow(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

IMPLS = [pytest.param(fast.ingest_py, id="py"),
         pytest.param(_offload.ingest if _offload else None, id="c", marks=needs_c)]
COALESCERS = [pytest.param(fast.coalesce_py, id="py"),
              pytest.param(_offload.coalesce if _offload else None, id="c", marks=needs_c)]


# ---------------------------------------------------------------------------------------------------------
# helpers


def frame_of(pkt: bytes | bytearray, *, flags: int = 0, gso_type: int = vnet.GSO_NONE, gso_size: int = 0,
             csum_start: int = 0, csum_offset: int = 0, hdr_len: int = 0) -> bytes:
    return vnet.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) + bytes(pkt)


def monster_frame(pkt: bytes | bytearray, gso_size: int, *, csum_start: int | None = None,
                  ecn: bool = False) -> bytes:
    t = 20 if pkt[0] >> 4 == 4 else 40
    gso_type = gso_type_of(pkt) | (vnet.GSO_ECN if ecn else 0)
    off = 6 if gso_type & 0x7F == vnet.GSO_UDP_L4 else 16
    return frame_of(pkt, flags=vnet.NEEDS_CSUM, gso_type=gso_type, gso_size=gso_size,
                    csum_start=t if csum_start is None else csum_start, csum_offset=off)


def run_ingest(fn, frame: bytes, frame_len: int | None = None, *, dst_size: int = 140_000, dst_off: int = 0,
               slots: int = 300, idx: int = 0):
    """(result, dst bytes, layout list) or the exception name: comparable across implementations."""
    dst = bytearray([FILL]) * dst_size
    layout = array.array("i", [-7] * (2 * slots))
    try:
        res = fn(frame, len(frame) if frame_len is None else frame_len, dst, dst_off, layout, idx)
    except ValueError:
        return ("ValueError",)
    except BufferError:
        return ("BufferError",)
    return res, bytes(dst), layout.tolist()


def packets_out(run, idx: int = 0) -> list[bytes]:
    (count, _end), dst, layout = run
    spans = [(layout[2 * (idx + k)], layout[2 * (idx + k) + 1]) for k in range(count)]
    return [dst[off:off + n] for off, n in spans]


def pack_batch(packets: list) -> tuple[bytearray, array.array]:
    src = bytearray()
    layout = array.array("i")
    for p in packets:
        src += b"\x5a" * 3  # gaps between packets: offsets are honoured, not assumed contiguous
        layout.extend((len(src), len(p)))
        src += p
    return src, layout


def run_coalesce(fn, packets: list, tcp: bool = True, udp: bool = True):
    src, layout = pack_batch(packets)
    dst = bytearray([FILL]) * (sum(len(p) for p in packets) + 10 * len(packets))
    frames = array.array("i", [-7] * (2 * len(packets)))
    n = fn(src, layout, len(packets), dst, frames, tcp, udp)
    return n, bytes(dst), frames.tolist()


def frames_out(run) -> list[bytes]:
    n, dst, frames = run
    return [dst[frames[2 * j]:frames[2 * j] + frames[2 * j + 1]] for j in range(n)]


def python_frames(packets: list, tcp: bool = True, udp: bool = True) -> list[bytes]:
    return [b"".join(bytes(b) for b in frame_iov(g)) for g in gro_coalesce(packets, tcp=tcp, udp=udp)]


def ipv4_with_options(proto: int, l4: bytes | bytearray, ip_id: int = 1) -> bytearray:
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x46, 0, 24 + len(l4), ip_id, 0x4000, 64, proto, 0,
                                V4_SRC, V4_DST)) + b"\x01\x01\x01\x00"
    struct.pack_into("!H", hdr, 10, checksum(hdr))
    return hdr + l4


def fix_ipv4_checksum(pkt: bytearray) -> bytearray:
    pkt[10:12] = b"\0\0"
    struct.pack_into("!H", pkt, 10, checksum(pkt[:(pkt[0] & 15) * 4]))
    return pkt


def build_monster(v6: bool, udp: bool, total: int, seed: int, *, seq: int = 1000, flags: int = ACK,
                  ip_id: int = 0x1234, options: bytes = b"") -> bytearray:
    payload = make_payload(total, seed)
    if udp:
        pkt = udp_packet(v6, payload, partial=True)
        if not v6:
            struct.pack_into("!H", pkt, 4, ip_id)
            fix_ipv4_checksum(pkt)
        return pkt
    return tcp_packet(v6, payload, seq=seq, flags=flags, ip_id=ip_id, options=options, partial=True)


# ---------------------------------------------------------------------------------------------------------
# import point


def test_import_point_and_env_override() -> None:
    if fast.HAVE_C:
        assert fast.ingest is _offload.ingest and fast.coalesce is _offload.coalesce
    else:
        assert fast.ingest is fast.ingest_py and fast.coalesce is fast.coalesce_py
    code = ("import turbowg.tun.fast as f; "
            "print(f.HAVE_C, f.ingest is f.ingest_py, f.coalesce is f.coalesce_py)")
    env = dict(os.environ, TURBOWG_NO_C="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.split() == ["False", "True", "True"]


# ---------------------------------------------------------------------------------------------------------
# ingest: the Python fallback against the reference it wraps


@pytest.mark.parametrize("fn", IMPLS)
@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("udp", [False, True])
def test_ingest_matches_split(fn, v6: bool, udp: bool) -> None:
    monster = build_monster(v6, udp, 5000, 7, flags=ACK | PSH)
    run = run_ingest(fn, monster_frame(monster, 1300), dst_off=5, idx=2)
    (count, end), dst, layout = run
    expect: list = []
    split(monster, gso_type_of(monster), 1300, 40 if v6 else 20, expect)
    assert count == 4 and packets_out(run, idx=2) == [bytes(s) for s in expect]
    assert end == 5 + sum(len(s) for s in expect)
    assert layout[:4] == [-7] * 4 and layout[12:] == [-7] * (len(layout) - 12)  # only our slots written
    assert dst[:5] == bytes([FILL]) * 5 and dst[end:] == bytes([FILL]) * (len(dst) - end)


@pytest.mark.parametrize("fn", IMPLS)
def test_ingest_plain_and_needs_csum(fn) -> None:
    for v6 in (False, True):
        t = 40 if v6 else 20
        for pkt, off in ((tcp_packet(v6, b"hello", flags=0x02, partial=True), 16),
                         (udp_packet(v6, b"hello world", partial=True), 6)):
            run = run_ingest(fn, frame_of(pkt, flags=vnet.NEEDS_CSUM, csum_start=t, csum_offset=off))
            assert packets_out(run) == [bytes(finish_checksum(pkt, t, off))]
            assert transport_checksum_ok(packets_out(run)[0])
            run = run_ingest(fn, frame_of(pkt) + b"trailing junk", frame_len=10 + len(pkt), dst_off=3)
            assert run[0] == (1, 3 + len(pkt)) and packets_out(run) == [bytes(pkt)]
    # An empty packet (frame = just the virtio header) is one empty packet, as read_batch does.
    assert run_ingest(fn, vnet.ZERO_HDR)[0] == (1, 0)


@pytest.mark.parametrize("fn", IMPLS)
def test_needs_csum_zero_result(fn) -> None:
    """A completed checksum of 0 is sent as 0xFFFF only for csum_offset 6 (UDP), as finish_checksum does;
    an all-zero region completes to 0xFFFF."""
    for off in (6, 16):
        region = bytearray(b"\x12\x34\x56\x78\x9a\xbc" + bytes(off + 2 - 6))
        struct.pack_into("!H", region, off, checksum(region))  # region now sums to 0xFFFF: result 0
        pkt = bytes(20) + region
        (got,) = packets_out(run_ingest(fn, frame_of(pkt, flags=vnet.NEEDS_CSUM, csum_start=20,
                                                     csum_offset=off)))
        assert got == bytes(finish_checksum(pkt, 20, off))
        assert got[20 + off:22 + off] == (b"\xff\xff" if off == 6 else b"\0\0")
        zero = bytes(40)
        (got,) = packets_out(run_ingest(fn, frame_of(zero, flags=vnet.NEEDS_CSUM, csum_start=21,
                                                     csum_offset=off)))
        assert got[21 + off:23 + off] == b"\xff\xff"
        assert got == bytes(finish_checksum(zero, 21, off))


@pytest.mark.parametrize("fn", IMPLS)
@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("udp", [False, True])
def test_gso_segment_checksum_computing_to_zero(fn, v6: bool, udp: bool) -> None:
    """A GSO segment whose checksum computes to 0 gets exactly 0xFFFF (UDP) or 0x0000 (TCP), and every other
    segment exactly its checksum: compared with the value itself, not with a verification that accepts both."""
    size = 1000
    body = zero_sum_payload(v6, udp, size, 5)
    # UDP: the zero-sum payload in the middle segment (same header as the first); TCP: in the first (seq 1000).
    parts = [make_payload(size, 1), body, make_payload(size, 2)] if udp else [body, make_payload(size, 1),
                                                                               make_payload(size, 2)]
    monster = (udp_packet if udp else tcp_packet)(v6, b"".join(parts), partial=True)
    got = packets_out(run_ingest(fn, monster_frame(monster, size)))
    assert len(got) == 3
    t = 40 if v6 else 20
    at = t + (6 if udp else 16)
    zero_seg = got[1] if udp else got[0]
    assert zero_seg[at:at + 2] == (b"\xff\xff" if udp else b"\0\0")
    for seg in got:
        assert_exact_checksum(seg)


# ---------------------------------------------------------------------------------------------------------
# ingest: C against Python


gso_sizes = st.one_of(st.integers(1, 64), st.integers(500, 1500),
                      st.sampled_from([1, 2, 3, 1367, 1368, 1400, 1420, 1448, 8000, 65535]))
tcp_flags = st.sets(st.sampled_from([FIN, PSH, CWR, ECE, URG]), max_size=5).map(lambda s: ACK | sum(s))
ip_ids = st.one_of(st.integers(0xFFC0, 0xFFFF), st.integers(0, 0xFFFF))
seqs = st.one_of(st.integers(2**32 - 70_000, 2**32 - 1), st.integers(0, 2**32 - 1))
tcp_options = st.sampled_from([b"", b"\x01\x01\x08\x0a" + bytes(range(8)), b"\x01\x01\x01\x00", bytes(40)])


@st.composite
def monsters(draw) -> tuple[bytes, bytes]:
    """(frame, monster packet): a TSO/USO read as the kernel hands it over."""
    v6, udp = draw(st.booleans()), draw(st.booleans())
    gso_size = draw(gso_sizes)
    options = b"" if udp else draw(tcp_options)
    hlen = (40 if v6 else 20) + (8 if udp else 20 + len(options))
    limit = min(65535 - hlen, gso_size * 300)  # hypothesis need not build 60000 one-byte segments
    total = draw(st.one_of(st.integers(0, min(limit, 3 * gso_size + 1)), st.integers(0, limit),
                           st.integers(1, max(1, limit // gso_size)).map(lambda k: min(k * gso_size, limit))))
    seed = draw(st.integers(0, 2**32 - 1))
    pkt = build_monster(v6, udp, total, seed, seq=draw(seqs), flags=draw(tcp_flags), ip_id=draw(ip_ids),
                        options=options)
    csum_start = draw(st.sampled_from([None, 0]))  # what the kernel sets, or 0 ("use the IP header")
    return monster_frame(pkt, gso_size, csum_start=csum_start, ecn=draw(st.booleans())), bytes(pkt)


@needs_c
@slow(300)
@given(m=monsters(), dst_off=st.integers(0, 9), idx=st.integers(0, 5))
def test_c_ingest_equals_python_for_monsters(m: tuple[bytes, bytes], dst_off: int, idx: int) -> None:
    frame, pkt = m
    slots = idx + 310
    c_run = run_ingest(_offload.ingest, frame, dst_off=dst_off, idx=idx, slots=slots)
    py_run = run_ingest(fast.ingest_py, frame, dst_off=dst_off, idx=idx, slots=slots)
    assert c_run[0] == py_run[0]
    assert c_run == py_run
    segs = packets_out(c_run, idx)
    v4 = pkt[0] >> 4 == 4
    t = 20 if v4 else 40
    hlen = t + (8 if pkt[9 if v4 else 6] == UDP else (pkt[t + 12] >> 4) * 4)
    assert b"".join(s[hlen:] for s in segs) == pkt[hlen:]
    for s in segs:
        assert transport_checksum_ok(s)
        if v4:
            assert ipv4_header_ok(s) and struct.unpack_from("!H", s, 2)[0] == len(s)


@needs_c
def test_c_ingest_many_segments_and_extension_offsets() -> None:
    """Thousands of 1-byte segments; IPv6 transport offsets past the fixed header (csum_start > 40, odd
    ones included: the reference trusts csum_start there)."""
    for udp in (False, True):
        frame = monster_frame(build_monster(True, udp, 4000, 3), 1)
        c_run = run_ingest(_offload.ingest, frame, dst_size=400_000, slots=4000)
        assert c_run[0][0] == 4000
        assert c_run == run_ingest(fast.ingest_py, frame, dst_size=400_000, slots=4000)
        base = bytearray(build_monster(True, udp, 3000, 5))
        for extra in (1, 7, 8, 24):
            pkt = base[:40] + bytes(range(extra)) + base[40:]
            struct.pack_into("!H", pkt, 4, len(pkt) - 40)
            frame = monster_frame(pkt, 1000, csum_start=40 + extra)
            c_run = run_ingest(_offload.ingest, frame)
            assert c_run[0] != "ValueError" and c_run == run_ingest(fast.ingest_py, frame)


@needs_c
def test_c_ingest_oversized_packets() -> None:
    """Reads are at most 64 KiB, but ingest takes any frame: a segment whose IPv4 total length would not
    fit 16 bits is refused by both; an IPv6 monster longer than 64 KiB with small segments is split."""
    big = build_monster(False, True, 1000, 1) + bytes(69_000)  # length fields are not checked by split
    for fn in (_offload.ingest, fast.ingest_py):
        assert run_ingest(fn, monster_frame(big, 65535), dst_size=200_000) == ("ValueError",)
    big6 = build_monster(True, False, 1000, 2) + make_payload(68_000, 9)
    runs = [run_ingest(fn, monster_frame(big6, 1400), dst_size=200_000) for fn in (_offload.ingest,
                                                                                    fast.ingest_py)]
    assert runs[0][0][0] == 50 and runs[0] == runs[1]


@needs_c
@slow(200)
@given(v6=st.booleans(), udp=st.booleans(), size=st.integers(0, 3000), seed=st.integers(0, 2**32 - 1),
       start=st.integers(0, 80), offset=st.sampled_from([0, 6, 16, 1, 100, 3000]),
       flags=st.sampled_from([vnet.NEEDS_CSUM, vnet.NEEDS_CSUM | vnet.DATA_VALID, 0, vnet.DATA_VALID]))
def test_c_ingest_equals_python_for_non_gso(v6: bool, udp: bool, size: int, seed: int, start: int,
                                            offset: int, flags: int) -> None:
    payload = make_payload(size, seed)
    pkt = udp_packet(v6, payload, partial=True) if udp else tcp_packet(v6, payload, partial=True)
    frame = frame_of(pkt, flags=flags, csum_start=start, csum_offset=offset)
    assert run_ingest(_offload.ingest, frame, dst_off=1) == run_ingest(fast.ingest_py, frame, dst_off=1)


# ---------------------------------------------------------------------------------------------------------
# ingest: malformed frames


def malformed_frames() -> list[tuple[bytes, int]]:
    monster = tcp_packet(False, b"x" * 3000, partial=True)
    m6 = tcp_packet(True, b"x" * 3000, partial=True)
    u4 = udp_packet(False, b"y" * 3000, partial=True)
    cases = [
        frame_of(monster, gso_type=vnet.GSO_TCPV6, gso_size=1000, csum_start=20),  # wrong family
        frame_of(m6, gso_type=vnet.GSO_TCPV4, gso_size=1000, csum_start=40),
        frame_of(monster, gso_type=vnet.GSO_TCPV4, gso_size=0, csum_start=20),  # zero gso_size
        frame_of(monster[:30], gso_type=vnet.GSO_TCPV4, gso_size=100, csum_start=20),  # truncated
        frame_of(monster[:27], gso_type=vnet.GSO_UDP_L4, gso_size=100, csum_start=20),  # < 28 bytes
        frame_of(monster, gso_type=99, gso_size=100, csum_start=20),  # unknown type
        frame_of(monster, gso_type=vnet.GSO_ECN, gso_size=100, csum_start=20),  # ECN alone
        frame_of(monster, gso_type=vnet.GSO_UDP, gso_size=100, csum_start=20),  # UFO
        frame_of(monster[:25], flags=vnet.NEEDS_CSUM, csum_start=20, csum_offset=16),  # offsets beyond
        frame_of(monster, flags=vnet.NEEDS_CSUM, csum_start=len(monster), csum_offset=0),
        frame_of(monster, gso_type=vnet.GSO_UDP_L4, gso_size=100, csum_start=20),  # protocol mismatch
        frame_of(monster, gso_type=vnet.GSO_TCPV4, gso_size=100, csum_start=24),  # csum_start != IHL
        frame_of(m6, gso_type=vnet.GSO_TCPV6, gso_size=100, csum_start=39),  # inside the IPv6 header
        frame_of(m6, gso_type=vnet.GSO_TCPV6, gso_size=100, csum_start=len(m6) - 10),  # TCP cut short
        frame_of(u4, gso_type=vnet.GSO_UDP_L4, gso_size=100, csum_start=0)[:10] + b"\x44" + u4[1:],  # IHL 16
        frame_of(b"\x75" + u4[1:], gso_type=vnet.GSO_UDP_L4, gso_size=100),  # version 7
    ]
    bad_doff = bytearray(monster)
    bad_doff[20 + 12] = 0x40  # TCP data offset 16 bytes
    cases.append(frame_of(bad_doff, gso_type=vnet.GSO_TCPV4, gso_size=100, csum_start=20))
    bad_doff[20 + 12] = 0xF0
    cases.append(frame_of(bad_doff[:70], gso_type=vnet.GSO_TCPV4, gso_size=100, csum_start=20))
    out = [(c, len(c)) for c in cases]
    out += [(vnet.ZERO_HDR[:k], k) for k in range(10)]  # truncated virtio header
    out += [(frame_of(monster), len(monster) + 11), (frame_of(monster), -1)]  # frame_len beyond / negative
    return out


@pytest.mark.parametrize("fn", IMPLS)
def test_malformed_frames_raise_value_error(fn) -> None:
    for frame, frame_len in malformed_frames():
        dst = bytearray([FILL]) * 70_000
        layout = array.array("i", [-7] * 400)
        with pytest.raises(ValueError):
            fn(frame, frame_len, dst, 0, layout, 0)
        assert dst == bytearray([FILL]) * 70_000 and set(layout) == {-7}


@pytest.mark.parametrize("fn", IMPLS)
def test_ingest_argument_errors(fn) -> None:
    frame = frame_of(udp_packet(False, b"q" * 10))
    dst, layout = bytearray(100), array.array("i", [0] * 4)
    with pytest.raises(ValueError):
        fn(frame, len(frame), dst, -1, layout, 0)
    with pytest.raises(ValueError):
        fn(frame, len(frame), dst, 0, layout, -1)
    for args in ((frame, len(frame), bytes(100), 0, layout, 0),  # read-only dst
                 (frame, len(frame), dst, 0, b"\0" * 16, 0),  # read-only layout
                 ("text", 4, dst, 0, layout, 0),
                 (frame, 1.5, dst, 0, layout, 0),
                 (frame, len(frame), dst, None, layout, 0)):
        with pytest.raises(TypeError):
            fn(*args)


@needs_c
@slow(400)
@given(data=st.data())
def test_c_ingest_random_frames_fail_exactly_like_python(data) -> None:
    kind = data.draw(st.sampled_from(["random", "mutated"]))
    if kind == "random":
        header = vnet.pack(data.draw(st.integers(0, 255)),
                           data.draw(st.sampled_from([0, 1, 3, 4, 5, 0x81, 0x84, 0x85, 0x80])
                                     | st.integers(0, 255)),
                           data.draw(st.integers(0, 0xFFFF)),
                           data.draw(st.sampled_from([0, 1, 2, 100, 1400]) | st.integers(0, 0xFFFF)),
                           data.draw(st.sampled_from([0, 20, 40, 60]) | st.integers(0, 0xFFFF)),
                           data.draw(st.sampled_from([0, 6, 16]) | st.integers(0, 0xFFFF)))
        first = data.draw(st.sampled_from([0x45, 0x46, 0x4F, 0x44, 0x60, 0x65]) | st.integers(0, 255))
        frame = header + bytes([first]) + data.draw(st.binary(max_size=300))
    else:
        frame = bytearray(data.draw(monsters())[0])
        for _ in range(data.draw(st.integers(1, 4))):
            at = data.draw(st.integers(0, min(len(frame) - 1, 120)))
            frame[at] = data.draw(st.integers(0, 255))
        frame = bytes(frame[:data.draw(st.integers(0, len(frame)))])
    frame_len = data.draw(st.sampled_from([len(frame), len(frame) + 1]) | st.integers(0, len(frame)))
    c_run = run_ingest(_offload.ingest, frame, frame_len, slots=700, dst_size=200_000)
    py_run = run_ingest(fast.ingest_py, frame, frame_len, slots=700, dst_size=200_000)
    assert c_run == py_run


# ---------------------------------------------------------------------------------------------------------
# ingest: room


@pytest.mark.parametrize("fn", IMPLS)
def test_ingest_buffer_errors_write_nothing(fn) -> None:
    monster = build_monster(False, False, 4000, 1)
    frame = monster_frame(monster, 1000)
    need = 4 * 40 + 4000
    for dst_size, dst_off, slots, idx in ((need - 1, 0, 4, 0), (need + 9, 10, 4, 0), (need, 0, 3, 0),
                                          (need, 0, 5, 2), (10, 11, 4, 0), (need, 0, 1, 2)):
        dst = bytearray([FILL]) * dst_size
        layout = array.array("i", [-7] * (2 * slots))
        with pytest.raises(BufferError):
            fn(frame, len(frame), dst, dst_off, layout, idx)
        assert dst == bytearray([FILL]) * dst_size and set(layout) == {-7}
    # exactly enough room
    dst = bytearray(need + 3)
    layout = array.array("i", [0] * 10)
    assert fn(frame, len(frame), dst, 3, layout, 1) == (4, need + 3)
    plain = frame_of(monster)
    with pytest.raises(BufferError):
        fn(plain, len(plain), bytearray(len(monster) - 1), 0, array.array("i", [0, 0]), 0)
    with pytest.raises(BufferError):
        fn(plain, len(plain), bytearray(len(monster)), 0, array.array("i", [0]), 0)


# ---------------------------------------------------------------------------------------------------------
# coalesce


def test_coalesce_py_matches_gro() -> None:
    packets = ([tcp_packet(False, bytes([i]) * 100, seq=1 + 100 * i) for i in range(5)]
               + [udp_packet(True, b"u" * 50) for _ in range(3)] + [b"\x00junk"])
    run = run_coalesce(fast.coalesce_py, packets)
    assert run[0] == 3 and frames_out(run) == python_frames(packets)
    assert run[1][sum(len(f) for f in frames_out(run)):] == bytes([FILL]) * (len(run[1]) - sum(
        len(f) for f in frames_out(run)))


@st.composite
def batches(draw) -> list[bytes]:
    """Several TCP/UDP flows (v4/v6) interleaved, with disruptive packets: gaps, retransmissions, other
    flags/window/TTL, short and oversized segments, IPv4 options and fragments, non-IP junk. IPv4 IDs count
    up per flow and every checksum is valid, so each frame splits back into exactly its packets."""
    nflows = draw(st.integers(1, 5))
    flows = []
    for i in range(nflows):
        flows.append({"v6": draw(st.booleans()), "udp": draw(st.booleans()), "port": 1000 + i,
                      "mss": draw(st.sampled_from([1, 7, 100, 536, 1380, 1420]) | st.integers(1, 1500)),
                      "seq": draw(seqs), "id": draw(ip_ids)})
    kinds = st.sampled_from(["data"] * 8 + ["small", "psh", "gap", "retx", "ack", "fin", "cwr", "win", "ttl",
                                            "big", "junk", "frag", "opts", "badlen"])
    packets = []
    for _ in range(draw(st.integers(1, 90))):
        f = flows[draw(st.integers(0, nflows - 1))]
        kind = draw(kinds)
        if kind == "junk":
            packets.append(draw(st.binary(max_size=60).filter(lambda b: not b or b[0] >> 4 not in (4, 6))))
            continue
        size = {"small": max(0, f["mss"] - 1 - draw(st.integers(0, 50))), "ack": 0, "big": f["mss"] + 1}.get(
            kind, f["mss"])
        payload = make_payload(size, len(packets) * 7919 + 1)
        if f["udp"]:
            if kind == "opts":
                l4 = bytearray(struct.pack("!HHHH", f["port"], 51821, 8 + size, 0)) + payload
                pkt = ipv4_with_options(UDP, l4, f["id"])
            else:
                pkt = udp_packet(f["v6"], payload, sport=f["port"], ttl=3 if kind == "ttl" else 64)
        else:
            if kind == "gap":
                f["seq"] = (f["seq"] + 7) & 0xFFFFFFFF
            seq = (f["seq"] - f["mss"]) & 0xFFFFFFFF if kind == "retx" else f["seq"]
            flags = ACK | {"psh": PSH, "fin": FIN, "cwr": CWR}.get(kind, 0)
            if kind == "opts":
                th = struct.pack("!HHIIBBHHH", f["port"], 443, seq, 5555, 0x50, flags, 512, 0, 0)
                pkt = ipv4_with_options(TCP, th + payload, f["id"])
            else:
                pkt = tcp_packet(f["v6"], payload, seq=seq, flags=flags, sport=f["port"], ip_id=f["id"],
                                 window=1 if kind == "win" else 512, ttl=3 if kind == "ttl" else 64)
            if kind != "retx":
                f["seq"] = (f["seq"] + size) & 0xFFFFFFFF
        pkt = bytearray(pkt)
        if not f["v6"] and kind != "opts":
            struct.pack_into("!H", pkt, 4, f["id"])
            if kind == "frag":
                pkt[6] |= 0x20
            if kind == "badlen":
                pkt[3] ^= 1
            fix_ipv4_checksum(pkt)
        elif f["v6"] and kind == "badlen":
            pkt[5] ^= 1
        if pkt[0] >> 4 == 4:
            f["id"] = (f["id"] + 1) & 0xFFFF
        packets.append(bytes(pkt))
    return packets


def flow_key(pkt: bytes) -> tuple:
    if len(pkt) < 20 or pkt[0] >> 4 not in (4, 6):
        return ("junk",)
    t = (pkt[0] & 15) * 4 if pkt[0] >> 4 == 4 else 40
    return (pkt[0] >> 4, addr_of(pkt), pkt[t:t + 4], pkt[9] if pkt[0] >> 4 == 4 else pkt[6])


@needs_c
@slow(300)
@given(packets=batches(), tcp=st.booleans(), udp=st.booleans())
def test_c_coalesce_equals_python_and_round_trips(packets: list[bytes], tcp: bool, udp: bool) -> None:
    c_run = run_coalesce(_offload.coalesce, packets, tcp, udp)
    py_run = run_coalesce(fast.coalesce_py, packets, tcp, udp)
    assert frames_out(c_run) == python_frames(packets, tcp, udp)
    assert c_run == py_run
    # Split every frame back (as the kernel would): per flow, the original packets in the original order.
    back = []
    for frame in frames_out(c_run):
        run = run_ingest(_offload.ingest, frame)
        assert run != ("ValueError",)
        back += packets_out(run)
    assert len(back) == len(packets)
    by_flow_in: dict = {}
    by_flow_out: dict = {}
    for p in packets:
        by_flow_in.setdefault(flow_key(p), []).append(p)
    for p in back:
        by_flow_out.setdefault(flow_key(p), []).append(p)
    assert by_flow_out == by_flow_in


@needs_c
@slow(300)
@given(raw=st.lists(st.tuples(st.sampled_from([0x45, 0x46, 0x60, 0x40, 0x4F]) | st.integers(0, 255),
                              st.sampled_from([6, 17]) | st.integers(0, 255), st.binary(max_size=120)),
                    max_size=40), tcp=st.booleans(), udp=st.booleans())
def test_c_coalesce_random_bytes_equal_python(raw: list, tcp: bool, udp: bool) -> None:
    """Header-shaped garbage: IP version/IHL, protocol, random rest (lengths sometimes made consistent)."""
    packets = []
    for first, proto, rest in raw:
        pkt = bytearray([first]) + rest
        if len(pkt) > 9:
            pkt[9 if first >> 4 == 4 else 6] = proto
            if len(pkt) > 5 and rest and rest[0] & 1:  # make the IP length field agree
                if first >> 4 == 4:
                    struct.pack_into("!H", pkt, 2, len(pkt))
                    pkt[6:8] = b"\0\0"
                elif len(pkt) >= 40:
                    struct.pack_into("!H", pkt, 4, len(pkt) - 40)
        packets.append(bytes(pkt))
    packets += packets[:5]  # the same flows again
    assert run_coalesce(_offload.coalesce, packets, tcp, udp) == run_coalesce(fast.coalesce_py, packets, tcp,
                                                                            udp)


@pytest.mark.parametrize("fn", COALESCERS)
def test_coalesce_limits(fn) -> None:
    big = [tcp_packet(False, bytes([i]) * 1400, seq=1 + 1400 * i, ip_id=i) for i in range(60)]
    run = run_coalesce(fn, big)
    assert run[0] == 2 and frames_out(run) == python_frames(big)
    small = [udp_packet(True, bytes([i]) * 10) for i in range(150)]
    run = run_coalesce(fn, small)
    assert run[0] == 3 and frames_out(run) == python_frames(small)
    # An IPv6 packet of 65575 bytes is consistent (payload length 65535) but never joins anything.
    jumbo = udp_packet(True, bytes(65535 - 8))
    run = run_coalesce(fn, [jumbo, udp_packet(True, bytes(100)), udp_packet(True, bytes(100))])
    assert run[0] == 2 and frames_out(run)[0] == vnet.ZERO_HDR + bytes(jumbo)


@pytest.mark.parametrize("fn", COALESCERS)
def test_coalesce_many_flows(fn) -> None:
    """More flows than hash slots: every flow still finds its own group."""
    packets = []
    for rnd in range(3):
        for i in range(700):
            src = bytes([10, 0, i >> 8, i & 0xFF])
            packets.append(bytes(tcp_packet(False, bytes([rnd]) * 50, seq=1 + 50 * rnd, sport=i % 5,
                                            src=src)))
    run = run_coalesce(fn, packets)
    assert run[0] == 700 and frames_out(run) == python_frames(packets)


@pytest.mark.parametrize("fn", COALESCERS)
def test_coalesce_errors(fn) -> None:
    packets = [tcp_packet(False, bytes([i]) * 100, seq=1 + 100 * i) for i in range(5)] + [b"\x01"] * 3
    src, layout = pack_batch(packets)
    need = sum(len(f) for f in python_frames(packets))
    for dst_size, nframes in ((need - 1, 8), (need, 3)):
        dst = bytearray([FILL]) * dst_size
        frames = array.array("i", [-7] * (2 * nframes))
        with pytest.raises(BufferError):
            fn(src, layout, len(packets), dst, frames, True, True)
        assert dst == bytearray([FILL]) * dst_size and set(frames) == {-7}
    frames = array.array("i", [0] * 8)
    assert fn(src, layout, len(packets), bytearray(need), frames, True, True) == 4
    assert fn(src, layout, 0, bytearray(0), array.array("i"), True, True) == 0
    for bad_layout, count in ((array.array("i", [0, len(src) + 1]), 1), (array.array("i", [-1, 1]), 1),
                              (array.array("i", [0, -1]), 1), (layout, len(packets) + 1), (layout, -1)):
        with pytest.raises(ValueError):
            fn(src, bad_layout, count, bytearray(need), frames, True, True)
    with pytest.raises(TypeError):
        fn(src, layout, len(packets), bytes(need), frames, True, True)
    with pytest.raises(TypeError):
        fn(src, layout, len(packets), bytearray(need), bytes(32), True, True)
    with pytest.raises(TypeError):
        fn(src, layout, "3", bytearray(need), frames, True, True)


@pytest.mark.parametrize("fn", COALESCERS)
def test_coalesce_then_ingest_round_trip_fixed(fn) -> None:
    """One well-formed flow per family and protocol, each a single monster, split back by ingest."""
    for v6 in (False, True):
        for udp in (False, True):
            if udp:
                packets = [udp_packet(v6, make_payload(1200 if i < 10 else 300, i), sport=7)
                           for i in range(11)]
            else:
                packets = [tcp_packet(v6, make_payload(1200, i), seq=(2**32 - 5000 + 1200 * i) & 0xFFFFFFFF,
                                      flags=ACK | (PSH if i == 9 else 0)) for i in range(10)]
            if not v6:  # IPv4 IDs counting up across the wrap, as the split will write them
                for i, p in enumerate(packets):
                    struct.pack_into("!H", p, 4, (0xFFFE + i) & 0xFFFF)
                    fix_ipv4_checksum(p)
            run = run_coalesce(fn, packets)
            assert run[0] == 1
            (frame,) = frames_out(run)
            hdr = vnet.unpack_from(frame, 0)
            t = 40 if v6 else 20
            assert hdr == (vnet.NEEDS_CSUM, gso_type_of(packets[0]), t + (8 if udp else 20), 1200, t,
                           6 if udp else 16)
            psum = pseudo_header_sum(*addr_of(frame[10:]), UDP if udp else TCP, len(frame) - 10 - t)
            assert struct.unpack_from("!H", frame, 10 + t + hdr[5])[0] == fold(psum)
            assert packets_out(run_ingest(fast.ingest_py, frame)) == [bytes(p) for p in packets]


# ---------------------------------------------------------------------------------------------------------
# micro-benchmark (not a test): python tests/test_tun_fast.py


def _bench() -> None:  # pragma: no cover
    monster = tcp_packet(False, make_payload(65535 - 40, 1), seq=1, partial=True)
    frame = monster_frame(monster, 1448)
    dst = bytearray(2 * 65536)
    layout = array.array("i", [0] * 512)
    packets = [bytes(tcp_packet(False, make_payload(1380, i), seq=1 + 1380 * i, ip_id=i)) for i in range(45)]
    src, lay = pack_batch(packets)
    out = bytearray(len(src) + 450)
    frames = array.array("i", [0] * 90)
    impls = [("py", fast.ingest_py, fast.coalesce_py)]
    if _offload is not None:
        impls.insert(0, ("c", _offload.ingest, _offload.coalesce))
    for name, ing, coal in impls:
        n = 2000 if name == "c" else 200
        t_ing = min(timeit.repeat(lambda f=ing: f(frame, len(frame), dst, 0, layout, 0), number=n,
                                  repeat=5)) / n
        t_coal = min(timeit.repeat(lambda f=coal: f(src, lay, 45, out, frames, True, True), number=n,
                                   repeat=5)) / n
        print(f"{name}: ingest 64 KiB TCPv4 monster (46 x 1448) {t_ing * 1e6:8.1f} us   "
              f"coalesce 45 x 1420-byte TCP packets {t_coal * 1e6:8.1f} us")


if __name__ == "__main__":
    _bench()


@needs_c
def test_c_coalesce_keeps_different_df_apart() -> None:
    """IPv4 DF must match within a group (the kernel gives every segment the first one's flags)."""
    plain = udp_packet(False, b"a" * 300)
    with_df = bytearray(plain)
    with_df[6] ^= 0x40  # flip DF
    fix_ipv4_checksum(with_df)
    packets = [plain, plain, bytes(with_df), bytes(with_df)]
    run = run_coalesce(fast.coalesce, packets)
    assert frames_out(run) == python_frames(packets)
    assert run[0] == 2


@pytest.mark.parametrize("fn", [fast.ingest, fast.ingest_py])
def test_smallest_mss_monster_fits_the_read_room(fn) -> None:
    """The room TunDevice promises per read (READ_ROOM_*) holds the worst a TUN read can bring: a 64 KiB
    TCPv6 monster with 40 bytes of options cut at Linux's smallest MSS (48)."""
    from turbowg.tun.device import READ_ROOM_BYTES, READ_ROOM_PACKETS

    options = b"\x01" * 40
    pkt = build_monster(True, False, 65535 - 40 - 20 - 40, 3, options=options)
    frame = monster_frame(pkt, 48)
    dst = bytearray(READ_ROOM_BYTES)
    layout = array.array("i", bytes(8 * READ_ROOM_PACKETS))
    count, end = fn(frame, len(frame), dst, 0, layout, 0)
    assert count == -(-(65535 - 100) // 48) and end <= READ_ROOM_BYTES
    assert all(transport_checksum_ok(dst[layout[2 * k]:layout[2 * k] + layout[2 * k + 1]]) for k in (0, count - 1))
