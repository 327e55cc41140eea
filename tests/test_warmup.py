"""``WARMUP``: a compiled model's first request costs what the later ones do (#24).

Warm-up runs in the compile job on inputs made up from the model's input specs; a model whose
inputs cannot be made up is compiled anyway, unwarmed, with a warning naming the input.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import aioov
from aioov._compiled import Port
from aioov._inputs import DEFAULT_DIM, Unsynthesizable, synthesize

from .helpers import ROOT, make_models, run_python

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def six_models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_models(tmp_path_factory.mktemp("warm"), 6)


@pytest.fixture
def count_runs(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, tuple[int, ...]]]:
    """Record the input shapes of every ``InferenceSession.run``."""
    calls: list[dict[str, tuple[int, ...]]] = []
    original = ort.InferenceSession.run

    def run(self, output_names, feed, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append({name: np.asarray(value).shape for name, value in feed.items()})
        return original(self, output_names, feed, *args, **kwargs)

    # why: nothing public records the feeds a warm-up ran (only WARMED_UP and warmup_seconds)
    monkeypatch.setattr(ort.InferenceSession, "run", run)
    return calls


async def test_warmup_runs_the_model_before_compile_model_returns(
    bert_path: Path, count_runs: list[dict[str, tuple[int, ...]]]
) -> None:
    async with aioov.Core() as core:
        compiled = await core.compile_model(bert_path, "CPU", {"WARMUP": 2})
        assert compiled.get_property("WARMED_UP") is True and compiled.warmup_seconds > 0
        assert count_runs == [{"input_ids": (1, DEFAULT_DIM)}] * 2  # batch 1, a small sequence
        cold = await core.compile_model(bert_path, "CPU")
        assert cold.get_property("WARMED_UP") is False and len(count_runs) == 2


async def test_warmup_shapes_choose_the_dynamic_dimensions(
    bert_path: Path, count_runs: list[dict[str, tuple[int, ...]]]
) -> None:
    async with aioov.Core() as core:
        config = {"WARMUP": 1, "WARMUP_SHAPES": {"input_ids": [4, 128]}}
        assert (await core.compile_model(bert_path, "CPU", config)).get_property("WARMED_UP") is True
    assert count_runs == [{"input_ids": (4, 128)}]


async def test_bulk_loading_warms_every_model_and_reports_it(six_models: list[Path]) -> None:
    seen: list[float] = []
    async with aioov.Core(max_concurrent_compiles=2) as core:
        results = await core.compile_all(six_models, "CPU", {"WARMUP": 1},
                                          progress=lambda p: seen.append(p.current.warmup_seconds))
    assert all(r.ok and r.unwrap().get_property("WARMED_UP") for r in results)
    assert all(0 < r.warmup_seconds < r.seconds for r in results) and len(seen) == 6


def _string_model(tmp_path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["same"])], "strings",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["n"])],
        [helper.make_tensor_value_info("same", TensorProto.STRING, ["n"])],
    )
    return _save(graph, tmp_path / "strings.onnx")


def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


async def test_a_model_whose_inputs_cannot_be_made_up_compiles_unwarmed_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = _string_model(tmp_path)
    async with aioov.Core() as core:
        compiled = await core.compile_model(path, "CPU", {"WARMUP": 1})
    assert compiled.get_property("WARMED_UP") is False
    assert "'text' is a tensor of strings" in caplog.text
    assert (await compiled.infer({"text": np.array(["a", "b"], dtype=object)}))["same"].tolist() == ["a", "b"]


async def test_a_model_that_fails_on_made_up_inputs_compiles_unwarmed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A shape input of zeros asks Reshape (allowzero=1) for an empty tensor: onnxruntime fails."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=1)], "reshape",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
         helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    path = _save(graph, tmp_path / "reshape.onnx")
    async with aioov.Core() as core:
        compiled = await core.compile_model(path, "CPU", {"WARMUP": 1})
        assert compiled.get_property("WARMED_UP") is False and "was not warmed up" in caplog.text
        y = await compiled.infer({"x": np.ones((2, 4), np.float32), "shape": np.array([4, 2])})
    assert y["y"].shape == (4, 2)


async def test_sizes_a_model_rejects_are_tried_quietly(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Warm-up grows unnamed dimensions until the model accepts them; onnxruntime's error log
    for the sizes it rejects (here 8: Reshape wants multiples of 32) is not the user's concern."""
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "blocks",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [-1, 32])],
    )
    path = _save(graph, tmp_path / "blocks.onnx")
    async with aioov.Core() as core:
        compiled = await core.compile_model(path, "CPU", {"WARMUP": 1})
        assert compiled.get_property("WARMED_UP") is True
    with pytest.raises(Exception, match="Reshape"):  # what onnxruntime says, and would print, at size 8
        ort.InferenceSession(str(path)).run(None, {"x": np.ones((1, 8), np.float32)})
    assert "[E:onnxruntime" in capfd.readouterr().err
    async with aioov.Core() as core:
        await core.compile_model(path, "CPU", {"WARMUP": 1})
    assert "onnxruntime" not in capfd.readouterr().err


@pytest.mark.parametrize("shapes, message", [
    ({"nope": [1, 2]}, "not inputs of this model"),
    ({"x": [1]}, "has rank 2"),
    ({"x": [1, 9]}, "dimension 1 is 8"),
])
def test_synthesis_explains_what_it_cannot_do(shapes: dict[str, list[int]], message: str) -> None:
    x = Port("x", "tensor(float)", np.dtype(np.float32), ("N", 8))
    with pytest.raises(Unsynthesizable, match=message):
        synthesize([x], shapes)


def test_synthesis_is_deterministic_and_shares_named_dimensions() -> None:
    ids = Port("input_ids", "tensor(int64)", np.dtype(np.int64), ("batch", "seq"))
    mask = Port("attention_mask", "tensor(int64)", np.dtype(np.int64), ("batch", "seq"))
    pixels = Port("pixels", "tensor(float16)", np.dtype(np.float16), (None, 3, -1, 224))
    first = synthesize([ids, mask, pixels], {"input_ids": [2, 64]})
    assert first["attention_mask"].shape == (2, 64)  # "seq" named once, used everywhere
    assert first["pixels"].shape == (1, 3, DEFAULT_DIM, 224) and first["pixels"].dtype == np.float16
    assert not first["input_ids"].any()  # zeros: valid token ids and indices
    np.testing.assert_array_equal(synthesize([ids, mask, pixels], {"input_ids": [2, 64]})["pixels"], first["pixels"])


@pytest.mark.parametrize("bad", [{"x": "1x2"}, {"x": [1, -1]}, "not json", 3])
def test_bad_warmup_shapes_are_property_errors(bad: object) -> None:
    with pytest.raises(aioov.PropertyError, match="WARMUP_SHAPES"):
        aioov.Core(properties={"WARMUP_SHAPES": bad})


def test_the_cli_warms_models_and_reports_it(bert_path: Path, tmp_path: Path) -> None:
    code = "import sys; from aioov.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = run_python(code, "warmup", str(bert_path), "--cache-dir", str(tmp_path / "c"), "--warmup", "2",
                      "-c", 'WARMUP_SHAPES={"input_ids": [1, 32]}', "--json", cwd=ROOT)
    (result,) = json.loads(proc.stdout)["results"]
    assert result["ok"] and result["warmed_up"] and result["warmup_seconds"] > 0


def test_given_values_fill_their_inputs_and_are_never_cast_silently() -> None:
    """A sample rate is not free-form: zeros are no valid rate (silero's ``sr``)."""
    ports = [Port("input", "tensor(float)", np.dtype(np.float32), ("N", "T")),
             Port("sr", "tensor(int64)", np.dtype(np.int64), ())]
    feed = synthesize(ports, {"input": [1, 512]}, values={"sr": 16000})
    assert feed["sr"].dtype == np.int64 and int(feed["sr"]) == 16000 and feed["input"].shape == (1, 512)
    for bad in ({"sr": 16000.9}, {"sr": 2**70}):
        with pytest.raises(Unsynthesizable, match="the value given for input 'sr'"):
            synthesize(ports, values=bad)
    lengths = Port("lens", "tensor(int32)", np.dtype(np.int32), ("N",))
    assert synthesize([lengths], values={"lens": [3, 5]})["lens"].tolist() == [3, 5]  # an array: as it is
    with pytest.raises(Unsynthesizable, match="shape asked for"):
        synthesize([lengths], {"lens": [3]}, values={"lens": [3, 5]})


async def test_warmup_values_make_a_model_with_a_sample_rate_warm_up(tmp_path: Path) -> None:
    """y = x * sr: made up as 0, the rate gives all zeros; given, the warm-up runs on it."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T"])
    sr = helper.make_tensor_value_info("sr", TensorProto.INT64, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T"])
    nodes = [helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["x", "srf"], ["y"])]
    graph = helper.make_graph(nodes, "rate", [x, sr], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "rate.onnx"
    onnx.save(model, path)
    seen: list[int] = []
    real = ort.InferenceSession.run

    def run(self, output_names, feed, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(int(feed["sr"]))
        return real(self, output_names, feed, *args, **kwargs)

    ort.InferenceSession.run = run  # type: ignore[method-assign]
    try:
        async with aioov.Core() as core:
            compiled = await core.compile_model(path, "CPU", {"WARMUP": 1, "WARMUP_VALUES": {"sr": 16000}})
    finally:
        ort.InferenceSession.run = real  # type: ignore[method-assign]
    assert compiled.get_property("WARMED_UP") and seen == [16000]


def _sample_rate_model(path: Path) -> Path:
    """A VAD's shape (silero's ``sr``): ``y = Reshape(x, [sr / 16000, -1])`` (allowzero), so a
    rate made up as 0 asks for ``[0, -1]``, which onnxruntime refuses; 16000 gives ``[1, -1]``."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T"])
    sr = helper.make_tensor_value_info("sr", TensorProto.INT64, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["A", "B"])
    nodes = [helper.make_node("Div", ["sr", "rate"], ["per_second"]),
             helper.make_node("Unsqueeze", ["per_second", "axis0"], ["rows"]),
             helper.make_node("Concat", ["rows", "rest"], ["shape"], axis=0),
             helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=1)]
    constants = [helper.make_tensor("rate", TensorProto.INT64, [], [16000]),
                 helper.make_tensor("axis0", TensorProto.INT64, [1], [0]),
                 helper.make_tensor("rest", TensorProto.INT64, [1], [-1])]
    return _save(helper.make_graph(nodes, "rate", [x, sr], [y], constants), path)


async def test_a_warmup_that_needs_values_says_which_once_per_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """#43.7: silero's warm-up failed in every worker, ``sr`` made up as 0. The warning names
    the inputs made up, WARMUP_VALUES and WARMUP_SHAPES, once per model and process (later
    compiles log it at DEBUG); with WARMUP_VALUES the model warms up."""
    path = _sample_rate_model(tmp_path / "vad.onnx")
    caplog.set_level(logging.DEBUG, logger="aioov")
    async with aioov.Core() as core:
        for _ in range(2):
            assert (await core.compile_model(path, "CPU", {"WARMUP": 1})).get_property("WARMED_UP") is False
        warmed = await core.compile_model(path, "CPU", {"WARMUP": 1, "WARMUP_VALUES": {"sr": 16000}})
        assert warmed.get_property("WARMED_UP") is True
        assert (await warmed.infer({"x": np.ones((1, 4), np.float32), "sr": 16000}))["y"].shape == (1, 4)
    said = [r for r in caplog.records if "was not warmed up" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.WARNING, logging.DEBUG]
    message = said[0].getMessage()
    assert str(path) in message and "sr = 0" in message and "x[1, 512] random" in message
    assert 'WARMUP_VALUES={"sr": ...}' in message and "WARMUP_SHAPES" in message
    assert "Reshape" in message  # and what onnxruntime said


def test_warnings_go_through_logging_and_never_print_bare(tmp_path: Path) -> None:
    """The ``aioov`` logger has a NullHandler: a process that configured no logging prints no
    bare line (Python's last-resort handler), one that did gets the warning once per model."""
    path = _sample_rate_model(tmp_path / "vad.onnx")
    code = """
import logging, sys, anyio, aioov
if sys.argv[2] == "configured":
    logging.basicConfig(format="%(levelname)s %(name)s %(message)s")
async def main():
    async with aioov.Core() as core:
        for _ in range(3):
            await core.compile_model(sys.argv[1], "CPU", {"WARMUP": 1})
anyio.run(main)
"""
    assert "warm" not in run_python(code, str(path), "bare").stderr
    configured = run_python(code, str(path), "configured").stderr
    warmup_warnings = [
        line for line in configured.splitlines()
        if line.startswith("WARNING aioov aioov: ") and "WARMUP" in line
    ]
    assert len(warmup_warnings) == 1 and "WARMUP_VALUES" in warmup_warnings[0]
