"""DERP frame codec against fixed byte strings, plus NaCl boxes and the handshake JSON bodies."""

from __future__ import annotations

import ipaddress
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turbowg.derp import codec, keys
from turbowg.derp.codec import FrameError, FrameType

K1 = bytes(range(32))
K2 = bytes(range(32, 64))
H = bytes.fromhex


def test_magic_is_derp_key_emoji() -> None:
    assert codec.MAGIC == "DERP🔑".encode()
    assert codec.MAGIC == H("44455250f09f9491")


@pytest.mark.parametrize(
    ("frame", "expected"),
    [
        (codec.encode_server_key(K1), H("01" "00000028" "44455250f09f9491") + K1),
        (codec.encode_client_info(K1, b"N" * 24 + b"BOX"), H("02" "0000003b") + K1 + b"N" * 24 + b"BOX"),
        (codec.encode_server_info(b"N" * 24 + b"B"), H("03" "00000019") + b"N" * 24 + b"B"),
        (codec.encode_send_packet(K2, b"hello"), H("04" "00000025") + K2 + b"hello"),
        (codec.encode_recv_packet(K1, b"hi"), H("05" "00000022") + K1 + b"hi"),
        (codec.encode_keep_alive(), H("06" "00000000")),
        (codec.encode_note_preferred(True), H("07" "00000001" "01")),
        (codec.encode_note_preferred(False), H("07" "00000001" "00")),
        (codec.encode_peer_gone(K1), H("08" "00000021") + K1 + H("00")),
        (codec.encode_peer_gone(K1, codec.PeerGoneReason.NOT_HERE), H("08" "00000021") + K1 + H("01")),
        (
            codec.encode_peer_present(K1, "10.1.2.3", 41641, codec.PeerPresentFlags.REGULAR),
            H("09" "00000033") + K1 + H("00000000000000000000ffff0a010203" "a2a9" "01"),
        ),
        (
            codec.encode_peer_present(K1, "2001:db8::1", 443, codec.PeerPresentFlags.MESH_PEER),
            H("09" "00000033") + K1 + H("20010db8000000000000000000000001" "01bb" "02"),
        ),
        (codec.encode_forward_packet(K1, K2, b"x"), H("0a" "00000041") + K1 + K2 + b"x"),
        (codec.WATCH_CONNS_FRAME, H("10" "00000000")),
        (codec.encode_close_peer(K2), H("11" "00000020") + K2),
        (codec.encode_ping(b"12345678"), H("12" "00000008") + b"12345678"),
        (codec.encode_pong(b"abcdefgh"), H("13" "00000008") + b"abcdefgh"),
        (codec.encode_health("dup key"), H("14" "00000007") + b"dup key"),
        (codec.encode_health(""), H("14" "00000000")),
        (codec.encode_restarting(1500, 60000), H("15" "00000008" "000005dc" "0000ea60")),
    ],
)
def test_encode_fixed_bytes(frame: bytes, expected: bytes) -> None:
    assert frame == expected


def _one(frame: bytes) -> tuple[int, bytes]:
    frames = codec.FrameDecoder(lambda t: 1 << 20).feed(frame)
    assert len(frames) == 1
    return frames[0]


def test_decode_server_messages_from_fixed_bytes() -> None:
    dec = codec.decode_server_message
    assert dec(*_one(H("05" "00000022") + K1 + b"hi")) == codec.ReceivedPacket(K1, b"hi")
    assert dec(*_one(H("06" "00000000"))) == codec.KeepAlive()
    assert dec(*_one(H("08" "00000021") + K1 + H("01"))) == codec.PeerGone(K1, 1)
    assert dec(*_one(H("08" "00000020") + K1)) == codec.PeerGone(K1, 0)  # old servers send no reason
    present = dec(*_one(H("09" "00000033") + K1 + H("00000000000000000000ffff0a010203" "a2a9" "05")))
    assert present == codec.PeerPresent(K1, ipaddress.IPv4Address("10.1.2.3"), 41641, 5)
    present6 = dec(*_one(H("09" "00000032") + K1 + H("20010db8000000000000000000000001" "01bb")))
    assert present6 == codec.PeerPresent(K1, ipaddress.IPv6Address("2001:db8::1"), 443, 0)
    assert dec(*_one(H("09" "00000020") + K1)) == codec.PeerPresent(K1, None, 0, 0)  # oldest servers: key only
    assert dec(*_one(H("12" "00000008") + b"12345678")) == codec.Ping(b"12345678")
    assert dec(*_one(H("13" "00000008") + b"abcdefgh")) == codec.Pong(b"abcdefgh")
    assert dec(*_one(H("14" "00000003") + b"bad")) == codec.Health("bad")
    assert dec(*_one(H("15" "00000008" "000005dc" "0000ea60"))) == codec.ServerRestarting(1500, 60000)
    assert dec(*_one(H("7f" "00000002") + b"zz")) == codec.UnknownFrame(0x7F, b"zz")


@pytest.mark.parametrize(
    "frame",
    [H("05" "00000010") + b"x" * 16, H("08" "00000004") + b"abcd", H("09" "00000001") + b"a",
     H("12" "00000004") + b"1234", H("13" "00000000"), H("15" "00000004") + b"1234"],
)
def test_decode_short_server_messages_rejected(frame: bytes) -> None:
    with pytest.raises(FrameError):
        codec.decode_server_message(*_one(frame))


def test_parse_client_to_server_payloads() -> None:
    assert codec.parse_server_key(codec.MAGIC + K1 + b"future") == K1
    with pytest.raises(FrameError, match="magic"):
        codec.parse_server_key(b"GARBAGE!" + K1)
    with pytest.raises(FrameError):
        codec.parse_server_key(codec.MAGIC + K1[:5])
    assert codec.parse_client_info(K1 + b"n" * 24 + b"box") == (K1, b"n" * 24 + b"box")
    with pytest.raises(FrameError, match="short"):
        codec.parse_client_info(K1 + b"n" * 10)
    with pytest.raises(FrameError, match="long"):
        codec.parse_client_info(K1 + bytes(256 << 10))
    assert codec.parse_send_packet(K2 + b"p") == (K2, b"p")
    assert codec.parse_send_packet(K2) == (K2, b"")
    with pytest.raises(FrameError):
        codec.parse_send_packet(K2[:31])
    with pytest.raises(FrameError):
        codec.parse_send_packet(K2 + bytes(codec.MAX_PACKET_SIZE + 1))
    assert codec.parse_forward_packet(K1 + K2 + b"p") == (K1, K2, b"p")
    with pytest.raises(FrameError):
        codec.parse_forward_packet(K1 + K2[:10])
    assert codec.parse_note_preferred(b"\x01") is True
    assert codec.parse_note_preferred(b"\x00") is False
    with pytest.raises(FrameError):
        codec.parse_note_preferred(b"\x01\x01")
    assert codec.parse_ping(b"12345678" + b"ext") == b"12345678"
    with pytest.raises(FrameError):
        codec.parse_ping(b"1234")
    with pytest.raises(FrameError):
        codec.parse_ping(bytes(1001))
    with pytest.raises(FrameError):
        codec.parse_key_frame(K1[:5], "ClosePeer")


def test_encoders_refuse_bad_arguments() -> None:
    with pytest.raises(ValueError):
        codec.encode_send_packet(K1[:31], b"x")
    with pytest.raises(ValueError):
        codec.encode_send_packet(K1, bytes(codec.MAX_PACKET_SIZE + 1))
    with pytest.raises(ValueError):
        codec.encode_ping(b"short")
    codec.encode_send_packet(K1, bytes(codec.MAX_PACKET_SIZE))  # exactly 64 KiB is fine


def test_decoder_reassembles_byte_by_byte() -> None:
    stream = (codec.encode_send_packet(K1, b"one") + codec.encode_keep_alive()
              + codec.encode_send_packet(K2, bytes(3000)) + codec.encode_ping(b"pingpong"))
    dec = codec.FrameDecoder(lambda t: 1 << 16)
    got: list[tuple[int, bytes]] = []
    for i in range(len(stream)):
        got += dec.feed(stream[i : i + 1])
    assert [t for t, _ in got] == [FrameType.SEND_PACKET, FrameType.KEEP_ALIVE, FrameType.SEND_PACKET, FrameType.PING]
    assert got[0][1] == K1 + b"one"
    assert got[2][1] == K2 + bytes(3000)
    assert dec.buffered == 0


def test_decoder_truncated_frame_waits_and_oversized_header_fails_early() -> None:
    dec = codec.FrameDecoder(lambda t: 100)
    assert dec.feed(H("04" "00000064") + b"x" * 99) == []  # one byte short: nothing yet
    assert dec.buffered == 5 + 99
    assert dec.feed(b"x") == [(4, b"x" * 100)]
    with pytest.raises(FrameError, match="exceeds"):
        dec.feed(H("04" "00000065"))  # only a header: refused before any payload arrives


@settings(max_examples=60, deadline=None)
@given(
    packets=st.lists(st.binary(max_size=300), min_size=1, max_size=20),
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=10),
)
def test_decoder_any_split_gives_same_frames(packets: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(codec.encode_recv_packet(K1, p) for p in packets)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    dec = codec.FrameDecoder(lambda t: 1 << 16)
    got: list[tuple[int, bytes]] = []
    for a, b in zip(points, points[1:], strict=False):
        got += dec.feed(stream[a:b])
    assert [codec.decode_server_message(t, p) for t, p in got] == [codec.ReceivedPacket(K1, p) for p in packets]


def test_client_info_json_field_names_match_derper() -> None:
    body = json.loads(codec.ClientInfo(mesh_key="ab" * 32, is_prober=True).to_json())
    assert body == {"meshKey": "ab" * 32, "version": 2, "CanAckPings": True, "IsProber": True}
    plain = json.loads(codec.ClientInfo().to_json())
    assert plain == {"version": 2, "CanAckPings": True}  # meshKey and IsProber are omitempty


def test_client_info_parse_is_case_insensitive_like_go() -> None:
    info = codec.ClientInfo.from_json(b'{"Version":2,"MESHKEY":"k","canAckPings":true,"isprober":false}')
    assert info == codec.ClientInfo(version=2, mesh_key="k", can_ack_pings=True, is_prober=False)
    assert codec.ClientInfo.from_json(b"{}") == codec.ClientInfo(version=0, mesh_key="", can_ack_pings=False)
    for bad in (b"not json", b"[1]", b'{"version":"2"}', b'{"meshKey":5}'):
        with pytest.raises(FrameError):
            codec.ClientInfo.from_json(bad)


def test_server_info_json() -> None:
    assert codec.ServerInfo().to_json() == b'{"version":2}'
    assert codec.ServerInfo.from_json(b'{"version":2,"TokenBucketBytesPerSecond":0}').version == 2


# What derper's Go json.Unmarshal refuses (UnmarshalTypeError: a JSON bool or a float is no int, an int64
# overflow is no int, a string is no bool), and what it accepts (null leaves the zero value).
_BAD_SERVER_INFO = (
    b'{"version":true}', b'{"version":false}', b'{"version":2.0}', b'{"version":"2"}', b'{"version":[2]}',
    b'{"version":9223372036854775808}', b'{"TokenBucketBytesPerSecond":true}', b'{"tokenbucketbytesburst":"1"}',
)
_BAD_CLIENT_INFO = (
    b'{"version":true}', b'{"version":1e0}', b'{"version":-9223372036854775809}', b'{"CanAckPings":1}',
    b'{"CanAckPings":"true"}', b'{"IsProber":{}}', b'{"meshKey":true}', b'{"meshKey":["k"]}',
)


@pytest.mark.parametrize("raw", _BAD_SERVER_INFO)
def test_server_info_refuses_wrongly_typed_fields_like_go(raw: bytes) -> None:
    with pytest.raises(FrameError, match="ServerInfo"):
        codec.ServerInfo.from_json(raw)


@pytest.mark.parametrize("raw", _BAD_CLIENT_INFO)
def test_client_info_refuses_wrongly_typed_fields_like_go(raw: bytes) -> None:
    with pytest.raises(FrameError, match="ClientInfo"):
        codec.ClientInfo.from_json(raw)


def test_info_json_null_and_int64_bounds_accepted_like_go() -> None:
    assert codec.ServerInfo.from_json(b'{"version":null,"TokenBucketBytesBurst":null}') == codec.ServerInfo(0)
    assert codec.ServerInfo.from_json(b'{"version":-9223372036854775808}').version == -(1 << 63)
    info = codec.ClientInfo.from_json(b'{"version":null,"meshKey":null,"CanAckPings":null,"IsProber":null}')
    assert info == codec.ClientInfo(version=0, mesh_key="", can_ack_pings=False, is_prober=False)
    assert codec.ClientInfo.from_json(b'{"version":9223372036854775807}').version == (1 << 63) - 1


def test_box_seal_open_with_generated_keys() -> None:
    a, b, c = keys.generate_private_key(), keys.generate_private_key(), keys.generate_private_key()
    sealed = keys.seal_to(a, keys.public_key(b), b'{"version":2}')
    assert len(sealed) == 24 + 16 + 13
    assert keys.open_from(b, keys.public_key(a), sealed) == b'{"version":2}'
    assert keys.open_from(c, keys.public_key(a), sealed) is None  # wrong recipient
    assert keys.open_from(b, keys.public_key(c), sealed) is None  # wrong sender
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    assert keys.open_from(b, keys.public_key(a), tampered) is None
    assert keys.open_from(b, keys.public_key(a), sealed[:30]) is None


# The all-zero key and another point of small order: X25519 with them gives the all-zero shared secret.
_LOW_ORDER = (bytes(32), bytes([1]) + bytes(31), bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"))


@pytest.mark.parametrize("peer", _LOW_ORDER)
def test_seal_to_refuses_low_order_peer_key(peer: bytes) -> None:
    with pytest.raises(keys.LowOrderKeyError):
        keys.seal_to(keys.generate_private_key(), peer, b'{"version":2}')
    assert keys.open_from(keys.generate_private_key(), peer, bytes(64)) is None
    assert issubclass(keys.LowOrderKeyError, ValueError)


def test_seal_to_wrong_length_key_is_not_called_low_order() -> None:
    with pytest.raises((TypeError, ValueError)) as info:
        keys.seal_to(keys.generate_private_key(), bytes(31), b"x")
    assert not isinstance(info.value, keys.LowOrderKeyError)


def test_box_matches_known_nacl_vector() -> None:
    # Fixed keys and nonce: the box is deterministic, so an independent NaCl gives the same bytes.
    from nacl.public import Box, PrivateKey

    a, b = bytes([1] * 32), bytes([2] * 32)
    nonce = bytes(range(24))
    sealed = keys.seal_to(a, keys.public_key(b), b"msg", nonce=nonce)
    ref = Box(PrivateKey(a), PrivateKey(b).public_key).encrypt(b"msg", nonce)
    assert sealed == bytes(ref)
    assert sealed[:24] == nonce


def test_key_text_forms_and_config_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    priv = keys.generate_private_key()
    assert keys.parse_private_key(keys.format_private_key(priv)) == priv
    pub = keys.public_key(priv)
    assert keys.format_public_key(pub).startswith("nodekey:")
    assert keys.parse_public_key(pub.hex()) == pub
    with pytest.raises(keys.KeyFormatError):
        keys.parse_public_key("nodekey:1234")
    with pytest.raises(keys.KeyFormatError):
        keys.parse_private_key("privkey:zz" + "0" * 62)
    path = tmp_path / "derper.key"
    created = keys.load_or_create_config(path)
    assert json.loads(path.read_text())["PrivateKey"] == keys.format_private_key(created)
    assert path.stat().st_mode & 0o777 == 0o600
    assert keys.load_or_create_config(path) == created
    path.write_text("{not json")
    with pytest.raises(keys.KeyFormatError):
        keys.load_or_create_config(path)


def test_looks_like_disco() -> None:
    assert codec.looks_like_disco(codec.DISCO_MAGIC + bytes(56))
    assert not codec.looks_like_disco(codec.DISCO_MAGIC + bytes(10))
    assert not codec.looks_like_disco(bytes(100))
