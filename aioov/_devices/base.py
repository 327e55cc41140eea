"""What a device is to aioov: a name mapped to ONNX Runtime execution providers.

Each concrete device says which providers (with which options) it runs on,
how to probe that it really loads, whether its compiled result can be
exported to the cache (its ``BlobFormat``), and what about the hardware enters
the cache key. The provider calls live here, behind ``Device``, so that the
logic above it is testable on a machine without a GPU.

A ``BlobFormat`` only configures ONNX Runtime (session and provider options) to write or
read an entry; the compile path builds the sessions. Each format lives beside the device
that needs it; of the cache, a device knows only the reserved names in ``_cache/layout.py``.
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import onnxruntime as ort

from .. import _ortenv

__all__ = (
    "CPU_FALLBACK",
    "BlobFormat",
    "Device",
    "DeviceSpec",
    "ProviderList",
    "cpu_fingerprint",
    "probe_session",
    "with_first",
)

ProviderList = list[tuple[str, dict[str, str]]]
#: the provider ONNX Runtime falls back to for nodes a GPU provider does not take
CPU_FALLBACK: tuple[str, dict[str, str]] = ("CPUExecutionProvider", {})


class BlobFormat:
    """What a cache entry holds for a device, and how sessions write and read it."""

    kind: ClassVar[str]
    #: the file ONNX Runtime loads when the entry is imported (checked before it is parsed)
    model_file: ClassVar[str]
    #: True: a second session can write the blob after the caller got theirs
    background: ClassVar[bool]
    #: True: the entry holds a copy of the source model (as ``model_file``) beside the blob
    keeps_source: ClassVar[bool] = False
    #: True: the provider writes into its cache even on a hit; imports get a scratch directory
    import_scratch: ClassVar[bool] = False
    #: True: ``configure_instant`` makes a session that loads much sooner and runs slower
    instant: ClassVar[bool] = False

    def builder_providers(self, providers: ProviderList) -> ProviderList:
        """The providers a builder process writes and checks the blob with (default: the
        compile's own, so the check loads it exactly as a hit will)."""
        return providers

    def variants(self, prepack: bool) -> tuple[str, ...]:
        """The ways this format can write a blob, most useful first: an export whose blob
        does not load, or does not compute what the source does, falls back to the next.
        ``prepack``: the faster variant first, wherever it passes (``CACHE_PREPACK=ALWAYS``)."""
        return ("default",)

    def faster_variant(self, prepack: bool) -> str | None:
        """With ``CACHE_PREPACK=AUTO``: a variant tried after the first of ``variants(False)``
        passed, and published instead only where its hit loads much sooner (the builder times
        both); None: none."""
        return None

    def export_level(self, variant: str) -> str | None:
        """The graph optimization level a ``variant`` is written at (None: the compile's)."""
        return None

    def configure_export(
        self, options: Any, providers: ProviderList, tmp: Path, key: str, variant: str = "default"
    ) -> ProviderList:
        """Make a compile from source also write the blob into ``tmp``."""
        raise NotImplementedError

    def configure_import(
        self, options: Any, providers: ProviderList, entry: Path, scratch: Path | None = None,
        variant: str = "default",
    ) -> ProviderList:
        """Make a session load the blob in ``entry`` (``scratch``: a directory to write in,
        given when ``import_scratch`` is set; ``variant``: how the blob was written)."""
        raise NotImplementedError

    def configure_instant(self, options: Any) -> None:
        """Make an import load at once, at some cost to inference speed (formats with ``instant``)."""

    def stage_source(self, tmp: Path, model: bytes | tuple[str, list[str]]) -> None:
        """Copy the source (its bytes, or its file and external-data files) into ``tmp``,
        for formats that ``keeps_source``; BlobError when the entry cannot hold it."""
        raise NotImplementedError

    def finalize(self, tmp: Path, input_names: list[str]) -> None:
        """Check (and tidy) what the export wrote, before it is published."""

    def after_import(self, entry: Path, scratch: Path | None) -> str | None:
        """After a session was built from ``entry``: why the entry was not really used
        (the provider compiled again), or None."""
        return None


def with_first(providers: ProviderList, **options: str) -> ProviderList:
    """``providers`` with ``options`` added to the first provider's."""
    (name, first), *rest = providers
    return [(name, {**first, **options}), *rest]


@dataclass(frozen=True)
class DeviceSpec:
    """A parsed device name: ``GPU.1`` → (``GPU``, 1)."""

    family: str
    index: int | None = None

    def __str__(self) -> str:
        return self.family if self.index is None else f"{self.family}.{self.index}"


class Device:
    """Base class of the devices in ``aioov._devices``."""

    family: ClassVar[str]
    provider: ClassVar[str]
    #: what a cache entry holds for this device; None: compiles are not cached
    blob: ClassVar[BlobFormat | None] = None
    #: how many sessions one device builds at once in a process (0: as many as the Core's
    #: compile threads); where upstream races are known, with the issue named beside it
    parallel_builds: ClassVar[int] = 0

    def __init__(self) -> None:
        self._probed: bool | None = None
        self._probe_error: str | None = None
        self._renew_in_child()
        _DEVICES.add(self)

    def _renew_in_child(self) -> None:
        """After a fork: the probe threads did not come along; a probe not finished starts over."""
        self._probe_lock = threading.Lock()
        self._prepare_lock = threading.Lock()
        self._preparing = False

    # -- what ONNX Runtime gets -------------------------------------------------
    def providers(self, index: int | None, options: Mapping[str, str]) -> ProviderList:
        """The provider list, in priority order, for a session on this device."""
        return [(self.provider, dict(options))]

    # -- probing ------------------------------------------------------------------
    def provider_listed(self) -> bool:
        return self.provider in ort.get_available_providers()

    def available(self) -> bool:
        """Whether a session really runs on this device's provider here (probed once)."""
        with self._probe_lock:
            if self._probed is None:
                missing = self.precheck()
                if not self.provider_listed():
                    self._probed, self._probe_error = False, f"{self.provider} is not in this build"
                elif missing:
                    self._probed, self._probe_error = False, missing
                else:
                    try:
                        self._probed = probe_session(self.providers(None, {})[:1])
                        if not self._probed:
                            self._probe_error = f"{self.provider} failed to load"
                    except Exception as exc:  # a provider that cannot load raises many kinds
                        self._probed, self._probe_error = False, f"{self.provider}: {exc}"
            return self._probed

    @property
    def probed(self) -> bool:
        """Whether ``available`` is known (it no longer probes)."""
        return self._probed is not None

    def prepare(self) -> None:
        """Start probing in the background (for a GPU: initializing CUDA, a noticeable part of a start) and reading
        the hardware facts of the key, so that both overlap reading and hashing the model;
        ``available`` then waits for the probe."""
        with self._prepare_lock:  # not the probe's lock: a probe under way must not block this
            if self._probed is not None or self._preparing:
                return
            self._preparing = True
        for job in (self.available, lambda: self.fingerprint(None)):
            threading.Thread(target=_quietly, args=(job,), name=f"aioov-probe-{self.family}", daemon=True).start()

    def precheck(self) -> str | None:
        """A cheap reason the provider cannot load (checked before a probe session,
        which would log errors); None when a probe is worth trying."""
        return None

    @property
    def unavailable_reason(self) -> str | None:
        self.available()
        return self._probe_error

    # -- description --------------------------------------------------------------
    def full_name(self) -> str:
        return self.family

    def caches(self, options: Mapping[str, str]) -> bool:
        """Whether compiles with these provider options go through the cache: only where
        what the blob skips is worth more than writing and reading it."""
        return self.blob is not None

    def capabilities(self, options: Mapping[str, str] | None = None) -> list[str]:
        caps = ["FP32"]
        if self.caches(self.providers(None, options or {})[0][1]):
            caps.append("EXPORT_IMPORT")
        return caps

    def fingerprint(self, index: int | None) -> dict[str, Any]:
        """What about the hardware makes a compiled blob non-portable."""
        return cpu_fingerprint()


#: devices of this process, renewed in a forked child (``Device._renew_in_child``)
_DEVICES: weakref.WeakSet[Device] = weakref.WeakSet()


def _renew_devices() -> None:
    for device in list(_DEVICES):
        device._renew_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_devices)


def _quietly(job: Any) -> None:
    """Run a head start; whatever fails here fails again, and is reported, where it is needed."""
    try:
        job()
    except Exception:  # noqa: BLE001, S110 - see the docstring
        pass


@cache
def cpu_fingerprint() -> dict[str, Any]:
    """The CPU's ISA: an optimized model may use AVX2/AVX-512 layouts (NCHWc...)."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:
        pass
    return {
        "machine": platform.machine(),
        "system": platform.system(),
        "cpu_flags": hashlib.blake2b(flags.encode(), digest_size=8).hexdigest() if flags else "",
    }


_PROBE_MODEL: bytes | None = None


def _probe_model() -> bytes:
    """The smallest model worth a session: y = x + x, in float32."""
    global _PROBE_MODEL
    if _PROBE_MODEL is None:
        from onnx import TensorProto, helper

        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])
        graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "probe", [x], [y])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        _PROBE_MODEL = model.SerializeToString()
    return _PROBE_MODEL


def probe_session(providers: ProviderList) -> bool:
    """Build a tiny session; true when ORT kept the first provider rather than falling back."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    _ortenv.apply(options)
    session = ort.InferenceSession(
        _probe_model(),
        options,
        providers=[name for name, _ in providers],
        provider_options=[opts for _, opts in providers],
    )
    return bool(session.get_providers()[0] == providers[0][0])
