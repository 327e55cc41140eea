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
from typing import TYPE_CHECKING, Any

from ._cache.locks import LockBusy
from ._concurrency import wait_first
from ._errors import AioovError

if TYPE_CHECKING:
    from ._cache.inflight import Job
    from ._compiled import CompiledModel
    from ._core import Core

__all__ = ("BulkProgress", "CompileResult", "compile_models")


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


def _identity(item: Any, device: str, config: Mapping[str, object] | None) -> tuple[Any, ...]:
    model = os.path.abspath(os.fspath(item)) if isinstance(item, (str, os.PathLike)) else id(item)
    return (model, device.upper(), json.dumps(dict(config or {}), sort_keys=True, default=str))


async def compile_models(
    core: Core,
    models: Iterable[Any],
    device: str,
    config: Mapping[str, object] | None,
    *,
    max_concurrency: int,
    fail_fast: bool,
    progress: Callable[[BulkProgress], object] | None,
) -> AsyncGenerator[CompileResult, None]:
    if max_concurrency < 1:
        raise ValueError("max_concurrency must be >= 1")
    items: list[tuple[Any, str, Mapping[str, object] | None]] = []
    for item in models:
        if isinstance(item, tuple):
            model, dev, cfg = (*item, None, None)[:3] if len(item) < 3 else item
            items.append((model, dev or device, cfg if cfg is not None else config))
        else:
            items.append((item, device, config))
    # Duplicates compile once: every index of a group gets the same result.
    groups: dict[tuple[Any, ...], list[int]] = {}
    for index, (model, dev, cfg) in enumerate(items):
        groups.setdefault(_identity(model, dev, cfg), []).append(index)
    queue = list(groups.values())
    queue.reverse()
    names = {dev for _, dev, _ in items if isinstance(dev, str)}
    concrete = {dev: await core._concrete(dev) for dev in names}  # AUTO resolved once, in a thread
    # Models whose cache lock another process holds (it is compiling them) are put aside and
    # retried last: meanwhile this process compiles what nobody else is compiling, so that
    # P processes loading the same M models share the work instead of queueing on each lock.
    deferred: list[list[int]] = []
    total = len(items)
    done = 0
    running: dict[Any, tuple[list[int], Job, float]] = {}

    def results_for(
        indexes: list[int], compiled: Any, error: BaseException | None, started: float
    ) -> Iterator[CompileResult]:
        seconds = time.perf_counter() - started
        for index in indexes:
            model, dev, _ = items[index]
            cached = bool(compiled is not None and compiled.get_property("LOADED_FROM_CACHE"))
            yield CompileResult(index, model, dev, compiled, error, seconds, cached)

    try:
        while queue or running or deferred:
            while (queue or deferred) and len(running) < max_concurrency:
                may_defer = bool(queue)
                indexes = queue.pop() if queue else deferred.pop(0)
                model, dev, cfg = items[indexes[0]]
                started = time.perf_counter()
                try:
                    name, via_auto = concrete.get(dev, (dev, False)) if isinstance(dev, str) else (dev, False)
                    job = core._submit(model, name, cfg, via_auto=via_auto, defer_if_busy=may_defer)
                except AioovError as exc:
                    if fail_fast:
                        raise
                    for result in results_for(indexes, None, exc, started):
                        done += 1
                        if progress is not None:
                            progress(BulkProgress(done, total, result))
                        yield result
                    continue
                running[job.future] = (indexes, job, started)
            if not running:
                continue
            await wait_first(list(running))
            for future in [f for f in running if f.done()]:
                indexes, job, started = running.pop(future)
                core._inflight.leave(job)
                compiled = None
                error_: BaseException | None = None
                try:
                    compiled = core._wrap(future.result(), job.key[0])  # type: ignore[index]
                except LockBusy:
                    deferred.append(indexes)
                    continue
                except Exception as exc:  # reported per model, never lost
                    error_ = exc
                    if fail_fast:
                        raise
                for result in results_for(indexes, compiled, error_, started):
                    done += 1
                    if progress is not None:
                        progress(BulkProgress(done, total, result))
                    yield result
    finally:
        for _, job, _ in running.values():
            core._inflight.leave(job)
