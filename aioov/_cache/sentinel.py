"""Crash sentinels: a record left while a process first runs a cache entry at a new input shape.

The builder checks a blob at several shapes before it is published, but onnxruntime's kernels
can still crash at a shape nobody tried (prepacked ones did, at OCR text-line widths of 16 and
above, after passing at 8). So before a process runs an entry it loaded at an input shape it
has not run that entry at yet, it leaves a small record, and removes it when the run returns.
A record whose process no longer exists means that process died inside the run: the next
process to load the entry finds it, quarantines the entry, remembers the variant as one that
crashed (the next build skips it: the plain variant, or a not-cacheable marker), and compiles.
At most one process dies per bad entry and host, never a crash loop.

Layout, beside the entries::

    v1/.runs/<key>/<pid>.<n>.json    a run at a new shape, under way (who, where, which variant)
    v1/.runs/<key>.crashed.json      the variants of <key> that killed a process, and how

Whether a recorded process still exists: on Linux, in the same boot and pid namespace, by its
pid and start time (a reused pid has another start time; a zombie is dead); a record from before
a reboot is dead; from another host or container, or where there is no ``/proc``, a record
older than ``STALE_AFTER`` is. A false alarm (a process killed for another reason during such a
run, or seen from another container while a first run takes longer than ``STALE_AFTER``) costs
one rebuild of the entry. The records are not fsynced: a process that crashes leaves its page
cache behind; a machine that crashes reboots, and its records are then dead anyway.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .fsutil import atomic_write_bytes, children, load_json, read_regular

__all__ = ("MAX_SHAPES", "STALE_AFTER", "Crash", "Sentinels", "ShapeGuard")

#: seconds after which a record that cannot be checked any other way is taken as dead
STALE_AFTER = 120.0
#: distinct input shapes a loaded entry is guarded at; later new shapes run unguarded (a model
#: that ran at this many shapes is not the kind that crashes at the next)
MAX_SHAPES = 256
_CRASHED = ".crashed.json"
_counter = itertools.count()


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


class Sentinels:
    """The records of one cache directory (``v1/.runs``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def begin(self, key: str, variant: str, inputs: str) -> Path | None:
        """Leave a record: this process runs ``key``'s ``variant`` at ``inputs`` now. None when
        it cannot be written (a read-only cache): the run goes on unguarded."""
        record = {**_identity(), "key": key, "variant": variant, "inputs": inputs, "time": time.time()}
        folder = self.root / key
        path = folder / f"{os.getpid()}.{next(_counter)}.json"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(record).encode())
        except OSError:
            return None
        return path

    @staticmethod
    def end(path: Path | None) -> None:
        """The run returned: remove its record."""
        if path is not None:
            with contextlib.suppress(OSError):
                path.unlink()

    def crashes(self, key: str, *, claim: bool = True) -> list[Crash]:
        """Runs of ``key`` whose process died; ``claim``: their records are removed as they are
        read (by whoever acts on them)."""
        found = []
        for path in children(self.root / key):
            record = _read_json(path)
            if not isinstance(record, dict):
                if _older_than(path, STALE_AFTER):
                    with contextlib.suppress(OSError):
                        path.unlink()  # cut short (a disk that filled up): nothing to learn
                continue
            if _alive(record):
                continue
            if claim:
                with contextlib.suppress(OSError):
                    path.unlink()
            found.append(Crash(key, str(record.get("variant")), str(record.get("inputs")), int(record.get("pid", 0)),
                               str(record.get("host")), float(record.get("time", 0.0))))
        if found and claim:
            with contextlib.suppress(OSError):
                (self.root / key).rmdir()
        return found

    def remember(self, crash: Crash) -> None:
        """Add ``crash``'s variant to those of its key that are never built again."""
        crashed = {**self.crashed(crash.key), crash.variant: crash.describe()}
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.root / f"{crash.key}{_CRASHED}", json.dumps(crashed).encode())

    def crashed(self, key: str) -> dict[str, str]:
        """The variants of ``key`` that killed a process, and how."""
        found = _read_json(self.root / f"{key}{_CRASHED}")
        return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}

    def forget(self, key: str) -> None:
        """Remove what is kept about ``key`` (its entry is gone for good)."""
        with contextlib.suppress(OSError):
            (self.root / f"{key}{_CRASHED}").unlink()


class ShapeGuard:
    """The guard of one entry loaded by this process: runs at input shapes it has not run yet
    leave a record while they run (``Sentinels.begin``). Thread-safe; cheap for known shapes."""

    def __init__(self, sentinels: Sentinels, key: str, variant: str) -> None:
        self._sentinels = sentinels
        self.key = key
        self.variant = variant
        self._seen: set[tuple[tuple[int, ...], ...]] = set()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def running(self, feed: Mapping[str, Any]) -> Iterator[None]:
        shapes = tuple(tuple(getattr(value, "shape", ())) for value in feed.values())
        if shapes in self._seen or len(self._seen) >= MAX_SHAPES:
            yield
            return
        inputs = " ".join(f"{name}{list(shape)}" for name, shape in zip(feed, shapes))
        record = self._sentinels.begin(self.key, self.variant, inputs)
        try:
            yield
        finally:  # the run returned, or raised: either way the process lived through it
            self._sentinels.end(record)
            with self._lock:
                self._seen.add(shapes)

    def reset(self) -> None:
        """Another session of the entry serves now (an instant hit's full-speed one): its
        kernels differ, so every shape is new to it."""
        with self._lock:
            self._seen.clear()


def _identity() -> dict[str, Any]:
    """Who this process is, in a way that survives pid reuse."""
    pid = os.getpid()
    return {"pid": pid, "start": _start_time(pid), "boot": _boot_id(), "pidns": _pid_namespace(),
            "host": socket.gethostname()}


def _alive(record: Mapping[str, Any]) -> bool:
    me = _identity()
    pid = record.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool):
        return False
    same_host = record.get("host") == me["host"]
    if same_host and me["boot"] is not None and record.get("boot") is not None:
        if record.get("boot") != me["boot"]:
            return False  # the machine rebooted since
        if record.get("pidns") == me["pidns"] and me["start"] is not None:
            return _start_time(pid) == record.get("start")
    elif same_host and me["boot"] is None:  # no /proc: the pid alone, where it can be asked
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            pass
    when = record.get("time")
    return isinstance(when, (int, float)) and time.time() - when < STALE_AFTER


def _start_time(pid: int) -> int | None:
    """``pid``'s start time in clock ticks since boot (None: no such process, or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in (b"Z", b"X"):
        return None  # it died; its parent has not reaped it yet
    return int(fields[19])


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return None


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _read_json(path: Path) -> Any:
    try:
        raw = read_regular(path, 1 << 16)
        return load_json(raw) if len(raw) <= 1 << 16 else None
    except (OSError, ValueError):
        return None


def _older_than(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.lstat().st_mtime > seconds
    except OSError:
        return False

