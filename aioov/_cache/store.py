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
        ├── .locks/<key>.lock         per-key flock files, removed with their entry (locks.py)
        ├── .locks/hash-<path>.lock   held while a model file is hashed, removed after (locks.py)
        ├── .locks/peers/             marks of the processes loading from the cache (peers.py)
        ├── .runs/                    crash sentinels: first runs at new input shapes (sentinel.py)
        ├── .usage/                   the size and contents without a scan (usage.py)
        └── .tmp/<key>.<pid>.<rand>.incomplete/   entries being written

An entry is written in ``.tmp``, fsynced, its manifest written last, then the
whole directory is renamed into place: readers see a complete entry or none.
Anything wrong with an entry (missing or bad manifest, wrong sizes or
checksums, another onnxruntime) gets it renamed out of the way and deleted;
the caller recompiles. Symlinks inside the tree are never followed.

Bookkeeping lives as long as its entry (#45): ``remove`` unlinks the entry's lock file,
``prune``/``clear`` collect lock files, stat index records and size markers whose entry is
gone, and stat index records whose model files are gone or changed (``collect``); every
rename into or out of the tree is a line in the usage journal, so that ``CACHE_MAX_SIZE``
and ``aioov cache stats`` know the size in O(1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .._errors import CacheError, Cancelled, EntryError, LockTimeout
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
    read_regular,
    reusable_record,
    rmtree,
)
from .key import FileStat, StatIndex, path_digest
from .layout import FORMAT_VERSION, MANIFEST, NOT_CACHEABLE, is_reserved
from .locks import KeyLock
from .records import Bookkeeping, CacheInfo, Entry, EntryInfo, Pruned
from .sentinel import Sentinels
from .usage import Journal, Row, Totals, Usage

__all__ = ("Bookkeeping", "CacheInfo", "CacheStore", "Entry", "EntryInfo", "Pruned", "Totals")

logger = logging.getLogger("aioov.cache")

_MAX_MANIFEST_BYTES = 1 << 20
_CACHEDIR_TAG = (
    b"Signature: 8a477f597d28d172789f06886806bc55\n"
    b"# This file is a cache directory tag created by aioov.\n"
    b"# For information about cache directory tags see https://bford.info/cachedir/\n"
)
#: a temp dir is removed only when no writer holds its key's lock and it is at least this old
TMP_MIN_AGE = 60.0
#: past ``CACHE_MAX_SIZE``, entries are pruned down to this share of it, so that the walk it
#: takes is paid once per tenth of the limit's worth of publishes, not on each (ccache's
#: ``limit_multiple`` does the same)
LOW_WATER = 0.9
#: a size limit's summary is rebuilt from a walk at least this often (seconds), in case a line
#: was lost (a process killed between its rename and its line)
REBUILD_AFTER = 86400.0
#: journal bytes after which a rebuild compacts it into a new catalog (``ls`` reads it all)
COMPACT_BYTES = 8 << 20
#: a stat index record or size marker younger than this is kept by ``collect`` (a compile may
#: be under way for it, its entry not published yet)
INDEX_GRACE = 600.0
#: seconds ``prune``/``clear``/``verify`` wait for another process's rebuild to finish
REBUILD_WAIT = 60.0
#: entries between two calls of a progress callback
PROGRESS_EVERY = 500
#: seconds a process's claim on upkeep lasts (``claim_upkeep``)
UPKEEP_CLAIM = 300.0


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
        self.usage = Usage(self.base / ".usage")
        self._upkeep_claim: tuple[int, float] | None = None
        #: called with (key, reason) whenever a broken entry is discarded
        self.on_discard: Callable[[str, str], object] | None = None

    # -- set-up -----------------------------------------------------------------
    def ensure(self) -> None:
        """Create the tree (respecting the umask); raises OSError when it cannot, when a
        directory of the tree is a symlink, or when ``root`` is a non-empty folder that is not
        an aioov cache (its CACHEDIR.TAG would make backup tools skip the user's files)."""
        if self._root_has_files() and not (self.is_cache() or is_plain_dir(self.base)):
            raise OSError(f"{self.root} is not empty and not an aioov cache; give a new or empty directory")
        for path in (self.base, self.tmp, self.locks, self.index.root, self.usage.root):
            path.mkdir(parents=True, exist_ok=True)
        self.check_tree()
        if not os.path.lexists(self.usage.root / "summary.json") and not any(True for _ in self._entries()):
            self.usage.create()  # a new cache: its summary is exact from the start
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
        for path in (self.base, self.tmp, self.locks, self.index.root, self.sentinels.root, self.usage.root):
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
        """The lock held while a model file is hashed for the stat index (by its path); its
        file is removed by the hasher that releases it (waiters then read the record)."""
        return KeyLock(self.locks / f"hash-{path_digest(path)}.lock", transient=True)

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

    def _delete(self, key: str, why: str, *, strict: bool = False, journal: Journal | None = None,
                size: tuple[int, bool] | None = None) -> bool:
        """Rename an entry out of the tree (atomic: readers see it or nothing), then delete it.
        False when it is gone already; when it cannot be moved, False too, or with ``strict``
        a ``CacheError`` saying why. The rename and its journal line go together (``usage``).
        ``journal``: a batch (whose caller checked the tree once); ``size``: (bytes, marker) as
        the entry was recorded, where the caller knows them."""
        aside = self.tmp / f"{key}.{uuid.uuid4().hex[:8]}.{why}"
        try:
            if journal is None:
                self.tmp.mkdir(parents=True, exist_ok=True)
                self.check_tree()
            with contextlib.nullcontext(journal) if journal else self.usage.journal() as lines, lines.change():
                os.rename(self.entry_path(key), aside)
                bytes_, marker = size if size is not None else measure(aside)
                lines.removed(key, bytes_, marker)
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
        return self._rename_into_place(key, tmp, abort, manifest)

    def adopt(self, key: str, tmp: Path, manifest: dict[str, Any], *,
              mac_key: bytes | tuple[bytes, ...] | None = None) -> bool:
        """Publish files that came from elsewhere (the remote tier) under their own manifest,
        after checking them against it (with ``mac_key``, or any of a rotation's keys: their
        MACs); raises EntryError when they do not match, saying ``auth.NOT_MINE`` for an entry
        signed under none of the keys."""
        atomic_write_bytes(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        entry = self._read_entry(key, tmp, check_sizes=True)
        keys = auth.as_keys(mac_key)
        signer = auth.signer(manifest, keys) if keys else None
        if keys and signer is None and auth.signed(manifest):
            problem: str | None = auth.NOT_MINE
        else:
            problem = auth.check(manifest, tmp, signer or keys[0]) if keys else self.verify(entry)
        if problem:
            raise EntryError(f"downloaded entry {key[:16]}: {problem}")
        for file in tmp.iterdir():
            fsync_file(file)
        return self._rename_into_place(key, tmp, None, manifest)

    def _rename_into_place(self, key: str, tmp: Path, abort: Callable[[], bool] | None,
                           manifest: dict[str, Any]) -> bool:
        fsync_dir(tmp)
        final = self.entry_path(key)
        final.parent.mkdir(exist_ok=True)
        if not is_plain_dir(final.parent):  # a shard symlinked elsewhere: never publish outside
            raise OSError(f"{final.parent} is a symlink or not a directory")
        if abort is not None and abort():
            rmtree(tmp)
            return False
        row = Row.of_manifest(manifest, measure(tmp)[0])
        with self.usage.journal() as lines, lines.change():
            for again in (False, True):
                try:
                    os.rename(tmp, final)
                    lines.added(key, row)
                    published = True
                    break
                except FileNotFoundError:
                    if again or not os.path.lexists(tmp):
                        raise
                    final.parent.mkdir(exist_ok=True)  # its empty shard was removed (``clear``) meanwhile
                    if not is_plain_dir(final.parent):
                        raise
                except OSError:
                    if not os.path.lexists(final):
                        raise
                    published = False  # published meanwhile by a writer that had no lock
                    break
        if not published:
            rmtree(tmp)
            return False
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
                if lock is not None:  # the lock of a key with no entry is bookkeeping of nothing
                    lock.release(discard=not os.path.lexists(self.entry_path(prefix)))
        return removed

    def keys(self) -> Iterator[str]:
        """Keys of the entries present; stray names (``.DS_Store``, a symlinked shard) are skipped."""
        for key, _entry in self._entries():
            yield key

    def _entries(self) -> Iterator[tuple[str, os.DirEntry[str]]]:
        """(key, directory entry) of each entry present, in key order: one listing per shard."""
        self.check_tree()
        for shard in sorted(_scandir(self.base), key=lambda s: s.name):
            if not (len(shard.name) == 2 and shard.is_dir(follow_symlinks=False)):
                continue
            for entry in sorted(_scandir(shard.path), key=lambda e: e.name):
                if entry.name[:2] == shard.name and is_key(entry.name):
                    yield entry.name, entry

    def info(self, key: str) -> EntryInfo:
        """One entry as its manifest and files say (``problem``: what is wrong with it)."""
        path = self.entry_path(key)
        problem = None
        manifest: dict[str, Any] = {}
        try:
            manifest = self._read_entry(key, path, check_sizes=True, check_version=False).manifest
        except EntryError as exc:
            problem = str(exc)
        except OSError as exc:
            problem = f"unreadable: {exc}"
        try:
            last_used = path.lstat().st_mtime
        except OSError:
            last_used = 0.0
        found = _entry_info(key, path, Row.of_manifest(manifest, measure(path)[0]), last_used, problem)
        return dataclasses.replace(found, short_of_room=_short_of_room(manifest.get("build")))

    def scan(self, progress: Callable[[int, int], object] | None = None) -> CacheInfo:
        """Every entry read from its manifest and files (``info``), least recently used first;
        ``progress(done, total)`` is called every ``PROGRESS_EVERY`` entries."""
        info = CacheInfo(self.root)
        keys = list(self.keys())
        for done, key in enumerate(keys, 1):
            info.entries.append(self.info(key))
            if progress is not None and (done % PROGRESS_EVERY == 0 or done == len(keys)):
                progress(done, len(keys))
        info.entries.sort(key=lambda e: e.last_used)
        info.incomplete = list(children(self.tmp))
        return info

    # -- what the summary knows (usage.py) ---------------------------------------------------
    def totals(self) -> Totals:
        """The cache's size and entry count from its summary, in O(1); a cache that has none
        yet (written by an earlier aioov) is walked once to make it. OSError where it cannot be read."""
        if not is_plain_dir(self.base):
            return Totals()  # nothing cached here yet
        totals = self.usage.totals()
        if totals is None:
            self.refresh()
            totals = self.usage.totals()
        if totals is None:
            raise OSError(f"cannot summarize {self.base}: {self.usage.root} cannot be written")
        return totals

    def listing(self) -> list[EntryInfo]:
        """Every entry as the summary records it (no manifest read), with its last use, least
        recently used first; ``problem`` is never set (``scan`` reads the manifests). A
        recorded entry gone since is left out; one nobody recorded (a process killed between
        its rename and its line) appears after the next rebuild (``refresh``, ``prune``)."""
        if not is_plain_dir(self.base):
            return []
        rows = self.usage.rows()
        if rows is None:
            rows = self.refresh()
        if rows is None:
            return self.scan().entries
        found, base = [], str(self.base)
        shards: dict[str, Path] = {}
        for key, row in rows.items():  # strings, and a Path made from its shard's: 100,000 of them
            try:
                last_used = os.lstat(f"{base}/{key[:2]}/{key}").st_mtime
            except OSError:
                continue
            shard = shards.get(key[:2]) or shards.setdefault(key[:2], self.base / key[:2])
            found.append(_entry_info(key, shard / key, row, last_used, None))
        found.sort(key=lambda e: e.last_used)
        return found

    def refresh(self, *, wait: float = REBUILD_WAIT, broken: int | None = None) -> dict[str, Row] | None:
        """Rebuild the summary from a walk of the entries (a manifest is read only for an entry
        it has no row of; ``broken``: what a check of every entry just found); the rows it
        committed, or None where another process's rebuild took longer than ``wait``."""
        with self.usage.rebuilding(wait) as mine:
            return self.usage.rebuild(self._walk, broken=lambda: broken) if mine else None

    def _walk(self, known: Mapping[str, Row], last_used: dict[str, float] | None = None,
              cancel: Callable[[], bool] | None = None) -> dict[str, Row]:
        """The entries present, with their rows: ``known`` ones trusted, others read
        (``info``); with ``last_used``, their directories' mtimes are noted there."""
        present: dict[str, Row] = {}
        for done, (key, entry) in enumerate(self._entries()):
            if cancel is not None and done % PROGRESS_EVERY == 0 and cancel():
                raise Cancelled()
            if last_used is not None:
                try:
                    last_used[key] = entry.stat(follow_symlinks=False).st_mtime
                except OSError:
                    continue  # gone meanwhile
            row = known.get(key)
            present[key] = row if row is not None else _row(self.info(key))
        return present

    def bookkeeping(self) -> Bookkeeping:
        """How many bookkeeping files there are (listings only: cheap at any size)."""
        found = Bookkeeping()
        locks = [name for name in _listdir(self.locks) if name.endswith(".lock")]
        found.hash_locks = sum(name.startswith("hash-") for name in locks)
        found.key_locks = len(locks) - found.hash_locks
        index = _listdir(self.index.root)
        found.index_records = sum(name.endswith(".json") for name in index)
        found.size_markers = sum(name.endswith(".size") for name in index)
        found.run_folders = len(_listdir(self.sentinels.root))
        found.temp_dirs = len(_listdir(self.tmp))
        return found

    def remove(self, key: str, *, wait: float = 0.0, journal: Journal | None = None,
               size: tuple[int, bool] | None = None) -> bool:
        """Delete one entry unless a reader or writer holds its lock (for up to ``wait``
        seconds), and its lock file with it. True if removed; False if it is in use or already
        gone. ``CacheError`` when it cannot be removed: its lock cannot be opened, or it cannot
        be moved out of the tree. ``journal``: a batch of removals (``prune``, ``clear``: see
        ``batch``); ``size``: the entry's (bytes, marker) as recorded."""
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
            return self._delete(key, "pruned", strict=True, journal=journal, size=size)
        finally:
            # Held exclusively, with the entry gone: the lock file goes too (locks.py says why
            # that is safe for whoever waits on it).
            lock.release(discard=not os.path.lexists(self.entry_path(key)))

    def prune(
        self,
        *,
        max_size: int | None = None,
        older_than: float | None = None,
        dry_run: bool = False,
        progress: Callable[[int, int], object] | None = None,
        removing: Callable[[int, int], object] | None = None,
    ) -> Pruned:
        """Remove least-recently-used entries above ``max_size`` bytes and those unused
        for ``older_than`` seconds. Entries in use (locked) are skipped; those that cannot be
        removed are logged and listed in the result's ``failed``. The scan rebuilds the
        summary, and bookkeeping left by removed entries is collected (the result's
        ``collected``). ``progress(done, total)``: as the entries are read (``scan``);
        ``removing(done, total)``: as those chosen are removed, every ``PROGRESS_EVERY``
        (``done`` counts those skipped too: removing 100,000 entries takes minutes)."""
        scans: list[CacheInfo] = []

        def walk(known: Mapping[str, Row]) -> dict[str, Row]:
            scans.append(self.scan(progress))
            return {e.key: _row(e) for e in scans[-1].entries}

        if not dry_run:  # a dry run writes nothing, the summary neither
            with contextlib.suppress(OSError), self.usage.rebuilding(REBUILD_WAIT) as mine:
                if mine:
                    self.usage.rebuild(walk, broken=lambda: sum(e.problem is not None for e in scans[-1].entries))
        info = scans[-1] if scans else self.scan(progress)
        now = time.time()

        def chosen(entry: EntryInfo, total: int) -> bool:
            too_old = older_than is not None and now - entry.last_used > older_than
            too_big = max_size is not None and total > max_size
            retry = entry.short_of_room is not None and self._room_again(entry, now)
            return too_old or too_big or bool(entry.problem) or retry

        expected, total = 0, info.size  # to remove, if none is in use (a progress's total)
        for entry in info.entries if removing is not None else ():
            if chosen(entry, total):
                expected, total = expected + 1, total - entry.size
        total, done = info.size, 0
        pruned = Pruned()
        with self.batch() as journal:
            for entry in info.entries:  # oldest use first
                if not chosen(entry, total):
                    continue
                try:
                    removed = dry_run or self.remove(entry.key, journal=journal,
                                                     size=(entry.size, entry.not_cacheable is not None))
                except CacheError as exc:
                    logger.warning("aioov cache: could not prune entry %s: %s", entry.key[:16], exc)
                    pruned.failed.append((entry, str(exc)))
                    removed = False
                if removed:
                    pruned.append(entry)
                    total -= entry.size
                done += 1
                if removing is not None and done % PROGRESS_EVERY == 0:
                    removing(done, max(done, expected))
        if removing is not None and done % PROGRESS_EVERY:
            removing(done, max(done, expected))
        if not dry_run:
            pruned.collected = self.collect()
        return pruned

    def _room_again(self, entry: EntryInfo, now: float) -> bool:
        """Whether an entry whose better variant did not fit is worth building again: written
        ``RETRY_AFTER`` ago, with room for twice it on the disk now."""
        if now - entry.created < RETRY_AFTER:
            return False
        try:
            return shutil.disk_usage(self.base).free > 2 * entry.size
        except OSError:
            return False

    def clear(self, progress: Callable[[int, int], object] | None = None) -> int:
        """Remove every entry (skipping those in use) and leftovers, and the bookkeeping of
        entries (lock files, stat index, crash records): what is left is the cache's skeleton,
        and what entries in use still hold. Returns the entries removed. ``progress(done,
        total)``: every ``PROGRESS_EVERY`` entries (``done`` counts those skipped too)."""
        removed = 0
        with self.batch() as journal:
            keys = list(self.keys())
            for done, key in enumerate(keys, 1):
                try:
                    gone = self.remove(key, journal=journal)
                except CacheError as exc:
                    logger.warning("aioov cache: could not clear entry %s: %s", key[:16], exc)
                    gone = False
                if gone:
                    self.sentinels.forget(key)  # a cleared cache starts over: crashed variants are tried again
                    removed += 1
                if progress is not None and (done % PROGRESS_EVERY == 0 or done == len(keys)):
                    progress(done, len(keys))
        self.clean_tmp(min_age=0)
        self.collect(everything=True)
        for shard in _scandir(self.base):
            if len(shard.name) == 2 and shard.is_dir(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.rmdir(shard.path)  # only an empty one (a publish that finds it gone makes it again)
        with contextlib.suppress(OSError):
            self.refresh()
        return removed

    def batch(self) -> Journal:
        """A journal for many removals in a row (``remove(journal=...)``), the tree checked once."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.check_tree()
        return self.usage.journal()

    # -- the size limit (CACHE_MAX_SIZE) ----------------------------------------------------
    def claim_upkeep(self, max_size: int | None) -> bool:
        """Whether ``upkeep`` is due, from the summary in O(1) (a publish asks): the cache
        passed ``max_size``, or has no summary yet (an earlier aioov wrote it), or its journal
        wants compacting, or (with a limit) its last rebuild is a day old. True claims it for
        this process: later calls say False until ``upkeep`` has run, or ``UPKEEP_CLAIM``
        seconds have passed (an upkeep that failed is tried again then, not at each publish)."""
        claim = self._upkeep_claim
        if claim is not None and claim[0] == os.getpid() and time.monotonic() - claim[1] < UPKEEP_CLAIM:
            return False
        totals = self.usage.totals()
        due = (totals is None or totals.offset + totals.pending > COMPACT_BYTES
               or (max_size is not None and (totals.bytes > max_size or time.time() - totals.rebuilt > REBUILD_AFTER)))
        if due:
            self._upkeep_claim = (os.getpid(), time.monotonic())
        return due

    def upkeep(self, max_size: int | None, *, cancel: Callable[[], bool] | None = None) -> Pruned | None:
        """What ``CACHE_MAX_SIZE`` runs when ``claim_upkeep`` says so, off a compile's path:
        rebuild the summary from a walk (rows known, the directories' mtimes read, no
        manifest but those of entries nobody recorded) and, past ``max_size``, remove the
        least recently used entries (in use: skipped) down to ``LOW_WATER`` of it, with their
        lock files and the stat index records of their paths. None where another process is
        at it. Raises ``Cancelled`` when ``cancel()`` says so (checked as it goes)."""
        with self.usage.rebuilding() as mine:
            if not mine:
                self._upkeep_claim = None
                return None
            last_used: dict[str, float] = {}
            rows = self.usage.rebuild(lambda known: self._walk(known, last_used, cancel))
            pruned = Pruned()
            if rows is not None and max_size is not None:
                self._evict(rows, last_used, max_size * LOW_WATER if sum(r.size for r in rows.values()) > max_size
                            else None, pruned, cancel)
        self._upkeep_claim = None
        return pruned

    def _evict(self, rows: dict[str, Row], last_used: dict[str, float], target: float | None, pruned: Pruned,
               cancel: Callable[[], bool] | None) -> None:
        """Remove the least recently used of ``rows`` until they hold ``target`` bytes."""
        if target is None:
            return
        total, now = sum(row.size for row in rows.values()), time.time()
        with self.batch() as journal:
            for key in sorted(rows, key=lambda k: last_used.get(k, now)):  # unknown: published during the walk
                if total <= target:
                    break
                if cancel is not None and cancel():
                    raise Cancelled()
                try:
                    if not self.remove(key, journal=journal, size=(rows[key].size, rows[key].marker)):
                        continue
                except CacheError as exc:
                    logger.warning("aioov cache: could not prune entry %s: %s", key[:16], exc)
                    continue
                total -= rows[key].size
                pruned.append(_entry_info(key, self.entry_path(key), rows[key], last_used.get(key, now), None))
        gone = {entry.key for entry in pruned}
        left = {row.model for key, row in rows.items() if key not in gone}
        for entry in pruned:
            if entry.source and entry.model and entry.model not in left:
                pruned.collected.index_records += self._forget_record(entry.source, entry.model)
        pruned.collected.key_locks = sum(not os.path.lexists(self.lock(key).path) for key in gone)

    def _forget_record(self, source: str, digest: str) -> bool:
        """Remove the stat index record of ``source`` if it maps to ``digest``."""
        record = self.index.root / f"{path_digest(source)}.json"
        if _index_record(record)[0] != digest:
            return False
        with contextlib.suppress(OSError):
            record.unlink()
            return True
        return False

    # -- bookkeeping ------------------------------------------------------------------------
    def collect(self, *, everything: bool = False) -> Bookkeeping:
        """Remove bookkeeping that outlived its entry: lock files of keys with no entry and
        hash locks, each taken exclusively first (one in use stays); stat index records of
        models no entry was built from, and size markers of no record (younger than
        ``INDEX_GRACE``: kept, their compile may be under way); stat index records whose
        files are gone or changed (no lookup can use them); empty crash-sentinel folders.
        ``everything`` (``clear``): every index record and size marker, and the crash records
        of keys with no entry. What was removed, counted."""
        self.check_tree()
        done = Bookkeeping()
        for entry in _scandir(self.locks):
            stem = entry.name[:-5] if entry.name.endswith(".lock") else ""
            if not (is_key(stem) or stem.startswith("hash-")) or not entry.is_file(follow_symlinks=False):
                continue
            if is_key(stem) and os.path.lexists(self.entry_path(stem)):
                continue
            lock = KeyLock(Path(entry.path))
            try:
                if not lock.try_acquire():
                    continue
            except OSError:
                continue
            gone = not (is_key(stem) and os.path.lexists(self.entry_path(stem)))
            lock.release(discard=gone)
            if gone and is_key(stem):
                done.key_locks += 1
            elif gone:
                done.hash_locks += 1
        done.index_records, done.size_markers = self._collect_index(everything)
        for entry in _scandir(self.sentinels.root):
            if not entry.is_dir(follow_symlinks=False):
                continue
            if everything and is_key(entry.name) and not os.path.lexists(self.entry_path(entry.name)):
                self.sentinels.forget(entry.name)
            else:
                with contextlib.suppress(OSError):
                    os.rmdir(entry.path)  # only when empty: runs under way and crash records stay
            done.run_folders += not os.path.lexists(entry.path)
        return done

    def _collect_index(self, everything: bool) -> tuple[int, int]:
        in_use: set[str | None] | None = set()  # None: any model may have an entry
        if not everything:
            rows = self.usage.rows()
            in_use = None if rows is None else {row.model for row in rows.values()}
        now, records, markers = time.time(), 0, 0
        kept_sizes: set[int] = set()
        found_markers = []
        for entry in _scandir(self.index.root):
            if entry.name.endswith(".size"):
                found_markers.append(entry)
                continue
            if not entry.name.endswith(".json"):
                continue
            if not everything:
                digest, size, files = _index_record(Path(entry.path))
                if in_use is None or digest in in_use or _younger(entry, now, INDEX_GRACE):
                    if files is not None and _outdated(files) and self._forget_outdated(Path(entry.path), files[0]):
                        records += 1
                    elif size is not None:
                        kept_sizes.add(size)
                    continue
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                records += 1
        for entry in found_markers:
            stem = entry.name[:-5]
            if not everything and (in_use is None or not stem.isdigit() or int(stem) in kept_sizes
                                   or _younger(entry, now, INDEX_GRACE)):
                continue
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
                markers += 1
        return records, markers

    def _forget_outdated(self, record: Path, model: FileStat) -> bool:
        """Remove a stat index record whose files are gone or changed, unless a process is
        writing it now: the hash lock of its model path is held while the path is hashed and
        its record written (``Cache.identify``), so the record is read again under that lock
        before it goes. (A ``Model``'s record is written without it; losing a race with one
        costs that model one hashing at its next start, no wrong digest.)"""
        try:
            if record.name != f"{path_digest(model.path)}.json":
                return False  # not where a lookup of its path reads: the rules for unused records apply
        except ValueError:  # a forged path no writer could have named
            return False
        lock = self.hash_lock(model.path)
        try:
            if not lock.try_acquire():
                return False  # being hashed: its record is written anew
        except OSError:
            return False
        try:
            files = _index_record(record)[2]
            if files is None or files[0].path != model.path or not _outdated(files):
                return False
            record.unlink()
            return True
        except OSError:
            return False
        finally:
            lock.release()


def measure(path: Path) -> tuple[int, bool]:
    """(bytes, is a not-cacheable marker) of an entry's directory: its files' sizes, leaving
    out the verification stamp and other dot-files that readers write into it later."""
    size, marker = 0, False
    for entry in _scandir(str(path)):
        if entry.name.startswith("."):
            continue
        try:
            size += entry.stat(follow_symlinks=False).st_size
        except OSError:
            continue
        marker = marker or entry.name == NOT_CACHEABLE
    return size, marker


def _listdir(path: Path) -> list[str]:
    """A directory's names; nothing for a symlink, a non-directory or a missing one."""
    if not is_plain_dir(path):
        return []
    try:
        return os.listdir(path)
    except OSError:
        return []


def _scandir(path: str | Path) -> list[os.DirEntry[str]]:
    """A directory's entries; nothing for a symlink, a non-directory or a missing one."""
    if not is_plain_dir(Path(path)):
        return []
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except OSError:
        return []


def _younger(entry: os.DirEntry[str], now: float, age: float) -> bool:
    try:
        return now - entry.stat(follow_symlinks=False).st_mtime < age
    except OSError:
        return True  # gone or unreadable: not ours to judge


def _index_record(path: Path) -> tuple[str | None, int | None, list[FileStat] | None]:
    """(model digest, total size of its files, the files as recorded) of a stat index record;
    Nones when it cannot be read as one."""
    try:
        record = load_json(read_regular(path, 1 << 20))
        files = [FileStat(**item) for item in record["files"]]
        if not all(isinstance(file.path, str) for file in files):
            return None, None, None
        return str(record["digest"]), sum(int(file.size) for file in files), files or None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, None, None


def _outdated(files: list[FileStat]) -> bool:
    """Whether a stat index record's files are gone or no longer the files it describes (size,
    mtime, ctime, inode, device), as a lookup compares them. A file this process may not
    ``stat`` (another user's folder) is not judged."""
    try:
        return any(file.changed() for file in files)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except (OSError, ValueError):
        return False


#: seconds after which an entry published without its better variant, for want of room, is
#: pruned to let the next compile try again (where the disk has room by then)
RETRY_AFTER = 24 * 3600.0
#: what a builder's failure says when the disk, a quota or a file size limit had no room
_NO_ROOM = ("no room on the disk", "no room under the file size limit", "[Errno 28]", "[Errno 27]", "[Errno 122]",
            "No space left", "Disk quota exceeded", "File too large")


def _short_of_room(build: object) -> str | None:
    """The failure of a better variant, in a manifest's ``build`` record, that says the disk had
    no room for it; None when there is none."""
    if not isinstance(build, dict):
        return None
    said = [item for item in build.get("failed", []) if isinstance(item, str)]
    said += [str(v) for k, v in build.items() if isinstance(v, str) and k not in ("check", "variant")]
    return next((item for item in said if any(mark in item for mark in _NO_ROOM)), None)


def _row(info: EntryInfo) -> Row:
    return Row(info.size, info.created, info.device, info.source, info.not_cacheable, info.check, info.variant,
               info.model)


def _entry_info(key: str, path: Path, row: Row, last_used: float, problem: str | None) -> EntryInfo:
    return EntryInfo(key=key, path=path, size=row.size, created=row.created, last_used=last_used, device=row.device,
                     source=row.source, problem=problem, not_cacheable=row.not_cacheable, check=row.check,
                     variant=row.variant, model=row.model)
