"""STUN binding service: RFC 5769 vectors, malformed input, and a real request over loopback."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st

from turbowg.relay import stun

TXID = bytes.fromhex("b7e7a701bc34d686fa87dfae")

# RFC 5769 2.1: binding request with SOFTWARE, PRIORITY, ICE-CONTROLLED, USERNAME, MESSAGE-INTEGRITY, FINGERPRINT.
RFC5769_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae"
    "80220010" "5354554e207465737420636c69656e74"
    "00240004" "6e0001ff"
    "80290008" "932ff9b151263b36"
    "00060009" "6576746a3a68367659202020"
    "00080014" "9aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2"
    "80280004" "e57a3bcf"
)
_SOFTWARE_TEST_VECTOR = "8022000b" "74657374207665637" "46f7220"
# RFC 5769 2.2 / 2.3: success responses for 192.0.2.1:32853 and [2001:db8:1234:5678:11:2233:4455:6677]:32853.
RFC5769_RESPONSE_V4 = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae"
    + _SOFTWARE_TEST_VECTOR
    + "00200008" "0001a147e112a643"
    + "00080014" "2b91f599fd9e90c38c7489f92af9ba53f06be7d7"
    + "80280004" "c07d4c96"
)
RFC5769_RESPONSE_V6 = bytes.fromhex(
    "010100482112a442b7e7a701bc34d686fa87dfae"
    + _SOFTWARE_TEST_VECTOR
    + "00200014" "0002a1470113a9faa5d3f179bc25f4b5bed2b9d9"
    + "00080014" "a382954e4be67bf11784c97c8292c275bfe3ed41"
    + "80280004" "c8fb0b4c"
)
XOR_MAPPED_V4 = bytes.fromhex("00200008" "0001a147e112a643")
XOR_MAPPED_V6 = bytes.fromhex("00200014" "0002a1470113a9faa5d3f179bc25f4b5bed2b9d9")


def test_rfc5769_request_parses_and_fingerprint_is_checked() -> None:
    assert stun.parse_binding_request(RFC5769_REQUEST) == TXID
    corrupted = bytearray(RFC5769_REQUEST)
    corrupted[-1] ^= 1
    with pytest.raises(stun.StunError) as info:
        stun.parse_binding_request(bytes(corrupted))
    assert info.value.reason == "bad_fingerprint"


def test_rfc5769_responses_decode() -> None:
    assert stun.parse_binding_response(RFC5769_RESPONSE_V4) == (
        TXID,
        ipaddress.ip_address("192.0.2.1"),
        32853,
    )
    assert stun.parse_binding_response(RFC5769_RESPONSE_V6) == (
        TXID,
        ipaddress.ip_address("2001:db8:1234:5678:11:2233:4455:6677"),
        32853,
    )


def test_response_xor_mapped_address_matches_rfc5769_bytes() -> None:
    v4 = stun.build_binding_response(TXID, "192.0.2.1", 32853)
    assert v4 == bytes.fromhex("0101000c2112a442") + TXID + XOR_MAPPED_V4
    v6 = stun.build_binding_response(TXID, "2001:db8:1234:5678:11:2233:4455:6677", 32853)
    assert v6 == bytes.fromhex("010100182112a442") + TXID + XOR_MAPPED_V6


def test_v4_mapped_v6_source_is_reported_as_v4() -> None:
    response = stun.build_binding_response(TXID, "::ffff:192.0.2.1", 32853)
    assert response.endswith(XOR_MAPPED_V4)


def test_request_builder_round_trips_and_matches_tailscale_layout() -> None:
    request = stun.build_binding_request(TXID)
    # header + SOFTWARE "tailnode" (8 bytes, no padding) + FINGERPRINT, as Tailscale clients send
    assert len(request) == 20 + 12 + 8
    assert request[20:32] == bytes.fromhex("80220008") + b"tailnode"
    assert stun.parse_binding_request(request) == TXID
    assert stun.is_stun(request)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "short"),
        (b"\x00\x01\x00\x00\x21\x12\xa4", "short"),
        (bytes.fromhex("000100002112a443") + TXID, "bad_cookie"),
        (bytes.fromhex("c00100002112a442") + TXID, "not_stun"),
        (bytes.fromhex("000100042112a442") + TXID, "bad_length"),  # claims 4 bytes, has 0
        (bytes.fromhex("000100042112a442") + TXID + b"\x80\x22\x00\x08", "truncated_attribute"),
        (bytes.fromhex("000100032112a442") + TXID + b"abc", "bad_length"),  # not a multiple of 4
        (stun.build_binding_response(TXID, "192.0.2.1", 1), "not_binding_request"),
        (bytes.fromhex("001100002112a442") + TXID, "not_binding_request"),  # binding indication
    ],
)
def test_malformed_requests_are_rejected_with_reason(data: bytes, reason: str) -> None:
    with pytest.raises(stun.StunError) as info:
        stun.parse_binding_request(data)
    assert info.value.reason == reason


def test_fingerprint_must_be_last() -> None:
    request = stun.build_binding_request(TXID, software=None)
    extra = bytes.fromhex("80220004") + b"abcd"
    body = request[20:] + extra
    message = bytes.fromhex("0001") + len(body).to_bytes(2, "big") + request[4:20] + body
    with pytest.raises(stun.StunError) as info:
        stun.parse_binding_request(message)
    assert info.value.reason == "bad_fingerprint"


@given(st.binary(max_size=120))
def test_arbitrary_bytes_never_raise_anything_but_stun_error(data: bytes) -> None:
    try:
        txid = stun.parse_binding_request(data)
    except stun.StunError:
        return
    assert len(txid) == 12


@given(st.ip_addresses(), st.integers(0, 65535), st.binary(min_size=12, max_size=12))
def test_response_round_trip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, txid: bytes) -> None:
    got_txid, got_ip, got_port = stun.parse_binding_response(stun.build_binding_response(txid, ip, port))
    expected = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip
    assert (got_txid, got_ip, got_port) == (txid, expected, port)


def _free_udp_port(family: socket.AddressFamily, host: str) -> int:
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize(("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_real_binding_request_over_loopback(family: socket.AddressFamily, host: str) -> None:
    async def scenario() -> None:
        port = _free_udp_port(family, host)
        transport = await stun.serve_stun(host, port)
        protocol = transport.get_protocol()
        assert isinstance(protocol, stun.StunProtocol)
        client = socket.socket(family, socket.SOCK_DGRAM)
        client.bind((host, 0))
        client.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            # Garbage first: must be dropped silently, counted, and not stop the service.
            await loop.sock_sendto(client, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", (host, port))
            txid = stun.new_txid()
            await loop.sock_sendto(client, stun.build_binding_request(txid), (host, port))
            reply = await asyncio.wait_for(loop.sock_recv(client, 2048), timeout=5)
            got_txid, ip, got_port = stun.parse_binding_response(reply)
            assert got_txid == txid
            assert ip == ipaddress.ip_address(host)
            assert got_port == client.getsockname()[1]
            assert protocol.counters.requests == 1
            assert protocol.counters.dropped == {"not_stun": 1}
        finally:
            client.close()
            transport.close()

    asyncio.run(scenario())


def test_a_v4_mapped_ipv6_mapped_address_parses_as_the_ipv4_address() -> None:
    # Found by `turbowg fuzz stun`: a MAPPED-ADDRESS of family IPv6 holding ::ffff:255.255.0.0 parsed as the
    # IPv6 address, while the builder writes the IPv4 one, so the round trip changed the address.
    import base64
    import struct

    from turbowg.relay import stun as s

    txid = bytes(range(1, 13))
    value = struct.pack("!BBH", 0, s.FAMILY_IPV6, 55604) + bytes(10) + b"\xff\xff\xff\xff\x00\x00"
    attrs = struct.pack("!HH", s.ATTR_MAPPED_ADDRESS, len(value)) + value
    msg = struct.pack("!HHI12s", s.BINDING_SUCCESS, len(attrs), s.MAGIC_COOKIE, txid) + attrs
    got = s.parse_binding_response(msg)
    assert got == (txid, ipaddress.ip_address("255.255.0.0"), 55604)
    assert s.parse_binding_response(s.build_binding_response(*got)) == got
    # The fuzzer's own input, replayed through its target.
    from turbowg.fuzz.targets import TARGETS

    TARGETS["stun"].fn(base64.b64decode("BwEDEQAFAT0iAgMAJAABABQAAtk0AAAAAAAAAAAAAP////8AACA="))
