"""Fuzzing every parser that sees hostile bytes (issue 14): each target in turbowg.fuzz.targets runs over its
seed corpus (tests/fuzz_corpus/<target>/) plus a fixed-seed batch of random mutations, and under hypothesis
(derandomized). Findings of the fuzzers live on below as named regression tests with their exact inputs.

Longer runs: `turbowg fuzz TARGET --seconds N` (atheris when installed, else random mutation).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from turbowg.fuzz import runner, seeds, targets

CORPUS = Path(__file__).parent / "fuzz_corpus"
NAMES = sorted(targets.TARGETS)
# Mutants per target in the plain pytest run; the slowest targets (a device or TCP connection built per
# input) get fewer. The whole file stays well under a minute on one core.
MUTANTS = {"wg_message": 600, "noise_handshake": 800, "relay_http": 800, "derp_client": 1500,
           "tun_ingest": 2000, "derp_keys": 1500}
DEFAULT_MUTANTS = 3000
HYPOTHESIS = settings(max_examples=120, derandomize=True, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))


def _fail(name: str, stats: runner.Stats) -> str:
    assert stats.finding is not None
    return f"{name}: finding on input {stats.finding.data[:200]!r}\n{stats.finding.error}"


def test_every_target_has_seeds_in_the_repo_corpus() -> None:
    for name in NAMES:
        assert seeds.load_corpus(CORPUS, name), f"tests/fuzz_corpus/{name}/ is empty (turbowg fuzz --make-corpus)"
    assert set(seeds.SEEDS) == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_fuzz_target_corpus_and_mutations(name: str) -> None:
    target = targets.get(name)
    corpus = seeds.load_corpus(CORPUS, name) + seeds.seeds(name)
    stats = runner.run_inputs(target.fn, runner.mutations(corpus, seed=14, count=MUTANTS.get(name, DEFAULT_MUTANTS)))
    assert stats.finding is None, _fail(name, stats)


@pytest.mark.parametrize("name", NAMES)
@HYPOTHESIS
@given(data=st.binary(max_size=512))
def test_fuzz_target_hypothesis(name: str, data: bytes) -> None:
    targets.get(name).fn(data)


def test_seeds_reach_the_deep_parsers() -> None:
    """The seeds are real messages: the initiation is consumed and answered, the response and the cookie reply
    are accepted, the DERP handshakes complete, the STUN request is answered."""
    from turbowg.noise.handshake import Handshake, consume_initiation, consume_response

    a, b = targets._identities()
    initiation, response, cookie = seeds.seeds("noise_handshake")[:3]
    hs_b = Handshake(a.public_key, local=b)
    assert consume_initiation(b, initiation, lambda key: hs_b, targets.NOW) is hs_b
    hs_a, _init, generator = targets._a_initiating()
    assert consume_response(a, response, lambda index: hs_a) is hs_a
    assert generator.consume_reply(cookie, targets.NOW)

    device = targets._device_b()
    wg_initiation = seeds.seeds("wg_message")[0][1:]
    count, transmits = device.handle_udp_packed(bytearray(wg_initiation), [0, len(wg_initiation), 148],
                                                [targets.A_ENDPOINT], targets.NOW)
    assert [len(d) for t in transmits for d in t.datagrams] == [92]

    s = targets.mod("stun")
    request = seeds.seeds("stun")[0][1:]
    assert s.parse_binding_request(request) == bytes(range(1, 13))


def test_cli_list_and_short_run(tmp_path: Path) -> None:
    from turbowg.cli import main

    assert main(["fuzz", "--list"]) == 0
    assert main(["fuzz", "uapi_set", "--mutate", "--seconds", "0.5", "--corpus", str(CORPUS),
                 "--crash-dir", str(tmp_path)]) == 0
    assert main(["fuzz", "no_such_target"]) == 2


def test_cli_writes_a_finding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(data: bytes) -> None:
        if b"=" in data:
            raise RuntimeError("boom")

    monkeypatch.setitem(targets.TARGETS, "uapi_set", targets.Target("uapi_set", broken, "test", "test"))
    assert runner.fuzz_mutate("uapi_set", 5.0, str(CORPUS), str(tmp_path), 1) == 1
    (crash,) = (tmp_path / "uapi_set").iterdir()
    assert b"=" in crash.read_bytes()


# -------------------------------------------------------------------------------------------------------------
# Regression tests: the inputs the fuzzers found, exactly.


def test_regression_wg_base64_key_with_nonzero_padding_bits() -> None:
    """decode_key accepted '...Hh9=' as the key '...Hh8=' (wg refuses the non-canonical spelling)."""
    from turbowg.noise.keys import KeyFormatError, decode_key

    data = b"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh9="
    with pytest.raises(KeyFormatError):
        decode_key(data.decode())
    targets.wg_keys(data)


def test_regression_wg_hex_key_with_inner_spaces() -> None:
    """decode_hex_key returned 31 bytes for 64 characters with spaces in them (bytes.fromhex skips them)."""
    from turbowg.noise.keys import KeyFormatError, decode_hex_key

    data = b"00 11 " + b"ab" * 29
    with pytest.raises(KeyFormatError):
        decode_hex_key(data.decode())
    targets.wg_keys(data)


def test_regression_uapi_number_longer_than_int_limit() -> None:
    """listen_port= with 5000 digits raised ValueError (int's 4300-digit limit), not UAPIError(EINVAL)."""
    from turbowg.uapi.model import UAPIError
    from turbowg.uapi.protocol import ERR_INVALID, parse_set

    peer = "public_key=" + "ab" * 32
    for lines in (["listen_port=" + "1" * 5000], [peer, "persistent_keepalive_interval=" + "9" * 5000],
                  [peer, "endpoint=1.2.3.4:" + "1" * 5000]):
        with pytest.raises(UAPIError) as info:
            parse_set(lines)
        assert info.value.errno == ERR_INVALID
    assert parse_set(["fwmark=" + "0" * 5000 + "7"]).fwmark == 7  # leading zeros are still a number
    targets.uapi_set(("listen_port=" + "1" * 5000).encode())


@pytest.mark.parametrize("info", [b'{"version":true}', b'{"Version":false}', b'{"version":1e0}'])
def test_regression_derp_info_json_wrong_types(info: bytes) -> None:
    """A sealed ServerInfo / ClientInfo of {"version":true} parsed to version=True (a bool is an int in Python),
    where derper's json.Unmarshal refuses it; the targets now check the parsed types (type(v) is int)."""
    sealed_input = bytes([targets.DERP_SEALED_INFO, 255]) + len(info).to_bytes(2, "big") + info
    targets.derp_client(sealed_input)
    targets.derp_server(sealed_input)
    codec = targets.mod("derp_codec")
    for parse in (codec.ServerInfo.from_json, codec.ClientInfo.from_json):
        with pytest.raises(codec.FrameError):
            parse(info)


def test_encode_set_writes_every_field_in_uapi_order() -> None:
    """The uapi_set round trip's encoder: each set field once, in wg's order; unset (None) and false flags
    left out, but a zero port / fwmark written (0 is a value, not 'unset')."""
    from turbowg.uapi.protocol import parse_set

    key, psk = "ab" * 32, "cd" * 32
    lines = ["private_key=" + "11" * 32, "listen_port=0", "fwmark=0", "replace_peers=true",
             f"public_key={key}", "update_only=true", f"preshared_key={psk}", "endpoint=1.2.3.4:51820",
             "persistent_keepalive_interval=25", "replace_allowed_ips=true", "allowed_ip=10.0.0.0/8",
             "protocol_version=1", f"public_key={psk}", "remove=true", "public_key=" + "ef" * 32]
    assert targets.encode_set(parse_set(lines)) == lines
    assert targets.encode_set(parse_set(["listen_port=7"])) == ["listen_port=7"]


def test_regression_derp_info_json_nested_too_deep() -> None:
    """A ClientInfo / ServerInfo of '[' * 100000 raised RecursionError out of json.loads."""
    codec = targets.mod("derp_codec")
    for cls in (codec.ClientInfo, codec.ServerInfo):
        with pytest.raises(codec.FrameError):
            cls.from_json(b"[" * 100000)
    body = b"[" * 20000
    targets.derp_client(b"\x01\xff" + len(body).to_bytes(2, "big") + body)


def test_regression_derper_key_file_nested_too_deep(tmp_path: Path) -> None:
    keys = targets.mod("derp_keys")
    path = tmp_path / "derper.key"
    path.write_text("[" * 100000)
    with pytest.raises(keys.KeyFormatError):
        keys.load_or_create_config(path)
    path.write_text(json.dumps({"PrivateKey": keys.format_private_key(bytes(range(32)))}))
    assert keys.load_or_create_config(path) == bytes(range(32))


def test_regression_relay_listen_address_odd_digits() -> None:
    """parse_addr: '²' raised ValueError from int(); '99999' was accepted as a port; int() also took '1_0'."""
    app = targets.mod("relay_app")
    for text in ("²", "99999", ":1_0", "[::1]:١٢"):
        with pytest.raises(app.RelayConfigError):
            app.parse_addr(text, 443)
    assert app.parse_addr("8443", 1) == ("", 8443)


def test_regression_mesh_peer_unbalanced_bracket() -> None:
    """PeerAddress.parse('[::1') raised urlsplit's ValueError('Invalid IPv6 URL'), not MeshConfigError."""
    mesh = targets.mod("mesh")
    for text in ("[::1", "http://[abc]:1", "[x]"):
        with pytest.raises(mesh.MeshConfigError):
            mesh.PeerAddress.parse(text, False)
        targets.relay_addr(text.encode())


def test_regression_mesh_psk_file_not_utf8(tmp_path: Path) -> None:
    """read_mesh_key on a file that is not UTF-8 raised UnicodeDecodeError, not RelayConfigError."""
    app = targets.mod("relay_app")
    path = tmp_path / "mesh.key"
    path.write_bytes(b"96979899\x01a)b9c9d9e9fa0a1a2a3a4a5a6a7a8a9aaabacad\xe009\xba\\0\xf9c\x8a\xe7o\xf8\x90aeafb0b1b2b3b4b5\n")
    with pytest.raises(app.RelayConfigError):
        app.read_mesh_key(str(path))


def test_regression_derp_client_info_mesh_key_lone_surrogate() -> None:
    """A ClientInfo whose meshKey is the JSON string "\\ud800" made ServerConnection raise UnicodeEncodeError
    (out of the asyncio protocol) when the relay has a mesh key; now it is simply not the mesh key."""
    info = b'{"meshKey":"\\ud800","version":2}'
    data = b"\x03\xff" + len(info).to_bytes(2, "big") + info
    targets.derp_server(data)
    proto = targets.mod("server_proto")
    log: list = []
    conn = proto.ServerConnection(targets.DERP_SERVER_PRIVATE, targets._Events(log), mesh_key=targets.DERP_MESH_KEY)
    codec, keys = targets.mod("derp_codec"), targets.mod("derp_keys")
    server_public, client_public = targets._derp_publics()
    sealed = keys.seal_to(targets.DERP_CLIENT_PRIVATE, server_public, info)
    conn.receive_data(codec.encode_client_info(client_public, sealed))
    assert log[0][0] == "auth" and log[0][3] is False  # authenticated, without mesh rights


def test_regression_derp_server_key_low_order_point() -> None:
    """A ServerKey frame carrying the all-zero key made ClientConnection raise nacl's RuntimeError ("Unexpected
    library error": no shared secret with a low-order point), not ClientProtocolError. atheris, 60 s run."""
    import base64

    data = base64.b64decode("AP8BAAAAKERFUlDwn5SRAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAACAAAAAAAAAB0eHw==")
    targets.derp_client(data)
    client_proto, codec = targets.mod("client_proto"), targets.mod("derp_codec")
    conn = client_proto.ClientConnection(targets.DERP_CLIENT_PRIVATE)
    with pytest.raises(client_proto.ClientProtocolError):
        conn.receive_data(codec.encode_server_key(bytes(32)))
