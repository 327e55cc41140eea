"""Building ``onnxruntime.InferenceSession``s: options from a config, per-device locks,
cancellation, and onnxruntime's errors mapped to aioov's.

Every session aioov builds, from a source model or from a cache entry, comes from here.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import weakref
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import onnxruntime as ort

from . import _ortenv
from ._cache.cache import CacheEvents
from ._concurrency import CancelToken, renew_in_children
from ._devices import ProviderList
from ._errors import ORT_ERRORS, Cancelled, DeviceNotFoundError, raise_compile_error
from ._ortoptions import quiet_run, session_options
from ._properties import CompileConfig
from ._request import CompileRequest

__all__ = ("SessionFactory", "quiet_run", "session_options")

#: every session built in this process and still alive
_BUILT: weakref.WeakSet[ort.InferenceSession] = weakref.WeakSet()


def _never_destroy_inherited() -> None:
    """A forked child never destroys a session its parent built: the session's thread pool
    would wait there for threads that were the parent's (waiting on a condition variable at
    the fork), for ever: a child that dropped a model its parent compiled hung in its garbage
    collection, or at exit. Each gets a reference that is never given back (a copy-on-write
    page of the parent's memory, not new memory)."""
    for session in list(_BUILT):
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(session))
    _BUILT.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_never_destroy_inherited)

class SessionFactory:
    """Sessions for one Core. Devices with ``parallel_builds`` build at most that many
    sessions at a time per device (``GPU.0`` and ``GPU.1`` count apart)."""

    def __init__(self, events: CacheEvents) -> None:
        self._events = events
        self._renew_in_child()
        renew_in_children(self)

    def _renew_in_child(self) -> None:
        self._device_slots: dict[str, threading.BoundedSemaphore] = {}
        self._slots_lock = threading.Lock()

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
        options = session_options(
            config.ort_graph_optimization_level, config.ort_session_config, custom_ops=config.ort_custom_ops_libraries,
            free_dimensions=config.ort_free_dimension_overrides, attributes=config.ort_session_options,
        )
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
        _BUILT.add(session)
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
