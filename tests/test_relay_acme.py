"""`turbowg relay --certmode letsencrypt` against a real ACME server: Debian's pebble, in a network namespace.

    namespace twacme<tag> (lo only)
      pebble-challtestsrv   DNS on 127.0.0.1:8053: every A query -> 127.0.0.1 (no AAAA)
      pebble                ACME on https://127.0.0.1:14000/dir, management on :15000, HTTPS with a CA this
                            test makes; resolves names through challtestsrv; HTTP-01 validation on port 80
      turbowg relay         -hostname derp.acme.test, TLS on 127.0.0.1:443, HTTP (ACME HTTP-01) on :80
      client script         fetches pebble's issuing root from :15000/roots/0, connects two DERP clients
                            with full verification for derp.acme.test, sends a packet one to the other

Validation is real (no PEBBLE_VA_ALWAYS_VALID): pebble resolves derp.acme.test and fetches the token from
the relay's port 80. Random VA sleeps, bad-nonce rejection and authorization reuse are switched off so that
each order is validated and the test is quick. Everything created (namespace, processes, temp dir) is
removed on the way out, also on failure; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from turbowg.relay import acme as relay_acme
from turbowg.testing.marks import needs_netns
from turbowg.testing.netns import delete_namespace, exec_args, run, wait_until

HOSTNAME = "derp.acme.test"
DIRECTORY = "https://127.0.0.1:14000/dir"
have_pebble = pytest.mark.skipif(shutil.which("pebble") is None or shutil.which("pebble-challtestsrv") is None,
                                 reason="needs Debian's pebble (apt-get install -y pebble)")

# Runs inside the namespace: trust only pebble's issuing root, two DERP clients, one packet.
CLIENT = r"""
import asyncio, json, ssl, sys, urllib.request
from cryptography import x509
from turbowg.derp.client import DerpClient

minica, hostname, port, root_file = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

async def main():
    try:
        root = open(root_file).read()  # fetched before (pebble may be gone now; its root is per run)
    except FileNotFoundError:
        mgmt = ssl.create_default_context(cafile=minica)
        with urllib.request.urlopen("https://127.0.0.1:15000/roots/0", context=mgmt, timeout=10) as r:
            root = r.read().decode()
        open(root_file, "w").write(root)
    ctx = ssl.create_default_context(cadata=root)  # verifies chain and host name
    a, b = DerpClient(), DerpClient()
    await a.connect(host="127.0.0.1", port=port, tls=True, ssl_context=ctx, server_hostname=hostname)
    await b.connect(host="127.0.0.1", port=port, tls=True, ssl_context=ctx, server_hostname=hostname)
    der = a._protocol.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
    msg = None
    for _ in range(50):  # with several workers, b's shard may announce b a moment after it connected
        a.send(b.public_key, b"hello over pebble's certificate")
        try:
            msg = await asyncio.wait_for(b.recv(), 0.2)
        except asyncio.TimeoutError:
            continue
        if hasattr(msg, "data"):
            break
    await a.close(); await b.close()
    leaf = x509.load_der_x509_certificate(der)
    print(json.dumps({"serial": leaf.serial_number, "packet": bytes(msg.data).decode(),
                      "issuer": leaf.issuer.rfc4514_string()}))

asyncio.run(main())
"""


def _ca_and_server_cert(out: Path) -> None:
    """A throw-away CA (ca.pem) and pebble's HTTPS certificate for 127.0.0.1 (cert.pem, key.pem)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "turbowg test: pebble's HTTPS CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pebble")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (out / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (out / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (out / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                                    serialization.NoEncryption()))


@dataclass
class Env:
    ns: str
    tmp: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def minica(self) -> Path:
        return self.tmp / "ca.pem"

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(exec_args(self.ns, *argv), stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

    def log(self, name: str) -> str:
        with contextlib.suppress(OSError):
            return (self.tmp / f"{name}.log").read_text(errors="replace")
        return ""

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def start_pebble(self) -> subprocess.Popen:
        proc = self.start("pebble", ["pebble", "-config", "pebble.json", "-dnsserver", "127.0.0.1:8053"],
                          env={"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"})
        if not wait_until(lambda: "ACME directory available" in self.log("pebble") or proc.poll() is not None, 20,
                          interval=0.1):
            pass
        assert "ACME directory available" in self.log("pebble"), self.log("pebble")
        return proc

    def relay(self, certdir: str, *extra: str, name: str = "relay") -> subprocess.Popen:
        return self.start(name, [sys.executable, "-m", "turbowg", "relay", "-c", "relay-key.json",
                                 "-hostname", HOSTNAME, "-certmode", "letsencrypt", "-certdir", certdir,
                                 "-acme-directory", DIRECTORY, "-acme-ca", str(self.minica),
                                 "-a", "127.0.0.1:443", "-http-port", "80", "-stun=false", *extra])

    def wait_listening(self, proc: subprocess.Popen, name: str = "relay", timeout: float = 60) -> None:
        wait_until(lambda: "listening on" in self.log(name) or proc.poll() is not None, timeout, interval=0.1)
        assert "listening on" in self.log(name), self.log(name)

    def client(self) -> dict:
        script = self.tmp / "client.py"
        script.write_text(CLIENT)
        out = run(*exec_args(self.ns, sys.executable, str(script), str(self.minica), HOSTNAME, "443",
                                  str(self.tmp / "pebble-root.pem")), timeout=60,
                  check=False)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def env() -> Iterator[Env]:
    ns = f"twacme{uuid.uuid4().hex[:6]}"
    tmp = Path(tempfile.mkdtemp(prefix="turbowg-acme-"))
    e = Env(ns, tmp)
    try:
        run("ip", "netns", "add", ns)
        run("ip", "-n", ns, "link", "set", "lo", "up")
        _ca_and_server_cert(tmp)
        (tmp / "pebble.json").write_text(json.dumps({"pebble": {
            "listenAddress": "127.0.0.1:14000", "managementListenAddress": "127.0.0.1:15000",
            "certificate": "cert.pem", "privateKey": "key.pem", "httpPort": 80, "tlsPort": 5001,
            "ocspResponderURL": "", "externalAccountBindingRequired": False}}))
        cts = e.start("challtestsrv", ["pebble-challtestsrv", "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
                                       "-http01", "", "-https01", "", "-tlsalpn01", "",
                                       "-dns01", "127.0.0.1:8053", "-management", "127.0.0.1:8055"])
        wait_until(lambda: "Starting management server" in e.log("challtestsrv") or cts.poll() is not None, 20,
                   interval=0.1)
        assert cts.poll() is None, e.log("challtestsrv")
        yield e
    finally:
        for proc in reversed(e.procs):
            with contextlib.suppress(Exception):
                e.stop(proc)
        delete_namespace(ns)
        shutil.rmtree(tmp, ignore_errors=True)
    assert ns not in run("ip", "netns", "list").stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


@needs_netns
@have_pebble
@pytest.mark.netns
def test_certificate_from_pebble_cached_and_reused_without_the_ca(env: Env) -> None:
    pebble = env.start_pebble()
    relay = env.relay("certs", "--workers", "1")
    env.wait_listening(relay)
    first = env.client()
    assert first["packet"] == "hello over pebble's certificate"
    assert "Pebble Intermediate CA" in first["issuer"]
    certs = env.tmp / "certs"
    assert _mode(certs) == 0o700
    assert _mode(certs / f"{HOSTNAME}.key") == 0o600 and _mode(certs / "acme_account.key") == 0o600
    assert not list((certs / "acme-challenges").iterdir())  # tokens removed once the order is done
    assert f"validate w/ HTTP: http://{HOSTNAME}:80/.well-known/acme-challenge/" in env.log("pebble")

    # Restart with the CA gone: the cached certificate is served as it is, pebble is not needed.
    env.stop(relay)
    env.stop(pebble)
    relay = env.relay("certs", "--workers", "1", name="relay2")
    env.wait_listening(relay, name="relay2")
    assert "using the cached certificate" in env.log("relay2")
    assert "obtained" not in env.log("relay2")
    again = env.client()
    assert again["serial"] == first["serial"] and again["packet"] == first["packet"]


@needs_netns
@have_pebble
@pytest.mark.netns
def test_renewal_reloads_the_certificate_without_restart(env: Env) -> None:
    """A renewal threshold longer than pebble's 5-year certificates: every check renews. Two workers: worker
    0 renews (HTTP-01 may land on either worker), both pick the new files up for new connections."""
    env.start_pebble()
    relay = env.relay("certs", "--workers", "2", "-acme-renew-before", "100000", "-acme-check-interval", "1")
    env.wait_listening(relay)
    serials = {env.client()["serial"]}
    assert wait_until(lambda: env.log("relay").count("obtained from") >= 3, 60, interval=0.2), env.log("relay")
    deadline = time.monotonic() + 60
    for _ in range(30):  # both workers serve renewed certificates (connections spread by SO_REUSEPORT)
        serials.add(env.client()["serial"])
        if len(serials) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(serials) >= 3, (serials, env.log("relay"))
    assert "reloaded for new connections" in env.log("relay")
    assert relay.poll() is None


@pytest.mark.parametrize("args, message", [
    (["-hostname", "203.0.113.7"], "is an IP address"),
    (["-hostname", "derp.example.com"], "public DNS name"),
    (["-hostname", "bad_name!.test"], "not a valid DNS name"),
    (["-acme-directory", "https://127.0.0.1:1/dir"], "cannot reach the ACME directory https://127.0.0.1:1/dir"),
    (["-certdir", "{tmp}/afile/certs"], "cannot write the certificate cache"),
    (["-http-port", "-1"], "needs the plain HTTP port"),
    (["-acme-ca", "{tmp}/missing.pem"], "no such file"),
])
def test_user_errors_are_one_clear_line(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "afile").write_text("a file, not a directory")
    base = {"-hostname": "derp.acme.test", "-certdir": str(tmp_path / "certs"),
            "-acme-directory": "https://127.0.0.1:1/dir", "-http-port": str(_free_port())}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1].format(tmp=tmp_path)
    argv = [sys.executable, "-m", "turbowg", "relay", "-c", str(tmp_path / "k.json"), "-certmode", "letsencrypt",
            "-a", "127.0.0.1:0", "-stun=false"]
    for k, v in base.items():
        argv += [k, v]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_http01_handler_answers_pending_tokens_only(tmp_path: Path) -> None:
    manager = relay_acme.CertManager(relay_acme.AcmeSettings(hostname="derp.acme.test", certdir=str(tmp_path)))
    manager.check_setup()
    (manager.challenge_dir / "tok-EN_1").write_bytes(b"tok-EN_1.thumbprint")
    assert relay_acme.acme_http01_handler("/.well-known/acme-challenge/tok-EN_1") == b"tok-EN_1.thumbprint"
    assert relay_acme.acme_http01_handler("/.well-known/acme-challenge/other") is None
    assert relay_acme.acme_http01_handler("/.well-known/acme-challenge/../acme_account.key") is None
    assert relay_acme.acme_http01_handler("/derp") is None


@needs_netns
@have_pebble
@pytest.mark.netns
def test_failed_validation_is_one_clear_line(env: Env) -> None:
    """pebble validates on port 80, the relay answers on 8080 (as when port 80 is blocked or the name points
    elsewhere): the relay exits 2 with pebble's reason, no traceback, no certificate, no token left."""
    env.start_pebble()
    relay = env.relay("certs", "--workers", "1", "-http-port", "8080")
    relay.wait(timeout=150)
    log = env.log("relay")
    assert relay.returncode == 2, log
    assert "could not validate derp.acme.test over HTTP-01" in log and "Traceback" not in log, log
    certs = env.tmp / "certs"
    assert not (certs / f"{HOSTNAME}.crt").exists() and not list((certs / "acme-challenges").iterdir())
