"""The UAPI unix socket, `<socket_dir>/<iface>.sock`, as wireguard-go opens it (ipc/uapi_unix.go).

The directory is created with mode 0755 and the socket is bound under umask 077 (so it is srwx------,
root only). A leftover socket file is replaced only when nothing answers on it; a live one means another
daemon owns the interface and startup fails. `UAPIServer.close()` unlinks the socket (only if it is still
the one we bound). All protocol logic lives in `turbowg.uapi.protocol`; this is the thin asyncio loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errno_codes
import inspect
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Protocol

from turbowg.uapi.model import DeviceSnapshot, DeviceUpdate, UAPIError
from turbowg.uapi.protocol import (
    ERR_PORT_IN_USE,
    ERR_UNKNOWN,
    Request,
    UAPIConnection,
    get_reply,
    parse_set,
    stats_reply,
    status_reply,
)

log = logging.getLogger("turbowg.uapi")

READ_SIZE = 64 * 1024
# How often the server checks that its socket file still exists (wireguard-go shuts down when it is deleted).
REMOVAL_CHECK_INTERVAL = 1.0


class ConfigurableDevice(Protocol):
    def apply_update(self, update: DeviceUpdate) -> object: ...
    def snapshot(self) -> DeviceSnapshot: ...


# Called after each applied set, with no argument or with what `device.apply_update` returned (for
# turbowg's Device: datagrams to send at once), whichever the callable accepts.
AfterSet = Callable[..., Awaitable[None] | None]


def _wants_result(callback: AfterSet) -> bool:
    try:
        parameters = inspect.signature(callback).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return any(p.kind in positional or p.kind == inspect.Parameter.VAR_POSITIONAL for p in parameters)


class UAPIServer:
    """A listening UAPI socket serving one device."""

    def __init__(self, iface: str, device: ConfigurableDevice, path: str, on_set: AfterSet | None,
                 on_removed: Callable[[], None] | None,
                 stats: Callable[[], Mapping[str, int]] | None = None) -> None:
        self.iface = iface
        self.device = device
        self.path = path
        self._on_set = on_set
        self._on_set_wants_result = on_set is not None and _wants_result(on_set)
        self._on_removed = on_removed
        self._stats = stats
        self._server: asyncio.AbstractServer | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket file we bound
        self._lock = asyncio.Lock()  # one operation at a time, like wireguard-go's ipcMutex
        self._writers: set[asyncio.StreamWriter] = set()
        self._watch: asyncio.Task[None] | None = None

    # ---- life cycle -------------------------------------------------------------------------------
    async def _start(self, sock: socket.socket) -> None:
        st = os.stat(self.path)
        self._identity = (st.st_dev, st.st_ino)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock)
        if self._on_removed is not None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_removal())

    def close(self) -> None:
        """Stop listening, drop open connections, unlink the socket file if it is still ours."""
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()
        if self._identity is not None and self._still_ours():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self._identity = None

    async def wait_closed(self) -> None:
        """Let the loop finish closing the connections `close()` dropped."""
        await asyncio.sleep(0)

    def _still_ours(self) -> bool:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return False
        return (st.st_dev, st.st_ino) == self._identity

    async def _watch_removal(self) -> None:
        while self._identity is not None:
            await asyncio.sleep(REMOVAL_CHECK_INTERVAL)
            if self._identity is not None and not self._still_ours():
                log.info("%s: UAPI socket %s was removed", self.iface, self.path)
                if self._on_removed is not None:
                    self._on_removed()
                return

    # ---- connections -----------------------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One request at a time: execute it, queue its answer, and wait while the client is not reading
        its answers (the transport's write buffer is over its high-water mark) before taking the next one.
        Nothing is read meanwhile, so the StreamReader's buffer fills, it pauses reading the socket and the
        client blocks in its writes. What one connection holds is bounded by about one read (READ_SIZE,
        plus the StreamReader's 2 x 64 KiB) + one partial line or `set` (see UAPIConnection) + the write
        buffer's high-water mark (64 KiB) + one answer, however many requests the client pipelines."""
        self._writers.add(writer)
        connection = UAPIConnection()
        try:
            while not connection.closed:
                data = await reader.read(READ_SIZE)
                if data:
                    connection.feed(data)
                    requests: Iterable[Request] = iter(connection.next_request, None)
                else:
                    requests = connection.receive_eof()
                for request in requests:
                    reply = await self._execute(request)
                    if reply:
                        writer.write(reply)
                        await writer.drain()
        except (ConnectionError, OSError):
            pass  # the client went away mid-reply; nothing to answer
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _execute(self, request: Request) -> bytes:
        if request.kind == "invalid":
            log.error("%s: invalid UAPI operation: %r", self.iface, request.operation)
            return b""
        if request.error is not None:
            return self._refuse(request.error)
        try:
            async with self._lock:
                if request.kind == "get":
                    return get_reply(self.device.snapshot())
                if request.kind == "stats":
                    return stats_reply(self._counters())
                update = parse_set(request.lines)
                applied = self.device.apply_update(update)
                if self._on_set is not None:
                    pending = self._on_set(applied) if self._on_set_wants_result else self._on_set()
                    if inspect.isawaitable(pending):
                        await pending
                return status_reply(0)
        except UAPIError as exc:
            return self._refuse(exc)
        except OSError as exc:
            # What fails after an update is the rebind of the UDP socket (wireguard-go: IpcErrorPortInUse).
            log.error("%s: UAPI set failed: %s", self.iface, exc)
            return status_reply(ERR_PORT_IN_USE)
        except Exception:
            log.exception("%s: UAPI %s failed unexpectedly", self.iface, request.kind)
            return status_reply(ERR_UNKNOWN)

    def _counters(self) -> Mapping[str, int]:
        if self._stats is not None:
            return self._stats()
        counters = getattr(self.device, "counters", None)
        return counters if isinstance(counters, Mapping) else {}

    def _refuse(self, exc: UAPIError) -> bytes:
        log.error("%s: UAPI error %d: %s", self.iface, -abs(exc.errno), exc)
        return status_reply(exc.errno)


def _check_iface(iface: str) -> None:
    if not iface or "/" in iface or "\0" in iface or iface in (".", ".."):
        raise ValueError(f"invalid interface name {iface!r}")


def _bind_socket(path: str) -> socket.socket:
    """Bind and listen on `path`, replacing a stale socket file; OSError if a live one is there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            _bind_private(sock, path)
        except OSError as exc:
            if exc.errno != errno_codes.EADDRINUSE:
                raise
            _remove_if_stale(path)
            _bind_private(sock, path)
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
        return sock
    except BaseException:
        sock.close()
        raise


def _bind_private(sock: socket.socket, path: str) -> None:
    # umask is process-wide; nothing awaits in between, and a stricter mode for a racing thread is harmless.
    old_umask = os.umask(0o077)
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)


def _remove_if_stale(path: str) -> None:
    st = os.lstat(path)
    if not stat.S_ISSOCK(st.st_mode):
        # wireguard-go would delete whatever is there; refuse to delete a file we did not make.
        raise OSError(errno_codes.EEXIST, f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        pass  # nobody listening: stale
    else:
        raise OSError(errno_codes.EADDRINUSE, f"UAPI socket {path} is in use by another process")
    finally:
        probe.close()
    os.unlink(path)


async def start_uapi_server(iface: str, device: ConfigurableDevice, *, socket_dir: str = "/var/run/wireguard",
                            on_set: AfterSet | None = None,
                            on_removed: Callable[[], None] | None = None,
                            stats: Callable[[], Mapping[str, int]] | None = None) -> UAPIServer:
    """Listen on `<socket_dir>/<iface>.sock` and serve get/set for `device`.

    `device.apply_update` and `device.snapshot` are called on the event loop, one operation at a time;
    they may raise UAPIError(errno, message) to refuse. `on_set()` or `on_set(applied)` (sync or async;
    `applied` is what `apply_update` returned) runs after each applied set, e.g. to rebind the UDP port and
    send the datagrams the update queued; a UAPIError from it is answered with its errno, an OSError with
    -EADDRINUSE. `on_removed()` is called once if the socket file is deleted or replaced under us
    (wireguard-go stops the device then). `stats()` supplies the counters for turbowg's `stats=1` request
    (default: `device.counters` if the device has such a mapping). Raises ValueError for a bad name, OSError if the socket is live.
    """
    _check_iface(iface)
    os.makedirs(socket_dir, mode=0o755, exist_ok=True)
    path = os.path.join(socket_dir, f"{iface}.sock")
    sock = _bind_socket(path)
    server = UAPIServer(iface, device, path, on_set, on_removed, stats)
    try:
        await server._start(sock)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    return server
