"""Which other processes are loading models from this cache right now.

Every process (every ``Core``) with compiles in flight on a cache holds an exclusive flock on
a file of its own in ``.locks/peers/``; the kernel drops it when the process exits, even from
SIGKILL, and the next look removes the file. A process about to compile a model for the cache
asks whether anyone else is loading: workers starting together (``uvicorn --workers 4``) will
then wait for this model's entry, so it is written by the compile itself and published before
``compile_model`` returns (one session instead of two, no wait for a background export). A
process alone keeps the faster first compile. It is a hint: any failure reads as "nobody".
"""

from __future__ import annotations

import os
import secrets
import stat
import threading
from pathlib import Path

from .locks import lock_fd, unlock_fd

__all__ = ("Presence",)

_SUFFIX = ".peer"


class Presence:
    """This process's mark in one cache's ``peers`` directory, held while ``enter`` calls
    outnumber ``leave`` calls."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._count = 0
        self._fd: int | None = None
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
            names = os.listdir(self.directory)
        except OSError:
            return False
        for name in names:
            if name == self._name or not name.endswith(_SUFFIX) or name.startswith("."):
                continue
            if self._alive(self.directory / name):
                return True
        return False

    def _mark(self) -> None:
        if not self.directory.is_dir():
            self.directory.mkdir(exist_ok=True)
        if os.path.islink(self.directory):
            raise OSError(f"{self.directory} is a symlink")
        name = f"{os.getpid()}-{secrets.token_hex(6)}{_SUFFIX}"
        hidden = self.directory / f".{name}"
        fd = os.open(hidden, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
        try:
            if not lock_fd(fd, shared=False):
                raise OSError(f"cannot lock {hidden}")
            # Locked before it is visible: a look never finds it unlocked while we live.
            os.rename(hidden, self.directory / name)
        except BaseException:
            os.close(fd)
            _unlink(hidden)
            raise
        self._fd, self._name = fd, name

    def _unmark(self) -> None:
        fd, name = self._fd, self._name
        self._fd = self._name = None
        if fd is None or name is None:
            return
        _unlink(self.directory / name)  # before the lock goes: a look never sees a free live mark
        try:
            unlock_fd(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    @staticmethod
    def _alive(path: Path) -> bool:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return False
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return False
            if not lock_fd(fd, shared=False):
                return True  # its owner holds it
            _unlink(path)  # a process that died with its mark: tidy up
            return False
        except OSError:
            return False
        finally:
            os.close(fd)  # closing drops our lock, if we took one


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
