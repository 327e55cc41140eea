"""Cache hits: find an entry, check it, load it; quarantine what a check proved bad.

The reader never writes an entry. Checksums (or MACs, with ``CACHE_HMAC_KEY``) of the
weights run on an I/O thread while ONNX Runtime maps them, so a hit costs little more than
the load; the small graph file is checked first, so ORT never parses a corrupt one.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

from ._cache import auth
from ._cache.layout import NOT_CACHEABLE, NOT_WORTH, TOO_BIG
from ._cache.sentinel import ShapeGuard
from ._cache.stamps import Identities, identities, stamp, stamped
from ._cache.stats import CacheEvents
from ._cache.store import CacheStore, Entry
from ._concurrency import CancelToken, renew_in_children
from ._errors import ORT_ERRORS, Cancelled, LockTimeout
from ._properties import CacheHitMode, CacheVerify
from ._request import CompileRequest, Pending, Upgrade
from ._sessions import SessionFactory
from ._version import __version__
from ._warmup import warm_up

__all__ = ("EntryReader", "Loaded", "NotCacheable")

logger = logging.getLogger("aioov")


class EntryReader:
    """Loads cache entries (and ``export_model`` directories) for one Core."""

    def __init__(self, sessions: SessionFactory, events: CacheEvents) -> None:
        self._sessions = sessions
        self._events = events
        self._io_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="aioov-io")
        renew_in_children(self)
        self._verified: dict[Path, Identities] = {}  # entries checksummed here, as their files were
        # Where an instant hit's full-speed load runs, and how it is stopped (the Core's jobs:
        # ``CompileJobs.background``); unset, it is started by whoever gets the hit.
        self.start_background: Callable[[Upgrade], concurrent.futures.Future[Any] | None] | None = None
        self.cancel_background: Callable[[concurrent.futures.Future[Any]], None] = lambda future: None

    def _renew_in_child(self) -> None:
        self._io_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="aioov-io")

    def shutdown(self) -> None:
        self._io_pool.shutdown(wait=True)

    def try_import(
        self, store: CacheStore, key: str, request: CompileRequest, token: CancelToken | None, *, locked: bool = False
    ) -> Loaded | NotCacheable | None:
        """Load the entry for ``key`` if present and intact; None means compile (and cache),
        ``NotCacheable`` compile without the cache."""
        config = request.config
        if not os.path.lexists(store.entry_path(key)):
            return None  # the common miss: no lock file is created, no manifest read
        reader = store.lock(key)
        if not locked:
            try:
                # Shared: prune skips entries being read. Held only until the session exists.
                reader.acquire(min(5.0, config.cache_lock_timeout), shared=True)
            except (LockTimeout, OSError):
                pass  # read-only dir, or a long prune: read without the lock
        try:
            entry = store.lookup(key, check_sizes=config.cache_verify is not CacheVerify.OFF)
        except OSError:
            entry = None
        if entry is None:
            reader.release()
            return None
        try:
            return self._load_entry(store, entry, request, token)
        finally:
            reader.release()

    def _load_entry(
        self, store: CacheStore, entry: Entry, request: CompileRequest, token: CancelToken | None
    ) -> Loaded | NotCacheable | None:
        blob = request.device.blob
        assert blob is not None
        keys = auth.keys_of(request.config.cache_hmac_key)
        mac_key = auth.signer(entry.manifest, keys) if keys else None
        if keys and mac_key is None:
            if auth.signed(entry.manifest):  # another key's (a rotation), or forged: not ours to delete
                return NotCacheable(_NOT_MINE, foreign=True)
            store.quarantine(entry.key, "entry is not authenticated (no MAC)")
            return None
        marker = entry.manifest.get("not_cacheable")
        if marker is not None:
            problem = auth.check(entry.manifest, entry.path, mac_key, [NOT_CACHEABLE]) if mac_key else None
            if problem or not isinstance(marker, dict) or NOT_CACHEABLE not in entry.files:
                store.quarantine(entry.key, problem or "malformed not-cacheable marker")
                return None
            if marker.get("kind") == NOT_WORTH:
                return NotCacheable(str(marker.get("reason")), worth=False, stale=marker.get("aioov") != __version__)
            if marker.get("kind") == TOO_BIG:  # made again where the limit is higher, or none
                limit = marker.get("limit")
                grown = not request.max_cache_size or not isinstance(limit, int) or request.max_cache_size > limit
                return NotCacheable(str(marker.get("reason")), stale=grown)
            return NotCacheable(str(marker.get("reason")))
        record = entry.manifest.get("build")
        if not isinstance(record, dict) or not isinstance(record.get("variant"), str):
            # Entries of earlier versions were published unchecked; one crashed every process loading it.
            store.quarantine(entry.key, "written without a check of its blob")
            return None
        variant = record["variant"]
        if self._crashed(store, entry, variant, request):
            return None
        graph = blob.model_file
        check: concurrent.futures.Future[str | None] | None = None
        rest = [name for name in entry.files if name != graph]
        if mac_key is not None:
            # Authenticated entries: keyed blake3 MACs instead of checksums, whatever CACHE_VERIFY.
            problem = auth.check(entry.manifest, entry.path, mac_key, [graph])
            if problem:
                store.quarantine(entry.key, problem)
                return None
            check = self._io_pool.submit(auth.check, entry.manifest, entry.path, mac_key, rest)
        elif request.config.cache_verify is CacheVerify.FULL and not self._known_good(entry):
            # Checksum the weights while ONNX Runtime maps them: flipped bytes would not make
            # ORT fail, they would silently change the outputs. Once per entry and file identity
            # (this Core's memory, then the stamp any process leaves: _cache/stamps.py).
            problem = store.verify(entry, [graph])
            if problem:
                store.quarantine(entry.key, problem)
                return None
            check = self._io_pool.submit(store.verify, entry, rest)
        pending = None
        if blob.instant and request.config.cache_hit_mode is CacheHitMode.INSTANT:
            pending = Pending(self._upgrader(store, entry, request, variant))
            if check is None and self.start_background is not None:
                # Files already known good: the full-speed load need not wait for the instant
                # one (bulk loads still hold it back: ``CompileJobs.busy``).
                pending.started = self.start_background(pending.upgrade)
        loaded = None
        try:
            loaded = self._open_entry(store, entry, request, token, check, pending, variant)
        finally:
            if loaded is None and pending is not None and pending.started is not None:
                self.cancel_background(pending.started)
        return loaded

    def _crashed(self, store: CacheStore, entry: Entry, variant: str, request: CompileRequest) -> bool:
        """Whether a process died running this entry at a new input shape (``_cache/sentinel``):
        then the variant is remembered as one that crashes, and the entry is quarantined."""
        fatal = store.sentinels.fatal(entry.key, variant)
        if fatal is None:
            return False
        logger.warning("aioov cache: the cached %s blob of %s killed a process: %s; discarding it, the next "
                       "compile writes another variant", variant, request.source.describe(), fatal.describe())
        store.quarantine(entry.key, f"a process died running it: {fatal.describe()}")
        return True

    def _open_entry(
        self, store: CacheStore, entry: Entry, request: CompileRequest, token: CancelToken | None,
        check: concurrent.futures.Future[str | None] | None, pending: Pending | None, variant: str,
    ) -> Loaded | None:
        """The hit's own session, once its checks passed (None: the entry was bad, or is not loadable now)."""
        try:
            session, problem = self.open_blob(entry.path, request, token, lambda: _scratch(store, entry.key),
                                              pending is not None, variant)
        except ORT_ERRORS as exc:
            problem = check.result() if check is not None else None
            if token is not None and token.cancelled:
                raise Cancelled() from exc
            if problem is None and _looks_transient(exc):
                # Out of memory and the like: the entry is not proven bad, so it stays.
                self._events.failed(f"load:{entry.key}", "aioov cache: could not load entry %s now (%s); "
                                    "compiling instead", entry.key[:16], exc)
                return None
            store.quarantine(entry.key, problem or f"onnxruntime could not load it: {exc}")
            return None
        except OSError as exc:  # copying into the scratch directory: the entry is fine, the disk is not
            if check is not None:
                check.result()
            self._events.unwritable(store.root, exc)
            return None
        if check is not None:
            problem = check.result() or problem
        if problem:
            del session
            store.quarantine(entry.key, problem)
            return None
        if check is not None and not request.config.cache_hmac_key:  # checksums, not MACs, matched: stamp them
            files = identities(entry)
            if files is not None:
                self._verified[entry.path] = files
                stamp(entry, files)
        store.touch(entry.key)
        return Loaded(session, pending, ShapeGuard(store.sentinels, entry.key, variant))

    def _known_good(self, entry: Entry) -> bool:
        """Whether ``entry``'s files are those whose checksums matched before (same identity)."""
        files = identities(entry)
        return files is not None and (self._verified.get(entry.path) == files or stamped(entry, files))

    def _upgrader(
        self, store: CacheStore, entry: Entry, request: CompileRequest, variant: str
    ) -> Upgrade:
        """The full-speed session for an instant hit (whose entry was checked), built later in
        a worker thread and warmed up as the instant one was. None: keep the instant session
        (the entry went away, the load failed)."""

        def upgrade(token: CancelToken) -> ort.InferenceSession | None:
            lock = store.lock(entry.key)
            try:
                lock.acquire(min(5.0, request.config.cache_lock_timeout), shared=True, cancel=token.event)
            except (LockTimeout, OSError):
                pass
            try:
                session, problem = self.open_blob(entry.path, request, token, lambda: _scratch(store, entry.key),
                                                  variant=variant)
                if problem is not None or token.cancelled:
                    return None
                # WARMUP's promise (the first request costs what later ones do) holds after the swap too.
                warm_up(session, request.config, request.source.describe())
                return session
            except _UNLOADABLE as exc:
                logger.info("aioov cache: keeping the instant session of %s: %s", entry.key[:16], exc)
                return None
            finally:
                lock.release()

        return upgrade

    def open_blob(
        self,
        folder: Path,
        request: CompileRequest,
        token: CancelToken | None,
        make_scratch: Callable[[], Path],
        instant: bool = False,
        variant: str = "default",
    ) -> tuple[ort.InferenceSession, str | None]:
        """A session on the blob in ``folder`` (an entry, or an ``export_model`` directory), and
        why the blob was not really used (None when it was). Formats that write into their
        cache even on a hit get a scratch directory from ``make_scratch``, removed after.
        ``instant``: the format's quick-loading, slower-running session; ``variant``: how the
        blob was written (its manifest's ``build`` record)."""
        blob = request.device.blob
        assert blob is not None
        options = self._sessions.options(request.config)
        if instant:
            blob.configure_instant(options)
        scratch = make_scratch() if blob.import_scratch else None
        try:
            providers = blob.configure_import(options, request.providers, folder, scratch, variant)
            session = self._sessions.open(str(folder / blob.model_file), options, request, providers, token)
            return session, blob.after_import(folder, scratch)
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)


#: why a full-speed session could not be built after an instant hit (the instant one stays)
_UNLOADABLE: tuple[type[BaseException], ...] = (*ORT_ERRORS, OSError)

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
class Loaded:
    """A session loaded from an entry, what an instant hit leaves to do, and the guard its
    runs at new input shapes go through (``_cache/sentinel``)."""

    session: ort.InferenceSession
    pending: Pending | None
    guard: ShapeGuard


#: words in onnxruntime's errors that mean "not now", not "never": memory, device, driver
_TRANSIENT = ("alloc", "out of memory", "cuda", "cudnn", "cublas", "resource exhausted")


def _looks_transient(exc: BaseException) -> bool:
    text = str(exc).lower()
    return any(word in text for word in _TRANSIENT)


def _scratch(store: CacheStore, key: str) -> Path:
    """A directory to write in while importing: in the cache (same filesystem, swept after a
    crash like any temporary), or the system's where the cache is read-only."""
    import tempfile

    try:
        return store.new_tmp(key)
    except OSError:
        return Path(tempfile.mkdtemp(prefix="aioov-import-"))
