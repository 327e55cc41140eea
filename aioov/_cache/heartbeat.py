"""Signs of life on a key's lock file, so that a process waiting for the key can tell a slow
build from a stalled one.

The process holding a key's lock touches the lock file (its mtime) every ``EVERY`` seconds
while the work on the entry progresses: its own compile, or a builder that used CPU since the
last look. A builder that is stopped, hung in a sleep or starved of CPU (background builders
run on idle CPU only) gives no sign; neither does an export still queued behind others. A
waiter that sees no sign for ``STALLED_AFTER`` seconds compiles the model itself rather than
wait longer than that compile would take (``_pipeline``).

Once the holder's own compile is over, it writes how long it took into the lock file
(``compiled``): a waiter that has waited that long compiles the model itself too (``overdue``).
Compiling takes it no longer than that; the entry, written by a builder after that compile,
would take longer, so a waiter is never much slower than a process with no cache.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .._concurrency import renew_in_children
from .locks import KeyLock, read_note

__all__ = ("EVERY", "STALLED_AFTER", "Heartbeats", "compiled", "overdue", "stalled")

#: seconds between two signs of life
EVERY = 0.5
#: seconds without a sign after which a waiter stops waiting
STALLED_AFTER = 3.0

Progress = Callable[[], bool]


class Heartbeats:
    """The lock files this process touches while their work progresses: one thread, while
    there are any (where no thread can be started, none: waiters then decide without signs)."""

    def __init__(self) -> None:
        self._renew_in_child()
        renew_in_children(self)

    def _renew_in_child(self) -> None:
        self._beating: dict[int, tuple[Path, Progress]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def set(self, owner: object, path: Path, progress: Progress | None) -> None:
        """Touch ``path`` for ``owner`` while ``progress()`` says so; None: no sign now."""
        with self._lock:
            if progress is None:
                self._beating.pop(id(owner), None)
                return
            self._beating[id(owner)] = (path, progress)
            if self._thread is None:
                thread = threading.Thread(target=self._run, name="aioov-heartbeat", daemon=True)
                try:
                    thread.start()
                except RuntimeError:  # a thread limit (RLIMIT_NPROC, a cgroup's pids.max)
                    pass
                else:
                    self._thread = thread
        _touch(path)  # at once: a waiter may be about to judge

    def _run(self) -> None:
        while True:
            time.sleep(EVERY)
            with self._lock:
                if not self._beating:  # the next ``set`` starts another
                    self._thread = None
                    return
                beating = list(self._beating.values())
            for path, progress in beating:
                try:
                    alive = progress()
                except Exception:
                    alive = True
                if alive:
                    _touch(path)


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass  # removed meanwhile, or a read-only cache: the waiters decide without it


def stalled(path: Path, since: float) -> bool:
    """Whether the lock file at ``path`` shows no sign of life for ``STALLED_AFTER`` seconds,
    counting from ``since`` (``time.time()`` when the wait began) at the earliest."""
    try:
        last = max(os.stat(path).st_mtime, since)
    except OSError:
        return False  # gone: the lock is free, the next look takes it
    return time.time() - last > STALLED_AFTER


def compiled(lock: KeyLock, seconds: float) -> None:
    """Tell waiters on ``lock`` (held exclusively) that its holder's compile took ``seconds``."""
    lock.note(json.dumps({"compile_seconds": round(seconds, 4)}))


def overdue(path: Path, since: float) -> bool:
    """Whether a waiter that began waiting at ``since`` (``time.time()``) has waited as long as
    the holder's compile of the model took (once the holder said so): then compiling it takes
    the waiter no longer than waiting on."""
    note = read_note(path)
    if note is None:
        return False
    try:
        seconds = json.loads(note)["compile_seconds"]
    except (ValueError, KeyError, TypeError):
        return False
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return False
    return time.time() - since > seconds
