"""``Core``: the async, OpenVINO-shaped front of aioov.

It owns properties and devices, turns each call into a ``Ticket`` (merged, typed
properties) and hands it to ``CompileJobs``, which de-duplicates identical in-flight
compiles and runs each job (``Pipeline.compile_job``: key, cache lookup, compile, export)
in a bounded pool of worker threads. The event loop only awaits. See docs/architecture.md.
"""

from __future__ import annotations

import enum
import functools
import json
import logging
import os
import weakref
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping
from contextlib import aclosing
from pathlib import Path
from types import TracebackType
from typing import Any, Union

import anyio

from . import _bulk, _ortenv, _portable
from ._bulk import BulkProgress, CompileResult, Planned
from ._cache.cache import ABANDON_WAIT, CacheStats, Exporter
from ._compiled import CacheOrigin, CompiledModel, ExportFunction
from ._concurrency import on_event_loop
from ._devices import DeviceRegistry
from ._errors import AioovError, DeviceNotFoundError, ModelReadError, PropertyError
from ._jobs import CompileJobs, Ticket
from ._model import Model, read_any
from ._pipeline import Pipeline
from ._properties import DEFAULTS, PROPERTIES, CompileConfig, normalize, public_value
from ._request import CompileRequest, Result, Source

__all__ = ("Core", "ModelSource")

logger = logging.getLogger("aioov")

#: what ``compile_model`` accepts: a read ``Model``, a path, serialized bytes, or an onnx.ModelProto
ModelSource = Union[Model, str, "os.PathLike[str]", bytes, Any]


#: properties that take their default from the environment (for fleets configured by env)
_ENV_PROPERTIES = {
    "CACHE_REMOTE_URL": "AIOOV_CACHE_REMOTE_URL",
    "CACHE_REMOTE_LOCK_URL": "AIOOV_CACHE_REMOTE_LOCK_URL",
    "CACHE_HMAC_KEY": "AIOOV_CACHE_HMAC_KEY",
    "CACHE_ALWAYS": "AIOOV_CACHE_ALWAYS",
}


#: seconds ``aclose`` (and leaving ``async with Core()``) gives pending cache exports by default
CLOSE_TIMEOUT = 10.0


class _State(enum.Enum):
    OPEN = 1
    CLOSED = 2


class Core:
    """Reads and compiles ONNX models, asynchronously, with an optional model cache.

    ``cache_dir`` (or the ``CACHE_DIR`` property) turns the cache on. Compiles
    run in at most ``max_concurrent_compiles`` worker threads (default: the
    number of CPU cores, at most 8): more would only oversubscribe the cores,
    since every session creation has thread pools of its own.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str] | None = None,
        *,
        max_concurrent_compiles: int | None = None,
        properties: Mapping[str, object] | None = None,
        devices: DeviceRegistry | None = None,
    ) -> None:
        self._props: dict[str, Any] = dict(DEFAULTS)
        self._props.update(normalize({name: os.environ[var] for name, var in _ENV_PROPERTIES.items()
                                      if os.environ.get(var)}))
        self._props.update(normalize(properties or {}))
        if cache_dir is not None:
            self._props.update(normalize({"CACHE_DIR": cache_dir}))
        self._device_props: dict[str, dict[str, Any]] = {}
        self._devices = devices or DeviceRegistry()
        workers = max(1, min(os.cpu_count() or 1, 8)) if max_concurrent_compiles is None else max_concurrent_compiles
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise PropertyError(f"max_concurrent_compiles must be an integer >= 1, got {workers!r}")
        self._max_workers = workers
        self._exporter = Exporter()
        self._pipeline = Pipeline(self._devices, self._exporter)
        self._jobs = CompileJobs(self._pipeline.compile_job, workers)
        self._pipeline.reader.start_background = self._jobs.background
        self._pipeline.reader.cancel_background = self._jobs.cancel_background
        self._state = _State.OPEN
        self._warned_probe = False

    # -- lifecycle ----------------------------------------------------------------
    async def __aenter__(self) -> Core:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self, *, timeout: float | None = CLOSE_TIMEOUT, abandon: bool = False) -> None:
        """Finish pending cache exports, for up to ``timeout`` seconds (None: however long they
        take), then abandon what is left (at once with ``abandon=True``, or when this call is
        cancelled), and release the worker threads. An abandoned export leaves nothing
        half-written and no builder process behind; another process writes its entry later.
        Compiled models keep serving; an instant hit's full-speed load still running is stopped
        (the model stays on its instant session)."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        self._jobs.close()
        if abandon:
            self._exporter.cancel_all()
        finished = False
        try:
            finished = await self.wait_exports(timeout)
        finally:
            if not finished:
                self._exporter.cancel_all()
            with anyio.CancelScope(shield=True):
                try:
                    await anyio.to_thread.run_sync(self._shutdown)
                except RuntimeError:  # no thread to run it in (a thread limit): a bounded wait here
                    self._shutdown()

    def _shutdown(self) -> None:
        # Compile jobs first: one still running may hand an export over or read an entry.
        self._jobs.shutdown()
        if not self._exporter.shutdown(ABANDON_WAIT):
            logger.warning("aioov: a cache export did not stop within %.0f s of being abandoned", ABANDON_WAIT)
        self._pipeline.shutdown()

    async def wait_exports(self, timeout: float | None = None) -> bool:
        """Wait until every background export has been published; False on timeout.
        Cancelling the wait leaves the exports running."""
        if not self._exporter.pending:
            return True
        try:
            return await anyio.to_thread.run_sync(self._exporter.wait, timeout, abandon_on_cancel=True)
        except RuntimeError:  # no thread to wait in (a thread limit): look now and then
            with anyio.move_on_after(timeout):
                while self._exporter.pending:
                    await anyio.sleep(0.05)
            return not self._exporter.pending

    @property
    def pending_exports(self) -> int:
        return self._exporter.pending

    def _check_open(self) -> None:
        if self._state is _State.CLOSED:
            raise AioovError("this Core is closed")

    # -- properties ---------------------------------------------------------------
    def set_property(
        self, device_or_props: str | Mapping[str, object], props: Mapping[str, object] | None = None
    ) -> None:
        """``set_property({"CACHE_DIR": d})`` for the Core, ``set_property("CPU", {...})`` per device."""
        if isinstance(device_or_props, str):
            if props is None:
                raise PropertyError("set_property(device, properties) needs properties")
            spec = self._devices.parse(device_or_props)
            values = normalize(props, allow_core=False)
            self._device_props.setdefault(spec.family, {}).update(values)
        else:
            self._props.update(normalize(device_or_props))

    def get_property(self, device_or_name: str, name: str | None = None) -> Any:
        """``get_property("CACHE_DIR")`` or ``get_property("CPU", "OPTIMIZATION_CAPABILITIES")``."""
        if name is None:
            key = device_or_name.upper()
            if key == "AVAILABLE_DEVICES":
                return self.get_available_devices()
            if key == "SUPPORTED_PROPERTIES":
                return sorted(n for n, p in PROPERTIES.items() if p.scope != "ro") + ["AVAILABLE_DEVICES"]
            if key in self._props:
                return public_value(self._props[key])
            raise PropertyError(f"unknown property {device_or_name!r}")
        spec = self._devices.parse(device_or_name)
        key = name.upper()
        if spec.family == "AUTO" or key in ("OPTIMIZATION_CAPABILITIES", "FULL_DEVICE_NAME"):
            self._warn_if_probing_on_the_loop(None if spec.family == "AUTO" else spec.family)
        if spec.family == "AUTO":
            device, spec = self._devices.resolve("AUTO")
        else:
            device = self._devices.get(spec.family)
        merged = {**self._props, **self._device_props.get(device.family, {})}
        if key == "OPTIMIZATION_CAPABILITIES":
            return device.capabilities(merged["ORT_PROVIDER_OPTIONS"])
        if key == "FULL_DEVICE_NAME":
            return device.full_name()
        if key == "SUPPORTED_PROPERTIES":
            return sorted(n for n, p in PROPERTIES.items() if p.scope == "compile") + [
                "FULL_DEVICE_NAME", "OPTIMIZATION_CAPABILITIES"
            ]
        if key in merged and PROPERTIES[key].scope == "compile":
            return public_value(merged[key])
        raise PropertyError(f"device {spec} has no property {name!r}")

    def get_available_devices(self) -> list[str]:
        """Devices whose execution provider really loads here. The first call probes them
        (seconds on a GPU machine): on an event loop, ``await core.probe_devices()`` first."""
        self._warn_if_probing_on_the_loop()
        return self._devices.available()

    async def probe_devices(self) -> list[str]:
        """Probe every device in a worker thread (once per process) and return those available;
        afterwards ``get_available_devices`` and ``get_property`` never block."""
        return await anyio.to_thread.run_sync(self._devices.probe_all)

    def _warn_if_probing_on_the_loop(self, family: str | None = None) -> None:
        """Once per Core: a probe about to run on the loop's thread (``family``: of that device
        only; CPU's costs nothing worth a warning)."""
        if family == "CPU":
            return
        probed = self._devices.probed() if family is None else self._devices.get(family).probed
        if not self._warned_probe and not probed and on_event_loop():
            self._warned_probe = True
            logger.warning("aioov: probing devices on the event loop's thread blocks it (up to seconds "
                           "on a GPU machine); await core.probe_devices() first")

    @property
    def cache_stats(self) -> CacheStats:
        """This process's cache counters: hits, misses, compiles, exports, errors..."""
        return self._pipeline.stats()

    # -- reading --------------------------------------------------------------------
    async def read_model(self, model: str | os.PathLike[str] | bytes | Any) -> Model:
        """Read and check an ONNX model (file path, bytes or ``onnx.ModelProto``) in a worker thread."""
        self._check_open()
        return await anyio.to_thread.run_sync(read_any, model)

    # -- compiling --------------------------------------------------------------------
    async def compile_model(
        self,
        model: ModelSource,
        device: str = "AUTO",
        config: Mapping[str, object] | None = None,
    ) -> CompiledModel:
        """Compile ``model`` for ``device``; from the cache when ``CACHE_DIR`` is set.

        A path is not read at all on a cache hit. Identical concurrent calls
        share one compile; cancelling one caller does not cancel it for others.
        """
        device, via_auto = await self._concrete(device)
        ticket = self._ticket(model, device, config, via_auto=via_auto)
        return self._wrap(await self._jobs.run(ticket), ticket)

    def _ticket(
        self, model: ModelSource, device: str, config: Mapping[str, object] | None, *, via_auto: bool = False
    ) -> Ticket:
        """This call's compile, with its properties merged and typed (raises AioovError)."""
        self._check_open()
        _ortenv.warn_if_session_builds_hold_the_gil()  # once per process, on the first compile
        source = _as_source(model)
        props = self._merge(device, config, via_auto=via_auto)
        request_id = (
            source,
            str(device).strip().upper(),
            json.dumps({k: v.hex() if isinstance(v, bytes) else public_value(v) for k, v in props.items()},
                       sort_keys=True, default=str),
        )
        return Ticket(source, str(device), CompileConfig.from_props(props), self._props["CACHE_MAX_SIZE"], request_id)

    def _wrap(self, result: Result, ticket: Ticket) -> CompiledModel:
        properties = result.config.as_props()
        compiled = CompiledModel(
            result.session,
            device=result.device,
            properties=properties,
            cache=CacheOrigin(result.loaded_from_cache, result.key, result.not_cached),
            export=self._export_function(ticket.source, result.device, properties),
            warmup_seconds=result.warmup_seconds,
            guard=result.guard,
        )
        pending = result.pending
        if pending is not None:  # an instant hit: its full-speed session, under way or built next
            if pending.started is None:  # once, however many callers shared the compile
                pending.started = self._jobs.background(pending.upgrade)
            upgrade = pending.started
            compiled._follow(upgrade, functools.partial(self._jobs.expedite, upgrade) if upgrade else None)
        return compiled

    def _export_function(self, source: Source, device: str, config: Mapping[str, object]) -> ExportFunction | None:
        """What ``compiled.export_model`` calls: this Core's ``export_model`` on the model's path
        (or the ``Model`` read), holding neither the Core (a weak reference) nor bytes or a
        ModelProto the caller gave (None then: they would stay in memory as long as the model)."""
        given = source.model or source.path
        if given is None:
            return None
        core = weakref.ref(self)

        async def export(destination: str | os.PathLike[str]) -> Path:
            live = core()
            if live is None:
                raise AioovError("the Core that compiled this model is gone; use Core.export_model")
            return await live.export_model(given, destination, device, config)

        return export

    async def _concrete(self, device: str) -> tuple[str, bool]:
        """(the device AUTO picks, True) for AUTO, probing in a thread; (device, False) otherwise."""
        if isinstance(device, str) and self._devices.family_of(device) == "AUTO":
            _, spec = await anyio.to_thread.run_sync(self._devices.resolve, device)
            return str(spec), True
        return device, False

    def _merge(self, device: str, config: Mapping[str, object] | None, *, via_auto: bool = False) -> dict[str, Any]:
        """Core properties, then the device's, then AUTO's (when AUTO picked it), then ``config``:
        as in OpenVINO, what was set for CPU applies when AUTO compiles on CPU."""
        if not isinstance(device, str):
            raise DeviceNotFoundError(f"a device name must be a string, got {type(device).__name__}")
        # An unknown name is reported by the compile job, in its thread: the message lists the
        # devices available here, and finding those out may mean probing providers.
        family = self._devices.family_of(device)
        props = dict(self._props)
        props.pop("CACHE_MAX_SIZE", None)
        props.update(self._device_props.get(family or "", {}))
        if via_auto:
            props.update(self._device_props.get("AUTO", {}))
        props.update(normalize(config or {}, allow_core=False))
        return props

    # -- blobs managed by the user ----------------------------------------------------
    async def export_model(
        self,
        model: ModelSource,
        destination: str | os.PathLike[str],
        device: str = "CPU",
        config: Mapping[str, object] | None = None,
    ) -> Path:
        """Compile ``model`` and write its blob into the new directory ``destination``
        (model.onnx, weights.bin, manifest.json), for ``import_model``."""
        self._check_open()
        _ortenv.warn_if_session_builds_hold_the_gil()
        source = _as_source(model)
        device, via_auto = await self._concrete(device)
        config_ = CompileConfig.from_props(self._merge(device, config, via_auto=via_auto))

        def export() -> Path:
            request = CompileRequest.resolve(self._devices, source, device, config_)
            return _portable.export_to_dir(self._pipeline, request, Path(destination))

        return await anyio.to_thread.run_sync(export)

    async def import_model(
        self,
        blob: str | os.PathLike[str],
        device: str = "CPU",
        config: Mapping[str, object] | None = None,
    ) -> CompiledModel:
        """Load a blob written by ``export_model``; ``CacheError`` if it is damaged or foreign."""
        self._check_open()
        _ortenv.warn_if_session_builds_hold_the_gil()
        device, via_auto = await self._concrete(device)
        config_ = CompileConfig.from_props(self._merge(device, config, via_auto=via_auto))

        def load() -> Result:
            request = CompileRequest.resolve(self._devices, Source(None), device, config_)
            return _portable.import_dir(self._pipeline, request, Path(blob))

        result = await anyio.to_thread.run_sync(load)
        return CompiledModel(result.session, device=result.device, properties=result.config.as_props(),
                             cache=CacheOrigin(True, result.key))

    # -- bulk -------------------------------------------------------------------------
    async def compile_models(
        self,
        models: Iterable[Any],
        device: str = "AUTO",
        config: Mapping[str, object] | None = None,
        *,
        max_concurrency: int | None = None,
        fail_fast: bool = False,
        progress: Callable[[BulkProgress], object] | None = None,
    ) -> AsyncGenerator[CompileResult, None]:
        """Compile many models concurrently, yielding a ``CompileResult`` as each finishes.

        Items are paths, ``Model``s, or ``(model, device, config)`` tuples; duplicates compile
        once. A failure is reported in its result unless ``fail_fast`` raises it and cancels
        the rest. If you may stop iterating early, close the generator promptly
        (``async with contextlib.aclosing(core.compile_models(...)) as results:``).
        """
        items = _bulk.parse_items(models, device, config)
        names = {dev for _, dev, _ in items if isinstance(dev, str)}  # other values: an error per item
        concrete = {dev: await self._concrete(dev) for dev in names}  # AUTO resolved once, in a thread
        plan = [
            Planned(model, dev, cfg, self._plan(model, concrete[dev] if isinstance(dev, str) else (dev, False), cfg))
            for model, dev, cfg in items
        ]
        results = _bulk.compile_models(
            self._jobs, plan, self._wrap,
            max_concurrency=self._max_workers if max_concurrency is None else max_concurrency,
            fail_fast=fail_fast, progress=progress,
        )
        async with aclosing(results):
            async for result in results:
                yield result

    def _plan(self, model: Any, device: tuple[str, bool], config: Mapping[str, object] | None) -> Ticket | AioovError:
        try:
            return self._ticket(model, device[0], config, via_auto=device[1])
        except AioovError as exc:
            return exc

    async def compile_all(
        self,
        models: Iterable[Any],
        device: str = "AUTO",
        config: Mapping[str, object] | None = None,
        *,
        max_concurrency: int | None = None,
        fail_fast: bool = False,
        progress: Callable[[BulkProgress], object] | None = None,
    ) -> list[CompileResult]:
        """Like ``compile_models``, but returns every result in input order."""
        results = self.compile_models(
            models, device, config, max_concurrency=max_concurrency, fail_fast=fail_fast, progress=progress
        )
        async with aclosing(results):
            collected = [result async for result in results]
        return sorted(collected, key=lambda r: r.index)


def _as_source(model: Any) -> Source:
    if isinstance(model, Model):
        return Source(model.path, model, id(model))
    if isinstance(model, (str, os.PathLike)):
        return Source(os.path.abspath(os.fspath(model)))
    if isinstance(model, (bytes, bytearray, memoryview)) or hasattr(model, "SerializeToString"):
        # Read (and serialize a ModelProto) in the compile job's thread, not on the event loop.
        return Source(None, None, id(model), raw=model)
    raise ModelReadError(f"cannot compile a {type(model).__name__}; give a Model, a path, bytes or a ModelProto")
