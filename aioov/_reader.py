"""Cache hits: find an entry, check it, load it; quarantine what a check proved bad.

The reader never writes an entry. Checksums (or MACs, with ``CACHE_HMAC_KEY``) of the
weights run on an I/O thread while ONNX Runtime maps them, so a hit costs little more than
the load; the small graph file is checked first, so ORT never parses a corrupt one.
"""

from __future__ import annotations

import concurrent.futures
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

from ._cache.cache import Cache, CacheEvents, Found, NotCacheable, ShapeGuard
from ._concurrency import CancelToken, renew_in_children
from ._errors import ORT_ERRORS, Cancelled
from ._properties import CacheHitMode
from ._request import CompileRequest, Pending, Upgrade
from ._sessions import SessionFactory
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
        # Where an instant hit's full-speed load runs, and how it is stopped (the Core's jobs:
        # ``CompileJobs.background``); unset, it is started by whoever gets the hit.
        self.start_background: Callable[[Upgrade], concurrent.futures.Future[Any] | None] | None = None
        self.cancel_background: Callable[[concurrent.futures.Future[Any]], None] = lambda future: None

    def _renew_in_child(self) -> None:
        self._io_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="aioov-io")

    def shutdown(self) -> None:
        self._io_pool.shutdown(wait=True)

    def load(
        self, cache: Cache, key: str, request: CompileRequest, token: CancelToken | None, *, locked: bool = False
    ) -> Loaded | NotCacheable | None:
        """Load the entry for ``key`` if present and intact; None means compile (and cache),
        ``NotCacheable`` compile without the cache."""
        found = cache.find(key, request.rules, locked=locked)
        if not isinstance(found, Found):
            return found
        try:
            return self._load(found, request, token)
        finally:
            found.release()

    def _load(self, found: Found, request: CompileRequest, token: CancelToken | None) -> Loaded | None:
        blob = request.device.blob
        assert blob is not None
        check = found.start_checks(blob.model_file, self._io_pool)
        if check is False:
            return None
        pending = None
        if blob.instant and request.config.cache_hit_mode is CacheHitMode.INSTANT:
            pending = Pending(self._upgrader(found.cache, found.key, request, found.variant))
            if check is None and self.start_background is not None:
                # Files already known good: the full-speed load need not wait for the instant
                # one (bulk loads still hold it back: ``CompileJobs.busy``).
                pending.started = self.start_background(pending.upgrade)
        loaded = None
        try:
            loaded = self._open_entry(found, request, token, check, pending)
        finally:
            if loaded is None and pending is not None and pending.started is not None:
                self.cancel_background(pending.started)
        return loaded

    def _open_entry(
        self, found: Found, request: CompileRequest, token: CancelToken | None,
        check: concurrent.futures.Future[str | None] | None, pending: Pending | None,
    ) -> Loaded | None:
        """The hit's own session, once its checks passed (None: the entry was bad, or is not loadable now)."""
        try:
            session, problem = self.open_blob(found.path, request, token, found.scratch, pending is not None,
                                              found.variant)
        except ORT_ERRORS as exc:
            problem = check.result() if check is not None else None
            if token is not None and token.cancelled:
                raise Cancelled() from exc
            if problem is None and _looks_transient(exc):
                # Out of memory and the like: the entry is not proven bad, so it stays.
                self._events.failed(f"load:{found.key}", "aioov cache: could not load entry %s now (%s); "
                                    "compiling instead", found.key[:16], exc)
                return None
            found.bad(problem or f"onnxruntime could not load it: {exc}")
            return None
        except OSError as exc:  # copying into the scratch directory: the entry is fine, the disk is not
            if check is not None:
                check.result()
            self._events.unwritable(found.cache.root, exc)
            return None
        if check is not None:
            problem = check.result() or problem
        if problem:
            del session
            found.bad(problem)
            return None
        return Loaded(session, pending, found.served(checked=check is not None))

    def _upgrader(self, cache: Cache, key: str, request: CompileRequest, variant: str) -> Upgrade:
        """The full-speed session for an instant hit (whose entry was checked), built later in
        a worker thread and warmed up as the instant one was. None: keep the instant session
        (the entry went away, the load failed)."""

        def upgrade(token: CancelToken) -> ort.InferenceSession | None:
            try:
                with cache.reading(key, request.rules, token.event) as folder:
                    session, problem = self.open_blob(folder, request, token, lambda: cache.scratch(key),
                                                      variant=variant)
                    if problem is not None or token.cancelled:
                        return None
                # WARMUP's promise (the first request costs what later ones do) holds after the swap too.
                warm_up(session, request.config, request.source.describe())
                return session
            except _UNLOADABLE as exc:
                logger.info("aioov cache: keeping the instant session of %s: %s", key[:16], exc)
                return None

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
