"""onnxruntime's escape hatches (#43.4): what a user coming from ``InferenceSession`` needs and
aioov does not model. Custom-op libraries (``ORT_CUSTOM_OPS_LIBRARIES``, onnxruntime-extensions
here), ``SessionOptions`` attributes (``ORT_SESSION_OPTIONS``), free-dimension overrides
(``ORT_FREE_DIMENSION_OVERRIDES``), execution providers by name (``ORT_PROVIDERS``), choosing
outputs and ``RunOptions`` per ``infer``, and a cancelled ``infer`` that stops its run.

The rule for the cache key: what changes the compiled graph enters it (libraries by content,
free dimensions), what only changes how a session runs does not (profiling, execution mode).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import aioov
from aioov._compiled import _Flight
from aioov._devices import DeviceRegistry
from aioov._properties import CompileConfig, library_digests
from aioov._request import CompileRequest, Source

from .helpers import compile_in_a_process, manifests

pytestmark = pytest.mark.anyio


def _library() -> str:
    extensions = pytest.importorskip("onnxruntime_extensions", reason="onnxruntime-extensions is not installed")
    return str(extensions.get_library_path())


def _inverse_model() -> onnx.ModelProto:
    """y = 2 * inverse(x): onnxruntime-extensions' ``Inverse`` (domain ai.onnx.contrib), which
    onnxruntime alone does not know."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "n"])
    nodes = [helper.make_node("Inverse", ["x"], ["inverse"], domain="ai.onnx.contrib"),
             helper.make_node("Add", ["inverse", "inverse"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "inverse", [x], [y]), opset_imports=[
        helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.contrib", 1)])
    model.ir_version = 8
    return model


@pytest.fixture
def inverse_path(tmp_path: Path) -> Path:
    path = tmp_path / "inverse.onnx"
    onnx.save(_inverse_model(), path)
    return path


X = np.array([[2, 0], [0, 4]], np.float32)
Y = np.array([[1, 0], [0, 0.5]], np.float32)


def test_a_custom_op_model_compiles_caches_and_hits_in_a_fresh_process(inverse_path: Path, cache_dir: Path) -> None:
    """The library is registered on the serving session, on the builder's (which writes and
    checks the entry: 'ran and matched') and on a hit's; the hit is a fresh process's."""
    config = {"ORT_CUSTOM_OPS_LIBRARIES": _library(), "CACHE_EXPORT": "SYNC"}
    assert compile_in_a_process(cache_dir, inverse_path, X, **config)[0] is False
    (manifest,) = manifests(cache_dir)
    assert manifest["build"]["check"] == "ran and matched"
    assert manifest["key_inputs"]["ORT_CUSTOM_OPS_LIBRARIES"] == library_digests((_library(),))
    from_cache, y = compile_in_a_process(cache_dir, inverse_path, X, **config)
    assert from_cache is True
    np.testing.assert_allclose(y, Y)


async def test_without_its_library_a_custom_op_model_does_not_compile(inverse_path: Path) -> None:
    with pytest.raises(aioov.CompileError, match="Inverse"):
        await aioov.Core().compile_model(inverse_path, "CPU")


async def test_a_library_enters_the_key_by_content(inverse_path: Path, cache_dir: Path, tmp_path: Path) -> None:
    """A copy at another path makes the same key; another build of the library another one."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    copy, other = tmp_path / "a" / "ext.so", tmp_path / "b" / "ext.so"
    shutil.copy(_library(), copy)
    shutil.copy(_library(), other)

    async def key(library: Path) -> str:
        async with aioov.Core(cache_dir=cache_dir) as core:
            compiled = await core.compile_model(inverse_path, "CPU", {"ORT_CUSTOM_OPS_LIBRARIES": [library]})
            np.testing.assert_allclose((await compiled.infer(X))["y"], Y)
            return str(compiled.get_property("CACHE_KEY"))

    first = await key(copy)
    assert await key(other) == first
    with open(other, "ab") as f:  # another build: its bytes differ (the loader ignores a tail)
        f.write(b"\0" * 64)
    assert await key(other) != first


@pytest.mark.parametrize("props, message", [
    ({"ORT_CUSTOM_OPS_LIBRARIES": "/nonexistent/libcustom.so"}, "no custom-op library"),
    ({"ORT_CUSTOM_OPS_LIBRARIES": [__file__]}, "cannot load the custom-op library"),
    ({"ORT_CUSTOM_OPS_LIBRARIES": 3}, "expected a path"),
    ({"ORT_SESSION_OPTIONS": {"enable_profilng": True}}, "no attribute 'enable_profilng'"),
    ({"ORT_SESSION_OPTIONS": {"intra_op_num_threads": 2}}, "INFERENCE_NUM_THREADS"),
    ({"ORT_SESSION_OPTIONS": {"optimized_model_filepath": "/tmp/x.onnx"}}, "CACHE_DIR"),
    ({"ORT_SESSION_OPTIONS": {"execution_mode": "sideways"}}, "ORT_SEQUENTIAL, ORT_PARALLEL"),
    ({"ORT_SESSION_OPTIONS": {"enable_profiling": "maybe"}}, "boolean"),
    ({"ORT_SESSION_OPTIONS": {"log_severity_level": "loud"}}, "log_severity_level"),
    ({"ORT_SESSION_OPTIONS": ["execution_mode"]}, "mapping"),
    ({"ORT_FREE_DIMENSION_OVERRIDES": {"batch": 0}}, "between 1"),
    ({"ORT_FREE_DIMENSION_OVERRIDES": {"batch": "one"}}, "batch"),
    ({"ORT_PROVIDERS": ["FooExecutionProvider"]}, "available: .*CPUExecutionProvider"),
    ({"ORT_PROVIDERS": [["CPUExecutionProvider", "fast"]]}, "name or a"),
    ({"ORT_PROVIDERS": ["CPUExecutionProvider", "CPUExecutionProvider"]}, "twice"),
])
def test_bad_escape_hatches_are_property_errors(props: dict[str, object], message: str) -> None:
    with pytest.raises(aioov.PropertyError, match=message):
        aioov.Core().set_property(props)


def test_properties_from_json_as_a_cli_or_environment_gives_them() -> None:
    core = aioov.Core()
    core.set_property({"ORT_SESSION_OPTIONS": '{"execution_mode": "parallel", "enable_profiling": "NO"}',
                       "ORT_FREE_DIMENSION_OVERRIDES": '{"batch": "2"}',
                       "ORT_PROVIDERS": '[["CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"}]]'})
    assert core.get_property("ORT_SESSION_OPTIONS") == {"enable_profiling": False, "execution_mode": "ORT_PARALLEL"}
    assert core.get_property("ORT_FREE_DIMENSION_OVERRIDES") == {"batch": 2}
    assert core.get_property("ORT_PROVIDERS") == (
        ("CPUExecutionProvider", {"arena_extend_strategy": "kSameAsRequested"}),)


async def test_session_options_apply_everywhere_but_stay_out_of_the_key(mlp_path: Path, cache_dir: Path,
                                                                        tmp_path: Path) -> None:
    """Profiling and the execution mode only change how a session runs: the same key, and the
    builder (which writes and checks the entry) does not profile its own sessions."""
    prefix = str(tmp_path / "profile")
    options = {"execution_mode": "PARALLEL", "enable_profiling": True, "profile_file_prefix": prefix}
    async with aioov.Core(cache_dir=cache_dir) as core:
        plain = await core.compile_model(mlp_path, "CPU", {"CACHE_EXPORT": "SYNC"})
        tuned = await core.compile_model(mlp_path, "CPU", {"ORT_SESSION_OPTIONS": options})
        assert tuned.get_property("LOADED_FROM_CACHE") is True
        assert tuned.get_property("CACHE_KEY") == plain.get_property("CACHE_KEY")
        assert tuned.get_property("ORT_SESSION_OPTIONS")["execution_mode"] == "ORT_PARALLEL"
        used = tuned.session.get_session_options()
        assert used.execution_mode == ort.ExecutionMode.ORT_PARALLEL and used.enable_profiling
        await tuned.infer(np.ones((1, 8), np.float32))
        written = Path(tuned.session.end_profiling())
    assert written.name.startswith("profile") and written.exists()
    assert json.loads(written.read_text())  # onnxruntime's trace events
    assert [p.name for p in tmp_path.glob("profile*")] == [written.name]


async def test_free_dimensions_are_fixed_by_name_and_enter_the_key(mlp_path: Path, cache_dir: Path) -> None:
    """The builder's checks run at the fixed size too; the keys of compiles without overrides
    hold no trace of the property (entries written before it existed still hit)."""
    async with aioov.Core(cache_dir=cache_dir, properties={"CACHE_EXPORT": "SYNC"}) as core:
        dynamic = await core.compile_model(mlp_path, "CPU")
        fixed = await core.compile_model(mlp_path, "CPU", {"ORT_FREE_DIMENSION_OVERRIDES": {"N": 4}})
        assert dynamic.input(0).shape[0] == "N" and fixed.input(0).shape == (4, 8)
        assert fixed.get_property("CACHE_KEY") != dynamic.get_property("CACHE_KEY")
        assert (await fixed.infer(np.ones((4, 8), np.float32)))[0].shape[0] == 4
        with pytest.raises(aioov.InferenceError):
            await fixed.infer(np.ones((2, 8), np.float32))
    checked = {json.dumps(m["key_inputs"].get("ORT_FREE_DIMENSION_OVERRIDES")): m["build"]["checked"]
               for m in manifests(cache_dir)}
    assert set(checked) == {"null", '{"N": 4}'}
    assert all(label.startswith("x[4,") for label in checked['{"N": 4}'])


async def test_the_device_s_own_provider_by_name_is_the_device_s_compile(mlp_path: Path, cache_dir: Path) -> None:
    """``ORT_PROVIDERS`` naming what the device uses anyway: cached, under the same key."""
    async with aioov.Core(cache_dir=cache_dir) as core:
        plain = await core.compile_model(mlp_path, "CPU")
        named = await core.compile_model(mlp_path, "CPU", {"ORT_PROVIDERS": ["CPUExecutionProvider"]})
        assert named.get_property("CACHE_KEY") == plain.get_property("CACHE_KEY")
        assert named.get_property("NOT_CACHED_REASON") is None
        assert named.get_property("EXECUTION_PROVIDERS") == ["CPUExecutionProvider"]


def test_other_providers_than_the_device_s_are_not_cached(cache_dir: Path) -> None:
    """The device's blob format knows its own providers only; a provider it also uses keeps
    the device's options, with the user's on top."""
    config = CompileConfig(cache_dir=str(cache_dir), ort_providers=(
        ("CUDAExecutionProvider", {"device_id": "0"}), ("CPUExecutionProvider", {"arena_extend_strategy": "1"})))
    request = CompileRequest.resolve(DeviceRegistry(), Source(None), "CPU", config)
    assert request.providers == [("CUDAExecutionProvider", {"device_id": "0"}),
                                 ("CPUExecutionProvider", {"arena_extend_strategy": "1"})]
    assert request.caches is False
    assert "ORT_PROVIDERS ['CUDAExecutionProvider', 'CPUExecutionProvider']" in (request.uncached or "")
    own = CompileRequest.resolve(DeviceRegistry(), Source(None), "CPU",
                                 CompileConfig(cache_dir=str(cache_dir), ort_providers=(("CPUExecutionProvider", {}),)))
    assert own.caches is True and own.uncached is None


async def test_a_provider_that_does_not_start_is_a_device_error_or_serves_uncached(
    mlp_path: Path, cache_dir: Path
) -> None:
    """CUDA is in this onnxruntime build; where it cannot start (no GPU), onnxruntime would fall
    back to the CPU: aioov says so instead. Where it starts, the compile is not cached, and
    NOT_CACHED_REASON says why."""
    props = {"ORT_PROVIDERS": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider")
    async with aioov.Core(cache_dir=cache_dir) as core:
        if "GPU" not in core.get_available_devices():
            with pytest.raises(aioov.DeviceNotFoundError, match="CUDAExecutionProvider"):
                await core.compile_model(mlp_path, "CPU", props)
            return
        compiled = await core.compile_model(mlp_path, "CPU", props)
        assert compiled.get_property("EXECUTION_PROVIDERS")[0] == "CUDAExecutionProvider"
        assert compiled.get_property("CACHE_KEY") is None
        assert "ORT_PROVIDERS" in compiled.get_property("NOT_CACHED_REASON")
        assert (await compiled.infer(np.ones((1, 8), np.float32)))[0].shape == (1, 4)


def _two_outputs() -> bytes:
    """a = x + 1 and b = 2 * x."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n"])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n"])
    one = helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])
    nodes = [helper.make_node("Add", ["x", "one"], ["a"]), helper.make_node("Add", ["x", "x"], ["b"])]
    model = helper.make_model(helper.make_graph(nodes, "two", [x], [a, b], [one]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


async def test_outputs_choose_what_infer_returns() -> None:
    compiled = await aioov.Core().compile_model(_two_outputs(), "CPU")
    x = np.array([1, 2], np.float32)
    results = await compiled.infer(x, outputs=["b"])
    assert list(results) == ["b"] and results[0].tolist() == [2, 4] and results["b"].tolist() == [2, 4]
    both = await compiled.infer(x, outputs=["b", compiled.output("a")])
    assert list(both) == ["b", "a"] and both[1].tolist() == [2, 3]
    assert list(await compiled.infer(x, outputs="a")) == ["a"]
    assert list(await compiled.infer(x, outputs=[1])) == ["b"]
    assert list(await anyio.to_thread.run_sync(lambda: compiled.infer_sync(x, outputs=["a"]))) == ["a"]
    request = compiled.create_infer_request()
    await request.infer(x, outputs=["a"])
    assert list(request.results) == ["a"]
    for outputs, message in (["c"], "no output 'c'"), ([], "no output"), (["a", "a"], "twice"):
        with pytest.raises(aioov.InferenceError, match=message):
            await compiled.infer(x, outputs=outputs)


async def test_run_options_a_mapping_or_onnxruntime_s_own() -> None:
    compiled = await aioov.Core().compile_model(_two_outputs(), "CPU")
    x = np.array([1, 2], np.float32)
    settings = {"logid": "request-7", "log_severity_level": 3, "memory.enable_memory_arena_shrinkage": "cpu:0"}
    assert (await compiled.infer(x, run_options=settings))["a"].tolist() == [2, 3]
    for bad, message in ({"terminate": True}, "no setting 'terminate'"), ({"logid": 7}, "logid"), (["x"], "mapping"):
        with pytest.raises(aioov.PropertyError, match=message):
            await compiled.infer(x, run_options=bad)  # type: ignore[arg-type]
    own = ort.RunOptions()
    own.logid = "mine"
    assert (await anyio.to_thread.run_sync(lambda: compiled.infer_sync(x, run_options=own)))["b"].tolist() == [2, 4]
    own.terminate = True  # the caller's own options are used as they are
    with pytest.raises(aioov.InferenceError, match="terminate"):
        await compiled.infer(x, run_options=own)


def _long_loop() -> bytes:
    """``n`` iterations of v = tanh(v @ w) on a 256x256 matrix: as long a run as one wants."""
    size = 256
    weights = (np.random.default_rng(0).standard_normal((size, size)) / size).astype(np.float32)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["v_in", "w"], ["product"]), helper.make_node("Tanh", ["product"], ["v_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [size, size])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [size, size])],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["n", "", "x"], ["y"], body=body)],
        "long",
        [helper.make_tensor_value_info("n", TensorProto.INT64, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [size, size])],
        [helper.make_tensor("w", TensorProto.FLOAT, [size, size], weights.ravel())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


async def test_a_cancelled_infer_terminates_its_run() -> None:
    """Cancelling the caller sets its run's ``terminate``: onnxruntime stops at its next node,
    and ``infer`` is gone once the run ended, long before the run would have. The run's time
    is measured first, in this process, so that a busy machine makes both slower alike."""
    compiled = await aioov.Core().compile_model(_long_loop(), "CPU", {"INFERENCE_NUM_THREADS": 1})
    x = np.full((256, 256), 0.01, np.float32)
    started = time.perf_counter()
    await compiled.infer({"n": np.array(40), "x": x})
    per_iteration = (time.perf_counter() - started) / 40
    iterations = int(min(max(4.0 / per_iteration, 400), 400_000))  # a run of about 4 s

    ended: list[tuple[float, BaseException | None]] = []
    run = compiled._run

    def spy(*args: Any) -> Any:
        try:
            result = run(*args)
        except BaseException as exc:
            ended.append((time.perf_counter(), exc))
            raise
        ended.append((time.perf_counter(), None))
        return result

    compiled._run = spy  # type: ignore[method-assign]
    with anyio.move_on_after(0.3) as scope:
        await compiled.infer({"n": np.array(iterations), "x": x})
    gone = time.perf_counter()
    assert scope.cancelled_caught
    (when, error), = ended  # the run had ended when infer was gone
    assert when <= gone
    assert error is not None and "terminate" in str(error)
    full = iterations * per_iteration
    assert gone - started < per_iteration * 40 + full / 2, (gone - started, full)
    # The stream is free: the next inference runs at once.
    assert (await compiled.infer({"n": np.array(2), "x": x}))["y"].shape == (256, 256)


async def test_a_cancelled_caller_s_own_run_options_serve_again() -> None:
    compiled = await aioov.Core().compile_model(_long_loop(), "CPU", {"INFERENCE_NUM_THREADS": 1})
    x = np.full((256, 256), 0.01, np.float32)
    own = ort.RunOptions()
    with anyio.move_on_after(0.2):
        await compiled.infer({"n": np.array(1_000_000), "x": x}, run_options=own)
    assert own.terminate is False
    assert (await compiled.infer({"n": np.array(2), "x": x}, run_options=own))["y"].shape == (256, 256)


async def test_a_call_waiting_for_a_stream_leaves_at_once_when_cancelled() -> None:
    """NUM_STREAMS=1: a second ``infer`` waits for the first's stream; cancelled, it leaves
    without running. The first, cancelled in turn, frees the stream for the next."""
    compiled = await aioov.Core().compile_model(_long_loop(), "CPU", {"INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1})
    x = np.full((256, 256), 0.01, np.float32)
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(compiled.infer, {"n": np.array(10**7), "x": x})
        await anyio.sleep(0.05)
        with anyio.move_on_after(0.05) as scope:
            await compiled.infer({"n": np.array(2), "x": x})
        assert scope.cancelled_caught
        tasks.cancel_scope.cancel()
    with anyio.fail_after(30):
        assert (await compiled.infer({"n": np.array(2), "x": x}))["y"].shape == (256, 256)


def test_a_run_cancelled_before_a_thread_took_it_never_runs() -> None:
    """The window between queueing a run and a worker thread taking it: ``stop`` there drops
    it (nothing to wait for), and the thread does not run it."""
    options = ort.RunOptions()
    flight = _Flight(options)
    assert flight.stop() is False and flight.begin() is False and options.terminate is False
    running = _Flight(options)
    assert running.begin() is True and running.stop() is True and options.terminate is True
    running.end()
    assert running.running is False and running.stop() is False
    running.restore()
    assert options.terminate is False
