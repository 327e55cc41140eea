"""Shared fixtures: real ONNX models built with onnx.helper, and a cache directory.

Async tests are marked ``@pytest.mark.anyio`` and run under asyncio and trio
(anyio's pytest plugin; pytest-asyncio stays in strict mode and claims none).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

import aioov
from aioov.testing import bert_like, mlp, save_with_external_data

from .helpers import HeldCompiles

ONNX_TEST_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"

# The suite's models compile in milliseconds: no hit loads them sooner, so by default aioov
# would record them as not worth caching instead of writing entries. The tests of the cache
# need entries: CACHE_ALWAYS on, here and in every child process; tests of that rule
# (tests/test_worth.py) turn it off.
os.environ["AIOOV_CACHE_ALWAYS"] = "1"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(autouse=True)
def _quiet_onnxruntime() -> None:
    import onnxruntime as ort

    ort.set_default_logger_severity(3)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def mlp_path(model_dir: Path) -> Path:
    path = model_dir / "mlp.onnx"
    onnx.save(mlp(), path)
    return path


def text_line_recognizer() -> onnx.ModelProto:
    """An OCR text-line recognizer's shape: ``x[N, 3, 48, W]`` (W free, as a text line's width)
    → Conv → mean over the height → per-column scores ``y[N, W, 16]``."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(7)
    weights = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.2, name)
               for name, shape in (("conv_w", (8, 3, 3, 3)), ("proj", (8, 16)))]
    axes = numpy_helper.from_array(np.array([2], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("ReduceMean", ["r", "axes"], ["m"], keepdims=0),  # [N, 8, W]
        helper.make_node("Transpose", ["m"], ["t"], perm=[0, 2, 1]),  # [N, W, 8]
        helper.make_node("MatMul", ["t", "proj"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "text_line",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 48, "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "W", 16])],
        [*weights, axes],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="session")
def text_line_path(model_dir: Path) -> Path:
    path = model_dir / "text_line.onnx"
    onnx.save(text_line_recognizer(), path)
    return path


@pytest.fixture(scope="session")
def external_path(model_dir: Path) -> Path:
    """A model whose weights live in ``bert_ext.onnx.data`` beside it."""
    sub = model_dir / "external"
    sub.mkdir()
    return save_with_external_data(bert_like(layers=2, hidden=64, heads=4, vocab=500, seed=3), sub / "bert_ext.onnx")


@pytest.fixture(scope="session")
def bert_path(model_dir: Path) -> Path:
    """A small transformer: big enough that compiling takes measurable time."""
    path = model_dir / "bert_small.onnx"
    onnx.save(bert_like(layers=4, hidden=256, heads=4, vocab=2000, seed=1), path)
    return path


@pytest.fixture(scope="session")
def pypi_model_path() -> Path:
    """A real CNN (DenseNet-121's graph) shipped inside the onnx wheel."""
    path = ONNX_TEST_DATA / "light" / "light_densenet121.onnx"
    if not path.exists():
        pytest.skip(f"this onnx wheel ships no {path.name}")
    return path


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def ids() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 500, (2, 16), dtype=np.int64)


@pytest.fixture
def caplog_warnings(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, logger="aioov")
    return caplog


@pytest.fixture
async def core(cache_dir: Path):  # type: ignore[no-untyped-def]
    async with aioov.Core(cache_dir=cache_dir) as core:
        yield core


@pytest.fixture
def held_compiles(monkeypatch: pytest.MonkeyPatch) -> HeldCompiles:
    """Every compile from a source model waits, in its worker thread, until the test sets
    ``release``; ``started`` is set as soon as one waits."""
    from aioov._sessions import SessionFactory

    held = HeldCompiles()
    original = SessionFactory.compile

    def compile(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        held.started.set()
        assert held.release.wait(30), "the test never released the compiles"
        return original(self, *args, **kwargs)

    # why: a compile from source cannot be held in its thread from outside (the builder's fault
    # switch slows builders, not the caller's compile)
    monkeypatch.setattr(SessionFactory, "compile", compile)
    return held


@pytest.fixture
def refuse_threads(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """``refuse_threads(prefix)``: starting a thread whose name begins with ``prefix`` fails as
    it does under a thread limit (RLIMIT_NPROC, a container's ``pids.max``)."""
    start = threading.Thread.start

    def refuse(prefix: str) -> None:
        def refusing(thread: threading.Thread) -> None:
            if thread.name.startswith(prefix):
                raise RuntimeError("can't start new thread")
            start(thread)

        # why: the kernel does not hold root (which CI runs the tests as) to such limits; this is
        # what CPython raises where it refuses a thread
        monkeypatch.setattr(threading.Thread, "start", refusing)

    return refuse
