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
