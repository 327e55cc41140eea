"""Building ``onnxruntime.InferenceSession``s: options from a config, per-device locks,
cancellation, and onnxruntime's errors mapped to aioov's.

Every session aioov builds, from a source model or from a cache entry, comes from here.
"""

from __future__ import annotations

import threading
from pathlib import Path

import onnxruntime as ort

from . import _ortenv
from ._cache.stats import CacheEvents
from ._concurrency import CancelToken
from ._devices import Device, ProviderList
from ._errors import ORT_ERRORS, Cancelled, raise_compile_error
from ._properties import CompileConfig
from ._request import CompileRequest

__all__ = ("SessionFactory",)

_OPT_LEVELS = {
    "DISABLE_ALL": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "LAYOUT": getattr(
        ort.GraphOptimizationLevel, "ORT_ENABLE_LAYOUT", ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ),
    "ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


class SessionFactory:
    """Sessions for one Core. Devices with ``serialize_compiles`` build one session at a time."""

    def __init__(self, families: list[str], events: CacheEvents) -> None:
        self._device_locks = {family: threading.Lock() for family in families}
        self._events = events

    def options(self, config: CompileConfig) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if config.ort_shared_thread_pool:
            _ortenv.enable_shared_pool(config.inference_num_threads)
        _ortenv.apply(options, config.inference_num_threads)
        for name, value in config.ort_session_config.items():
            options.add_session_config_entry(name, value)
        options.graph_optimization_level = _OPT_LEVELS[config.ort_graph_optimization_level]
        return options

    def open(
        self,
        model: str | bytes,
        options: ort.SessionOptions,
        device: Device,
        providers: ProviderList,
        token: CancelToken | None,
    ) -> ort.InferenceSession:
        """A session, raw: onnxruntime's errors are the caller's to map."""
        if token is not None:
            token.register(options)
        names = [name for name, _ in providers]
        provider_options = [opts for _, opts in providers]
        if device.serialize_compiles:
            with self._device_locks[device.family]:
                return ort.InferenceSession(model, options, providers=names, provider_options=provider_options)
        return ort.InferenceSession(model, options, providers=names, provider_options=provider_options)

    def compile(
        self, request: CompileRequest, token: CancelToken | None, export: tuple[Path, str] | None = None
    ) -> ort.InferenceSession:
        """A session compiled from the source; with ``export=(tmp, key)`` it also writes the blob."""
        options = self.options(request.config)
        providers = request.providers
        if export is not None:
            assert request.device.blob is not None
            providers = request.device.blob.configure_export(
                options, providers, export[0], export[1], request.config.cache_prepack
            )
        try:
            session = self.open(request.source.ort_input, options, request.device, providers, token)
        except ORT_ERRORS as exc:
            if token is not None and token.cancelled:
                raise Cancelled() from exc
            raise_compile_error(exc, request.source.describe())
        self._events.count(compiles=1)
        return session
