"""The device layer: name parsing, AUTO, and probing providers for real."""

from __future__ import annotations

from pathlib import Path

import pytest

import aioov
from aioov._devices import DeviceRegistry
from aioov._devices.base import Device
from aioov._devices.cpu import CPUDevice
from aioov._devices.gpu import CUDADevice, TensorRTDevice

pytestmark = pytest.mark.anyio


class NowhereDevice(Device):
    """A provider name that no onnxruntime build has."""

    family = "GPU"
    provider = "NowhereExecutionProvider"


class ListedButBrokenDevice(Device):
    """A provider ORT lists but that falls back to CPU when a session is built: the
    situation of CUDA on a machine without CUDA libraries."""

    family = "GPU"
    provider = "CPUExecutionProvider"

    def provider_listed(self) -> bool:
        return True

    def available(self) -> bool:
        self._probed, self._probe_error = False, "falls back to CPU"
        return False


def test_names_are_parsed() -> None:
    registry = DeviceRegistry()
    assert str(registry.parse("gpu.1")) == "GPU.1"
    assert str(registry.parse("CPU")) == "CPU"
    assert registry.parse("TENSORRT.0").index == 0
    for bad in ("", "GPU.", "GPU.x", "CPU:0", "NPU"):
        with pytest.raises(aioov.DeviceNotFoundError):
            registry.parse(bad)


def test_auto_falls_back_to_cpu_when_no_gpu_loads() -> None:
    registry = DeviceRegistry([CPUDevice(), NowhereDevice()])
    device, spec = registry.resolve("AUTO")
    assert device.family == "CPU" and str(spec) == "CPU"
    assert registry.available() == ["CPU"]


def test_a_provider_missing_from_the_build_is_not_available() -> None:
    registry = DeviceRegistry([CPUDevice(), NowhereDevice()])
    with pytest.raises(aioov.DeviceNotFoundError, match="not available here.*not in this build.*available: CPU"):
        registry.resolve("GPU")


def test_probe_detects_a_silent_fallback_to_cpu() -> None:
    from aioov._devices.base import probe_session

    assert probe_session([("CPUExecutionProvider", {})]) is True
    # Asking for a provider that fails makes ORT fall back to CPU without an error:
    # the probe must see through that.
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers() and CUDADevice().precheck():
        assert probe_session([("CUDAExecutionProvider", {})]) is False


def test_gpu_devices_map_to_providers_with_fallbacks() -> None:
    assert CUDADevice().providers(1, {}) == [
        ("CUDAExecutionProvider", {"device_id": "1"}), ("CPUExecutionProvider", {})]
    trt = TensorRTDevice().providers(None, {"trt_fp16_enable": "1"})
    assert [name for name, _ in trt] == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert trt[0][1] == {"device_id": "0", "trt_fp16_enable": "1"}


def test_devices_that_cannot_export_do_not_claim_export_import() -> None:
    assert "EXPORT_IMPORT" in CPUDevice().capabilities()
    assert "EXPORT_IMPORT" not in CUDADevice().capabilities()
    assert "EXPORT_IMPORT" not in TensorRTDevice().capabilities()


async def test_a_device_that_cannot_export_compiles_without_writing(mlp_path: Path, cache_dir: Path) -> None:
    class NoExportCPU(CPUDevice):
        blob_kind = None

    core = aioov.Core(cache_dir=cache_dir, devices=DeviceRegistry([NoExportCPU()]))
    compiled = await core.compile_model(mlp_path, "CPU")
    await core.aclose()
    assert compiled.get_property("LOADED_FROM_CACHE") is False
    assert not cache_dir.exists()


def test_key_inputs_differ_per_device_and_provider_options() -> None:
    from aioov._core import _key_inputs
    from aioov._devices import DeviceSpec
    from aioov._properties import DEFAULTS

    cpu, cuda = CPUDevice(), CUDADevice()
    a = _key_inputs("d", cpu, DeviceSpec("CPU"), cpu.providers(None, {}), DEFAULTS)
    b = _key_inputs("d", cuda, DeviceSpec("GPU", 0), cuda.providers(0, {}), DEFAULTS)
    c = _key_inputs("d", cuda, DeviceSpec("GPU", 1), cuda.providers(1, {}), DEFAULTS)
    assert len({str(a), str(b), str(c)}) == 3


@pytest.mark.skipif(not CUDADevice().available(), reason=f"CUDA does not load here: {CUDADevice().unavailable_reason}")
async def test_compile_on_a_real_gpu(mlp_path: Path) -> None:  # pragma: no cover - needs a GPU
    import numpy as np

    compiled = await aioov.Core().compile_model(mlp_path, "GPU")
    assert compiled.get_property("EXECUTION_PROVIDERS")[0] == "CUDAExecutionProvider"
    assert (await compiled.infer(np.ones((1, 8), np.float32)))["y"].shape == (1, 4)
