"""Timers and bounds of direct-path selection (turbowg/path/selector.py), each with its reason.

Seconds, monotonic. The timer values follow Tailscale's magicsock (wgengine/magicsock/endpoint.go), whose
reasoning they share: they were tuned against real NATs and firewalls, whose UDP mapping lifetimes are
commonly 30 s or more (RFC 4787 asks for >= 2 min; many home routers keep 30-60 s).
"""

from __future__ import annotations

# How long a direct path stays trusted after its last pong (magicsock trustUDPAddrDuration). Just over two
# heartbeat intervals, so one lost heartbeat pong does not drop the path, two do: with heartbeats every 3 s,
# a path that stops answering is abandoned at most 6.5 s after its last pong, and traffic falls back to DERP.
TRUST_UDP_ADDR_DURATION = 6.5

# Interval between heartbeat pings on the current direct path while a session is active (magicsock
# heartbeatInterval). Keeps the NAT mapping open and renews the trust above; 3 s < 6.5 s / 2.
HEARTBEAT_INTERVAL = 3.0

# A session is active while data went either way within this long (magicsock sessionActiveTimeout).
# Heartbeats and probing stop after it, so idle peers cost no packets; the next data packet restarts them.
SESSION_ACTIVE_TIMEOUT = 45.0

# Minimum time between two routine pings to one candidate endpoint (magicsock discoPingInterval), so a
# full probe round repeated by the heartbeat does not ping the same address every 3 s. Heartbeat pings of the
# current path, pings answering a call-me-maybe and ping-backs are not held back by it.
DISCO_PING_INTERVAL = 5.0

# A ping not answered within this long is forgotten (magicsock pingTimeoutDuration): its pong, should it
# still come, is ignored, and it counts as a lost probe. Well above any sane RTT.
PING_TIMEOUT_DURATION = 5.0

# While on a direct path, look for a better one this often (magicsock upgradeInterval). While on DERP with
# data flowing, rounds repeat every DISCO_PING_INTERVAL instead (as magicsock), so an opened path is found
# within seconds; idle peers do not probe at all.
UPGRADE_INTERVAL = 60.0

# A direct path this fast is good enough: no upgrade search for a better one (magicsock goodEnoughLatency).
GOOD_ENOUGH_LATENCY = 0.005

# Another endpoint replaces the current direct path only if its RTT is at least this much lower (a
# fraction of the current RTT): hysteresis, so two near-equal paths do not flap on jitter.
BETTER_PATH_MARGIN = 0.10

# Most endpoints one call-me-maybe carries (and the codec accepts): a host with many addresses still fits
# (32 * 18 bytes = 576 bytes of payload, under any path MTU), and a peer cannot make us ping thousands.
MAX_CALL_ME_MAYBE_ENDPOINTS = 32

# Most candidate endpoints remembered per peer (call-me-maybe + configured + peer-reflexive ones learned
# from pings); new peer-reflexive ones are not added beyond it (the pings are still answered).
MAX_PEER_CANDIDATES = 64
