"""Admission and per-client read limits around a `ClientConn`: `-verify-client-url` and `-rate-limits`.

`ConnPolicy` holds what the operator configured (a `ClientVerifier`, the `RateLimits` of the file);
`policy.conn_factory(server)` makes the connections the HTTP front upgrades to. Without either setting
the factory is the server's own (`DerpServer.protocol_factory`), so the plain path is unchanged.

`PolicyClientConn` is a `ClientConn` that
  * on ClientInfo, before ServerInfo, asks the admission controller (not for mesh peers): reading
    stops meanwhile, frames that were already read are held and replayed once admitted (as derper,
    which reads nothing more until verifyClient returns); a refused client is closed without ServerInfo;
  * once authenticated, charges every byte read to the client's token bucket and, when the bucket is
    in debt, pauses reading until it has refilled (TCP backpressure, no drops).
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable
from typing import Any

from turbowg.derp import keys
from turbowg.derp.codec import ClientInfo
from turbowg.relay.accept_limit import TokenBucket
from turbowg.relay.conn import ClientConn, ConnOwner
from turbowg.relay.ratelimit import Limit, RateLimits, load_rate_limits
from turbowg.relay.verify import ClientVerifier

log = logging.getLogger("turbowg.relay.policy")


class ConnPolicy:
    def __init__(self, verifier: ClientVerifier | None = None, rate_limits: RateLimits | None = None,
                 rate_limits_path: str = "") -> None:
        self.verifier = verifier
        self.rate_limits = rate_limits
        self.rate_limits_path = rate_limits_path
        self.conns: weakref.WeakSet[PolicyClientConn] = weakref.WeakSet()

    @property
    def active(self) -> bool:
        return self.verifier is not None or self.rate_limits is not None

    def conn_factory(self, server: Any) -> Callable[[], ClientConn]:
        if not self.active:
            return server.protocol_factory

        def make() -> ClientConn:
            conn = PolicyClientConn(server, self)
            self.conns.add(conn)
            return conn

        return make

    def limit_for(self, key: bytes, can_mesh: bool) -> Limit | None:
        if can_mesh or self.rate_limits is None:
            return None
        return self.rate_limits.for_key(key)

    def reload(self) -> bool:
        """Re-read the rate limit file (SIGHUP) and apply it to every open connection; False if refused."""
        if not self.rate_limits_path:
            return False
        try:
            limits = load_rate_limits(self.rate_limits_path)
        except ValueError as exc:
            log.error("rate limits not reloaded, keeping the old ones: %s", exc)
            return False
        self.rate_limits = limits
        for conn in list(self.conns):
            conn.apply_limit()
        log.info("rate limits reloaded from %s (%d client entries)", self.rate_limits_path, len(limits.clients))
        return True


class PolicyClientConn(ClientConn):
    __slots__ = ("policy", "_held", "_verify_task", "_bucket", "_limit", "_resume_timer", "_limit_paused")

    def __init__(self, server: ConnOwner, policy: ConnPolicy) -> None:
        super().__init__(server)
        self.policy = policy
        self._held: list[tuple[Callable[..., None], tuple[Any, ...]]] | None = None
        self._verify_task: asyncio.Task[None] | None = None
        self._bucket: TokenBucket | None = None
        self._limit: Limit | None = None
        self._resume_timer: asyncio.TimerHandle | None = None
        self._limit_paused = False

    # -- admission ----------------------------------------------------------------------------------

    def on_authenticated(self, client_key: bytes, info: ClientInfo, can_mesh: bool, server_info_frame: bytes) -> None:
        verifier = self.policy.verifier
        if verifier is None or can_mesh:
            self._admit(client_key, info, can_mesh, server_info_frame)
            return
        self._held = []
        t = self.transport
        if t is not None and not t.is_closing():
            t.pause_reading()
        self._verify_task = self.server.loop.create_task(
            self._verify(verifier, client_key, info, can_mesh, server_info_frame))

    async def _verify(self, verifier: ClientVerifier, client_key: bytes, info: ClientInfo, can_mesh: bool,
                      server_info_frame: bytes) -> None:
        try:
            verdict = await verifier.verify(client_key, self.remote_ip)
        except Exception as exc:  # a bug in the check must not admit anyone
            log.exception("client verification failed")
            verdict = None
            reason = str(exc)
        else:
            reason = verdict.reason
        self._verify_task = None
        if self.closed:
            return
        if verdict is None or not verdict.allow:
            self.server.metrics.verify_rejects += 1
            log.info("derp client %s (%s) refused: %s", self.describe(), keys.format_public_key(client_key), reason)
            self._held = None
            self.abort()
            return
        held, self._held = self._held or [], None
        self._admit(client_key, info, can_mesh, server_info_frame)
        for method, args in held:
            if self.closed:
                return
            method(*args)
        self.server.flush_dirty()
        t = self.transport
        if t is not None and not t.is_closing() and not self._limit_paused:
            t.resume_reading()

    def _admit(self, client_key: bytes, info: ClientInfo, can_mesh: bool, server_info_frame: bytes) -> None:
        super().on_authenticated(client_key, info, can_mesh, server_info_frame)
        self.apply_limit()

    # frames read after ClientInfo but before the verdict wait for it
    def _hold(self, method: Callable[..., None], *args: Any) -> bool:
        if self._held is None:
            return False
        self._held.append((method, args))
        return True

    def on_send_packet(self, dst: bytes, packet: bytes) -> None:
        if not self._hold(super().on_send_packet, dst, packet):
            super().on_send_packet(dst, packet)

    def on_forward_packet(self, src: bytes, dst: bytes, packet: bytes) -> None:
        if not self._hold(super().on_forward_packet, src, dst, packet):
            super().on_forward_packet(src, dst, packet)

    def on_note_preferred(self, preferred: bool) -> None:
        if not self._hold(super().on_note_preferred, preferred):
            super().on_note_preferred(preferred)

    def on_watch_conns(self) -> None:
        if not self._hold(super().on_watch_conns):
            super().on_watch_conns()

    def on_close_peer(self, peer: bytes) -> None:
        if not self._hold(super().on_close_peer, peer):
            super().on_close_peer(peer)

    def on_ping(self, data: bytes) -> None:
        if not self._hold(super().on_ping, data):
            super().on_ping(data)

    def on_unknown_frame(self, frame_type: int, length: int) -> None:
        if not self._hold(super().on_unknown_frame, frame_type, length):
            super().on_unknown_frame(frame_type, length)

    # -- read rate limit ------------------------------------------------------------------------------

    def apply_limit(self) -> None:
        """(Re)read this client's limit from the policy; a changed limit starts a fresh bucket."""
        if self.key is None or self.closed:
            return
        limit = self.policy.limit_for(self.key, self.can_mesh)
        if limit == self._limit:
            return
        self._limit = limit
        self._bucket = TokenBucket(limit.bytes_per_sec, limit.burst) if limit is not None else None
        if self._bucket is None and self._limit_paused:
            self._resume_after_limit()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        bucket = self._bucket
        if bucket is None or self.closed:
            return
        wait = bucket.take(len(data))
        if wait > 0 and not self._limit_paused:
            t = self.transport
            if t is None or t.is_closing():
                return
            t.pause_reading()
            self._limit_paused = True
            self._resume_timer = self.server.loop.call_later(wait, self._resume_after_limit)

    def _resume_after_limit(self) -> None:
        if self._resume_timer is not None:
            self._resume_timer.cancel()
            self._resume_timer = None
        self._limit_paused = False
        t = self.transport
        if t is not None and not t.is_closing() and self._held is None:
            t.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._resume_timer is not None:
            self._resume_timer.cancel()
            self._resume_timer = None
        if self._verify_task is not None:
            self._verify_task.cancel()
            self._verify_task = None
        self._held = None
        super().connection_lost(exc)
