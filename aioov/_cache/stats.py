"""What a Core's cache did: counters (``Core.cache_stats``) and warnings said once.

One ``CacheEvents`` per Core is handed down to every part of the compile path that can
count or warn, so that no part has to reach back up for them.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass

from .._concurrency import renew_in_children

__all__ = ("CacheEvents", "CacheStats")

logger = logging.getLogger("aioov")


@dataclass
class CacheStats:
    """Counters of this process's cache activity (``Core.cache_stats``)."""

    hits: int = 0  # compiles answered from the cache
    misses: int = 0  # cacheable compiles that found no entry
    compiles: int = 0  # sessions built from the source model (cached or not)
    exports: int = 0  # entries published
    corrupt: int = 0  # entries found broken and discarded
    lock_waits: int = 0  # misses that found another process compiling and waited
    lock_timeouts: int = 0  # waits that gave up and compiled uncached
    errors: int = 0  # cache operations that failed (disk full, read-only...) and were skipped
    remote_hits: int = 0  # entries downloaded from the remote tier
    uploads: int = 0  # entries uploaded to the remote tier
    pruned: int = 0  # entries removed to keep CACHE_MAX_SIZE

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class CacheEvents:
    """Thread-safe counters plus warn-once logging: a failing cache directory logs one
    warning per process and topic, then only debug lines."""

    def __init__(self) -> None:
        self._stats = CacheStats()
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        renew_in_children(self)

    def _renew_in_child(self) -> None:
        self._lock = threading.Lock()

    def count(self, **increments: int) -> None:
        with self._lock:
            for name, value in increments.items():
                setattr(self._stats, name, getattr(self._stats, name) + value)

    def snapshot(self) -> CacheStats:
        with self._lock:
            return CacheStats(**self._stats.as_dict())

    def warn_once(self, topic: str, message: str, *args: object) -> None:
        with self._lock:
            first = topic not in self._warned
            self._warned.add(topic)
        (logger.warning if first else logger.debug)(message, *args)

    def unwritable(self, root: object, exc: OSError) -> None:
        """The cache directory refused a write: the model is served, not cached."""
        self.failed(f"write:{root}", "aioov cache: cannot write to %s (%s); the model is compiled but not cached",
                    root, exc)

    def failed(self, topic: str, message: str, *args: object) -> None:
        """A cache operation failed and was skipped: count it, say it once."""
        self.count(errors=1)
        self.warn_once(topic, message, *args)
