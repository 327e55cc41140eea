"""Crash sentinels: a record held while a process first runs a cache entry at a new input shape.

The builder checks a blob at several shapes before it is published, but onnxruntime's kernels
can still crash at a shape nobody tried (prepacked ones did, at OCR text-line widths of 15 and
above, after passing at 8). So before a process runs an entry it loaded at an input shape it
has not run that entry at yet, it leaves a small record and holds an exclusive ``flock`` on it;
it removes the record when the run returns. A record nobody holds a lock on means its process
died inside the run: the next process to load the entry finds it, quarantines the entry,
remembers the variant as one that crashed (the next build skips it: the plain variant, or a
not-cacheable marker), and compiles. At most one process dies per bad entry, never a loop.

Layout, beside the entries::

    v1/.runs/<key>/<pid>.<rand>.run          a run at a new shape, under way (locked while it runs)
    v1/.runs/<key>/crashed-<variant>.json    a variant of <key> that killed a process, and how

The lock dies with its process whatever killed it, in any pid namespace (a container restarted
with the cache on a volume), and needs no ``/proc``. Where the filesystem refuses locks, a
record is taken as dead once older than ``STALE_AFTER``. What a false alarm costs: a process
killed from outside (the OOM killer, ``kill -9``) during its first run at a shape costs one
rebuild of the entry without that variant. Records are not fsynced: a crashed process leaves
its page cache behind, and the lock of a machine that crashed is gone with it anyway.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .fsutil import atomic_write_bytes, children, is_plain_file, load_json, read_regular
from .locks import lock_fd

__all__ = ("MAX_SHAPES", "STALE_AFTER", "Crash", "Run", "Sentinels", "ShapeGuard")

#: seconds after which a record whose lock cannot be tested is taken as dead
STALE_AFTER = 120.0
#: distinct input shapes a loaded entry is guarded at; later new shapes run unguarded (a model
#: that ran at this many shapes is not the kind that crashes at the next)
MAX_SHAPES = 256
_RUN = ".run"
_CRASHED = "crashed-"


@dataclass(frozen=True)
class Crash:
    """A run that a process did not survive: which entry and variant, at which inputs, who."""

    key: str
    variant: str
    inputs: str
    pid: int
    host: str
    when: float

    def describe(self) -> str:
        return (f"process {self.pid} on {self.host} died running its {self.variant} blob at inputs {self.inputs} "
                f"({time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.when))})")


@dataclass(eq=False)
class Run:
    """A record being held: its path and its open, locked file."""

    path: Path
    file: IO[bytes]


#: this process's records being held: an interpreter that exits while a worker thread is
#: still in a run (a server stopping on SIGTERM) removes them, so that nobody takes it for a crash
_OPEN: set[Run] = set()
_OPEN_LOCK = threading.Lock()
_GUARDS: weakref.WeakSet[ShapeGuard] = weakref.WeakSet()


def _forget_in_child() -> None:
    """A forked child does not run its parent's runs: close its copies of their records (the
    parent's locks stay), and renew the locks that a thread of the parent may have held."""
    global _OPEN_LOCK
    for run in list(_OPEN):
        run.file.close()
    _OPEN.clear()
    _OPEN_LOCK = threading.Lock()
    for guard in list(_GUARDS):
        guard._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


@atexit.register
def _end_all() -> None:
    with _OPEN_LOCK:
        runs = list(_OPEN)
    for run in runs:
        Sentinels.end(run)


class Sentinels:
    """The records of one cache directory (``v1/.runs``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def begin(self, key: str, variant: str, inputs: str) -> Run | None:
        """Leave a record, locked: this process runs ``key``'s ``variant`` at ``inputs`` now.
        None when it cannot be written (a read-only cache): the run goes on unguarded."""
        record = {"pid": os.getpid(), "host": socket.gethostname(), "variant": variant, "inputs": inputs,
                  "time": time.time()}
        folder = self.root / key
        name = f"{os.getpid()}.{uuid.uuid4().hex[:12]}"
        tmp, path = folder / f".{name}.tmp", folder / f"{name}{_RUN}"
        for _ in range(2):  # the folder may be removed between mkdir and open (``crashes``)
            try:
                folder.mkdir(parents=True, exist_ok=True)
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
                break
            except FileNotFoundError:
                continue
            except OSError:
                return None
        else:
            return None
        file = os.fdopen(fd, "r+b")
        try:
            file.write(json.dumps(record).encode())
            file.flush()
            with contextlib.suppress(OSError):  # no locks here: readers judge it by its age
                lock_fd(file.fileno(), shared=False)
            os.replace(tmp, path)  # appears locked: a reader never sees it unlocked while it runs
        except OSError:
            file.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            return None
        run = Run(path, file)
        with _OPEN_LOCK:
            _OPEN.add(run)
        return run

    @staticmethod
    def end(run: Run | None) -> None:
        """The run returned: remove its record (before its lock goes), and its folder if empty."""
        if run is None:
            return
        with _OPEN_LOCK:
            _OPEN.discard(run)
        with contextlib.suppress(OSError):
            run.path.unlink()
        run.file.close()
        with contextlib.suppress(OSError):
            run.path.parent.rmdir()

    def crashes(self, key: str, *, claim: bool = True) -> list[Crash]:
        """Runs of ``key`` whose process died; ``claim``: their records are removed as they are
        read (by whoever acts on them)."""
        found = []
        for path in children(self.root / key):
            if not path.name.endswith(_RUN) or not is_plain_file(path):
                continue
            crash = _dead(path, key)
            if crash is None:
                continue
            if claim:
                with contextlib.suppress(OSError):
                    path.unlink()
            found.append(crash)
        return found

    def fatal(self, key: str, variant: str, *, claim: bool = True) -> Crash | None:
        """The crash that condemns ``key``'s ``variant``, if a process died running it. With
        ``claim``, every crash found is remembered as its variant's (a read-only cache cannot
        remember: the crash is reported all the same) and its record removed."""
        crashes = self.crashes(key, claim=claim)
        for crash in crashes if claim else ():
            with contextlib.suppress(OSError):
                self.remember(crash)
        return next((crash for crash in crashes if crash.variant == variant), None)

    def remember(self, crash: Crash) -> None:
        """Remember ``crash``'s variant as one never built again for its key."""
        folder = self.root / crash.key
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / f"{_CRASHED}{_safe(crash.variant)}.json", json.dumps(crash.describe()).encode())

    def crashed(self, key: str) -> dict[str, str]:
        """The variants of ``key`` that killed a process, and how."""
        found = {}
        for path in children(self.root / key):
            if path.name.startswith(_CRASHED) and path.name.endswith(".json"):
                how = _read_json(path)
                found[path.name[len(_CRASHED):-len(".json")]] = str(how)
        return found

    def forget(self, key: str) -> None:
        """Remove what is kept about ``key`` (the cache is cleared)."""
        for path in children(self.root / key):
            with contextlib.suppress(OSError):
                path.unlink()
        with contextlib.suppress(OSError):
            (self.root / key).rmdir()


class ShapeGuard:
    """The guard of one entry loaded by this process: a run at an input shape it has not run
    yet is held under a record (``Sentinels.begin``). Thread-safe; a known shape costs a set
    lookup."""

    def __init__(self, sentinels: Sentinels, key: str, variant: str) -> None:
        self._sentinels = sentinels
        self.key = key
        self.variant = variant
        self._seen: set[tuple[tuple[int, ...], ...]] = set()
        self._generation = 0  # the session's: ``reset`` starts a new count
        self._lock = threading.Lock()
        _GUARDS.add(self)

    def begin(self, feed: Mapping[str, Any]) -> tuple[int, tuple[tuple[int, ...], ...], Run | None] | None:
        """None for a shape already run (nothing to do); else what ``end`` needs."""
        shapes = tuple(tuple(getattr(value, "shape", ())) for value in feed.values())
        if shapes in self._seen or len(self._seen) >= MAX_SHAPES:
            return None
        inputs = " ".join(f"{name}{list(shape)}" for name, shape in zip(feed, shapes))
        return self._generation, shapes, self._sentinels.begin(self.key, self.variant, inputs)

    def end(self, token: tuple[int, tuple[tuple[int, ...], ...], Run | None] | None) -> None:
        """The run returned, or raised: either way the process lived through it."""
        if token is None:
            return
        generation, shapes, run = token
        self._sentinels.end(run)
        with self._lock:
            if generation == self._generation:  # not a shape of a session swapped out meanwhile
                self._seen.add(shapes)

    def reset(self) -> None:
        """Another session of the entry serves now (an instant hit's full-speed one): its
        kernels differ, so every shape is new to it."""
        with self._lock:
            self._generation += 1
            self._seen = set()


def _dead(path: Path, key: str) -> Crash | None:
    """The crash a record stands for, or None while its process holds it (or it is not a record)."""
    try:
        with open(path, "rb") as file:
            try:
                if not lock_fd(file.fileno(), shared=True):
                    return None  # held: its process is running it now
            except OSError:  # no locks on this filesystem: by age
                if time.time() - path.lstat().st_mtime < STALE_AFTER:
                    return None
            raw = file.read(1 << 16)
    except OSError:
        return None
    try:
        record = load_json(raw)
        return Crash(key, str(record["variant"]), str(record["inputs"]), int(record["pid"]), str(record["host"]),
                     float(record["time"]))
    except (ValueError, KeyError, TypeError):
        return None  # not one of ours: nothing to learn


def _safe(variant: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in variant)[:64]


def _read_json(path: Path) -> Any:
    try:
        raw = read_regular(path, 1 << 16)
        return load_json(raw) if len(raw) <= 1 << 16 else None
    except (OSError, ValueError):
        return None
