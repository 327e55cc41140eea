"""GPU devices: ``GPU[.N]`` (CUDA), ``TENSORRT[.N]`` and ``OPENVINO``.

``onnxruntime.get_available_providers()`` lists CUDA and TensorRT whenever
onnxruntime-gpu is installed, even on a machine without CUDA: availability is
therefore probed by building a tiny session (see ``Device.available``).

None of these advertise ``EXPORT_IMPORT`` yet: a model optimized by the CUDA
provider contains Memcpy nodes, and one compiled by TensorRT or OpenVINO
cannot be saved at all ("contains compiled nodes"). They compile normally,
with no error, and write nothing to the cache.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Mapping
from functools import cache

from .base import Device, ProviderList

__all__ = ("CUDADevice", "OpenVINODevice", "TensorRTDevice")

_CPU: tuple[str, dict[str, str]] = ("CPUExecutionProvider", {})


@cache
def nvidia_driver_missing() -> str | None:
    """Without the driver's libcuda no CUDA provider can load; saying so up front spares
    users ONNX Runtime's error log from a probe session on every CPU-only machine."""
    name = "nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1"
    try:
        ctypes.CDLL(name)
    except OSError:
        return f"no NVIDIA driver ({name} not found)"
    return None


class _NvidiaDevice(Device):
    serialize_compiles = True

    def precheck(self) -> str | None:
        return nvidia_driver_missing()


class CUDADevice(_NvidiaDevice):
    family = "GPU"
    provider = "CUDAExecutionProvider"

    def providers(self, index: int | None, options: Mapping[str, str]) -> ProviderList:
        opts = {"device_id": str(index or 0), **options}
        return [(self.provider, opts), _CPU]

    def full_name(self) -> str:
        return "NVIDIA GPU (CUDA)"


class TensorRTDevice(_NvidiaDevice):
    family = "TENSORRT"
    provider = "TensorrtExecutionProvider"

    def providers(self, index: int | None, options: Mapping[str, str]) -> ProviderList:
        device = {"device_id": str(index or 0)}
        return [(self.provider, {**device, **options}), ("CUDAExecutionProvider", device), _CPU]

    def full_name(self) -> str:
        return "NVIDIA GPU (TensorRT)"


class OpenVINODevice(Device):
    family = "OPENVINO"
    provider = "OpenVINOExecutionProvider"

    def providers(self, index: int | None, options: Mapping[str, str]) -> ProviderList:
        return [(self.provider, {"device_type": "CPU", **options}), _CPU]

    def full_name(self) -> str:
        return "Intel OpenVINO execution provider"
