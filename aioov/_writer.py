"""Cache misses: write the entry, check it, publish it, share it, prune.

The writer works for a job that holds the key's lock (a ``Claim``) and gives the lock back
once the entry is published or given up. Formats that a second session can write (CPU's)
are written and checked in a builder process (``_builds``, ``_builder``), never here:

- by default (``CACHE_EXPORT=ASYNC``), ``compile`` builds the caller's session, and then a
  builder, run from the ``Exporter``'s thread at the lowest priority, writes the entry. The
  first compile costs what an uncached one does. Other processes that want the key meanwhile
  wait for the entry no longer than this compile took (``Claim.compiled``), then compile it
  themselves: a cold cache never makes a start slower than no cache;
- awaited (``CACHE_EXPORT=SYNC``), ``publish_now`` has a builder write, check and publish the
  entry at once, and the pipeline loads it like any hit: one compile in all, in the builder.

Variants are tried in the format's order; when none loads and computes what the source does,
a not-cacheable marker is published under the key instead. Formats written by the compile
itself (TensorRT, OpenVINO) are written in-process, unchecked. Failing here only ever means
"not cached": the compile still succeeds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime as ort

from ._builds import BuildClock, Builders, Timeout
from ._cache.cache import NOT_WORTH, TOO_BIG, Cache, CacheEvents, Claim, Exporter, SourceChanged
from ._concurrency import CancelToken
from ._errors import BlobError, Cancelled
from ._properties import ExportMode
from ._request import CompileRequest, Source
from ._sessions import SessionFactory
from ._variants import Failed, Job, Published, build_entry
from ._worth import not_worth

__all__ = ("EntryWriter",)

logger = logging.getLogger("aioov")


class EntryWriter:
    def __init__(self, sessions: SessionFactory, events: CacheEvents, exporter: Exporter) -> None:
        self._sessions = sessions
        self._events = events
        self._exporter = exporter
        self._builders = Builders()

    def shutdown(self) -> None:
        self._builders.close()

    def write(self, claim: Claim, request: CompileRequest, token: CancelToken) -> ort.InferenceSession | None:
        """The entry for ``claim``, and the caller's session: compiled here, the entry written by
        a builder after it in the background (``compile``); or None when the caller waits for
        the entry (``CACHE_EXPORT=SYNC``): then a builder writes and publishes it now, and the
        caller loads it like any hit (``publish_now``). Takes over ``claim``."""
        if not self.awaited(request):
            return self.compile(claim, request, token)
        self.publish_now(claim, request, token)
        return None

    def compile(self, claim: Claim, request: CompileRequest, token: CancelToken) -> ort.InferenceSession:
        """The caller's session; the entry is written by a builder in the background once it
        exists (or, for formats whose provider writes it, by this compile). Takes over
        ``claim``: its locks are released once the entry is published or given up."""
        blob = request.device.blob
        assert blob is not None
        if not blob.background:
            try:
                return self._compile_and_export(claim, request, token)
            finally:
                claim.release()
        timing = BuildClock()
        try:
            session = self._sessions.compile(request, token)
        except BaseException:
            claim.release()
            raise
        finally:
            timing.compiled()
        claim.beat(None)  # queued: waiters need not wait for exports ahead of it
        # A compile too short for any hit to save much is not worth a builder at all.
        why = None if request.config.cache_always else not_worth(timing.seconds, None)
        if why is not None and claim.others():  # they may be waiting for it: tell them now
            self._not_worth_job(claim, request, why)(token)
        elif why is not None:
            self._exporter.submit(self._not_worth_job(claim, request, why), on_drop=claim.release)
        else:
            assert timing.seconds is not None
            claim.compiled(timing.seconds)
            self._exporter.submit(self._export_job(claim, request, timing), on_drop=claim.release)
        return session

    @staticmethod
    def awaited(request: CompileRequest) -> bool:
        """Whether the caller waits for this entry (``CACHE_EXPORT=SYNC``): then ``publish_now``."""
        blob = request.device.blob
        if blob is None or not blob.background:
            return False  # written by the compile itself, before returning, anyway
        return request.config.cache_export is ExportMode.SYNC

    def publish_now(self, claim: Claim, request: CompileRequest, token: CancelToken) -> None:
        """Have a builder write, check and publish the entry now, at the caller's priority; the
        caller then loads it like any hit (one compile in all, in the builder). Releases
        ``claim``; the entry may still be missing after (a marker, a failure)."""
        clock = BuildClock(follows_builder=True)
        claim.beat(clock.progressed)
        try:
            self._guarded(claim, request, lambda: self._build_and_publish(
                claim, request, token, clock, background=False))
        finally:
            claim.release()
        if token.cancelled:
            raise Cancelled()

    def export_to(self, cache: Cache, key: str, request: CompileRequest, manifest: dict[str, Any]) -> None:
        """Write and publish an entry with no lock and no cache around it (``export_model``);
        raises OSError or BlobError."""
        blob = request.device.blob
        assert blob is not None
        store = cache.store
        if not blob.background:
            tmp = store.new_tmp(key)
            _stage_source(request, tmp)
            session = self._sessions.compile(request, None, export=(tmp, key))
            blob.finalize(tmp, [i.name for i in session.get_inputs()])
            store.publish(key, tmp, {**manifest, "build": _UNCHECKED})
            return
        built = self._build(cache, key, request, None, BuildClock(follows_builder=True), background=False)
        if not isinstance(built, tuple):
            raise BlobError("; ".join(built.reasons) if built else "the builder did not finish; try again")
        tmp, record = built
        try:
            store.publish(key, tmp, {**manifest, "build": record})
        finally:
            store.discard(tmp)

    def _compile_and_export(self, claim: Claim, request: CompileRequest, token: CancelToken) -> ort.InferenceSession:
        """Formats written by the compile itself (TensorRT, OpenVINO): one session that also
        saves the blob, published before returning."""
        cache = claim.cache
        try:
            tmp = cache.new_tmp(claim.key)
        except OSError as exc:
            self._events.unwritable(cache.root, exc)
            return self._sessions.compile(request, token)
        try:
            try:
                _stage_source(request, tmp)
            except OSError as exc:
                self._events.unwritable(cache.root, exc)
                return self._sessions.compile(request, token)
            except BlobError as exc:
                self._uncacheable(request.source, exc)
                return self._sessions.compile(request, token)
            session = self._sessions.compile(request, token, export=(tmp, claim.key))
            self._publish(claim, tmp, request, _UNCHECKED, [i.name for i in session.get_inputs()])
            return session
        finally:
            cache.discard(tmp)

    def _export_job(self, claim: Claim, request: CompileRequest, timing: BuildClock) -> Callable[[CancelToken], None]:
        def export(token: CancelToken) -> None:
            claim.beat(timing.progressed)
            try:
                self._guarded(claim, request, lambda: self._build_and_publish(
                    claim, request, token, timing, background=True))
            finally:
                claim.release()
                if self._exporter.pending <= 1:  # this job is the last: no builder kept idle
                    self._builders.close()

        return export

    def _not_worth_job(self, claim: Claim, request: CompileRequest, why: str) -> Callable[[CancelToken], None]:
        def record(_token: CancelToken) -> None:
            try:
                self._guarded(claim, request, lambda: self._remember_not_worth(claim, request, why))
            finally:
                claim.release()

        return record

    def _guarded(self, claim: Claim, request: CompileRequest, work: Callable[[], None]) -> None:
        """Run ``work`` (writing an entry): failing only ever means "not cached"."""
        try:
            work()
        except Cancelled:
            pass
        except OSError as exc:
            self._events.unwritable(claim.cache.root, exc)
        except Exception:  # an export must never take the process (or the compile) down
            self._events.count(errors=1)
            logger.exception("aioov cache: exporting %s failed", request.source.describe())

    def _build_and_publish(
        self, claim: Claim, request: CompileRequest, token: CancelToken, timeout: Timeout, *, background: bool
    ) -> None:
        """Build the entry in a builder and publish it, or a not-cacheable marker."""
        cache = claim.cache
        built = self._build(cache, claim.key, request, token, timeout, background=background)
        if built is None:
            return
        if isinstance(built, Failed) and built.not_worth is not None:
            self._remember_not_worth(claim, request, built.not_worth)
            return
        if isinstance(built, Failed):
            self._remember_uncacheable(claim, request, built.reasons)
            return
        tmp, record = built
        try:
            compiled = timeout.seconds if isinstance(timeout, BuildClock) else None
            why = None if request.config.cache_always else not_worth(compiled, record.get("load_cpu_seconds"))
            if why is not None:
                self._remember_not_worth(claim, request, why)
                return
            size = sum(f.stat().st_size for f in tmp.iterdir() if f.is_file())
            if request.max_cache_size and size > request.max_cache_size:
                # It would be pruned at once, and written again by every start: write nothing
                # that cannot be kept (a record, made again when the limit grows)
                logger.warning("aioov cache: %s not cached: its entry (%d bytes) is larger than CACHE_MAX_SIZE",
                               request.source.describe(), size)
                self._mark(claim, request, {
                    "reason": f"its entry ({size} bytes) is larger than CACHE_MAX_SIZE ({request.max_cache_size})",
                    "kind": TOO_BIG, "limit": request.max_cache_size})
                return
            self._publish(claim, tmp, request, record, abort=lambda: token.cancelled)
        finally:
            cache.discard(tmp)

    def _build(
        self, cache: Cache, key: str, request: CompileRequest, token: CancelToken | None, timeout: Timeout,
        *, background: bool,
    ) -> Published | Failed | None:
        """``build_entry``'s blob, or why every variant failed for good; None when it is worth
        trying later (counted, and said once)."""
        built = build_entry(self._builders, Job(cache, key, request, timeout, token, background))
        if not isinstance(built, Failed) or built.remember:
            return built
        self._events.count(errors=1)
        logger.warning("aioov cache: %s not cached this time: %s", request.source.describe(), "; ".join(built.reasons))
        return None

    def _remember_uncacheable(self, claim: Claim, request: CompileRequest, failures: list[str]) -> None:
        """Publish a marker in place of an entry: later compiles neither retry nor pay for the export."""
        self._events.count(errors=1)
        if self._mark(claim, request, {"reason": "; ".join(failures)}):
            logger.warning("aioov cache: %s cannot be cached on %s (%s); remembered under its key",
                           request.source.describe(), request.spec, "; ".join(failures))

    def _remember_not_worth(self, claim: Claim, request: CompileRequest, why: str) -> None:
        """Publish a "not worth caching" record in place of an entry: every process compiles
        the model at once, with no builder, no export and no wait (until aioov changes)."""
        if self._mark(claim, request, {"reason": why, "kind": NOT_WORTH}):
            logger.info("aioov cache: %s not cached: %s", request.source.describe(), why)

    @staticmethod
    def _mark(claim: Claim, request: CompileRequest, marker: dict[str, Any]) -> bool:
        """Publish ``marker``; False when the source changed (what was judged may not be what
        the key names: nothing is remembered)."""
        try:
            claim.mark(marker, request.rules, onnxruntime=ort.__version__)
        except SourceChanged:
            return False
        return True

    def _publish(
        self,
        claim: Claim,
        tmp: Path,
        request: CompileRequest,
        record: dict[str, Any],
        input_names: list[str] | None = None,
        abort: Callable[[], bool] | None = None,
    ) -> None:
        """Publish the blob written in ``tmp`` (``input_names``: finalize it here first) and
        hand what is left (upload, prune) to the export worker. Failing only means "not cached"."""
        assert request.device.blob is not None
        try:
            if input_names is not None:
                request.device.blob.finalize(tmp, input_names)
            for chore in claim.publish(tmp, record, request.rules, abort=abort):
                self._exporter.submit(chore.run, on_drop=chore.drop, idle=chore.idle)
        except SourceChanged:
            logger.warning("aioov cache: %s changed while it was compiled; not cached", request.source.describe())
        except OSError as exc:
            self._events.unwritable(claim.cache.root, exc)
        except BlobError as exc:
            self._uncacheable(request.source, exc)

    def _uncacheable(self, source: Source, exc: BlobError) -> None:
        self._events.count(errors=1)
        logger.warning("aioov cache: %s cannot be cached: %s", source.describe(), exc)


def _stage_source(request: CompileRequest, tmp: Path) -> None:
    """Put a copy of the source in an entry being written, where its format keeps one."""
    blob = request.device.blob
    assert blob is not None
    if blob.keeps_source:
        blob.stage_source(tmp, request.source.files())


#: what the manifest of an entry written by the compile itself says about its check
_UNCHECKED: dict[str, Any] = {"variant": "default", "check": "none"}

