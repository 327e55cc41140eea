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


def test_only_devices_that_can_export_claim_export_import() -> None:
    assert "EXPORT_IMPORT" in CPUDevice().capabilities()
    assert "EXPORT_IMPORT" in TensorRTDevice().capabilities()
    assert "EXPORT_IMPORT" not in CUDADevice().capabilities()


async def test_a_device_that_cannot_export_compiles_without_writing(mlp_path: Path, cache_dir: Path) -> None:
    class NoExportCPU(CPUDevice):
        blob = None

    core = aioov.Core(cache_dir=cache_dir, devices=DeviceRegistry([NoExportCPU()]))
    compiled = await core.compile_model(mlp_path, "CPU")
    await core.aclose()
    assert compiled.get_property("LOADED_FROM_CACHE") is False
    assert not cache_dir.exists()


def test_key_inputs_differ_per_device_and_provider_options() -> None:
    from aioov._devices import DeviceSpec
    from aioov._pipeline import _key_inputs
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


# -- TensorRT entries, with the provider calls isolated -----------------------------------


def test_tensorrt_export_writes_everything_inside_the_entry(tmp_path: Path) -> None:
    import onnxruntime as ort

    from aioov._cache.blob import TensorRTContextBlob

    providers = TensorRTDevice().providers(1, {"trt_fp16_enable": "1"})
    configured = TensorRTContextBlob().configure_export(ort.SessionOptions(), providers, tmp_path, "ab" * 32, {})
    (name, trt), *fallbacks = configured
    assert name == "TensorrtExecutionProvider" and fallbacks == providers[1:]
    assert trt["device_id"] == "1" and trt["trt_fp16_enable"] == "1"
    assert trt["trt_engine_cache_prefix"] == "aioov_" + "ab" * 16  # the content key, not ORT's name hash
    for option in ("trt_engine_cache_path", "trt_timing_cache_path", "trt_ep_context_file_path"):
        assert Path(trt[option]).resolve().is_relative_to(tmp_path.resolve()), option
    assert trt["trt_dump_ep_context_model"] == "True" and trt["trt_ep_context_embed_mode"] == "1"


def test_tensorrt_import_never_writes_into_the_entry(tmp_path: Path) -> None:
    import onnxruntime as ort

    from aioov._cache.blob import TensorRTContextBlob

    blob = TensorRTContextBlob()
    exported = blob.configure_export(ort.SessionOptions(), TensorRTDevice().providers(None, {}), tmp_path, "c" * 64, {})
    (_, trt), *_ = blob.configure_import(ort.SessionOptions(), exported, tmp_path)
    assert not [k for k in trt if k.startswith(("trt_engine_cache", "trt_timing_cache"))]


def test_tensorrt_finalize_keeps_only_the_context_model(tmp_path: Path) -> None:
    from aioov._cache.blob import BlobError, TensorRTContextBlob

    blob = TensorRTContextBlob()
    (tmp_path / "aioov_x.engine").write_bytes(b"engine")
    (tmp_path / "aioov_x.timing").write_bytes(b"timing")
    with pytest.raises(BlobError, match="no EP-context model"):
        blob.finalize(tmp_path, ["x"])
    (tmp_path / "model_ctx.onnx").write_bytes(b"ctx")
    blob.finalize(tmp_path, ["x"])
    assert [p.name for p in tmp_path.iterdir()] == ["model_ctx.onnx"]


def test_tensorrt_key_includes_the_gpu_and_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    from aioov._devices import DeviceSpec, gpu
    from aioov._pipeline import _key_inputs
    from aioov._properties import DEFAULTS

    trt = TensorRTDevice()
    keys = []
    for name in ("NVIDIA H100", "NVIDIA L4"):
        monkeypatch.setattr(gpu, "nvidia_gpus", lambda name=name: ({"name": name, "compute_capability": "9.0"},))
        inputs = _key_inputs("d", trt, DeviceSpec("TENSORRT", 0), trt.providers(0, {}), DEFAULTS)
        assert inputs["blob"] == "trt-ep-context"
        assert {"tensorrt", "cuda", "gpu"} <= set(inputs["hardware"])
        keys.append(str(inputs))
    assert keys[0] != keys[1]


class _ContextStyleBlob:
    """The TensorRT entry flow (compile writes the blob, no background export, a context
    model as the entry's graph) with a CPU stand-in for TensorRT's dump."""

    kind = "trt-ep-context"
    model_file = "model_ctx.onnx"
    background = False

    def configure_export(self, options, providers, tmp, key, props):  # type: ignore[no-untyped-def]
        options.optimized_model_filepath = str(tmp / self.model_file)  # stands in for trt_dump_ep_context_model
        return providers

    def configure_import(self, options, providers, entry):  # type: ignore[no-untyped-def]
        return providers

    def finalize(self, tmp, input_names):  # type: ignore[no-untyped-def]
        from aioov._cache.blob import TensorRTContextBlob

        TensorRTContextBlob.finalize(self, tmp, input_names)  # type: ignore[arg-type]


async def test_context_model_entries_are_written_by_the_compile_itself(
    mlp_path: Path, cache_dir: Path
) -> None:
    import numpy as np

    from .helpers import reference

    class StandInTensorRT(CPUDevice):
        family = "TENSORRT"
        blob = _ContextStyleBlob()  # type: ignore[assignment]

    registry = DeviceRegistry([CPUDevice(), StandInTensorRT()])
    async with aioov.Core(cache_dir=cache_dir, devices=registry) as core:
        first = await core.compile_model(mlp_path, "TENSORRT")
        assert core.pending_exports == 0  # published before compile_model returned
        (entry,) = list((cache_dir / "v1").glob("??/*"))
        assert sorted(p.name for p in entry.iterdir()) == ["manifest.json", "model_ctx.onnx"]
        second = await core.compile_model(mlp_path, "TENSORRT")
    assert first.get_property("LOADED_FROM_CACHE") is False and second.get_property("LOADED_FROM_CACHE") is True
    x = np.ones((2, 8), np.float32)
    np.testing.assert_allclose((await second.infer(x))["y"], reference(mlp_path, {"x": x})[0], rtol=1e-5)


@pytest.mark.skipif(not TensorRTDevice().available(),
                    reason=f"TensorRT does not load here: {TensorRTDevice().unavailable_reason}")
async def test_tensorrt_entry_on_a_real_gpu(mlp_path: Path, cache_dir: Path) -> None:  # pragma: no cover - GPU
    async with aioov.Core(cache_dir=cache_dir) as core:
        first = await core.compile_model(mlp_path, "TENSORRT")
        second = await core.compile_model(mlp_path, "TENSORRT")
    assert first.get_property("LOADED_FROM_CACHE") is False and second.get_property("LOADED_FROM_CACHE") is True
    (entry,) = list((cache_dir / "v1").glob("??/*"))
    assert sorted(p.name for p in entry.iterdir()) == ["manifest.json", "model_ctx.onnx"]
