"""Cache misses: write the entry, check it, publish it, share it, prune.

The writer works for a job that holds the key's lock (a ``Claim``) and gives the lock back
once the entry is published or given up. With ``CACHE_EXPORT=ASYNC`` and a format that can
be written by a second session (CPU), the caller's session is built first and the blob is
written afterwards on the ``Exporter``'s low-priority thread; otherwise the compile itself
writes the blob. Failing here only ever means "not cached": the compile still succeeds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnxruntime as ort

from ._cache import auth
from ._cache.export import Exporter
from ._cache.key import FileStat
from ._cache.locks import KeyLock
from ._cache.stats import CacheEvents
from ._cache.store import CacheStore
from ._cache.tiered import RemoteLink
from ._concurrency import CancelToken
from ._errors import ORT_ERRORS, BlobError
from ._properties import ExportMode
from ._request import CompileRequest, Source
from ._sessions import SessionFactory

__all__ = ("Claim", "EntryWriter")

logger = logging.getLogger("aioov")


@dataclass
class Claim:
    """A key this job compiles for everyone: the locks it holds until the entry is published
    (or given up), and what the entry will say about itself."""

    store: CacheStore
    key: str
    lock: KeyLock
    manifest: dict[str, Any]
    stats: list[FileStat] | None  # the source files as hashed; an export re-checks them
    remote: RemoteLink | None = None

    def release(self) -> None:
        if self.remote is not None:
            self.remote.release()
        self.lock.release()


class EntryWriter:
    def __init__(self, sessions: SessionFactory, events: CacheEvents, exporter: Exporter) -> None:
        self._sessions = sessions
        self._events = events
        self._exporter = exporter

    def compile(self, claim: Claim, request: CompileRequest, token: CancelToken) -> ort.InferenceSession:
        """The caller's session, and the entry written now or in the background. Takes over
        ``claim``: its locks are released once the entry is published or given up."""
        assert request.device.blob is not None
        if request.config.cache_export is ExportMode.SYNC or not request.device.blob.background:
            try:
                return self._compile_and_export(claim, request, token)
            finally:
                claim.release()
        try:
            session = self._sessions.compile(request, token)
        except BaseException:
            claim.release()
            raise
        self._exporter.submit(self._export_job(claim, request), on_drop=claim.release)
        return session

    def export_to(self, store: CacheStore, key: str, request: CompileRequest, manifest: dict[str, Any]) -> None:
        """Write and publish an entry with no lock and no cache around it (``export_model``);
        raises OSError or BlobError."""
        assert request.device.blob is not None
        tmp = store.new_tmp(key)
        _stage_source(request, tmp)
        session = self._sessions.compile(request, None, export=(tmp, key))
        request.device.blob.finalize(tmp, [i.name for i in session.get_inputs()])
        store.publish(key, tmp, manifest)

    def _compile_and_export(self, claim: Claim, request: CompileRequest, token: CancelToken) -> ort.InferenceSession:
        """CACHE_EXPORT=SYNC: one session that also saves the blob, published before returning."""
        store = claim.store
        try:
            tmp = store.new_tmp(claim.key)
        except OSError as exc:
            self._events.unwritable(store.root, exc)
            return self._sessions.compile(request, token)
        try:
            try:
                _stage_source(request, tmp)
            except OSError as exc:
                self._events.unwritable(store.root, exc)
                return self._sessions.compile(request, token)
            except BlobError as exc:
                self._uncacheable(request.source, exc)
                return self._sessions.compile(request, token)
            session = self._sessions.compile(request, token, export=(tmp, claim.key))
            self._publish(claim, tmp, request, [i.name for i in session.get_inputs()])
            return session
        finally:
            store.discard(tmp)

    def _export_job(self, claim: Claim, request: CompileRequest) -> Callable[[CancelToken], None]:
        store, source = claim.store, request.source

        def export(token: CancelToken) -> None:
            tmp: Path | None = None
            try:
                tmp = store.new_tmp(claim.key)
                _stage_source(request, tmp)
                blob = request.device.blob
                assert blob is not None
                options = self._sessions.options(request.config)
                if options.use_per_session_threads:
                    options.intra_op_num_threads = 1
                    options.inter_op_num_threads = 1
                writing = blob.configure_export(options, request.providers, tmp, claim.key,
                                                request.config.cache_prepack)
                session = self._sessions.open(source.ort_input, options, request, writing, token)
                inputs = [i.name for i in session.get_inputs()]
                del session
                self._publish(claim, tmp, request, inputs, abort=lambda: token.cancelled)
            except OSError as exc:
                self._events.unwritable(store.root, exc)
            except BlobError as exc:
                self._uncacheable(source, exc)
            except ORT_ERRORS as exc:
                if not token.cancelled:
                    self._events.count(errors=1)
                    logger.warning("aioov cache: exporting %s failed: %s", source.describe(), exc)
            except Exception:  # an export must never take the process down
                self._events.count(errors=1)
                logger.exception("aioov cache: exporting %s failed", source.describe())
            finally:
                if tmp is not None:
                    store.discard(tmp)
                claim.release()

        return export

    def _publish(
        self,
        claim: Claim,
        tmp: Path,
        request: CompileRequest,
        input_names: list[str],
        abort: Callable[[], bool] | None = None,
    ) -> None:
        """Check the blob written in ``tmp``, publish it, share it. Failing only means "not cached"."""
        assert request.device.blob is not None
        store = claim.store
        try:
            if claim.stats is not None and [FileStat.of(s.path) for s in claim.stats] != claim.stats:
                # What was compiled may not be what was hashed: the key would lie.
                logger.warning("aioov cache: %s changed while it was compiled; not cached", request.source.describe())
                return
            request.device.blob.finalize(tmp, input_names)
            if store.publish(claim.key, tmp, claim.manifest, abort=abort,
                             mac_key=auth.key_of(request.config.cache_hmac_key)):
                self._events.count(exports=1)
                # Local waiters and readers need not wait for the upload: the entry is here.
                claim.lock.release()
                if claim.remote is not None:
                    claim.remote.share(claim.key)
                self._prune_if_needed(store, request.max_cache_size)
        except OSError as exc:
            self._events.unwritable(store.root, exc)
        except BlobError as exc:
            self._uncacheable(request.source, exc)

    def _prune_if_needed(self, store: CacheStore, limit: int) -> None:
        if not limit:
            return
        try:
            removed = store.prune(max_size=limit)
        except Exception as exc:  # the entry is published: a failed prune is the cache's, not the compile's
            self._events.failed(f"prune:{store.root}", "aioov cache: pruning %s failed: %s", store.root, exc)
            return
        if removed:
            logger.info("aioov cache: pruned %d entries to stay under %d bytes", len(removed), limit)

    def _uncacheable(self, source: Source, exc: BlobError) -> None:
        self._events.count(errors=1)
        logger.warning("aioov cache: %s cannot be cached: %s", source.describe(), exc)


def _stage_source(request: CompileRequest, tmp: Path) -> None:
    """Put a copy of the source in an entry being written, where its format keeps one."""
    blob = request.device.blob
    assert blob is not None
    if blob.keeps_source:
        blob.stage_source(tmp, request.source.files())
