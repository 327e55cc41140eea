"""What a device is to aioov: a name mapped to ONNX Runtime execution providers.

Each concrete device says which providers (with which options) it runs on,
how to probe that it really loads, whether its compiled result can be
exported to the cache, and what about the hardware enters the cache key.
The provider calls live here, behind ``Device``, so that the logic above it
is testable on a machine without a GPU.
"""

from __future__ import annotations

import hashlib
import platform
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar

import onnxruntime as ort

from .. import _ortenv
from .._cache.blob import BlobFormat

__all__ = ("Device", "ProviderList", "cpu_fingerprint", "probe_session")

ProviderList = list[tuple[str, dict[str, str]]]


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
    #: create sessions one at a time (upstream races with several GPU sessions at once)
    serialize_compiles: ClassVar[bool] = False

    def __init__(self) -> None:
        self._probe_lock = threading.Lock()
        self._probed: bool | None = None
        self._probe_error: str | None = None

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
    global _PROBE_MODEL
    if _PROBE_MODEL is None:
        from ..testing import mlp

        _PROBE_MODEL = mlp(2, 2, 2).SerializeToString()
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
