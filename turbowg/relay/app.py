"""Build and run the whole relay (listeners, TLS, HTTP front, STUN, mesh, workers) from a RelayConfig.

`RelayConfig` mirrors derper's flags (cli.py fills it); `prepare` checks everything that can be wrong
before any process or socket starts; `serve_worker` is one worker; `run_relay(config)` blocks until
SIGINT/SIGTERM and returns an exit code. With more than one worker, shards/supervisor.py's
`run_sharded` forks that many processes, each with its own uvloop loop, `DerpServer` and SO_REUSEPORT
listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import ssl
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop

from turbowg.derp import keys
from turbowg.relay import acme as relay_acme
from turbowg.relay.accept_limit import make_limiter
from turbowg.relay.http import Handler, HTTPFront, RelayHTTPProtocol, Request, Response
from turbowg.relay.mesh import Mesh, MeshConfigError, mesh_ssl_context, start_mesh
from turbowg.relay.metacert import ReloadableTLS, tls_offload_summary
from turbowg.relay.pages import BootstrapDNS, check_home
from turbowg.relay.policy import ConnPolicy
from turbowg.relay.ratelimit import RateLimitConfigError, RateLimits, load_rate_limits
from turbowg.relay.server import DerpServer
from turbowg.relay.shards.links import ShardContext, ShardLinks
from turbowg.relay.shards.supervisor import reuseport_listener, run_sharded
from turbowg.relay.stun import serve_stun
from turbowg.relay.verify import ClientVerifier
from turbowg.wire import KEY_SIZE

log = logging.getLogger("turbowg.relay.app")

DEV_PORT = 3340


class RelayConfigError(ValueError):
    """A relay setting that cannot work (missing cert, bad address, unreadable mesh key...)."""


@dataclass
class RelayConfig:
    addr: str = ":443"
    config_path: str = ""
    hostname: str = "derp.example.com"
    certmode: str = "manual"  # or "letsencrypt" (ACME, acme.py)
    certdir: str = "."
    acme_directory: str = relay_acme.LETSENCRYPT_DIRECTORY
    acme_ca: str = ""  # CA file for the ACME server's HTTPS ("" = system trust store)
    acme_renew_before_days: float = relay_acme.RENEW_BEFORE_DAYS
    acme_check_interval: float = relay_acme.CHECK_INTERVAL
    stun: bool = True
    stun_port: int = 3478
    mesh_with: list[str] = field(default_factory=list)
    mesh_psk_file: str = ""
    mesh_ca: str = ""  # CA file for the peer relays' certificates ("" = system trust store)
    mesh_insecure_skip_verify: bool = False
    dev: bool = False
    http_port: int = -1  # plain HTTP port of a TLS relay (the CLI defaults to 80, as derper); -1 off
    workers: int = 0  # 0 = os.cpu_count()
    private_key: bytes | None = None  # overrides config_path (tests)
    send_queue_depth: int = 32
    ready: Any = None  # optional callable(list[(host, port)]) called once listening (tests)
    # derper's operator flags (cli.py has their meaning)
    verify_client_url: str = ""
    verify_client_url_fail_open: bool = True
    accept_connection_limit: float = math.inf
    accept_connection_burst: int = sys.maxsize
    client_rate_limits: str = ""  # JSON file (ratelimit.py), reloaded on SIGHUP
    home: str = ""
    bootstrap_dns_names: str = ""
    tcp_keepalive_time: float = 600.0
    tcp_user_timeout: float = 15.0
    tcp_write_timeout: float = 2.0
    # extra HTTP pages by path prefix, on the main listener and the http port (letsencrypt adds HTTP-01's)
    http_routes: dict[str, Handler] = field(default_factory=dict)


def parse_addr(addr: str, default_port: int) -> tuple[str, int]:
    """derper's `-a` forms: ":443", "1.2.3.4:443", "[::1]:443", "host:443", or a bare port."""
    addr = addr.strip()
    if addr.isdigit():
        addr = ":" + addr  # a bare port, range-checked below
    if addr.startswith("["):
        host, _, rest = addr[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port_text = addr.rpartition(":")
        if not sep:
            host, port_text = addr, ""
    try:
        if port_text and not (port_text.isascii() and port_text.isdigit()):  # int() takes '+1', '1_0', '١'
            raise ValueError(port_text)
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise RelayConfigError(f"bad listen address {addr!r}") from None
    if not 0 <= port <= 65535:
        raise RelayConfigError(f"bad port in listen address {addr!r}")
    return host, port


def make_listener(host: str, port: int) -> socket.socket:
    """shards.supervisor.reuseport_listener, with a bind failure reported as a configuration error."""
    try:
        return reuseport_listener(host, port)
    except OSError as exc:
        raise RelayConfigError(f"cannot listen on {host or '*'}:{port}: {exc}") from None


def acme_manager(config: RelayConfig) -> relay_acme.CertManager:
    return relay_acme.CertManager(relay_acme.AcmeSettings(
        hostname=config.hostname, certdir=config.certdir, directory_url=config.acme_directory,
        ca_file=config.acme_ca, renew_before_days=config.acme_renew_before_days,
        check_interval=config.acme_check_interval))


def load_tls(config: RelayConfig, server_public: bytes | None = None,
             http_host: str = "") -> tuple[ReloadableTLS, relay_acme.CertManager | None]:
    """The listener's TLS context (reloadable), and for letsencrypt the ACME manager (cert obtained)."""
    manager = None
    if config.certmode == "letsencrypt":
        manager = acme_manager(config)
        try:
            relay_acme.prepare_certificate(manager, http_host, config.http_port)
        except relay_acme.AcmeError as exc:
            raise RelayConfigError(f"certmode letsencrypt: {exc}") from None
        cert, key = manager.cert_path, manager.key_path
    elif config.certmode == "manual":
        certdir = Path(config.certdir)
        cert, key = certdir / f"{config.hostname}.crt", certdir / f"{config.hostname}.key"
        for p in (cert, key):
            if not p.is_file():
                raise RelayConfigError(f"certmode manual: {p} not found (expected <hostname>.crt and <hostname>.key)")
    else:
        raise RelayConfigError(f"certmode {config.certmode!r} is not supported; use manual or letsencrypt")
    try:
        return ReloadableTLS(cert, key, server_public), manager
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise RelayConfigError(f"cannot load TLS certificate {cert}: {exc}") from None


def load_tls_context(config: RelayConfig, server_public: bytes | None = None) -> ssl.SSLContext:
    return load_tls(config, server_public)[0].context


def read_mesh_key(path: str) -> str:
    try:
        text = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:  # a binary file is not a mesh key either
        raise RelayConfigError(f"cannot read mesh PSK file: {exc}") from None
    try:
        if len(bytes.fromhex(text)) != KEY_SIZE:
            raise ValueError
    except ValueError:
        raise RelayConfigError(f"{path}: mesh key must be 64 hex digits (as derper's key.ParseDERPMesh)") from None
    return text


@dataclass
class PreparedRelay:
    private_key: bytes
    host: str
    port: int
    tls: ssl.SSLContext | None
    mesh_key: str
    tls_reload: ReloadableTLS | None = None  # swaps tls's certificate for new connections
    acme: relay_acme.CertManager | None = None  # certmode letsencrypt: renews (worker 0)
    rate_limits: RateLimits | None = None  # -client-rate-limits as read at start


def prepare(config: RelayConfig) -> PreparedRelay:
    """Everything that can fail on bad settings, checked before any process or socket starts."""
    if config.private_key is not None:
        private = config.private_key
    elif config.config_path:
        try:
            private = keys.load_or_create_config(config.config_path)
        except (keys.KeyFormatError, OSError) as exc:
            raise RelayConfigError(str(exc)) from None
    elif config.dev:
        private = keys.generate_private_key()
    else:
        raise RelayConfigError("-c <config path> is required (or use --dev for an ephemeral key)")
    default_port = DEV_PORT if config.dev else 443
    host, port = parse_addr(config.addr, default_port)
    tls_reload, manager = (None, None) if config.dev else load_tls(config, keys.public_key(private), host)
    tls = tls_reload.context if tls_reload is not None else None
    mesh_key = read_mesh_key(config.mesh_psk_file) if config.mesh_psk_file else ""
    if config.mesh_with and not mesh_key:
        raise RelayConfigError("--mesh-with needs --mesh-psk-file")
    if config.mesh_with:
        try:
            mesh_ssl_context(config.mesh_ca, config.mesh_insecure_skip_verify)  # a bad CA file fails here
        except MeshConfigError as exc:
            raise RelayConfigError(str(exc)) from None
    try:
        check_home(config.home)
        if config.verify_client_url:
            ClientVerifier(config.verify_client_url, config.verify_client_url_fail_open)
        make_limiter(config.accept_connection_limit, config.accept_connection_burst)
    except ValueError as exc:
        raise RelayConfigError(str(exc)) from None
    for name in ("tcp_keepalive_time", "tcp_user_timeout", "tcp_write_timeout"):
        if not getattr(config, name) >= 0:
            raise RelayConfigError(f"-{name.replace('_', '-')} must be >= 0")
    rate_limits = None
    if config.client_rate_limits:
        try:
            rate_limits = load_rate_limits(config.client_rate_limits)
        except RateLimitConfigError as exc:
            raise RelayConfigError(str(exc)) from None
    return PreparedRelay(private, host, port, tls, mesh_key, tls_reload, manager, rate_limits)


def _acme_route(req: Request) -> Response:
    body = relay_acme.acme_http01_handler(req.path)
    if body is None:
        return Response(404, b"not found\n")
    return Response(200, body, {"Content-Type": "application/octet-stream"})


def make_front(config: RelayConfig, prepared: PreparedRelay, server: DerpServer, workers: int = 1
               ) -> tuple[HTTPFront, ConnPolicy]:
    """The HTTP front of one worker: pages, accept limit, TCP options, verify/rate-limit policy."""
    verifier = (ClientVerifier(config.verify_client_url, config.verify_client_url_fail_open)
                if config.verify_client_url else None)
    policy = ConnPolicy(verifier, prepared.rate_limits, config.client_rate_limits)
    routes = config.http_routes
    if config.certmode == "letsencrypt":
        routes.setdefault(relay_acme.CHALLENGE_PREFIX, _acme_route)
    front = HTTPFront(
        hostname=config.hostname, home=config.home,
        bootstrap_dns=BootstrapDNS.from_flag(config.bootstrap_dns_names),
        routes=routes,
        conn_factory=policy.conn_factory(server) if policy.active else None,
        accept_limiter=make_limiter(config.accept_connection_limit, config.accept_connection_burst, workers),
        tcp_keepalive=config.tcp_keepalive_time, tcp_user_timeout=config.tcp_user_timeout,
    )
    return front, policy


async def _tls_reload_loop(tls_reload: ReloadableTLS, interval: float) -> None:
    """Every worker: pick up a renewed (or replaced) certificate for new connections."""
    while True:
        await asyncio.sleep(interval)
        try:
            if tls_reload.reload():
                log.info("TLS certificate %s reloaded for new connections", tls_reload.cert_path)
        except (ssl.SSLError, OSError, ValueError) as exc:
            log.warning("TLS certificate %s not reloaded (still serving the previous one): %s",
                        tls_reload.cert_path, exc)


async def _start_mesh(server: DerpServer, config: RelayConfig, mesh_key: str) -> Mesh | None:
    peers = [p for p in config.mesh_with if p and p != config.hostname]
    if not peers:
        return None
    # peers given without a scheme speak what we speak
    return await start_mesh(server, mesh_key, peers, config.hostname, tls=not config.dev, ca_file=config.mesh_ca,
                            insecure_skip_verify=config.mesh_insecure_skip_verify)


async def serve_worker(config: RelayConfig, prepared: PreparedRelay, shard_ctx: ShardContext | None = None) -> None:
    """One worker: DerpServer + listener(s) + (shard links, STUN, mesh); runs until cancelled."""
    loop = asyncio.get_running_loop()
    server = DerpServer(prepared.private_key, mesh_key=prepared.mesh_key, send_queue_depth=config.send_queue_depth,
                        write_timeout=config.tcp_write_timeout, loop=loop)
    front, policy = make_front(config, prepared, server, shard_ctx.workers if shard_ctx is not None else 1)
    if front.bootstrap_dns is not None:
        await front.bootstrap_dns.start()
    if config.client_rate_limits:
        loop.add_signal_handler(signal.SIGHUP, policy.reload)
    links: ShardLinks | None = None
    if shard_ctx is not None and shard_ctx.workers > 1:
        links = await shard_ctx.attach(server)
    first_worker = shard_ctx is None or shard_ctx.index == 0
    listeners = []
    bound: list[tuple[str, int]] = []
    sock = make_listener(prepared.host, prepared.port)
    listeners.append(await loop.create_server(lambda: RelayHTTPProtocol(server, front), sock=sock, ssl=prepared.tls))
    bound.append(sock.getsockname()[:2])
    if config.http_port > 0 and prepared.tls is not None:
        sock80 = make_listener(prepared.host, config.http_port)
        front80 = front.http_port_front()
        listeners.append(await loop.create_server(lambda: RelayHTTPProtocol(server, front80), sock=sock80))
        bound.append(sock80.getsockname()[:2])
    stun_transport = None
    if config.stun and first_worker:
        try:
            stun_transport = await serve_stun(prepared.host or "::", config.stun_port)
        except OSError as exc:
            log.warning("STUN not started on port %d: %s", config.stun_port, exc)
    mesh = await _start_mesh(server, config, prepared.mesh_key) if config.mesh_with else None
    tls_tasks: list[asyncio.Task[None]] = []
    if prepared.tls_reload is not None:
        tls_reload = prepared.tls_reload
        tls_tasks.append(asyncio.create_task(
            _tls_reload_loop(tls_reload, max(0.05, min(60.0, config.acme_check_interval)))))
        if prepared.acme is not None and first_worker:
            tls_tasks.append(asyncio.create_task(prepared.acme.renew_loop(lambda: tls_reload.reload())))
    log.info("DERP relay %s listening on %s (%s)%s", keys.format_public_key(server.public_key), bound,
             "plain HTTP" if prepared.tls is None else "TLS",
             f", worker {shard_ctx.index}/{shard_ctx.workers}" if shard_ctx is not None else "")
    if config.ready is not None:
        config.ready(bound)
    try:
        await asyncio.Event().wait()
    finally:
        for task in tls_tasks:
            task.cancel()
        for lst in listeners:
            lst.close()
        if front.bootstrap_dns is not None:
            front.bootstrap_dns.stop()
        if config.client_rate_limits:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signal.SIGHUP)
        server.close()
        if stun_transport is not None:
            stun_transport.close()
        if mesh is not None:
            with contextlib.suppress(Exception):
                await mesh.close()
        if links is not None:
            links.close()


def run_relay(config: RelayConfig) -> int:
    """Run the relay in the foreground; returns the process exit code."""
    prepared = prepare(config)
    if prepared.tls is not None:
        log.info("%s", tls_offload_summary())
    workers = config.workers or os.cpu_count() or 1
    if workers > 1:
        if config.client_rate_limits:
            _forward_sighup_to_workers()
        return run_sharded(workers, lambda ctx: serve_worker(config, prepared, ctx))

    async def single() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await serve_worker(config, prepared)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(single())
    return 0


def _forward_sighup_to_workers() -> None:
    """The supervisor (shards/supervisor.py) only forwards stop signals; pass SIGHUP (reload the rate
    limits) on to the worker processes, found as this process's children."""

    def forward(signum: int, _frame: object) -> None:
        me = os.getpid()
        try:
            with open(f"/proc/{me}/task/{me}/children") as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGHUP, forward)
