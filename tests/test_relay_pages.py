"""The relay's pages and socket options through the app (RelayConfig -> serve_worker) over loopback:
-home (default, blank, redirect), /robots.txt, /bootstrap-dns with -bootstrap-dns-names (localhost, no
internet), /debug/ from loopback (and 403 from a non-loopback address: a client in a network namespace
across a veth pair), -tcp-keepalive-time/-tcp-user-timeout/-tcp-write-timeout on accepted sockets
(getsockopt), the -http-port listener of a TLS relay (derper's port-80 handler) with a plugged-in route."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import uvloop

from turbowg.derp.client import DerpClient
from turbowg.relay.app import RelayConfig, RelayConfigError, prepare
from turbowg.relay.http import Response
from turbowg.testing.netns import can_use_netns, exec_args, namespace_pair, ns_run
from turbowg.testing.relay import serving_relay

TIMEOUT = 10.0


def relay(**kw: Any) -> contextlib.AbstractAsyncContextManager[tuple[Any, list[tuple[str, int]]]]:
    return serving_relay(TIMEOUT, **kw)


async def get(port: int, path: str, *headers: str, method: str = "GET", ssl: Any = None) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ssl)
    writer.write((f"{method} {path} HTTP/1.1\r\nHost: relay.test\r\nConnection: close\r\n"
                  + "".join(h + "\r\n" for h in headers) + "\r\n").encode())
    data = await asyncio.wait_for(reader.read(), TIMEOUT)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    hdrs = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), hdrs, body


def test_home_robots_bootstrap_dns_and_debug_from_loopback() -> None:
    async def main() -> None:
        async with relay(bootstrap_dns_names="localhost,nonexistent.invalid") as (_c, bound):
            port = bound[0][1]
            status, hdrs, body = await get(port, "/")
            assert status == 200 and b"DERP" in body and hdrs["content-type"].startswith("text/html")
            assert b"/debug/" in body  # the debug link is shown to local visitors only
            assert (await get(port, "/", "X-Forwarded-For: 1.2.3.4"))[2].count(b"/debug/") == 0
            assert (await get(port, "/robots.txt"))[2] == b"User-agent: *\nDisallow: /\n"
            status, hdrs, body = await get(port, "/bootstrap-dns")
            assert status == 200 and hdrs["content-type"] == "application/json"
            answer = json.loads(body)
            assert set(answer) == {"localhost"} and "127.0.0.1" in answer["localhost"]
            assert json.loads((await get(port, "/bootstrap-dns?q=localhost"))[2]) == {"localhost": answer["localhost"]}
            assert json.loads((await get(port, "/bootstrap-dns?q=other.example"))[2]) == {}
            status, _, body = await get(port, "/debug/")
            assert status == 200 and b"DERP debug" in body
            status, _, body = await get(port, "/debug/varz")
            assert status == 200 and b"derp_websocket_accepts" in body
            assert (await get(port, "/debug/", "X-Forwarded-For: 127.0.0.1"))[0] == 403  # came via a proxy
        async with relay(home="blank") as (_c, bound):
            status, _, body = await get(bound[0][1], "/")
            assert status == 200 and body == b""
        async with relay(home="https://example.com/derp-info") as (_c, bound):
            status, hdrs, _ = await get(bound[0][1], "/")
            assert status == 302 and hdrs["location"] == "https://example.com/derp-info"

    uvloop.run(main())


def test_bad_home_is_refused() -> None:
    with pytest.raises(RelayConfigError, match="-home"):
        prepare(RelayConfig(dev=True, home="ftp:/nowhere"))


def test_tcp_options_are_set_on_accepted_sockets() -> None:
    async def main() -> None:
        async with relay(tcp_keepalive_time=123.0, tcp_user_timeout=7.5, tcp_write_timeout=4.0) as (_c, bound):
            import gc

            from turbowg.relay.http import RelayHTTPProtocol
            from turbowg.relay.server import DerpServer
            client = DerpClient()
            await client.connect(f"http://127.0.0.1:{bound[0][1]}/derp")
            server = next(o for o in gc.get_objects() if isinstance(o, DerpServer) and client.public_key in o.clients)
            assert server.limits.write_timeout == 4.0
            # an accepted connection still in HTTP (keep-alive), its socket as the relay holds it
            reader, writer = await asyncio.open_connection("127.0.0.1", bound[0][1])
            writer.write(b"GET /robots.txt HTTP/1.1\r\nHost: x\r\n\r\n")
            await reader.readuntil(b"Disallow: /\n")
            local = writer.get_extra_info("sockname")
            protos = [o for o in gc.get_objects() if isinstance(o, RelayHTTPProtocol) and o.transport is not None
                      and o.transport.get_extra_info("peername") == local]
            assert len(protos) == 1
            sock = protos[0].transport.get_extra_info("socket")
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 123
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 123
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 7500
            writer.close()
            await client.close()

    uvloop.run(main())


def test_duration_flags_take_go_durations() -> None:
    import argparse

    from turbowg.relay import cli
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["relay", "-tcp-keepalive-time=1h30m", "--tcp-user-timeout", "500ms",
                              "-tcp-write-timeout", "0", "-accept-connection-limit=+Inf"])
    assert (args.tcp_keepalive_time, args.tcp_user_timeout, args.tcp_write_timeout) == (5400.0, 0.5, 0.0)
    assert args.accept_connection_limit == float("inf") and args.http_port == 80 and args.home == ""
    assert args.verify_client_url_fail_open is True


def test_http_port_of_a_tls_relay(tmp_path: Path) -> None:
    from test_relay_app import make_cert

    make_cert(tmp_path, "localhost")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        http_port = s.getsockname()[1]

    def challenge(req: Any) -> Response:
        return Response(200, b"token-answer:" + req.path.rsplit("/", 1)[1].encode())

    async def main() -> None:
        async with relay(dev=False, private_key=None, config_path=str(tmp_path / "k.json"), hostname="localhost",
                         certdir=str(tmp_path), http_port=http_port,
                         http_routes={"/.well-known/acme-challenge/": challenge}) as (_c, bound):
            assert bound[1][1] == http_port
            status, hdrs, _ = await get(http_port, "/generate_204", "X-Tailscale-Challenge: abc")
            assert status == 204 and hdrs["x-tailscale-response"] == "response abc"
            status, _, body = await get(http_port, "/.well-known/acme-challenge/TOKEN1")
            assert status == 200 and body == b"token-answer:TOKEN1"
            status, hdrs, _ = await get(http_port, "/derp/probe?x=1")
            assert status == 302 and hdrs["location"] == "https://localhost/derp/probe?x=1"
            assert (await get(http_port, "/", method="POST"))[0] == 400
            assert (await get(http_port, "/debug/"))[0] == 200
            import ssl
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            status, _, body = await get(bound[0][1], "/.well-known/acme-challenge/T2", ssl=ctx)
            assert status == 200 and body == b"token-answer:T2"  # the same routes on the TLS listener

    uvloop.run(main())


@pytest.mark.skipif(not can_use_netns(), reason="needs root and ip netns")
def test_debug_pages_refused_from_a_non_loopback_address() -> None:
    """The relay runs in namespace a; a client in namespace b (across a veth) gets 403 for /debug/, while
    the same request from a's loopback is served."""
    fetch = ("import sys, urllib.request, urllib.error\n"
             "try:\n r = urllib.request.urlopen(sys.argv[1], timeout=5); print(r.status)\n"
             "except urllib.error.HTTPError as e: print(e.code)\n")
    with namespace_pair("twgpg", v4="10.213.0", v6="fd21::") as pair:
        proc = subprocess.Popen(exec_args(pair.a, sys.executable, "-m", "turbowg", "relay", "-dev", "-a", ":3340",
                                          "-stun=false", "--workers", "1"),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                out = ns_run(pair.a, sys.executable, "-c", fetch, "http://127.0.0.1:3340/robots.txt", check=False)
                if out.stdout.strip() == "200":
                    break
                time.sleep(0.2)
            remote = ns_run(pair.b, sys.executable, "-c", fetch, f"http://{pair.a_ip}:3340/debug/").stdout.strip()
            local = ns_run(pair.a, sys.executable, "-c", fetch, "http://127.0.0.1:3340/debug/").stdout.strip()
            page = ns_run(pair.b, sys.executable, "-c", fetch, f"http://{pair.a_ip}:3340/").stdout.strip()
            assert (remote, local, page) == ("403", "200", "200")
        finally:
            proc.terminate()
            proc.wait(10)
