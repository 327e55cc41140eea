"""Cache keys: a content digest of the model, and a key over everything that shapes the blob.

The model digest is blake3 over the model file and each external-data file it
references (name, size, bytes), streamed from a memory map. blake3 hashes
435 MB in ~0.04 s here on 2 cores (sha256: ~0.3 s). A small stat index maps
(absolute path, size, mtime_ns, ctime_ns, inode, device) of the model and of
its external files to that digest, so that a warm ``compile_model(path)`` neither
reads nor hashes the model; any mismatch falls back to hashing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import blake3

from . import hashing
from .auth import NOT_MINE, as_keys
from .fsutil import atomic_write_bytes, children, load_json, read_regular
from .layout import FORMAT_VERSION

__all__ = (
    "FORMAT_VERSION", "FileStat", "StatIndex", "cache_key", "digest_bytes", "digest_files", "path_digest", "unchanged",
)

#: a MAC key, or a rotation's keys (``CACHE_HMAC_KEY``): the first signs, any verifies
Keys = bytes | tuple[bytes, ...] | None


@dataclass(frozen=True)
class FileStat:
    path: str
    size: int
    mtime_ns: int
    #: a file rewritten in place with another of the same size keeps its mtime where the tool
    #: sets it (``cp -p``, ``rsync -a --inplace``, tar, Nix's normalized 1 s); its ctime changes
    ctime_ns: int
    ino: int
    dev: int
    #: when this stat was taken (not part of what is compared)
    taken_ns: int = field(default=0, compare=False)

    @classmethod
    def of(cls, path: str) -> FileStat:
        taken = time.time_ns()
        st = os.stat(path)
        return cls(path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev, taken)

    def changed(self) -> bool:
        """Whether the file at ``path`` is no longer this one (OSError where it cannot be seen)."""
        return FileStat.of(self.path) != self

    @property
    def settled(self) -> bool:
        """Whether any later change of the file shows in its stat. Not where its timestamps are
        whole seconds (ext3, HFS+, FAT's 2 s, some NFS servers) and it changed within such a
        tick of this stat: a change in the same tick leaves every field as it was, and only
        hashing the file again tells (git's "racily clean" index entries)."""
        whole = self.mtime_ns % 1_000_000_000 == 0 and self.ctime_ns % 1_000_000_000 == 0
        return not whole or max(self.mtime_ns, self.ctime_ns) < self.taken_ns - _COARSE_TICK_NS


#: the longest timestamp tick of a common filesystem (FAT's)
_COARSE_TICK_NS = 2_000_000_000


def unchanged(stats: Sequence[FileStat], digest: str) -> bool:
    """Whether the files are still those ``stats`` describe, whose content hashed to ``digest``:
    compared by stat, and hashed again where a stat cannot tell (``FileStat.settled``).
    Raises OSError where a file cannot be read."""
    if any(s.changed() for s in stats):
        return False
    return all(s.settled for s in stats) or digest_files([s.path for s in stats]) == digest


def digest_files(paths: Sequence[str]) -> str:
    """blake3 over (name, size, content) of each file, the model first."""
    hasher = hashing.hasher()
    for index, path in enumerate(paths):
        size = os.path.getsize(path)
        name = os.path.basename(path) if index else ""
        hasher.update(f"{index}\0{name}\0{size}\0".encode())
        if size:
            hasher.update_mmap(path)
    return hasher.hexdigest()


def digest_bytes(data: bytes) -> str:
    hasher = hashing.hasher()
    hasher.update(f"0\0\0{len(data)}\0".encode())
    hasher.update(data)
    return hasher.hexdigest()


def cache_key(inputs: dict[str, Any]) -> str:
    """The entry key: blake3 over the canonical JSON of every input that shapes the blob."""
    canonical = json.dumps({"format": FORMAT_VERSION, **inputs}, sort_keys=True, separators=(",", ":"))
    return blake3.blake3(canonical.encode()).hexdigest()


def path_digest(path: str) -> str:
    """A short, file-name-safe name for a model path (its stat index record, its hash lock)."""
    return hashlib.blake2b(path.encode(), digest_size=16).hexdigest()


class StatIndex:
    """``CACHE_DIR/v1/.index/<hash of path>.json``: file identity → model digest.

    A file rewritten with the same size inside one timestamp tick keeps its stat
    (git's "racily clean" entries): stats taken within a whole-second tick of the
    file's last change are not recorded (``FileStat.settled``).
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def _file(self, path: str) -> Path:
        return self.root / f"{path_digest(path)}.json"

    def lookup(self, path: str, mac_key: Keys = None) -> tuple[str, list[FileStat]] | None:
        """(digest, stats of the model and its external files) when none of them changed.
        With ``mac_key`` (``CACHE_HMAC_KEY``: a key, or a rotation's keys), only a record one of
        the keys signed counts: a forged record could otherwise map one model's file to another
        model's entry. A record signed with an older key of a rotation is used as it is, not
        signed anew: processes that hold only that key keep reading it too."""
        try:
            record = load_json(read_regular(self._file(path), _MAX_RECORD_BYTES))
            keys = as_keys(mac_key)
            if keys and _signer(record, keys) is None:
                return None
            files = [FileStat(**item) for item in record["files"]]
            if not files or files[0].path != path:
                return None
            if any(recorded.changed() for recorded in files):
                return None
            return str(record["digest"]), files
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def store(self, stats: Sequence[FileStat], digest: str, mac_key: Keys = None) -> None:
        """Write the record, signed with ``mac_key`` (of a rotation's keys, the first); not for
        stats that cannot show a later change (``FileStat.settled``): those files are hashed
        again next time."""
        if not all(s.settled for s in stats):
            return
        record: dict[str, Any] = {"digest": digest, "files": [asdict(s) for s in stats]}
        keys = as_keys(mac_key)
        if keys:
            record["mac"] = _record_mac(record, keys[0])
        atomic_write_bytes(self._file(stats[0].path), json.dumps(record).encode())

    def records(self) -> list[Path]:
        return [p for p in children(self.root) if p.suffix == ".json"]

    def check(self, record: Path, mac_key: bytes | tuple[bytes, ...]) -> bool:
        """Whether a record file is well formed and signed with ``mac_key`` (or one of a rotation's)."""
        return self.judge(record, mac_key) is None

    def judge(self, record: Path, mac_key: bytes | tuple[bytes, ...]) -> str | None:
        """The problem with a record file under ``mac_key`` (a key or a rotation's keys), or None.
        ``auth.NOT_MINE`` for a record signed under none of the keys: another key's, during a
        rotation, or forged (a MAC cannot tell them apart), so not for this process to delete."""
        try:
            data = load_json(read_regular(record, _MAX_RECORD_BYTES))
            if not isinstance(data, dict):
                return "stat index record is malformed"
            if not isinstance(data.get("mac"), str):
                return "stat index record is not signed"
            return None if _signer(data, as_keys(mac_key)) is not None else NOT_MINE
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            return f"stat index record is unreadable or malformed: {exc}"


#: a stat index record lists a model and its external files: small
_MAX_RECORD_BYTES = 1 << 20


def _record_mac(record: dict[str, Any], key: bytes) -> str:
    body = json.dumps({k: v for k, v in record.items() if k != "mac"}, sort_keys=True, separators=(",", ":"))
    return blake3.blake3(body.encode(), key=key).hexdigest()


def _signer(record: dict[str, Any], keys: tuple[bytes, ...]) -> bytes | None:
    """The key among ``keys`` that signed the record, or None."""
    claimed = str(record.get("mac", ""))
    return next((k for k in keys if hmac.compare_digest(claimed, _record_mac(record, k))), None)
