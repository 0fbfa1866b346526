"""DERP server counters and their Prometheus exposition under derper's metric names.

The packet path only increments plain integers on `ServerMetrics`; a per-server prometheus-client
`CollectorRegistry` reads them when scraped, so the hot path never takes a metrics lock. Sizes that
are not counters (clients, duplicates, watchers) come from a `gauges()` callable returning
`ServerGauges`. This module knows nothing else of the server, so it imports nothing from it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# derper's drop reasons (derpserver.dropReason)
DROP_UNKNOWN_DEST = "unknown_dest"
DROP_UNKNOWN_DEST_ON_FWD = "unknown_dest_on_fwd"
DROP_GONE_DISCONNECTED = "gone_disconnected"
DROP_QUEUE_HEAD = "queue_head"
DROP_QUEUE_TAIL = "queue_tail"
DROP_WRITE_ERROR = "write_error"
DROP_DUP_CLIENT = "dup_client"
DROP_REASONS = (
    DROP_UNKNOWN_DEST, DROP_UNKNOWN_DEST_ON_FWD, DROP_GONE_DISCONNECTED, DROP_QUEUE_HEAD,
    DROP_QUEUE_TAIL, DROP_WRITE_ERROR, DROP_DUP_CLIENT,
)
KINDS = ("disco", "other")


class ServerMetrics:
    """Counters of one DerpServer; attribute names follow derper's expvars."""

    __slots__ = (
        "accepts", "current_connections", "current_home_connections", "packets_sent", "bytes_sent",
        "packets_received", "bytes_received", "packets_received_disco", "packets_forwarded_out",
        "packets_forwarded_in", "forward_failures", "peer_gone_disconnected_frames",
        "peer_gone_not_here_frames", "got_ping", "sent_pong", "unknown_frames", "home_moves_in",
        "home_moves_out", "total_dup_client_conns", "write_timeouts", "handshake_errors",
        "protocol_errors", "clients_replaced", "packets_dropped", "bytes_dropped",
        "websocket_accepts", "accept_limit_accepted", "accept_limit_rejected", "verify_rejects",
        "avg_queue_duration_ms",
    )

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)
        self.avg_queue_duration_ms = 0.0
        self.packets_dropped: dict[tuple[str, str], int] = {(r, k): 0 for r in DROP_REASONS for k in KINDS}
        self.bytes_dropped: dict[tuple[str, str], int] = {(r, k): 0 for r in DROP_REASONS for k in KINDS}

    def dropped(self, reason: str) -> int:
        """Packets dropped for `reason`, both kinds."""
        return self.packets_dropped[(reason, "disco")] + self.packets_dropped[(reason, "other")]

    def total_dropped(self) -> int:
        return sum(self.packets_dropped.values())


@dataclass(frozen=True, slots=True)
class ServerGauges:
    """Current sizes of one DerpServer, read at scrape time (DerpServer.gauges)."""

    clients_local: int  # distinct keys connected here
    clients_remote: int  # distinct keys reachable only through forwarders
    dup_client_keys: int
    dup_client_conns: int
    watchers: int
    # the C forwarding plane (fastpath.py); zero on the pure-Python path
    fast_conns: int = 0  # connections whose socket the C loop owns
    fast_queued_bytes: int = 0  # bytes queued in the C loop for its connections
    fast_sender_pauses: int = 0  # times a sender was paused because a destination was over its bound
    fast_tls_conns: int = 0  # of fast_conns, those whose TLS session the C loop drives (OpenSSL from C)
    fast_handovers: int = 0  # connections handed from asyncio to the C loop since start
    fast_tls_handovers: int = 0  # of those, TLS connections


def _counter(name: str, doc: str, value: int) -> Metric:
    # Untyped with the exact derper name: prometheus-client would rename a typed counter to *_total.
    m = Metric(name, doc, "unknown")
    m.add_sample(name, {}, value)
    return m


class DerpCollector(Collector):
    def __init__(self, counters: ServerMetrics, gauges: Callable[[], ServerGauges]) -> None:
        self._counters = counters
        self._gauges = gauges

    def collect(self) -> Iterator[Metric]:
        m = self._counters
        g = self._gauges()
        local = g.clients_local
        remote = g.clients_remote
        for name, doc, value in (
            ("derp_current_connections", "current DERP connections", m.current_connections),
            ("derp_current_home_connections", "connections that say this is their home region",
             m.current_home_connections),
            ("derp_clients_local", "distinct client keys connected here", local),
            ("derp_clients_remote", "distinct client keys reachable through forwarders only", remote),
            ("derp_clients_total", "distinct client keys, local or remote", local + remote),
            ("derp_current_dup_client_keys", "keys with more than one connection", g.dup_client_keys),
            ("derp_current_dup_client_conns", "connections sharing a key", g.dup_client_conns),
            ("derp_watchers", "mesh watchers", g.watchers),
            ("turbowg_fastpath_connections", "connections owned by the C forwarding plane", g.fast_conns),
            ("turbowg_fastpath_queued_bytes", "bytes queued in the C forwarding plane", g.fast_queued_bytes),
            ("turbowg_fastpath_tls_connections", "of those, connections whose TLS the C plane drives",
             g.fast_tls_conns),
            ("derp_average_queue_duration_ms", "moving average of the milliseconds a packet waits in a "
             "client's send queue (derper's EWMA, alpha 0.1)", m.avg_queue_duration_ms),
        ):
            family = GaugeMetricFamily(name, doc)
            family.add_metric([], value)
            yield family
        yield _counter("turbowg_fastpath_sender_pauses", "senders paused for a destination over its bound (C plane)",
                       g.fast_sender_pauses)
        yield _counter("turbowg_fastpath_handovers", "connections handed to the C plane", g.fast_handovers)
        yield _counter("turbowg_fastpath_tls_handovers", "TLS connections handed to the C plane (OpenSSL from C)",
                       g.fast_tls_handovers)
        for name, doc in (
            ("accepts", "accepted connections"),
            ("packets_sent", "packets written to clients"),
            ("bytes_sent", "packet bytes written to clients"),
            ("packets_received", "packets received from clients"),
            ("bytes_received", "packet bytes received from clients"),
            ("packets_forwarded_out", "packets handed to a forwarder"),
            ("packets_forwarded_in", "packets arriving from a forwarder"),
            ("peer_gone_disconnected_frames", "PeerGone(disconnected) frames sent"),
            ("peer_gone_not_here_frames", "PeerGone(not here) frames sent"),
            ("got_ping", "Ping frames received"),
            ("sent_pong", "Pong frames queued"),
            ("unknown_frames", "frames of unknown type skipped"),
            ("home_moves_in", "clients that made this their home"),
            ("home_moves_out", "clients that stopped calling this home"),
            ("total_dup_client_conns", "connections accepted while their key was connected"),
            ("write_timeouts", "connections closed because writes made no progress"),
            ("handshake_errors", "connections that failed the handshake"),
            ("protocol_errors", "connections closed for a protocol violation"),
            ("forward_failures", "packets a forwarder refused"),
        ):
            yield _counter("derp_" + name, doc, getattr(m, name))
        # derper's top-level expvar (cmd/derper/websocket.go) and its rate-limited listener's ("tls_listener")
        yield _counter("derp_websocket_accepts", "DERP connections accepted over WebSocket", m.websocket_accepts)
        yield _counter("tls_listener_accepted_connections", "connections admitted by -accept-connection-limit",
                       m.accept_limit_accepted)
        yield _counter("tls_listener_rejected_connections", "connections closed by -accept-connection-limit",
                       m.accept_limit_rejected)
        yield _counter("derp_verify_client_rejects", "clients refused by -verify-client-url", m.verify_rejects)
        kinds = Metric("derp_packets_received_kind", "packets received by kind", "unknown")
        kinds.add_sample("derp_packets_received_kind", {"kind": "disco"}, m.packets_received_disco)
        kinds.add_sample("derp_packets_received_kind", {"kind": "other"},
                         m.packets_received - m.packets_received_disco)
        yield kinds
        for name, table in (("derp_packets_dropped", m.packets_dropped), ("derp_bytes_dropped", m.bytes_dropped)):
            fam = Metric(name, "DERP drops by reason and by kind", "unknown")
            for (reason, kind), value in table.items():
                fam.add_sample(name, {"reason": reason, "kind": kind}, value)
            yield fam


def make_registry(
    counters: ServerMetrics, gauges: Callable[[], ServerGauges]
) -> tuple[CollectorRegistry, Callable[[], bytes]]:
    """A registry private to one server and a function rendering it as Prometheus text."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DerpCollector(counters, gauges))
    return registry, lambda: generate_latest(registry)
