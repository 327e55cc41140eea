"""Per-key cross-process locks on ``CACHE_DIR/v1/.locks/<key>.lock`` (``flock``).

An exclusive lock is taken only on a miss, by the process that compiles and
publishes the entry; shared locks are taken while an entry is being read,
so that ``prune`` (which takes the exclusive lock without waiting) never
deletes an entry under a reader. Locks are ``flock`` locks: the kernel drops
them when the holding process dies, even from SIGKILL, so a crashed compiler
never blocks the others. They conflict between file descriptions, so two
threads of one process exclude each other too.

The lock is best-effort coordination, not what makes the cache correct:
entries appear by atomic rename, so even with no locking at all (NFS without
lock support, a timeout) the worst case is two processes compiling the same
model.

**Lock files are removed with their entry** (#45). Unlinking a lock file that
another process has open used to be unsafe: that process would lock the
unlinked inode while a third created and locked a fresh file at the path, and
both would think they held the key. So every acquirer now checks, once its
``flock`` is granted, that the path still names the inode it locked (``fstat``
of its descriptor against ``stat`` of the path); when it does not, the lock it
got belongs to a file nobody else will ever open, and it opens the path again.
A process may unlink a lock file only while it holds it exclusively
(``release(discard=True)``): an acquirer that opened the old file before the
unlink gets its lock only after the release, sees the mismatch and retries on
the new file. An aioov from before this check, sharing the cache during an
upgrade, can be fooled that way: it then compiles a model twice, never more.

On POSIX the locks are ``fcntl.flock`` calls, made here; portalocker, which makes that
same call there, is used where there is no ``fcntl`` (Windows: ``msvcrt``/``LockFileEx``).
Importing portalocker took 0.11 s in a fresh process (0.18 s where redis is installed: it
imports its Redis lock), on the first lock of every process that uses a cache — most of a
small model's warm start.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
import weakref
from pathlib import Path
from types import TracebackType

from .._errors import Cancelled, LockTimeout

__all__ = ("KeyLock", "lock_fd", "read_note", "unlock_fd")

_POLL_START = 0.005
_POLL_MAX = 0.1


_BUSY = {errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK}


def _held_elsewhere(exc: BaseException) -> bool:
    """Whether a LockException means "another holder has it" (flock's EWOULDBLOCK)."""
    causes = [exc.__cause__, *getattr(exc, "args", ())]
    return any(isinstance(c, OSError) and c.errno in _BUSY for c in causes)


class _Descriptor:
    """A raw fd as every supported portalocker takes it: 2.x unlocks through ``fileno()``
    (found by CI's run on the lowest allowed versions)."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def lock_fd(fd: int, *, shared: bool) -> bool:
    """flock ``fd`` without waiting: False when another file description holds it. Any other
    failure (ENOLCK on NFS without a lock daemon, a FUSE filesystem that refuses flock) is an
    OSError, which callers treat as "no coordination here"."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in _BUSY:
                return False
            raise
        return True
    return _portalocker_lock(fd, shared=shared)  # pragma: no cover - Windows


def _portalocker_lock(fd: int, *, shared: bool) -> bool:
    import portalocker

    flags = portalocker.LockFlags.SHARED if shared else portalocker.LockFlags.EXCLUSIVE
    try:
        portalocker.lock(_Descriptor(fd), flags | portalocker.LockFlags.NON_BLOCKING)
    except portalocker.AlreadyLocked:
        return False
    except portalocker.LockException as exc:
        if _held_elsewhere(exc):  # portalocker 2.x reports a held lock this way
            return False
        raise OSError(str(exc)) from exc
    return True


def unlock_fd(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return
    import portalocker  # pragma: no cover - Windows

    portalocker.unlock(_Descriptor(fd))  # pragma: no cover - Windows


class KeyLock:
    """One key's lock file. ``acquire`` polls, so it can time out and be cancelled."""

    def __init__(self, path: Path, *, transient: bool = False) -> None:
        self.path = path
        #: removed by whoever releases it exclusively: a lock needed only while it is held
        #: (a model file being hashed), never the lock of an entry
        self.transient = transient
        self._fd: int | None = None
        self._shared = False

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self, *, shared: bool = False) -> bool:
        """Take the lock if it is free now; never waits."""
        if self._fd is not None:
            raise RuntimeError("lock already held by this KeyLock")
        for _ in range(_REOPENS):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o666)
            try:
                if not lock_fd(fd, shared=shared):
                    os.close(fd)
                    return False
                if not _still_named(fd, self.path):
                    # The file was unlinked (or replaced) by a holder before we locked it: a
                    # lock on it excludes nobody. Open the path again.
                    unlock_fd(fd)
                    os.close(fd)
                    continue
            except OSError as exc:
                os.close(fd)
                raise OSError(f"cannot lock {self.path}: {exc}") from exc
            except BaseException:
                os.close(fd)
                raise
            self._fd, self._shared = fd, shared
            _HELD.add(self)
            return True
        raise OSError(f"cannot lock {self.path}: the file was replaced {_REOPENS} times while it was locked")

    def acquire(
        self,
        timeout: float,
        *,
        shared: bool = False,
        cancel: threading.Event | None = None,
    ) -> None:
        """Wait up to ``timeout`` seconds; raise ``LockTimeout`` or ``Cancelled``."""
        deadline = time.monotonic() + timeout
        delay = _POLL_START
        while not self.try_acquire(shared=shared):
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LockTimeout(f"timed out after {timeout:g}s waiting for {self.path}")
            if cancel is not None:
                cancel.wait(min(delay, remaining))
            else:
                time.sleep(min(delay, remaining))
            delay = min(delay * 2, _POLL_MAX)

    def note(self, text: str) -> None:
        """Write ``text`` into the lock file, held exclusively, for waiters to read
        (``read_note``); never raises."""
        fd = self._fd
        if fd is None or self._shared:
            return
        data = text.encode("utf-8")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
        except (OSError, AttributeError):  # Windows has no pwrite; a waiter then goes by heartbeats
            pass

    def release(self, *, discard: bool = False) -> None:
        """Unlock. ``discard`` (or a ``transient`` lock): held exclusively, the lock file is
        unlinked first, while it is still locked (see the module's docstring: whoever opened
        it meanwhile gets the lock of an unlinked file, sees it, and opens the path again)."""
        fd, self._fd = self._fd, None
        _HELD.discard(self)
        if fd is None:
            return
        try:
            if (discard or self.transient) and not self._shared and _still_named(fd, self.path):
                with contextlib.suppress(OSError):  # Windows: an open file cannot be unlinked; it stays
                    os.unlink(self.path)
        finally:
            try:
                unlock_fd(fd)
            finally:
                os.close(fd)

    def __enter__(self) -> KeyLock:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def read_note(path: Path) -> str | None:
    """What the holder of the lock at ``path`` wrote into it (``KeyLock.note``), if anything."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
        try:
            data = os.read(fd, 256)
        finally:
            os.close(fd)
    except OSError:  # gone, or locked bytes (Windows)
        return None
    return data.decode("utf-8", "replace") or None


def _still_named(fd: int, path: Path) -> bool:
    """Whether ``path`` is still the file open as ``fd`` (not unlinked, not replaced)."""
    try:
        mine, named = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (mine.st_ino, mine.st_dev) == (named.st_ino, named.st_dev)


#: times a lock file may be found unlinked under a fresh lock before ``try_acquire`` gives up
#: (each is a holder that removed it meanwhile: one or two in practice)
_REOPENS = 100
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)

#: the locks this process holds: a child forked meanwhile closes its copies of their files (a
#: flock belongs to the open file, shared with the child: kept open there, a lock would outlive
#: a parent that died); it never unlocks them, which would release the parent's lock too
_HELD: weakref.WeakSet[KeyLock] = weakref.WeakSet()


def _close_in_child() -> None:
    for lock in list(_HELD):
        fd, lock._fd = lock._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)
