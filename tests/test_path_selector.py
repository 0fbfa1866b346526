"""The per-peer path state machine (turbowg/path/selector.py), driven by a fake clock: every transition."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turbowg.conn.endpoint import Endpoint
from turbowg.path.constants import (
    DISCO_PING_INTERVAL,
    HEARTBEAT_INTERVAL,
    MAX_PEER_CANDIDATES,
    PING_TIMEOUT_DURATION,
    SESSION_ACTIVE_TIMEOUT,
    TRUST_UDP_ADDR_DURATION,
    UPGRADE_INTERVAL,
)
from turbowg.path.disco import CallMeMaybe, Ping, Pong
from turbowg.path.selector import (
    ORIGIN_CALL_ME_MAYBE,
    ORIGIN_CONFIGURED,
    ORIGIN_REFLEXIVE,
    Action,
    PathSelector,
    PathState,
    SendDERP,
    SendUDP,
)

E1: Endpoint = ("192.0.2.1", 41641)
E2: Endpoint = ("198.51.100.2", 41641)
E3: Endpoint = ("2001:db8::3", 41641)
ME: Endpoint = ("203.0.113.9", 5555)
LOCAL: tuple[Endpoint, ...] = (("10.0.0.9", 41641), ME)


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> float:
        self.t += dt
        return self.t


def counter_txids() -> Callable[[int], bytes]:
    numbers = itertools.count(1)
    return lambda n: next(numbers).to_bytes(n, "big")


def make(clock: Clock, local: Sequence[Endpoint] = LOCAL) -> PathSelector:
    sel = PathSelector(random_bytes=counter_txids())
    sel.set_local_candidates(local, clock())
    return sel


def pings(actions: Sequence[Action]) -> dict[Endpoint, list[bytes]]:
    out: dict[Endpoint, list[bytes]] = {}
    for a in actions:
        if isinstance(a, SendUDP) and isinstance(a.message, Ping):
            out.setdefault(a.endpoint, []).append(a.message.txid)
    return out


def cmms(actions: Sequence[Action]) -> list[CallMeMaybe]:
    return [a.message for a in actions if isinstance(a, SendDERP) and isinstance(a.message, CallMeMaybe)]


def pong_back(sel: PathSelector, actions: Sequence[Action], endpoint: Endpoint, now: float) -> None:
    """The peer answers our pings to `endpoint`."""
    for txid in pings(actions).get(endpoint, []):
        sel.on_disco(Pong(txid, ME), "udp", endpoint, now)


def go_direct(sel: PathSelector, clock: Clock, endpoint: Endpoint, rtt: float = 0.02,
              others: Sequence[Endpoint] = ()) -> None:
    """Learn `endpoint` (and `others`) from a call-me-maybe and get its pong: the path is then direct via it."""
    actions = sel.on_call_me_maybe([endpoint, *others], clock())
    clock.advance(rtt)
    pong_back(sel, actions, endpoint, clock())
    assert sel.current_path(clock()) == endpoint


def run(sel: PathSelector, clock: Clock, seconds: float, *, data: bool = True, answer: set[Endpoint] | None = None,
        step: float = 0.5, rtt: float = 0.01) -> list[Action]:
    """Tick as a daemon would (at next_deadline, and at least every `step` s) for `seconds`, sending data
    every `step` s if `data`; pings to endpoints in `answer` are ponged `rtt` later. Returns all actions."""
    out: list[Action] = []
    end = clock() + seconds
    next_data = clock() + step
    while clock() < end - 1e-9:
        deadline = sel.next_deadline(clock())
        t = min(next_data, end, deadline if deadline is not None and deadline > clock() else next_data)
        clock.t = t
        actions: list[Action] = []
        if data and t >= next_data:
            actions += sel.on_data_sent(t)
        if t >= next_data:
            next_data = t + step
        actions += sel.on_tick(t)
        out += actions
        for endpoint in answer or ():
            pong_back(sel, actions, endpoint, t + rtt)
    return out


# -- DERP-only and probing -------------------------------------------------------------------------------------
def test_starts_on_derp() -> None:
    clock = Clock()
    sel = make(clock)
    assert sel.current_path(clock()) is None
    assert sel.state(clock()) is PathState.DERP
    assert sel.on_tick(clock()) == []  # idle: nothing to do


def test_session_start_probes_every_candidate_and_sends_call_me_maybe() -> None:
    clock = Clock()
    sel = make(clock)
    sel.on_call_me_maybe([E1, E2], clock())
    clock.advance(10)
    actions = sel.on_data_sent(clock())
    assert set(pings(actions)) == {E1, E2}
    assert cmms(actions) == [CallMeMaybe(LOCAL)]
    assert sel.state(clock()) is PathState.PROBING
    assert sel.on_data_sent(clock()) == ()  # per-packet call: no more work while the session is active
    assert sel.counters.call_me_maybe_sent == 2  # one in answer to the peer's, one with this round


def test_pong_makes_the_path_direct() -> None:
    clock = Clock()
    sel = make(clock)
    actions = sel.on_call_me_maybe([E1], clock())
    assert list(pings(actions)) == [E1]
    assert sel.current_path(clock()) is None
    clock.advance(0.03)
    pong_back(sel, actions, E1, clock())
    assert sel.current_path(clock()) == E1
    assert sel.state(clock()) is PathState.DIRECT
    status = sel.status(clock())
    assert status.path == E1 and status.rtt == pytest.approx(0.03)
    assert status.counters.probes_answered == 1 and status.counters.path_changes == 1
    assert status.last_path_change == clock()
    assert status.seen_as == ME
    assert status.trusted_for == pytest.approx(TRUST_UDP_ADDR_DURATION)


def test_lowest_rtt_pong_wins_with_hysteresis() -> None:
    clock = Clock()
    sel = make(clock)
    t0 = clock()
    actions = sel.on_call_me_maybe([E1, E2, E3], t0)
    txids = pings(actions)
    sel.on_disco(Pong(txids[E1][0], ME), "udp", E1, t0 + 0.050)
    assert sel.current_path(clock()) == E1
    sel.on_disco(Pong(txids[E2][0], ME), "udp", E2, t0 + 0.047)  # 6% faster: not worth a switch
    assert sel.current_path(t0 + 0.05) == E1
    sel.on_disco(Pong(txids[E3][0], ME), "udp", E3, t0 + 0.020)  # 60% faster: switch
    assert sel.current_path(t0 + 0.05) == E3
    assert sel.counters.path_changes == 2


def test_pong_with_unexpected_txid_is_ignored() -> None:
    clock = Clock()
    sel = make(clock)
    actions = sel.on_call_me_maybe([E1], clock())
    sel.on_disco(Pong(b"\xee" * 12, ME), "udp", E1, clock() + 0.01)
    assert sel.current_path(clock()) is None
    assert sel.counters.pongs_ignored == 1
    txid = pings(actions)[E1][0]
    sel.on_disco(Pong(txid, ME), "udp", E2, clock() + 0.01)  # right txid, wrong source
    sel.on_disco(Pong(txid, ME), "derp", None, clock() + 0.01)  # right txid over DERP: proves no UDP path
    assert sel.current_path(clock()) is None
    assert sel.counters.pongs_ignored == 3
    sel.on_disco(Pong(txid, ME), "udp", E1, clock() + 0.01)
    assert sel.current_path(clock() + 0.01) == E1
    sel.on_disco(Pong(txid, ME), "udp", E1, clock() + 0.02)  # a replayed pong: its ping is answered already
    assert sel.counters.pongs_ignored == 4 and sel.counters.probes_answered == 1


def test_ping_timeout_forgets_the_ping() -> None:
    clock = Clock()
    sel = make(clock)
    actions = sel.on_call_me_maybe([E1], clock())
    clock.advance(PING_TIMEOUT_DURATION + 0.1)
    sel.on_tick(clock())
    assert sel.counters.probes_timed_out == 1
    assert sel.state(clock()) is PathState.DERP
    pong_back(sel, actions, E1, clock())  # too late
    assert sel.current_path(clock()) is None
    assert sel.counters.pongs_ignored == 1


# -- heartbeats and fallback -------------------------------------------------------------------------------------
def test_heartbeats_keep_an_answering_path_while_traffic_flows() -> None:
    clock = Clock()
    sel = make(clock)
    go_direct(sel, clock, E1)
    actions = run(sel, clock, 60, answer={E1})
    assert sel.current_path(clock()) == E1
    heartbeats = len(pings(actions)[E1])
    assert 60 / HEARTBEAT_INTERVAL - 2 <= heartbeats <= 60 / HEARTBEAT_INTERVAL + 2
    assert sel.counters.fallbacks == 0 and sel.counters.path_changes == 1


def test_falls_back_to_derp_within_ten_seconds_when_the_path_stops_answering() -> None:
    clock = Clock()
    sel = make(clock)
    go_direct(sel, clock, E1)
    run(sel, clock, 20, answer={E1})
    assert sel.current_path(clock()) == E1
    stopped = clock()
    fell_back_at = None
    actions: list[Action] = []
    while clock() < stopped + 15:
        step = run(sel, clock, 0.5)  # nobody answers any more
        actions += step
        if fell_back_at is None and sel.current_path(clock()) is None:
            fell_back_at = clock()
            assert cmms(step), "falling back starts a new probe round, with a call-me-maybe"
    assert fell_back_at is not None and fell_back_at - stopped < 10
    assert fell_back_at - stopped <= TRUST_UDP_ADDR_DURATION + 0.5
    assert sel.counters.fallbacks == 1 and sel.counters.path_changes == 2
    last_change = sel.status(clock()).last_path_change
    assert last_change is not None and fell_back_at - 0.5 <= last_change <= fell_back_at
    assert sel.state(clock()) in (PathState.PROBING, PathState.DERP)


def test_one_lost_heartbeat_pong_does_not_drop_the_path() -> None:
    clock = Clock()
    sel = make(clock)
    go_direct(sel, clock, E1)
    sel.on_data_sent(clock())
    run(sel, clock, 10, answer={E1})
    heartbeat = run(sel, clock, HEARTBEAT_INTERVAL)  # the pong of this one is lost
    assert pings(heartbeat)[E1]
    run(sel, clock, 20, answer={E1})
    assert sel.current_path(clock()) == E1 and sel.counters.fallbacks == 0


def test_heartbeats_stop_when_idle() -> None:
    clock = Clock()
    sel = make(clock)
    go_direct(sel, clock, E1)
    run(sel, clock, 10, answer={E1})
    actions = run(sel, clock, SESSION_ACTIVE_TIMEOUT + 30, data=False, answer={E1})
    late = [a for a in actions if isinstance(a, SendUDP)]
    # Heartbeats go on until the session is SESSION_ACTIVE_TIMEOUT idle, then stop.
    assert late, "heartbeats continue for a while after the last data"
    assert not run(sel, clock, 120, data=False)
    # Idle, the trust runs out without a pong: no failure, the path just goes quiet.
    assert sel.current_path(clock()) is None
    assert sel.counters.fallbacks == 0
    assert not sel.status(clock()).session_active
    # Traffic again: probe at once (DERP meanwhile), direct after the pong.
    actions = list(sel.on_data_sent(clock()))
    assert E1 in pings(actions) and cmms(actions)
    pong_back(sel, actions, E1, clock() + 0.01)
    assert sel.current_path(clock() + 0.01) == E1


def test_pong_arriving_after_trust_expiry() -> None:
    clock = Clock()
    sel = make(clock)
    go_direct(sel, clock, E1)  # pong at t0
    t0 = clock()
    sel.on_data_sent(t0)
    first = sel.on_tick(clock.advance(HEARTBEAT_INTERVAL))  # heartbeat 1 at t0+3
    second = sel.on_tick(clock.advance(HEARTBEAT_INTERVAL))  # heartbeat 2 at t0+6
    assert pings(first)[E1] and pings(second)[E1]
    clock.t = t0 + TRUST_UDP_ADDR_DURATION + 0.1
    sel.on_tick(clock())
    assert sel.current_path(clock()) is None and sel.counters.fallbacks == 1
    # the pong of heartbeat 2, late but within PING_TIMEOUT_DURATION of its ping, proves the path again
    pong_back(sel, second, E1, clock())
    assert sel.current_path(clock()) == E1
    # the pong of heartbeat 1, later than PING_TIMEOUT_DURATION after its ping, does not count
    clock.t = t0 + HEARTBEAT_INTERVAL + PING_TIMEOUT_DURATION + 0.1
    pong_back(sel, first, E1, clock())
    assert sel.counters.pongs_ignored == 1
    assert sel.counters.probes_answered == 2


# -- call-me-maybe, pings from the peer, both probing at once ---------------------------------------------------
def test_call_me_maybe_pings_every_endpoint_at_once_even_if_just_pinged() -> None:
    clock = Clock()
    sel = make(clock)
    sel.on_call_me_maybe([E1, E2], clock())
    clock.advance(0.1)
    actions = sel.on_call_me_maybe([E1, E2], clock())
    assert set(pings(actions)) == {E1, E2}
    assert sel.counters.call_me_maybe_received == 2


def test_call_me_maybe_is_answered_with_ours_at_most_every_ping_interval() -> None:
    clock = Clock()
    sel = make(clock)
    assert cmms(sel.on_call_me_maybe([E1], clock())) == [CallMeMaybe(LOCAL)]
    assert cmms(sel.on_call_me_maybe([E1], clock.advance(1))) == []  # no echo between two peers
    assert cmms(sel.on_call_me_maybe([E1], clock.advance(DISCO_PING_INTERVAL))) == [CallMeMaybe(LOCAL)]
    assert cmms(make(clock, local=()).on_call_me_maybe([E1], clock())) == []  # nothing to tell


def test_next_deadline() -> None:
    clock = Clock()
    sel = make(clock)
    assert sel.next_deadline(clock()) is None
    go_direct(sel, clock, E1)
    t = clock()
    assert sel.next_deadline(t) == pytest.approx(t + TRUST_UDP_ADDR_DURATION)  # idle: only trust runs out
    sel.on_data_sent(t)
    deadline = sel.next_deadline(t)
    assert deadline is not None and deadline <= t  # active: the pending round (to send our candidates) is due
    sel.on_tick(t)
    assert sel.next_deadline(t) == pytest.approx(t + HEARTBEAT_INTERVAL)


def test_changed_candidate_list() -> None:
    clock = Clock()
    sel = make(clock)
    first = sel.on_call_me_maybe([E1, E2], clock())
    clock.advance(0.02)
    pong_back(sel, first, E1, clock())
    assert sel.current_path(clock()) == E1
    actions = sel.on_call_me_maybe([E2, E3], clock())  # E1 is gone: the peer moved
    assert set(pings(actions)) == {E2, E3}
    assert sel.current_path(clock()) is None
    assert {e.endpoint for e in sel.status(clock()).endpoints} == {E2, E3}
    pong_back(sel, first, E2, clock() + 0.01)  # a pong to a ping sent before the change still counts (E2 kept)
    assert sel.current_path(clock() + 0.01) == E2
    later = run(sel, clock, 30, answer={E2})
    assert E1 not in pings(later)


def test_removed_endpoint_pongs_are_ignored() -> None:
    clock = Clock()
    sel = make(clock)
    first = sel.on_call_me_maybe([E1], clock())
    sel.on_call_me_maybe([E2], clock())
    pong_back(sel, first, E1, clock() + 0.01)
    assert sel.current_path(clock() + 0.01) is None


def test_ping_is_answered_with_a_pong_and_pinged_back() -> None:
    clock = Clock()
    sel = make(clock)
    actions = sel.on_disco(Ping(b"p" * 12), "udp", E1, clock())
    assert actions[0] == SendUDP(E1, Pong(b"p" * 12, E1))
    assert list(pings(actions)) == [E1]  # ping back: the peer's NAT is open toward us now
    assert sel.status(clock()).endpoints[0].origins == ORIGIN_REFLEXIVE
    pong_back(sel, actions, E1, clock() + 0.01)
    again = sel.on_disco(Ping(b"q" * 12), "udp", E1, clock() + 0.5)
    assert again == [SendUDP(E1, Pong(b"q" * 12, E1))]  # answered path: no ping back
    assert sel.on_disco(Ping(b"r" * 12), "derp", None, clock()) == []  # pings only mean something over UDP
    assert sel.counters.pings_received == 3


@dataclass(order=True)
class _Event:
    at: float
    seq: int
    to: str = field(compare=False)
    action: Action = field(compare=False)
    src: Endpoint | None = field(compare=False)


class Net:
    """Two hosts behind endpoint-independent-mapping, address-and-port-dependent-filtering NATs
    (RFC 4787): a datagram from outside gets in only if the host sent to that address and port first."""

    UDP_DELAY = 0.010
    DERP_DELAY = 0.040

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.public = {"a": ("198.51.100.1", 1001), "b": ("203.0.113.1", 2002)}
        self.private = {"a": ("10.0.0.1", 41641), "b": ("10.1.0.1", 41641)}
        self.opened: dict[str, set[Endpoint]] = {"a": set(), "b": set()}
        self.sel = {h: PathSelector(random_bytes=counter_txids()) for h in "ab"}
        for h in "ab":
            self.sel[h].set_local_candidates([self.private[h], self.public[h]], clock())
        self.queue: list[_Event] = []
        self.seq = itertools.count()
        self.filtered = 0

    def send(self, sender: str, actions: Sequence[Action]) -> None:
        other = "b" if sender == "a" else "a"
        now = self.clock()
        for action in actions:
            if isinstance(action, SendDERP):
                heapq.heappush(self.queue, _Event(now + self.DERP_DELAY, next(self.seq), other, action, None))
                continue
            self.opened[sender].add(action.endpoint)
            if action.endpoint != self.public[other]:
                continue  # the other's private address is not routable from here
            heapq.heappush(self.queue, _Event(now + self.UDP_DELAY, next(self.seq), other, action,
                                              self.public[sender]))

    def run_until(self, t: float) -> None:
        while self.queue and self.queue[0].at <= t:
            ev = heapq.heappop(self.queue)
            self.clock.t = max(self.clock.t, ev.at)
            if ev.src is None:
                out = self.sel[ev.to].on_disco(ev.action.message, "derp", None, self.clock())
            else:
                if ev.src not in self.opened[ev.to]:
                    self.filtered += 1  # by the receiver's NAT
                    continue
                out = self.sel[ev.to].on_disco(ev.action.message, "udp", ev.src, self.clock())
            self.send(ev.to, out)
        self.clock.t = max(self.clock.t, t)


def test_both_probe_at_once_through_two_nats() -> None:
    clock = Clock()
    net = Net(clock)
    net.send("a", net.sel["a"].on_data_sent(clock()))  # both start sending (over DERP) together
    net.send("b", net.sel["b"].on_data_sent(clock()))
    net.run_until(clock() + 0.5)
    assert net.sel["a"].current_path(clock()) == net.public["b"]
    assert net.sel["b"].current_path(clock()) == net.public["a"]


def test_one_side_starts_the_other_follows() -> None:
    clock = Clock()
    net = Net(clock)
    start = clock()
    net.send("a", net.sel["a"].on_data_sent(clock()))  # b is idle, knows nothing of a's endpoints
    net.run_until(clock() + 0.5)  # a's call-me-maybe reaches b over DERP; b pings a's endpoints at once
    assert net.sel["b"].current_path(clock()) == net.public["a"]
    assert net.sel["a"].current_path(clock()) == net.public["b"]  # b's ping was pinged back
    assert clock() - start < 1
    assert net.filtered  # b's first ping hit a's NAT before a had sent anything to b


def test_probes_repeat_every_disco_ping_interval_while_on_derp_and_active() -> None:
    # As magicsock: no trusted path + data flowing = a round every DISCO_PING_INTERVAL, so a path that opens
    # later (a firewall rule removed) is found within seconds (issue 11: direct within 10 s).
    clock = Clock()
    sel = make(clock)
    sel.on_call_me_maybe([E1], clock())
    clock.advance(DISCO_PING_INTERVAL)
    start = clock()
    rounds: list[float] = []
    for _ in range(int(200 / 0.5)):
        clock.advance(0.5)
        actions = list(sel.on_data_sent(clock())) + sel.on_tick(clock())
        if cmms(actions):
            rounds.append(clock() - start)
    assert rounds[0] == pytest.approx(0.5)
    gaps = [b - a for a, b in itertools.pairwise(rounds)]
    assert len(gaps) > 30 and all(g == pytest.approx(DISCO_PING_INTERVAL) for g in gaps)
    assert sel.current_path(clock()) is None


def test_probes_stop_while_idle_on_derp() -> None:
    clock = Clock()
    sel = make(clock)
    sel.on_call_me_maybe([E1], clock())
    sel.on_data_sent(clock())
    clock.advance(SESSION_ACTIVE_TIMEOUT + 1)
    sel.on_tick(clock())
    pings = 0
    for _ in range(200):
        clock.advance(0.5)
        pings += len(sel.on_tick(clock()))
    assert pings == 0


def test_upgrade_check_while_direct_looks_for_a_better_path() -> None:
    clock = Clock()
    sel = make(clock)
    sel.on_call_me_maybe([E2], clock())
    go_direct(sel, clock, E1, rtt=0.08, others=[E2])
    actions = run(sel, clock, UPGRADE_INTERVAL + 5, answer={E1}, rtt=0.08)
    assert E2 in pings(actions), "the upgrade round pings the other candidates"
    assert sel.current_path(clock()) == E1


def test_no_upgrade_search_when_the_path_is_good_enough() -> None:
    clock = Clock()
    sel = make(clock)
    go_direct(sel, clock, E1, rtt=0.001, others=[E2])
    run(sel, clock, 10, answer={E1}, rtt=0.001)
    actions = run(sel, clock, UPGRADE_INTERVAL + 5, answer={E1}, rtt=0.001)
    assert E2 not in pings(actions) and not cmms(actions)


def test_new_local_candidates_are_sent_at_the_next_tick() -> None:
    clock = Clock()
    sel = make(clock)
    go_direct(sel, clock, E1, rtt=0.001)
    run(sel, clock, 10, answer={E1}, rtt=0.001)
    sel.set_local_candidates([("10.0.0.9", 41641), ("203.0.113.10", 6000)], clock())
    actions = run(sel, clock, 0.5, answer={E1}, rtt=0.001)
    assert cmms(actions) == [CallMeMaybe((("10.0.0.9", 41641), ("203.0.113.10", 6000)))]
    assert not cmms(run(sel, clock, 10, answer={E1}, rtt=0.001))


def test_data_from_an_unknown_source_is_a_candidate_pinged_at_most_every_ping_interval() -> None:
    clock = Clock()
    sel = make(clock)
    sel.on_call_me_maybe([E1], clock())  # a disco peer
    sel.on_data_sent(clock())
    first = sel.on_data_received(clock(), E2)
    assert list(pings(first)) == [E2]
    assert sel.on_data_received(clock() + 0.1, E2) == []
    assert list(pings(sel.on_data_received(clock() + DISCO_PING_INTERVAL, E2))) == [E2]
    assert sel.current_path(clock()) is None  # data alone does not make a disco peer's path


def test_candidates_are_bounded() -> None:
    clock = Clock()
    sel = make(clock)
    for i in range(MAX_PEER_CANDIDATES + 20):
        sel.on_disco(Ping(i.to_bytes(12, "big")), "udp", ("192.0.2.1", 1000 + i), clock())
    assert len(sel.status(clock()).endpoints) == MAX_PEER_CANDIDATES


# -- configured endpoints and plain WireGuard peers ------------------------------------------------------------
def test_configured_endpoint_is_tried_first_and_a_plain_peer_stays_direct() -> None:
    clock = Clock()
    sel = make(clock)
    sel.set_configured_endpoint(E1, clock())
    assert sel.current_path(clock()) == E1  # before any disco
    for _ in range(400):  # 200 s of traffic with a peer that never answers disco (plain WireGuard)
        clock.advance(0.5)
        sel.on_data_sent(clock())
        sel.on_data_received(clock(), E1)
        sel.on_tick(clock())
        assert sel.current_path(clock()) == E1
    assert sel.counters.path_changes == 1 and sel.counters.fallbacks == 0
    assert sel.status(clock()).endpoints[0].origins == ORIGIN_CONFIGURED


def test_direct_handshake_timeout_moves_to_derp_and_back_for_a_plain_peer() -> None:
    clock = Clock()
    sel = make(clock)
    sel.set_configured_endpoint(E1, clock())
    sel.on_data_sent(clock())
    clock.advance(5)
    actions = sel.on_handshake_timeout_direct(clock())
    assert sel.current_path(clock()) is None and sel.counters.fallbacks == 1
    assert cmms(actions)  # probe: maybe the peer is on DERP and a NAT-traversed path works
    clock.advance(5)
    sel.on_handshake_timeout_derp(clock())  # nobody on DERP either: alternate back to direct
    assert sel.current_path(clock()) == E1
    clock.advance(5)
    sel.on_handshake_timeout_direct(clock())
    assert sel.current_path(clock()) is None
    sel.on_data_received(clock(), E1)  # the peer got through directly: direct again
    assert sel.current_path(clock()) == E1


def test_plain_peer_roams_like_wireguard() -> None:
    clock = Clock()
    sel = make(clock)
    sel.set_configured_endpoint(E1, clock())
    sel.on_data_received(clock(), E2)
    assert sel.current_path(clock()) == E2


def test_disco_peer_configured_endpoint_that_stops_answering_falls_back() -> None:
    clock = Clock()
    sel = make(clock)
    sel.set_configured_endpoint(E1, clock())
    actions = list(sel.on_data_sent(clock()))
    assert E1 in pings(actions)
    pong_back(sel, actions, E1, clock() + 0.01)  # a disco peer: the configured endpoint answers
    run(sel, clock, 20, answer={E1})
    assert sel.current_path(clock()) == E1
    start = clock()
    while sel.current_path(clock()) is not None:
        run(sel, clock, 0.5)
    assert clock() - start < 10
    run(sel, clock, 10)
    assert sel.current_path(clock()) is None  # not sticky any more: pongs must prove it again
    assert sel.on_handshake_timeout_derp(clock()) is None
    assert sel.current_path(clock()) is None  # a disco peer is reachable over DERP: no alternation
    actions = run(sel, clock, UPGRADE_INTERVAL + 1, answer={E1})  # it answers again
    assert sel.current_path(clock()) == E1


def test_disco_ping_from_the_configured_endpoint_keeps_it() -> None:
    clock = Clock()
    sel = make(clock)
    sel.set_configured_endpoint(E1, clock())
    sel.on_data_received(clock(), E1)
    sel.on_disco(Ping(b"x" * 12), "udp", E1, clock())  # the peer turns out to speak disco
    assert sel.current_path(clock()) == E1
    assert sel.counters.path_changes == 1


def test_changing_the_configured_endpoint() -> None:
    clock = Clock()
    sel = make(clock)
    sel.set_configured_endpoint(E1, clock())
    sel.on_call_me_maybe([E1], clock())
    sel.set_configured_endpoint(E2, clock())
    assert sel.current_path(clock()) is None  # a disco peer: E2 unproven
    origins = {e.endpoint: e.origins for e in sel.status(clock()).endpoints}
    assert origins == {E1: ORIGIN_CALL_ME_MAYBE, E2: ORIGIN_CONFIGURED}
    sel.set_configured_endpoint(None, clock())
    assert E2 not in {e.endpoint for e in sel.status(clock()).endpoints}


def test_default_txids_are_random() -> None:
    sel = PathSelector()
    a = sel.on_call_me_maybe([E1, E2], 0.0)
    txids = [t for ts in pings(a).values() for t in ts]
    assert len(set(txids)) == 2 and all(len(t) == 12 for t in txids)


# -- any sequence of events (property test) --------------------------------------------------------------------
_EPS = [E1, E2, E3, ("10.9.9.9", 7)]
_EVENT = st.one_of(
    st.tuples(st.just("tick"), st.floats(0, 20)),
    st.tuples(st.just("sent"), st.floats(0, 2)),
    st.tuples(st.just("recv"), st.floats(0, 2), st.sampled_from([None, *_EPS])),
    st.tuples(st.just("cmm"), st.floats(0, 2), st.lists(st.sampled_from(_EPS), max_size=4)),
    st.tuples(st.just("ping"), st.floats(0, 2), st.sampled_from(["udp", "derp"]), st.sampled_from(_EPS)),
    st.tuples(st.just("pong"), st.floats(0, 2), st.sampled_from(["udp", "derp"]), st.sampled_from(_EPS),
              st.integers(0, 3)),
    st.tuples(st.just("hs_direct"), st.floats(0, 6)),
    st.tuples(st.just("hs_derp"), st.floats(0, 6)),
    st.tuples(st.just("configure"), st.sampled_from([None, *_EPS])),
    st.tuples(st.just("local"), st.lists(st.sampled_from(_EPS), max_size=3)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_EVENT, max_size=60))
def test_any_event_sequence_keeps_the_invariants(events: list[tuple]) -> None:
    clock = Clock()
    sel = make(clock)
    sent: list[bytes] = []  # txids we sent, for pongs that match (or not)
    for event in events:
        kind = event[0]
        if kind not in ("configure", "local"):
            clock.advance(event[1])
        now = clock()
        actions: Sequence[Action] = []
        if kind == "tick":
            actions = sel.on_tick(now)
            deadline = sel.next_deadline(now)
            assert deadline is None or deadline > now  # a tick leaves nothing overdue: no busy loop
        elif kind == "sent":
            actions = sel.on_data_sent(now)
        elif kind == "recv":
            actions = sel.on_data_received(now, event[2])
        elif kind == "cmm":
            actions = sel.on_call_me_maybe(event[2], now)
        elif kind == "ping":
            actions = sel.on_disco(Ping(b"\x01" * 12), event[2], event[3] if event[2] == "udp" else None, now)
        elif kind == "pong":
            txid = sent[-1 - event[4]] if len(sent) > event[4] else b"\x02" * 12
            actions = sel.on_disco(Pong(txid, ME), event[2], event[3] if event[2] == "udp" else None, now)
        elif kind == "hs_direct":
            actions = sel.on_handshake_timeout_direct(now)
        elif kind == "hs_derp":
            sel.on_handshake_timeout_derp(now)
        elif kind == "configure":
            sel.set_configured_endpoint(event[1], now)
        else:
            sel.set_local_candidates(event[1], now)
        for txids in pings(actions).values():
            sent.extend(txids)
        path = sel.current_path(now)
        status = sel.status(now)
        known = {e.endpoint for e in status.endpoints}
        assert path is None or path in known or path == sel._wg_endpoint
        assert status.state is (PathState.DIRECT if path is not None else status.state)
        assert len(known) <= MAX_PEER_CANDIDATES + 1
        c = status.counters
        assert c.probes_answered + c.probes_timed_out <= c.probes_sent
        assert all(isinstance(a, SendUDP | SendDERP) for a in actions)
