"""``CompiledModel`` and ``InferRequest`` around an ``onnxruntime.InferenceSession``."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import threading
import types
import warnings
import weakref
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeAlias, TypeVar, overload

import anyio
import anyio.lowlevel
import numpy as np
import onnxruntime as ort

from ._concurrency import on_event_loop, renew_in_children, wait_future
from ._errors import ORT_ERRORS, InferenceError, PropertyError, raise_infer_error
from ._ortoptions import configure_run, run_options
from ._port import Port
from ._properties import public_value

__all__ = (
    "CacheOrigin", "CompiledModel", "InferRequest", "InferResults", "ModelMetadata", "Port", "InferInputs",
    "OutputKeys", "RunOptionsLike",
)

_T = TypeVar("_T")

#: writes a compiled model's blob to a directory (``Core.export_model`` bound to its source)
ExportFunction = Callable[["str | os.PathLike[str]"], Awaitable[object]]


def warn_if_blocking_a_loop(call: str, instead: str, stacklevel: int = 2) -> None:
    """A ``RuntimeWarning`` when a blocking ``call`` is made on an event loop's thread (asyncio
    or trio), which it stalls until it returns; ``instead``: what to do there. Python shows a
    warning once per call site. ``stacklevel``: as ``warnings.warn``'s, counted from the function
    that calls this one (2: its caller)."""
    if on_event_loop():
        warnings.warn(f"{call} blocks the event loop whose thread called it, until it returns; {instead}",
                      RuntimeWarning, stacklevel=stacklevel + 1)


class RunGuard(Protocol):
    """What a model loaded from the cache runs through (``_cache/sentinel.ShapeGuard``): a
    record held while it first runs at each new input shape."""

    def begin(self, feed: Mapping[str, Any]) -> Any: ...

    def end(self, token: Any) -> None: ...

    def reset(self) -> None: ...


#: what ``infer`` accepts: a mapping by input name, a sequence in input order,
#: or one array for a single-input model
InferInputs = Mapping[str, Any] | Sequence[Any] | np.ndarray
#: what ``infer(outputs=...)`` accepts: the outputs to return, by name, index or ``Port``
OutputKeys = Sequence[str | int | Port] | str | Port
#: what ``infer(run_options=...)`` accepts: an ``onnxruntime.RunOptions``, or a mapping of its
#: attributes and run config entries (``{"logid": "req-7", "memory.enable_memory_arena_shrinkage": "cpu:0"}``)
RunOptionsLike: TypeAlias = "ort.RunOptions | Mapping[str, Any]"


class InferResults(dict[str, np.ndarray]):
    """What ``infer`` returns: a ``dict`` of the outputs by name, in model order (those asked
    for with ``outputs=``, in the order asked), that also answers by index and by ``Port``,
    like OpenVINO's ``OVDict``::

        results = await compiled.infer(inputs)
        results["logits"]                  # by name
        results[0]                         # by index, in model order (-1: the last)
        results[compiled.output(0)]        # by Port

    Iterating, ``keys()``, ``items()`` and ``==`` are a plain dict's (by name). A key that is
    none of these raises ``KeyError``, as a dict's does.
    """

    def __init__(self, ports: Iterable[Port], values: Iterable[np.ndarray]) -> None:
        self._names = tuple(port.name for port in ports)
        super().__init__(zip(self._names, values))

    def _name(self, key: object) -> object:
        if isinstance(key, Port):
            return key.name
        if isinstance(key, int) and not isinstance(key, bool):
            try:
                return self._names[key]
            except IndexError:
                raise KeyError(key) from None
        return key

    def __getitem__(self, key: str | int | Port) -> np.ndarray:
        return super().__getitem__(self._name(key))  # type: ignore[index]

    def __contains__(self, key: object) -> bool:
        try:
            return super().__contains__(self._name(key))
        except KeyError:
            return False

    @overload
    def get(self, key: str | int | Port, default: None = None, /) -> np.ndarray | None: ...

    @overload
    def get(self, key: str | int | Port, default: np.ndarray | _T, /) -> np.ndarray | _T: ...

    def get(self, key: str | int | Port, default: Any = None, /) -> Any:
        return self[key] if key in self else default

    def to_tuple(self) -> tuple[np.ndarray, ...]:
        """The outputs in model order (``session.run``'s list, as a tuple)."""
        return tuple(self.values())


@dataclass(frozen=True)
class ModelMetadata:
    """A model's description of itself, from its ONNX file (``CompiledModel.metadata``):
    ``session.get_modelmeta()``'s fields, typed and read-only."""

    producer_name: str
    graph_name: str
    graph_description: str
    domain: str
    description: str
    version: int  # the ONNX model_version
    custom_metadata_map: Mapping[str, str]  # the model's metadata_props

    @classmethod
    def from_session(cls, session: ort.InferenceSession) -> ModelMetadata:
        meta = session.get_modelmeta()
        return cls(
            producer_name=meta.producer_name,
            graph_name=meta.graph_name,
            graph_description=meta.graph_description,
            domain=meta.domain,
            description=meta.description,
            version=int(meta.version),
            custom_metadata_map=types.MappingProxyType(dict(meta.custom_metadata_map)),
        )


@dataclass(frozen=True)
class CacheOrigin:
    """Where a compiled model came from, as far as the cache is concerned."""

    loaded: bool  # LOADED_FROM_CACHE
    key: str | None = None  # CACHE_KEY (None: no cache)
    not_cached: str | None = None  # NOT_CACHED_REASON: a not-cacheable marker's reason


class CompiledModel:
    """A model compiled for a device, ready for inference.

    ``infer`` runs in a worker thread, so the event loop keeps serving while
    the session computes; at most ``NUM_STREAMS`` requests run at once on each event loop.
    ``await compiled(inputs)`` is ``await compiled.infer(inputs)``, as OpenVINO's
    ``compiled(inputs)`` is its inference. ``session`` is the underlying
    ``onnxruntime.InferenceSession``.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        *,
        device: str,
        properties: Mapping[str, Any],
        cache: CacheOrigin,
        export: ExportFunction | None = None,
        warmup_seconds: float | None = None,
        guard: RunGuard | None = None,
    ) -> None:
        self._session = session
        self._guard = guard
        self._device = device
        self._properties = dict(properties)
        self._cache = cache
        self._export = export
        self.warmup_seconds = warmup_seconds  # None: not warmed up (not asked, or not possible)
        # An instant cache hit: the full-speed session, still to come
        self._upgrade: concurrent.futures.Future[ort.InferenceSession | None] | None = None
        self._expedite: Callable[[], None] | None = None
        self._instant = False
        self._inputs = [Port.from_node_arg(a) for a in session.get_inputs()]
        self._outputs = [Port.from_node_arg(a) for a in session.get_outputs()]
        self._by_name = {p.name: p for p in self._inputs}
        self._metadata: ModelMetadata | None = None
        self._streams = max(1, int(self._properties.get("NUM_STREAMS", 1)))
        self._renew_in_child()
        renew_in_children(self)

    def _renew_in_child(self) -> None:
        # A run in another thread at the fork holds a token it will never give back there.
        self._limiters: weakref.WeakKeyDictionary[object, anyio.CapacityLimiter] = weakref.WeakKeyDictionary()
        self._limiters_lock = threading.Lock()

    @property
    def session(self) -> ort.InferenceSession:
        """The ``onnxruntime.InferenceSession`` serving now (for features aioov does not wrap)."""
        self._swap()
        return self._session

    # -- instant hits -------------------------------------------------------------------
    def _follow(
        self, upgrade: concurrent.futures.Future[ort.InferenceSession | None] | None,
        expedite: Callable[[], None] | None = None,
    ) -> None:
        """This model came from an instant cache hit: swap in ``upgrade``'s full-speed session
        once it is built (None: it never will be; the instant session serves on). ``expedite``
        starts it now if it waits for a bulk load to end."""
        self._upgrade, self._instant, self._expedite = upgrade, True, expedite

    async def wait_full_speed(self) -> None:
        """Wait until the full-speed session serves: at once unless this model came from an
        instant cache hit (``CACHE_HIT_MODE=INSTANT``) whose full-speed session is still loading.
        Closing the Core stops such a load: the model then serves on its instant session for
        good (``get_property("SESSION")`` says which)."""
        if self._upgrade is not None and not self._upgrade.done():
            if self._expedite is not None:
                self._expedite()
            with contextlib.suppress(Exception):  # read by _swap
                await wait_future(self._upgrade)
        self._swap()

    def _wait_full_speed_blocking(self) -> None:
        """``wait_full_speed``, blocking the calling thread (no event loop needed)."""
        upgrade = self._upgrade
        if upgrade is not None and not upgrade.done():
            if self._expedite is not None:
                self._expedite()
            concurrent.futures.wait([upgrade])
        self._swap()

    def _swap(self) -> None:
        """Between inferences: take the full-speed session once it exists. Inferences running
        on the instant one finish there; it is released with the last of them."""
        upgrade = self._upgrade
        if upgrade is None or not upgrade.done():
            return
        self._upgrade = None
        try:
            session = upgrade.result()
        except Exception:  # cancelled by aclose, or a load that failed: the instant session stays
            session = None
        if session is not None:
            self._session, self._instant = session, False
            if self._guard is not None:
                self._guard.reset()

    @property
    def device(self) -> str:
        return self._device

    @property
    def inputs(self) -> list[Port]:
        return list(self._inputs)

    @property
    def outputs(self) -> list[Port]:
        return list(self._outputs)

    @property
    def metadata(self) -> ModelMetadata:
        """The model's producer, graph name, domain, description, version and custom metadata."""
        if self._metadata is None:
            self._metadata = ModelMetadata.from_session(self._session)
        return self._metadata

    def input(self, key: int | str = 0) -> Port:
        """An input by index or name; ``InferenceError`` when the model has no such input."""
        return _port(self._inputs, key, "input")

    def output(self, key: int | str = 0) -> Port:
        """An output by index or name; ``InferenceError`` when the model has no such output."""
        return _port(self._outputs, key, "output")

    def get_property(self, name: str) -> Any:
        """``LOADED_FROM_CACHE``, ``CACHE_KEY``, ``EXECUTION_DEVICES``, or a compile property."""
        name = name.upper()
        if name == "LOADED_FROM_CACHE":
            return self._cache.loaded
        if name == "WARMED_UP":
            return self.warmup_seconds is not None
        if name == "SESSION":
            self._swap()
            return "INSTANT" if self._instant else "FULL"
        if name == "CACHE_KEY":
            return self._cache.key
        if name == "NOT_CACHED_REASON":
            return self._cache.not_cached
        if name == "EXECUTION_DEVICES":
            return [self._device]
        if name == "EXECUTION_PROVIDERS":
            return self._session.get_providers()
        if name == "OPTIMAL_NUMBER_OF_INFER_REQUESTS":
            return int(self._properties.get("NUM_STREAMS", 1))
        if name == "SUPPORTED_PROPERTIES":
            return sorted({*self._properties, "LOADED_FROM_CACHE", "CACHE_KEY", "EXECUTION_DEVICES",
                           "EXECUTION_PROVIDERS", "OPTIMAL_NUMBER_OF_INFER_REQUESTS", "WARMED_UP", "SESSION",
                           "NOT_CACHED_REASON"})
        if name in self._properties:
            return public_value(self._properties[name])
        raise PropertyError(f"compiled model has no property {name!r}")

    def _feed(self, inputs: InferInputs) -> dict[str, np.ndarray]:
        if isinstance(inputs, Mapping):
            unknown = [k for k in inputs if k not in self._by_name]
            if unknown:
                raise InferenceError(
                    f"unknown input name(s) {unknown}; the model's inputs are {list(self._by_name)}"
                )
            missing = [k for k in self._by_name if k not in inputs]
            if missing:
                raise InferenceError(f"missing input(s) {missing}")
            return {name: self._by_name[name].check(value) for name, value in inputs.items()}
        if isinstance(inputs, np.ndarray) or not isinstance(inputs, Sequence):
            inputs = [inputs]
        if len(inputs) != len(self._inputs):
            raise InferenceError(f"the model takes {len(self._inputs)} input(s), got {len(inputs)}")
        return {port.name: port.check(value) for port, value in zip(self._inputs, inputs)}

    def _fetches(self, outputs: OutputKeys | None) -> tuple[list[Port], list[str] | None]:
        """The outputs to return and their names (None: all of them); ``InferenceError`` for
        an output the model does not have, none at all, or one named twice."""
        if outputs is None:
            return self._outputs, None
        keys = [outputs] if isinstance(outputs, (str, Port)) else list(outputs)
        ports = [self.output(key.name if isinstance(key, Port) else key) for key in keys]
        names = [port.name for port in ports]
        if not names:
            raise InferenceError("outputs=[] asks for no output; leave it out to compute them all")
        if len(set(names)) < len(names):
            raise InferenceError(f"outputs={names} names an output twice")
        return ports, names

    @staticmethod
    def _run_options_of(given: RunOptionsLike | None) -> ort.RunOptions:
        """This run's options: the caller's own ``RunOptions`` as they are, or new ones (one per
        run: a cancelled ``infer`` terminates its run alone) with a mapping's settings."""
        if isinstance(given, ort.RunOptions):
            return given
        options = run_options()  # onnxruntime prints no error of its own: aioov raises it
        if given is not None:
            try:
                configure_run(options, given)
            except (TypeError, ValueError) as exc:
                raise PropertyError(f"bad run_options: {exc}") from None
        return options

    def infer_sync(
        self, inputs: InferInputs, *, outputs: OutputKeys | None = None, run_options: RunOptionsLike | None = None,
    ) -> InferResults:
        """Blocking inference, for code that is not async. On an event loop's thread it stalls
        the loop while the model runs: a ``RuntimeWarning`` says so (``await infer`` there).
        ``outputs`` and ``run_options``: as ``infer``'s."""
        warn_if_blocking_a_loop("CompiledModel.infer_sync", "await compiled.infer(inputs) instead")
        return self._infer_blocking(inputs, outputs=outputs, run_options=run_options)

    def _infer_blocking(
        self, inputs: InferInputs, *, outputs: OutputKeys | None = None, run_options: RunOptionsLike | None = None,
    ) -> InferResults:
        """``infer_sync`` without its warning (``SyncCompiledModel.infer`` gives its own)."""
        feed = self._feed(inputs)
        ports, names = self._fetches(outputs)
        options = self._run_options_of(run_options)
        self._swap()
        try:
            results = self._run(self._session, feed, names, options)
        except ORT_ERRORS as exc:
            raise_infer_error(exc)
        return InferResults(ports, results)

    def _limiter(self) -> anyio.CapacityLimiter:
        """``NUM_STREAMS`` at once per event loop: a limiter belongs to the loop that made it
        (one shared by loops in two threads handed a free slot to a waiter of the other loop,
        which never woke), so a model compiled under asyncio also serves trio, or another
        loop in another thread."""
        loop = anyio.lowlevel.current_token().native_token  # asyncio's loop, trio's TrioToken
        with self._limiters_lock:
            limiter = self._limiters.get(loop)
            if limiter is None:
                limiter = self._limiters[loop] = anyio.CapacityLimiter(self._streams)
        return limiter

    async def infer(
        self, inputs: InferInputs, *, outputs: OutputKeys | None = None, run_options: RunOptionsLike | None = None,
    ) -> InferResults:
        """Run the model on ``inputs`` in a worker thread; outputs by name, in model order, also
        by index and by ``Port`` (``InferResults``). ``InferenceError`` when the inputs do not
        match the model or ONNX Runtime fails running them.

        ``outputs``: return only these outputs (names, indices or ``Port``s), in the order
        given (onnxruntime 1.31 still runs every node: its ``only_execute_path_to_fetches`` run
        option prunes no branch). ``run_options``: an ``onnxruntime.RunOptions``
        used as it is (give each concurrent call its own), or a mapping of its attributes and
        run config entries (``{"logid": "req-7"}``; ``PropertyError`` for what it does not have).

        Cancelling the caller stops the run: its ``RunOptions.terminate`` is set, onnxruntime
        stops at its next node, and the cancellation goes on once the run ended (the worker
        thread is free when ``infer`` is gone)."""
        feed = self._feed(inputs)  # validate on the caller's side: cheap, and errors stay local
        ports, names = self._fetches(outputs)
        options = self._run_options_of(run_options)
        self._swap()
        session = self._session
        try:
            results = await self._run_in_thread(session, feed, names, options)
        except ORT_ERRORS as exc:
            raise_infer_error(exc)
        return InferResults(ports, results)

    async def _run_in_thread(
        self, session: ort.InferenceSession, feed: dict[str, np.ndarray], names: list[str] | None,
        options: ort.RunOptions,
    ) -> list[Any]:
        """``_run`` in a worker thread, terminated when the caller is cancelled."""
        flight = _Flight(options)

        def work() -> list[Any] | None:
            if not flight.begin():
                return None  # cancelled before a thread took it: never run
            try:
                return self._run(session, feed, names, options)
            finally:
                flight.end()

        # Abandoned on cancel, so that the cancellation is seen at once; the caller waits for
        # the terminated run to end all the same. (Under asyncio the stream is free again from
        # the cancellation on, while the run stops at its next node; under trio from its end.
        # Holding it outside with a second limiter for the thread cost ~20 us a call.)
        try:
            results = await anyio.to_thread.run_sync(work, abandon_on_cancel=True, limiter=self._limiter())
        except anyio.get_cancelled_exc_class():
            if flight.stop():
                with anyio.CancelScope(shield=True):
                    while flight.running:  # polled: a future to wait for cost ~10 us a call
                        await anyio.sleep(FLIGHT_POLL)
                flight.restore()
            raise
        assert results is not None
        return results

    async def __call__(
        self, inputs: InferInputs, *, outputs: OutputKeys | None = None, run_options: RunOptionsLike | None = None,
    ) -> InferResults:
        """``await compiled(inputs)``: the same as ``await compiled.infer(inputs)``."""
        return await self.infer(inputs, outputs=outputs, run_options=run_options)

    def _run(
        self, session: ort.InferenceSession, feed: dict[str, np.ndarray], names: list[str] | None,
        options: ort.RunOptions,
    ) -> list[Any]:
        """``session.run``; a model loaded from the cache runs new input shapes under its guard."""
        guard = self._guard
        run = guard.begin(feed) if guard is not None else None
        try:
            return session.run(names, feed, options)  # type: ignore[no-any-return]
        finally:
            if run is not None:
                guard.end(run)  # type: ignore[union-attr]

    def create_infer_request(self) -> InferRequest:
        return InferRequest(self)

    async def export_model(self, destination: str | os.PathLike[str]) -> None:
        """Write this model's blob to a directory, for ``Core.import_model``."""
        if self._export is None:
            raise PropertyError("this model was compiled from bytes or a ModelProto, which it does not keep "
                                "in memory: use core.export_model(model, destination)")
        await self._export(destination)

    def __repr__(self) -> str:
        cached = " (from cache)" if self._cache.loaded else ""
        return f"<CompiledModel on {self._device}{cached} inputs={[p.name for p in self._inputs]}>"


class InferRequest:
    """OpenVINO's infer request: one inference at a time, results kept on the request."""

    def __init__(self, compiled: CompiledModel) -> None:
        self._compiled = compiled
        self._results: InferResults | None = None

    @property
    def compiled_model(self) -> CompiledModel:
        return self._compiled

    @property
    def results(self) -> InferResults:
        """The last inference's outputs (empty before the first)."""
        return self._results if self._results is not None else InferResults(self._compiled.outputs, ())

    async def infer(
        self, inputs: InferInputs, *, outputs: OutputKeys | None = None, run_options: RunOptionsLike | None = None,
    ) -> InferResults:
        """``CompiledModel.infer``, its results kept on the request."""
        self._results = await self._compiled.infer(inputs, outputs=outputs, run_options=run_options)
        return self._results

    def get_output_tensor(self, key: int | str | Port = 0) -> np.ndarray:
        """An output of the last inference, by index, name or ``Port``; ``InferenceError``
        before any inference, or for an output the model does not have."""
        name = self._compiled.output(key.name if isinstance(key, Port) else key).name
        if self._results is None:
            raise InferenceError(f"no inference has run on this request yet: no output {name!r} to get")
        return self._results[name]


#: seconds between looks at a terminated run, until it ended (onnxruntime stops at its next node)
FLIGHT_POLL = 0.002


class _Flight:
    """One run on its way to a worker thread: ``stop`` (the caller was cancelled) sets its
    ``terminate`` if it runs, or makes sure it never will if no thread took it yet."""

    def __init__(self, options: ort.RunOptions) -> None:
        self._options = options
        self._lock = threading.Lock()
        self._state = "queued"  # then "running" and "ended", or "dropped" when stopped before it ran
        self._terminated = False

    def begin(self) -> bool:
        """In the worker thread: whether to run (False: the caller is gone already)."""
        with self._lock:
            if self._state == "dropped":
                return False
            self._state = "running"
            return True

    def end(self) -> None:
        """In the worker thread, once the run returned or raised."""
        self._state = "ended"

    @property
    def running(self) -> bool:
        return self._state == "running"

    def stop(self) -> bool:
        """Whether a run is under way, told to terminate: wait while it is ``running`` then."""
        with self._lock:
            if self._state == "queued":
                self._state = "dropped"
                return False
            if self._state != "running":
                return False
            if not self._options.terminate:  # the caller's own RunOptions may be set already
                self._options.terminate = self._terminated = True
            return True

    def restore(self) -> None:
        """The run ended: a caller's own ``RunOptions`` can serve its next run again."""
        if self._terminated:
            self._options.terminate = False


def _port(ports: Sequence[Port], key: int | str, kind: str) -> Port:
    """``ports[key]`` by index or name, or an ``InferenceError`` naming what there is."""
    if isinstance(key, int) and not isinstance(key, bool):
        if -len(ports) <= key < len(ports):
            return ports[key]
    else:
        for port in ports:
            if port.name == key:
                return port
    raise InferenceError(f"no {kind} {key!r}; the model's {kind}s are {[p.name for p in ports]}")
