"""Per-peer path selection: reach a peer directly over UDP when a path works, over DERP when none does.

Sans-IO: every input carries `now` (a monotonic clock reading, seconds) and returns the disco messages to
send as actions (`SendUDP`, `SendDERP`); `current_path(now)` says where WireGuard messages go (an endpoint, or
None for DERP). Nothing here reads a clock, a socket or a timer. Modelled on Tailscale's magicsock endpoint
(wgengine/magicsock/endpoint.go); timers and their reasons are in turbowg/path/constants.py.

The path, in order of preference:
1. the best direct endpoint, while trusted: a pong from it arrived less than TRUST_UDP_ADDR_DURATION ago (the
   lowest-RTT answering endpoint; another replaces it only if BETTER_PATH_MARGIN faster);
2. the WireGuard endpoint (user-configured, or roamed to as plain WireGuard does for a peer that never spoke
   disco) unless a direct handshake to it timed out: plain WireGuard peers work direct without disco; once a
   peer speaks disco, only while WireGuard data came from that endpoint within TRUST_UDP_ADDR_DURATION;
3. DERP (None).

Probing: a full round pings every candidate endpoint not pinged within DISCO_PING_INTERVAL and sends our
candidates to the peer over DERP (call-me-maybe). The peer answers a call-me-maybe by pinging all of them at
once, so both sides' NATs open at the same time, and by sending its own (there is no coordination server to
tell us its endpoints; at most one per DISCO_PING_INTERVAL, so two peers do not echo each other); a ping
from an endpoint we have no recent pong from is pinged back. Rounds run, while a session is active (data within SESSION_ACTIVE_TIMEOUT), on a trigger
(session start, fallback, changed candidates), then every DISCO_PING_INTERVAL while on DERP (has a path
opened?) or every UPGRADE_INTERVAL while direct (is there a faster one?). While direct and
active, the best endpoint gets a heartbeat ping every HEARTBEAT_INTERVAL; when it stops answering its trust
runs out (<= 6.5 s after the last pong) and traffic falls back to DERP and a new probe burst starts.

Why one file (~530 lines): one state machine (`PathSelector`); the rules listed here all read and write the
same per-peer table of candidate endpoints, so they are kept side by side.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from turbowg.conn.endpoint import Endpoint
from turbowg.path.constants import (
    BETTER_PATH_MARGIN,
    DISCO_PING_INTERVAL,
    GOOD_ENOUGH_LATENCY,
    HEARTBEAT_INTERVAL,
    MAX_CALL_ME_MAYBE_ENDPOINTS,
    MAX_PEER_CANDIDATES,
    PING_TIMEOUT_DURATION,
    SESSION_ACTIVE_TIMEOUT,
    TRUST_UDP_ADDR_DURATION,
    UPGRADE_INTERVAL,
)
from turbowg.path.disco import TXID_SIZE, CallMeMaybe, Message, Ping, Pong

Via = Literal["udp", "derp"]
VIA_UDP: Via = "udp"
VIA_DERP: Via = "derp"


class PathState(enum.Enum):
    DERP = "derp"  # no direct path, no probe outstanding
    PROBING = "probing"  # no direct path, pings outstanding
    DIRECT = "direct"  # WireGuard messages go to an endpoint over UDP


@dataclass(frozen=True, slots=True)
class SendUDP:
    """Seal `message` to the peer and send it from the WireGuard socket to `endpoint`."""

    endpoint: Endpoint
    message: Message


@dataclass(frozen=True, slots=True)
class SendDERP:
    """Seal `message` to the peer and send it over DERP to the peer's public key."""

    message: Message


Action = SendUDP | SendDERP

# Where a candidate endpoint came from (bit flags: one endpoint can have several origins).
ORIGIN_CONFIGURED = 1  # the user-configured WireGuard endpoint
ORIGIN_CALL_ME_MAYBE = 2  # listed in the peer's last call-me-maybe
ORIGIN_REFLEXIVE = 4  # a disco ping or WireGuard data came from it over UDP

_NO_ACTIONS: tuple[Action, ...] = ()


@dataclass(slots=True)
class PathCounters:
    probes_sent: int = 0  # pings sent (probe rounds, heartbeats, ping-backs)
    probes_answered: int = 0  # pongs matched to a ping we sent
    probes_timed_out: int = 0  # pings unanswered after PING_TIMEOUT_DURATION
    pongs_ignored: int = 0  # unknown or expired txid, wrong source, over DERP, or a dropped candidate
    pings_received: int = 0
    call_me_maybe_sent: int = 0
    call_me_maybe_received: int = 0
    path_changes: int = 0  # current_path changed value (direct <-> DERP, or one endpoint -> another)
    fallbacks: int = 0  # a direct path abandoned while in use (trust ran out, or a direct handshake timed out)


@dataclass(slots=True)
class _Candidate:
    origins: int
    last_ping: float | None = None
    last_pong: float | None = None
    rtt: float | None = None  # of the last pong


@dataclass(frozen=True, slots=True)
class _SentPing:
    endpoint: Endpoint
    sent_at: float


@dataclass(frozen=True, slots=True)
class EndpointStatus:
    endpoint: Endpoint
    origins: int  # ORIGIN_* flags
    rtt: float | None  # last probe RTT, seconds
    last_pong_age: float | None  # seconds since its last pong


@dataclass(frozen=True, slots=True)
class PathStatus:
    """One peer's path selection, for `turbowg status`."""

    state: PathState
    path: Endpoint | None  # None: DERP
    rtt: float | None  # last probe RTT of the current direct path (None on DERP or if never probed)
    trusted_for: float  # seconds the current pong-proven path stays trusted without another pong
    session_active: bool
    disco_peer: bool  # the peer has spoken disco to us
    last_path_change: float | None  # monotonic time of the last change of `path`
    seen_as: Endpoint | None  # our address as the peer last saw it (from a pong)
    counters: PathCounters  # a copy
    endpoints: tuple[EndpointStatus, ...]


class PathSelector:
    """Path state of one peer. Not thread-safe: drive it from the daemon's event loop."""

    __slots__ = (
        "counters", "_random", "_candidates", "_sent", "_local", "_configured", "_wg_endpoint", "_wg_ok",
        "_wg_last_rx", "_disco_peer", "_best", "_best_rtt", "_trust_until", "_path", "_last_path_change",
        "_last_activity", "_next_heartbeat", "_next_full_ping", "_cmm_pending", "_last_cmm_sent",
        "_seen_as",
    )

    def __init__(self, *, random_bytes: Callable[[int], bytes] = os.urandom) -> None:
        self.counters = PathCounters()
        self._random = random_bytes  # transaction ids; tests inject a deterministic source
        self._candidates: dict[Endpoint, _Candidate] = {}
        self._sent: dict[bytes, _SentPing] = {}  # txid -> ping, in send order
        self._local: tuple[Endpoint, ...] = ()  # our candidates, sent in call-me-maybe
        self._configured: Endpoint | None = None
        self._wg_endpoint: Endpoint | None = None  # where plain WireGuard would send
        self._wg_ok = False  # no direct handshake to _wg_endpoint timed out since it was set / last answered
        self._wg_last_rx: float | None = None  # last UDP receipt (data or disco) from _wg_endpoint
        self._disco_peer = False
        self._best: Endpoint | None = None
        self._best_rtt = 0.0
        self._trust_until = 0.0
        self._path: Endpoint | None = None
        self._last_path_change: float | None = None
        self._last_activity: float | None = None
        self._next_heartbeat = 0.0
        self._next_full_ping = 0.0
        self._cmm_pending = False
        self._last_cmm_sent: float | None = None
        self._seen_as: Endpoint | None = None

    # -- configuration --------------------------------------------------------------------------------------
    def set_local_candidates(self, endpoints: Iterable[Endpoint], now: float) -> None:
        """Our candidate endpoints (local addresses, STUN-learned public address). A change is sent to the
        peer in a call-me-maybe with the next probe round, which it triggers."""
        local = tuple(dict.fromkeys(endpoints))[:MAX_CALL_ME_MAYBE_ENDPOINTS]
        if local == self._local:
            return
        self._local = local
        self._cmm_pending = bool(local)
        self._rearm(now)

    def set_configured_endpoint(self, endpoint: Endpoint | None, now: float) -> None:
        """The user-configured WireGuard endpoint (None: none). Tried first, and probed as a candidate."""
        if endpoint == self._configured:
            return
        old = self._configured
        if old is not None:
            self._remove_origin(old, ORIGIN_CONFIGURED)
        self._configured = endpoint
        self._wg_endpoint = endpoint
        self._wg_ok = endpoint is not None
        self._wg_last_rx = None
        if endpoint is not None:
            self._add_origin(endpoint, ORIGIN_CONFIGURED, force=True)
        self._rearm(now)
        self._update_path(now)

    # -- outputs ---------------------------------------------------------------------------------------------
    def current_path(self, now: float) -> Endpoint | None:
        """Where WireGuard messages to the peer go now: an endpoint over UDP, or None for DERP."""
        best = self._best
        if best is not None and now < self._trust_until:
            return best
        return self._update_path(now)

    def next_deadline(self, now: float) -> float | None:
        """When on_tick next has something to do (a heartbeat, a probe round, trust or a ping running out),
        or None if nothing is pending. Ticking exactly then keeps heartbeats 3 s apart; a coarser tick
        (every 0.5-1 s) also works but eats into the trust margin."""
        deadlines: list[float] = []
        if self._best is not None:
            deadlines.append(self._trust_until)
        if self._sent:
            deadlines.append(next(iter(self._sent.values())).sent_at + PING_TIMEOUT_DURATION)
        if self._active(now):
            deadlines.append(self._next_full_ping)
            if self._trusted(now):
                deadlines.append(self._next_heartbeat)
        return min(deadlines) if deadlines else None

    def trusted(self, now: float) -> bool:
        """Whether the current path is a direct one proven by a recent pong (not just the WireGuard endpoint)."""
        return self._trusted(now)

    def state(self, now: float) -> PathState:
        if self.current_path(now) is not None:
            return PathState.DIRECT
        for sent in self._sent.values():
            if now - sent.sent_at < PING_TIMEOUT_DURATION:
                return PathState.PROBING
        return PathState.DERP

    def status(self, now: float) -> PathStatus:
        path = self.current_path(now)
        cand = self._candidates.get(path) if path is not None else None
        return PathStatus(
            state=self.state(now),
            path=path,
            rtt=cand.rtt if cand is not None else None,
            trusted_for=max(0.0, self._trust_until - now) if self._best is not None else 0.0,
            session_active=self._active(now),
            disco_peer=self._disco_peer,
            last_path_change=self._last_path_change,
            seen_as=self._seen_as,
            counters=replace(self.counters),
            endpoints=tuple(
                EndpointStatus(ep, c.origins, c.rtt, None if c.last_pong is None else now - c.last_pong)
                for ep, c in self._candidates.items()
            ),
        )

    # -- events ----------------------------------------------------------------------------------------------
    def on_tick(self, now: float) -> list[Action]:
        """Timers: call at least every 0.5-1 s (heartbeats every 3 s, trust of 6.5 s)."""
        self._expire_pings(now)
        self._update_path(now)
        actions: list[Action] = []
        if not self._active(now):
            return actions  # idle: no heartbeats, no probes (the next data packet restarts them)
        trusted = self._trusted(now)
        if trusted and now >= self._next_heartbeat:
            best = self._best
            assert best is not None
            self._ping(best, self._candidates[best], now, actions)
            self._next_heartbeat = now + HEARTBEAT_INTERVAL
        if now >= self._next_full_ping:
            if trusted and self._best_rtt <= GOOD_ENOUGH_LATENCY and not self._cmm_pending:
                self._next_full_ping = now + UPGRADE_INTERVAL  # good enough: no search for better
            else:
                self._full_ping(now, actions)
        return actions

    def on_data_sent(self, now: float) -> Sequence[Action]:
        """WireGuard data (or a handshake) was sent to the peer (either path). Per batch; cheap."""
        last = self._last_activity
        self._last_activity = now
        if last is not None and now - last <= SESSION_ACTIVE_TIMEOUT:
            return _NO_ACTIONS
        return self._session_start(now)

    def on_data_received(self, now: float, src: Endpoint | None = None) -> Sequence[Action]:
        """Authenticated WireGuard data came from the peer: over UDP from `src`, or over DERP (src None).
        For a peer that never spoke disco, `src` becomes the WireGuard endpoint (WireGuard's roaming); for a
        disco peer an unknown `src` is a new candidate and is pinged (at most every DISCO_PING_INTERVAL)."""
        last = self._last_activity
        self._last_activity = now
        started = last is None or now - last > SESSION_ACTIVE_TIMEOUT
        if src is not None and src == self._wg_endpoint:
            self._wg_last_rx = now
        if src is None and not self._disco_peer:
            # WireGuard over DERP: the peer is no plain WireGuard peer, and it may well not be able to reach us
            # directly; its WireGuard endpoint now needs recent UDP from it, as for a peer that spoke disco.
            self._disco_peer = True
            self._update_path(now)
        if src is None or src == self._path:
            return self._session_start(now) if started else _NO_ACTIONS
        actions: list[Action] = list(self._session_start(now)) if started else []
        if not self._disco_peer:
            self._wg_endpoint = src
            self._wg_ok = True
            self._wg_last_rx = now
            self._update_path(now)
            return actions
        cand = self._candidates.get(src)
        if cand is None:
            cand = self._add_origin(src, ORIGIN_REFLEXIVE)
        if cand is not None and not self._answered(cand, now) and (
                cand.last_ping is None or now - cand.last_ping >= DISCO_PING_INTERVAL):
            self._ping(src, cand, now, actions)
        return actions

    def on_disco(self, message: Message, via: Via, src: Endpoint | None, now: float) -> list[Action]:
        """An authenticated disco message from the peer, over UDP from `src` or over DERP (src ignored).
        The caller checks that the sealing key is this peer's (and, over DERP, the DERP source key)."""
        if via == VIA_UDP:
            if src is None:
                return []
            if src == self._wg_endpoint:
                self._wg_last_rx = now
        else:
            src = None
        self._disco_peer = True
        self._update_path(now)
        if isinstance(message, Ping):
            return self._on_ping(message, src, now)
        if isinstance(message, Pong):
            self._on_pong(message, src, now)
            return []
        if isinstance(message, CallMeMaybe):
            return self.on_call_me_maybe(message.endpoints, now)
        return []

    def on_call_me_maybe(self, endpoints: Iterable[Endpoint], now: float) -> list[Action]:
        """The peer's candidate endpoints (replacing its previous list): ping them all now, since the peer
        is pinging ours right now (both NATs open at once); answer with our own unless sent lately."""
        self._disco_peer = True
        self._update_path(now)
        self.counters.call_me_maybe_received += 1
        listed = dict.fromkeys(tuple(endpoints)[:MAX_CALL_ME_MAYBE_ENDPOINTS])
        for endpoint, cand in list(self._candidates.items()):
            if cand.origins & ORIGIN_CALL_ME_MAYBE and endpoint not in listed:
                self._remove_origin(endpoint, ORIGIN_CALL_ME_MAYBE)
        actions: list[Action] = []
        for endpoint in listed:
            cand = self._add_origin(endpoint, ORIGIN_CALL_ME_MAYBE)
            if cand is not None:
                self._ping(endpoint, cand, now, actions)
        # Our candidates in return (at most every DISCO_PING_INTERVAL, so two peers do not echo each other):
        # with no coordination server, a call-me-maybe is the only way the peer learns where to ping us.
        if self._local and (self._last_cmm_sent is None or now - self._last_cmm_sent >= DISCO_PING_INTERVAL):
            self._send_call_me_maybe(now, actions)
        self._update_path(now)
        return actions

    def on_handshake_timeout_direct(self, now: float) -> list[Action]:
        """A handshake sent on the direct path got no answer: use DERP, and probe for another path."""
        path = self._update_path(now)
        if path is None:
            return []
        self.counters.fallbacks += 1
        if path == self._wg_endpoint:
            self._wg_ok = False
        if path == self._best:
            self._best = None
            cand = self._candidates.get(path)
            if cand is not None:
                cand.last_pong = None
        self._rearm(now)
        self._update_path(now)
        actions: list[Action] = []
        self._full_ping(now, actions)
        return actions

    def on_handshake_timeout_derp(self, now: float) -> None:
        """A handshake sent over DERP got no answer. A peer that never spoke disco may not be on DERP at all
        (plain WireGuard): try its WireGuard endpoint again, so attempts alternate direct / DERP."""
        if not self._disco_peer and self._wg_endpoint is not None and not self._wg_ok:
            self._wg_ok = True
            self._update_path(now)

    # -- internals -------------------------------------------------------------------------------------------
    def _active(self, now: float) -> bool:
        last = self._last_activity
        return last is not None and now - last <= SESSION_ACTIVE_TIMEOUT

    def _trusted(self, now: float) -> bool:
        return self._best is not None and now < self._trust_until

    @staticmethod
    def _answered(cand: _Candidate, now: float) -> bool:
        return cand.last_pong is not None and now - cand.last_pong < TRUST_UDP_ADDR_DURATION

    def _update_path(self, now: float) -> Endpoint | None:
        """Recompute the path (expiring trust) and count a change."""
        best = self._best
        if best is not None and now >= self._trust_until:
            self._best = None
            if self._active(now):  # in use and stopped answering (idle expiry is no failure)
                self.counters.fallbacks += 1
                if best == self._wg_endpoint:
                    self._wg_ok = False
            self._rearm(now)
            best = None
        if best is not None:
            path: Endpoint | None = best
        else:
            path = self._wg_endpoint
            if path is not None and not (self._wg_ok and (
                    not self._disco_peer or (self._wg_last_rx is not None
                                             and now - self._wg_last_rx < TRUST_UDP_ADDR_DURATION))):
                path = None
        if path != self._path:
            self._path = path
            self._last_path_change = now
            self.counters.path_changes += 1
        return path

    def _rearm(self, now: float) -> None:
        """Probe now (at the next tick while active), then in a burst."""
        self._next_full_ping = now

    def _session_start(self, now: float) -> Sequence[Action]:
        self._next_heartbeat = min(self._next_heartbeat, now + HEARTBEAT_INTERVAL)
        self._update_path(now)
        if self._trusted(now):
            return _NO_ACTIONS
        self._rearm(now)
        actions: list[Action] = []
        self._full_ping(now, actions)
        return actions

    def _add_origin(self, endpoint: Endpoint, origin: int, force: bool = False) -> _Candidate | None:
        cand = self._candidates.get(endpoint)
        if cand is None:
            if len(self._candidates) >= MAX_PEER_CANDIDATES and not force:
                return None
            cand = self._candidates[endpoint] = _Candidate(origin)
        cand.origins |= origin
        return cand

    def _remove_origin(self, endpoint: Endpoint, origin: int) -> None:
        cand = self._candidates.get(endpoint)
        if cand is None:
            return
        cand.origins &= ~origin
        if cand.origins:
            return
        del self._candidates[endpoint]
        for txid in [t for t, s in self._sent.items() if s.endpoint == endpoint]:
            del self._sent[txid]
        if self._best == endpoint:
            self._best = None

    def _ping(self, endpoint: Endpoint, cand: _Candidate, now: float, actions: list[Action]) -> None:
        txid = self._random(TXID_SIZE)
        self._sent[txid] = _SentPing(endpoint, now)
        cand.last_ping = now
        self.counters.probes_sent += 1
        actions.append(SendUDP(endpoint, Ping(txid)))

    def _full_ping(self, now: float, actions: list[Action]) -> None:
        """A probe round: ping every candidate not pinged lately, send our candidates over DERP."""
        for endpoint, cand in self._candidates.items():
            if cand.last_ping is None or now - cand.last_ping >= DISCO_PING_INTERVAL:
                self._ping(endpoint, cand, now, actions)
        if self._local:
            self._send_call_me_maybe(now, actions)
        self._cmm_pending = False
        if self._trusted(now):
            self._next_full_ping = now + UPGRADE_INTERVAL
            return
        # On DERP with data flowing: a round every DISCO_PING_INTERVAL, as magicsock (wantFullPingLocked is
        # true whenever there is no trusted path), so a path that opens is found within ~5 s (issue 11: the
        # move to direct must happen within 10 s of a firewall rule going away). Idle peers stop probing.
        self._next_full_ping = now + DISCO_PING_INTERVAL

    def _send_call_me_maybe(self, now: float, actions: list[Action]) -> None:
        actions.append(SendDERP(CallMeMaybe(self._local)))
        self._last_cmm_sent = now
        self.counters.call_me_maybe_sent += 1

    def _expire_pings(self, now: float) -> None:
        sent = self._sent
        while sent:
            txid, ping = next(iter(sent.items()))
            if now - ping.sent_at < PING_TIMEOUT_DURATION:
                break
            del sent[txid]
            self.counters.probes_timed_out += 1

    def _on_ping(self, message: Ping, src: Endpoint | None, now: float) -> list[Action]:
        self.counters.pings_received += 1
        if src is None:
            return []  # pings prove a UDP path; we never ping over DERP and do not answer there
        actions: list[Action] = [SendUDP(src, Pong(message.txid, src))]
        cand = self._candidates.get(src)
        if cand is None:
            cand = self._add_origin(src, ORIGIN_REFLEXIVE)
        if cand is not None and not self._answered(cand, now):
            self._ping(src, cand, now, actions)  # ping back: the peer's ping opened its NAT toward us
        return actions

    def _on_pong(self, message: Pong, src: Endpoint | None, now: float) -> None:
        sent = self._sent.get(message.txid)
        if sent is None or src is None or src != sent.endpoint or now - sent.sent_at >= PING_TIMEOUT_DURATION:
            self.counters.pongs_ignored += 1
            return
        del self._sent[message.txid]
        cand = self._candidates.get(src)
        if cand is None:
            self.counters.pongs_ignored += 1
            return
        rtt = now - sent.sent_at
        cand.last_pong = now
        cand.rtt = rtt
        self.counters.probes_answered += 1
        self._seen_as = message.src
        if src == self._wg_endpoint:
            self._wg_ok = True
        best = self._best
        if best is None or now >= self._trust_until or best == src or rtt < self._best_rtt * (1 - BETTER_PATH_MARGIN):
            if best != src:
                self._next_heartbeat = now + HEARTBEAT_INTERVAL
            self._best = src
            self._best_rtt = rtt
            self._trust_until = now + TRUST_UDP_ADDR_DURATION
        self._update_path(now)
