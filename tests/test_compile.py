"""compile_model and infer: results equal plain onnxruntime; bad input gets clear errors."""

from __future__ import annotations

import gc
import hashlib
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
import numpy as np
import onnx
import onnxruntime as ort
import pytest

import aioov
from aioov import _ortenv
from aioov.testing import bert_like, mlp

from .helpers import reference

pytestmark = pytest.mark.anyio


async def test_compile_and_infer_matches_onnxruntime(mlp_path: Path) -> None:
    async with aioov.Core() as core:
        compiled = await core.compile_model(mlp_path, "CPU")
        x = np.random.default_rng(1).standard_normal((5, 8), dtype=np.float32)
        outputs = await compiled.infer({"x": x})
    assert list(outputs) == ["y"]
    np.testing.assert_array_equal(outputs["y"], reference(mlp_path, {"x": x})[0])
    assert compiled.get_property("LOADED_FROM_CACHE") is False


async def test_transformer_with_external_data(external_path: Path, ids: np.ndarray) -> None:
    async with aioov.Core() as core:
        compiled = await core.compile_model(external_path, "CPU")
        outputs = await compiled.infer(ids)
    np.testing.assert_allclose(
        outputs["last_hidden_state"], reference(external_path, {"input_ids": ids})[0], rtol=1e-5, atol=1e-5
    )


async def test_real_model_from_a_pypi_package(pypi_model_path: Path) -> None:
    x = np.random.default_rng(2).standard_normal((1, 3, 224, 224), dtype=np.float32)
    async with aioov.Core() as core:
        compiled = await core.compile_model(pypi_model_path, "CPU")
        outputs = await compiled.infer([x])
    (name,) = outputs
    np.testing.assert_allclose(
        outputs[name], reference(pypi_model_path, {compiled.inputs[0].name: x})[0], rtol=1e-4, atol=1e-5
    )


async def test_compile_read_model_bytes_and_proto(mlp_path: Path) -> None:
    x = np.ones((1, 8), np.float32)
    expected = reference(mlp_path, {"x": x})[0]
    async with aioov.Core() as core:
        for source in (await core.read_model(mlp_path), mlp_path.read_bytes(), mlp(), str(mlp_path)):
            compiled = await core.compile_model(source, "AUTO")  # CUDA on a GPU machine: not bit-exact
            np.testing.assert_allclose((await compiled.infer({"x": x}))["y"], expected, rtol=1e-3, atol=1e-4)


async def test_ports_describe_names_types_and_shapes(mlp_path: Path) -> None:
    compiled = await aioov.Core().compile_model(mlp_path, "CPU")
    (port,) = compiled.inputs
    assert (port.name, port.element_type, port.dtype, port.shape) == ("x", "tensor(float)", np.float32, ("N", 8))
    assert compiled.outputs[0].name == "y"
    assert compiled.session.get_providers() == ["CPUExecutionProvider"]


async def test_infer_request_keeps_results(mlp_path: Path) -> None:
    compiled = await aioov.Core().compile_model(mlp_path, "CPU")
    request = compiled.create_infer_request()
    await request.infer({"x": np.zeros((2, 8), np.float32)})
    assert request.get_output_tensor(0).shape == (2, 4)
    assert request.results["y"] is request.get_output_tensor("y")


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"z": np.zeros((1, 8), np.float32)}, "unknown input name"),
        ({}, "missing input"),
        ({"x": np.zeros((1, 8), np.float64)}, "expects tensor\\(float\\)"),
        ({"x": np.zeros((1, 7), np.float32)}, "dimension 1 must be 8"),
        ({"x": np.zeros((8,), np.float32)}, "expects rank 2"),
        ([np.zeros((1, 8), np.float32)] * 2, "takes 1 input"),
        ({"x": [["a"] * 8]}, "cannot convert"),
    ],
    ids=["name", "missing", "dtype", "shape", "rank", "count", "convert"],
)
async def test_bad_inputs_raise_inference_error(mlp_path: Path, inputs: object, message: str) -> None:
    compiled = await aioov.Core().compile_model(mlp_path, "CPU")
    with pytest.raises(aioov.InferenceError, match=message):
        await compiled.infer(inputs)  # type: ignore[arg-type]


async def test_python_lists_are_converted_to_the_input_type(mlp_path: Path) -> None:
    compiled = await aioov.Core().compile_model(mlp_path, "CPU")
    outputs = await compiled.infer({"x": [[0.5] * 8]})
    assert outputs["y"].shape == (1, 4)


def audio_model() -> onnx.ModelProto:
    """A speech model's inputs: ``audio`` (float32 samples) and ``sr`` (an int32 sample rate,
    a scalar), with two outputs (``scaled``, the samples times the rate, and ``rate``), and
    the metadata a model file carries."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Cast", ["sr"], ["sr_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["audio", "sr_f"], ["scaled"]),
        helper.make_node("Identity", ["sr"], ["rate"]),
    ]
    graph = helper.make_graph(
        nodes, "speech", [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["T"]),
                          helper.make_tensor_value_info("sr", TensorProto.INT32, [])],
        [helper.make_tensor_value_info("scaled", TensorProto.FLOAT, ["T"]),
         helper.make_tensor_value_info("rate", TensorProto.INT32, [])],
        doc_string="multiplies",
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="aioov-tests",
                              domain="ai.example", doc_string="a made-up speech model", model_version=3)
    model.ir_version = 8
    helper.set_model_props(model, {"sample_rate": "16000", "labels": "yes,no"})
    onnx.checker.check_model(model)
    return model


AUDIO = np.linspace(0, 1, 5, dtype=np.float32)


async def test_outputs_by_name_index_and_port() -> None:
    """Like OpenVINO's OVDict: ``results[0]``, ``results[compiled.output(0)]`` and
    ``results["scaled"]`` are the same array; it stays a dict by name."""
    async with aioov.Core() as core:
        compiled = await core.compile_model(audio_model(), "CPU")
    results = await compiled.infer({"audio": AUDIO, "sr": 2})
    assert results[0] is results["scaled"] is results[compiled.output(0)] is results[compiled.output("scaled")]
    assert results[1] is results["rate"] is results[-1] is results[compiled.outputs[1]]
    assert list(results) == ["scaled", "rate"] and isinstance(results, dict)
    np.testing.assert_array_equal(results["scaled"], AUDIO * 2)
    assert 0 in results and compiled.output(1) in results and 2 not in results and "nope" not in results
    assert results.get(5) is None and results.get(1) is results["rate"]
    assert [r.tolist() for r in results.to_tuple()] == [(AUDIO * 2).tolist(), 2]
    for missing in (2, "nope", compiled.input(0)):
        with pytest.raises(KeyError):
            results[missing]
    blocking = await anyio.to_thread.run_sync(compiled.infer_sync, {"audio": AUDIO, "sr": 2})  # not on the loop
    assert blocking[0].tolist() == (AUDIO * 2).tolist()


async def test_a_compiled_model_is_called_like_openvinos() -> None:
    """``await compiled(inputs)``, as OpenVINO's ``compiled(inputs)``, is ``infer``."""
    async with aioov.Core() as core:
        compiled = await core.compile_model(audio_model(), "CPU")
    results = await compiled({"audio": AUDIO, "sr": 3})
    np.testing.assert_array_equal(results[0], AUDIO * 3)
    np.testing.assert_array_equal((await compiled([AUDIO, 3]))["rate"], 3)


async def test_metadata_of_the_model_file_without_the_session(cache_dir: Path) -> None:
    """``compiled.metadata``: what the ONNX file says of itself, the same from a cache hit."""
    model = audio_model()
    for hit in (False, True):
        async with aioov.Core(cache_dir=cache_dir, properties={"CACHE_EXPORT": "SYNC"}) as core:
            compiled = await core.compile_model(model, "CPU")
        assert compiled.get_property("LOADED_FROM_CACHE") is hit
        meta = compiled.metadata
        assert meta == aioov.ModelMetadata(
            producer_name="aioov-tests", graph_name="speech", graph_description="multiplies", domain="ai.example",
            description="a made-up speech model", version=3,
            custom_metadata_map={"sample_rate": "16000", "labels": "yes,no"},
        )
        with pytest.raises(AttributeError):
            meta.version = 4  # type: ignore[misc]
        with pytest.raises(TypeError):
            meta.custom_metadata_map["labels"] = "x"  # type: ignore[index]


@pytest.mark.parametrize(
    "feed, message",
    [
        ({"audio": AUDIO, "sr": 16000.9}, "input 'sr' expects tensor\\(int32\\).*got 16000.9"),
        ({"audio": AUDIO, "sr": 16000.0}, "cannot convert float64 to int32"),
        ({"audio": AUDIO, "sr": 2**40}, "do not fit in int32"),
        ({"audio": AUDIO, "sr": np.float32(16000)}, "cannot convert float32 to int32"),
        ({"audio": AUDIO, "sr": np.array(16000.0)}, "got an array of float64"),
        ({"audio": [0.5, 1, "2"], "sr": 16000}, "cannot convert <U32 to float32"),
    ],
    ids=["fraction", "whole-float", "overflow", "numpy-scalar", "array", "strings"],
)
async def test_no_silent_casts_of_python_values(feed: dict[str, object], message: str) -> None:
    """A float for an int input is refused, not truncated (16000.9 would run as 16000)."""
    async with aioov.Core() as core:
        compiled = await core.compile_model(audio_model(), "CPU")
    with pytest.raises(aioov.InferenceError, match=message):
        await compiled.infer(feed)


async def test_python_values_that_fit_are_converted() -> None:
    """What changes no value still converts: ints for an int or a float input, a list of floats
    for a float input."""
    async with aioov.Core() as core:
        compiled = await core.compile_model(audio_model(), "CPU")
    results = await compiled.infer({"audio": [0, 0.5, 1], "sr": np.int64(16000)})
    assert results["rate"].dtype == np.int32 and int(results["rate"]) == 16000
    np.testing.assert_array_equal(results["scaled"], [0, 8000, 16000])
    assert (await compiled.infer({"audio": [1, 2], "sr": True}))["scaled"].tolist() == [1, 2]


async def test_unknown_device_lists_the_available_ones(mlp_path: Path) -> None:
    with pytest.raises(aioov.DeviceNotFoundError, match="unknown device 'NPU'.*available here: CPU"):
        await aioov.Core().compile_model(mlp_path, "NPU")


async def test_invalid_graph_is_reported_as_such(tmp_path: Path) -> None:
    model = mlp()
    model.graph.node[1].input[0] = "dangling"  # an edge from nowhere
    path = tmp_path / "dangling.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(aioov.InvalidModelError, match="dangling"):
        await aioov.Core().compile_model(path, "CPU")


async def test_compile_of_a_missing_path(tmp_path: Path) -> None:
    with pytest.raises(aioov.ModelReadError, match="no such model file"):
        await aioov.Core().compile_model(tmp_path / "missing.onnx", "CPU")


async def test_compile_of_a_non_onnx_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.onnx"
    path.write_text("not a model")
    with pytest.raises(aioov.ModelReadError, match="not a valid ONNX model"):
        await aioov.Core(cache_dir=tmp_path / "c").compile_model(path, "CPU")


async def test_closed_core_refuses_work(mlp_path: Path) -> None:
    core = aioov.Core()
    await core.aclose()
    with pytest.raises(aioov.AioovError, match="closed"):
        await core.compile_model(mlp_path, "CPU")


@pytest.mark.skipif(_ortenv.builds_hold_the_gil(),
                    reason=f"onnxruntime {ort.__version__} holds the GIL while it builds a session")
async def test_event_loop_keeps_ticking_while_four_models_compile(model_dir: Path) -> None:
    """Compiles run in worker threads and ONNX Runtime releases the GIL while building a
    session, so a 5 ms ticker keeps the pace it keeps beside four threads that burn CPU
    without the GIL (hashlib releases it): on an idle machine a max gap under 50 ms, on a busy
    or niced one no worse than that control run's (a compile holding the GIL would stall the
    loop for the whole build)."""
    paths = []
    for seed in range(4):
        path = model_dir / f"lag_{seed}.onnx"
        if not path.exists():
            onnx.save(bert_like(layers=6, hidden=256, heads=4, vocab=4000, seed=seed), path)
        paths.append(path)

    async def max_gap(work: Callable[[], Awaitable[object]]) -> tuple[float, float]:
        gaps: list[float] = []
        stop = anyio.Event()

        async def ticker() -> None:
            last = time.perf_counter()
            while not stop.is_set():
                await anyio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            await work()
            stop.set()
        assert gaps, "the ticker must have run meanwhile"
        return max(gaps), time.perf_counter() - started

    async def compiles_and_control() -> tuple[float, float]:
        # Collect what earlier tests left behind first: a full GC pass over their sessions holds
        # the GIL for tens of milliseconds, which says nothing about aioov (seen once in a CI run).
        gc.collect()
        async with aioov.Core(max_concurrent_compiles=4) as core:
            compiled: list[aioov.CompileResult] = []
            compile_gap, seconds = await max_gap(lambda: _collect(core.compile_all(paths, "CPU"), compiled))
        assert all(result.ok for result in compiled)

        def burn() -> None:  # CPU without the GIL, for as long as the compiles took
            data, deadline = b"x" * (8 << 20), time.perf_counter() + seconds
            while time.perf_counter() < deadline:
                hashlib.sha256(data).digest()

        async def four_burners() -> None:
            async with anyio.create_task_group() as tg:
                for _ in range(4):
                    tg.start_soon(anyio.to_thread.run_sync, burn)

        control_gap, _ = await max_gap(four_burners)
        return compile_gap, control_gap

    # A compile that held the GIL stalls the loop for its whole build, every time; a machine whose
    # load changes between the two runs can make one pair disagree: three pairs, one must agree.
    for _pair in range(3):
        compile_gap, control_gap = await compiles_and_control()
        if compile_gap < max(0.05, 2 * control_gap):
            break
    else:
        pytest.fail(f"event loop stalled for {compile_gap * 1000:.0f} ms (beside GIL-free threads: "
                    f"{control_gap * 1000:.0f} ms), in each of three pairs")


async def _collect(results: Awaitable[list[aioov.CompileResult]], into: list[aioov.CompileResult]) -> None:
    into.extend(await results)


SHARED_POOL = """
import sys, anyio, numpy as np, onnxruntime as ort, aioov
async def main():
    async with aioov.Core(properties={"ORT_SHARED_THREAD_POOL": True}) as core:
        results = await core.compile_all(sys.argv[1:], "CPU")
        for r in results:
            compiled = r.unwrap()
            assert compiled.session.get_session_options().use_per_session_threads is False
            ids = np.arange(8, dtype=np.int64).reshape(1, 8)
            options = ort.SessionOptions()
            options.use_per_session_threads = False  # onnxruntime's rule once the shared pool exists
            want = ort.InferenceSession(r.model, options).run(None, {"input_ids": ids})[0]
            got = (await compiled.infer(ids))["last_hidden_state"]
            assert np.allclose(got, want, rtol=1e-4, atol=1e-4)
    print("ok", len(results))
anyio.run(main)
"""


def test_shared_thread_pool_in_a_fresh_process(model_dir: Path) -> None:
    """ORT_SHARED_THREAD_POOL changes onnxruntime's process-wide environment: its own process."""
    from .helpers import make_models, run_python

    paths = make_models(model_dir / "shared_pool", 3)
    assert run_python(SHARED_POOL, *map(str, paths)).stdout.split() == ["ok", "3"]


@pytest.mark.parametrize(("version", "holds"), [("1.24.1", True), ("1.30.0", True), ("1.31.0", False),
                                                ("1.32.0", False), ("2.0.0", False), ("1.33.0.dev1", False)])
def test_onnxruntime_builds_that_hold_the_gil_are_recognised(version: str, holds: bool) -> None:
    assert _ortenv.builds_hold_the_gil(version) is holds


async def test_compiling_on_an_onnxruntime_that_holds_the_gil_says_so_once(
    mlp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog_warnings: pytest.LogCaptureFixture
) -> None:
    # why: only one onnxruntime is installed here; the warning depends on its version
    monkeypatch.setattr(ort, "__version__", "1.24.1")
    # why: the warning is once per process, and this process may have said it already
    monkeypatch.setattr(_ortenv, "_warned", False)
    async with aioov.Core() as core:
        assert "GIL" not in caplog_warnings.text  # a Core that compiles nothing (aioov devices) is quiet
        await core.compile_model(mlp_path, "CPU")
        await core.compile_model(mlp_path, "CPU", {"NUM_STREAMS": 2})
    assert caplog_warnings.text.count("holds the GIL") == 1
    # why: as above, a newer onnxruntime than the one installed
    monkeypatch.setattr(ort, "__version__", "1.31.1")
    # why: as above, a fresh process's warn-once flag
    monkeypatch.setattr(_ortenv, "_warned", False)
    caplog_warnings.clear()
    async with aioov.Core() as core:
        await core.compile_model(mlp_path, "CPU")
    assert "GIL" not in caplog_warnings.text


def _spinning(compiled: aioov.CompiledModel) -> tuple[str, str]:
    """(stop spinning when a run ends, how long an idle pool thread spins) of its session."""
    options = compiled.session.get_session_options()
    return (str(options.get_session_config_entry("session.force_spinning_stop")),
            str(options.get_session_config_entry("session.intra_op.spin_duration_us")))


async def test_idle_pool_threads_spin_briefly_unless_the_config_says_otherwise(
    mlp_path: Path, cache_dir: Path
) -> None:
    """Several sessions in a process (or processes on a host) would otherwise spin against
    each other's runs (two models in turns ran 1.2-2x slower on 2 cores), and every new
    session's threads against the builds still to come (~55 ms of a core each)."""
    async with aioov.Core(cache_dir=cache_dir) as core:
        uncached = await core.compile_model(mlp_path, "CPU")
        await core.wait_exports()
        hit = await core.compile_model(mlp_path, "CPU")
        assert hit.get_property("LOADED_FROM_CACHE")
        kept = await core.compile_model(mlp_path, "CPU", {"ORT_SESSION_CONFIG": {
            "session.force_spinning_stop": "0", "session.intra_op.spin_duration_us": "-1"}})
    assert _spinning(uncached) == _spinning(hit) == ("1", "2000")
    assert _spinning(kept) == ("0", "-1")


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_one_compiled_model_serves_event_loops_in_two_threads_at_once(mlp_path: Path, backend: str) -> None:
    """A model compiled once, then served by two event loops running at once (a thread each,
    as apps that start a loop per thread do). One loop's requests never finished under asyncio
    (its ``NUM_STREAMS`` limiter was shared by both loops: a slot freed in one loop went to a
    waiter of the other, which never woke), and trio failed with ``TrioInternalError``."""
    x = np.ones((2, 8), dtype=np.float32)
    expected = reference(mlp_path, {"x": x})[0]
    core = aioov.Core()
    compiled = anyio.run(core.compile_model, mlp_path, "CPU", {"NUM_STREAMS": 1})
    served: dict[int, object] = {}

    async def serve(name: int) -> None:
        outputs: list[np.ndarray] = []

        async def one() -> None:
            outputs.append((await compiled.infer({"x": x}))["y"])

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                for _ in range(40):
                    tg.start_soon(one)
        served[name] = sum(np.allclose(y, expected, rtol=1e-5) for y in outputs)

    def loop(name: int) -> None:
        try:
            anyio.run(serve, name, backend=backend)
        except BaseException as exc:  # noqa: BLE001 - reported below
            served[name] = repr(exc)

    threads = [threading.Thread(target=loop, args=(name,)) for name in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    anyio.run(core.aclose)
    assert served == {0: 40, 1: 40}
