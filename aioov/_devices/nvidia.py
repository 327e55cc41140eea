"""NVIDIA devices: ``GPU[.N]`` (CUDA) and ``TENSORRT[.N]``, and TensorRT's blob format.

``onnxruntime.get_available_providers()`` lists CUDA and TensorRT whenever
onnxruntime-gpu is installed, even on a machine without CUDA: availability is
therefore probed by building a tiny session (see ``Device.available``).

``CUDAGraphBlob`` (GPU): the model's basic-level optimized graph with its weights beside it.
What the CUDA provider optimizes further (EXTENDED, ALL) is partitioned for one provider and
holds Memcpy nodes, and there is no engine to keep; the basic level runs before partitioning,
so it is the same for every provider and can be written and checked by a builder on the CPU,
without a second CUDA context. A hit loads it with the compile's own optimization level, so
the CUDA provider does the rest as it would from the source: on an H100, in a process with
CUDA up, a BERT-base hit took 0.19 s against 0.80 s for a plain session, outputs identical
(docs/performance.md).

``TensorRTContextBlob`` (TENSORRT): the EP-context model TensorRT dumps while it builds its
engine (``model_ctx.onnx``, engine embedded), written by the compile itself. The engine
cache prefix is the aioov key, so two models of one structure can never share an engine
(onnxruntime's own cache keys hash names, not weights: upstream #6455), and every path
points inside the entry being written: the same locks, atomic publish and checksums apply.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

from .._errors import BlobError
from .base import CPU_FALLBACK, BlobFormat, Device, ProviderList, cpu_fingerprint, with_first
from .cpu import OrtOptimizedBlob

__all__ = ("CUDADevice", "CUDAGraphBlob", "TensorRTContextBlob", "TensorRTDevice")


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


#: the TensorRT runtime libraries onnxruntime's TensorRT provider loads, newest first
TENSORRT_LIBRARIES = ("libnvinfer.so.10", "libnvinfer.so.8", "nvinfer_10.dll", "nvinfer.dll")


@cache
def tensorrt_missing() -> str | None:
    """Without TensorRT's runtime the provider cannot load: saying so up front spares users
    onnxruntime's "EP Error ... Please install TensorRT libraries" block on every probe."""
    for name in TENSORRT_LIBRARIES:
        try:
            ctypes.CDLL(name)
            return None
        except OSError:
            continue
    return f"no TensorRT runtime ({' / '.join(TENSORRT_LIBRARIES[:2])} not found)"


@cache
def nvidia_gpus() -> tuple[dict[str, str], ...]:
    """Every GPU as nvidia-smi lists them (PCI bus order): index, uuid, name, compute
    capability and driver (empty without nvidia-smi)."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return ()
    query = "--query-gpu=index,uuid,name,compute_cap,driver_version"
    try:
        out = subprocess.run([smi, query, "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    fields = ("index", "uuid", "name", "compute_capability", "driver")
    return tuple(dict(zip(fields, (part.strip() for part in line.split(",")))) for line in out.splitlines() if line)


def cuda_visible_gpus() -> list[dict[str, str]]:
    """The GPUs this process's CUDA numbers 0, 1, ...: ``CUDA_VISIBLE_DEVICES`` (indexes or
    UUIDs) selects and orders them; CUDA ignores everything after an entry it cannot match."""
    gpus = nvidia_gpus()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return list(gpus)
    chosen = []
    for item in (part.strip() for part in visible.split(",")):
        match = next((g for g in gpus if item and (g.get("index") == item or g.get("uuid", "").startswith(item)
                                                    or g.get("uuid", "").startswith(f"GPU-{item}"))), None)
        if match is None:
            break
        chosen.append(match)
    return chosen


def gpu_identity(index: int | None) -> dict[str, Any]:
    """What a blob built on CUDA device ``index`` depends on. CUDA's default order puts the
    fastest GPU first, nvidia-smi's follows the PCI bus: on a machine with mixed GPUs and no
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` the two cannot be matched without CUDA, so the identity
    names the visible GPUs and the ordinal instead (a key that is too specific, never a wrong one)."""
    visible = cuda_visible_gpus()
    ordinal = index or 0
    if ordinal >= len(visible):
        return {"name": "unknown"}
    kinds = {(g.get("name"), g.get("compute_capability")) for g in visible}
    if len(kinds) > 1 and os.environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        # the same visible set and ordinal always mean the same GPU, so this names it uniquely
        names = sorted(f"{g.get('name')} ({g.get('compute_capability')})" for g in visible)
        return {"visible": names, "ordinal": ordinal, "driver": visible[0].get("driver")}
    gpu = visible[ordinal]
    return {k: gpu[k] for k in ("name", "compute_capability", "driver") if k in gpu}


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


class CUDAGraphBlob(OrtOptimizedBlob):
    kind = "ort-basic-graph"
    instant = False  # nothing is repacked on a GPU: a hit loads as fast as it can anyway

    def variants(self, prepack: bool) -> tuple[str, ...]:
        return ("basic",)

    def faster_variant(self, prepack: bool) -> str | None:
        return None

    def builder_providers(self, providers: ProviderList) -> ProviderList:
        return [CPU_FALLBACK]


class TensorRTContextBlob(BlobFormat):
    kind = "trt-ep-context"
    model_file = "model_ctx.onnx"
    background = False  # the engine build is the compile: it writes the blob as it goes

    def configure_export(
        self, options: Any, providers: ProviderList, tmp: Path, key: str, variant: str = "default"
    ) -> ProviderList:
        return with_first(
            providers,
            trt_engine_cache_enable="True",
            trt_engine_cache_path=str(tmp),
            trt_engine_cache_prefix=f"aioov_{key[:32]}",
            trt_timing_cache_enable="True",
            trt_timing_cache_path=str(tmp),
            trt_dump_ep_context_model="True",
            trt_ep_context_file_path=str(tmp / self.model_file),
            trt_ep_context_embed_mode="1",  # the engine inside the context model: one self-contained file
        )

    def configure_import(
        self, options: Any, providers: ProviderList, entry: Path, scratch: Path | None = None,
        variant: str = "default",
    ) -> ProviderList:
        # The engine is embedded in the context model; no cache paths, so that ONNX Runtime
        # never writes into a published entry.
        (name, first), *rest = providers
        first = {k: v for k, v in first.items() if not k.startswith(("trt_engine_cache", "trt_timing_cache"))}
        return [(name, first), *rest]

    def finalize(self, tmp: Path, input_names: list[str]) -> None:
        if not (tmp / self.model_file).is_file():
            raise BlobError("TensorRT wrote no EP-context model (no node ran on TensorRT?)")
        for file in tmp.iterdir():  # engines and timing caches are inside the context model now
            if file.name != self.model_file:
                file.unlink()


def _device_id(index: int | None) -> dict[str, str]:
    """``device_id`` for GPU N > 0 only: 0 is the providers' default, and naming it makes
    onnxruntime 1.26+ warn "No registered plugin EP device found" on every session."""
    return {"device_id": str(index)} if index else {}


class _NvidiaDevice(Device):
    kind: ClassVar[str]  # how FULL_DEVICE_NAME names the runtime

    def precheck(self) -> str | None:
        return nvidia_driver_missing()

    def fingerprint(self, index: int | None) -> dict[str, Any]:
        """An engine is specific to the GPU model, compute capability and driver."""
        return {**cpu_fingerprint(), "gpu": gpu_identity(index), "cuda": cuda_version()}

    def full_name(self) -> str:
        name = gpu_identity(None).get("name", "unknown")
        return f"{name} ({self.kind})" if name != "unknown" else self.family


class CUDADevice(_NvidiaDevice):
    family = "GPU"
    provider = "CUDAExecutionProvider"
    kind = "CUDA"
    blob = CUDAGraphBlob()
    # Sessions on one GPU built in threads overlap well (the gpu benchmark scenario), but each
    # holds its transient memory while it builds, and microsoft/onnxruntime#26610 reported
    # crashes building CUDA sessions in threads: bounded, not unlimited.
    parallel_builds = 4

    def providers(self, index: int | None, options: Mapping[str, str]) -> ProviderList:
        return [(self.provider, {**_device_id(index), **options}), CPU_FALLBACK]


class TensorRTDevice(_NvidiaDevice):
    family = "TENSORRT"
    provider = "TensorrtExecutionProvider"
    kind = "TensorRT"
    blob = TensorRTContextBlob()
    # One engine build at a time: concurrent TensorRT session creation crashed
    # (microsoft/onnxruntime#20089, #7322), and builders in parallel perturb TensorRT's timing.
    parallel_builds = 1

    def precheck(self) -> str | None:
        return super().precheck() or tensorrt_missing()

    def fingerprint(self, index: int | None) -> dict[str, Any]:
        return {**super().fingerprint(index), "tensorrt": tensorrt_version()}

    def providers(self, index: int | None, options: Mapping[str, str]) -> ProviderList:
        device = _device_id(index)
        return [(self.provider, {**device, **options}), ("CUDAExecutionProvider", device), CPU_FALLBACK]

