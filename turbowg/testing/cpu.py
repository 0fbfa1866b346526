"""CPU time of process trees from /proc, for "which side was CPU-bound" and CPU cost per gigabyte."""

from __future__ import annotations

import os
from collections.abc import Sequence

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> tuple[int, float] | None:
    """(ppid, utime+stime seconds) from /proc/<pid>/stat, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode(errors="replace")
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after the last ')'.
    rest = raw[raw.rfind(")") + 2:].split()
    try:
        return int(rest[1]), (int(rest[11]) + int(rest[12])) / CLK_TCK
    except (IndexError, ValueError):
        return None


def alive(pid: int) -> bool:
    """True unless the process is gone or a zombie (daemons stay unreaped until tear-down)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return False
    return raw[raw.rfind(b")") + 2:raw.rfind(b")") + 3] not in (b"Z", b"X")


def process_tree_cpu_seconds(roots: Sequence[int]) -> float:
    """CPU seconds (user + system, all threads) of `roots` and all their live descendants."""
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                stats[int(entry)] = fields
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total = 0.0
    seen: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid in seen or pid not in stats:
            continue
        seen.add(pid)
        total += stats[pid][1]
        todo.extend(children.get(pid, ()))
    return total
