"""Verification stamps: an entry's checksums are verified once per host and file identity.

Hashing the 775 MB weights of a prepacked BERT-base takes 70–80 ms on 2 cores: most of what a
fresh process's hit costs, on every start. A process that has verified an entry leaves a stamp
in it (``.verified``): each file's identity (size, mtime, ctime, inode, device) and recorded
digest as they were when the checksums matched. A later process that finds its files with those
very identities skips the hashing, as git's index skips unchanged files: any write to a file,
a ``touch`` or a copy over it, changes its ctime, which no unprivileged process can set back.

What a stamp cannot see is the disk itself flipping bits after the check, so it expires after
``MAX_AGE`` (the next process verifies again and renews it), and ``aioov cache verify`` never
reads stamps. Files changed within ``SETTLE`` seconds are not stamped: a rewrite inside one
timestamp tick could keep their identity. Stamps are hints: anything wrong with one, and on
platforms where ``st_ctime`` is not the change time (Windows), the entry is simply verified.
"""

from __future__ import annotations

import json
import os
import stat
import time
from typing import Any

from .fsutil import atomic_write_bytes, load_json, read_regular
from .layout import STAMP
from .records import Entry

__all__ = ("MAX_AGE", "STAMP", "Identities", "identities", "stamp", "stamped")

#: seconds after which a stamp no longer spares the checksums
MAX_AGE = 24 * 3600.0
#: files changed this recently are not stamped (timestamps have a granularity)
SETTLE = 2.0

_MAX_STAMP_BYTES = 1 << 16
_USABLE = os.name == "posix"


#: name → [size, mtime_ns, ctime_ns, inode, device, recorded digest] of each file of an entry
Identities = dict[str, list[Any]]


def identities(entry: Entry) -> Identities | None:
    """What its files are now: any write to one changes its ctime (and usually more). None when
    a file is missing or not a regular file."""
    files: Identities = {}
    try:
        for name, record in sorted(entry.files.items()):
            st = os.lstat(entry.file(name))
            if not stat.S_ISREG(st.st_mode):
                return None
            files[name] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev, record.get("xxh3_128")]
    except OSError:
        return None
    return files


def stamped(entry: Entry, files: Identities) -> bool:
    """Whether a stamp says ``entry``'s files, as ``files`` (``identities``) has them now, are
    those that were verified, recently enough."""
    if not _USABLE:
        return False
    try:
        data = load_json(read_regular(entry.path / STAMP, _MAX_STAMP_BYTES))
        age = time.time() - float(data["verified_at"])
        return 0 <= age <= MAX_AGE and data["files"] == files
    except (OSError, ValueError, KeyError, TypeError):
        return False


def stamp(entry: Entry, files: Identities) -> None:
    """Record that ``entry``'s files, as ``files`` has them, passed their checksums. Best effort."""
    if not _USABLE:
        return
    now = time.time()
    if any(now - max(s[1], s[2]) / 1e9 < SETTLE for s in files.values()):
        return
    try:
        atomic_write_bytes(entry.path / STAMP, json.dumps({"verified_at": now, "files": files}).encode())
    except OSError:
        pass  # a read-only cache: verified again next time
