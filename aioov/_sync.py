"""``SyncCore``: aioov for code that is not async (scripts, notebooks, Flask, Django, gunicorn's
sync workers), as httpx has ``Client`` beside ``AsyncClient``.

A ``SyncCore`` owns a ``Core`` and runs it on an event loop of its own, in a daemon thread
(an anyio ``BlockingPortal``), started by the first call that needs it::

    caller threads ──portal.call──► aioov-sync-core thread: event loop ──► Core's compile pool
    (blocking)                       (awaits only)

Each blocking call hands its coroutine to that loop and waits for it, so calls from many
threads of a server run concurrently and identical compiles are shared, as they are for a
``Core``'s callers. A compiled model needs no loop at all: ``SyncCompiledModel.infer`` runs
ONNX Runtime in the calling thread, at most ``NUM_STREAMS`` at once per model.

A blocking call made on an event loop's thread stalls that loop until it returns: it works,
with a ``RuntimeWarning`` (``await`` a ``Core`` there instead). After ``fork()`` the child
starts a loop of its own on its first call (the parent's thread did not come along).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import queue
import threading
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import anyio
import numpy as np
from anyio.from_thread import BlockingPortal

from ._bulk import BulkProgress, CompileResult
from ._cache.cache import CacheStats
from ._compiled import (
    CompiledModel,
    InferInputs,
    InferResults,
    ModelMetadata,
    OutputKeys,
    Port,
    RunOptionsLike,
    warn_if_blocking_a_loop,
)
from ._concurrency import renew_in_children
from ._core import CLOSE_TIMEOUT, Core, ModelSource
from ._devices import DeviceRegistry
from ._errors import AioovError, InferenceError
from ._model import Model

__all__ = ("SyncCompileResult", "SyncCompiledModel", "SyncCore", "SyncInferRequest")

T = TypeVar("T")


class _Loop:
    """An event loop serving a ``BlockingPortal`` in a daemon thread: an interpreter that exits
    without ``close()`` is not kept waiting for it (the Core's exports have their own limit)."""

    def __init__(self) -> None:
        ready: concurrent.futures.Future[BlockingPortal] = concurrent.futures.Future()

        async def serve() -> None:
            async with BlockingPortal() as portal:
                ready.set_result(portal)
                await portal.sleep_until_stopped()

        def run() -> None:
            try:
                anyio.run(serve)
            except BaseException as exc:  # pragma: no cover - the loop could not even start
                if not ready.done():
                    ready.set_exception(exc)

        self.thread = threading.Thread(target=run, name="aioov-sync-core", daemon=True)
        self.thread.start()
        self.portal = ready.result()

    def stop(self) -> None:
        """Stop the loop and wait for its thread (from any thread but its own)."""
        with contextlib.suppress(RuntimeError):  # stopped already
            self.portal.call(self.portal.stop)
        self.thread.join()

    def stop_soon(self) -> None:
        """Stop the loop without waiting (a SyncCore collected unclosed: this may run in any
        thread, the loop's own included)."""
        with contextlib.suppress(RuntimeError):
            self.portal.start_task_soon(self.portal.stop)


class SyncCore:
    """A blocking ``Core``, for code that is not async: the same methods, properties and
    cache, returning ``SyncCompiledModel``\\ s whose ``infer`` blocks::

        with aioov.SyncCore(cache_dir="/var/cache/aioov") as core:
            compiled = core.compile_model("model.onnx", "CPU")
            results = compiled.infer({"input": array})

    Safe to share between threads (a sync web server's workers): its calls run concurrently
    on an event loop in a thread of its own. ``close()`` (or leaving ``with``) finishes the
    cache's pending exports and stops that thread; a closed SyncCore raises ``AioovError``.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        max_concurrent_compiles: int | None = None,
        properties: Mapping[str, object] | None = None,
        devices: DeviceRegistry | None = None,
    ) -> None:
        self._core = Core(cache_dir, max_concurrent_compiles=max_concurrent_compiles, properties=properties,
                          devices=devices)
        self._closed = False
        self._renew_in_child()
        renew_in_children(self)

    def _renew_in_child(self) -> None:
        """No loop yet (or, after fork, none: the parent's thread did not come along)."""
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer.detach()  # the parent's loop is not this process's to stop
        self._lock = threading.Lock()
        self._loop: _Loop | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    # -- the loop ----------------------------------------------------------------------
    def _portal(self) -> BlockingPortal:
        with self._lock:
            if self._closed:
                raise AioovError("this SyncCore is closed")
            if self._loop is None:
                self._loop = _Loop()
                self._finalizer = weakref.finalize(self, self._loop.stop_soon)
            return self._loop.portal

    def _call(self, func: Callable[..., Awaitable[T]], *args: Any) -> T:
        return self._portal().call(func, *args)

    @property
    def core(self) -> Core:
        """The async ``Core`` underneath (its loop is this SyncCore's: await it only there)."""
        return self._core

    # -- lifecycle ----------------------------------------------------------------------
    def __enter__(self) -> SyncCore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self, *, timeout: float | None = CLOSE_TIMEOUT, abandon: bool = False) -> None:
        """``Core.aclose``, blocking: finish pending cache exports for up to ``timeout`` seconds
        (``abandon=True``: at once), then stop the loop's thread. Closing twice is harmless."""
        warn_if_blocking_a_loop("SyncCore.close", "await core.aclose() on a Core instead")
        with self._lock:
            if self._closed:
                return
            loop = self._loop
            self._closed = True
        if loop is None:  # never used: nothing runs, nothing to export
            self._loop = _Loop()
            loop = self._loop
        try:
            loop.portal.call(functools.partial(self._core.aclose, timeout=timeout, abandon=abandon))
        finally:
            if self._finalizer is not None:
                self._finalizer.detach()
            loop.stop()

    def wait_exports(self, timeout: float | None = None) -> bool:
        """Wait until every background export has been published; False on timeout."""
        warn_if_blocking_a_loop("SyncCore.wait_exports", "await core.wait_exports() on a Core instead")
        return self._call(self._core.wait_exports, timeout)

    @property
    def pending_exports(self) -> int:
        return self._core.pending_exports

    @property
    def cache_stats(self) -> CacheStats:
        """This process's cache counters: hits, misses, compiles, exports, errors..."""
        return self._core.cache_stats

    # -- properties and devices ----------------------------------------------------------
    def set_property(
        self, device_or_props: str | Mapping[str, object], props: Mapping[str, object] | None = None
    ) -> None:
        """``set_property({"CACHE_DIR": d})`` for the Core, ``set_property("CPU", {...})`` per device."""
        self._core.set_property(device_or_props, props)

    def get_property(self, device_or_name: str, name: str | None = None) -> Any:
        """``get_property("CACHE_DIR")`` or ``get_property("CPU", "OPTIMIZATION_CAPABILITIES")``."""
        return self._core.get_property(device_or_name, name)

    def get_available_devices(self) -> list[str]:
        """Devices whose execution provider really loads here (the first call probes them)."""
        return self._core.get_available_devices()

    # -- models --------------------------------------------------------------------------
    def read_model(self, model: str | os.PathLike[str] | bytes | Any) -> Model:
        """Read and check an ONNX model (file path, bytes or ``onnx.ModelProto``)."""
        warn_if_blocking_a_loop("SyncCore.read_model", "await core.read_model(...) on a Core instead")
        return self._call(self._core.read_model, model)

    def compile_model(
        self, model: ModelSource, device: str = "AUTO", config: Mapping[str, object] | None = None
    ) -> SyncCompiledModel:
        """Compile ``model`` for ``device``; from the cache when ``CACHE_DIR`` is set. Identical
        concurrent calls (from any threads) share one compile."""
        warn_if_blocking_a_loop("SyncCore.compile_model", "await core.compile_model(...) on a Core instead")
        return SyncCompiledModel(self._call(self._core.compile_model, model, device, config), self)

    def compile_all(
        self,
        models: Iterable[Any],
        device: str = "AUTO",
        config: Mapping[str, object] | None = None,
        *,
        max_concurrency: int | None = None,
        fail_fast: bool = False,
        progress: Callable[[BulkProgress], object] | None = None,
    ) -> list[SyncCompileResult]:
        """Compile many models concurrently and return every result in input order (see
        ``Core.compile_models``). ``progress`` is called in the SyncCore's loop thread, with
        ``Core``'s ``BulkProgress``."""
        warn_if_blocking_a_loop("SyncCore.compile_all", "await core.compile_all(...) on a Core instead")
        results = self._call(functools.partial(
            self._core.compile_all, models, device, config, max_concurrency=max_concurrency, fail_fast=fail_fast,
            progress=progress,
        ))
        return [SyncCompileResult.of(result, self) for result in results]

    def compile_models(
        self,
        models: Iterable[Any],
        device: str = "AUTO",
        config: Mapping[str, object] | None = None,
        *,
        max_concurrency: int | None = None,
        fail_fast: bool = False,
        progress: Callable[[BulkProgress], object] | None = None,
    ) -> Iterator[SyncCompileResult]:
        """Like ``compile_all``, but yields each result as it finishes. Leaving the loop early
        (or ``close()`` on the iterator) cancels the compiles still pending, and waits for them
        to stop: no half-written cache entries."""
        warn_if_blocking_a_loop("SyncCore.compile_models", "use Core.compile_models on an event loop")
        self._portal()  # a closed SyncCore raises here, not at the first result
        stream = functools.partial(self._core.compile_models, models, device, config, max_concurrency=max_concurrency,
                                   fail_fast=fail_fast, progress=progress)
        return self._stream(stream)

    def _stream(self, open_stream: Callable[[], AsyncGenerator[CompileResult, None]]) -> Iterator[SyncCompileResult]:
        """``open_stream()``'s results, from a task on the loop that starts with the first
        ``next()`` and ends (cancelled, if need be) before this generator does."""
        done = object()
        results: queue.Queue[Any] = queue.Queue()

        async def produce() -> None:
            try:
                async with contextlib.aclosing(open_stream()) as stream:
                    async for result in stream:
                        results.put(result)
            finally:
                results.put(done)

        task = self._portal().start_task_soon(produce)
        finished = False
        try:
            while (result := results.get()) is not done:
                yield SyncCompileResult.of(result, self)
            finished = True
            task.result()  # fail_fast: the first error
        finally:
            if not finished:
                task.cancel()  # cancels the compiles pending...
                while results.get() is not done:  # ...and the task ends once they have stopped
                    pass

    def export_model(
        self,
        model: ModelSource,
        destination: str | os.PathLike[str],
        device: str = "CPU",
        config: Mapping[str, object] | None = None,
    ) -> Path:
        """Compile ``model`` and write its blob into the new directory ``destination``, for
        ``import_model``."""
        warn_if_blocking_a_loop("SyncCore.export_model", "await core.export_model(...) on a Core instead")
        return self._call(self._core.export_model, model, destination, device, config)

    def import_model(
        self, blob: str | os.PathLike[str], device: str = "CPU", config: Mapping[str, object] | None = None
    ) -> SyncCompiledModel:
        """Load a blob written by ``export_model``; ``CacheError`` if it is damaged or foreign."""
        warn_if_blocking_a_loop("SyncCore.import_model", "await core.import_model(...) on a Core instead")
        return SyncCompiledModel(self._call(self._core.import_model, blob, device, config), self)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<SyncCore {state} cache_dir={self._core.get_property('CACHE_DIR')!r}>"


class SyncCompiledModel:
    """A compiled model for code that is not async (``SyncCore.compile_model``): ``infer`` and
    ``compiled(inputs)`` run the model in the calling thread and return its ``InferResults``,
    at most ``NUM_STREAMS`` at once (others wait). No event loop is involved: inference
    works after its SyncCore is closed, from any thread."""

    def __init__(self, compiled: CompiledModel, core: SyncCore) -> None:
        self._compiled = compiled
        self._core = weakref.ref(core)  # for export_model only: a model does not keep its Core
        self._streams = threading.BoundedSemaphore(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))

    @property
    def compiled_model(self) -> CompiledModel:
        """The async ``CompiledModel`` underneath (``await compiled_model.infer(...)`` on a loop)."""
        return self._compiled

    def infer(
        self, inputs: InferInputs, *, outputs: OutputKeys | None = None, run_options: RunOptionsLike | None = None,
    ) -> InferResults:
        """Run the model on ``inputs``; outputs by name, in model order, also by index and by
        ``Port``. ``InferenceError`` when the inputs do not match the model or ONNX Runtime
        fails running them. ``outputs`` and ``run_options``: as ``CompiledModel.infer``'s."""
        warn_if_blocking_a_loop("SyncCompiledModel.infer", "await compiled.infer(inputs) on a Core's model instead")
        with self._streams:
            return self._compiled._infer_blocking(inputs, outputs=outputs, run_options=run_options)

    def __call__(
        self, inputs: InferInputs, *, outputs: OutputKeys | None = None, run_options: RunOptionsLike | None = None,
    ) -> InferResults:
        """``compiled(inputs)``: the same as ``compiled.infer(inputs)``, as in OpenVINO."""
        warn_if_blocking_a_loop("SyncCompiledModel.__call__", "await compiled(inputs) on a Core's model instead")
        with self._streams:
            return self._compiled._infer_blocking(inputs, outputs=outputs, run_options=run_options)

    def create_infer_request(self) -> SyncInferRequest:
        return SyncInferRequest(self)

    @property
    def session(self) -> Any:
        """The ``onnxruntime.InferenceSession`` serving now (for features aioov does not wrap)."""
        return self._compiled.session

    @property
    def device(self) -> str:
        return self._compiled.device

    @property
    def inputs(self) -> list[Port]:
        return self._compiled.inputs

    @property
    def outputs(self) -> list[Port]:
        return self._compiled.outputs

    @property
    def metadata(self) -> ModelMetadata:
        """The model's producer, graph name, domain, description, version and custom metadata."""
        return self._compiled.metadata

    @property
    def warmup_seconds(self) -> float | None:
        """Seconds ``WARMUP`` took; None: not warmed up (not asked for, or not possible)."""
        return self._compiled.warmup_seconds

    def input(self, key: int | str = 0) -> Port:
        """An input by index or name; ``InferenceError`` when the model has no such input."""
        return self._compiled.input(key)

    def output(self, key: int | str = 0) -> Port:
        """An output by index or name; ``InferenceError`` when the model has no such output."""
        return self._compiled.output(key)

    def get_property(self, name: str) -> Any:
        """``LOADED_FROM_CACHE``, ``CACHE_KEY``, ``EXECUTION_DEVICES``, or a compile property."""
        return self._compiled.get_property(name)

    def wait_full_speed(self) -> None:
        """Block until the full-speed session serves: at once unless this model came from an
        instant cache hit (``CACHE_HIT_MODE=INSTANT``) whose full-speed session is still loading."""
        warn_if_blocking_a_loop("SyncCompiledModel.wait_full_speed", "await compiled.wait_full_speed() instead")
        self._compiled._wait_full_speed_blocking()

    def export_model(self, destination: str | os.PathLike[str]) -> None:
        """Write this model's blob to a directory, for ``SyncCore.import_model`` (through the
        SyncCore that compiled it, which must still be open)."""
        warn_if_blocking_a_loop("SyncCompiledModel.export_model", "await compiled.export_model(...) instead")
        core = self._core()
        if core is None:
            raise AioovError("the SyncCore that compiled this model is gone; use SyncCore.export_model")
        core._call(self._compiled.export_model, destination)

    def __repr__(self) -> str:
        return repr(self._compiled).replace("<CompiledModel", "<SyncCompiledModel", 1)


class SyncInferRequest:
    """OpenVINO's infer request, blocking: one inference at a time, results kept on the request."""

    def __init__(self, compiled: SyncCompiledModel) -> None:
        self._compiled = compiled
        self._results: InferResults | None = None

    @property
    def compiled_model(self) -> SyncCompiledModel:
        return self._compiled

    @property
    def results(self) -> InferResults:
        """The last inference's outputs (empty before the first)."""
        return self._results if self._results is not None else InferResults(self._compiled.outputs, ())

    def infer(self, inputs: InferInputs) -> InferResults:
        warn_if_blocking_a_loop("SyncInferRequest.infer", "await request.infer(inputs) on a Core's model instead")
        self._results = self._compiled._compiled._infer_blocking(inputs)
        return self._results

    def get_output_tensor(self, key: int | str | Port = 0) -> np.ndarray:
        """An output of the last inference, by index, name or ``Port``; ``InferenceError``
        before any inference, or for an output the model does not have."""
        name = self._compiled.output(key.name if isinstance(key, Port) else key).name
        if self._results is None:
            raise InferenceError(f"no inference has run on this request yet: no output {name!r} to get")
        return self._results[name]


@dataclass(frozen=True)
class SyncCompileResult:
    """The outcome for one model of ``SyncCore.compile_all`` / ``compile_models``: a
    ``CompileResult`` whose ``compiled`` is a ``SyncCompiledModel``."""

    index: int  # position in the input
    model: Any  # the item as given (path, Model, or the model of a tuple)
    device: str
    compiled: SyncCompiledModel | None
    error: BaseException | None
    seconds: float
    from_cache: bool
    warmup_seconds: float = 0.0  # of ``seconds``, spent warming the model up (``WARMUP``)

    @classmethod
    def of(cls, result: CompileResult, core: SyncCore) -> SyncCompileResult:
        compiled = SyncCompiledModel(result.compiled, core) if result.compiled is not None else None
        return cls(result.index, result.model, result.device, compiled, result.error, result.seconds,
                   result.from_cache, result.warmup_seconds)

    @property
    def ok(self) -> bool:
        return self.error is None

    def unwrap(self) -> SyncCompiledModel:
        """The compiled model, or raise its error."""
        if self.error is not None:
            raise self.error
        assert self.compiled is not None
        return self.compiled
