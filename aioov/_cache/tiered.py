"""The remote tier as one compile sees it: fetch into the local store, or claim, then share.

A compile that misses locally (holding the local key lock) asks its ``RemoteLink`` for the
entry. The link downloads it into the local store when a host has uploaded it; otherwise it
takes the hosts' lock (when a lock URL is set), looks once more, and from then on remembers
that what this host publishes must be uploaded. Every remote failure is counted, warned about
once, and leaves the local path to carry on: the remote tier never makes a compile fail.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from .._errors import Cancelled, EntryError, RemoteError
from .remote import RemoteLock, RemoteTier, remote_for
from .stats import CacheEvents
from .store import CacheStore

__all__ = ("RemoteLink", "RemoteSettings")


@dataclass(frozen=True)
class RemoteSettings:
    url: str
    lock_url: str | None
    lock_ttl: float
    lock_timeout: float
    mac_key: bytes | None


class RemoteLink:
    """One compile's use of the remote tier; ``release`` gives the hosts' lock back."""

    def __init__(self, store: CacheStore, settings: RemoteSettings, events: CacheEvents) -> None:
        self._store = store
        self._settings = settings
        self._events = events
        self._remote: RemoteTier | None = None  # set once this host must upload what it compiles
        self._lock: RemoteLock | None = None

    def fetch_or_claim(self, key: str, cancel: threading.Event) -> bool:
        """True when the entry is now in the local store (downloaded and verified)."""
        settings = self._settings
        try:
            remote = remote_for(settings.url)
            if self._fetch(remote, key):
                return True
        except (RemoteError, ValueError, EntryError, OSError) as exc:
            self._failed(settings.url, exc)
            return False
        self._remote = remote  # whatever happens with the lock, what this host compiles is shared
        if settings.lock_url:
            try:
                lock = RemoteLock(settings.lock_url, key, settings.lock_ttl)
                if lock.acquire(settings.lock_timeout, cancel=cancel):
                    self._lock = lock
                    # Another host may have uploaded while we waited for its lock.
                    return self._fetch(remote, key)
                if cancel.is_set():
                    raise Cancelled()
            except (RemoteError, EntryError, OSError) as exc:
                self._failed(settings.lock_url, exc)
        return False

    def share(self, key: str) -> None:
        """Upload the published local entry, when this host claimed it; then give the hosts'
        lock back (other hosts waiting for it find the entry uploaded)."""
        try:
            if self._remote is not None and self._remote.upload(key, self._store.entry_path(key)):
                self._events.count(uploads=1)
        except (RemoteError, OSError) as exc:
            assert self._remote is not None
            self._events.failed(f"upload:{self._remote.url}", "aioov cache: upload to %s failed: %s",
                                self._remote.url, exc)
        finally:
            self.release()

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _fetch(self, remote: RemoteTier, key: str) -> bool:
        if remote.fetch(key, self._store, mac_key=self._settings.mac_key):
            self._events.count(remote_hits=1)
            return True
        return False

    def _failed(self, url: str, exc: Exception) -> None:
        self._events.failed(f"remote:{url}", "aioov cache: remote %s unusable (%s); using the local cache only",
                            url, exc)
