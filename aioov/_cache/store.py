"""The on-disk cache: layout, atomic publish, manifest checks, scan and prune.

Layout of a cache directory::

    CACHE_DIR/
    ├── CACHEDIR.TAG                  marks the tree as a cache for backup tools
    └── v1/
        ├── 3f/
        │   └── 3fa1…e9/              one entry per key (a blake3 hex digest)
        │       ├── model.onnx        the blob: optimized ONNX model...
        │       ├── weights.bin       ...and its (prepacked) weights, memory-mapped on load
        │       └── manifest.json     written last: key inputs, sizes, xxh3-128 checksums
        ├── .index/<hash>.json        stat index: model file identity → content digest
        ├── .index/<bytes>.size       markers: a model of that size was hashed here (key.py)
        ├── .locks/<key>.lock         per-key flock files (see locks.py)
        ├── .locks/peers/             marks of the processes loading from the cache (peers.py)
        ├── .runs/                    crash sentinels: first runs at new input shapes (sentinel.py)
        └── .tmp/<key>.<pid>.<rand>.incomplete/   entries being written

An entry is written in ``.tmp``, fsynced, its manifest written last, then the
whole directory is renamed into place: readers see a complete entry or none.
Anything wrong with an entry (missing or bad manifest, wrong sizes or
checksums, another onnxruntime) gets it renamed out of the way and deleted;
the caller recompiles. Symlinks inside the tree are never followed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .._errors import CacheError, EntryError, LockTimeout
from . import auth
from .fsutil import (
    atomic_write_bytes,
    checksum_matches,
    checksum_record,
    children,
    fsync_dir,
    fsync_file,
    is_plain_dir,
    is_plain_file,
    load_json,
    newest_mtime,
    parts_record_ok,
    read_regular,
    reusable_record,
    rmtree,
)
from .key import StatIndex, path_digest
from .layout import FORMAT_VERSION, MANIFEST, is_reserved, marker_reason
from .locks import KeyLock
from .records import CacheInfo, Entry, EntryInfo, Pruned
from .sentinel import Sentinels

__all__ = ("CacheInfo", "CacheStore", "Entry", "EntryInfo", "Pruned")

logger = logging.getLogger("aioov.cache")

_MAX_MANIFEST_BYTES = 1 << 20
_CACHEDIR_TAG = (
    b"Signature: 8a477f597d28d172789f06886806bc55\n"
    b"# This file is a cache directory tag created by aioov.\n"
    b"# For information about cache directory tags see https://bford.info/cachedir/\n"
)
#: a temp dir is removed only when no writer holds its key's lock and it is at least this old
TMP_MIN_AGE = 60.0


_KEY = re.compile(r"[0-9a-f]{16,128}")


def is_key(name: str) -> bool:
    return bool(_KEY.fullmatch(name))


class CacheStore:
    """One cache directory. Cheap to create; ``ensure()`` makes the tree."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.base = self.root / f"v{FORMAT_VERSION}"
        self.tmp = self.base / ".tmp"
        self.locks = self.base / ".locks"
        self.index = StatIndex(self.base / ".index")
        self.sentinels = Sentinels(self.base / ".runs")
        #: called with (key, reason) whenever a broken entry is discarded
        self.on_discard: Callable[[str, str], object] | None = None

    # -- set-up -----------------------------------------------------------------
    def ensure(self) -> None:
        """Create the tree (respecting the umask); raises OSError when it cannot, when a
        directory of the tree is a symlink, or when ``root`` is a non-empty folder that is not
        an aioov cache (its CACHEDIR.TAG would make backup tools skip the user's files)."""
        if self._root_has_files() and not (self.is_cache() or is_plain_dir(self.base)):
            raise OSError(f"{self.root} is not empty and not an aioov cache; give a new or empty directory")
        for path in (self.base, self.tmp, self.locks, self.index.root):
            path.mkdir(parents=True, exist_ok=True)
        self.check_tree()
        tag = self.root / "CACHEDIR.TAG"
        if not os.path.lexists(tag):
            try:
                atomic_write_bytes(tag, _CACHEDIR_TAG)
            except OSError:
                pass

    def _root_has_files(self) -> bool:
        """Whether ``root`` (which may be a symlink the user chose) holds anything."""
        try:
            with os.scandir(self.root) as entries:
                return any(True for _ in entries)
        except OSError:
            return False

    def is_cache(self) -> bool:
        """Whether ``root`` is marked as a cache (its CACHEDIR.TAG): only then may maintenance
        delete anything under it."""
        return is_plain_file(self.root / "CACHEDIR.TAG")

    def check_tree(self) -> None:
        """Raise OSError when a directory of the tree is a symlink: entries would be written,
        served and deleted outside the cache. (``root`` itself may be a link.)"""
        for path in (self.base, self.tmp, self.locks, self.index.root, self.sentinels.root):
            if os.path.islink(path):
                raise OSError(f"{path} is a symlink; refusing to use this cache")

    def entry_path(self, key: str) -> Path:
        """Where ``key``'s entry lives (whether it exists or not); ``CacheError`` for a string
        that is not a cache key (a blake3 hex digest)."""
        if not is_key(key):
            raise CacheError(f"not a cache key: {key!r}")
        return self.base / key[:2] / key

    def lock(self, key: str) -> KeyLock:
        return KeyLock(self.locks / f"{key}.lock")

    def hash_lock(self, path: str) -> KeyLock:
        """The lock held while a model file is hashed for the stat index (by its path)."""
        return KeyLock(self.locks / f"hash-{path_digest(path)}.lock")

    # -- read ---------------------------------------------------------------------
    def lookup(self, key: str, *, check_sizes: bool = True) -> Entry | None:
        """The entry for ``key`` if present and sane; a broken one is quarantined."""
        path = self.entry_path(key)
        if not os.path.lexists(path):
            return None
        try:
            return self._read_entry(key, path, check_sizes=check_sizes)
        except EntryError as exc:
            self.quarantine(key, str(exc))
            return None

    def _read_entry(self, key: str, path: Path, *, check_sizes: bool, check_version: bool = True) -> Entry:
        """The entry's manifest, checked. ``check_version``: refuse an entry another onnxruntime
        built (a lookup's concern; the version is in the key, so for maintenance such an entry
        is another host's valid entry, not a problem)."""
        if not is_plain_dir(path) or not is_plain_dir(path.parent):
            raise EntryError("entry is not a plain directory")
        try:
            raw = read_regular(path / MANIFEST, _MAX_MANIFEST_BYTES)
        except OSError as exc:
            raise EntryError(f"manifest unreadable: {exc}") from None
        if len(raw) > _MAX_MANIFEST_BYTES:
            raise EntryError("manifest too large")
        try:
            manifest = load_json(raw)
        except ValueError as exc:
            raise EntryError(f"manifest is not JSON: {exc}") from None
        if not isinstance(manifest, dict):
            raise EntryError("manifest is not an object")
        if manifest.get("format") != FORMAT_VERSION or manifest.get("key") != key:
            raise EntryError("manifest format or key does not match")
        files = manifest.get("files")
        if not isinstance(files, dict) or not files:
            raise EntryError("manifest lists no files")
        import onnxruntime

        if check_version and manifest.get("onnxruntime") != onnxruntime.__version__:
            raise EntryError(f"built by onnxruntime {manifest.get('onnxruntime')!r}")
        for name, meta in files.items():
            if (
                not isinstance(name, str)
                or is_reserved(name)
                or not isinstance(meta, dict)
                or not isinstance(meta.get("size"), int)
                or not isinstance(meta.get("xxh3_128"), str)
                or not parts_record_ok(meta)
            ):
                raise EntryError(f"manifest has a bad file record {name!r}")
            file = path / name
            if not is_plain_file(file):  # even with CACHE_VERIFY=OFF: a FIFO would hang the load
                raise EntryError(f"{name} is missing or not a plain file")
            if check_sizes and file.stat().st_size != meta["size"]:
                raise EntryError(f"{name} has the wrong size")
        return Entry(key, path, manifest)

    def read_blob(self, path: Path) -> Entry:
        """An ``export_model`` directory, its manifest checked like an entry's; ``CacheError``
        when it is not one (or no longer whole)."""
        try:
            key = load_json(read_regular(path / MANIFEST, _MAX_MANIFEST_BYTES)).get("key")
        except (OSError, ValueError, AttributeError) as exc:
            raise CacheError(f"{path} is not an aioov blob: no readable manifest: {exc}") from None
        if not isinstance(key, str):
            raise CacheError(f"{path} is not an aioov blob: its manifest names no key")
        try:
            return self._read_entry(key, path, check_sizes=True)
        except (EntryError, OSError) as exc:
            raise CacheError(f"{path} is not an aioov blob: {exc}") from exc

    def verify(self, entry: Entry, names: list[str] | None = None) -> str | None:
        """Compare the files' xxh3-128 (``names``, default all; big files in parallel parts)
        with the manifest; the problem, or None."""
        for name in names if names is not None else list(entry.files):
            try:
                if not checksum_matches(entry.file(name), entry.files[name]):
                    return f"{name} checksum mismatch"
            except OSError as exc:
                return f"{name} unreadable: {exc}"
        return None

    def check(self, key: str, mac_key: bytes | tuple[bytes, ...] | None = None) -> str | None:
        """Everything about one entry: manifest, sizes, checksums (and MACs, given the key or
        the keys of a rotation). The problem, or None when it is sound; an entry signed under
        none of the keys says ``auth.NOT_MINE``."""
        try:
            entry = self._read_entry(key, self.entry_path(key), check_sizes=True, check_version=False)
        except (EntryError, OSError) as exc:
            return str(exc)
        problem = self.verify(entry)
        keys = mac_key if isinstance(mac_key, tuple) else (mac_key,) if mac_key is not None else ()
        if problem is None and keys:
            signer = auth.signer(entry.manifest, keys)
            if signer is None and auth.signed(entry.manifest):
                return auth.NOT_MINE
            problem = auth.check(entry.manifest, entry.path, signer or keys[0])
        return problem

    def touch(self, key: str) -> None:
        """Record a use (the entry directory's mtime is its last-used time)."""
        with contextlib.suppress(OSError):
            os.utime(self.entry_path(key))

    def quarantine(self, key: str, reason: str) -> None:
        """Move a bad entry out of the way (atomically), then delete it."""
        logger.warning("aioov cache: discarding entry %s: %s", key[:16], reason)
        if self.on_discard is not None:
            self.on_discard(key, reason)
        self._delete(key, "corrupt")

    def retire(self, key: str) -> None:
        """Remove an entry whose key lock the caller holds: a decision to make again (a "not
        worth caching" record of another aioov version), nothing wrong with it."""
        self._delete(key, "retired")

    def _delete(self, key: str, why: str, *, strict: bool = False) -> bool:
        """Rename an entry out of the tree (atomic: readers see it or nothing), then delete it.
        False when it is gone already; when it cannot be moved, False too, or with ``strict``
        a ``CacheError`` saying why."""
        aside = self.tmp / f"{key}.{uuid.uuid4().hex[:8]}.{why}"
        try:
            self.tmp.mkdir(parents=True, exist_ok=True)
            self.check_tree()
            os.rename(self.entry_path(key), aside)
        except FileNotFoundError:  # removed by another process meanwhile
            return False
        except OSError as exc:
            if strict:
                raise CacheError(f"cannot remove entry {key[:16]}: {exc}") from exc
            return False
        rmtree(aside)
        return True

    # -- write --------------------------------------------------------------------
    def new_tmp(self, key: str) -> Path:
        self.check_tree()
        path = self.tmp / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.incomplete"
        path.mkdir()
        return path

    def publish(
        self,
        key: str,
        tmp: Path,
        manifest: dict[str, Any],
        *,
        abort: Callable[[], bool] | None = None,
        mac_key: bytes | None = None,
        records: dict[str, Any] | None = None,
    ) -> bool:
        """Checksum (or take the writer's ``records``), fsync, write the manifest last, rename.

        False when an entry exists already, or when ``abort()`` says the writer was
        cancelled meanwhile (checked just before the rename, the point of no return)."""
        files: dict[str, dict[str, Any]] = {}
        for file in sorted(tmp.iterdir()):
            if file.name == MANIFEST:
                continue
            fsync_file(file)
            files[file.name] = reusable_record(file, (records or {}).get(file.name)) or checksum_record(file)
        manifest = {**manifest, "format": FORMAT_VERSION, "key": key, "files": files}
        if mac_key is not None:
            manifest = auth.sign(manifest, tmp, mac_key)
        atomic_write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=1).encode(), durable=True)
        return self._rename_into_place(key, tmp, abort)

    def adopt(self, key: str, tmp: Path, manifest: dict[str, Any], *, mac_key: bytes | None = None) -> bool:
        """Publish files that came from elsewhere (the remote tier) under their own manifest,
        after checking them against it; raises EntryError when they do not match."""
        atomic_write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        entry = self._read_entry(key, tmp, check_sizes=True)
        problem = auth.check(manifest, tmp, mac_key) if mac_key is not None else self.verify(entry)
        if problem:
            raise EntryError(f"downloaded entry {key[:16]}: {problem}")
        for file in tmp.iterdir():
            fsync_file(file)
        return self._rename_into_place(key, tmp, None)

    def _rename_into_place(self, key: str, tmp: Path, abort: Callable[[], bool] | None) -> bool:
        fsync_dir(tmp)
        final = self.entry_path(key)
        final.parent.mkdir(exist_ok=True)
        if not is_plain_dir(final.parent):  # a shard symlinked elsewhere: never publish outside
            raise OSError(f"{final.parent} is a symlink or not a directory")
        if abort is not None and abort():
            rmtree(tmp)
            return False
        try:
            os.rename(tmp, final)
        except OSError:
            if os.path.lexists(final):  # published meanwhile by a writer that had no lock
                rmtree(tmp)
                return False
            raise
        fsync_dir(final.parent)
        return True

    def discard(self, tmp: Path) -> None:
        rmtree(tmp)  # a temp dir that will not be published

    # -- maintenance --------------------------------------------------------------
    def clean_tmp(self, min_age: float = TMP_MIN_AGE) -> list[Path]:
        """Remove temp dirs left by crashed writers (never one whose key lock is held)."""
        self.check_tree()
        removed = []
        now = time.time()
        for path in children(self.tmp):
            try:
                if now - newest_mtime(path) < min_age:
                    continue
            except OSError:
                continue
            prefix = path.name.split(".", 1)[0]
            lock = self.lock(prefix) if is_key(prefix) else None
            try:
                if lock is not None and not lock.try_acquire():
                    continue
            except (OSError, ValueError):
                continue
            try:
                rmtree(path)
                removed.append(path)
            finally:
                if lock is not None:
                    lock.release()
        return removed

    def keys(self) -> Iterator[str]:
        """Keys of the entries present; stray names (``.DS_Store``, a symlinked shard) are skipped."""
        self.check_tree()
        for shard in children(self.base):
            if not (len(shard.name) == 2 and is_plain_dir(shard)):
                continue
            for entry in children(shard):
                if is_key(entry.name) and entry.name[:2] == shard.name:
                    yield entry.name

    def info(self, key: str) -> EntryInfo:
        path = self.entry_path(key)
        problem = None
        manifest: dict[str, Any] = {}
        try:
            manifest = self._read_entry(key, path, check_sizes=True, check_version=False).manifest
        except EntryError as exc:
            problem = str(exc)
        except OSError as exc:
            problem = f"unreadable: {exc}"
        size = 0
        for file in children(path):
            try:
                size += file.lstat().st_size
            except OSError:
                pass
        try:
            last_used = path.lstat().st_mtime
        except OSError:
            last_used = 0.0
        created, source = manifest.get("created"), manifest.get("source")
        source_path = source.get("path") if isinstance(source, dict) else None
        marker, build = manifest.get("not_cacheable"), manifest.get("build")
        return EntryInfo(
            key=key,
            path=path,
            size=size,
            created=float(created) if isinstance(created, (int, float)) else 0.0,
            last_used=last_used,
            device=str(manifest.get("device", "?")),
            source=source_path if isinstance(source_path, str) else None,
            problem=problem,
            not_cacheable=marker_reason(marker),
            check=str(build.get("check")) if isinstance(build, dict) else None,
            variant=str(build.get("variant")) if isinstance(build, dict) else None,
        )

    def scan(self) -> CacheInfo:
        info = CacheInfo(self.root)
        info.entries = sorted((self.info(k) for k in self.keys()), key=lambda e: e.last_used)
        info.incomplete = list(children(self.tmp))
        return info

    def remove(self, key: str, *, wait: float = 0.0) -> bool:
        """Delete one entry unless a reader or writer holds its lock (for up to ``wait``
        seconds). True if removed; False if it is in use or already gone. ``CacheError`` when
        it cannot be removed: its lock cannot be opened, or it cannot be moved out of the tree."""
        self.entry_path(key)  # a key, not a path: CacheError otherwise
        lock = self.lock(key)
        try:
            if wait:
                lock.acquire(wait)
            elif not lock.try_acquire():
                return False
        except LockTimeout:
            return False
        except OSError as exc:
            raise CacheError(f"cannot remove entry {key[:16]}: {exc}") from exc
        try:
            return self._delete(key, "pruned", strict=True)
        finally:
            lock.release()

    def prune(
        self,
        *,
        max_size: int | None = None,
        older_than: float | None = None,
        dry_run: bool = False,
    ) -> Pruned:
        """Remove least-recently-used entries above ``max_size`` bytes and those unused
        for ``older_than`` seconds. Entries in use (locked) are skipped; those that cannot be
        removed are logged and listed in the result's ``failed``."""
        info = self.scan()
        total = info.size
        now = time.time()
        pruned = Pruned()
        for entry in info.entries:  # oldest use first
            too_old = older_than is not None and now - entry.last_used > older_than
            too_big = max_size is not None and total > max_size
            if not (too_old or too_big or entry.problem):
                continue
            try:
                removed = dry_run or self.remove(entry.key)
            except CacheError as exc:
                logger.warning("aioov cache: could not prune entry %s: %s", entry.key[:16], exc)
                pruned.failed.append((entry, str(exc)))
                continue
            if removed:
                pruned.append(entry)
                total -= entry.size
        return pruned

    def clear(self) -> int:
        """Remove every entry (skipping those in use) and leftovers; returns entries removed."""
        removed = 0
        for key in list(self.keys()):
            try:
                gone = self.remove(key)
            except CacheError as exc:
                logger.warning("aioov cache: could not clear entry %s: %s", key[:16], exc)
                continue
            if gone:
                self.sentinels.forget(key)  # a cleared cache starts over: crashed variants are tried again
                removed += 1
        self.clean_tmp(min_age=0)
        return removed

