"""Small filesystem helpers: atomic writes, fsync, no-follow checks."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

__all__ = ("atomic_write_bytes", "fsync_dir", "fsync_file", "is_plain_dir", "is_plain_file")


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (no-op where dirs cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = False) -> None:
    """Write via a process-unique temp file and ``os.replace``: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.incomplete")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass


def is_plain_dir(path: Path) -> bool:
    """A real directory, not a symlink to one (never follow links out of CACHE_DIR)."""
    return path.is_dir() and not path.is_symlink()


def is_plain_file(path: Path) -> bool:
    return path.is_file() and not path.is_symlink()
