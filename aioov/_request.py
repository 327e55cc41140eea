"""One compile, described once: what to compile, on what, with which properties, under which key.

A ``CompileRequest`` is built in the compile job's thread (resolving a device may probe
providers, and reading bytes or a ModelProto serializes it) and then handed down, frozen,
through the cache reader, the writer and the session factory: nothing below asks for more.
"""

from __future__ import annotations

import concurrent.futures
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import onnxruntime as ort

from ._cache.cache import Rules, cache_key
from ._concurrency import CancelToken
from ._devices import Device, DeviceRegistry, DeviceSpec, ProviderList
from ._model import Model, check_model_file, pinned_path, read_any
from ._properties import CompileConfig
from ._version import __version__

if TYPE_CHECKING:
    from ._cache.cache import ShapeGuard

__all__ = ("CompileRequest", "Pending", "Result", "Source")


@dataclass(frozen=True)
class Source:
    """A model to compile: a path (not yet read) or a read ``Model``."""

    path: str | None
    model: Model | None = field(default=None, hash=False, compare=False)
    model_id: int = 0  # identity of ``model`` (or ``raw``): two reads of one file are two models
    raw: Any = field(default=None, hash=False, compare=False)  # bytes or a ModelProto, read in the job

    def read(self) -> Source:
        """This source as its compile reads it (blocking: file system calls, serializing,
        scanning): ``raw`` read into a ``Model``, a path through its folder's real path."""
        if self.raw is not None:
            return Source(None, read_any(self.raw), self.model_id)
        if self.model is None and self.path is not None:
            return Source(pinned_path(self.path), None, self.model_id)
        return self

    @property
    def ort_input(self) -> str | bytes:
        if self.model is not None and self.model.data is not None:
            return self.model.data
        assert self.path is not None
        return self.path

    @property
    def given(self) -> Any:
        """What the caller gave: the Model, the bytes or ModelProto, or the path."""
        return self.model or self.raw or self.path

    def describe(self) -> str:
        return self.path or (self.model.describe() if self.model else "?")

    def files(self) -> bytes | tuple[str, list[str]]:
        """The serialized model, or its file and its external-data files (blocking)."""
        if self.model is not None and self.model.data is not None:
            return self.model.data
        if self.model is not None:
            assert self.model.path is not None
            return self.model.path, self.model.external_data_files
        assert self.path is not None
        return self.path, check_model_file(self.path)[1]


@dataclass(frozen=True, eq=False)
class CompileRequest:
    """Everything one compile job needs, resolved: source, device, providers, typed config."""

    source: Source
    device: Device
    spec: DeviceSpec
    providers: ProviderList
    config: CompileConfig
    #: CACHE_MAX_SIZE, a Core-wide property: the writer prunes down to it after publishing
    max_cache_size: int = 0
    #: the providers are the device's own (False: ``ORT_PROVIDERS`` named others: not cached)
    own_providers: bool = True

    @classmethod
    def resolve(
        cls, devices: DeviceRegistry, source: Source, device_name: str, config: CompileConfig, max_cache_size: int = 0,
        *, wait: bool = True,
    ) -> CompileRequest:
        """Resolve the device (AUTO included; may probe providers; ``wait=False``: in the
        background, see ``DeviceRegistry.resolve``) and read raw sources (blocking)."""
        device, spec = devices.resolve(device_name, wait=wait)
        providers = device.providers(spec.index, config.ort_provider_options)
        own = True
        if config.ort_providers:
            # A provider the device uses keeps the device's options (device_id...), the user's on
            # top; the list is the user's. The device's blob format knows only its own list.
            options = dict(providers)
            own = [name for name, _ in config.ort_providers] == [name for name, _ in providers]
            providers = [(name, {**options.get(name, {}), **opts}) for name, opts in config.ort_providers]
        return cls(source.read(), device, spec, providers, config.with_hints(), max_cache_size, own)

    @property
    def caches(self) -> bool:
        """Whether this compile goes through the cache at all."""
        return (self.config.cache_dir is not None and self.own_providers
                and self.device.caches(self.providers[0][1]))

    @property
    def uncached(self) -> str | None:
        """Why a compile with a cache directory goes without the cache, for NOT_CACHED_REASON
        (None: it does not, or for reasons of the moment that the compile logs)."""
        if self.config.cache_dir is None or self.own_providers:
            return None
        own = [name for name, _ in self.device.providers(self.spec.index, {})]
        return (f"ORT_PROVIDERS {[name for name, _ in self.providers]} are not device {self.spec}'s own ({own}): "
                "aioov caches compiles only on the providers of its devices")

    @functools.cached_property
    def rules(self) -> Rules:
        """What this compile's properties ask of the cache."""
        config = self.config
        return Rules(config.cache_verify.value, config.cache_hmac_key, self.max_cache_size, config.cache_lock_timeout,
                     config.cache_remote_url, config.cache_remote_lock_url, config.cache_remote_lock_ttl,
                     self.source.describe())

    def entry_key(self, digest: str) -> tuple[str, dict[str, Any]]:
        """The cache key of this compile of the model whose content is ``digest``, and the
        manifest its entry will carry."""
        inputs = self.key_inputs(digest)
        return cache_key(inputs), self.manifest(inputs)

    def key_inputs(self, digest: str) -> dict[str, Any]:
        """Everything that shapes the compiled blob, in readable form (also saved in the manifest)."""
        device = self.device
        return {
            "model": digest,
            "device": device.family,
            "blob": device.blob.kind if device.blob is not None else None,
            "providers": [[name, dict(sorted(opts.items()))] for name, opts in self.providers],
            "hardware": device.fingerprint(self.spec.index),
            "onnxruntime": ort.__version__,
            **self.config.key_props(),
        }

    def manifest(self, key_inputs: dict[str, Any]) -> dict[str, Any]:
        return {
            "created": time.time(),
            "aioov": __version__,
            "onnxruntime": ort.__version__,
            "device": str(self.spec),
            "source": {"path": self.source.path},
            "key_inputs": key_inputs,
        }


#: builds an instant hit's full-speed session (None: it cannot; the instant one serves on)
Upgrade = Callable[[CancelToken], "ort.InferenceSession | None"]


@dataclass
class Pending:
    """What an instant hit leaves to do: build the full-speed session from the same entry
    (None when it cannot; the instant session then keeps serving). ``started``: that build,
    already under way (begun beside the instant load)."""

    upgrade: Upgrade
    started: concurrent.futures.Future[ort.InferenceSession | None] | None = None


@dataclass
class Result:
    """What a compile job hands back to the Core."""

    session: ort.InferenceSession
    device: str
    config: CompileConfig
    loaded_from_cache: bool
    key: str | None
    warmup_seconds: float | None = None  # spent warming the model up (None: not asked, or not possible)
    pending: Pending | None = None  # an instant hit's check and full-speed session, still to come
    not_cached: str | None = None  # why the cache had nothing to give and will not have (a marker)
    guard: ShapeGuard | None = None  # loaded from an entry: runs at new input shapes leave a record
