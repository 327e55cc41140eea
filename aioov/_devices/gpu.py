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

from collections.abc import Mapping

from .base import Device, ProviderList

__all__ = ("CUDADevice", "OpenVINODevice", "TensorRTDevice")

_CPU: tuple[str, dict[str, str]] = ("CPUExecutionProvider", {})


class CUDADevice(Device):
    family = "GPU"
    provider = "CUDAExecutionProvider"
    serialize_compiles = True

    def providers(self, index: int | None, options: Mapping[str, str]) -> ProviderList:
        opts = {"device_id": str(index or 0), **options}
        return [(self.provider, opts), _CPU]

    def full_name(self) -> str:
        return "NVIDIA GPU (CUDA)"


class TensorRTDevice(Device):
    family = "TENSORRT"
    provider = "TensorrtExecutionProvider"
    serialize_compiles = True

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
