"""The cache's size and contents without a scan: ``v1/.usage/`` (#45).

``CACHE_MAX_SIZE`` used to scan every manifest after every publish (0.8 s at 10,000 entries),
and ``aioov cache stats``/``ls`` read them all. Here a publish or a removal appends one line,
and the totals are read back in O(1)::

    v1/.usage/
    ├── summary.json    the commit point: generation, totals, how much of the journal they hold
    ├── catalog.<gen>   every entry's row when generation <gen> began (written by a rebuild)
    ├── journal.<gen>   a line per entry published or removed since: ``+ <bytes> <marker> <key>
    │                   <row>`` / ``- <bytes> <marker> <key>`` (one write() with O_APPEND)
    ├── lock            flock: shared around a change and its line, or a read; exclusive to
    │                   fold lines into the totals, or to commit a rebuild
    └── rebuild.lock    flock: the one process rebuilding (and pruning for the size limit) now

**Totals.** ``summary.json``'s totals plus the journal's lines past its ``offset`` are the
cache's size. A publisher that finds more than ``FOLD_BYTES`` of such lines folds them into the
summary under the exclusive lock (never waiting for it: busy, someone else folds).

**A change and its line go together.** The entry's rename (into the tree or out of it) and its
journal line happen under one shared hold of ``lock``, so a rebuild's commit (exclusive) falls
before both or after both: a line in the new generation is always a change its walk did not see.
Lines are short (``LINE_MAX``): local filesystems never interleave two O_APPEND writes. A line
cut short (a full disk) or lost (a process killed between its rename and its line, NFS
interleaving appends) makes the totals wrong until the next rebuild, never for good.

**Rebuild** (``CacheStore.upkeep`` when the size limit is passed, ``prune``, ``verify``,
``clear``; ``stats``/``ls`` on a cache that has no summary yet, such as one an earlier aioov
wrote). Under ``rebuild.lock``: note where the journal ends, walk the entries with no lock held
(rows known from the catalog and journal are trusted; an entry nobody recorded has its manifest
read), write the new catalog, then, under the exclusive lock, replay the lines appended during
the walk on what it found (by key: the last line wins, so a change the walk saw is not counted
twice) and commit: a new journal holding those lines, totals, ``summary.json`` replaced last.
A crash before the commit leaves the old generation whole; files of other generations are
removed by the next commit.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from .._errors import LockTimeout
from .fsutil import atomic_write_bytes, load_json, nofollow_opener, read_regular
from .layout import marker_reason
from .locks import KeyLock

__all__ = ("FOLD_BYTES", "Journal", "Row", "Totals", "Usage")

#: journal bytes past the summary's offset after which a publisher folds them into the totals
FOLD_BYTES = 16 << 10
#: a journal line is one write(): a source path or a reason longer than this is cut
TEXT_MAX = 1024
#: seconds a change waits for the shared lock (held exclusively for milliseconds at a time);
#: past it the change goes unrecorded, for the next rebuild to find
CHANGE_WAIT = 5.0
#: seconds a rebuild's commit waits for the exclusive lock before giving up (nothing lost)
COMMIT_WAIT = 30.0
#: a batch of changes (prune, clear) lets go of the shared lock this often, for folds and commits
HOLD_FOR = 0.2
#: for this long (seconds): longer than a commit's poll (``_acquire_soon``)
_GAP = 0.005
_SUMMARY = "summary.json"
_MAX_SUMMARY = 1 << 16
_MAX_CATALOG = 1 << 31
_FORMAT = 1
_KEY = re.compile(r"[0-9a-f]{16,128}")  # as the store's keys


class Row(NamedTuple):
    """What the cache keeps of an entry without reading it: what ``ls`` shows, and what
    pruning (``size``) and the stat index's collection (``model``) need. (A tuple: ``ls``
    makes 100,000 of them.)"""

    size: int
    created: float = 0.0
    device: str = "?"
    source: str | None = None
    #: the reason of a not-cacheable marker (which is not an entry)
    not_cacheable: str | None = None
    check: str | None = None
    variant: str | None = None
    #: the model's content digest, which its stat index records map its paths to
    model: str | None = None

    @property
    def marker(self) -> bool:
        return self.not_cacheable is not None

    @classmethod
    def of_manifest(cls, manifest: Mapping[str, Any], size: int) -> Row:
        created, source, inputs = manifest.get("created"), manifest.get("source"), manifest.get("key_inputs")
        source_path = source.get("path") if isinstance(source, dict) else None
        marker, build = manifest.get("not_cacheable"), manifest.get("build")
        model = inputs.get("model") if isinstance(inputs, dict) else None
        return cls(
            size=size,
            created=float(created) if isinstance(created, (int, float)) else 0.0,
            device=str(manifest.get("device", "?")),
            source=source_path if isinstance(source_path, str) else None,
            not_cacheable=marker_reason(marker),
            check=str(build.get("check")) if isinstance(build, dict) else None,
            variant=str(build.get("variant")) if isinstance(build, dict) else None,
            model=model if isinstance(model, str) else None,
        )

    def dump(self) -> list[Any]:
        return [self.size, self.created, _cut(self.device), _cut(self.source), _cut(self.not_cacheable),
                _cut(self.check), _cut(self.variant), _cut(self.model)]

    @classmethod
    def load(cls, item: Any) -> Row | None:
        """A row from its JSON form, or None for anything malformed (the file is shared)."""
        if not (type(item) is list and len(item) == 8 and type(item[0]) is int and item[0] >= 0
                and type(item[1]) in (int, float) and type(item[2]) is str
                and all(v is None or type(v) is str for v in item[3:])):
            return None
        return cls._make(item)


@dataclass
class Totals:
    """What the summary says: the cache's size now, and what its last rebuild found."""

    bytes: int = 0
    entries: int = 0  # entries and not-cacheable markers
    markers: int = 0
    #: when the totals were last made from a walk of the entries (0: never)
    rebuilt: float = 0.0
    #: bad entries the last full check found (``prune``/``verify``), and when (0: never)
    broken: int | None = None
    checked: float = 0.0
    gen: int = 0
    offset: int = 0
    #: journal bytes not folded into the totals yet
    pending: int = 0

    def add(self, sign: int, size: int, marker: bool) -> None:
        self.bytes += sign * size
        self.entries += sign
        self.markers += sign * marker


class Usage:
    """The summary of one cache directory (``v1/.usage``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _journal(self, gen: int) -> Path:
        return self.root / f"journal.{gen}"

    def _catalog(self, gen: int) -> Path:
        return self.root / f"catalog.{gen}"

    def _lock(self) -> KeyLock:
        return KeyLock(self.root / "lock")

    # -- the summary ------------------------------------------------------------------------
    def _read_summary(self) -> Totals | None:
        """The committed summary; None where there is none (or it is not ours)."""
        try:
            data = load_json(read_regular(self.root / _SUMMARY, _MAX_SUMMARY))
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            return None
        ints = ("gen", "offset", "bytes", "entries", "markers")
        if not all(type(data.get(name)) is int and data[name] >= 0 for name in ints):
            return None
        rebuilt, broken, checked = data.get("rebuilt"), data.get("broken"), data.get("checked")
        return Totals(bytes=data["bytes"], entries=data["entries"], markers=data["markers"],
                      rebuilt=float(rebuilt) if isinstance(rebuilt, (int, float)) else 0.0,
                      broken=broken if type(broken) is int else None,
                      checked=float(checked) if isinstance(checked, (int, float)) else 0.0,
                      gen=data["gen"], offset=data["offset"])

    def _write_summary(self, totals: Totals) -> None:
        atomic_write_bytes(self.root / _SUMMARY, json.dumps({
            "format": _FORMAT, "gen": totals.gen, "offset": totals.offset, "bytes": totals.bytes,
            "entries": totals.entries, "markers": totals.markers, "rebuilt": totals.rebuilt,
            "broken": totals.broken, "checked": totals.checked}).encode())

    def create(self) -> None:
        """The summary of a new, empty cache: exact from the start. Never replaces one."""
        self.root.mkdir(exist_ok=True)
        tmp = self.root / f".{_SUMMARY}.{os.getpid()}.{uuid.uuid4().hex[:8]}.incomplete"
        try:
            tmp.write_bytes(json.dumps({"format": _FORMAT, "gen": 0, "offset": 0, "bytes": 0, "entries": 0,
                                        "markers": 0, "rebuilt": time.time(), "broken": None}).encode())
            with contextlib.suppress(FileExistsError):
                os.link(tmp, self.root / _SUMMARY)
        except OSError:
            pass  # no hard links here: the first rebuild writes it
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def totals(self) -> Totals | None:
        """The cache's totals now (O(1): the summary and at most ``FOLD_BYTES`` of lines);
        None when nothing knows them yet (no summary: the next rebuild makes one)."""
        if not os.path.lexists(self.root / _SUMMARY):
            return None  # a cache an earlier aioov wrote, or one being created
        lock = self._lock()
        lock.acquire(CHANGE_WAIT, shared=True)
        try:
            totals = self._read_summary()
            if totals is None:
                return None
            totals.pending = len(self._add_tail(totals))
        finally:
            lock.release()
        if totals.pending > FOLD_BYTES:
            self.fold()
        return totals

    def fold(self) -> None:
        """Fold the journal's lines into the summary's totals, unless someone holds the lock."""
        lock = self._lock()
        if not lock.try_acquire():
            return
        try:
            totals = self._read_summary()
            if totals is None:
                return
            totals.offset += len(self._add_tail(totals))
            self._write_summary(totals)
        finally:
            lock.release()

    def _add_tail(self, totals: Totals) -> bytes:
        """Add the journal's lines after the summary to ``totals``; the lines read."""
        tail = _read_lines(self._journal(totals.gen), totals.offset)
        for sign, size, marker, _key, _row in _records(tail, rows=False):
            totals.add(sign, size, marker)
        return tail

    # -- changes ----------------------------------------------------------------------------
    def journal(self) -> Journal:
        return Journal(self)

    # -- rows -------------------------------------------------------------------------------
    def rows(self) -> dict[str, Row] | None:
        """Every entry's row as recorded (no walk: an entry nobody recorded is missing, one
        removed by hand is listed), or None where there is no summary."""
        if not os.path.lexists(self.root / _SUMMARY):
            return None
        lock = self._lock()
        lock.acquire(CHANGE_WAIT, shared=True)
        try:
            totals = self._read_summary()
            if totals is None:
                return None
            return self._replay(totals.gen, None)
        finally:
            lock.release()

    def _replay(self, gen: int, end: int | None) -> dict[str, Row]:
        """Generation ``gen``'s catalog with its journal lines up to byte ``end`` applied."""
        rows: dict[str, Row] = {}
        try:
            catalog = load_json(read_regular(self._catalog(gen), _MAX_CATALOG))
        except (OSError, ValueError):
            catalog = None
        if isinstance(catalog, dict):
            for key, item in catalog.items():
                row = Row.load(item)
                if row is not None and _KEY.fullmatch(key):
                    rows[key] = row
        _apply(rows, _read_lines(self._journal(gen), 0, end))
        return rows

    # -- rebuild ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def rebuilding(self, wait: float = 0.0) -> Iterator[bool]:
        """Hold ``rebuild.lock`` (one rebuilder per cache); yields False when someone else holds
        it past ``wait`` seconds."""
        self.root.mkdir(exist_ok=True)  # a cache an earlier aioov wrote has no .usage yet
        lock = KeyLock(self.root / "rebuild.lock")
        try:
            if wait:
                lock.acquire(wait)
            held = lock.held or lock.try_acquire()
        except LockTimeout:
            held = False
        try:
            yield held
        finally:
            lock.release()

    def rebuild(self, walk: Callable[[Mapping[str, Row]], dict[str, Row]], *,
                broken: Callable[[], int | None] = lambda: None) -> dict[str, Row] | None:
        """A new generation from ``walk(known rows)`` (the entries present, with their rows),
        made exact with the lines appended meanwhile; call it inside ``rebuilding()``.
        ``broken()``: the bad entries the walk found, where it checked them all (None: the
        last check's count is kept). The rows committed, or None where the commit could not
        have the lock (then nothing changed)."""
        lock = self._lock()
        lock.acquire(COMMIT_WAIT, shared=True)
        try:
            before = self._read_summary()
            end = len(_read_lines(self._journal(before.gen), 0)) if before is not None else 0
        finally:
            lock.release()
        present = walk(self._replay(before.gen, end) if before is not None else {})
        gen = (before.gen if before is not None else 0) + 1
        _write_catalog(self._catalog(gen), present)
        if not _acquire_soon(lock, COMMIT_WAIT):
            return None
        try:
            now = self._read_summary() or before
            if now is None:
                tail = b""
            elif before is not None and now.gen == before.gen:
                tail = _read_lines(self._journal(now.gen), end)
            else:  # a summary was created meanwhile: all its lines are news to the walk
                tail = _read_lines(self._journal(now.gen), 0)
            if now is not None and now.gen + 1 != gen:
                gen = now.gen + 1
                _write_catalog(self._catalog(gen), present)
            final = dict(present)
            _apply(final, tail)
            found = broken()
            totals = Totals(rebuilt=time.time(), gen=gen, offset=len(tail), broken=found,
                            checked=time.time() if found is not None else 0.0)
            if found is None and now is not None:
                totals.broken, totals.checked = now.broken, now.checked
            for row in final.values():
                totals.add(1, row.size, row.marker)
            atomic_write_bytes(self._journal(gen), tail)  # lines already in the totals: offset
            self._write_summary(totals)  # the commit
        finally:
            lock.release()
        self._remove_other_generations(gen)
        return final

    def _remove_other_generations(self, gen: int) -> None:
        keep = {self._journal(gen).name, self._catalog(gen).name}
        for path in _listing(self.root):
            if path.name.startswith(("journal.", "catalog.")) and path.name not in keep:
                with contextlib.suppress(OSError):
                    path.unlink()


class Journal:
    """Changes to the cache and their lines: ``with journal.change():`` holds the shared lock
    around one change (a rename into or out of the tree) and its ``added``/``removed`` line.
    A batch (prune, clear) keeps the lock from one change to the next, letting go every
    ``HOLD_FOR`` seconds; ``close()`` ends it. Nothing is recorded where there is no summary,
    or the lock or the journal cannot be had: the next rebuild counts what was missed."""

    def __init__(self, usage: Usage) -> None:
        self._usage = usage
        self._lock: KeyLock | None = None
        self._fd: int | None = None
        self._until = 0.0

    @contextlib.contextmanager
    def change(self) -> Iterator[Journal]:
        if self._lock is None or time.monotonic() > self._until:
            if self._lock is not None:
                self.close()
                time.sleep(_GAP)  # a commit or a fold polling for the lock gets in now
            self._open()
        yield self

    def _open(self) -> None:
        lock = self._usage._lock()
        try:
            lock.acquire(CHANGE_WAIT, shared=True)
        except (LockTimeout, OSError):
            return
        self._lock, self._until = lock, time.monotonic() + HOLD_FOR
        totals = self._usage._read_summary()
        if totals is None:
            return
        try:
            self._fd = nofollow_opener(str(self._usage._journal(totals.gen)), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        except OSError:
            self._fd = None

    def added(self, key: str, row: Row) -> None:
        self._write(f"+ {row.size} {int(row.marker)} {key} {json.dumps(row.dump(), separators=(',', ':'))}")

    def removed(self, key: str, size: int, marker: bool) -> None:
        self._write(f"- {size} {int(marker)} {key}")

    def _write(self, line: str) -> None:
        if self._fd is None:
            return
        # A line of its own even after one cut short (a full disk): that spoils only itself.
        with contextlib.suppress(OSError):
            os.write(self._fd, f"\n{line}\n".encode())

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- lines ------------------------------------------------------------------------------------


def _cut(text: str | None) -> str | None:
    return text if text is None or len(text) <= TEXT_MAX else text[:TEXT_MAX] + "…"


def _read_lines(path: Path, start: int, end: int | None = None) -> bytes:
    """The complete lines of ``path`` from byte ``start`` (to ``end``): a line still being
    written, or one cut short for good, has no newline yet and is left for later."""
    try:
        with open(path, "rb", opener=nofollow_opener) as file:
            file.seek(start)
            data = file.read() if end is None else file.read(max(0, end - start))
    except FileNotFoundError:
        return b""
    return data[: data.rfind(b"\n") + 1]


def _records(data: bytes, *, rows: bool) -> Iterator[tuple[int, int, bool, str, Row | None]]:
    """(sign, bytes, marker, key, row) of each well-formed line (the row only with ``rows``);
    anything else is skipped."""
    for raw in data.split(b"\n"):
        if not raw:
            continue
        try:
            parts = raw.decode().split(" ", 4)
            op, size, marker, key = parts[0], int(parts[1]), parts[2] == "1", parts[3]
        except (UnicodeDecodeError, ValueError, IndexError):
            continue
        if op not in ("+", "-") or size < 0 or not _KEY.fullmatch(key):
            continue
        row = None
        if rows and op == "+":
            try:
                row = Row.load(json.loads(parts[4]))
            except (ValueError, IndexError, RecursionError):
                row = None
            if row is None:
                continue
        yield (1 if op == "+" else -1), size, marker, key, row


def _apply(rows: dict[str, Row], data: bytes) -> None:
    """Replay lines on ``rows`` by key: the last line of a key wins."""
    for sign, _size, _marker, key, row in _records(data, rows=True):
        if sign > 0 and row is not None:
            rows[key] = row
        else:
            rows.pop(key, None)


def _write_catalog(path: Path, rows: Mapping[str, Row]) -> None:
    atomic_write_bytes(path, json.dumps({key: row.dump() for key, row in rows.items()},
                                        separators=(",", ":")).encode())


def _acquire_soon(lock: KeyLock, timeout: float) -> bool:
    """The exclusive lock, polled often (holders of the shared one let go for a moment only)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if lock.try_acquire():
                return True
        except OSError:
            return False
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)


def _listing(folder: Path) -> list[Path]:
    try:
        with os.scandir(folder) as entries:
            return [Path(entry.path) for entry in entries]
    except OSError:
        return []
