"""The device layer: name parsing, AUTO, and probing providers for real."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import numpy as np
import pytest

import aioov
from aioov._devices import DeviceRegistry
from aioov._devices.base import Device
from aioov._devices.cpu import CPUDevice
from aioov._devices.nvidia import CUDADevice, TensorRTContextBlob, TensorRTDevice
from aioov._devices.openvino import OpenVINOCacheBlob, OpenVINODevice
from aioov._errors import BlobError
from aioov.testing import mlp, save_with_external_data

from .helpers import reference, run_python

pytestmark = pytest.mark.anyio


@pytest.fixture
def nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """``nvidia_smi(gpus)``: an ``nvidia-smi`` first on PATH that lists ``gpus`` as the real one
    does (``--format=csv,noheader``); ``nvidia_smi(None)``: no nvidia-smi on PATH at all."""
    from aioov._devices import nvidia

    folder, empty = tmp_path / "smi", tmp_path / "no-smi"
    folder.mkdir()
    empty.mkdir()
    path = os.environ.get("PATH", "")

    def lists(gpus: tuple[dict[str, str], ...] | None) -> None:
        if gpus is None:
            monkeypatch.setenv("PATH", str(empty))
        else:
            fields = ("index", "uuid", "name", "compute_capability", "driver")
            rows = [", ".join(gpu.get(f, {"index": str(i), "uuid": f"GPU-{i:04}", "driver": "580"}.get(f, ""))
                              for f in fields) for i, gpu in enumerate(gpus)]
            (folder / "gpus.csv").write_text("".join(f"{row}\n" for row in rows))
            smi = folder / "nvidia-smi"
            smi.write_text(f"#!/bin/sh\nexec cat '{folder / 'gpus.csv'}'\n")
            smi.chmod(0o755)
            monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{path}")
        nvidia.nvidia_gpus.cache_clear()  # it asks nvidia-smi once per process

    yield lists
    nvidia.nvidia_gpus.cache_clear()


class NowhereDevice(Device):
    """A provider name that no onnxruntime build has."""

    family = "GPU"
    provider = "NowhereExecutionProvider"


def test_names_are_parsed() -> None:
    registry = DeviceRegistry()
    assert str(registry.parse("gpu.1")) == "GPU.1"
    assert str(registry.parse("CPU")) == "CPU"
    assert registry.parse("TENSORRT.0").index == 0
    for bad in ("", "GPU.", "GPU.x", "CPU:0", "NPU"):
        with pytest.raises(aioov.DeviceNotFoundError):
            registry.parse(bad)


def test_auto_prefers_a_gpu_and_never_picks_tensorrt_or_openvino() -> None:
    class LoadsCUDA(CUDADevice):
        def available(self) -> bool:
            return True

    class LoadsEverywhere(OpenVINODevice):
        def available(self) -> bool:
            return True

    registry = DeviceRegistry([CPUDevice(), LoadsEverywhere()])
    assert registry.resolve("AUTO")[0].family == "CPU"
    registry = DeviceRegistry([CPUDevice(), LoadsEverywhere(), LoadsCUDA()])
    device, spec = registry.resolve("AUTO")
    assert device.family == "GPU" and str(spec) == "GPU"


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
    assert trt[0][1] == {"trt_fp16_enable": "1"}  # device 0: the provider's default


def test_only_devices_that_can_export_claim_export_import() -> None:
    assert "EXPORT_IMPORT" in CPUDevice().capabilities()
    assert "EXPORT_IMPORT" in TensorRTDevice().capabilities()
    assert "EXPORT_IMPORT" in CUDADevice().capabilities()  # its basic-level graph
    assert "EXPORT_IMPORT" not in OpenVINODevice().capabilities()  # on its CPU device type


async def test_a_device_that_cannot_export_compiles_without_writing(mlp_path: Path, cache_dir: Path) -> None:
    class NoExportCPU(CPUDevice):
        blob = None

    core = aioov.Core(cache_dir=cache_dir, devices=DeviceRegistry([NoExportCPU()]))
    compiled = await core.compile_model(mlp_path, "CPU")
    await core.aclose()
    assert compiled.get_property("LOADED_FROM_CACHE") is False
    assert not cache_dir.exists()


def _key_inputs(digest: str, device: Device, spec: object, providers: list) -> dict:  # type: ignore[type-arg]
    """The key inputs of a compile of model ``digest`` with default properties."""
    from aioov._properties import CompileConfig
    from aioov._request import CompileRequest, Source

    return CompileRequest(Source(None), device, spec, providers, CompileConfig()).key_inputs(digest)  # type: ignore[arg-type]


def test_key_inputs_differ_per_device_and_provider_options() -> None:
    from aioov._devices import DeviceSpec

    cpu, cuda = CPUDevice(), CUDADevice()
    a = _key_inputs("d", cpu, DeviceSpec("CPU"), cpu.providers(None, {}))
    b = _key_inputs("d", cuda, DeviceSpec("GPU", 0), cuda.providers(0, {}))
    c = _key_inputs("d", cuda, DeviceSpec("GPU", 1), cuda.providers(1, {}))
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

    providers = TensorRTDevice().providers(1, {"trt_fp16_enable": "1"})
    configured = TensorRTContextBlob().configure_export(ort.SessionOptions(), providers, tmp_path, "ab" * 32)
    (name, trt), *fallbacks = configured
    assert name == "TensorrtExecutionProvider" and fallbacks == providers[1:]
    assert trt["device_id"] == "1" and trt["trt_fp16_enable"] == "1"
    assert trt["trt_engine_cache_prefix"] == "aioov_" + "ab" * 16  # the content key, not ORT's name hash
    for option in ("trt_engine_cache_path", "trt_timing_cache_path", "trt_ep_context_file_path"):
        assert Path(trt[option]).resolve().is_relative_to(tmp_path.resolve()), option
    assert trt["trt_dump_ep_context_model"] == "True" and trt["trt_ep_context_embed_mode"] == "1"


def test_tensorrt_import_never_writes_into_the_entry(tmp_path: Path) -> None:
    import onnxruntime as ort

    blob = TensorRTContextBlob()
    providers = TensorRTDevice().providers(None, {})
    exported = blob.configure_export(ort.SessionOptions(), providers, tmp_path, "c" * 64)
    (_, trt), *_ = blob.configure_import(ort.SessionOptions(), exported, tmp_path, None)
    assert not [k for k in trt if k.startswith(("trt_engine_cache", "trt_timing_cache"))]


def test_tensorrt_finalize_keeps_only_the_context_model(tmp_path: Path) -> None:
    blob = TensorRTContextBlob()
    (tmp_path / "aioov_x.engine").write_bytes(b"engine")
    (tmp_path / "aioov_x.timing").write_bytes(b"timing")
    with pytest.raises(BlobError, match="no EP-context model"):
        blob.finalize(tmp_path, ["x"])
    (tmp_path / "model_ctx.onnx").write_bytes(b"ctx")
    blob.finalize(tmp_path, ["x"])
    assert [p.name for p in tmp_path.iterdir()] == ["model_ctx.onnx"]


def _blob_graph(folder: Path, inputs: list[str], initializers: list[str], used: list[str]) -> Path:
    """An optimized model as onnxruntime might save it: ``inputs`` listed as graph inputs
    (an old IR lists initializers there too), ``used`` by its one node."""
    import onnx
    from onnx import TensorProto, helper

    tensors = [helper.make_tensor(name, TensorProto.FLOAT, [1, 2], [1.0, 2.0]) for name in initializers]
    graph = helper.make_graph(
        [helper.make_node("Sum", used, ["y"])], "blob",
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 2]) for name in inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], tensors,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(folder / "model.onnx"))
    return folder / "model.onnx"


def _graph_inputs(path: Path) -> list[str]:
    import onnx

    return [i.name for i in onnx.load(str(path)).graph.input]


def test_cpu_finalize_checks_the_blob_inputs_against_the_model(tmp_path: Path) -> None:
    """The exported graph must take exactly the source model's inputs; initializers an old
    IR also lists as inputs are not inputs, and inputs the graph no longer uses are dropped."""
    blob = CPUDevice.blob
    path = _blob_graph(tmp_path, ["x", "w"], ["w"], ["x", "w"])
    blob.finalize(tmp_path, ["x"])
    assert _graph_inputs(path) == ["x", "w"]  # nothing to drop: the file is as written

    path = _blob_graph(tmp_path, ["x", "unused"], [], ["x"])
    blob.finalize(tmp_path, ["x"])
    assert _graph_inputs(path) == ["x"]

    _blob_graph(tmp_path, ["x", "extra"], [], ["x", "extra"])
    with pytest.raises(BlobError, match="needs inputs that the source model does not have"):
        blob.finalize(tmp_path, ["x"])
    _blob_graph(tmp_path, ["x"], [], ["x"])
    with pytest.raises(BlobError, match="differ from the model's"):
        blob.finalize(tmp_path, ["x", "mask"])
    path.write_bytes(b"\x08\x08garbage")
    with pytest.raises(BlobError, match="does not read back"):
        blob.finalize(tmp_path, ["x"])


def test_cpu_finalize_does_not_import_onnx_when_nothing_is_dropped(tmp_path: Path) -> None:
    """onnx's import is 0.14-0.21 s of a builder's start, on the way to every published entry."""
    _blob_graph(tmp_path, ["x", "w"], ["w"], ["x", "w"])
    code = (
        "import sys; from pathlib import Path\n"
        "from aioov._devices.cpu import CPUDevice\n"
        "CPUDevice.blob.finalize(Path(sys.argv[1]), ['x'])\n"
        "print('onnx' in sys.modules)\n"
    )
    assert run_python(code, str(tmp_path)).stdout.strip() == "False"


def test_tensorrt_key_includes_the_gpu_and_tensorrt(nvidia_smi: Callable[..., None]) -> None:
    from aioov._devices import DeviceSpec

    trt = TensorRTDevice()
    keys = []
    for name in ("NVIDIA H100", "NVIDIA L4"):
        nvidia_smi(({"name": name, "compute_capability": "9.0"},))
        inputs = _key_inputs("d", trt, DeviceSpec("TENSORRT", 0), trt.providers(0, {}))
        assert inputs["blob"] == "trt-ep-context"
        assert {"tensorrt", "cuda", "gpu"} <= set(inputs["hardware"])
        keys.append(str(inputs))
    assert keys[0] != keys[1]


class _ContextStyleBlob(TensorRTContextBlob):
    """The TensorRT entry flow (compile writes the blob, no background export, a context
    model as the entry's graph) with a CPU stand-in for TensorRT's dump."""

    def configure_export(self, options, providers, tmp, key, variant="default"):  # type: ignore[no-untyped-def]
        options.optimized_model_filepath = str(tmp / self.model_file)  # stands in for trt_dump_ep_context_model
        return providers

    def configure_import(self, options, providers, entry, scratch=None, variant="default"):  # type: ignore[no-untyped-def]
        return providers


async def test_context_model_entries_are_written_by_the_compile_itself(
    mlp_path: Path, cache_dir: Path
) -> None:
    import numpy as np

    from .helpers import reference

    class StandInTensorRT(CPUDevice):
        family = "TENSORRT"
        blob = _ContextStyleBlob()

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


# -- OpenVINO entries: OpenVINO's own cache, kept inside the entry ----------------------------


def test_openvino_export_points_its_cache_dir_at_the_entry(tmp_path: Path) -> None:
    import onnxruntime as ort

    providers = OpenVINODevice().providers(None, {"device_type": "GPU"})
    (name, ov), cpu = OpenVINOCacheBlob().configure_export(ort.SessionOptions(), providers, tmp_path, "k" * 64)
    assert name == "OpenVINOExecutionProvider" and ov == {"device_type": "GPU", "cache_dir": str(tmp_path)}
    assert cpu == ("CPUExecutionProvider", {})
    assert OpenVINOCacheBlob.keeps_source and not OpenVINOCacheBlob.background


def test_openvino_caches_on_its_gpu_and_npu_but_not_on_cpu() -> None:
    """On CPU a hit of OpenVINO's cache costs more than compiling (benchmarks, scenario ovep)."""
    ov = OpenVINODevice()
    assert "EXPORT_IMPORT" not in ov.capabilities()
    assert "EXPORT_IMPORT" in ov.capabilities({"device_type": "GPU.1"})
    for device_type, cached in [("CPU", False), ("GPU", True), ("NPU", True), ("HETERO:GPU,CPU", True)]:
        assert ov.caches(ov.providers(None, {"device_type": device_type})[0][1]) is cached, device_type
    core = aioov.Core()
    core.set_property("OPENVINO", {"ORT_PROVIDER_OPTIONS": {"device_type": "GPU"}})
    assert "EXPORT_IMPORT" in core.get_property("OPENVINO", "OPTIMIZATION_CAPABILITIES")


def test_openvino_import_reads_a_scratch_copy_so_the_entry_is_never_written(tmp_path: Path) -> None:
    import onnxruntime as ort

    entry, scratch = tmp_path / "entry", tmp_path / "scratch"
    entry.mkdir(), scratch.mkdir()
    for name in ("manifest.json", "model.onnx", "1234.blob"):
        (entry / name).write_bytes(name.encode())
    blob = OpenVINOCacheBlob()
    (_, ov), _ = blob.configure_import(ort.SessionOptions(), OpenVINODevice().providers(None, {}), entry, scratch)
    assert ov["cache_dir"] == str(scratch) and (scratch / "1234.blob").read_bytes() == b"1234.blob"
    (scratch / "1234.blob").write_bytes(b"rewritten")  # what the provider does on every load
    assert blob.after_import(entry, scratch) is None and (entry / "1234.blob").read_bytes() == b"1234.blob"
    (scratch / "5678.blob").write_bytes(b"compiled again")  # what it does when its hash misses
    assert "5678.blob" in (blob.after_import(entry, scratch) or "")


def test_openvino_finalize_wants_a_compiled_blob(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"model")
    with pytest.raises(BlobError, match="no compiled blob"):
        OpenVINOCacheBlob().finalize(tmp_path, ["x"])
    (tmp_path / "1234.blob").write_bytes(b"compiled")
    OpenVINOCacheBlob().finalize(tmp_path, ["x"])


def test_openvino_key_includes_the_openvino_version(monkeypatch: pytest.MonkeyPatch) -> None:
    from aioov._devices import DeviceSpec, openvino

    ov = OpenVINODevice()
    keys = []
    for version in ("2025.4.1", "2026.0.0"):
        # why: the key must differ across OpenVINO releases, and only one is installed here (if any)
        monkeypatch.setattr(openvino, "openvino_version", lambda version=version: version)
        inputs = _key_inputs("d", ov, DeviceSpec("OPENVINO"), ov.providers(None, {}))
        assert inputs["blob"] == "ov-cache-dir" and inputs["hardware"]["openvino"] == version
        keys.append(str(inputs))
    assert keys[0] != keys[1]


class _SourceKeepingBlob(OpenVINOCacheBlob):
    """The OpenVINO entry flow (a copy of the source beside a blob the compile writes) with a
    CPU stand-in for OpenVINO's cache; ``miss_on_import`` plays OpenVINO not finding its blob."""

    def __init__(self, miss_on_import: bool = False) -> None:
        self.miss_on_import = miss_on_import

    def configure_export(self, options, providers, tmp, key, variant="default"):  # type: ignore[no-untyped-def]
        (tmp / "4242.blob").write_bytes(b"compiled")
        return providers

    def configure_import(self, options, providers, entry, scratch=None, variant="default"):  # type: ignore[no-untyped-def]
        super().configure_import(options, providers, entry, scratch, variant)
        (scratch / "4242.blob").write_bytes(b"rewritten")  # as the provider does on every load
        if self.miss_on_import:
            (scratch / "4343.blob").write_bytes(b"compiled again")
        return providers


def _stand_in_openvino(blob: OpenVINOCacheBlob) -> DeviceRegistry:
    class StandInOpenVINO(CPUDevice):
        family = "OPENVINO"

    device = StandInOpenVINO()
    device.blob = blob  # type: ignore[misc]
    return DeviceRegistry([CPUDevice(), device])


async def test_openvino_entries_hold_the_model_and_its_external_data(
    external_path: Path, tmp_path: Path, cache_dir: Path, ids: np.ndarray
) -> None:
    registry = _stand_in_openvino(_SourceKeepingBlob())
    async with aioov.Core(cache_dir=cache_dir, devices=registry) as core:
        first = await core.compile_model(external_path, "OPENVINO")
        assert core.pending_exports == 0  # published before compile_model returned
        (entry,) = list((cache_dir / "v1").glob("??/*"))
        assert sorted(p.name for p in entry.iterdir()) == [
            "4242.blob", "bert_ext.onnx.data", "manifest.json", "model.onnx"]
        second = await core.compile_model(external_path, "OPENVINO")
        assert sorted(p.name for p in entry.iterdir()) == [
            "4242.blob", "bert_ext.onnx.data", "manifest.json", "model.onnx"]
        blob = await core.export_model(external_path, tmp_path / "blob", "OPENVINO")
    assert first.get_property("LOADED_FROM_CACHE") is False and second.get_property("LOADED_FROM_CACHE") is True
    want = reference(external_path, {"input_ids": ids})[0]
    np.testing.assert_allclose((await second.infer(ids))["last_hidden_state"], want, rtol=1e-4, atol=1e-5)

    # The blob is self-contained: it loads after the source model is gone.
    moved = external_path.parent.rename(tmp_path / "gone")
    try:
        async with aioov.Core(devices=_stand_in_openvino(_SourceKeepingBlob())) as core:
            imported = await core.import_model(blob, "OPENVINO")
        np.testing.assert_allclose((await imported.infer(ids))["last_hidden_state"], want, rtol=1e-4, atol=1e-5)
    finally:
        moved.rename(external_path.parent)


async def test_openvino_entries_copy_models_read_first_or_given_as_bytes(
    external_path: Path, cache_dir: Path, ids: np.ndarray
) -> None:
    proto = mlp(8, 16, 4)
    async with aioov.Core(cache_dir=cache_dir, devices=_stand_in_openvino(_SourceKeepingBlob())) as core:
        read = await core.read_model(external_path)
        from_model = await core.compile_model(read, "OPENVINO")
        from_bytes = await core.compile_model(proto.SerializeToString(), "OPENVINO")
        again = [await core.compile_model(read, "OPENVINO"), await core.compile_model(proto, "OPENVINO")]
    entries = {tuple(sorted(p.name for p in entry.iterdir())) for entry in (cache_dir / "v1").glob("??/*")}
    assert entries == {("4242.blob", "bert_ext.onnx.data", "manifest.json", "model.onnx"),
                       ("4242.blob", "manifest.json", "model.onnx")}
    assert [m.get_property("LOADED_FROM_CACHE") for m in (from_model, from_bytes, *again)] == [
        False, False, True, True]
    want = reference(external_path, {"input_ids": ids})[0]
    np.testing.assert_allclose((await again[0].infer(ids))["last_hidden_state"], want, rtol=1e-4, atol=1e-5)


async def test_openvino_entry_that_it_cannot_use_is_replaced(
    mlp_path: Path, cache_dir: Path
) -> None:
    async with aioov.Core(cache_dir=cache_dir, devices=_stand_in_openvino(_SourceKeepingBlob())) as core:
        await core.compile_model(mlp_path, "OPENVINO")
    registry = _stand_in_openvino(_SourceKeepingBlob(miss_on_import=True))
    async with aioov.Core(cache_dir=cache_dir, devices=registry) as core:
        compiled = await core.compile_model(mlp_path, "OPENVINO")
        assert core.cache_stats.corrupt == 1
    assert compiled.get_property("LOADED_FROM_CACHE") is False
    (entry,) = list((cache_dir / "v1").glob("??/*"))  # compiled again and published afresh
    assert sorted(p.name for p in entry.iterdir()) == ["4242.blob", "manifest.json", "model.onnx"]


async def test_openvino_import_without_room_for_its_scratch_copy_compiles_and_keeps_the_entry(
    mlp_path: Path, cache_dir: Path, caplog_warnings: pytest.LogCaptureFixture
) -> None:
    class NoRoom(_SourceKeepingBlob):
        def configure_import(self, options, providers, entry, scratch=None, variant="default"):  # type: ignore[no-untyped-def]
            raise OSError(28, "No space left on device")

    async with aioov.Core(cache_dir=cache_dir, devices=_stand_in_openvino(_SourceKeepingBlob())) as core:
        await core.compile_model(mlp_path, "OPENVINO")
    (entry,) = list((cache_dir / "v1").glob("??/*"))
    async with aioov.Core(cache_dir=cache_dir, devices=_stand_in_openvino(NoRoom())) as core:
        compiled = await core.compile_model(mlp_path, "OPENVINO")
        assert core.cache_stats.corrupt == 0
    assert compiled.get_property("LOADED_FROM_CACHE") is False
    assert entry.is_dir() and "No space left" in caplog_warnings.text


async def test_openvino_model_whose_data_sits_in_a_subfolder_compiles_uncached(
    tmp_path: Path, cache_dir: Path, caplog_warnings: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "weights").mkdir()
    path = save_with_external_data(mlp(64, 64, 4), tmp_path / "m.onnx", "weights/m.bin")
    async with aioov.Core(cache_dir=cache_dir, devices=_stand_in_openvino(_SourceKeepingBlob())) as core:
        compiled = await core.compile_model(path, "OPENVINO")
        assert core.cache_stats.errors == 1
    assert (await compiled.infer(np.ones((1, 64), np.float32)))["y"].shape == (1, 4)
    assert not list((cache_dir / "v1").glob("??/*"))
    assert "cannot sit beside the model" in caplog_warnings.text


_OV_REASON = f"OpenVINO does not load here: {OpenVINODevice().unavailable_reason}"


def _caching_openvino() -> DeviceRegistry:
    """The real OpenVINO device, caching on CPU too: the only OpenVINO device a CI machine has."""

    class CachingOpenVINO(OpenVINODevice):
        cached_device_types = ("GPU", "NPU", "CPU")

    return DeviceRegistry([CPUDevice(), CachingOpenVINO()])


@pytest.mark.skipif(not OpenVINODevice().available(), reason=_OV_REASON)
async def test_openvino_on_cpu_compiles_without_the_cache_for_real(mlp_path: Path, cache_dir: Path) -> None:
    async with aioov.Core(cache_dir=cache_dir) as core:
        compiled = await core.compile_model(mlp_path, "OPENVINO")
        again = await core.compile_model(mlp_path, "OPENVINO", {"NUM_STREAMS": 2})
    assert compiled.get_property("EXECUTION_PROVIDERS")[0] == "OpenVINOExecutionProvider"
    assert again.get_property("LOADED_FROM_CACHE") is False and not cache_dir.exists()


@pytest.mark.skipif(not OpenVINODevice().available(), reason=_OV_REASON)
async def test_openvino_entry_for_real(bert_path: Path, cache_dir: Path) -> None:
    ids = np.random.default_rng(0).integers(0, 2000, (2, 16), dtype=np.int64)
    async with aioov.Core(cache_dir=cache_dir, devices=_caching_openvino()) as core:
        first = await core.compile_model(bert_path, "OPENVINO")
        (entry,) = list((cache_dir / "v1").glob("??/*"))
        files = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}
        second = await core.compile_model(bert_path, "OPENVINO")
    async with aioov.Core(cache_dir=cache_dir, devices=_caching_openvino()) as core:  # no in-process memo
        third = await core.compile_model(bert_path, "OPENVINO")
    assert [m.get_property("LOADED_FROM_CACHE") for m in (first, second, third)] == [False, True, True]
    assert third.get_property("EXECUTION_PROVIDERS")[0] == "OpenVINOExecutionProvider"
    assert [name for name in files if name.endswith(".blob")] and "model.onnx" in files
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == files  # hits wrote nothing
    want = reference(bert_path, {"input_ids": ids})[0]
    np.testing.assert_allclose((await third.infer(ids))["last_hidden_state"], want, rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not OpenVINODevice().available(), reason=_OV_REASON)
async def test_openvino_external_data_and_blob_round_trip_for_real(
    external_path: Path, tmp_path: Path, cache_dir: Path, ids: np.ndarray
) -> None:
    async with aioov.Core(cache_dir=cache_dir, devices=_caching_openvino()) as core:
        await core.compile_model(external_path, "OPENVINO")
        hit = await core.compile_model(external_path, "OPENVINO")
        blob = await core.export_model(external_path, tmp_path / "blob", "OPENVINO")
        imported = await core.import_model(blob, "OPENVINO")
    assert hit.get_property("LOADED_FROM_CACHE") is True
    assert sorted(p.name for p in blob.iterdir() if not p.name.endswith(".blob")) == [
        "bert_ext.onnx.data", "manifest.json", "model.onnx"]
    want = reference(external_path, {"input_ids": ids})[0]
    for compiled in (hit, imported):
        np.testing.assert_allclose((await compiled.infer(ids))["last_hidden_state"], want, rtol=1e-3, atol=1e-4)


_OV_WORKER = """
import json, sys, time, anyio, numpy as np, onnxruntime as ort, aioov
from aioov._devices import DeviceRegistry
from aioov._devices.cpu import CPUDevice
from aioov._devices.openvino import OpenVINODevice
class CachingOpenVINO(OpenVINODevice):
    cached_device_types = ("CPU",)
cache_dir, start_at, path, rounds = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4])
async def main():
    time.sleep(max(0.0, start_at - time.time()))  # start together
    ids = np.arange(32, dtype=np.int64).reshape(2, 16)
    want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0]
    hits, correct = [], []
    for _ in range(rounds):  # a fresh Core each round: every load verifies and imports again
        async with aioov.Core(cache_dir=cache_dir, devices=DeviceRegistry([CPUDevice(), CachingOpenVINO()])) as core:
            compiled = await core.compile_model(path, "OPENVINO")
            got = (await compiled.infer(ids))["last_hidden_state"]
            hits.append(compiled.get_property("LOADED_FROM_CACHE"))
            correct.append(bool(np.allclose(got, want, rtol=1e-3, atol=1e-4)))
            stats = core.cache_stats
            compiles, corrupt = stats.compiles, stats.corrupt
        print(json.dumps({"compiles": compiles, "corrupt": corrupt}), file=sys.stderr)
    print(json.dumps({"hits": hits, "correct": correct}))
anyio.run(main)
"""


@pytest.mark.skipif(not OpenVINODevice().available(), reason=_OV_REASON)
def test_four_processes_share_one_openvino_entry_for_real(bert_path: Path, tmp_path: Path) -> None:
    """The provider rewrites its blob on every load: with four processes loading one entry
    over and over, the entry must stay intact and be compiled once."""
    import json
    import subprocess
    import sys
    import time

    from .helpers import child_env

    cache_dir = tmp_path / "cache"
    start_at = str(time.time() + 2.0)
    procs = [subprocess.Popen([sys.executable, "-c", _OV_WORKER, str(cache_dir), start_at, str(bert_path), "3"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=child_env()) for _ in range(4)]
    reports, logs = [], []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
        logs.extend(json.loads(line) for line in err.splitlines() if line.startswith("{"))
    assert all(all(r["correct"]) for r in reports)
    assert sum(not hit for r in reports for hit in r["hits"]) == 1  # one compile, eleven imports
    assert sum(log["corrupt"] for log in logs) == 0
    (entry,) = list((cache_dir / "v1").glob("??/*"))
    store = aioov.CacheStore(cache_dir)
    found = store.lookup(entry.name)
    assert found is not None and store.verify(found) is None
    assert not list(store.tmp.iterdir())  # every scratch copy removed


# -- which GPU a CUDA ordinal means ---------------------------------------------------------

TWO_GPUS = (
    {"index": "0", "uuid": "GPU-aaaa", "name": "NVIDIA L4", "compute_capability": "8.9", "driver": "580"},
    {"index": "1", "uuid": "GPU-bbbb", "name": "NVIDIA H100", "compute_capability": "9.0", "driver": "580"},
)


def test_the_gpu_in_a_key_follows_cuda_visible_devices(
    monkeypatch: pytest.MonkeyPatch, nvidia_smi: Callable[..., None]
) -> None:
    from aioov._devices import nvidia

    nvidia_smi(TWO_GPUS)
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert nvidia.gpu_identity(0)["name"] == "NVIDIA H100"  # CUDA's device 0 is nvidia-smi's 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa")
    assert nvidia.gpu_identity(0)["name"] == "NVIDIA L4"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert [nvidia.gpu_identity(i)["name"] for i in (0, 1)] == ["NVIDIA L4", "NVIDIA H100"]
    assert nvidia.gpu_identity(2) == {"name": "unknown"}


def test_mixed_gpus_in_cuda_order_are_keyed_by_all_of_them(
    monkeypatch: pytest.MonkeyPatch, nvidia_smi: Callable[..., None]
) -> None:
    """Without PCI_BUS_ID order CUDA numbers the fastest GPU first: the key may not guess."""
    from aioov._devices import nvidia

    nvidia_smi(TWO_GPUS)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    first, second = nvidia.gpu_identity(0), nvidia.gpu_identity(1)
    assert "name" not in first and first["visible"] == ["NVIDIA H100 (9.0)", "NVIDIA L4 (8.9)"]
    assert first != second


async def test_a_device_onnxruntime_falls_back_from_is_not_found(mlp_path: Path) -> None:
    """A GPU that is listed but cannot start (here: CUDA without a driver, claimed usable)
    must not hand back a model that runs on the CPU."""

    class ClaimsToWork(CUDADevice):
        def available(self) -> bool:
            return True

    import onnxruntime as ort

    if CUDADevice().available():
        pytest.skip("CUDA really works here: nothing falls back")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider to fall back from")
    async with aioov.Core(devices=DeviceRegistry([CPUDevice(), ClaimsToWork()])) as core:
        with pytest.raises(aioov.DeviceNotFoundError, match="fell back to CPUExecutionProvider"):
            await core.compile_model(mlp_path, "GPU.7")


def test_full_device_name_names_the_gpu(monkeypatch: pytest.MonkeyPatch, nvidia_smi: Callable[..., None]) -> None:
    nvidia_smi(TWO_GPUS[1:])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert CUDADevice().full_name() == "NVIDIA H100 (CUDA)"
    assert TensorRTDevice().full_name() == "NVIDIA H100 (TensorRT)"
    nvidia_smi(None)
    assert CUDADevice().full_name() == "GPU"  # no nvidia-smi: nothing made up


def test_session_build_limits_are_per_device_not_per_family() -> None:
    from aioov._cache.stats import CacheEvents
    from aioov._devices import DeviceSpec
    from aioov._properties import CompileConfig
    from aioov._request import CompileRequest, Source
    from aioov._sessions import SessionFactory

    factory = SessionFactory(CacheEvents())
    gpu = CUDADevice()

    def lock_of(spec: DeviceSpec) -> object:
        request = CompileRequest(Source(None), gpu, spec, gpu.providers(spec.index, {}), CompileConfig())
        return factory._device_slots_of(request)

    assert lock_of(DeviceSpec("GPU")) is lock_of(DeviceSpec("GPU", 0))  # GPU means GPU.0
    assert lock_of(DeviceSpec("GPU", 0)) is not lock_of(DeviceSpec("GPU", 1))


def test_tensorrt_without_its_runtime_is_refused_before_any_probe_session(monkeypatch: pytest.MonkeyPatch) -> None:
    """A probe session would print onnxruntime's "EP Error ... install TensorRT" block."""
    import ctypes

    from aioov._devices import nvidia

    def no_library(name: str) -> object:
        if "nvinfer" in name:
            raise OSError(f"{name}: cannot open shared object file")
        return object()  # libcuda "loads"

    # why: the case is a driver's libcuda present, TensorRT's runtime absent: this machine may have either
    monkeypatch.setattr(ctypes, "CDLL", no_library)
    nvidia.tensorrt_missing.cache_clear()
    nvidia.nvidia_driver_missing.cache_clear()
    from aioov._devices import base

    # why: nothing public tells whether a probe session was built (its error log is onnxruntime's)
    monkeypatch.setattr(base, "probe_session", lambda providers: pytest.fail("probed"))
    try:
        device = TensorRTDevice()
        assert "no TensorRT runtime" in (device.precheck() or "")
        assert device.available() is False  # and no probe session was built (it would fail the test)
    finally:
        nvidia.tensorrt_missing.cache_clear()
        nvidia.nvidia_driver_missing.cache_clear()


def test_probing_on_the_event_loop_warns_once_and_probe_devices_avoids_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``get_available_devices`` and AUTO's properties are sync (as in OpenVINO) and probe the
    first time: on a loop that blocks it, so aioov says so and offers the async probe."""

    async def on_the_loop() -> tuple[list[str], list[str]]:
        core = aioov.Core()
        devices = core.get_available_devices()
        core.get_property("AUTO", "FULL_DEVICE_NAME")
        return devices, [r.getMessage() for r in caplog.records if "probe_devices" in r.getMessage()]

    devices, warnings = anyio.run(on_the_loop)
    assert "CPU" in devices
    assert len(warnings) == 1  # once per Core

    async def probed_first() -> list[str]:
        core = aioov.Core(devices=DeviceRegistry())  # devices of their own: nothing probed yet
        assert "CPU" in await core.probe_devices()
        caplog.clear()
        core.get_available_devices()
        core.get_property("AUTO", "OPTIMIZATION_CAPABILITIES")
        return [r.getMessage() for r in caplog.records if "probe_devices" in r.getMessage()]

    assert anyio.run(probed_first) == []


def test_a_model_compiled_under_asyncio_serves_under_trio(mlp_path: Path) -> None:
    async def compile() -> aioov.CompiledModel:
        async with aioov.Core() as core:
            return await core.compile_model(mlp_path, "CPU")

    compiled = anyio.run(compile, backend="asyncio")
    x = np.ones((2, 8), np.float32)
    for backend in ("trio", "asyncio"):
        y = anyio.run(compiled.infer, {"x": x}, backend=backend)["y"]
        np.testing.assert_allclose(y, reference(mlp_path, {"x": x})[0], rtol=1e-5, atol=1e-6)
