"""`turbowg relay` and `turbowg derp-client` as processes (python -m turbowg): derper-style flags, send/recv/ping/info,
and clear errors (no tracebacks) for user mistakes."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ENTRY = ("-m", "turbowg")


def turbowg(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *ENTRY, *args], capture_output=True, text=True, timeout=timeout)


@contextmanager
def relay_process(*extra: str) -> Iterator[str]:
    proc = subprocess.Popen(
        [sys.executable, *ENTRY, "relay", "-dev", "-a", "127.0.0.1:0", "-stun=false", "--workers", "1", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 20
        port = None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            m = re.search(r"listening on \[\('127\.0\.0\.1', (\d+)\)\]", line)
            if m:
                port = int(m.group(1))
                break
        assert port is not None, "relay did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_relay_and_client_commands(tmp_path: Path) -> None:
    keyfile = tmp_path / "derper.key"
    with relay_process("-c", str(keyfile)) as url:
        info = turbowg("derp-client", "info", url)
        assert info.returncode == 0, info.stderr
        from turbowg.derp import keys

        relay_key = keys.format_public_key(keys.public_key(keys.load_or_create_config(keyfile)))
        assert f"relay {relay_key}" in info.stdout

        receiver_priv = keys.generate_private_key()
        receiver_pub = keys.format_public_key(keys.public_key(receiver_priv))
        recv = subprocess.Popen(
            [sys.executable, *ENTRY, "derp-client", "recv", url, "--count", "3", "--timeout", "20",
             "--private-key", keys.format_private_key(receiver_priv)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert recv.stdout is not None
        assert recv.stdout.readline().strip() == f"listening as {receiver_pub}"
        sent = turbowg("derp-client", "send", url, "--to", receiver_pub, "--count", "3", "--data", "over the relay")
        assert sent.returncode == 0, sent.stderr
        out, err = recv.communicate(timeout=25)
        assert recv.returncode == 0, err
        assert out.count("14 bytes: b'over the relay'") == 3

        ping = turbowg("derp-client", "ping", url, "--count", "2")
        assert ping.returncode == 0 and ping.stdout.count("pong in") == 2


def test_user_mistakes_get_clear_errors(tmp_path: Path) -> None:
    no_cert = turbowg("relay", "-a", "127.0.0.1:0", "-c", str(tmp_path / "k.json"), "-hostname", "nope",
                      "-certdir", str(tmp_path), "-stun=false")
    assert no_cert.returncode == 2
    assert "nope.crt" in no_cert.stderr and "Traceback" not in no_cert.stderr
    no_config = turbowg("relay", "-stun=false")
    assert no_config.returncode == 2 and "-c" in no_config.stderr and "Traceback" not in no_config.stderr
    bad_key = turbowg("derp-client", "send", "http://127.0.0.1:1", "--to", "nodekey:abc")
    assert bad_key.returncode == 2 and "public key" in bad_key.stderr and "Traceback" not in bad_key.stderr
    refused = turbowg("derp-client", "ping", "http://127.0.0.1:1", "--timeout", "3")
    assert refused.returncode == 1 and "cannot connect" in refused.stderr and "Traceback" not in refused.stderr
