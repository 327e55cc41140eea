"""Small filesystem helpers: atomic writes, fsync, and opening only what is safe to open.

A cache directory is shared, so what is in it is untrusted input: a symlink may point out of
the tree, and a FIFO would block any process that opens it for good. Nothing here follows a
symlink or opens a file that ``fstat`` has not shown to be a regular file (opened with
``O_NONBLOCK``, so that even the open cannot hang on a FIFO).
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import shutil
import stat
import uuid
from pathlib import Path
from typing import Any

import xxhash

__all__ = (
    "atomic_write_bytes",
    "checksum_file",
    "checksum_matches",
    "checksum_record",
    "children",
    "fsync_dir",
    "fsync_file",
    "is_plain_dir",
    "is_plain_file",
    "load_json",
    "newest_mtime",
    "nofollow_opener",
    "read_regular",
    "rmtree",
)

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)

logger = logging.getLogger("aioov.cache")


def fsync_file(path: Path) -> None:
    fd = nofollow_opener(str(path), os.O_RDONLY)
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
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def distrust(path: Path) -> str | None:
    """Why a cache directory is not to be trusted, or None: it may be written by someone else.
    Trusted: owned by this user or root, or a deliberately shared one (setgid, of a group of
    this process: docs/deployment.md); and not writable by all without the sticky bit. As ssh
    and git's ``safe.directory`` do: whoever created ``/tmp/aioov`` first decides what it serves."""
    if not hasattr(os, "geteuid"):
        return None  # Windows: ACLs, not modes
    try:
        st = os.stat(path)
    except OSError:
        return None  # not there yet: this process creates it
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        return f"{path} is writable by every user"
    me = os.geteuid()
    shared = bool(st.st_mode & stat.S_ISGID) and st.st_gid in {os.getegid(), *os.getgroups()}
    if st.st_uid not in (me, 0) and not shared:
        return f"{path} belongs to another user (uid {st.st_uid})"
    return None


def is_plain_file(path: Path) -> bool:
    """A regular file, not a symlink, FIFO, socket or device."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def read_regular(path: Path, limit: int) -> bytes:
    """Up to ``limit`` + 1 bytes of a regular file (never a symlink or a FIFO); OSError otherwise."""
    with open(path, "rb", opener=nofollow_opener) as f:
        return f.read(limit + 1)


def load_json(raw: bytes) -> Any:
    """``json.loads``, with nesting too deep for the parser reported as the ValueError it is."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


#: xxh3 holds the GIL while it hashes; hashing in slices bounds how long the event loop can
#: be kept waiting (4 MiB ≈ 0.4 ms) while a worker thread verifies a large weights file.
CHECKSUM_SLICE = 4 << 20


def checksum_file(path: Path) -> str:
    """xxh3-128 of a file through a memory map (~10 GB/s, no copy)."""
    hasher = xxhash.xxh3_128()
    with open(path, "rb", opener=nofollow_opener) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return hasher.hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm, memoryview(mm) as view:
            for start in range(0, size, CHECKSUM_SLICE):
                with view[start : start + CHECKSUM_SLICE] as piece:
                    hasher.update(piece)
    return hasher.hexdigest()


def checksum_record(path: Path) -> dict[str, Any]:
    """A manifest's record of one file: its size and xxh3-128."""
    return {"size": path.stat().st_size, "xxh3_128": checksum_file(path)}


def reusable_record(path: Path, record: Any) -> dict[str, Any] | None:
    """``record`` if it is a well-formed record of a file of ``path``'s size (one a writer
    computed for this very file, which nobody has written since); else None."""
    if not isinstance(record, dict) or not isinstance(record.get("xxh3_128"), str):
        return None
    if record.get("size") != path.stat().st_size:
        return None
    return {"size": record["size"], "xxh3_128": record["xxh3_128"]}


def checksum_matches(path: Path, record: dict[str, Any]) -> bool:
    """Whether a file still has the checksum of its record."""
    return bool(checksum_file(path) == record["xxh3_128"])


def nofollow_opener(path: str, flags: int) -> int:
    """``open``'s opener for cache files: no symlinks, no blocking open, regular files only."""
    fd = os.open(path, flags | _NOFOLLOW | _NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd

def children(path: Path) -> list[Path]:
    """What a directory holds; nothing for a symlink (to a directory or not) or a non-directory."""
    if not is_plain_dir(path):
        return []
    try:
        return sorted(path.iterdir())
    except OSError:
        return []


def newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    for child in children(path) if is_plain_dir(path) else []:
        newest = max(newest, child.lstat().st_mtime)
    return newest


def rmtree(path: Path) -> None:
    """Remove a file or a tree; a symlink, FIFO or other non-directory is only unlinked (never
    followed, never opened), and files are unlinked, not truncated: a process that has a
    removed weights file mapped keeps its pages."""
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            path.unlink()
        else:
            shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        logger.warning("aioov cache: could not remove %s: %s", path, exc)
