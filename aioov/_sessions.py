"""Building ``onnxruntime.InferenceSession``s: options from a config, per-device locks,
cancellation, and onnxruntime's errors mapped to aioov's.

Every session aioov builds, from a source model or from a cache entry, comes from here.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import onnxruntime as ort

from . import _ortenv
from ._cache.stats import CacheEvents
from ._concurrency import CancelToken
from ._devices import ProviderList
from ._errors import ORT_ERRORS, Cancelled, DeviceNotFoundError, raise_compile_error
from ._properties import CompileConfig
from ._request import CompileRequest

__all__ = ("SessionFactory", "quiet_run", "session_options")

OPT_LEVELS = {
    "DISABLE_ALL": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "LAYOUT": getattr(
        ort.GraphOptimizationLevel, "ORT_ENABLE_LAYOUT", ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ),
    "ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


#: session config entries aioov sets unless ``ORT_SESSION_CONFIG`` names them; not in the
#: cache key (they change no graph). Measured on 2 cores (docs/performance.md):
#:
#: - Idle intra-op threads stop spinning when a Run ends: two models served in turns by one
#:   process ran 1.2–2× slower with onnxruntime's default (each session's idle threads spun
#:   against the other's run); one session alone ran as fast either way.
#: - An idle thread spins at most 2 ms before it sleeps (onnxruntime's default is 2^20 spins,
#:   ~55 ms here). Every new session's pool threads spin that long as they start, beside the
#:   build: 12 cached models loaded in one process took 1.70 CPU-s instead of 1.01 (the
#:   ``poolstart`` benchmark), which workers starting on the same cores pay for in wall time.
#:   Gaps inside a run are far shorter: inference ran as fast either way.
SESSION_DEFAULTS = {"session.force_spinning_stop": "1", "session.intra_op.spin_duration_us": "2000"}


def session_options(level: str, session_config: Mapping[str, str]) -> ort.SessionOptions:
    """What every session of a compile gets, threads aside: the builder process makes its
    sessions with this too, so that it checks a blob exactly as a hit will load it."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    for name, value in {**SESSION_DEFAULTS, **session_config}.items():
        options.add_session_config_entry(name, value)
    options.graph_optimization_level = OPT_LEVELS[level]
    return options


def quiet_run(session: ort.InferenceSession) -> Callable[[dict[str, Any]], list[Any]]:
    """``session.run`` for made-up inputs: a size the model rejects is expected (the next is
    tried), not an error for onnxruntime to print."""
    options = ort.RunOptions()
    options.log_severity_level = 4
    return lambda feed: session.run(None, feed, options)


class SessionFactory:
    """Sessions for one Core. Devices with ``parallel_builds`` build at most that many
    sessions at a time per device (``GPU.0`` and ``GPU.1`` count apart)."""

    def __init__(self, events: CacheEvents) -> None:
        self._device_slots: dict[str, threading.BoundedSemaphore] = {}
        self._slots_lock = threading.Lock()
        self._events = events

    def _device_slots_of(self, request: CompileRequest) -> AbstractContextManager[Any]:
        """What a session build of ``request`` holds: one of its device's slots, or nothing
        for devices without a limit."""
        if not request.device.parallel_builds:
            return contextlib.nullcontext()
        name = f"{request.spec.family}.{request.spec.index or 0}"
        with self._slots_lock:
            if name not in self._device_slots:
                self._device_slots[name] = threading.BoundedSemaphore(request.device.parallel_builds)
            return self._device_slots[name]

    def options(self, config: CompileConfig) -> ort.SessionOptions:
        options = session_options(config.ort_graph_optimization_level, config.ort_session_config)
        if config.ort_shared_thread_pool:
            _ortenv.enable_shared_pool(config.inference_num_threads)
        _ortenv.apply(options, config.inference_num_threads)
        return options

    def open(
        self,
        model: str | bytes,
        options: ort.SessionOptions,
        request: CompileRequest,
        providers: ProviderList,
        token: CancelToken | None,
    ) -> ort.InferenceSession:
        """A session, raw: onnxruntime's errors are the caller's to map. Raises
        DeviceNotFoundError when onnxruntime fell back to another provider than the device's
        (a ``GPU.7`` on a one-GPU machine would otherwise run on the CPU, silently)."""
        if token is not None:
            token.register(options)
        names = [name for name, _ in providers]
        provider_options = [opts for _, opts in providers]
        with self._device_slots_of(request):
            session = ort.InferenceSession(model, options, providers=names, provider_options=provider_options)
        used = session.get_providers()
        if not used or used[0] != names[0]:
            raise DeviceNotFoundError(
                f"device {request.spec} is not usable here: onnxruntime could not start {names[0]} "
                f"with {provider_options[0]} and fell back to {used[0] if used else 'nothing'}"
            )
        return session

    def compile(
        self, request: CompileRequest, token: CancelToken | None, export: tuple[Path, str] | None = None
    ) -> ort.InferenceSession:
        """A session compiled from the source; with ``export=(tmp, key)`` it also writes the blob."""
        options = self.options(request.config)
        providers = request.providers
        if export is not None:
            assert request.device.blob is not None
            providers = request.device.blob.configure_export(options, providers, export[0], export[1])
        try:
            session = self.open(request.source.ort_input, options, request, providers, token)
        except ORT_ERRORS as exc:
            if token is not None and token.cancelled:
                raise Cancelled() from exc
            raise_compile_error(exc, request.source.describe())
        self._events.count(compiles=1)
        return session
