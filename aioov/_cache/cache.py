"""The cache as a compile sees it: one door to the on-disk protocol.

A compile asks four things of its cache, in this order, and nothing else:

- ``identify``: the content digest of the model's files (the stat index, or blake3 under the
  file's hash lock, so that workers starting together read the gigabytes once);
- ``find``: the entry for a key, checked as far as it can be without loading it (MACs,
  not-cacheable markers, the build record, crashes seen at new input shapes), held shared
  while the caller loads it (``Found``: its checksums run beside the load; ``bad`` quarantines,
  ``served`` stamps and touches it);
- ``claim``: the key's exclusive lock, waited for while its holder shows signs of life
  (``Claim``: publish an entry or a marker, give the lock back, hand the upload on);
- ``retire``: drop a marker that another aioov, or another limit, decided.

Everything a compile must not know lives behind these: the store's tree, lock files, the
stat index, stamps, sentinels, heartbeats, MACs, the remote tier, the cache's users.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .._concurrency import CancelToken
from .._errors import Cancelled, LockBusy, LockTimeout, ModelReadError
from .._version import __version__
from . import auth, heartbeat
from .export import ABANDON_WAIT, Exporter
from .fsutil import distrust
from .heartbeat import Heartbeats, Progress
from .key import FileStat, cache_key, digest_files, unchanged
from .layout import NOT_CACHEABLE, NOT_WORTH, TOO_BIG
from .locks import KeyLock
from .peers import Presence
from .records import Entry
from .sentinel import ShapeGuard
from .stamps import Identities, identities, stamp, stamped
from .stats import CacheEvents, CacheStats
from .store import CacheStore
from .tiered import RemoteLink, RemoteSettings

__all__ = (
    "ABANDON_WAIT",
    "NOT_WORTH",
    "TOO_BIG",
    "Cache",
    "CacheEvents",
    "CacheStats",
    "Chore",
    "Claim",
    "Exporter",
    "FileStat",
    "Found",
    "NotCacheable",
    "Rules",
    "ShapeGuard",
    "SourceChanged",
    "Stalled",
    "cache_key",
)

logger = logging.getLogger("aioov")

Secret = bytes | tuple[bytes, ...] | None


@dataclass(frozen=True)
class Rules:
    """What one compile's properties ask of the cache."""

    #: ``CACHE_VERIFY``: FULL (checksums), SIZE or OFF
    verify: str = "FULL"
    hmac_key: Secret = None
    #: ``CACHE_MAX_SIZE`` in bytes (0: none)
    max_size: int = 0
    lock_timeout: float = 60.0
    #: ``CACHE_REMOTE_URL``, ``CACHE_REMOTE_LOCK_URL``, ``CACHE_REMOTE_LOCK_TTL``
    remote_url: str | None = None
    remote_lock_url: str | None = None
    remote_lock_ttl: float = 0.0
    #: the model, as messages name it
    name: str = "the model"

    @property
    def mac_key(self) -> bytes | None:
        """The key new entries are signed with (the first of a rotation)."""
        return auth.key_of(self.hmac_key)

    @property
    def mac_keys(self) -> tuple[bytes, ...]:
        """Every key an entry or stat index record of this process may be signed with (a
        rotation's, the signing one first); empty without ``CACHE_HMAC_KEY``."""
        return auth.keys_of(self.hmac_key)

    @property
    def remote(self) -> RemoteSettings | None:
        if not self.remote_url:
            return None
        return RemoteSettings(self.remote_url, self.remote_lock_url, self.remote_lock_ttl, self.lock_timeout,
                              self.mac_keys or None)


@dataclass(frozen=True)
class NotCacheable:
    """The key's entry is a marker: this model's blobs failed their checks here, or (``worth``
    False) a hit would not load it sooner than a compile; ``stale``: a decision of another
    aioov, to be made again."""

    reason: str
    worth: bool = True
    stale: bool = False
    #: the entry is signed with a ``CACHE_HMAC_KEY`` this process does not have
    foreign: bool = False

    def describe(self) -> str:
        """What ``NOT_CACHED_REASON`` says."""
        if self.foreign:
            return f"not cached: {self.reason}"
        return f"not cacheable here: {self.reason}" if self.worth else f"not worth caching: {self.reason}"


_NOT_MINE = "its entry is signed with a CACHE_HMAC_KEY this process does not have (left as it is)"


@dataclass(frozen=True)
class Chore:
    """Work a publish leaves for the export worker: ``run(token)``, or ``drop()`` if it never runs.
    ``idle``: at the exports' low priority (local disk work); an upload is not (see ``export``)."""

    run: Callable[[CancelToken], None]
    drop: Callable[[], None]
    idle: bool = True


class SourceChanged(Exception):
    """The model's files changed since they were hashed: nothing is published under the key."""


class Stalled(Exception):
    """The key's lock is held by a process that shows no progress, or that compiled the model
    in less time than this wait has lasted: compile without waiting longer."""


class Cache:
    """One cache directory, for every compile of a Core."""

    def __init__(self, store: CacheStore, events: CacheEvents) -> None:
        self.store = store
        self.events = events
        self.presence = Presence(store.locks / "peers")
        self.beats = Heartbeats()
        self._verified: dict[Path, Identities] = {}  # entries checksummed here, as their files were

    @classmethod
    def open(cls, cache_dir: str, events: CacheEvents) -> Cache | None:
        """The cache at ``cache_dir``, created and tidied; read-only where it cannot be written
        (an image's baked cache still serves hits); None while it cannot be used at all."""
        store = CacheStore(cache_dir)
        store.on_discard = lambda key, reason: events.count(corrupt=1)
        try:
            store.ensure()
            store.clean_tmp()
        except OSError as exc:
            events.failed(f"dir:{cache_dir}", "aioov cache: cannot use %s (%s); compiling without the cache",
                          cache_dir, exc)
            # A tree with symlinks where directories belong serves nothing and receives nothing.
            try:
                store.check_tree()
            except OSError:
                return None
            if not (store.is_cache() and store.base.is_dir()):
                return None
        return cls(store, events)

    @property
    def root(self) -> Path:
        return self.store.root

    def gone(self) -> bool:
        """Whether the directory disappeared since it was opened."""
        return not self.store.base.is_dir()

    def refuses(self, rules: Rules) -> bool:
        """Whether this compile must do without the cache: too few file descriptors left, or a
        directory that others can write (unless entries prove who wrote them: MACs)."""
        if _descriptors_scarce():
            # Each compile through the cache holds a lock file open until its entry is published,
            # and a builder's pipes: near the limit the cache would make compiles fail.
            self.events.failed("fds", "aioov cache: few file descriptors left (ulimit -n); compiling without the cache")
            return True
        if rules.hmac_key:
            return False
        problem = distrust(self.store.root) or distrust(self.store.base)
        if problem is not None:
            self.events.failed(f"trust:{self.store.root}", "aioov cache: not using %s: %s (anyone who can write "
                               "it decides what is served; chown it, or set CACHE_HMAC_KEY)", self.store.root, problem)
            return True
        return False

    # -- the model's identity ------------------------------------------------------------------

    def identify(
        self, path: str, files_of: Callable[[str], list[str]], rules: Rules, *, wait: float | None,
        cancel: threading.Event,
    ) -> tuple[list[FileStat], str]:
        """(file stats, content digest) of the model at ``path`` and its ``files_of(path)``,
        from the stat index when it can; else the files are hashed.

        Hashed once per cache: workers starting together would otherwise all read the same
        gigabytes at once. A process finding the file's hash lock held waits for the record
        its holder writes, or (``wait`` None: bulk loads) raises ``LockBusy`` to come back later.
        Raises OSError when the files cannot be read."""
        mac_keys = rules.mac_keys  # a record signed with any key of a rotation is used
        hit = self.store.index.lookup(path, mac_keys)
        if hit is not None:
            digest, stats = hit  # just compared with the files on disk
            return stats, digest
        lock = self.store.hash_lock(path)
        try:  # released however this ends (it once stayed held after reading the holder's record)
            try:
                if not lock.try_acquire():
                    if wait is None:
                        raise LockBusy(path)
                    lock.acquire(wait, cancel=cancel)
                    hit = self.store.index.lookup(path, mac_keys)
                    if hit is not None:
                        digest, stats = hit
                        return stats, digest
            except (LockTimeout, OSError):
                pass  # no coordination here: hash it anyway
            files = [path, *files_of(path)]
            stats = [FileStat.of(p) for p in files]
            digest = digest_files(files)
            if [FileStat.of(s.path) for s in stats] != stats:
                raise ModelReadError(f"{path} changed while it was being hashed")
            self.remember(stats, digest, rules)  # before the lock goes: waiters read it
            return stats, digest
        finally:
            lock.release()

    def remember(self, stats: list[FileStat], digest: str, rules: Rules) -> None:
        """Record the digest of files hashed elsewhere (a ``Model``'s)."""
        try:
            self.store.index.store(stats, digest, rules.mac_key)
        except OSError:
            pass

    # -- hits ----------------------------------------------------------------------------------

    def find(self, key: str, rules: Rules, *, locked: bool = False) -> Found | NotCacheable | None:
        """The entry for ``key`` if present and sound as far as can be told without loading it,
        held shared until ``Found.release`` (``locked``: the caller holds the key's lock); a
        marker's decision; or None (compile, and cache)."""
        if not os.path.lexists(self.store.entry_path(key)):
            return None  # the common miss: no lock file is created, no manifest read
        lock = self.store.lock(key) if locked else self._shared(key, rules)
        found: Found | NotCacheable | None = None
        try:
            try:
                entry = self.store.lookup(key, check_sizes=rules.verify != "OFF")
            except OSError:
                entry = None
            if entry is not None:
                found = self._judge(entry, lock, rules)
            return found
        finally:
            if not isinstance(found, Found):
                lock.release()

    def _judge(self, entry: Entry, lock: KeyLock, rules: Rules) -> Found | NotCacheable | None:
        keys = auth.keys_of(rules.hmac_key)
        mac_key = auth.signer(entry.manifest, keys) if keys else None
        if keys and mac_key is None:
            if auth.signed(entry.manifest):  # another key's (a rotation), or forged: not ours to delete
                return NotCacheable(_NOT_MINE, foreign=True)
            self.store.quarantine(entry.key, "entry is not authenticated (no MAC)")
            return None
        marker = entry.manifest.get("not_cacheable")
        if marker is not None:
            return self._marker(entry, marker, mac_key, rules)
        record = entry.manifest.get("build")
        if not isinstance(record, dict) or not isinstance(record.get("variant"), str):
            # Entries of earlier versions were published unchecked; one crashed every process loading it.
            self.store.quarantine(entry.key, "written without a check of its blob")
            return None
        variant = record["variant"]
        fatal = self.store.sentinels.fatal(entry.key, variant)
        if fatal is not None:
            logger.warning("aioov cache: the cached %s blob of %s killed a process: %s; discarding it, the next "
                           "compile writes another variant", variant, rules.name, fatal.describe())
            self.store.quarantine(entry.key, f"a process died running it: {fatal.describe()}")
            return None
        return Found(self, entry, variant, lock, mac_key, rules)

    def _marker(self, entry: Entry, marker: Any, mac_key: bytes | None, rules: Rules) -> NotCacheable | None:
        problem = auth.check(entry.manifest, entry.path, mac_key, [NOT_CACHEABLE]) if mac_key else None
        if problem or not isinstance(marker, dict) or NOT_CACHEABLE not in entry.files:
            self.store.quarantine(entry.key, problem or "malformed not-cacheable marker")
            return None
        if marker.get("kind") == NOT_WORTH:
            return NotCacheable(str(marker.get("reason")), worth=False, stale=marker.get("aioov") != __version__)
        if marker.get("kind") == TOO_BIG:  # made again where the limit is higher, or none
            limit = marker.get("limit")
            grown = not rules.max_size or not isinstance(limit, int) or rules.max_size > limit
            return NotCacheable(str(marker.get("reason")), stale=grown)
        return NotCacheable(str(marker.get("reason")))

    @contextmanager
    def reading(self, key: str, rules: Rules, cancel: threading.Event) -> Iterator[Path]:
        """The entry's directory, held shared (prune skips it) for a second load of a hit."""
        lock = self._shared(key, rules, cancel)
        try:
            yield self.store.entry_path(key)
        finally:
            lock.release()

    def _shared(self, key: str, rules: Rules, cancel: threading.Event | None = None) -> KeyLock:
        """The key's lock, taken shared where it can be (prune skips entries being read; held
        only until the session exists); without it on a read-only directory or a long prune."""
        lock = self.store.lock(key)
        try:
            lock.acquire(min(5.0, rules.lock_timeout), shared=True, cancel=cancel)
        except (LockTimeout, OSError):
            pass
        return lock

    def scratch(self, key: str) -> Path:
        """A directory to write in while importing: in the cache (same filesystem, swept after a
        crash like any temporary), or the system's where the cache is read-only."""
        try:
            return self.store.new_tmp(key)
        except OSError:
            return Path(tempfile.mkdtemp(prefix="aioov-import-"))

    # -- misses --------------------------------------------------------------------------------

    def claim(
        self, key: str, rules: Rules, *, manifest: dict[str, Any], stats: list[FileStat] | None,
        cancel: threading.Event, defer: bool = False,
    ) -> Claim:
        """The key's exclusive lock, for this compile to write its entry. Waits while another
        process holds it and shows progress; raises ``Stalled`` when it shows none, or once
        this wait has lasted as long as the holder's compile of the model (then compile here:
        waiting longer would be slower), ``LockBusy`` at once with ``defer``,
        ``LockTimeout`` after ``CACHE_LOCK_TIMEOUT``, ``Cancelled``, OSError."""
        lock = self.store.lock(key)
        if not lock.try_acquire():
            if defer:
                raise LockBusy(key)
            self.events.count(lock_waits=1)
            if not _wait_for(lock, rules.lock_timeout, cancel):
                raise Stalled(key)
        lock.note("")  # what an earlier holder said of its compile is not this one's
        claim = Claim(self, key, lock, manifest, stats)
        claim.beat(_always)  # looking again, downloading, compiling: this process works on it
        return claim

    def fetch(self, claim: Claim, rules: Rules, cancel: threading.Event) -> bool:
        """Ask the remote tier (``CACHE_REMOTE_URL``): True when it put the entry in this cache;
        else the claim holds the hosts' lock, and what this host publishes is uploaded."""
        if rules.remote is None:
            return False
        claim.remote = RemoteLink(self.store, rules.remote, self.events)
        return claim.remote.fetch_or_claim(claim.key, cancel)

    def retire(self, key: str) -> None:
        """Remove a marker whose decision is to be made again (the caller holds the key's lock)."""
        self.store.retire(key)

    # -- what builders and variants write in ---------------------------------------------------

    def new_tmp(self, key: str) -> Path:
        return self.store.new_tmp(key)

    def discard(self, tmp: Path) -> None:
        self.store.discard(tmp)

    def crashed(self, key: str) -> dict[str, str]:
        """Variants of ``key`` that killed a process, and how."""
        return self.store.sentinels.crashed(key)

    def upkeep(self, limit: int) -> Callable[[CancelToken], None] | None:
        """Past ``CACHE_MAX_SIZE`` (the summary says so in O(1)) or with a journal to compact: a
        job that prunes the least recently used entries to 90 % of the limit, for one process per
        cache at a time; else None. A failed prune is the cache's, never the compile's."""
        store, events = self.store, self.events
        try:
            if not store.claim_upkeep(limit or None):
                return None
        except Exception as exc:
            events.failed(f"prune:{store.root}", "aioov cache: pruning %s failed: %s", store.root, exc)
            return None

        def prune(token: CancelToken) -> None:
            try:
                removed = store.upkeep(limit or None, cancel=lambda: token.cancelled)
            except Cancelled:
                return
            except Exception as exc:
                events.failed(f"prune:{store.root}", "aioov cache: pruning %s failed: %s", store.root, exc)
                return
            if removed:
                events.count(pruned=len(removed))
                logger.info("aioov cache: pruned %d entries to stay under %d bytes", len(removed), limit)

        return prune


@dataclass
class Found:
    """An entry that passed every check that needs no load, held shared until ``release``."""

    cache: Cache
    entry: Entry
    variant: str
    lock: KeyLock
    mac_key: bytes | None
    rules: Rules

    @property
    def key(self) -> str:
        return self.entry.key

    @property
    def path(self) -> Path:
        return self.entry.path

    def start_checks(
        self, first: str, pool: concurrent.futures.Executor
    ) -> concurrent.futures.Future[str | None] | None | Literal[False]:
        """Check ``first`` (the small graph file: ORT never parses a corrupt one) now, the rest
        on ``pool`` while the caller loads the entry: a future of the problem found; None when
        nothing is to be checked (``CACHE_VERIFY`` SIZE or OFF, or files already known good);
        False when ``first`` failed (the entry is quarantined)."""
        entry, rest = self.entry, [name for name in self.entry.files if name != first]
        if self.mac_key is not None:
            # Authenticated entries: keyed blake3 MACs instead of checksums, whatever CACHE_VERIFY.
            problem = auth.check(entry.manifest, entry.path, self.mac_key, [first])
            if problem:
                self.bad(problem)
                return False
            return pool.submit(auth.check, entry.manifest, entry.path, self.mac_key, rest)
        if self.rules.verify != "FULL" or self._known_good():
            return None
        # Checksum the weights while ONNX Runtime maps them: flipped bytes would not make ORT
        # fail, they would silently change the outputs. Once per entry and file identity (this
        # Core's memory, then the stamp any process leaves: ``stamps``).
        problem = self.cache.store.verify(entry, [first])
        if problem:
            self.bad(problem)
            return False
        return pool.submit(self.cache.store.verify, entry, rest)

    def _known_good(self) -> bool:
        files = identities(self.entry)
        return files is not None and (self.cache._verified.get(self.entry.path) == files or stamped(self.entry, files))

    def bad(self, problem: str) -> None:
        """A check proved the entry bad: it is set aside, the next compile writes it again."""
        self.cache.store.quarantine(self.key, problem)

    def served(self, checked: bool) -> ShapeGuard:
        """The entry loaded (``checked``: and its checksums or MACs matched): remember that its
        files are good, mark it used; the guard for its runs at new input shapes."""
        if checked and self.mac_key is None:  # checksums, not MACs, matched: stamp them
            files = identities(self.entry)
            if files is not None:
                self.cache._verified[self.entry.path] = files
                stamp(self.entry, files)
        self.cache.store.touch(self.key)
        return ShapeGuard(self.cache.store.sentinels, self.key, self.variant)

    def scratch(self) -> Path:
        return self.cache.scratch(self.key)

    def release(self) -> None:
        self.lock.release()


@dataclass
class Claim:
    """A key this compile writes for everyone: the locks it holds until the entry is published
    (or given up), and what the entry will say about itself."""

    cache: Cache
    key: str
    lock: KeyLock
    manifest: dict[str, Any]
    stats: list[FileStat] | None  # the source files as hashed; a publish re-checks them
    remote: RemoteLink | None = None

    def source_changed(self) -> bool:
        """Whether the source files are no longer those that were hashed for the key."""
        return self.stats is not None and not unchanged(self.stats, self.manifest["key_inputs"]["model"])

    def others(self) -> bool:
        """Whether other processes are loading from this cache now (they will want this key)."""
        return self.cache.presence.others()

    def beat(self, progress: Progress | None) -> None:
        """Show waiters that the work goes on while ``progress()`` is true (None: it waits)."""
        self.cache.beats.set(self, self.lock.path, progress)

    def compiled(self, seconds: float) -> None:
        """Tell waiters that this process compiled the model in ``seconds``: they wait no longer
        than that for the entry, and compile it themselves after."""
        heartbeat.compiled(self.lock, seconds)

    def publish(
        self, tmp: Path, record: dict[str, Any], rules: Rules, *, abort: Callable[[], bool] | None = None
    ) -> list[Chore]:
        """Publish the entry written in ``tmp`` (``record``: how it was checked) and give the
        local lock back: waiters need not
        wait for the upload. What is left to do, off the caller's path: the upload (which then
        gives the hosts' lock back) and a prune past ``CACHE_MAX_SIZE``. Raises SourceChanged
        (nothing published: the key would lie) and OSError."""
        if self.source_changed():
            raise SourceChanged(self.key)
        cache = self.cache
        if not cache.store.publish(self.key, tmp, {**self.manifest, "build": record}, abort=abort,
                                   mac_key=rules.mac_key):
            return []
        cache.events.count(exports=1)
        self.lock.release()
        chores = []
        remote, self.remote = self.remote, None
        if remote is not None:
            key = self.key
            chores.append(Chore(lambda _token: remote.share(key), remote.release, idle=False))
        prune = cache.upkeep(rules.max_size)
        if prune is not None:
            chores.append(Chore(prune, lambda: None))
        return chores

    def mark(self, marker: dict[str, Any], rules: Rules, *, onnxruntime: str) -> None:
        """Publish a not-cacheable marker under the key, in place of an entry: later compiles
        neither retry nor pay for an export. Raises SourceChanged (what was judged may not be
        what the key names) and OSError."""
        if self.source_changed():
            raise SourceChanged(self.key)
        store = self.cache.store
        tmp = store.new_tmp(self.key)
        try:
            marker = {**marker, "onnxruntime": onnxruntime, "aioov": __version__}
            (tmp / NOT_CACHEABLE).write_text(json.dumps(marker), encoding="utf-8")
            store.publish(self.key, tmp, {**self.manifest, "not_cacheable": marker}, mac_key=rules.mac_key)
        finally:
            store.discard(tmp)

    def release(self) -> None:
        self.beat(None)
        if self.remote is not None:
            self.remote.release()
        self.lock.release()


def _always() -> bool:
    return True


#: file descriptors a compile through the cache may need besides the compile's own: its key
#: and hash locks, a builder's pipes, the entry's files
FD_HEADROOM = 48


def _descriptors_scarce() -> bool:
    """Whether this process is near its limit of open files (Linux; elsewhere never)."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY or soft > 1 << 16:
            return False
        return soft - len(os.listdir("/proc/self/fd")) < FD_HEADROOM
    except (ImportError, OSError, ValueError):
        return False


#: seconds between a waiter's looks at the holder's signs (a small model compiles in 0.1 s)
_LOOK = 0.1


def _wait_for(lock: KeyLock, timeout: float, cancel: threading.Event) -> bool:
    """Take ``lock``, held by another process, waiting up to ``timeout`` seconds (LockTimeout);
    False as soon as its holder shows no sign of progress, or this wait has lasted as long as
    the holder's compile (``heartbeat``)."""
    since, deadline = time.time(), time.monotonic() + timeout
    while True:
        try:
            lock.acquire(max(0.0, min(_LOOK, deadline - time.monotonic())), cancel=cancel)
            return True
        except LockTimeout:
            if time.monotonic() >= deadline:
                raise
            if heartbeat.stalled(lock.path, since) or heartbeat.overdue(lock.path, since):
                return False

