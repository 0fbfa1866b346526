"""The daemon's link to its home DERP relay (turbowgd --derp URL): WireGuard over DERP when UDP does not work.

`DerpLink` belongs to one `Runtime` (runtime.py). It

* installs a `Paths` (turbowg/device/paths.py, sans-IO) as `Device.paths`, so the device picks a path per
  peer and emits messages for the relay to pseudo-endpoints ``("derp:<key hex>", 0)``;
* keeps one DERP client connection (turbowg/derp/client.py) whose key is the device's WireGuard static private
  key (as Tailscale's node key), so every peer is addressable on the relay by the public key `wg` knows. It
  connects once a private key is set, reconnects with the new key when UAPI changes it, and reconnects with
  capped exponential backoff (with jitter) when the connection fails; while it is down the device uses direct
  paths only (`Paths.derp_up`);
* sends what the device addressed to the relay (`send`, `send_packed`: one relay write per peer per wake)
  and feeds what the relay delivers back through the device's packed receive path: each read from the relay
  decoded in one pass into one buffer of equal-size runs (`_on_packets`, DerpClient.set_packet_handler);
  disco and anything else the relay says come as messages (`_deliver`);
* runs the path timers (`Paths.tick`), a STUN binding request to the relay host from the WireGuard UDP socket
  (so the public mapping learned is WireGuard's own), and the local candidate addresses;
* serves `turbowg status IFNAME` on /var/run/wireguard/IFNAME.status (turbowg/daemon/status.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import ssl
import time
from urllib.parse import urlsplit

from turbowg.derp.client import DerpClient, DerpClientError
from turbowg.derp.codec import ReceivedPacket
from turbowg.device.output import Out, transmits
from turbowg.device.paths import Paths, derp_key, interface_addresses
from turbowg.path.disco import MAGIC as DISCO_MAGIC
from turbowg.path.disco import is_disco

log = logging.getLogger("turbowg.derp_link")

# Reconnect backoff: the first retry after RECONNECT_MIN (a restarted relay is usually back within a second),
# doubling per failure up to RECONNECT_MAX: that bounds how long DERP-only peers stay cut off after the relay
# returns, while one connection attempt per 10 s per client is no load for a relay. Each delay is scaled by a
# random factor in [1 - RECONNECT_JITTER, 1], so the clients of a restarted relay do not all come back in the
# same instant.
RECONNECT_MIN = 0.5
RECONNECT_MAX = 10.0
RECONNECT_JITTER = 0.5
CONNECT_TIMEOUT = 10.0  # TCP + TLS + DERP handshake; a relay slower than this counts as down
# Liveness: a DERP ping every LIVENESS_INTERVAL; no pong within LIVENESS_TIMEOUT drops the connection (a relay
# host that vanished without a FIN/RST would otherwise leave DERP-only peers cut off until TCP gives up).
LIVENESS_INTERVAL = 15.0
LIVENESS_TIMEOUT = 5.0
# The path timers run at their exact deadlines, and at least this often (deadlines that an event moved earlier
# between ticks are then at most this late; heartbeats every 3 s against a 6.5 s trust leave room for it).
PATH_TICK_MAX = 0.5
# STUN: the relay's STUN port (derper's default), and how often the public mapping is refreshed: NATs expire
# idle UDP mappings after 30 s or more, and a changed mapping must reach the peers' candidate lists.
STUN_PORT = 3478
STUN_INTERVAL = 20.0
# Local addresses change rarely (DHCP, a new interface): re-read them this often.
LOCAL_ADDRESSES_INTERVAL = 10.0
# One receive batch from the relay: at most this many bytes go through the device at once (what the runtime's
# UDP batches hold, so one TUN write takes them).
DERP_BATCH_BYTES = 2 << 20
DERP_RECV_MESSAGES = 1024


def ssl_context_for(url: str, ca_file: str | None) -> ssl.SSLContext | None:
    """TLS for an https relay: verified against the system store, or only against `ca_file`."""
    if urlsplit(url).scheme != "https":
        return None
    ctx = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def check_url(url: str) -> str | None:
    """Why `url` is no usable relay URL (None if it is)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return f"relay URL {url!r}: the scheme must be http or https"
    if not parts.hostname:
        return f"relay URL {url!r} has no host"
    try:
        _ = parts.port
    except ValueError:
        return f"relay URL {url!r} has a bad port"
    return None


def backoff_delay(failures: int, rng: random.Random) -> float:
    """The wait before reconnect attempt number `failures` (1 = after the first failure)."""
    delay = min(RECONNECT_MAX, RECONNECT_MIN * (2 ** max(0, failures - 1)))
    return delay * (1.0 - RECONNECT_JITTER * rng.random())


class DerpLink:
    def __init__(self, runtime, url: str, *, ca_file: str | None = None) -> None:
        self.runtime = runtime
        self.url = url
        self.ca_file = ca_file
        self.paths = Paths()
        self.paths.derp_home = url
        self.client: DerpClient | None = None
        self.counters: dict[str, int] = {}
        self.connects = 0
        self._key: bytes | None = None
        self._task: asyncio.Task | None = None
        self._key_changed: asyncio.Event | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._stun_target: tuple[str, int] | None = None
        self._next_stun = 0.0
        self._next_local = 0.0
        self._rng = random.Random()
        self._closed = False
        self.status_server = None
        # TURBOWG_DERP_BATCH=0: packets from the relay one message at a time (`_deliver`), the path before the
        # batch decoder; kept for comparison (turbowg bench tunnel --path derp measures both).
        self.batch = os.environ.get("TURBOWG_DERP_BATCH", "1") != "0"

    def _count(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    # ---- life cycle ------------------------------------------------------------------------------------------
    def start(self) -> None:
        loop = self.runtime._loop
        self.runtime.device.paths = self.paths
        self._key_changed = asyncio.Event()
        self._task = loop.create_task(self._run())
        self._tick_handle = loop.call_soon(self._on_tick)
        from turbowg.daemon.status import start_status_server
        try:
            self.status_server = start_status_server(self.runtime, loop)
        except OSError as exc:
            log.error("status socket: %s", exc)

    def after_set(self) -> None:
        """After a UAPI set: a new (or first) private key means a new relay identity."""
        key = self.runtime.device.private_key
        if key != self._key and self._key_changed is not None:
            self._key_changed.set()

    async def close(self) -> None:
        self._closed = True
        if self.status_server is not None:
            self.status_server.close()
            self.status_server = None
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        client = self.client
        self.client = None
        self.paths.derp_up = False
        if client is not None:
            await client.close()

    # ---- the connection ----------------------------------------------------------------------------------------
    async def _run(self) -> None:
        failures = 0
        assert self._key_changed is not None
        while not self._closed:
            key = self.runtime.device.private_key
            self._key_changed.clear()
            if key is None:
                await self._key_changed.wait()
                continue
            self._key = key
            client = DerpClient(key)
            try:
                await client.connect(self.url, ssl_context=ssl_context_for(self.url, self.ca_file),
                                     timeout=CONNECT_TIMEOUT)
            except (DerpClientError, OSError, ssl.SSLError) as exc:
                failures += 1
                self._count("derp_connect_failures")
                delay = backoff_delay(failures, self._rng)
                log.warning("DERP relay %s: %s; retrying in %.1f s", self.url, exc, delay)
                await client.close()
                await self._wait_or_key_change(delay)
                continue
            failures = 0
            self.connects += 1
            self._count("derp_connects")
            log.info("DERP relay %s connected (server key %s)", self.url, (client.server_key or b"").hex()[:16])
            self.client = client
            if self.batch:
                client.set_packet_handler(self._on_packets, divert=DISCO_MAGIC)
            self.paths.derp_up = True
            await self._resolve_stun()
            self._next_stun = 0.0
            try:
                await self._serve(client)
            finally:
                self.paths.derp_up = False
                self.client = None
                await client.close()
            if self._closed:
                return
            self._count("derp_disconnects")
            if self._key_changed.is_set():
                continue  # a new key: reconnect at once
            failures = 1
            delay = backoff_delay(failures, self._rng)
            log.warning("DERP relay %s: connection lost; reconnecting in %.1f s", self.url, delay)
            await self._wait_or_key_change(delay)

    async def _wait_or_key_change(self, delay: float) -> None:
        assert self._key_changed is not None
        try:
            async with asyncio.timeout(delay):
                await self._key_changed.wait()
        except TimeoutError:
            pass

    async def _serve(self, client: DerpClient) -> None:
        """Receive until the connection fails, the liveness check fails, or the private key changes."""
        assert self._key_changed is not None
        loop = asyncio.get_running_loop()
        receiver = loop.create_task(self._receive(client))
        watcher = loop.create_task(self._key_changed.wait())
        liveness = loop.create_task(self._liveness(client))
        try:
            await asyncio.wait((receiver, watcher, liveness), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (receiver, watcher, liveness):
                task.cancel()
            for task in (receiver, watcher, liveness):
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass

    async def _liveness(self, client: DerpClient) -> None:
        while True:
            await asyncio.sleep(LIVENESS_INTERVAL)
            try:
                await client.ping(timeout=LIVENESS_TIMEOUT)
            except DerpClientError:
                self._count("derp_liveness_failures")
                log.warning("DERP relay %s: no pong within %.0f s", self.url, LIVENESS_TIMEOUT)
                return

    async def _receive(self, client: DerpClient) -> None:
        while True:
            try:
                messages = await client.recv_many(DERP_RECV_MESSAGES)
            except DerpClientError:
                return
            self._deliver(messages)

    async def _resolve_stun(self) -> None:
        host = urlsplit(self.url).hostname or ""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, STUN_PORT, type=socket.SOCK_DGRAM)
        except OSError:
            self._stun_target = None
            return
        self._stun_target = (infos[0][4][0], STUN_PORT) if infos else None

    # ---- data ------------------------------------------------------------------------------------------------
    def _deliver(self, messages: list) -> None:
        """Packets from the relay: disco to the paths, WireGuard messages through the device's receive path
        with the sender's relay pseudo-endpoint as their source."""
        runtime = self.runtime
        paths = self.paths
        now = time.monotonic()
        out: Out = {}
        buf = bytearray()
        chunks: list[int] = []
        endpoints: list = []
        stride = 0
        open_run = False  # the last chunk may take more datagrams of its stride
        received = 0
        for msg in messages:
            if not isinstance(msg, ReceivedPacket):
                continue
            data = msg.data
            if not data:
                continue
            received += 1
            if is_disco(data):
                paths.receive_derp_disco(msg.source, data, now, out)
                continue
            state = paths.peers.get(msg.source)
            endpoint = state.derp_ep if state is not None else ("derp:" + msg.source.hex(), 0)
            size = len(data)
            buf += data
            if open_run and endpoint is endpoints[-1] and size <= stride:
                # As a UDP GRO read: equal-size datagrams from one sender, the last maybe shorter, in one chunk,
                # so the device opens the whole run with one call (a bulk TCP flow is mostly full-size packets).
                chunks[-2] = len(buf)
                open_run = size == stride
            else:
                chunks += (len(buf) - size, len(buf), size)
                endpoints.append(endpoint)
                stride = size
                open_run = True
            if len(buf) >= DERP_BATCH_BYTES:
                self._through_device(buf, chunks, endpoints, now)
                buf = bytearray()
                chunks = []
                endpoints = []
                open_run = False
        self._count("derp_rx_packets", received)
        if endpoints:
            self._through_device(buf, chunks, endpoints, now)
        if out:
            runtime._send(transmits(out))
        runtime._reschedule_timer()

    def _on_packets(self, buf: bytearray, chunks: list[int], sources: list[bytes]) -> None:
        """A batch from the relay (DerpClient.set_packet_handler: one read, decoded in one pass): WireGuard
        messages packed in runs of equal size per source, straight into the device's packed receive path.
        Disco packets (and empty ones) do not come here: they arrive as messages (`_receive`)."""
        peers = self.paths.peers
        endpoints = []
        received = 0
        for c, source in enumerate(sources):
            state = peers.get(source)
            endpoints.append(state.derp_ep if state is not None else ("derp:" + source.hex(), 0))
            stride = chunks[3 * c + 2]
            received += (chunks[3 * c + 1] - chunks[3 * c] + stride - 1) // stride
        self._count("derp_rx_packets", received)
        self._count("derp_rx_batches")
        try:
            self._through_device(buf, chunks, endpoints, time.monotonic())
        except Exception:  # never let one bad batch close the relay connection from its transport callback
            self._count("derp_rx_errors")
            log.exception("DERP receive batch failed")
        self.runtime._reschedule_timer()

    def _through_device(self, buf: bytearray, chunks: list[int], endpoints: list, now: float) -> None:
        runtime = self.runtime
        device = runtime.device
        self.paths.rx_via_derp = True
        try:
            count, tx = device.handle_udp_packed(buf, chunks, endpoints, now, under_load=False)
        finally:
            self.paths.rx_via_derp = False
        if count and runtime.tun is not None:
            try:
                runtime.tun.write_packed(buf, device.rx_layout, count)
            except OSError as exc:
                runtime.stop(f"TUN write failed: {exc}")
                return
        if tx:
            runtime._send(tx)

    def send(self, endpoint, datagrams: list) -> None:
        """Datagrams the device addressed to a relay pseudo-endpoint: one relay write."""
        client = self.client
        key = derp_key(endpoint)
        if client is None or key is None or client.closed:
            self._count("derp_tx_dropped_down", len(datagrams))
            return
        if client.write_blocked:  # the relay connection's write buffer is full: drop,
            self._count("derp_tx_dropped_full", len(datagrams))  # as a full link would (TCP inside backs off)
            return
        try:
            client.send_many(key, datagrams)
        except (DerpClientError, ValueError) as exc:
            self._count("derp_tx_errors", len(datagrams))
            log.debug("DERP send failed: %s", exc)
            return
        self._count("derp_tx_packets", len(datagrams))

    def send_packed(self, endpoint, buf, offset: int, sizes, sizes_start: int, count: int) -> None:
        mv = memoryview(buf)
        datagrams = []
        pos = offset
        for k in range(sizes_start, sizes_start + count):
            size = sizes[k]
            datagrams.append(mv[pos:pos + size])
            pos += size
        self.send(endpoint, datagrams)

    # ---- timers ----------------------------------------------------------------------------------------------
    def _on_tick(self) -> None:
        self._tick_handle = None
        if self._closed:
            return
        runtime = self.runtime
        now = time.monotonic()
        try:
            out: Out = {}
            if now >= self._next_local:
                self._next_local = now + LOCAL_ADDRESSES_INTERVAL
                udp = runtime.udp
                if udp is not None:
                    addresses = interface_addresses(exclude=(runtime.ifname,))
                    self.paths.set_local_endpoints([(a, udp.port) for a in addresses], now)
            if self.paths.derp_up and self._stun_target is not None and now >= self._next_stun:
                self._next_stun = now + STUN_INTERVAL
                request = self.paths.stun_request(now)
                if request is not None and runtime.udp is not None:
                    try:
                        runtime.udp.send_batch(self._stun_target, [request])
                    except (OSError, ValueError):
                        self._count("stun_send_errors")
            self.paths.tick(now, out)
            if out:
                runtime._send(transmits(out))
        finally:
            deadline = self.paths.next_deadline(now)
            delay = PATH_TICK_MAX if deadline is None else min(PATH_TICK_MAX, max(0.0, deadline - now) + 0.001)
            if not self._closed and runtime._loop is not None:
                self._tick_handle = runtime._loop.call_later(delay, self._on_tick)

    def stats(self) -> dict[str, int]:
        out = dict(self.counters)
        out.update(self.paths.status(self.runtime.device, time.monotonic())["counters"])
        out["derp_connected"] = int(self.paths.derp_up)
        return out
