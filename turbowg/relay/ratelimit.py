"""Per-client read rate limits from a JSON file, reloaded on SIGHUP.

    {"default": {"bytes_per_sec": 1000000, "burst": 262144},
     "clients": {"nodekey:<64 hex>": {"bytes_per_sec": 5000000, "burst": 1048576},
                 "nodekey:<64 hex>": {"bytes_per_sec": 0}}}

`bytes_per_sec` counts every byte the relay reads from the client (DERP frames, headers included);
0 (or a missing "default") means unlimited. `burst` defaults to one second's worth. A limit is
enforced by reading more slowly, never by dropping: when a client has used its tokens, the relay stops
reading its socket (asyncio `pause_reading`) until they have refilled, so TCP flow control slows the
sender down. Mesh peers (clients with the mesh key) are never limited. A malformed file is refused with
the line and the reason (`RateLimitConfigError`); on SIGHUP a malformed file keeps the old limits.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from turbowg.derp import keys


class RateLimitConfigError(ValueError):
    """The rate limit file cannot be used; the message names the file, the line and the reason."""


@dataclass(frozen=True, slots=True)
class Limit:
    bytes_per_sec: float
    burst: float


@dataclass(frozen=True)
class RateLimits:
    default: Limit | None = None
    clients: dict[bytes, Limit | None] = field(default_factory=dict)  # None: explicitly unlimited

    def for_key(self, key: bytes) -> Limit | None:
        if key in self.clients:
            return self.clients[key]
        return self.default


def _line_of(text: str, needle: str) -> int:
    idx = text.find(needle)
    return text.count("\n", 0, idx) + 1 if idx >= 0 else 1


def _limit(text: str, path: str, where: str, anchor: str, value: object) -> Limit | None:
    line = _line_of(text, anchor)

    def fail(reason: str) -> RateLimitConfigError:
        return RateLimitConfigError(f"{path}:{line}: {where}: {reason}")

    if not isinstance(value, dict):
        raise fail("must be an object like {\"bytes_per_sec\": N, \"burst\": M}")
    unknown = set(value) - {"bytes_per_sec", "burst"}
    if unknown:
        raise fail(f"unknown field(s) {', '.join(sorted(unknown))} (allowed: bytes_per_sec, burst)")
    if "bytes_per_sec" not in value:
        raise fail("bytes_per_sec is required")
    rate, burst = value["bytes_per_sec"], value.get("burst")
    for name, v in (("bytes_per_sec", rate), ("burst", burst)):
        if v is None and name == "burst":
            continue
        if isinstance(v, bool) or not isinstance(v, int | float) or v != v or v < 0 or v == float("inf"):
            raise fail(f"{name} must be a finite number >= 0, not {v!r}")
    if rate == 0:
        return None
    if burst is None:
        burst = rate
    if burst <= 0:
        raise fail("burst must be > 0 when bytes_per_sec is set")
    return Limit(float(rate), float(burst))


def parse_rate_limits(text: str, path: str = "<rate limits>") -> RateLimits:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RateLimitConfigError(f"{path}:{exc.lineno}: not JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(doc, dict):
        raise RateLimitConfigError(f"{path}:1: the file must hold one JSON object")
    unknown = set(doc) - {"default", "clients"}
    if unknown:
        name = sorted(unknown)[0]
        raise RateLimitConfigError(f"{path}:{_line_of(text, json.dumps(name))}: unknown key {name!r} "
                                   "(allowed: default, clients)")
    default = None
    if doc.get("default") is not None:
        default = _limit(text, path, "default", '"default"', doc["default"])
    clients: dict[bytes, Limit | None] = {}
    raw = doc.get("clients", {})
    if not isinstance(raw, dict):
        line = _line_of(text, '"clients"')
        raise RateLimitConfigError(f"{path}:{line}: clients must be an object "
                                   "mapping nodekey:<hex> to a limit")
    for name, value in raw.items():
        anchor = json.dumps(name)
        try:
            key = keys.parse_public_key(name)
        except keys.KeyFormatError as exc:
            raise RateLimitConfigError(f"{path}:{_line_of(text, anchor)}: client {name!r}: {exc}") from None
        if not re.match(r"^nodekey:[0-9a-fA-F]{64}$", name):
            raise RateLimitConfigError(f"{path}:{_line_of(text, anchor)}: client {name!r}: "
                                       "write keys as nodekey:<64 hex digits>")
        clients[key] = _limit(text, path, f"client {name[:20]}...", anchor, value)
    return RateLimits(default, clients)


def load_rate_limits(path: str) -> RateLimits:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise RateLimitConfigError(f"{path}: cannot read: {exc}") from None
    return parse_rate_limits(text, path)
