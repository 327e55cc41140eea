"""What the store hands out: an entry it read, and what ``scan`` found (plain data)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ("Bookkeeping", "CacheInfo", "Entry", "EntryInfo", "Pruned")


@dataclass
class Entry:
    key: str
    path: Path
    manifest: dict[str, Any]

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return self.manifest["files"]  # type: ignore[no-any-return]

    def file(self, name: str) -> Path:
        return self.path / name


@dataclass(frozen=True)
class EntryInfo:
    """One entry as ``scan`` sees it (for ``aioov cache ls`` and pruning)."""

    key: str
    path: Path
    size: int
    created: float
    last_used: float
    device: str
    source: str | None
    problem: str | None = None
    #: a not-cacheable marker, not an entry: why this model could not be cached here
    not_cacheable: str | None = None
    #: how the entry's blob was checked before it was published ("ran and matched", "load only")
    check: str | None = None
    #: how the blob was written ("plain", "prepacked", "basic"...)
    variant: str | None = None
    #: the model's content digest (what its stat index records map its paths to)
    model: str | None = None
    #: why a better variant of its blob was not published for want of disk room (a full disk,
    #: a quota, a file size limit): pruning removes such an entry after a while, where the disk
    #: has room again, and the next compile tries the better variant again
    short_of_room: str | None = None


@dataclass
class CacheInfo:
    """What ``CacheStore.scan`` found: entries (least recently used first) and leftovers."""

    root: Path
    entries: list[EntryInfo] = field(default_factory=list)
    incomplete: list[Path] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Bytes used by all entries."""
        return sum(e.size for e in self.entries)


class Pruned(list[EntryInfo]):
    """What ``CacheStore.prune`` removed (or, with ``dry_run``, would remove): a list of the
    entries, and in ``failed`` those it chose but could not remove, each with the reason."""

    def __init__(self, removed: Iterable[EntryInfo] = (), failed: Iterable[tuple[EntryInfo, str]] = ()) -> None:
        super().__init__(removed)
        self.failed: list[tuple[EntryInfo, str]] = list(failed)
        #: the bookkeeping files removed with the entries, or because their entry was gone
        self.collected = Bookkeeping()


@dataclass
class Bookkeeping:
    """Files the cache keeps beside its entries (``CacheStore.bookkeeping`` counts them,
    ``CacheStore.collect`` says what it removed): per-key lock files, hash locks (held while a
    model file is hashed), stat index records and size markers, crash-sentinel folders, and
    temporary directories."""

    key_locks: int = 0
    hash_locks: int = 0
    index_records: int = 0
    size_markers: int = 0
    run_folders: int = 0
    temp_dirs: int = 0

    @property
    def files(self) -> int:
        return (self.key_locks + self.hash_locks + self.index_records + self.size_markers + self.run_folders
                + self.temp_dirs)

    def as_dict(self) -> dict[str, int]:
        return {"key_locks": self.key_locks, "hash_locks": self.hash_locks, "index_records": self.index_records,
                "size_markers": self.size_markers, "run_folders": self.run_folders, "temp_dirs": self.temp_dirs}
