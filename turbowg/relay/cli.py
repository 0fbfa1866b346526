"""`turbowg relay`: the command line of the relay, a drop-in for derper's.

derper uses Go's flag package, so its flags are single-dash words (`-hostname=x`, `-stun=false`);
both that form and `--hostname x` are accepted here. This module only turns flags into a
`RelayConfig`; app.py builds and runs the relay from it.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from typing import Any

from turbowg.relay.acme import CHECK_INTERVAL, LETSENCRYPT_DIRECTORY, RENEW_BEFORE_DAYS
from turbowg.relay.app import RelayConfig, RelayConfigError, run_relay
from turbowg.relay.pages import parse_duration


def default_workers(cores: int, tls: bool) -> int:
    """The worker count when --workers is not given: one per core, except a relay terminating TLS itself on
    two cores or fewer, which gets one.

    Why (measured, issue 12, `turbowg bench relay` on a 2-core machine with the load generator on the same
    cores): plain DERP clients are forwarded in C, across shards too, and 2 workers carried as much as or
    more than 1 (0.96-1.9x in 8 interleaved rounds). While TLS clients stayed in Python, 2 workers carried
    less than 1 in 5 of 8 rounds (0.63-0.82x). TLS sessions are now driven from the C loop too (OpenSSL from
    C, relay/_fastpath.c) and 2 workers tie with 1 there: 1.04x [0.70, 1.35] and 1.07x [0.74, 1.66] Gbit/s
    (paired per-round ratios, median [95% CI], 10 and 14 interleaved rounds, 2w won 13 of 24), at 1.06-1.11x
    the CPU per GB and half the ping p99 -- not shown to be never slower, so one worker stays (and TLS kept
    in Python, TURBOWG_RELAY_TLS_IN_C=0 or TURBOWG_NO_C=1, needs it anyway). With more cores each worker
    has one of its own.
    """
    if tls and cores <= 2:
        return 1
    return max(1, cores)


def _bool(text: str) -> bool:
    v = text.strip().lower()
    if v in ("1", "t", "true", "yes", "on"):
        return True
    if v in ("0", "f", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def _float(text: str) -> float:
    try:
        value = float(text.strip().replace("Inf", "inf"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value != value or value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _flag(parser: argparse.ArgumentParser, name: str, *aliases: str, **kw: Any) -> None:
    """Register `-name` and `--name` (derper/Go style and GNU style) plus any aliases."""
    parser.add_argument(f"-{name}", f"--{name}", *aliases, **kw)


def register(subparsers: Any) -> None:
    relay = subparsers.add_parser(
        "relay", help="run a DERP relay (derper-compatible flags)",
        description="DERP relay, wire-compatible with Tailscale's derper (protocol version 2).",
    )
    relay.add_argument("-a", "--a", "--addr", dest="addr", default=None,
                       help="listen address, e.g. ':443' (default :443, or :3340 with -dev)")
    relay.add_argument("-c", "--c", "--config", dest="config", default="",
                       help="derper JSON key file {\"PrivateKey\": \"privkey:...\"}, created if missing")
    _flag(relay, "hostname", default="derp.example.com", help="TLS host name (certificate file stem)")
    _flag(relay, "certmode", default="manual",
          help="'manual' (<hostname>.crt/.key in -certdir) or 'letsencrypt' (obtained and renewed by ACME, "
               "HTTP-01 on -http-port, cached in -certdir)")
    _flag(relay, "certdir", default=".",
          help="directory with <hostname>.crt and <hostname>.key (letsencrypt: the ACME cache, created 0700)")
    _flag(relay, "acme-directory", dest="acme_directory", default=LETSENCRYPT_DIRECTORY,
          help=f"ACME directory URL for -certmode letsencrypt (default {LETSENCRYPT_DIRECTORY})")
    _flag(relay, "acme-ca", dest="acme_ca", default="",
          help="PEM file of the CA that signs the ACME server's HTTPS certificate (default: system trust store)")
    _flag(relay, "acme-renew-before", dest="acme_renew_before", type=float, default=RENEW_BEFORE_DAYS,
          help="renew the certificate when it expires within this many days (default 30)")
    _flag(relay, "acme-check-interval", dest="acme_check_interval", type=float, default=CHECK_INTERVAL,
          help="seconds between certificate expiry checks and reloads (default 43200)")
    _flag(relay, "stun", type=_bool, nargs="?", const=True, default=True, help="run STUN (default true)")
    _flag(relay, "stun-port", dest="stun_port", type=int, default=3478, help="STUN UDP port (default 3478)")
    _flag(relay, "mesh-with", dest="mesh_with", default="", help="comma-separated peer relays of this region")
    _flag(relay, "mesh-psk-file", dest="mesh_psk_file", default="", help="file with the region's mesh key")
    _flag(relay, "mesh-ca", dest="mesh_ca", default="",
          help="PEM file of CA certificate(s) that sign the peer relays' TLS certificates "
               "(default: the system trust store); mesh links always verify the peer's certificate "
               "and host name unless -mesh-insecure-skip-verify is given")
    _flag(relay, "mesh-insecure-skip-verify", dest="mesh_insecure_skip_verify", type=_bool, nargs="?", const=True,
          default=False,
          help="do not verify the peer relays' TLS certificates (self-signed test setups only: anyone on "
               "the path can then take the region's mesh key)")
    _flag(relay, "dev", type=_bool, nargs="?", const=True, default=False,
          help="plain HTTP on :3340 with an ephemeral key unless -c is given")
    _flag(relay, "http-port", dest="http_port", type=int, default=80,
          help="the port on which to serve plain HTTP when serving TLS (derper: /generate_204, ACME HTTP-01, "
               "/debug/ from localhost, everything else redirected to https); -1 to disable (default 80); "
               "bound to the same IP as -a")
    _flag(relay, "verify-client-url", dest="verify_client_url", default="",
          help="if non-empty, an admission controller URL for permitting client connections: the relay POSTs "
               "{\"NodePublic\":\"nodekey:<hex>\",\"Source\":\"<ip>\"} and admits the client only on "
               "200 with {\"Allow\":true} (mesh peers are not asked)")
    _flag(relay, "verify-client-url-fail-open", dest="verify_client_url_fail_open", type=_bool, nargs="?",
          const=True, default=True,
          help="whether to admit clients when -verify-client-url is unreachable (default true)")
    _flag(relay, "accept-connection-limit", dest="accept_connection_limit", type=_float, default=math.inf,
          help="rate limit for accepting new connections, per second (default +Inf); connections over it are "
               "closed at once; shared equally by the workers")
    _flag(relay, "accept-connection-burst", dest="accept_connection_burst", type=int, default=sys.maxsize,
          help=f"burst limit for accepting new connections (default {sys.maxsize})")
    _flag(relay, "client-rate-limits", dest="client_rate_limits", default="",
          help="JSON file of per-client read rate limits: {\"default\": {\"bytes_per_sec\": N, \"burst\": M}, "
               "\"clients\": {\"nodekey:<hex>\": {...}}}; enforced by reading slower (TCP backpressure, "
               "no drops); reloaded on SIGHUP (turbowg extension, not a derper flag)")
    _flag(relay, "home", default="",
          help="what to serve at the root path: empty for the default page, 'blank' for a blank page, or a URL "
               "to redirect to")
    _flag(relay, "bootstrap-dns-names", dest="bootstrap_dns_names", default="",
          help="optional comma-separated list of hostnames to make available at /bootstrap-dns "
               "(resolved by the relay every 10 minutes)")
    _flag(relay, "tcp-keepalive-time", dest="tcp_keepalive_time", type=_duration, default=600.0,
          help="TCP keepalive time of accepted connections, a Go duration like 10m (default 10m; 0 = OS default)")
    _flag(relay, "tcp-user-timeout", dest="tcp_user_timeout", type=_duration, default=15.0,
          help="TCP user timeout (TCP_USER_TIMEOUT) of accepted connections (default 15s; 0 = OS default)")
    _flag(relay, "tcp-write-timeout", dest="tcp_write_timeout", type=_duration, default=2.0,
          help="TCP write timeout: a client whose writes make no progress this long is closed; "
               "0 results in no timeout (default 2s; mesh peers get at least 30s)")
    relay.add_argument("--workers", type=int, default=0,
                       help="worker processes (default: CPU count; 1 when serving TLS itself on 2 cores or fewer)")
    relay.add_argument("--send-queue-depth", type=int, default=32, help="packets queued per client (default 32)")
    relay.add_argument("-v", "--verbose", action="store_true")
    relay.set_defaults(func=run_relay_command)


def run_relay_command(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s")
    config = RelayConfig(
        addr=args.addr if args.addr is not None else (":3340" if args.dev else ":443"),
        config_path=args.config, hostname=args.hostname, certmode=args.certmode, certdir=args.certdir,
        acme_directory=args.acme_directory, acme_ca=args.acme_ca, acme_renew_before_days=args.acme_renew_before,
        acme_check_interval=args.acme_check_interval,
        stun=args.stun, stun_port=args.stun_port,
        mesh_with=[p.strip() for p in args.mesh_with.split(",") if p.strip()],
        mesh_psk_file=args.mesh_psk_file, mesh_ca=args.mesh_ca,
        mesh_insecure_skip_verify=args.mesh_insecure_skip_verify,
        dev=args.dev, http_port=args.http_port,
        workers=args.workers or default_workers(os.cpu_count() or 1, tls=not args.dev),
        send_queue_depth=args.send_queue_depth,
        verify_client_url=args.verify_client_url, verify_client_url_fail_open=args.verify_client_url_fail_open,
        accept_connection_limit=args.accept_connection_limit, accept_connection_burst=args.accept_connection_burst,
        client_rate_limits=args.client_rate_limits, home=args.home, bootstrap_dns_names=args.bootstrap_dns_names,
        tcp_keepalive_time=args.tcp_keepalive_time, tcp_user_timeout=args.tcp_user_timeout,
        tcp_write_timeout=args.tcp_write_timeout,
    )
    try:
        return run_relay(config)
    except RelayConfigError as exc:
        print(f"turbowg relay: {exc}", file=sys.stderr)
        return 2
