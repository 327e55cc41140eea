"""Which blob of a cache entry is published: the format's variants, each written and checked
by a builder process (``_builds``, ``_builder``), in turn until one passes.

For CPU entries that is the ``plain`` blob, then (``CACHE_PREPACK=AUTO``) the ``prepacked``
one, published instead only where its hit loads much sooner: the builder times both loads.
``ALWAYS`` tries ``prepacked`` first and publishes it wherever it passes. Variants that killed
a process running them (``_cache/sentinel``) are never tried again for that key. The
manifest's ``build`` record says which variant was published, at which shapes it was
checked, which failed before it, and why a faster one was not published.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._buildjob import BuildJob, BuildReply
from ._builds import BuildClock, Builders, BuildReport, Timeout
from ._cache.cache import Cache
from ._concurrency import CancelToken
from ._properties import PrepackMode
from ._request import CompileRequest

__all__ = ("FASTER_SECONDS", "FASTER_SHARE", "Failed", "Job", "Published", "build_entry")

logger = logging.getLogger("aioov")

#: a checked blob in a temporary directory of the store, and the manifest's ``build`` record
Published = tuple[Path, dict[str, Any]]


@dataclass(frozen=True)
class Job:
    """One entry to build: where, of what, and how long a builder may take for a variant."""

    cache: Cache
    key: str
    request: CompileRequest
    timeout: Timeout
    token: CancelToken | None
    background: bool


@dataclass(frozen=True)
class Failed:
    """No variant passed: why each failed, and whether that says something about the model
    (``remember``: publish a not-cacheable marker) or only about now (a time limit, a kill)."""

    reasons: list[str]
    remember: bool
    #: why the model is not worth caching, where a builder found so before its checks
    not_worth: str | None = None


def build_entry(builders: Builders, job: Job) -> Published | Failed:
    """The first variant that passes its check (or a faster one in its place), or why none
    did. Raises OSError (the cache) and Cancelled."""
    request = job.request
    blob = request.device.blob
    assert blob is not None
    crashed = job.cache.crashed(job.key)
    failures = [f"{variant}: {how}" for variant, how in crashed.items()]
    remember = True  # every variant failed its check: publish a marker
    prepack = request.config.cache_prepack
    with _SourceFile(job) as model:
        attempt = _Attempt(builders, job, model)
        variants = blob.variants(prepack is PrepackMode.ALWAYS)
        faster = blob.faster_variant(False) if prepack is PrepackMode.AUTO else None
        for variant in variants:
            if variant in crashed:
                continue
            built = attempt(variant)
            if built.tmp is not None:
                if variant == variants[0] and faster is not None and faster not in crashed:
                    built = _faster(attempt, built, faster)
                tmp, record = built.result()
                earlier = {"failed": failures[len(crashed):]} if len(failures) > len(crashed) else {}
                return tmp, {**record, **earlier, **({"crashed": crashed} if crashed else {})}
            reply = built.report.reply
            if reply is not None and reply.stage == "not worth":
                return Failed(failures, True, not_worth=reply.reason)
            failures.append(f"{variant}: {built.report.reason}")
            remember = remember and not built.report.transient
            if built.report.stop:
                break
    return Failed(failures, remember)


def _faster(attempt: _Attempt, built: _Built, faster: str) -> _Built:
    """``built``, or ``faster``'s blob where it passes and its hit loads much sooner. The one
    not chosen is discarded."""
    why = _faster_pays(built.report.reply, None)
    if why is None:
        try:
            other = attempt(faster, judged=False)  # the first variant was worth it: so is a faster one
        except BaseException:
            built.discard(attempt.cache)
            raise
        why = (_faster_pays(built.report.reply, other.report.reply) if other.tmp is not None
               else f"failed: {other.report.reason}")
        if other.tmp is not None and why is None:
            built.discard(attempt.cache)
            return other
        other.discard(attempt.cache)
    built.notes[faster] = why
    return built


#: a faster variant (prepacked weights) is published where its hit's load takes at least this
#: share less than the first variant's, and this many seconds less (docs/cache.md: which pass)
FASTER_SHARE = 0.25
FASTER_SECONDS = 0.05


def _faster_pays(first: BuildReply | None, faster: BuildReply | None) -> str | None:
    """None where the faster variant's hit loads enough sooner than the first's; else why it
    is not published. ``faster`` None: whether it is worth building, from the first's loads
    with and without repacking weights: the most prepacking can save, of which transformers
    saved a quarter to a half (``benchmarks/prepack.py``), so twice the thresholds."""
    load = first.load_seconds if first is not None else None
    bound = (first.instant_load_seconds if first is not None else None) if faster is None else faster.load_seconds
    if load is None or bound is None:
        return "not tried: the loads were not timed"
    saved, factor = load - bound, 2 if faster is None else 1
    if saved >= factor * FASTER_SECONDS and saved >= factor * FASTER_SHARE * load:
        return None
    return (f"not worth it: a hit would load in {bound:.3f} s instead of {load:.3f} s" if faster is not None
            else f"not tried: a hit loads in {load:.3f} s, at most {max(saved, 0):.3f} s of it repacking weights")


@dataclass
class _Built:
    """One variant, written and checked (``tmp``), or why not (``report``)."""

    variant: str
    report: BuildReport
    tmp: Path | None
    #: what the manifest's record says beside the report (why a faster variant was not chosen)
    notes: dict[str, Any] = field(default_factory=dict)

    def result(self) -> Published:
        assert self.tmp is not None
        reply = self.report.reply
        assert reply is not None  # it passed
        return self.tmp, {"variant": self.variant, **reply.record(), **self.notes}

    def discard(self, cache: Cache) -> None:
        if self.tmp is not None:
            cache.discard(self.tmp)


class _Attempt:
    """Writes and checks variants of one entry in builders (``__call__``)."""

    def __init__(self, builders: Builders, job: Job, model: str) -> None:
        self.builders, self.job, self.model = builders, job, model
        self.cache = job.cache

    def __call__(self, variant: str, *, judged: bool = True) -> _Built:
        job = self.job
        tmp = self.cache.new_tmp(job.key)
        try:
            seconds = compile_seconds(job.request, job.timeout) if judged else None
            report = self.builders.build(_job(job.request, self.model, tmp, job.key, variant, background=job.background,
                                              compile_seconds=seconds), job.timeout, job.token)
        except BaseException:
            self.cache.discard(tmp)
            raise
        if report.ok:
            return _Built(variant, report, tmp)
        self.cache.discard(tmp)
        if report.reply is None or report.reply.stage != "not worth":  # (said once, by the writer)
            logger.info("aioov cache: the %s blob of %s failed: %s", variant, job.request.source.describe(),
                        report.reason)
        return _Built(variant, report, None)


class _SourceFile:
    """The source as a file a builder can read: its own path, or its bytes written into the cache."""

    def __init__(self, job: Job) -> None:
        self._job = job
        self._dir: Path | None = None

    def __enter__(self) -> str:
        model = self._job.request.source.ort_input
        if not isinstance(model, bytes):
            return model
        self._dir = self._job.cache.new_tmp(self._job.key)
        try:
            (self._dir / "source.onnx").write_bytes(model)
        except BaseException:
            self._job.cache.discard(self._dir)
            raise
        return str(self._dir / "source.onnx")

    def __exit__(self, *exc_info: object) -> None:
        if self._dir is not None:
            self._job.cache.discard(self._dir)


def compile_seconds(request: CompileRequest, timeout: Timeout) -> float | None:
    """The caller's compile, which a builder judges the model's worth against (``timeout``
    timed it); None where the builder does not judge it: an awaited build's worth is judged
    once it is built (``_writer``), an export's never, nor one with ``CACHE_ALWAYS``."""
    if isinstance(timeout, BuildClock) and not timeout.follows_builder and not request.config.cache_always:
        return timeout.seconds
    return None


def _job(request: CompileRequest, model: str, tmp: Path, key: str, variant: str, *, background: bool,
         compile_seconds: float | None = None) -> BuildJob:
    """What a builder needs to write and check one variant of ``request``'s blob."""
    blob = request.device.blob
    assert blob is not None
    config = request.config
    return BuildJob(
        model=model,
        tmp=str(tmp),
        key=key,
        blob=blob.kind,
        variant=variant,
        providers=blob.builder_providers(request.providers),
        opt_level=config.ort_graph_optimization_level,
        session_config=dict(config.ort_session_config),
        custom_ops=list(config.ort_custom_ops_libraries),
        free_dimensions=dict(config.ort_free_dimension_overrides),
        shapes={k: list(v) for k, v in (config.warmup_shapes or {}).items()},
        values=dict(config.warmup_values),
        check_shapes=[{k: list(v) for k, v in shapes.items()} for shapes in config.check_shapes],
        background=background,
        compile_seconds=compile_seconds,
    )
