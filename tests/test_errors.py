"""Every error a caller sees is an ``AioovError`` (or its own cancellation).

aioov raises a few internal signals (``Cancelled``, ``LockBusy``, ``EntryError``, ``BlobError``,
``RemoteError``) and is handed others by its thread pools; these tests close a Core under
running compiles, where such exceptions used to leak, and check what the callers get.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import anyio
import numpy as np
import onnx
import pytest

import aioov
from aioov.testing import mlp

from .helpers import HeldCompiles, builders_of, reference, run_python

pytestmark = pytest.mark.anyio


@pytest.fixture
def models(tmp_path: Path) -> list[Path]:
    import onnx

    paths = []
    for n in range(4):
        path = tmp_path / f"m{n}.onnx"
        onnx.save(mlp(8, 16 + n, 4), path)
        paths.append(path)
    return paths


async def test_closing_a_core_under_running_compiles_gives_callers_aioov_errors(
    models: list[Path], cache_dir: Path, held_compiles: HeldCompiles
) -> None:
    started, gate = held_compiles.started, held_compiles.release
    core = aioov.Core(cache_dir=cache_dir, max_concurrent_compiles=2)
    outcomes: list[object] = []

    async def one(path: Path) -> None:
        try:
            outcomes.append(await core.compile_model(path, "CPU"))
        except Exception as exc:  # what leaks is the point of the test
            outcomes.append(exc)

    async def bulk() -> None:
        try:
            outcomes.extend(r.error or r.compiled for r in await core.compile_all(models, "CPU"))
        except Exception as exc:
            outcomes.append(exc)

    async with anyio.create_task_group() as tg:
        for path in models:
            tg.start_soon(one, path)
        tg.start_soon(bulk)
        await anyio.to_thread.run_sync(started.wait)
        tg.start_soon(core.aclose)
        await anyio.sleep(0.05)
        gate.set()

    assert len(outcomes) == 2 * len(models)
    leaked = [repr(o) for o in outcomes if isinstance(o, BaseException) and not isinstance(o, aioov.AioovError)]
    assert leaked == []
    assert any(isinstance(o, aioov.AioovError) for o in outcomes)  # the close did stop some
    with pytest.raises(aioov.AioovError, match="closed"):
        await core.compile_model(models[0], "CPU")


async def test_a_bad_concurrency_limit_is_an_aioov_error(models: list[Path]) -> None:
    async with aioov.Core() as core:
        with pytest.raises(aioov.PropertyError, match="max_concurrency"):
            await core.compile_all(models, "CPU", max_concurrency=-1)


async def test_asking_a_compiled_model_for_an_unknown_output_is_an_aioov_error(models: list[Path]) -> None:
    async with aioov.Core() as core:
        compiled = await core.compile_model(models[0], "CPU")
    with pytest.raises(aioov.AioovError, match="nope"):
        compiled.output("nope")


async def test_export_model_refuses_unknown_config_keys(models: list[Path], tmp_path: Path) -> None:
    async with aioov.Core() as core:
        with pytest.raises(aioov.PropertyError, match="CACHE_DRI"):
            await core.export_model(models[0], tmp_path / "blob", "CPU", {"CACHE_DRI": "x"})


# -- errors while running, and while asking for results (#40.6, #43.6) -----------------------


def failing_model(op: str) -> onnx.ModelProto:
    """A valid graph that fails at run time on some inputs, as real models do on inputs they were
    not made for: a Reshape to ``[3, -1]`` of ``x[N]`` (onnxruntime's FAIL unless N % 3 == 0), or
    a Gather at ``i[N]`` from 4 values (its INVALID_ARGUMENT for an index out of range)."""
    from onnx import TensorProto, helper, numpy_helper

    if op == "Reshape":
        node = helper.make_node("Reshape", ["x", "target"], ["y"])
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N"])
        const = numpy_helper.from_array(np.array([3, -1], dtype=np.int64), "target")
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, "M"])
    else:
        node = helper.make_node("Gather", ["table", "x"], ["y"])
        x = helper.make_tensor_value_info("x", TensorProto.INT64, ["N"])
        const = numpy_helper.from_array(np.arange(4, dtype=np.float32), "table")
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N"])
    graph = helper.make_graph([node], op.lower(), [x], [y], [const])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


#: inputs each failing model cannot run on
BAD_RUN = {"Reshape": np.zeros(4, np.float32), "Gather": np.array([7], np.int64)}


@pytest.mark.parametrize("op", ["Reshape", "Gather"])
async def test_onnxruntime_failing_while_running_is_an_inference_error(op: str) -> None:
    """Whatever class onnxruntime's run error has (FAIL for the Reshape, INVALID_ARGUMENT for
    the Gather), the caller gets an InferenceError with onnxruntime's message."""
    async with aioov.Core() as core:
        compiled = await core.compile_model(failing_model(op), "CPU")
    with pytest.raises(aioov.InferenceError, match=f"running {op} node"):
        await compiled.infer(BAD_RUN[op])
    with pytest.raises(aioov.InferenceError, match=f"running {op} node"):
        await anyio.to_thread.run_sync(compiled.infer_sync, BAD_RUN[op])  # on the loop it would warn


_FAIL_AND_REPORT = """
import sys, anyio, numpy as np, aioov
from tests.test_errors import BAD_RUN, failing_model
async def main():
    async with aioov.Core() as core:
        compiled = await core.compile_model(failing_model(sys.argv[1]), "CPU")
        try:
            await compiled.infer(BAD_RUN[sys.argv[1]])
        except aioov.InferenceError as exc:
            print("raised", type(exc).__name__, file=sys.stderr)
anyio.run(main)
"""


@pytest.mark.parametrize("op", ["Reshape", "Gather"])
def test_onnxruntime_prints_no_error_of_its_own_when_aioov_raises_it(op: str) -> None:
    """In a fresh process (onnxruntime's default logging, not the tests' quieter one) the error
    reaches the caller once, as the exception: no red ``[E:onnxruntime ...]`` line besides."""
    proc = run_python(_FAIL_AND_REPORT, op, cwd=Path(__file__).resolve().parent.parent)
    assert "raised InferenceError" in proc.stderr
    assert "[E:onnxruntime" not in proc.stderr, proc.stderr


async def test_asking_for_a_port_by_an_index_it_does_not_have_is_an_inference_error(models: list[Path]) -> None:
    """``input(5)`` fails as ``output("nope")`` does, not with an IndexError."""
    async with aioov.Core() as core:
        compiled = await core.compile_model(models[0], "CPU")
    for ask in (compiled.input, compiled.output):
        with pytest.raises(aioov.InferenceError, match="no (input|output) 5"):
            ask(5)
        with pytest.raises(aioov.InferenceError, match="nope"):
            ask("nope")
    assert compiled.output(-1) == compiled.outputs[-1]


async def test_an_output_before_any_inference_is_an_inference_error(models: list[Path]) -> None:
    async with aioov.Core() as core:
        compiled = await core.compile_model(models[0], "CPU")
    request = compiled.create_infer_request()
    with pytest.raises(aioov.InferenceError, match="no inference has run"):
        request.get_output_tensor()
    assert dict(request.results) == {}
    await request.infer(np.zeros((1, 8), np.float32))
    assert request.get_output_tensor().shape == (1, 4)
    assert request.get_output_tensor(compiled.output(0)) is request.get_output_tensor("y")


# -- limits given as arguments -----------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, True, 2.5, "4"])
def test_a_bad_compile_limit_is_refused_not_replaced_by_the_default(value: object) -> None:
    with pytest.raises(aioov.PropertyError, match="max_concurrent_compiles"):
        aioov.Core(max_concurrent_compiles=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [0, True, 2.5])
async def test_a_bulk_limit_of_zero_or_a_boolean_is_refused(models: list[Path], value: object) -> None:
    async with aioov.Core() as core:
        with pytest.raises(aioov.PropertyError, match="max_concurrency"):
            await core.compile_all(models, "CPU", max_concurrency=value)  # type: ignore[arg-type]


# -- the cache store's public methods ------------------------------------------------------------


def test_the_cache_store_raises_cache_errors(tmp_path: Path) -> None:
    """``CacheStore`` is public (the CLI and scripts use it): a bad key or a folder that is no
    exported blob is a CacheError, not a ValueError or an internal signal."""
    store = aioov.CacheStore(tmp_path / "cache")
    with pytest.raises(aioov.CacheError, match="not a cache key"):
        store.entry_path("../../etc")
    with pytest.raises(aioov.CacheError, match="not a cache key"):
        store.remove("../../etc")
    (tmp_path / "blob").mkdir()
    with pytest.raises(aioov.CacheError, match="not an aioov blob"):
        store.read_blob(tmp_path / "blob")
    (tmp_path / "blob" / "manifest.json").write_text('{"key": "0123456789abcdef", "format": 1, "files": {}}')
    with pytest.raises(aioov.CacheError, match="not an aioov blob"):
        store.read_blob(tmp_path / "blob")


def _block_removal(entry: Path, how: str) -> None:
    """Make ``entry`` impossible to remove: its shard directory read-only (a cache shared by
    users, or a read-only mount), or its lock path taken by a directory (as root too)."""
    if how == "read-only shard":
        entry.parent.chmod(0o555)
    else:
        lock = entry.parent.parent / ".locks" / f"{entry.name}.lock"
        lock.unlink(missing_ok=True)
        lock.mkdir()


@pytest.mark.parametrize("how", [
    pytest.param("read-only shard", marks=pytest.mark.skipif(
        hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")),
    "lock path is a directory",
])
async def test_prune_reports_the_entries_it_could_not_remove(
    how: str, models: list[Path], cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An entry prune chose but could not delete is logged and listed in ``failed``: it is not
    skipped silently as one in use is (the cache would stay above CACHE_MAX_SIZE unexplained)."""
    async with aioov.Core(cache_dir=cache_dir) as core:
        key = (await core.compile_model(models[0], "CPU", {"CACHE_EXPORT": "SYNC"})).get_property("CACHE_KEY")
    store = aioov.CacheStore(cache_dir)
    entry = store.entry_path(key)
    assert entry.is_dir()
    _block_removal(entry, how)
    try:
        with caplog.at_level(logging.WARNING, logger="aioov"):
            pruned = store.prune(max_size=0)
            assert store.clear() == 0
    finally:
        entry.parent.chmod(0o755)
    assert list(pruned) == []
    ((info, why),) = pruned.failed
    assert info.key == key and why.startswith(f"cannot remove entry {key[:16]}")
    assert f"could not prune entry {key[:16]}" in caplog.text
    assert f"could not clear entry {key[:16]}" in caplog.text
    assert entry.is_dir()


@pytest.mark.parametrize("refused", ["aioov-export", "aioov-upload", "aioov-heartbeat", "aioov-builder-reader",
                                     "aioov-builder-idle"])
async def test_a_thread_the_cache_cannot_start_costs_the_entry_never_the_compile(
    refused: str, mlp_path: Path, cache_dir: Path, refuse_threads: Callable[[str], None],
    caplog_warnings: pytest.LogCaptureFixture,
) -> None:
    """Under a thread limit, compile_model raised "can't start new thread" from the export
    worker it starts after the compile (a cache step failing a compile). Now the model is served:
    cached where the missing thread was not needed for it (heartbeats only help waiters; the
    timer that closes an idle builder only lets it be kept), not cached, with one warning,
    where it was; no builder is left behind."""
    refuse_threads(refused)
    x = np.ones((2, 8), dtype=np.float32)
    async with aioov.Core(cache_dir=cache_dir) as core:
        compiled = await core.compile_model(mlp_path, "CPU", {"CACHE_ALWAYS": True})
        got = (await compiled.infer({"x": x}))["y"]
        assert await core.wait_exports(120)
        stats = core.cache_stats
    np.testing.assert_allclose(got, reference(mlp_path, {"x": x})[0], rtol=1e-5)
    assert stats.exports == (1 if refused in ("aioov-heartbeat", "aioov-builder-idle") else 0)
    if stats.exports == 0:
        assert len(caplog_warnings.records) == 1 and "cannot start" in caplog_warnings.text, caplog_warnings.text
    assert builders_of(os.getpid()) == []


async def test_a_compile_with_no_thread_to_run_in_says_so(
    mlp_path: Path, refuse_threads: Callable[[str], None]
) -> None:
    refuse_threads("aioov-compile")
    async with aioov.Core() as core:
        with pytest.raises(aioov.AioovError, match="cannot start a compile thread"):
            await core.compile_model(mlp_path, "CPU")


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # (trio keeps idle threads across tests to reuse)
async def test_exports_are_waited_for_and_a_core_closed_with_no_thread_to_wait_in(
    mlp_path: Path, cache_dir: Path, refuse_threads: Callable[[str], None]
) -> None:
    """``wait_exports`` and ``aclose`` wait in a worker thread of the event loop's; where none
    can be started they raised "can't start new thread". They look now and then instead."""
    refuse_threads("AnyIO worker thread")
    async with aioov.Core(cache_dir=cache_dir) as core:
        await core.compile_model(mlp_path, "CPU", {"CACHE_ALWAYS": True})
        assert core.pending_exports == 1
        assert await core.wait_exports(120)
        assert core.cache_stats.exports == 1
    assert builders_of(os.getpid()) == []


_NO_BLAKE3_POOL = """
import sys, blake3
real = blake3.blake3

class PanicException(BaseException):  # pyo3's, raised where rayon cannot start its pool
    pass

class NoPool:
    AUTO = real.AUTO

    def __new__(cls, *args, max_threads=1, **kwargs):
        if max_threads == real.AUTO:
            raise PanicException("The global thread pool has not been initialized.")
        return real(*args, max_threads=max_threads, **kwargs)

# why: rayon's pool fails to start only under a real thread limit, which does not bind root
blake3.blake3 = NoPool
import anyio, aioov

async def main():
    for _ in range(2):
        async with aioov.Core(cache_dir=sys.argv[1]) as core:
            compiled = await core.compile_model(sys.argv[2], "CPU", {"CACHE_ALWAYS": True})
            assert await core.wait_exports(120)
            print(compiled.get_property("LOADED_FROM_CACHE"))

anyio.run(main)
"""


def test_a_model_is_hashed_where_blake3_cannot_start_its_thread_pool(mlp_path: Path, cache_dir: Path) -> None:
    """Under a thread limit blake3's thread pool panics (a BaseException): the program died
    while hashing the model. It hashes on one thread instead, to the same key."""
    proc = run_python(_NO_BLAKE3_POOL, str(cache_dir), str(mlp_path))
    assert proc.stdout.split() == ["False", "True"]
