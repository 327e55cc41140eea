"""GPU (CUDA) compiles: what a GPU entry holds, who writes it, how sessions are built.

The logic runs everywhere, on stand-in devices over the CPU provider; the tests at the end
run on a machine where CUDA really loads (``scripts/gpu_check.sh``) and skip elsewhere.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import aioov
from aioov._devices import DeviceRegistry, DeviceSpec
from aioov._devices.base import CPU_FALLBACK, Device
from aioov._devices.cpu import CPUDevice
from aioov._devices.nvidia import CUDADevice, CUDAGraphBlob, TensorRTDevice

from .helpers import make_models, manifests, reference, run_python

pytestmark = pytest.mark.anyio

CUDA = CUDADevice()
needs_cuda = pytest.mark.skipif(not CUDA.available(), reason=f"CUDA does not load here: {CUDA.unavailable_reason}")


class StandInGPU(CPUDevice):
    """The GPU's cache entries and build limits, over the CPU provider."""

    family = "GPU"
    blob = CUDAGraphBlob()
    parallel_builds = CUDADevice.parallel_builds


def test_gpu_and_gpu_0_name_no_device_id() -> None:
    """CUDA's default device is 0; naming it makes onnxruntime warn "No registered plugin EP
    device found" on every session. GPU and GPU.0 are then one cache key, too."""
    assert CUDA.providers(None, {}) == CUDA.providers(0, {}) == [("CUDAExecutionProvider", {}), CPU_FALLBACK]
    assert CUDA.providers(1, {})[0] == ("CUDAExecutionProvider", {"device_id": "1"})
    assert TensorRTDevice().providers(2, {})[1] == ("CUDAExecutionProvider", {"device_id": "2"})


def test_a_gpu_entry_is_the_basic_level_graph_written_and_checked_on_the_cpu() -> None:
    """The basic level runs before partitioning: the same graph for every provider, so a
    builder writes and checks it without a CUDA context of its own."""
    blob = CUDAGraphBlob()
    assert blob.variants(prepack=True) == ("basic",)
    assert blob.export_level("basic") == "BASIC"
    assert blob.builder_providers(CUDA.providers(1, {})) == [CPU_FALLBACK]
    assert not blob.instant
    assert "EXPORT_IMPORT" in CUDA.capabilities()


def test_a_gpu_hit_runs_the_compiles_own_optimizations() -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = CUDA.providers(None, {})
    assert CUDAGraphBlob().configure_import(options, providers, Path("entry"), None, "basic") == providers
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_the_builder_job_of_a_gpu_compile_names_only_the_cpu(mlp_path: Path) -> None:
    from aioov._properties import CompileConfig
    from aioov._request import CompileRequest, Source
    from aioov._variants import _job

    request = CompileRequest(Source(str(mlp_path)), CUDA, DeviceSpec("GPU"), CUDA.providers(None, {}), CompileConfig())
    job = _job(request, str(mlp_path), Path("tmp"), "k" * 64, "basic", background=True)
    assert job.providers == [CPU_FALLBACK] and job.blob == "ort-basic-graph"


async def test_gpu_entries_are_checked_published_and_hit(bert_path: Path, cache_dir: Path, ids: np.ndarray) -> None:
    registry = DeviceRegistry([CPUDevice(), StandInGPU()])
    async with aioov.Core(cache_dir=cache_dir, devices=registry) as core:
        first = await core.compile_model(bert_path, "GPU")
        await core.wait_exports()
    async with aioov.Core(cache_dir=cache_dir, devices=registry) as core:
        second = await core.compile_model(bert_path, "GPU")
        got = await second.infer({"input_ids": ids})
    assert first.get_property("LOADED_FROM_CACHE") is False and second.get_property("LOADED_FROM_CACHE") is True
    (manifest,) = manifests(cache_dir)
    assert manifest["key_inputs"]["blob"] == "ort-basic-graph"
    assert manifest["build"]["variant"] == "basic" and manifest["build"]["check"] == "ran and matched"
    expected = reference(bert_path, {"input_ids": ids})
    for name, want in zip([o.name for o in second.outputs], expected):
        np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-5)


def test_gpu_entries_hold_no_provider_specific_nodes(bert_path: Path, cache_dir: Path) -> None:
    """What the saved graph may hold on any provider: standard ONNX ops, no Memcpy, no
    layout-transformed or fused kernels of one provider."""
    import onnx

    code = """
import sys, anyio, aioov
from aioov._devices import DeviceRegistry, DeviceSpec
from aioov._devices.cpu import CPUDevice
from tests.test_gpu_entries import StandInGPU
async def main():
    async with aioov.Core(cache_dir=sys.argv[1], devices=DeviceRegistry([CPUDevice(), StandInGPU()])) as core:
        await core.compile_model(sys.argv[2], "GPU", {"CACHE_EXPORT": "SYNC"})
anyio.run(main)
"""
    run_python(code, str(cache_dir), str(bert_path))
    (entry,) = [p for p in (cache_dir / "v1").glob("??/*") if p.is_dir()]
    graph = onnx.load(str(entry / "model.onnx"), load_external_data=False).graph
    ops = {(node.domain or "ai.onnx", node.op_type) for node in graph.node}
    assert ops and all(domain == "ai.onnx" for domain, _ in ops), ops
    assert not any("Memcpy" in op for _, op in ops)


def complex_mul_model() -> bytes:
    """A model with an op only the CUDA provider implements (com.microsoft ComplexMul)."""
    from onnx import TensorProto, helper

    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [3, 2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2])
    node = helper.make_node("ComplexMul", ["a", "a"], ["y"], domain="com.microsoft")
    model = helper.make_model(helper.make_graph([node], "cuda_only", [a], [y]),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model.SerializeToString()


def test_a_model_the_builders_cpu_cannot_load_fails_its_check(tmp_path: Path) -> None:
    """Failing the *check* (not the export) is what makes the writer remember it under the
    key, so that later compiles neither retry nor start a builder."""
    from aioov._builder import run_job
    from aioov._properties import CompileConfig
    from aioov._request import CompileRequest, Source
    from aioov._variants import _job

    model = tmp_path / "cuda_only.onnx"
    model.write_bytes(complex_mul_model())
    (tmp_path / "entry").mkdir()
    request = CompileRequest(Source(str(model)), CUDA, DeviceSpec("GPU"), CUDA.providers(None, {}), CompileConfig())
    report = run_job(_job(request, str(model), tmp_path / "entry", "k" * 64, "basic", background=False))
    assert report.ok is False and report.stage == "check" and report.reason is not None
    assert "CPUExecutionProvider cannot load the model" in report.reason and "ComplexMul" in report.reason


async def test_sessions_on_one_gpu_are_built_at_most_parallel_builds_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime as ort

    from aioov import _sessions

    models = make_models(tmp_path / "models", 6, layers=1, hidden=32)
    lock, running, most = threading.Lock(), [0], [0]
    real = ort.InferenceSession

    def counting(*args: Any, **kwargs: Any) -> Any:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(0.2)  # long enough that the six compile threads pile up here
            return real(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    # why: nothing public tells how many session builds overlap inside onnxruntime
    monkeypatch.setattr(_sessions.ort, "InferenceSession", counting)

    class TwoAtATime(StandInGPU):
        parallel_builds = 2

    async with aioov.Core(max_concurrent_compiles=6, devices=DeviceRegistry([CPUDevice(), TwoAtATime()])) as core:
        results = await core.compile_all(models, "GPU")
    assert all(r.error is None for r in results)
    assert most[0] <= 2


async def test_devices_without_a_limit_build_as_many_as_the_core_compiles(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other side of the limit above: without one, three builds meet inside onnxruntime."""
    import onnxruntime as ort

    from aioov import _sessions

    models = make_models(tmp_path / "models", 3, layers=1, hidden=32)
    meet = threading.Barrier(3, timeout=30)
    real = ort.InferenceSession

    def meeting(*args: Any, **kwargs: Any) -> Any:
        meet.wait()  # BrokenBarrierError (a failed compile) unless all three are in here at once
        return real(*args, **kwargs)

    # why: as above: the builds must be seen to meet inside onnxruntime
    monkeypatch.setattr(_sessions.ort, "InferenceSession", meeting)

    class Unlimited(StandInGPU):
        parallel_builds = 0

    async with aioov.Core(max_concurrent_compiles=3, devices=DeviceRegistry([CPUDevice(), Unlimited()])) as core:
        results = await core.compile_all(models, "GPU")
    assert [r.error for r in results] == [None, None, None]


def test_tensorrt_builds_one_engine_at_a_time() -> None:
    assert TensorRTDevice.parallel_builds == 1 and CUDADevice.parallel_builds > 1


class SlowToProbe(Device):
    """A GPU whose probe takes a while (CUDA's initialization), over the CPU provider."""

    family = "GPU"
    provider = "CPUExecutionProvider"
    blob = CUDAGraphBlob()

    def __init__(self, works: bool = True) -> None:
        super().__init__()
        self.works = works
        self.go_on = threading.Event()  # the probe ends when this is set (or after 10 s)
        self.probed_at: float | None = None

    def precheck(self) -> str | None:
        self.go_on.wait(10)
        self.probed_at = time.monotonic()
        return None if self.works else "no GPU here (a stand-in)"


async def test_the_device_is_probed_while_the_model_is_hashed(
    bert_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aioov import _pipeline

    device = SlowToProbe()
    hashing_started: list[float] = []
    real = _pipeline.Pipeline._identify

    def identify(self: Any, *args: Any, **kwargs: Any) -> Any:
        hashing_started.append(time.monotonic())
        device.go_on.set()  # a probe that blocked the compile would only end 10 s later, after this
        return real(self, *args, **kwargs)

    # why: nothing public says when the model's hashing began, to order the probe against it
    monkeypatch.setattr(_pipeline.Pipeline, "_identify", identify)
    async with aioov.Core(cache_dir=cache_dir, devices=DeviceRegistry([CPUDevice(), device])) as core:
        compiled = await core.compile_model(bert_path, "GPU")
    assert compiled.get_property("EXECUTION_DEVICES") == ["GPU"]
    assert device.probed_at is not None and hashing_started and hashing_started[0] < device.probed_at


@pytest.mark.parametrize("cached", [True, False], ids=["with a cache", "without"])
async def test_a_device_whose_background_probe_fails_is_not_found(
    mlp_path: Path, cache_dir: Path, cached: bool
) -> None:
    device = SlowToProbe(works=False)
    device.go_on.set()
    registry = DeviceRegistry([CPUDevice(), device])
    async with aioov.Core(cache_dir=cache_dir if cached else None, devices=registry) as core:
        with pytest.raises(aioov.DeviceNotFoundError, match="no GPU here"):
            await core.compile_model(mlp_path, "GPU")
    assert not (cache_dir / "v1").exists() or not manifests(cache_dir)


# -- on a machine where CUDA loads ------------------------------------------------------------


@needs_cuda
async def test_a_gpu_hit_on_a_real_gpu_computes_what_a_cuda_session_does(
    bert_path: Path, cache_dir: Path, ids: np.ndarray
) -> None:  # pragma: no cover - GPU
    import onnxruntime as ort

    async with aioov.Core(cache_dir=cache_dir) as core:
        first = await core.compile_model(bert_path, "GPU")
        await core.wait_exports()
    async with aioov.Core(cache_dir=cache_dir) as core:
        second = await core.compile_model(bert_path, "GPU")
        got = await second.infer({"input_ids": ids})
    assert first.get_property("LOADED_FROM_CACHE") is False and second.get_property("LOADED_FROM_CACHE") is True
    assert second.get_property("EXECUTION_PROVIDERS")[0] == "CUDAExecutionProvider"
    plain = ort.InferenceSession(str(bert_path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    for name, want in zip([o.name for o in plain.get_outputs()], plain.run(None, {"input_ids": ids})):
        np.testing.assert_allclose(got[name], want, rtol=1e-3, atol=1e-4)


@needs_cuda
async def test_a_gpu_that_does_not_exist_is_not_found(mlp_path: Path) -> None:  # pragma: no cover - GPU
    async with aioov.Core() as core:
        with pytest.raises(aioov.DeviceNotFoundError):
            await core.compile_model(mlp_path, "GPU.7")


@needs_cuda
def test_gpu_compiles_print_nothing(mlp_path: Path, cache_dir: Path) -> None:  # pragma: no cover - GPU
    code = """
import sys, anyio, aioov
async def main():
    async with aioov.Core(cache_dir=sys.argv[1]) as core:
        print(core.get_available_devices())
        await core.compile_model(sys.argv[2], "GPU")
        await core.wait_exports()
    async with aioov.Core(cache_dir=sys.argv[1]) as core:
        compiled = await core.compile_model(sys.argv[2], "AUTO")
        print(compiled.get_property("LOADED_FROM_CACHE"))
anyio.run(main)
"""
    proc = run_python(code, str(cache_dir), str(mlp_path))
    assert proc.stdout.split()[-1] == "True"
    noise = [line for line in proc.stderr.splitlines() if "onnxruntime" in line]
    assert not noise, noise


@needs_cuda
async def test_a_cuda_only_model_compiles_and_is_remembered_as_not_cacheable(
    tmp_path: Path, cache_dir: Path
) -> None:  # pragma: no cover - GPU
    model = tmp_path / "cuda_only.onnx"
    model.write_bytes(complex_mul_model())
    async with aioov.Core(cache_dir=cache_dir) as core:
        first = await core.compile_model(model, "GPU")
        await core.wait_exports()
    async with aioov.Core(cache_dir=cache_dir) as core:
        second = await core.compile_model(model, "GPU")
        stats = core.cache_stats
    import onnxruntime as ort

    a = np.arange(6, dtype=np.float32).reshape(3, 2)
    plain = ort.InferenceSession(str(model), providers=["CUDAExecutionProvider"])
    np.testing.assert_allclose((await second.infer({"a": a}))["y"], plain.run(None, {"a": a})[0])
    assert first.get_property("LOADED_FROM_CACHE") is False  # its builder failed after it returned
    assert "ComplexMul" in (second.get_property("NOT_CACHED_REASON") or "")  # remembered under the key
    assert stats.compiles == 1 and stats.exports == 0
    (marker,) = manifests(cache_dir)
    assert marker["not_cacheable"]


@needs_cuda
async def test_gpu_sessions_build_concurrently_on_a_real_gpu(tmp_path: Path) -> None:  # pragma: no cover - GPU
    models = make_models(tmp_path / "models", 8, layers=2, hidden=64)
    async with aioov.Core(max_concurrent_compiles=8) as core:
        results = await core.compile_all(models, "GPU")
    assert [r.error for r in results] == [None] * 8
    for result in results:
        assert result.compiled is not None
        assert result.compiled.get_property("EXECUTION_PROVIDERS")[0] == "CUDAExecutionProvider"
