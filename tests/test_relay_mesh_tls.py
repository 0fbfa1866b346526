"""Mesh links verify the peer relay's TLS certificate (issue 14 item 2): the mesh key goes inside the TLS
connection, so a link that trusts any certificate hands the region's key to whoever sits in the middle.

Real TLS on loopback: a relay with a self-signed certificate, dialled by a mesh link that does not trust
it (refused, and the relay never sees the key), that is given the certificate as its CA file (connects),
or that is told to skip verification (connects). The same three through `turbowg relay` flags.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import re
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from turbowg.derp import keys
from turbowg.relay import fastpath
from turbowg.relay.http import RelayHTTPProtocol
from turbowg.relay.mesh import MeshConfigError, start_mesh
from turbowg.relay.server import DerpServer

MESH_KEY = "ab" * 32


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost that can serve as its own CA file."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                    x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .sign(key, hashes.SHA256())
    )
    crt, keyfile = directory / "relay.crt", directory / "relay.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    return crt, keyfile


@contextlib.asynccontextmanager
async def tls_relay(crt: Path, key: Path) -> AsyncIterator[tuple[DerpServer, int]]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(crt), str(key))
    server = DerpServer(keys.generate_private_key(), mesh_key=MESH_KEY)
    listener = await asyncio.get_running_loop().create_server(lambda: RelayHTTPProtocol(server), "127.0.0.1", 0,
                                                              ssl=ctx)
    try:
        yield server, listener.sockets[0].getsockname()[1]
    finally:
        listener.close()
        server.close()


async def until(cond, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


@pytest.mark.parametrize("trust", ["none", "ca-file", "skip-verify"])
def test_mesh_link_verifies_the_peer_relay_certificate(tmp_path: Path, trust: str) -> None:
    crt, key = self_signed(tmp_path)

    async def scenario() -> None:
        async with tls_relay(crt, key) as (remote, port):
            local = DerpServer(keys.generate_private_key(), mesh_key=MESH_KEY)
            kwargs = {"none": {}, "ca-file": {"ca_file": str(crt)}, "skip-verify": {"insecure_skip_verify": True}}[trust]
            mesh = await start_mesh(local, MESH_KEY, [f"https://127.0.0.1:{port}"], "local", **kwargs)
            try:
                link = mesh.peers[0]
                if trust == "none":
                    await until(lambda: link.counters.connect_failures >= 1)
                    assert link.counters.connects == 0 and not link.connected.is_set()
                    # the remote relay never got as far as a ClientInfo (it would carry the mesh key)
                    assert remote.metrics.current_connections == 0 and remote.watchers == set()
                else:
                    await mesh.wait_connected(10)
                    await until(lambda: len(remote.watchers) == 1)
                    assert link.counters.connects == 1 and link.remote_server_key == remote.public_key
            finally:
                await mesh.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_unreadable_mesh_ca_file_is_a_config_error(tmp_path: Path) -> None:
    async def scenario() -> None:
        local = DerpServer(keys.generate_private_key(), mesh_key=MESH_KEY)
        with pytest.raises(MeshConfigError):
            await start_mesh(local, MESH_KEY, ["https://127.0.0.1:1"], "local", ca_file=str(tmp_path / "missing.pem"))

    asyncio.run(scenario())


def relay_mesh_watchers(crt: Path, key: Path, psk: Path, *flags: str) -> tuple[int, str]:
    """Run `turbowg relay -dev` meshing with a TLS relay; returns (watchers the TLS relay saw, relay log)."""

    async def scenario() -> tuple[int, str]:
        async with tls_relay(crt, key) as (remote, port):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "turbowg", "relay", "-dev", "-a", "127.0.0.1:0", "-stun=false", "--workers", "1",
                "-hostname", "local", "-mesh-with", f"https://127.0.0.1:{port}", "-mesh-psk-file", str(psk), *flags,
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            )
            lines: list[str] = []
            try:
                assert proc.stdout is not None
                deadline = time.monotonic() + 20
                while time.monotonic() < deadline:
                    line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
                    lines.append(line)
                    if not line or re.search(r"mesh .*(connected|retrying)", line):
                        break
                await asyncio.sleep(0.2)
                return len(remote.watchers), "".join(lines)
            finally:
                proc.terminate()
                await proc.wait()

    return asyncio.run(asyncio.wait_for(scenario(), 40))


def test_relay_command_mesh_tls_flags(tmp_path: Path) -> None:
    crt, key = self_signed(tmp_path)
    psk = tmp_path / "mesh.key"
    psk.write_text(MESH_KEY + "\n")
    watchers, log = relay_mesh_watchers(crt, key, psk)
    assert watchers == 0 and "CERTIFICATE_VERIFY_FAILED" in log, log
    watchers, log = relay_mesh_watchers(crt, key, psk, "-mesh-ca", str(crt))
    assert watchers == 1, log
    # the relay command's TLS mesh link (on the worker's event loop) is handed to the C plane when it exists
    assert ("link in the C plane" in log) == fastpath.available(), log
    watchers, log = relay_mesh_watchers(crt, key, psk, "-mesh-insecure-skip-verify")
    assert watchers == 1, log
    help_text = subprocess.run([sys.executable, "-m", "turbowg", "relay", "--help"], capture_output=True, text=True,
                               timeout=30).stdout
    assert "-mesh-ca" in help_text and "-mesh-insecure-skip-verify" in help_text
