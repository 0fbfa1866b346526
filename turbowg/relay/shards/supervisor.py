"""The parent side of a sharded relay: fork N workers, give each its channel ends, supervise them.

`run_sharded(workers, worker_main)` makes one socketpair per pair of shards (records.py says what
flows on them), forks, and in each child runs `worker_main(ShardContext)` on its own uvloop loop
(`run_worker`). The parent process only supervises: it forwards SIGTERM/SIGINT to the workers and,
if one worker dies unexpectedly, stops the rest and exits non-zero (the channels of a dead shard
cannot be rebuilt in place; a service manager restarts the whole relay). With one worker nothing is
forked. `reuseport_listener` is the relay's one way to make a listening socket: every shard binds it
to the same port.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop

from turbowg.relay.shards.links import ShardContext

log = logging.getLogger("turbowg.relay.shards")

STOP_GRACE_SECONDS = 10.0

WorkerMain = Callable[[ShardContext], Coroutine[Any, Any, None]]


def _make_channels(workers: int) -> dict[int, dict[int, socket.socket]]:
    """One socketpair per pair of shards: channels[i][j] is shard i's end of the i<->j channel."""
    channels: dict[int, dict[int, socket.socket]] = {i: {} for i in range(workers)}
    for i in range(workers):
        for j in range(i + 1, workers):
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            for end in (a, b):
                end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
                end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            channels[i][j] = a
            channels[j][i] = b
    return channels


def run_worker(ctx: ShardContext, worker_main: WorkerMain) -> int:
    """Run one shard in the current process until worker_main returns or SIGTERM/SIGINT arrives."""

    async def guarded() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, task.cancel)
        try:
            await worker_main(ctx)
        except asyncio.CancelledError:
            pass

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(guarded())
    return 0


def run_sharded(workers: int, worker_main: WorkerMain) -> int:
    """Run `worker_main` in `workers` forked processes (in-process if workers == 1); returns an exit code.

    Call it from synchronous code (no running event loop): the children are forked from here.
    Each worker must create its own listening socket with SO_REUSEPORT, build its own DerpServer and
    call `await ctx.attach(server)` before serving.
    """
    if workers < 1:
        raise ValueError("workers must be at least 1")
    if workers == 1:
        return run_worker(ShardContext(0, 1), worker_main)

    channels = _make_channels(workers)
    watched = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}
    old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, watched)
    children: dict[int, int] = {}  # pid -> shard index
    try:
        for index in range(workers):
            pid = os.fork()
            if pid == 0:  # child
                code = 1
                try:
                    signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
                    for other, ends in channels.items():
                        if other != index:
                            for sock in ends.values():
                                sock.close()
                    code = run_worker(ShardContext(index, workers, channels[index]), worker_main)
                except BaseException:
                    log.exception("shard %d crashed", index)
                finally:
                    os._exit(code)
            children[pid] = index
        for ends in channels.values():
            for sock in ends.values():
                sock.close()
        return _supervise(children, watched)
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)  # no-op unless supervision itself failed
            except ProcessLookupError:
                pass
        signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)


def _supervise(children: dict[int, int], watched: set[signal.Signals]) -> int:
    """Wait for the workers; forward stop signals; stop all if one dies. Children must be reaped."""
    stopping = False
    deadline: float | None = None
    status = 0
    while children:
        timeout = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
        info = signal.sigtimedwait(watched, timeout)
        if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT) and not stopping:
            stopping = True
            deadline = time.monotonic() + STOP_GRACE_SECONDS
            _signal_all(children, signal.SIGTERM)
        while children:  # reap everything that exited (SIGCHLD coalesces)
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            index = children.pop(pid, None)
            code = os.waitstatus_to_exitcode(wait_status)
            if not stopping:
                log.error("shard %s exited with %d; stopping the relay", index, code)
                status = 1
                stopping = True
                deadline = time.monotonic() + STOP_GRACE_SECONDS
                _signal_all(children, signal.SIGTERM)
            elif code != 0:
                status = status or 1
        if deadline is not None and time.monotonic() >= deadline and children:
            log.error("shards %s did not stop in %.0f s; killing", sorted(children.values()), STOP_GRACE_SECONDS)
            _signal_all(children, signal.SIGKILL)
            deadline = time.monotonic() + STOP_GRACE_SECONDS
    return status


def _signal_all(children: dict[int, int], signum: int) -> None:
    for pid in children:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def reuseport_listener(host: str, port: int, backlog: int = 4096) -> socket.socket:
    """A non-blocking listening TCP socket with SO_REUSEPORT, so every shard can bind the same host:port.

    An empty host listens on all addresses: dual-stack IPv6 if the system has it, else IPv4.
    """
    candidates: list[tuple[socket.AddressFamily, str]]
    if not host:
        candidates = [(socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")]
    else:
        candidates = [(socket.AF_INET6 if ":" in host else socket.AF_INET, host)]
    last: OSError | None = None
    for family, bind_host in candidates:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6 and not host:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((bind_host, port))
            sock.listen(backlog)
            sock.setblocking(False)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
        except BaseException:
            sock.close()
            raise
    assert last is not None
    raise last
