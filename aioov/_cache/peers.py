"""Which other processes are loading models from this cache right now.

Every process (every ``Core``) with compiles in flight on a cache holds an exclusive flock on
a file of its own in ``.locks/peers/``; the kernel drops it when the process exits, even from
SIGKILL, and the next look removes the file. A process that finds a model not worth caching
asks whether anyone else is loading: workers starting together (``uvicorn --workers 4``) may
be waiting for this model's entry, so the "not worth caching" record is written at once, and
they compile the model without waiting longer (``_writer.EntryWriter.compile``). It is a hint:
any failure reads as "nobody".
"""

from __future__ import annotations

import os
import secrets
import stat
import threading
from pathlib import Path

from .._concurrency import renew_in_children
from .locks import lock_fd, unlock_fd

__all__ = ("Presence",)

_SUFFIX = ".peer"


class Presence:
    """This process's mark in one cache's ``peers`` directory, held while ``enter`` calls
    outnumber ``leave`` calls."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._fd: int | None = None
        self._renew_in_child()
        renew_in_children(self)

    def _renew_in_child(self) -> None:
        """The mark is the parent's: this process's copy of it closed (never unlocked)."""
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
        self._lock = threading.Lock()
        self._count = 0
        self._fd = None
        self._name: str | None = None

    def enter(self) -> None:
        with self._lock:
            self._count += 1
            if self._count == 1:
                try:
                    self._mark()
                except OSError:
                    pass

    def leave(self) -> None:
        with self._lock:
            self._count -= 1
            if self._count == 0:
                self._unmark()

    def others(self) -> bool:
        """Whether another process (or another ``Core``) is loading from this cache now."""
        try:
            directory = _open_dir(self.directory)
        except OSError:
            return False
        try:
            for name in os.listdir(directory):
                if name != self._name and name.endswith(_SUFFIX) and not name.startswith("."):
                    if _alive(directory, name):
                        return True
            return False
        except OSError:
            return False
        finally:
            os.close(directory)

    def _mark(self) -> None:
        try:
            self.directory.mkdir()
        except FileExistsError:
            pass
        directory = _open_dir(self.directory)  # never through a symlink: marks stay in the cache
        try:
            name = f"{os.getpid()}-{secrets.token_hex(6)}{_SUFFIX}"
            fd = os.open(f".{name}", os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o666, dir_fd=directory)
            try:
                if not lock_fd(fd, shared=False):
                    raise OSError(f"cannot lock a mark in {self.directory}")
                # Locked before it is visible: a look never finds it unlocked while we live.
                os.rename(f".{name}", name, src_dir_fd=directory, dst_dir_fd=directory)
            except BaseException:
                os.close(fd)
                _unlink(directory, f".{name}")
                raise
        finally:
            os.close(directory)
        self._fd, self._name = fd, name

    def _unmark(self) -> None:
        fd, name = self._fd, self._name
        self._fd = self._name = None
        if fd is None or name is None:
            return
        try:
            directory = _open_dir(self.directory)
        except OSError:
            directory = None
        if directory is not None:
            _unlink(directory, name)  # before the lock goes: a look never sees a free live mark
            os.close(directory)
        try:
            unlock_fd(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def _open_dir(path: Path) -> int:
    """``path`` opened as a directory, refusing a symlink (OSError; and where the platform
    cannot say, as on Windows, always: no marks there)."""
    if not hasattr(os, "O_DIRECTORY") or os.open not in os.supports_dir_fd:
        raise OSError("directory file descriptors are not supported here")
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW)


def _alive(directory: int, name: str) -> bool:
    """Whether the mark ``name`` is held by a live process; a dead one's mark is removed."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | _NOFOLLOW, dir_fd=directory)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        if not lock_fd(fd, shared=False):
            return True  # its owner holds it
        _unlink(directory, name)  # a process that died with its mark: tidy up
        return False
    except OSError:
        return False
    finally:
        os.close(fd)  # closing drops our lock, if we took one


def _unlink(directory: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=directory)
    except OSError:
        pass
