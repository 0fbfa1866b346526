"""`turbowg fuzz TARGET --seconds N`: coverage-guided with atheris when it is installed, else (or with
--mutate) a seeded random-mutation loop over the corpus. Exits 1 on a finding and writes the input to
<crash-dir>/<target>/crash-<sha1>; `turbowg fuzz --list` names the targets; `--make-corpus DIR` writes seeds.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CORPUS = "tests/fuzz_corpus"
DEFAULT_CRASH_DIR = "fuzz-crashes"
MAX_INPUT = 8192
_INTERESTING = (0, 1, 2, 4, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF)


class Hang(Exception):
    """An input took longer than the per-input time limit."""


@dataclass
class Finding:
    data: bytes
    error: str  # traceback text


@dataclass
class Stats:
    executions: int
    seconds: float
    finding: Finding | None


def mutate(data: bytes, rng: random.Random, corpus: list[bytes], max_len: int = MAX_INPUT) -> bytes:
    """1 to 4 random edits of `data`: bit flips, byte sets, interesting integers, inserts, deletes, copies,
    splices with another corpus entry, truncation."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(10)
        n = len(buf)
        if op == 0 and n:
            buf[rng.randrange(n)] ^= 1 << rng.randrange(8)
        elif op == 1 and n:
            buf[rng.randrange(n)] = rng.randrange(256)
        elif op == 2 and n >= 2:
            width = rng.choice((1, 2, 4))
            at = rng.randrange(max(1, n - width + 1))
            value = rng.choice(_INTERESTING) & ((1 << (8 * width)) - 1)
            buf[at:at + width] = value.to_bytes(width, rng.choice(("big", "little")))[:max(0, n - at)]
        elif op == 3:
            at = rng.randrange(n + 1)
            buf[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif op == 4 and n:
            at = rng.randrange(n)
            del buf[at:at + rng.randint(1, 16)]
        elif op == 5 and n:
            at = rng.randrange(n)
            chunk = buf[at:at + rng.randint(1, 64)]
            to = rng.randrange(n + 1)
            buf[to:to] = chunk
        elif op == 6 and corpus:
            other = rng.choice(corpus)
            cut, cut2 = rng.randrange(n + 1), rng.randrange(len(other) + 1)
            buf = buf[:cut] + other[cut2:]
        elif op == 7 and n:
            del buf[rng.randrange(n):]
        elif op == 8 and n:
            at = rng.randrange(n)
            # a run of one byte: long digit strings and deep JSON nesting need thousands
            buf[at:at + 1] = bytes([buf[at]]) * (rng.randint(2, 32) if rng.random() < 0.8 else rng.randint(4000, 6000))
        elif op == 9 and n:
            at = rng.randrange(n)
            buf[at] = rng.choice(b"\x00\x01\n\r:=[]%/ \"{}\\")
    return bytes(buf[:max_len])


def _alarm(_signum: int, _frame: object) -> None:
    raise Hang("input took too long")


def run_inputs(fn: Callable[[bytes], None], inputs: Iterable[bytes], hang_seconds: float | None = None,
               deadline: float | None = None) -> Stats:
    """Run `fn` on each input until one fails, the inputs run out or `deadline` (time.monotonic) passes."""
    start = time.monotonic()
    count = 0
    old = signal.signal(signal.SIGALRM, _alarm) if hang_seconds else None
    try:
        for data in inputs:
            if deadline is not None and time.monotonic() >= deadline:
                break
            count += 1
            try:
                if hang_seconds:
                    signal.setitimer(signal.ITIMER_REAL, hang_seconds)
                fn(data)
            except Exception:  # noqa: BLE001 - every escaping exception is a finding
                return Stats(count, time.monotonic() - start, Finding(data, traceback.format_exc()))
            finally:
                if hang_seconds:
                    signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        if old is not None:
            signal.signal(signal.SIGALRM, old)
    return Stats(count, time.monotonic() - start, None)


def mutations(corpus: list[bytes], seed: int, count: int | None = None) -> Iterable[bytes]:
    """The corpus itself, then `count` mutants (endless when None), deterministic for a seed."""
    rng = random.Random(seed)
    yield from corpus
    pool = list(corpus) or [b""]
    k = 0
    while count is None or k < count:
        k += 1
        yield mutate(rng.choice(pool), rng, pool)


def write_finding(crash_dir: str | os.PathLike[str], target: str, data: bytes) -> Path:
    folder = Path(crash_dir) / target
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"crash-{hashlib.sha1(data).hexdigest()}"
    path.write_bytes(data)
    return path


def have_atheris() -> bool:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return False
    return True


def _corpus_for(name: str, corpus_root: str) -> list[bytes]:
    from turbowg.fuzz import seeds

    items = seeds.load_corpus(corpus_root, name)
    return items or seeds.seeds(name)


def fuzz_mutate(name: str, seconds: float, corpus_root: str, crash_dir: str, seed: int) -> int:
    from turbowg.fuzz import targets

    target = targets.get(name)
    corpus = _corpus_for(name, corpus_root)
    stats = run_inputs(target.fn, mutations(corpus, seed), hang_seconds=10.0,
                       deadline=time.monotonic() + seconds)
    rate = stats.executions / max(stats.seconds, 1e-9)
    if stats.finding is None:
        print(f"{name}: {stats.executions} inputs in {stats.seconds:.1f} s ({rate:.0f}/s), nothing found "
              f"(random mutation, seed {seed})")
        return 0
    path = write_finding(crash_dir, name, stats.finding.data)
    print(f"{name}: FINDING after {stats.executions} inputs, written to {path}\n{stats.finding.error}",
          file=sys.stderr)
    return 1


def fuzz_atheris(name: str, seconds: float, corpus_root: str, crash_dir: str, seed: int) -> int:
    """libFuzzer in a child process (atheris.Fuzz never returns); the repo corpus is read, not written."""
    folder = Path(crash_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"turbowg-fuzz-{name}-") as work:
        seeds_dir = Path(corpus_root) / name
        if not seeds_dir.is_dir():
            from turbowg.fuzz import seeds

            seeds.write_corpus(work, [name])
            seeds_dir = Path(work) / name
        new_dir = Path(work) / "new"
        new_dir.mkdir()
        cmd = [sys.executable, "-m", "turbowg.fuzz.atheris_main", name, str(new_dir), str(seeds_dir),
               f"-max_total_time={int(seconds)}", f"-seed={seed}", "-timeout=10", "-rss_limit_mb=4096",
               f"-max_len={MAX_INPUT}", f"-artifact_prefix={folder}/", "-print_final_stats=1"]
        proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0:
        print(f"{name}: FINDING (libFuzzer exit {proc.returncode}); input written under {folder}/", file=sys.stderr)
        return 1
    print(f"{name}: nothing found in {seconds:.0f} s (atheris, coverage-guided)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("fuzz", help="fuzz a parser (atheris when installed, else random mutation)")
    parser.add_argument("target", nargs="?", help="target name, or 'all'")
    parser.add_argument("--list", action="store_true", help="list the targets")
    parser.add_argument("--seconds", type=float, default=60.0, help="time per target (default 60)")
    parser.add_argument("--corpus", default=DEFAULT_CORPUS, help=f"seed corpus root (default {DEFAULT_CORPUS})")
    parser.add_argument("--crash-dir", default=DEFAULT_CRASH_DIR,
                        help=f"where findings are written (default {DEFAULT_CRASH_DIR})")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--mutate", action="store_true", help="random mutation even when atheris is installed")
    parser.add_argument("--make-corpus", metavar="DIR", help="write the seed inputs of every target to DIR")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from turbowg.fuzz import seeds, targets

    if args.list:
        for name in sorted(targets.TARGETS):
            t = targets.TARGETS[name]
            print(f"{name:16} {t.parsers}")
        return 0
    if args.make_corpus:
        for name, n in seeds.write_corpus(args.make_corpus).items():
            print(f"{name}: {n} seeds")
        return 0
    if not args.target:
        print("turbowg fuzz: name a target (--list shows them) or 'all'", file=sys.stderr)
        return 2
    names = sorted(targets.TARGETS) if args.target == "all" else [args.target]
    for name in names:
        if name not in targets.TARGETS:
            print(f"turbowg fuzz: unknown target {name!r} (--list shows them)", file=sys.stderr)
            return 2
    engine = fuzz_mutate if args.mutate or not have_atheris() else fuzz_atheris
    status = 0
    for name in names:
        status |= engine(name, args.seconds, args.corpus, args.crash_dir, args.seed)
    return status
