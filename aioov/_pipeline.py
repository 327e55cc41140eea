"""The compile pipeline: what one compile job does in its worker thread.

Data flows one way::

    CompileRequest (device resolved, config typed)
    → content key (stat index, or blake3 of the files)
    → local entry? ── hit: EntryReader imports the blob (checksums verified alongside the load)
    └ miss: key lock → look again → RemoteLink (download, or the hosts' lock)
            → EntryWriter: compile → export (background, or by the compile itself)
            → publish → upload → release the locks

Everything here blocks; ``Core`` runs it in worker threads and only awaits. Cache failures
never escape: they are counted, logged once, and the model is compiled without the cache.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort

from ._cache import auth, heartbeat
from ._cache.export import Exporter
from ._cache.fsutil import distrust
from ._cache.key import FileStat, cache_key, digest_files
from ._cache.locks import KeyLock
from ._cache.peers import Presence
from ._cache.stats import CacheEvents, CacheStats
from ._cache.store import CacheStore
from ._cache.tiered import RemoteLink, RemoteSettings
from ._concurrency import CancelToken, renew_in_children
from ._devices import DeviceRegistry
from ._early import EarlyCompile
from ._errors import Cancelled, LockBusy, LockTimeout, ModelReadError
from ._model import check_model_file
from ._properties import CompileConfig, ExportMode
from ._reader import EntryReader, Loaded, NotCacheable
from ._request import CompileRequest, Result, Source
from ._sessions import SessionFactory
from ._warmup import warm_up
from ._writer import Claim, EntryWriter

__all__ = ("Pipeline",)

logger = logging.getLogger("aioov")


class Pipeline:
    """The blocking half of a ``Core``: from a request to a session, through the cache."""

    def __init__(self, devices: DeviceRegistry, exporter: Exporter) -> None:
        self.devices = devices
        self.events = CacheEvents()
        self.sessions = SessionFactory(self.events)
        self.reader = EntryReader(self.sessions, self.events)
        self.writer = EntryWriter(self.sessions, self.events, exporter)
        self._stores: dict[str, CacheStore | None] = {}
        self._presence: dict[Path, Presence] = {}
        self._stores_lock = threading.Lock()
        renew_in_children(self)

    def _renew_in_child(self) -> None:
        self._stores_lock = threading.Lock()

    def stats(self) -> CacheStats:
        return self.events.snapshot()

    def shutdown(self) -> None:
        self.reader.shutdown()
        self.writer.shutdown()

    def compile_job(self, source: Source, device_name: str, config: CompileConfig, token: CancelToken,
                    max_cache_size: int = 0, defer_if_busy: bool = False) -> Result:
        # The device is probed (a GPU: CUDA initialized) while the model is read and hashed.
        request = CompileRequest.resolve(self.devices, source, device_name, config, max_cache_size, wait=False)
        result = self.run(request, token, defer_if_busy=defer_if_busy)
        if request.config.warmup and not token.cancelled:
            report = warm_up(result.session, request.config, source.describe(), result.guard)
            result.warmup_seconds = report.seconds if report.runs else None
        return result

    def run(self, request: CompileRequest, token: CancelToken, *, defer_if_busy: bool = False) -> Result:
        store = self.store(request.config.cache_dir) if request.caches else None
        if store is not None and _descriptors_scarce():
            # Each compile through the cache holds a lock file open until its entry is published,
            # and a builder's pipes: near the limit the cache would make compiles fail.
            self.events.failed("fds", "aioov cache: few file descriptors left (ulimit -n); compiling without the cache")
            store = None
        if store is not None and not request.config.cache_hmac_key:
            problem = distrust(store.root) or distrust(store.base)
            if problem is not None:  # MACs would make it safe: entries then prove who wrote them
                self.events.failed(f"trust:{store.root}", "aioov cache: not using %s: %s (anyone who can write "
                                   "it decides what is served; chown it, or set CACHE_HMAC_KEY)", store.root, problem)
                store = None
        if store is None:
            source = request.source
            if source.path is not None and source.model is None:
                check_model_file(source.path)
            self.devices.require(request.device, request.spec)
            result = self._result(request, self.sessions.compile(request, token), None)
            result.not_cached = request.uncached
            return result
        presence = self.presence(store)
        presence.enter()  # other processes loading from this cache see this one meanwhile
        try:
            return self._run_cached(request, store, presence, token, defer_if_busy)
        finally:
            presence.leave()

    def _run_cached(
        self, request: CompileRequest, store: CacheStore, presence: Presence, token: CancelToken, defer_if_busy: bool
    ) -> Result:
        early = EarlyCompile(self.sessions, request)

        def before_hashing(stats: list[FileStat]) -> None:
            """Compile at once where a miss is all but certain (``_early``)."""
            if not defer_if_busy and _may_begin_early(request, store, presence, stats):
                self.devices.require(request.device, request.spec)
                early.begin()

        with early:  # dropped unless taken: the cache had the model, or this failed
            return self._look_up(request, store, presence, token, defer_if_busy, early, before_hashing)

    def _look_up(
        self, request: CompileRequest, store: CacheStore, presence: Presence, token: CancelToken,
        defer_if_busy: bool, early: EarlyCompile, before_hashing: Callable[[list[FileStat]], None],
    ) -> Result:
        source, config = request.source, request.config
        try:
            stats, digest = self._identify(source, store, auth.key_of(config.cache_hmac_key), token,
                                           None if defer_if_busy else config.cache_lock_timeout, before_hashing)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):  # the process's limit, not the model: uncached
                self.events.failed("fds", "aioov cache: %s; compiling without the cache", exc)
                self.events.count(misses=1)
                return self._result(request, early.take(token), None)
            raise ModelReadError(f"cannot read {source.describe()}: {exc}") from exc
        self.devices.require(request.device, request.spec)
        key_inputs = request.key_inputs(digest)
        key = cache_key(key_inputs)

        loaded = self.reader.try_import(store, key, request, token)
        if isinstance(loaded, NotCacheable) and not loaded.stale:
            return self._not_cacheable(request, loaded, key, token, early)
        if isinstance(loaded, Loaded):
            self.events.count(hits=1)
            return self._result(request, loaded, key)

        lock = store.lock(key)
        try:
            if not lock.try_acquire():
                if defer_if_busy:
                    raise LockBusy(key)
                if early.started:  # another process compiles it too: ours is under way
                    self.events.count(misses=1)
                    return self._result(request, early.take(token), key)
                self.events.count(lock_waits=1)
                if not _wait_for(lock, config.cache_lock_timeout, token):
                    # Its holder shows no progress (a stopped, hung or starved builder): do not
                    # wait longer than compiling the model here takes.
                    self.events.count(misses=1)
                    logger.info("aioov cache: %s is being cached by a process that shows no progress; "
                                "compiling it here", source.describe())
                    return self._result(request, early.take(token), key)
        except Cancelled:
            raise
        except (LockTimeout, OSError) as exc:
            self.events.count(misses=1, lock_timeouts=1 if isinstance(exc, LockTimeout) else 0)
            self.events.failed(f"lock:{store.root}", "aioov cache: %s; compiling without the cache", exc)
            return self._result(request, early.take(token), key)

        claim = Claim(store, key, lock, request.manifest(key_inputs), stats, peers=presence, beats=self.writer.beats)
        claim.beat(_always)  # looking again, downloading, compiling: this process works on it
        try:
            # Another process may have published while we waited for its lock.
            loaded = self.reader.try_import(store, key, request, token, locked=True)
            if isinstance(loaded, NotCacheable) and loaded.stale:  # decided on other grounds: decide again
                store.retire(key)
                loaded = None
            if loaded is None and config.cache_remote_url:
                claim.remote = RemoteLink(store, RemoteSettings(
                    config.cache_remote_url, config.cache_remote_lock_url, config.cache_remote_lock_ttl,
                    config.cache_lock_timeout, auth.key_of(config.cache_hmac_key)), self.events)
                if claim.remote.fetch_or_claim(key, token.event):
                    loaded = self.reader.try_import(store, key, request, token, locked=True)
        except BaseException:
            claim.release()
            raise
        if isinstance(loaded, NotCacheable):
            claim.release()
            return self._not_cacheable(request, loaded, key, token, early)
        if loaded is not None:
            claim.release()
            self.events.count(hits=1)
            return self._result(request, loaded, key)
        self.events.count(misses=1)
        if self.writer.awaited(claim, request):
            # Others began loading from the cache meanwhile and will wait for this entry: the
            # builder's compile serves them and this process (one compile), not an early one.
            early.drop()
            return self._publish_then_load(claim, request, token)
        return self._result(request, self.writer.compile(claim, request, token, early, bulk=defer_if_busy), key)

    def _publish_then_load(self, claim: Claim, request: CompileRequest, token: CancelToken) -> Result:
        """Others wait for this entry: a builder writes and publishes it now, and this process
        loads it as they will (a hit's load, not a second compile). When nothing could be
        published, a compile without the cache."""
        self.writer.publish_now(claim, request, token)
        loaded = self.reader.try_import(claim.store, claim.key, request, token)
        if isinstance(loaded, Loaded):
            self.events.count(compiles=1)  # the builder's, for this call
            return Result(loaded.session, str(request.spec), request.config, False, claim.key,
                          pending=loaded.pending, guard=loaded.guard)
        result = self._result(request, self.sessions.compile(request, token), claim.key)
        if isinstance(loaded, NotCacheable):
            result.not_cached = loaded.describe()
        return result

    def _not_cacheable(self, request: CompileRequest, marker: NotCacheable, key: str, token: CancelToken,
                       early: EarlyCompile) -> Result:
        """A compile without export: this model's blobs failed their checks here before."""
        self.events.count(misses=1)
        result = self._result(request, early.take(token), key)
        result.not_cached = marker.describe()
        return result

    @staticmethod
    def _result(request: CompileRequest, session: ort.InferenceSession | Loaded, key: str | None) -> Result:
        """A compiled session (``hit`` False), or one loaded from the cache (with what it left to do)."""
        if isinstance(session, Loaded):
            return Result(session.session, str(request.spec), request.config, True, key,
                          pending=session.pending, guard=session.guard)
        return Result(session, str(request.spec), request.config, False, key)

    def presence(self, store: CacheStore) -> Presence:
        """This process's mark among the users of ``store`` (see ``_cache/peers.py``)."""
        with self._stores_lock:
            return self._presence.setdefault(store.base, Presence(store.locks / "peers"))

    def store(self, cache_dir: str | None) -> CacheStore | None:
        """The store for ``cache_dir``, created and tidied on first use, and again if the
        directory disappeared (or was unusable) since; None while it cannot be used."""
        if cache_dir is None:
            return None
        with self._stores_lock:
            store = self._stores.get(cache_dir)
            if store is None or not store.base.is_dir():
                store = self._stores[cache_dir] = self._open_store(cache_dir)
            return store

    def _open_store(self, cache_dir: str) -> CacheStore | None:
        store = CacheStore(cache_dir)
        store.on_discard = lambda key, reason: self.events.count(corrupt=1)
        try:
            store.ensure()
            store.clean_tmp()
        except OSError as exc:
            self.events.failed(f"dir:{cache_dir}", "aioov cache: cannot use %s (%s); "
                               "compiling without the cache", cache_dir, exc)
            # A read-only cache (e.g. baked into an image) can still serve hits; a tree with
            # symlinks where directories belong serves nothing and receives nothing.
            try:
                store.check_tree()
            except OSError:
                return None
            return store if store.is_cache() and store.base.is_dir() else None
        return store

    def _identify(
        self, source: Source, store: CacheStore, mac_key: bytes | None, token: CancelToken, wait: float | None,
        before_hashing: Callable[[list[FileStat]], None],
    ) -> tuple[list[FileStat] | None, str]:
        """(file stats, content digest) of the model, from the stat index when it can; else
        ``before_hashing(stats)`` is called, and the files are hashed."""
        if source.model is not None:
            stats, digest = source.model.identity()
            if stats is None:
                return None, digest
            self._index(store, stats, digest, mac_key)
            return stats, digest
        assert source.path is not None
        hit = store.index.lookup(source.path, mac_key)
        if hit is not None:
            digest, stats = hit  # just compared with the files on disk
            return stats, digest
        # Hashed once per cache: workers starting together would otherwise all read the same
        # gigabytes at once. A process finding the file's hash lock held defers the model
        # (``wait`` None, bulk loads) or waits for the index record the holder writes.
        lock = store.hash_lock(source.path)
        try:  # released however this ends (it once stayed held after reading the holder's record)
            try:
                if not lock.try_acquire():
                    if wait is None:
                        raise LockBusy(source.path)
                    lock.acquire(wait, cancel=token.event)
                    hit = store.index.lookup(source.path, mac_key)
                    if hit is not None:
                        digest, stats = hit
                        return stats, digest
            except (LockTimeout, OSError):
                pass  # no coordination here: hash it anyway
            _, external = check_model_file(source.path)
            stats = [FileStat.of(p) for p in (source.path, *external)]
            before_hashing(stats)
            digest = digest_files([source.path, *external])
            if [FileStat.of(s.path) for s in stats] != stats:
                raise ModelReadError(f"{source.path} changed while it was being hashed")
            self._index(store, stats, digest, mac_key)  # before the lock goes: waiters read it
            return stats, digest
        finally:
            lock.release()

    @staticmethod
    def _index(store: CacheStore, stats: list[FileStat], digest: str, mac_key: bytes | None) -> None:
        try:
            store.index.store(stats, digest, mac_key)
        except OSError:
            pass


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


def _wait_for(lock: KeyLock, timeout: float, token: CancelToken) -> bool:
    """Take ``lock``, held by another process, waiting up to ``timeout`` seconds (LockTimeout);
    False as soon as its holder shows no sign of progress (``_cache/heartbeat``)."""
    since, deadline = time.time(), time.monotonic() + timeout
    while True:
        try:
            lock.acquire(max(0.0, min(heartbeat.EVERY, deadline - time.monotonic())), cancel=token.event)
            return True
        except LockTimeout:
            if time.monotonic() >= deadline:
                raise
            if heartbeat.stalled(lock.path, since):
                return False


def _may_begin_early(request: CompileRequest, store: CacheStore, presence: Presence, stats: list[FileStat]) -> bool:
    """Whether a compile may begin before the model's hash says it is a miss: a format
    written in the background (a miss's compile is the caller's session), no second tier
    (where entries come from other hosts), no ``SYNC`` export (the builder compiles for the
    caller), no model of this size hashed for this cache before, and no other process loading
    from it (workers starting together each compile a model once: they wait for its lock)."""
    blob, config = request.device.blob, request.config
    return (blob is not None and blob.background and config.cache_export is not ExportMode.SYNC
            and not config.cache_remote_url and not store.index.seen_size(stats)
            and not presence.others())
