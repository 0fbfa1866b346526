"""`--certmode letsencrypt`: the relay's certificate from an ACME CA (RFC 8555), as derper's autocert.

Uses the `acme` package (certbot's client library). Validation is HTTP-01: the CA fetches
`http://<hostname>/.well-known/acme-challenge/<token>` from the relay's plain HTTP port, and the HTTP front
answers it with `acme_http01_handler(path)`. Tokens live as files in `<certdir>/acme-challenges/`, so any
worker process (SO_REUSEPORT spreads connections over all of them) can answer a challenge that worker 0
asked for.

Files in `--certdir` (created 0700 if missing):
  acme_account.key        the ACME account key (PEM, EC P-256, 0600)
  <hostname>.key          the certificate's private key (PEM, EC P-256, 0600)
  <hostname>.crt          the certificate chain as the CA issued it (PEM)
  acme-challenges/TOKEN   pending HTTP-01 answers (removed once the order is done)

These are the same file names `--certmode manual` reads, so a cached certificate can be served in either
mode. On start the cached certificate is used as it is when it is still valid for `--hostname` (the CA is
not contacted); otherwise a new one is obtained before the relay listens (with a short-lived HTTP-01
listener on the http port). While running, worker 0 checks every `check_interval` seconds and renews when
the certificate expires within `renew_before` (30 days, as autocert); every worker reloads the files when
they change (metacert.ReloadableTLS), so new connections get the new certificate without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import logging
import os
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

log = logging.getLogger("turbowg.relay.acme")

LETSENCRYPT_DIRECTORY = "https://acme-v02.api.letsencrypt.org/directory"
RENEW_BEFORE_DAYS = 30.0  # autocert's default RenewBefore
CHECK_INTERVAL = 12 * 3600.0
RETRY_INTERVAL = 600.0  # after a failed renewal (capped by check_interval)
ORDER_TIMEOUT = 120.0
CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
ACCOUNT_KEY_FILE = "acme_account.key"
CHALLENGE_DIR = "acme-challenges"

_TOKEN_OK = re.compile(r"^[A-Za-z0-9_-]{1,256}$")  # base64url, as RFC 8555 section 8.3
_LABEL_OK = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_challenge_dirs: list[Path] = []  # where acme_http01_handler looks (set up by CertManager.check_setup)


class AcmeError(Exception):
    """Something about ACME that the operator can fix; the message says what (no traceback needed)."""


def acme_http01_handler(path: str) -> bytes | None:
    """The body for `GET /.well-known/acme-challenge/TOKEN` (the key authorization), or None.

    None means "not an ACME challenge this relay has pending": the HTTP front then answers as usual
    (404). Safe to call from any worker and for any path.
    """
    if not path.startswith(CHALLENGE_PREFIX) or not _challenge_dirs:
        return None
    token = path[len(CHALLENGE_PREFIX):]
    if not _TOKEN_OK.match(token):
        return None
    for directory in _challenge_dirs:
        with contextlib.suppress(OSError):
            return (directory / token).read_bytes()
    return None


def check_hostname(hostname: str) -> str:
    """The DNS name a certificate can be ordered for (lower case), or AcmeError saying why not."""
    name = hostname.strip().rstrip(".").lower()
    if not name or name == "derp.example.com":
        raise AcmeError("--certmode letsencrypt needs --hostname set to this relay's public DNS name "
                        f"(got {hostname!r})")
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(name.strip("[]"))
        raise AcmeError(f"--hostname {hostname!r} is an IP address: ACME certificates (--certmode letsencrypt) "
                        "need a DNS name; use --certmode manual for an IP address certificate")
    labels = name.split(".")
    if len(name) > 253 or len(labels) < 2 or not all(_LABEL_OK.match(label) for label in labels):
        raise AcmeError(f"--hostname {hostname!r} is not a valid DNS name for an ACME certificate "
                        "(letters, digits and '-', at least two labels, e.g. derp1.example.net)")
    return name


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Atomically replace `path` with `data` (written 0600 by default, fsynced, then renamed)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _new_ec_key_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_expiry(cert_pem: bytes, hostname: str) -> datetime.datetime | None:
    """notAfter of the leaf in `cert_pem` if it names `hostname` (SAN dNSName), else None."""
    try:
        leaf = x509.load_pem_x509_certificates(cert_pem)[0]
    except (ValueError, IndexError):
        return None
    try:
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = [n.lower() for n in names.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        dns = []
    if hostname.lower() not in dns:
        return None
    return leaf.not_valid_after_utc


@dataclass
class AcmeSettings:
    hostname: str
    certdir: str
    directory_url: str = LETSENCRYPT_DIRECTORY
    ca_file: str = ""  # PEM bundle that signs the ACME server's HTTPS certificate ("" = system trust store)
    renew_before_days: float = RENEW_BEFORE_DAYS
    check_interval: float = CHECK_INTERVAL
    email: str = ""


class CertManager:
    """Obtains, caches and renews the relay's certificate for one host name."""

    def __init__(self, settings: AcmeSettings) -> None:
        self.settings = settings
        self.hostname = settings.hostname.strip().rstrip(".").lower()
        self.certdir = Path(settings.certdir or ".")
        self.cert_path = self.certdir / f"{self.hostname}.crt"
        self.key_path = self.certdir / f"{self.hostname}.key"
        self.account_key_path = self.certdir / ACCOUNT_KEY_FILE
        self.challenge_dir = self.certdir / CHALLENGE_DIR
        self.renew_before = datetime.timedelta(days=settings.renew_before_days)

    # -- set-up and cache ------------------------------------------------------------------------

    def check_setup(self) -> None:
        """Check the host name and make the cache usable (AcmeError otherwise); no network."""
        self.hostname = check_hostname(self.settings.hostname)
        self.cert_path = self.certdir / f"{self.hostname}.crt"
        self.key_path = self.certdir / f"{self.hostname}.key"
        if not self.settings.directory_url.startswith(("https://", "http://")):
            raise AcmeError(f"--acme-directory {self.settings.directory_url!r} is not an http(s) URL")
        if self.settings.ca_file and not Path(self.settings.ca_file).is_file():
            raise AcmeError(f"--acme-ca {self.settings.ca_file}: no such file")
        try:
            self.certdir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.challenge_dir.mkdir(mode=0o700, exist_ok=True)
            probe = self.certdir / f".turbowg-write-test.{os.getpid()}"
            _write_private(probe, b"")
            probe.unlink()
        except OSError as exc:
            raise AcmeError(f"--certdir {self.certdir}: cannot write the certificate cache there "
                            f"({exc.strerror or exc}); pick a writable directory") from None
        if self.challenge_dir not in _challenge_dirs:
            _challenge_dirs.append(self.challenge_dir)

    def cached_expiry(self) -> datetime.datetime | None:
        """Expiry of the cached certificate when it is usable for the host name (key present), else None."""
        try:
            pem = self.cert_path.read_bytes()
            if not self.key_path.is_file():
                return None
        except OSError:
            return None
        return cert_expiry(pem, self.hostname)

    def cache_usable(self, now: datetime.datetime | None = None) -> bool:
        expiry = self.cached_expiry()
        now = now or datetime.datetime.now(datetime.UTC)
        return expiry is not None and expiry > now

    def needs_renewal(self, now: datetime.datetime | None = None) -> bool:
        expiry = self.cached_expiry()
        now = now or datetime.datetime.now(datetime.UTC)
        return expiry is None or expiry - now <= self.renew_before

    # -- the ACME conversation -------------------------------------------------------------------

    def _account_key(self):  # -> josepy.JWKEC
        import josepy

        try:
            pem = self.account_key_path.read_bytes()
        except FileNotFoundError:
            pem = _new_ec_key_pem()
            _write_private(self.account_key_path, pem)
            log.info("ACME: new account key in %s", self.account_key_path)
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise AcmeError(f"{self.account_key_path}: not an EC private key; remove it to make a new account")
        return josepy.JWKEC(key=key)

    def obtain(self) -> datetime.datetime:
        """One ACME order for the host name, answered with HTTP-01; writes key and chain; returns notAfter.

        Blocking (requests underneath): call it from a thread when an event loop runs. HTTP-01 answers
        must be reachable on the http port while it runs (acme_http01_handler).
        """
        import requests
        from acme import challenges, client, errors, messages

        settings = self.settings
        url = settings.directory_url
        account_key = self._account_key()
        net = client.ClientNetwork(account_key, alg=_jws_alg(), user_agent="turbowg-relay",
                                   verify_ssl=settings.ca_file or True, timeout=30)
        tokens: list[Path] = []
        try:
            try:
                directory = client.ClientV2.get_directory(url, net)
            except requests.exceptions.SSLError as exc:
                raise AcmeError(f"ACME directory {url}: TLS certificate not trusted ({_short(exc)}); "
                                "give the CA's certificate with --acme-ca FILE") from None
            except requests.exceptions.RequestException as exc:
                raise AcmeError(f"cannot reach the ACME directory {url}: {_short(exc)}") from None
            except (ValueError, errors.Error) as exc:
                raise AcmeError(f"{url} is not an ACME directory: {_short(exc)}") from None
            acme = client.ClientV2(directory, net=net)
            registration = messages.NewRegistration.from_data(
                email=settings.email or None, terms_of_service_agreed=True)
            try:
                acme.new_account(registration)
            except errors.ConflictError as exc:  # the key has an account already: use it
                net.account = messages.RegistrationResource(body=messages.Registration(), uri=exc.location)
            key_pem = _new_ec_key_pem()
            from acme import crypto_util

            csr = crypto_util.make_csr(key_pem, [self.hostname])
            order = acme.new_order(csr)
            for authz in order.authorizations:
                if authz.body.status == messages.STATUS_VALID:
                    continue
                http01 = [c for c in authz.body.challenges if isinstance(c.chall, challenges.HTTP01)]
                if not http01:
                    raise AcmeError(f"the ACME server offers no HTTP-01 challenge for {self.hostname}")
                chall = http01[0]
                response, validation = chall.response_and_validation(account_key)
                token_file = self.challenge_dir / chall.chall.encode("token")
                _write_private(token_file, validation.encode(), mode=0o644)
                tokens.append(token_file)
                acme.answer_challenge(chall, response)
            deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_TIMEOUT)
            try:
                order = acme.poll_and_finalize(order, deadline=deadline)
            except errors.ValidationError as exc:
                details = "; ".join(_authz_problem(a) for a in exc.failed_authzrs) or str(exc)
                raise AcmeError(f"the ACME server could not validate {self.hostname} over HTTP-01 "
                                f"(it must reach http://{self.hostname}/.well-known/acme-challenge/ on "
                                f"this relay's http port): {details}") from None
            except errors.TimeoutError:
                raise AcmeError(f"ACME order for {self.hostname} not done within {ORDER_TIMEOUT:.0f} s") from None
            chain = order.fullchain_pem.encode()
        except AcmeError:
            raise
        except messages.Error as exc:
            raise AcmeError(f"ACME server refused the order for {self.hostname}: {exc}") from None
        except requests.exceptions.RequestException as exc:
            raise AcmeError(f"ACME server {url} unreachable during the order: {_short(exc)}") from None
        except errors.Error as exc:
            raise AcmeError(f"ACME order for {self.hostname} failed: {_short(exc)}") from None
        finally:
            for t in tokens:
                with contextlib.suppress(OSError):
                    t.unlink()
            net.session.close()  # no keep-alive socket to the CA left over (and inherited by workers)
        expiry = cert_expiry(chain, self.hostname)
        if expiry is None:
            raise AcmeError(f"the ACME server issued a certificate that does not name {self.hostname}")
        _write_private(self.key_path, key_pem)  # key first: readers reload when the .crt changes
        _write_private(self.cert_path, chain, mode=0o644)
        log.info("ACME: certificate for %s obtained from %s, valid until %s", self.hostname, url,
                 expiry.isoformat())
        return expiry

    def obtain_with_listener(self, host: str, port: int) -> datetime.datetime:
        """obtain() with a temporary HTTP-01 listener on host:port (before the relay's own listeners)."""
        try:
            server = _ChallengeServer((host or "", port))
        except OSError as exc:
            raise AcmeError(f"cannot listen on {host or '*'}:{port} for the ACME HTTP-01 challenge: {exc}") from None
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                  name="acme-http01", daemon=True)
        thread.start()
        try:
            return self.obtain()
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

    async def renew_loop(self, on_renewed: Callable[[], None]) -> None:
        """Check every check_interval; renew within renew_before of expiry; retry failures sooner."""
        interval = max(0.05, self.settings.check_interval)
        while True:
            delay = interval
            if self.needs_renewal():
                try:
                    await asyncio.to_thread(self.obtain)
                    on_renewed()
                except AcmeError as exc:
                    log.warning("ACME: renewal for %s failed (retrying): %s", self.hostname, exc)
                    delay = min(interval, RETRY_INTERVAL)
                except Exception:  # a renewal bug must not end the relay: log and retry
                    log.exception("ACME: renewal for %s failed unexpectedly", self.hostname)
                    delay = min(interval, RETRY_INTERVAL)
            await asyncio.sleep(delay)


def prepare_certificate(manager: CertManager, http_host: str, http_port: int) -> None:
    """Start-up: use the cached certificate if still valid, else obtain one (HTTP-01 on http_port)."""
    manager.check_setup()
    expiry = manager.cached_expiry()
    now = datetime.datetime.now(datetime.UTC)
    if expiry is not None and expiry > now:
        log.info("ACME: using the cached certificate %s (valid until %s%s)", manager.cert_path,
                 expiry.isoformat(), ", renewal due" if expiry - now <= manager.renew_before else "")
        return
    if http_port <= 0:
        raise AcmeError("--certmode letsencrypt validates with HTTP-01 and needs the plain HTTP port: "
                        "give --http-port (80 for a public CA)")
    manager.obtain_with_listener(http_host, http_port)


class _ChallengeHandler(BaseHTTPRequestHandler):
    server_version = "turbowg-acme"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        body = acme_http01_handler(self.path.split("?", 1)[0])
        self.send_response(200 if body is not None else 404)
        body = body if body is not None else b"not found\n"
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        log.debug("ACME challenge listener: " + format, *args)


class _ChallengeServer(HTTPServer):
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int]) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _ChallengeHandler)


def _jws_alg():
    import josepy

    return josepy.ES256


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _authz_problem(authzr) -> str:
    for chall in getattr(authzr.body, "challenges", ()):
        if chall.error is not None:
            return f"{authzr.body.identifier.value}: {chall.error}"
    return f"{authzr.body.identifier.value}: {authzr.body.status}"
