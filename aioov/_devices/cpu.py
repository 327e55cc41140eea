"""``CPU``: ONNX Runtime's CPUExecutionProvider, present in every build."""

from __future__ import annotations

import platform
from collections.abc import Mapping

from .._cache.blob import OrtOptimizedBlob
from .base import Device

__all__ = ("CPUDevice",)


class CPUDevice(Device):
    family = "CPU"
    provider = "CPUExecutionProvider"
    blob = OrtOptimizedBlob()

    def available(self) -> bool:
        return True

    def full_name(self) -> str:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine() or "CPU"

    def capabilities(self, options: Mapping[str, str] | None = None) -> list[str]:
        return ["FP32", "INT8", *super().capabilities(options)[1:]]
