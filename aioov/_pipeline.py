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
import threading

import onnxruntime as ort

from ._cache.cache import Cache, CacheEvents, CacheStats, Exporter, FileStat, NotCacheable, Stalled
from ._concurrency import CancelToken, renew_in_children
from ._devices import DeviceRegistry
from ._errors import Cancelled, LockTimeout, ModelReadError
from ._model import check_model_file
from ._properties import CompileConfig
from ._reader import EntryReader, Loaded
from ._request import CompileRequest, Result, Source
from ._sessions import SessionFactory
from ._warmup import warm_up
from ._writer import EntryWriter

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
        self._caches: dict[str, Cache | None] = {}
        self._caches_lock = threading.Lock()
        renew_in_children(self)

    def _renew_in_child(self) -> None:
        self._caches_lock = threading.Lock()

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
        cache = self.cache(request.config.cache_dir) if request.caches else None
        if cache is None or cache.refuses(request.rules):
            source = request.source
            if source.path is not None and source.model is None:
                check_model_file(source.path)
            self.devices.require(request.device, request.spec)
            result = _result(request, self.sessions.compile(request, token), None)
            result.not_cached = request.uncached
            return result
        cache.presence.enter()  # other processes loading from this cache see this one meanwhile
        try:
            return self._run_cached(request, cache, token, defer_if_busy)
        finally:
            cache.presence.leave()

    def _run_cached(self, request: CompileRequest, cache: Cache, token: CancelToken, defer_if_busy: bool) -> Result:
        source, rules = request.source, request.rules
        try:
            stats, digest = self._identify(request, cache, token, defer_if_busy)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):  # the process's limit, not the model: uncached
                self.events.failed("fds", "aioov cache: %s; compiling without the cache", exc)
                return self._compile(request, token, None)
            raise ModelReadError(f"cannot read {source.describe()}: {exc}") from exc
        self.devices.require(request.device, request.spec)
        key, manifest = request.entry_key(digest)

        found = self.reader.load(cache, key, request, token)
        if isinstance(found, NotCacheable) and not found.stale:
            return self._not_cacheable(request, found, key, token)
        if isinstance(found, Loaded):
            self.events.count(hits=1)
            return _result(request, found, key)

        try:
            claim = cache.claim(key, rules, manifest=manifest, stats=stats, cancel=token.event, defer=defer_if_busy)
        except Stalled:
            # Its holder shows no progress (a stopped, hung or starved builder), or its entry is
            # not there after as long as compiling the model takes: compile it here.
            logger.info("aioov cache: %s is being cached by another process; compiling it here "
                        "rather than wait longer", source.describe())
            return self._compile(request, token, key)
        except Cancelled:
            raise
        except (LockTimeout, OSError) as exc:
            self.events.count(lock_timeouts=1 if isinstance(exc, LockTimeout) else 0)
            self.events.failed(f"lock:{cache.root}", "aioov cache: %s; compiling without the cache", exc)
            return self._compile(request, token, key)
        try:
            # Another process may have published while we waited for its lock.
            found = self.reader.load(cache, key, request, token, locked=True)
            if isinstance(found, NotCacheable) and found.stale:  # decided on other grounds: decide again
                cache.retire(key)
                found = None
            if found is None and cache.fetch(claim, rules, token.event):
                found = self.reader.load(cache, key, request, token, locked=True)
        except BaseException:
            claim.release()
            raise
        if isinstance(found, NotCacheable):
            claim.release()
            return self._not_cacheable(request, found, key, token)
        if found is not None:
            claim.release()
            self.events.count(hits=1)
            return _result(request, found, key)
        self.events.count(misses=1)
        session = self.writer.write(claim, request, token)
        if session is None:  # published for others waiting: loaded as they will load it
            return self._load_published(cache, claim.key, request, token)
        return _result(request, session, key)

    def _identify(
        self, request: CompileRequest, cache: Cache, token: CancelToken, defer_if_busy: bool
    ) -> tuple[list[FileStat] | None, str]:
        """(file stats, content digest) of the model: a ``Model`` knows its own, a file's comes
        from the cache (its stat index, or its hash)."""
        source = request.source
        if source.model is not None:
            stats, digest = source.model.identity()
            if stats is not None:
                cache.remember(stats, digest, request.rules)
            return stats, digest
        assert source.path is not None
        wait = None if defer_if_busy else request.config.cache_lock_timeout
        return cache.identify(source.path, _external_files, request.rules, wait=wait, cancel=token.event)

    def _load_published(self, cache: Cache, key: str, request: CompileRequest, token: CancelToken) -> Result:
        """The entry a builder just published for this call (a hit's load, not a second
        compile); when nothing could be published, a compile without the cache."""
        found = self.reader.load(cache, key, request, token)
        if isinstance(found, Loaded):
            self.events.count(compiles=1)  # the builder's, for this call
            return Result(found.session, str(request.spec), request.config, False, key,
                          pending=found.pending, guard=found.guard)
        result = _result(request, self.sessions.compile(request, token), key)
        if isinstance(found, NotCacheable):
            result.not_cached = found.describe()
        return result

    def _not_cacheable(self, request: CompileRequest, marker: NotCacheable, key: str, token: CancelToken) -> Result:
        """A compile without export: this model's blobs failed their checks here before."""
        result = self._compile(request, token, key)
        result.not_cached = marker.describe()
        return result

    def _compile(self, request: CompileRequest, token: CancelToken, key: str | None) -> Result:
        """A compile without the cache (a miss that is not written)."""
        self.events.count(misses=1)
        return _result(request, self.sessions.compile(request, token), key)

    def cache(self, cache_dir: str | None) -> Cache | None:
        """The cache at ``cache_dir``, opened on first use, and again if the directory
        disappeared (or was unusable) since; None while it cannot be used."""
        if cache_dir is None:
            return None
        with self._caches_lock:
            cache = self._caches.get(cache_dir)
            if cache is None or cache.gone():
                cache = self._caches[cache_dir] = Cache.open(cache_dir, self.events)
            return cache


def _result(request: CompileRequest, session: ort.InferenceSession | Loaded, key: str | None) -> Result:
    """A compiled session (``hit`` False), or one loaded from the cache (with what it left to do)."""
    if isinstance(session, Loaded):
        return Result(session.session, str(request.spec), request.config, True, key,
                      pending=session.pending, guard=session.guard)
    return Result(session, str(request.spec), request.config, False, key)


def _external_files(path: str) -> list[str]:
    """The external-data files a model file names (raises ModelReadError for a bad file)."""
    return check_model_file(path)[1]
