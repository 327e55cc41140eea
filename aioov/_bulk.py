"""Bulk start-up loading: many models, bounded concurrency, results as they finish.

No task group is held across a ``yield`` (that breaks cancel scopes when the
consumer stops early): compile jobs already run in the Core's worker threads,
so the generator only starts jobs, waits for the first to finish, and yields.
Leaving early (break, error, cancellation) releases every job it started; a
job nobody else waits for is cancelled, so no cache entry is left half-done.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ._compiled import CompiledModel
from ._concurrency import wait_first
from ._errors import AioovError, LockBusy, PropertyError
from ._jobs import CompileJobs, Job, Ticket
from ._request import Result

__all__ = ("BulkProgress", "CompileResult", "Planned", "compile_models", "parse_items")

#: one item of a bulk load as given: (model, device, config)
Item = tuple[Any, str, "Mapping[str, object] | None"]


@dataclass(frozen=True)
class CompileResult:
    """The outcome for one model of a bulk load."""

    index: int  # position in the input
    model: Any  # the item as given (path, Model, or the model of a tuple)
    device: str
    compiled: CompiledModel | None
    error: BaseException | None
    seconds: float
    from_cache: bool
    warmup_seconds: float = 0.0  # of ``seconds``, spent warming the model up (``WARMUP``)

    @property
    def ok(self) -> bool:
        return self.error is None

    def unwrap(self) -> CompiledModel:
        """The compiled model, or raise its error."""
        if self.error is not None:
            raise self.error
        assert self.compiled is not None
        return self.compiled


@dataclass(frozen=True)
class BulkProgress:
    """Given to the ``progress`` callback after each model."""

    done: int
    total: int
    current: CompileResult


@dataclass(frozen=True)
class Planned:
    """One item, ready to submit: its ticket, or the error that kept it from having one."""

    model: Any  # the item as given
    device: str
    config: Mapping[str, object] | None
    ticket: Ticket | AioovError


def parse_items(models: Iterable[Any], device: str, config: Mapping[str, object] | None) -> list[Item]:
    """Paths, Models, or ``(model, device, config)`` tuples (device and config optional)."""
    items: list[Item] = []
    for item in models:
        if isinstance(item, tuple):
            model, dev, cfg = (*item, None, None)[:3] if len(item) < 3 else item
            items.append((model, dev or device, cfg if cfg is not None else config))
        else:
            items.append((item, device, config))
    return items


def _identity(item: Any, device: str, config: Mapping[str, object] | None) -> tuple[Any, ...]:
    model = os.path.abspath(os.fspath(item)) if isinstance(item, (str, os.PathLike)) else id(item)
    return (model, str(device).upper(), json.dumps(dict(config or {}), sort_keys=True, default=str))


def _weight(model: Any) -> int:
    """What compiling ``model`` roughly costs: its size in bytes (0 when unknown)."""
    if isinstance(model, (bytes, bytearray, memoryview)):
        return len(model)
    path = model if isinstance(model, (str, os.PathLike)) else getattr(model, "path", None)
    if isinstance(path, (str, os.PathLike)):
        try:
            return os.stat(path).st_size
        except OSError:
            return 0
    data = getattr(model, "data", None)
    return len(data) if isinstance(data, (bytes, bytearray)) else 0


async def compile_models(
    jobs: CompileJobs,
    plan: list[Planned],
    wrap: Callable[[Result, Ticket], CompiledModel],
    *,
    max_concurrency: int,
    fail_fast: bool,
    progress: Callable[[BulkProgress], object] | None,
) -> AsyncGenerator[CompileResult, None]:
    if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
        raise PropertyError(f"max_concurrency must be an integer >= 1, got {max_concurrency!r}")
    # Duplicates compile once: every index of a group gets the same result.
    groups: dict[tuple[Any, ...], list[int]] = {}
    for index, item in enumerate(plan):
        groups.setdefault(_identity(item.model, item.device, item.config), []).append(index)
    # Largest first: the biggest model is the longest compile (and the one other processes
    # wait longest for); started last, it would finish alone while the other workers idle.
    queue = sorted(groups.values(), key=lambda indexes: (_weight(plan[indexes[0]].model), -indexes[0]))
    # Models whose cache lock another process holds (it is compiling them) are put aside and
    # retried last: meanwhile this process compiles what nobody else is compiling, so that
    # P processes loading the same M models share the work instead of queueing on each lock.
    deferred: list[list[int]] = []
    total = len(plan)
    done = 0
    running: dict[Any, tuple[list[int], Job, float]] = {}

    def results_for(
        indexes: list[int], compiled: CompiledModel | None, error: BaseException | None, started: float
    ) -> Iterator[CompileResult]:
        """The results of one group of identical items, each counted and reported to ``progress``."""
        nonlocal done
        seconds = time.perf_counter() - started
        for index in indexes:
            cached = bool(compiled is not None and compiled.get_property("LOADED_FROM_CACHE"))
            warmup = (compiled.warmup_seconds or 0.0) if compiled is not None else 0.0
            result = CompileResult(index, plan[index].model, plan[index].device, compiled, error, seconds, cached,
                                   warmup)
            done += 1
            if progress is not None:
                progress(BulkProgress(done, total, result))
            yield result

    # Instant hits' full-speed loads wait until the rest of the bulk is ready.
    with jobs.busy():
        try:
            while queue or running or deferred:
                while (queue or deferred) and len(running) < max_concurrency:
                    may_defer = bool(queue)
                    indexes = queue.pop() if queue else deferred.pop(0)
                    ticket = plan[indexes[0]].ticket
                    started = time.perf_counter()
                    try:
                        if isinstance(ticket, AioovError):
                            raise ticket
                        job = jobs.submit(ticket, defer_if_busy=may_defer)
                    except AioovError as exc:
                        if fail_fast:
                            raise
                        for result in results_for(indexes, None, exc, started):
                            yield result
                        continue
                    running[job.future] = (indexes, job, started)
                if not running:
                    continue
                await wait_first(list(running))
                for future in [f for f in running if f.done()]:
                    indexes, job, started = running.pop(future)
                    jobs.leave(job)
                    compiled = None
                    error_: BaseException | None = None
                    try:
                        ticket = plan[indexes[0]].ticket
                        assert isinstance(ticket, Ticket)
                        compiled = wrap(jobs.result(job), ticket)
                    except LockBusy:
                        deferred.append(indexes)
                        continue
                    except Exception as exc:  # reported per model, never lost
                        error_ = exc
                        if fail_fast:
                            raise
                    for result in results_for(indexes, compiled, error_, started):
                        yield result
        finally:
            for _, job, _ in running.values():
                jobs.leave(job)
