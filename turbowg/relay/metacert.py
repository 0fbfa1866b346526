"""derper's "meta certificate": an extra self-signed cert appended to the TLS chain.

Its subject CN is `derpkey<hex public key>` and its serial number the protocol version. A Tailscale
client that finds it in the (encrypted, TLS 1.3) certificate chain already knows the server's DERP
key, so it sends `Derp-Fast-Start: 1` and skips a round trip. Clients verify the real chain as usual;
the extra certificate is only read, never trusted.
"""

from __future__ import annotations

import datetime
import os
import ssl
import tempfile
import warnings
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from turbowg.derp.codec import PROTOCOL_VERSION

META_CERT_CN_PREFIX = "derpkey"


def make_meta_cert_pem(server_public: bytes) -> bytes:
    key = ed25519.Ed25519PrivateKey.generate()
    # 71 characters: longer than the X.520 upper bound of 64 that cryptography checks by default, but
    # it is exactly what derper puts there (and what Tailscale clients look for).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        cn = x509.NameAttribute(NameOID.COMMON_NAME, META_CERT_CN_PREFIX + server_public.hex(), _validate=False)
    name = x509.Name([cn])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(PROTOCOL_VERSION)
        .not_valid_before(now - datetime.timedelta(days=30))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, None)
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def server_tls_context(cert_path: Path, key_path: Path, server_public: bytes | None) -> ssl.SSLContext:
    """TLS 1.2+ server context from PEM files, with the meta certificate appended when a key is given."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if server_public is None:
        ctx.load_cert_chain(str(cert_path), str(key_path))
        return ctx
    chain = cert_path.read_bytes().rstrip() + b"\n" + make_meta_cert_pem(server_public)
    fd, tmp = tempfile.mkstemp(prefix="turbowg-derp-chain-", suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(chain)
        ctx.load_cert_chain(tmp, str(key_path))  # read into the context; the file is not needed after
    finally:
        os.unlink(tmp)
    return ctx


TCP_AVAILABLE_ULP = "/proc/sys/net/ipv4/tcp_available_ulp"


def kernel_tls_available(path: str = TCP_AVAILABLE_ULP) -> bool | None:
    """Whether the kernel offers kTLS (the `tls` TCP ULP is listed); None when that cannot be read."""
    try:
        with open(path) as f:
            return "tls" in f.read().split()
    except OSError:  # e.g. not shown in a network namespace other than the first
        return True if os.path.isdir("/sys/module/tls") else None


def tls_offload_summary(path: str = TCP_AVAILABLE_ULP) -> str:
    """One log line: how the relay's TLS records are processed."""
    have = kernel_tls_available(path)
    kernel = {True: "the kernel offers kTLS (tcp_available_ulp lists tls)",
              False: "the kernel offers no kTLS (tls not in tcp_available_ulp; modprobe tls)",
              None: f"kTLS unknown ({path} not readable here)"}[have]
    # Python's ssl module cannot hand a session to the kernel (no SSL_OP_ENABLE_KTLS / BIO socket access)
    return f"TLS in user space (OpenSSL through Python's ssl module, no kTLS); {kernel}"


def _file_stamp(*paths: Path) -> tuple:
    out = []
    for p in paths:
        try:
            st = p.stat()
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append(None)
    return tuple(out)


class ReloadableTLS:
    """A server TLS context whose certificate can be replaced while listeners keep running.

    `context` is what the listener gets (it is never replaced). Its SNI callback, which OpenSSL calls
    on every ClientHello (with or without SNI), moves each new connection onto the newest context built
    by `reload()`; connections already established keep the certificate they were handshaken with.
    """

    def __init__(self, cert_path: Path, key_path: Path, server_public: bytes | None) -> None:
        self.cert_path, self.key_path, self.server_public = Path(cert_path), Path(key_path), server_public
        self._stamp = _file_stamp(self.cert_path, self.key_path)
        self.context = server_tls_context(self.cert_path, self.key_path, server_public)
        self.current = self.context
        self.context.sni_callback = self._select
        self.reloads = 0

    def _select(self, ssl_obj, server_name, ctx) -> None:  # noqa: ANN001 (ssl's callback signature)
        current = self.current
        if current is not ctx:
            ssl_obj.context = current
        return None

    def reload(self, force: bool = False) -> bool:
        """Load the files again if they changed (or `force`); True when a new certificate is in use.

        A chain that does not load (e.g. the key and certificate written by someone else not yet both
        in place) raises ssl.SSLError/OSError/ValueError and leaves the current context serving.
        """
        stamp = _file_stamp(self.cert_path, self.key_path)
        if not force and stamp == self._stamp:
            return False
        ctx = server_tls_context(self.cert_path, self.key_path, self.server_public)
        self.current = ctx
        self._stamp = stamp
        self.reloads += 1
        return True
