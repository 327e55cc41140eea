"""GPU devices: ``GPU[.N]`` (CUDA), ``TENSORRT[.N]`` and ``OPENVINO``.

``onnxruntime.get_available_providers()`` lists CUDA and TensorRT whenever
onnxruntime-gpu is installed, even on a machine without CUDA: availability is
therefore probed by building a tiny session (see ``Device.available``).

TENSORRT is cached as an EP-context model with its engine embedded (see
``_cache.blob.TensorRTContextBlob``), OPENVINO on its GPU and NPU as OpenVINO's own
cached blob beside a copy of the model (``_cache.blob.OpenVINOCacheBlob``). GPU (CUDA)
and OPENVINO on CPU do not advertise ``EXPORT_IMPORT``: a model optimized by the CUDA
provider contains Memcpy nodes and there is no engine to keep, and OpenVINO's cache
makes a CPU session slower; they compile normally, with no error, and write nothing
to the cache.
"""

from __future__ import annotations

import ctypes
import glob
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from functools import cache
from typing import Any, ClassVar

from .._cache.blob import OpenVINOCacheBlob, TensorRTContextBlob
from .base import Device, ProviderList, cpu_fingerprint

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


@cache
def nvidia_gpus() -> tuple[dict[str, str], ...]:
    """Name, compute capability and driver of each GPU, from nvidia-smi (empty without it)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ()
    try:
        out = subprocess.run([smi, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    fields = ("name", "compute_capability", "driver")
    return tuple(dict(zip(fields, (part.strip() for part in line.split(",")))) for line in out.splitlines() if line)


@cache
def cuda_version() -> str:
    """The CUDA version this onnxruntime build targets."""
    try:
        from onnxruntime.capi import build_and_package_info

        return str(getattr(build_and_package_info, "cuda_version", "none"))
    except ImportError:
        return "none"


@cache
def tensorrt_version() -> str:
    try:
        import tensorrt

        return str(tensorrt.__version__)
    except ImportError:
        pass
    for name in ("libnvinfer.so.10", "libnvinfer.so.8", "nvinfer_10.dll"):
        try:
            return str(ctypes.CDLL(name).getInferLibVersion())
        except (OSError, AttributeError):
            continue
    return "unknown"


@cache
def openvino_version() -> str:
    """The OpenVINO runtime the provider uses: onnxruntime-openvino bundles its own
    ``libopenvino.so.<version>`` beside the provider library."""
    import onnxruntime

    capi = os.path.join(os.path.dirname(onnxruntime.__file__), "capi")
    bundled = sorted(glob.glob(os.path.join(capi, "libopenvino.so.*.*.*")))
    if bundled:
        return os.path.basename(bundled[-1]).removeprefix("libopenvino.so.")
    try:
        import openvino

        return str(openvino.__version__)
    except ImportError:
        return "unknown"


class _NvidiaDevice(Device):
    serialize_compiles = True

    def precheck(self) -> str | None:
        return nvidia_driver_missing()

    def fingerprint(self, index: int | None) -> dict[str, Any]:
        """An engine is specific to the GPU model, compute capability and driver."""
        gpus = nvidia_gpus()
        gpu = gpus[index or 0] if len(gpus) > (index or 0) else {"name": "unknown"}
        return {**cpu_fingerprint(), "gpu": gpu, "cuda": cuda_version()}


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
    blob = TensorRTContextBlob()

    def fingerprint(self, index: int | None) -> dict[str, Any]:
        return {**super().fingerprint(index), "tensorrt": tensorrt_version()}

    def providers(self, index: int | None, options: Mapping[str, str]) -> ProviderList:
        device = {"device_id": str(index or 0)}
        return [(self.provider, {**device, **options}), ("CUDAExecutionProvider", device), _CPU]

    def full_name(self) -> str:
        return "NVIDIA GPU (TensorRT)"


class OpenVINODevice(Device):
    family = "OPENVINO"
    provider = "OpenVINOExecutionProvider"
    blob = OpenVINOCacheBlob()
    #: OpenVINO device types whose compile a cached blob skips. Not CPU: there the provider's
    #: session time is onnxruntime's and the ONNX conversion, and a hit was measured slower
    #: than a compile (benchmarks, scenario ovep; docs/devices.md)
    cached_device_types: ClassVar[tuple[str, ...]] = ("GPU", "NPU")

    def caches(self, options: Mapping[str, str]) -> bool:
        device_type = options.get("device_type", "CPU").upper()  # e.g. GPU.1, HETERO:GPU,CPU
        return super().caches(options) and any(kind in device_type for kind in self.cached_device_types)

    def fingerprint(self, index: int | None) -> dict[str, Any]:
        """OpenVINO's blobs are specific to its version (it refuses others) and the CPU's ISA."""
        return {**cpu_fingerprint(), "openvino": openvino_version()}

    def providers(self, index: int | None, options: Mapping[str, str]) -> ProviderList:
        return [(self.provider, {"device_type": "CPU", **options}), _CPU]

    def full_name(self) -> str:
        return "Intel OpenVINO execution provider"
