"""One relay worker (`turbowg relay`'s serve_worker) on 127.0.0.1, in this event loop, for the relay tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from turbowg.relay.app import RelayConfig, prepare, serve_worker


@contextlib.asynccontextmanager
async def serving_relay(timeout: float = 15.0, **kw: Any) -> AsyncIterator[tuple[RelayConfig, list[tuple[str, int]]]]:
    """A relay worker with `RelayConfig(**kw)` (dev mode, no STUN, one worker, a free port unless `kw` says
    otherwise): (its config, the addresses it bound) once it listens; cancelled on exit."""
    ready: asyncio.Future[list[tuple[str, int]]] = asyncio.get_running_loop().create_future()
    kw = {"addr": "127.0.0.1:0", "dev": True, "stun": False, "workers": 1, **kw}
    config = RelayConfig(ready=lambda bound: ready.set_result(bound), **kw)
    task = asyncio.create_task(serve_worker(config, prepare(config)))
    bound = await asyncio.wait_for(ready, timeout)
    try:
        yield config, bound
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
