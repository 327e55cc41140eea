"""The remote tier as one compile sees it: fetch into the local store, or claim, then share.

A compile that misses locally (holding the local key lock) asks its ``RemoteLink`` for the
entry. The link downloads it into the local store when a host has uploaded it; otherwise it
takes the hosts' lock (when a lock URL is set), looks once more, and from then on remembers
that what this host publishes must be uploaded. An entry this host rejected (damaged,
truncated, too large) is remembered too: the upload replaces it, once this host has a good one.

Every remote failure is counted, warned about once, and leaves the local path to carry on: the
remote tier never makes a compile fail. A tier or lock service that failed is then left alone
for a while (``remote.Breaker``): a silent endpoint costs one deadline per cooldown, not one
per compile.

A download runs beside the compile that wants it (``_Download``), which waits for it no longer
than compiling the model took where its entry was written (the manifest's ``export_seconds``,
at least ``WAIT_FLOOR``; without one, the tier's own deadline): a slower download goes on in
the background and fills the local cache for later, while the model is compiled here; how it
ends is dealt with as if it had been waited for (a failure opens the breaker, a rejected entry
is said once). A manifest that does not come within the tier's deadline and a second counts
as a failure of the tier.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._errors import Cancelled, EntryError, RemoteError
from . import remote as tier
from .remote import MacKeys, RemoteEntryError, RemoteLock, RemoteTier, breaker_for, remote_for
from .stats import CacheEvents
from .store import CacheStore

__all__ = ("RemoteLink", "RemoteSettings")

logger = logging.getLogger("aioov.cache")

#: the least a compile waits for a download, however quick the model's compile was elsewhere
WAIT_FLOOR = 1.0
#: how much longer than the tier's own deadline a compile waits for a manifest (an S3 tier's
#: deadline ends the fetch first, saying why; a ``file://`` one has none)
_MANIFEST_GRACE = 1.0
_POLL = 0.05


@dataclass(frozen=True)
class RemoteSettings:
    url: str
    lock_url: str | None
    lock_ttl: float
    lock_timeout: float
    #: ``CACHE_HMAC_KEY``'s key, or a rotation's keys: an entry signed with any of them is used
    mac_key: bytes | tuple[bytes, ...] | None


class RemoteLink:
    """One compile's use of the remote tier; ``release`` gives the hosts' lock back."""

    def __init__(self, store: CacheStore, settings: RemoteSettings, events: CacheEvents) -> None:
        self._store = store
        self._settings = settings
        self._events = events
        self._remote: RemoteTier | None = None  # set once this host must upload what it compiles
        self._lock: RemoteLock | None = None
        self._bad: str | None = None  # the remote entry this host rejected
        self._repair = False  # ...which its upload replaces

    def fetch_or_claim(self, key: str, cancel: threading.Event) -> bool:
        """True when the entry is now in the local store (downloaded and verified)."""
        settings = self._settings
        if not self._allowed(settings.url):
            return False
        try:
            remote = remote_for(settings.url)
        except (RemoteError, ValueError) as exc:
            self._failed(settings.url, exc)
            return False
        found = self._look(remote, key, cancel)
        if found is not False:
            return bool(found)
        self._remote = remote  # whatever happens with the lock, what this host compiles is shared
        if settings.lock_url and self._allowed(settings.lock_url):
            try:
                lock = RemoteLock(settings.lock_url, key, settings.lock_ttl)
                acquired = lock.acquire(settings.lock_timeout, cancel=cancel)
            except (RemoteError, OSError) as exc:
                self._failed(settings.lock_url, exc)
                return False
            breaker_for(settings.lock_url).succeeded()
            if acquired:
                self._lock = lock
                # Another host may have uploaded (or repaired) while we waited for its lock.
                found = self._look(remote, key, cancel)
                if found is None:  # it has, but it is slow to come (or the tier failed): no upload
                    self._remote = None
                    self.release()
                return found is True
            if cancel.is_set():
                raise Cancelled()
        return False

    def share(self, key: str) -> None:
        """Upload the published local entry, when this host claimed it (replacing the remote
        entry it rejected); then give the hosts' lock back (other hosts waiting for it find
        the entry uploaded)."""
        remote = self._remote
        try:
            if remote is None or not self._allowed(remote.url):
                return
            replace = self._bad if self._repair else None
            entry = self._store.entry_path(key)
            # (``replace`` only when there is one: a RemoteTier written before it keeps working)
            uploaded = remote.upload(key, entry) if replace is None else remote.upload(key, entry, replace=replace)
        except RemoteError as exc:
            assert remote is not None
            breaker_for(remote.url).failed()
            self._events.failed(f"upload:{remote.url}", "aioov cache: upload to %s failed: %s", remote.url, exc)
        except OSError as exc:  # the local entry went away (pruned, cleared): nothing to share
            assert remote is not None
            self._events.failed(f"upload:{remote.url}", "aioov cache: upload to %s failed: %s", remote.url, exc)
        else:
            breaker_for(remote.url).succeeded()
            if uploaded:
                self._events.count(uploads=1)
                if replace is not None:
                    logger.info("aioov cache: replaced the damaged remote entry %s at %s", key[:16], remote.url)
        finally:
            self.release()

    def release(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None and self._settings.lock_url and not breaker_for(self._settings.lock_url).open:
            lock.release()  # (an unreachable Redis is not waited for: the lease expires by itself)

    def _look(self, remote: RemoteTier, key: str, cancel: threading.Event) -> bool | None:
        """Fetch: True when the entry is now local, False when the remote has none this host
        can use (absent, or rejected: then remembered for repair), None when it failed or is
        still downloading (in the background, for later compiles: this one compiles)."""
        download = _Download(remote, key, self._store, self._settings.mac_key, self._bad,
                             late=lambda done: self._outcome(remote, key, done))
        try:
            download.start()
        except RuntimeError:  # a thread limit: the download is waited for, within its own deadline
            download.run()
        if not download.wait(cancel):
            if not download.listed.is_set():
                waited = tier.DEADLINE_BASE + _MANIFEST_GRACE
                self._failed(remote.url, TimeoutError(f"no manifest of {key[:16]} in {waited:.0f} s"))
            else:
                logger.info("aioov cache: the download of %s from %s takes longer than its compile (%.1f s); "
                            "compiling it here, the download goes on for later compiles", key[:16], remote.url,
                            download.budget)
            return None
        return self._outcome(remote, key, download)

    def _outcome(self, remote: RemoteTier, key: str, download: _Download) -> bool | None:
        """What became of ``download`` (one waited for, or one that ended after the compile
        stopped waiting: then only the breaker, the counters and the warnings hear of it)."""
        try:
            if download.error is not None:
                raise download.error
            fetched = download.fetched
        except RemoteEntryError as exc:
            breaker_for(remote.url).succeeded()  # it answered: the entry is bad, not the tier
            self._bad, self._repair = exc.bad, exc.repair and exc.bad is not None
            self._events.failed(
                f"entry:{remote.url}:{key}", "aioov cache: remote entry %s at %s rejected (%s); compiling it%s",
                key[:16], remote.url, exc, " and replacing it" if self._repair else "")
            return False
        except RemoteError as exc:
            self._failed(remote.url, exc)
            return None
        except (EntryError, OSError) as exc:  # the local cache's trouble (a full disk...), not the tier's
            self._events.failed(f"fetch:{remote.url}", "aioov cache: could not store an entry from %s: %s",
                                remote.url, exc)
            return None
        breaker_for(remote.url).succeeded()
        if fetched:
            self._events.count(remote_hits=1)
        return fetched

    def _allowed(self, url: str) -> bool:
        if breaker_for(url).allow():
            return True
        logger.debug("aioov cache: %s failed recently; not tried for this compile", url)
        return False

    def _failed(self, url: str, exc: Exception) -> None:
        breaker_for(url).failed()
        self._events.failed(f"remote:{url}", "aioov cache: remote %s unusable (%s); using the local cache only, "
                            "trying it again in %.0f s", url, exc, tier.BREAKER_COOLDOWN)


class _Download(threading.Thread):
    """One fetch of a remote entry, beside the compile that wants it: ``wait`` says whether it
    ended in time; one that did not goes on, publishes into the local store for later compiles
    (a publish is first come, first served: this host's own entry may come first), and hands
    itself to ``late`` when it ends."""

    def __init__(self, remote: RemoteTier, key: str, store: CacheStore, mac_key: MacKeys, bad: str | None,
                 late: Callable[[_Download], object]) -> None:
        super().__init__(name="aioov-remote-fetch", daemon=True)
        self._remote, self._key, self._store, self._mac_key, self._bad = remote, key, store, mac_key, bad
        self._late = late
        self._state = threading.Lock()
        self._abandoned = False
        self.listed = threading.Event()  # the manifest is in: ``budget`` is known
        self.done = threading.Event()
        #: how long the files are waited for once the manifest is in: the model's compile where
        #: the entry was written, at most the tier's own deadline for them (which it is without one)
        self.budget = tier.DEADLINE_BASE
        self.fetched = False
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self.fetched = self._remote.fetch(self._key, self._store, mac_key=self._mac_key, bad=self._bad,
                                              listed=self._listed)
        except BaseException as exc:  # noqa: BLE001 - handed to the compile that waits, or to ``late``
            self.error = exc
        finally:
            with self._state:
                self.done.set()
                self.listed.set()
                late = self._abandoned
            if late:
                try:
                    self._late(self)
                except Exception:  # noqa: BLE001 - a background thread: nobody to raise to
                    logger.exception("aioov cache: a background download from %s", self._remote.url)

    def _listed(self, manifest: dict[str, Any], size: int) -> None:
        limit = tier.transfer_deadline(size)
        build = manifest.get("build")
        seconds = build.get("export_seconds") if isinstance(build, dict) else None
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and math.isfinite(seconds):
            self.budget = min(limit, max(WAIT_FLOOR, float(seconds)))
        else:
            self.budget = limit
        self.listed.set()

    def wait(self, cancel: threading.Event) -> bool:
        """Whether the fetch ended: its manifest within the tier's deadline and a second, its
        files within ``budget`` after that; if not, it is left to end by itself (``late``).
        Raises Cancelled (the fetch, too, is left)."""
        ended = False
        try:
            ended = (self._until(self.listed, tier.DEADLINE_BASE + _MANIFEST_GRACE, cancel)
                     and self._until(self.done, self.budget, cancel))
        finally:
            with self._state:
                ended = ended or self.done.is_set()  # (ended just now: its outcome is the caller's)
                self._abandoned = not ended
        return ended

    @staticmethod
    def _until(event: threading.Event, seconds: float, cancel: threading.Event) -> bool:
        deadline = time.monotonic() + seconds
        while not event.wait(max(0.0, min(_POLL, deadline - time.monotonic()))):
            if cancel.is_set():
                raise Cancelled()
            if time.monotonic() >= deadline:
                return False
        return True
