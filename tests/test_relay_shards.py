"""A relay sharded over 2 worker processes: clients on different shards exchange verified packets."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager

from derp_traffic import exchange

from turbowg.derp.client import DerpClient
from turbowg.derp.codec import PeerGone

# The relay as shard.run_sharded runs it: every worker binds the same port with SO_REUSEPORT and wires
# its own DerpServer (behind the real HTTP front) to the other shards.
WORKER_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from turbowg.derp import keys
    from turbowg.relay.http import RelayHTTPProtocol
    from turbowg.relay.server import DerpServer
    from turbowg.relay.shards.supervisor import reuseport_listener, run_sharded

    port, workers = int(sys.argv[1]), int(sys.argv[2])
    private = keys.generate_private_key()  # one relay identity, shared by all shards

    async def worker_main(ctx):
        server = DerpServer(private)
        links = await ctx.attach(server)
        sock = reuseport_listener("127.0.0.1", port)
        listener = await asyncio.get_running_loop().create_server(lambda: RelayHTTPProtocol(server), sock=sock)
        print(f"shard {ctx.index} ready", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            c = links.counters()
            print(f"shard {ctx.index} out={c.packets_out} in={c.packets_in} batches={c.batches_out}", flush=True)
            listener.close()
            links.close()
            server.close()

    sys.exit(run_sharded(workers, worker_main))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def sharded_relay(workers: int, via_cli: bool = False) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    # Start-up is bounded: on a loaded machine a worker has been seen not to report ready (open question,
    # see the issue notes); one fresh start is tried before the test fails, never an endless wait.
    for attempt in range(2):
        try:
            cm = _sharded_relay_once(workers, via_cli)
            started = cm.__enter__()
        except _NotReady:
            if attempt == 1:
                raise AssertionError("sharded relay did not start twice in a row") from None
            continue
        try:
            yield started
        except BaseException:
            if not cm.__exit__(*sys.exc_info()):
                raise
        else:
            cm.__exit__(None, None, None)
        return


class _NotReady(Exception):
    pass


def _readline_until(proc: subprocess.Popen[str], deadline: float) -> str:
    """proc.stdout.readline(), but giving up at `deadline` (a reader thread feeds a queue)."""
    import queue
    import threading

    lines = getattr(proc, "_lines", None)
    if lines is None:
        lines = queue.Queue()
        proc._lines = lines  # type: ignore[attr-defined]
        assert proc.stdout is not None
        stream = proc.stdout

        def pump() -> None:
            for line in iter(stream.readline, ""):
                lines.put(line)
            lines.put("")

        threading.Thread(target=pump, daemon=True).start()
    try:
        return lines.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
        raise _NotReady from None


def _rest_of_output(proc: subprocess.Popen[str], timeout: float) -> str:
    """Wait for the relay to exit and return what it printed after start-up."""
    proc.wait(timeout)
    lines = getattr(proc, "_lines", None)
    if lines is None:
        out, _ = proc.communicate(timeout=timeout)
        return out
    out = []
    deadline = time.monotonic() + timeout
    while (line := _readline_until(proc, deadline)) != "":
        out.append(line)
    return "".join(out)


@contextmanager
def _sharded_relay_once(workers: int, via_cli: bool) -> Iterator[tuple[int, subprocess.Popen[str]]]:
    port = _free_port()
    if via_cli:
        cmd = [sys.executable, "-m", "turbowg", "relay", "--dev", "-a", f"127.0.0.1:{port}", "--stun", "false",
               "--workers", str(workers)]
    else:
        cmd = [sys.executable, "-c", WORKER_SCRIPT, str(port), str(workers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 20
        if via_cli:  # the CLI prints nothing on stdout; wait until every worker process exists and listens
            while len(_worker_pids(proc.pid)) < workers or not _accepts(port):
                assert proc.poll() is None, f"relay exited early: {proc.stdout.read()}"
                assert time.monotonic() < deadline, "relay did not start"
                time.sleep(0.05)
            time.sleep(0.3)
        ready = 0
        while ready < workers and not via_cli:
            line = _readline_until(proc, deadline)
            assert line, f"relay exited early (code {proc.poll()})"
            ready += "ready" in line
        yield port, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _worker_pids(parent: int) -> list[int]:
    with open(f"/proc/{parent}/task/{parent}/children") as f:
        return [int(p) for p in f.read().split()]


def _shard_of_connections(relay_port: int) -> dict[int, int]:
    """client local port -> pid of the worker process holding the accepted connection (via ss)."""
    out = subprocess.run(
        ["ss", "-tnpH", "state", "established", "sport", "=", f":{relay_port}"],
        capture_output=True, text=True, check=True,
    ).stdout
    owners: dict[int, int] = {}
    for line in out.splitlines():
        fields = line.split()
        peer = fields[3] if len(fields) > 3 else ""
        pid = re.search(r"pid=(\d+)", line)
        if pid and ":" in peer:
            owners[int(peer.rsplit(":", 1)[1])] = int(pid.group(1))
    return owners


async def _clients_on_each_shard(port: int, workers: list[int], per_shard: int,
                                 clients: list[DerpClient]) -> dict[int, list[DerpClient]]:
    """Connect clients until every worker holds `per_shard` (SO_REUSEPORT hashes the 4-tuple)."""
    by_shard: dict[int, list[DerpClient]] = {pid: [] for pid in workers}
    for _ in range(64):
        c = DerpClient()
        await c.connect(host="127.0.0.1", port=port, tls=False)
        clients.append(c)
        local_port = c._protocol.transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]
        owner = None
        for _ in range(50):
            owner = _shard_of_connections(port).get(local_port)
            if owner is not None:
                break
            await asyncio.sleep(0.02)
        assert owner in by_shard, f"connection owned by unexpected pid {owner}"
        by_shard[owner].append(c)
        if all(len(v) >= per_shard for v in by_shard.values()):
            return by_shard
    raise AssertionError(f"64 connections did not reach every shard: {[len(v) for v in by_shard.values()]}")


def test_two_shards_forward_100k_packets_between_clients_on_different_shards() -> None:
    with sharded_relay(2) as (port, proc):
        workers = _worker_pids(proc.pid)
        assert len(workers) == 2

        async def scenario() -> None:
            clients: list[DerpClient] = []
            try:
                by_shard = await _clients_on_each_shard(port, workers, 2, clients)
                (a, a2), (b, b2) = (by_shard[workers[0]][:2], by_shard[workers[1]][:2])
                # Announcements are asynchronous: wait until each side's key is usable from the other shard.
                await asyncio.sleep(0.2)
                await asyncio.gather(exchange(a, b, 100_000), exchange(b2, a2, 20_000))
                await b.close()
                async with asyncio.timeout(10):  # PeerGone for a key that lived on the other shard
                    while True:
                        msg = await a.recv()
                        if isinstance(msg, PeerGone) and msg.peer == b.public_key:
                            break
            finally:
                for c in clients:
                    await c.close()

        asyncio.run(scenario())
        proc.send_signal(signal.SIGTERM)
        out = _rest_of_output(proc, 15)
        assert proc.returncode == 0, out
        moved = [int(m) for m in re.findall(r"out=(\d+)", out)]
        assert len(moved) == 2 and all(n >= 20_000 for n in moved), out  # both directions crossed shards
        assert "Traceback" not in out, out
        for pid in workers:
            assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_parent_stops_when_a_shard_dies() -> None:
    with sharded_relay(2) as (_, proc):
        workers = _worker_pids(proc.pid)
        os.kill(workers[0], signal.SIGKILL)
        assert proc.wait(20) == 1
        assert not os.path.exists(f"/proc/{workers[1]}")


def test_cli_relay_with_two_workers_carries_packets_across_shards() -> None:
    with sharded_relay(2, via_cli=True) as (port, proc):
        workers = _worker_pids(proc.pid)
        assert len(workers) == 2

        async def scenario() -> None:
            clients: list[DerpClient] = []
            try:
                by_shard = await _clients_on_each_shard(port, workers, 4, clients)
                first, second = by_shard[workers[0]][:4], by_shard[workers[1]][:4]
                await asyncio.sleep(0.2)
                # four cross-shard pairs at once, half in each direction
                await asyncio.gather(
                    exchange(first[0], second[0], 100_000), exchange(second[1], first[1], 25_000),
                    exchange(first[2], second[2], 25_000), exchange(second[3], first[3], 25_000),
                )
            finally:
                for c in clients:
                    await c.close()

        asyncio.run(scenario())
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
        assert proc.returncode == 0, out
        assert "Traceback" not in out, out


def test_channel_congestion_pauses_and_resumes_client_reads() -> None:
    """A batch over the high-water mark pauses this shard's client reads at once; draining resumes them."""
    from turbowg.derp import keys
    from turbowg.relay.server import DerpServer
    from turbowg.relay.shards import peer as shard

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        theirs.setblocking(False)
        server = DerpServer(keys.generate_private_key())
        events: list[bool] = []
        peer = shard.ShardPeer(server, 1, on_congestion=lambda _p, congested: events.append(congested))
        transport, _ = await loop.connect_accepted_socket(lambda: peer, ours)
        peer._transport = transport  # type: ignore[assignment]
        packet = bytes(1400)
        sent = 0
        while sent * 1500 < shard.CHANNEL_HIGH + (1 << 20):  # one loop turn, more than the high-water mark
            assert peer.forward_packet(b"s" * 32, b"d" * 32, packet)
            sent += 1
        assert events == [True]  # signalled inside the turn, before any flush
        received = 0
        async with asyncio.timeout(10):
            while received < sent * (shard._REC_HEADER_LEN + 64 + 1400) or events[-1]:
                try:
                    received += len(await loop.sock_recv(theirs, 1 << 20))
                except BlockingIOError:
                    await asyncio.sleep(0.01)
        assert events[-1] is False and peer.counters.dropped_backlog == 0
        transport.close()
        theirs.close()

    asyncio.run(scenario())


def test_default_worker_count_is_one_per_core_but_one_for_tls_on_two_cores(monkeypatch) -> None:
    """--workers not given: plain DERP (forwarded in C across shards) gets a worker per core; a relay that
    terminates TLS itself (Python per packet) on 2 cores or fewer gets 1 (measured: relay/cli.py)."""
    from turbowg import cli as top
    from turbowg.relay import cli

    assert [cli.default_workers(n, tls=False) for n in (1, 2, 4)] == [1, 2, 4]
    assert [cli.default_workers(n, tls=True) for n in (1, 2, 3, 8)] == [1, 1, 3, 8]
    seen: list[int] = []
    monkeypatch.setattr(cli, "run_relay", lambda config: seen.append(config.workers) or 0)
    monkeypatch.setattr(cli.os, "cpu_count", lambda: 2)
    parser = top.build_parser()
    for argv, want in ((["relay", "--dev"], 2), (["relay", "-c", "x.json"], 1),
                       (["relay", "--dev", "--workers", "3"], 3)):
        args = parser.parse_args(argv)
        assert args.func(args) == 0
        assert seen[-1] == want, argv
