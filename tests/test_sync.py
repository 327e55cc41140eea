"""``SyncCore``: aioov for code that is not async (#43.3).

Scripts, notebooks and sync servers (Flask, Django, gunicorn's sync workers) call blocking
methods; the Core runs on an event loop in a thread of the SyncCore's own, so calls from many
threads run concurrently, and a compiled model infers in the calling thread. A blocking call
made on an event loop's thread works, with a ``RuntimeWarning``.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anyio
import numpy as np
import pytest

import aioov

from .helpers import HeldCompiles, reference, run_python

X = np.random.default_rng(3).standard_normal((3, 8)).astype(np.float32)


def test_compile_and_infer_equal_onnxruntime(mlp_path: Path, cache_dir: Path) -> None:
    with aioov.SyncCore(cache_dir=cache_dir) as core:
        compiled = core.compile_model(mlp_path, "CPU")
        assert isinstance(compiled, aioov.SyncCompiledModel)
        expected = reference(mlp_path, {"x": X})[0]
        np.testing.assert_allclose(compiled.infer({"x": X})["y"], expected, rtol=1e-6)
        np.testing.assert_allclose(compiled(X)[0], expected, rtol=1e-6)  # OpenVINO's compiled(inputs)
        request = compiled.create_infer_request()
        request.infer([X])
        np.testing.assert_allclose(request.get_output_tensor(compiled.output(0)), expected, rtol=1e-6)
        assert [p.name for p in compiled.inputs] == ["x"] and compiled.device == "CPU"
        assert compiled.get_property("LOADED_FROM_CACHE") is False
        with pytest.raises(aioov.InferenceError, match="unknown input"):
            compiled.infer({"nope": X})
        model = core.read_model(mlp_path)
        assert model.input_names == ["x"]
        assert core.get_property("CACHE_DIR") == str(cache_dir) and "CPU" in core.get_available_devices()


def test_a_second_sync_core_hits_the_cache(mlp_path: Path, cache_dir: Path) -> None:
    with aioov.SyncCore(cache_dir=cache_dir) as first:
        first.compile_model(mlp_path, "CPU")
        assert first.wait_exports(60) and first.pending_exports == 0
    with aioov.SyncCore(cache_dir=cache_dir) as second:
        compiled = second.compile_model(mlp_path, "CPU")
        assert compiled.get_property("LOADED_FROM_CACHE") is True
        assert second.cache_stats.hits == 1 and second.cache_stats.compiles == 0
        np.testing.assert_allclose(compiled(X)["y"], reference(mlp_path, {"x": X})[0], rtol=1e-6)


def test_threads_of_a_sync_server_share_one_core(mlp_path: Path, cache_dir: Path, held_compiles: HeldCompiles) -> None:
    """Four threads compile the same model at once: their calls wait together on the Core's loop
    and share one compile (held until all four have joined it); then they infer at once."""
    expected = reference(mlp_path, {"x": X})[0]

    def serve(core: aioov.SyncCore) -> list[np.ndarray]:
        compiled = core.compile_model(mlp_path, "CPU", {"NUM_STREAMS": 2})
        return [compiled.infer({"x": X})["y"] for _ in range(20)]

    with aioov.SyncCore(cache_dir=cache_dir) as core, ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(serve, core) for _ in range(4)]
        deadline = time.monotonic() + 30
        while core.core._jobs.inflight.joined < 3:
            assert time.monotonic() < deadline, "the threads' compiles did not run at once"
            time.sleep(0.01)
        held_compiles.release.set()
        for future in futures:
            for y in future.result(timeout=60):
                np.testing.assert_allclose(y, expected, rtol=1e-6)
        assert core.cache_stats.compiles == 1


def test_bulk_loading_yields_sync_models(mlp_path: Path, cache_dir: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.onnx"
    with aioov.SyncCore(cache_dir=cache_dir) as core:
        seen: list[int] = []
        results = core.compile_all([mlp_path, missing], "CPU", progress=lambda p: seen.append(p.done))
        assert [r.ok for r in results] == [True, False] and sorted(seen) == [1, 2]
        assert isinstance(results[0].unwrap(), aioov.SyncCompiledModel)
        with pytest.raises(aioov.ModelReadError):
            results[1].unwrap()
        streamed = list(core.compile_models([missing, mlp_path], "CPU"))
        assert sorted(r.index for r in streamed) == [0, 1] and isinstance(streamed[0], aioov.SyncCompileResult)
        for result in core.compile_models([mlp_path, mlp_path], "CPU"):
            assert result.compiled is not None
            break  # leaving early cancels the rest and waits for them
        with pytest.raises(aioov.ModelReadError):
            list(core.compile_models([missing], "CPU", fail_fast=True))


def test_export_and_import_blocking(mlp_path: Path, cache_dir: Path, tmp_path: Path) -> None:
    with aioov.SyncCore(cache_dir=cache_dir) as core:
        core.export_model(mlp_path, tmp_path / "blob", "CPU")
        compiled = core.compile_model(mlp_path, "CPU")
        compiled.export_model(tmp_path / "again")
        imported = core.import_model(tmp_path / "again", "CPU")
        assert imported.get_property("LOADED_FROM_CACHE") is True
        np.testing.assert_allclose(imported(X)[0], compiled(X)[0], rtol=1e-6)


def test_close_twice_and_use_after_close(mlp_path: Path, cache_dir: Path, tmp_path: Path) -> None:
    core = aioov.SyncCore(cache_dir=cache_dir)
    compiled = core.compile_model(mlp_path, "CPU")
    core.close()
    core.close()  # harmless
    for call in (lambda: core.compile_model(mlp_path, "CPU"), lambda: core.read_model(mlp_path),
                 lambda: core.compile_all([mlp_path]), lambda: core.compile_models([mlp_path]),
                 lambda: core.wait_exports(), lambda: compiled.export_model(tmp_path / "x")):
        with pytest.raises(aioov.AioovError, match="closed"):
            call()
    np.testing.assert_allclose(compiled(X)[0], reference(mlp_path, {"x": X})[0], rtol=1e-6)  # no loop needed
    aioov.SyncCore().close()  # never used: closes all the same


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_blocking_calls_on_an_event_loop_warn(mlp_path: Path, backend: str) -> None:
    """They work, but stall the loop: a RuntimeWarning says so, for the SyncCore's calls and
    for ``CompiledModel.infer_sync``. From a worker thread of that loop, no warning."""
    core = aioov.SyncCore()

    async def on_the_loop() -> aioov.SyncCompiledModel:
        return core.compile_model(mlp_path, "CPU")

    async def in_a_worker_thread() -> aioov.SyncCompiledModel:
        return await anyio.to_thread.run_sync(core.compile_model, mlp_path, "CPU")

    async def infer_sync() -> None:
        async with aioov.Core() as async_core:
            compiled = await async_core.compile_model(mlp_path, "CPU")
        compiled.infer_sync(X)

    try:
        with pytest.warns(RuntimeWarning, match="SyncCore.compile_model blocks the event loop") as caught:
            compiled = anyio.run(on_the_loop, backend=backend)
        assert caught[0].filename == __file__  # the warning points at the caller
        with pytest.warns(RuntimeWarning, match="SyncCompiledModel.infer blocks the event loop"):
            anyio.run(anyio.to_thread.run_sync, compiled.infer, X, backend=backend)  # (a worker: no warning)
            anyio.run(_call, compiled.infer, X, backend=backend)
        with pytest.warns(RuntimeWarning, match=r"CompiledModel.infer_sync blocks .*await compiled.infer"):
            anyio.run(infer_sync, backend=backend)
        anyio.run(in_a_worker_thread, backend=backend)  # filterwarnings = error: any warning fails
    finally:
        core.close()


async def _call(func, *args):  # type: ignore[no-untyped-def]
    return func(*args)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX's")
def test_a_sync_core_used_before_fork_serves_in_the_child(mlp_path: Path, cache_dir: Path) -> None:
    """gunicorn --preload with sync workers: the parent's loop thread is not in the child, which
    starts one of its own on its first call."""
    code = """
import os, sys, numpy as np, aioov
core = aioov.SyncCore(cache_dir=sys.argv[1])
core.compile_model(sys.argv[2], "CPU")
assert core.wait_exports(60)
pid = os.fork()
if pid == 0:
    compiled = core.compile_model(sys.argv[2], "CPU")
    compiled(np.ones((1, 8), np.float32))
    core.close()
    os._exit(0 if compiled.get_property("LOADED_FROM_CACHE") else 3)
_, status = os.waitpid(pid, 0)
core.close()
print(os.waitstatus_to_exitcode(status))
"""
    assert run_python(code, str(cache_dir), str(mlp_path), timeout=120).stdout.strip() == "0"


def test_a_sync_model_chooses_its_outputs_and_run_options(mlp_path: Path) -> None:
    with aioov.SyncCore() as core:
        compiled = core.compile_model(mlp_path, "CPU")
        x = np.ones((2, 8), np.float32)
        name = compiled.outputs[0].name
        picked = compiled.infer(x, outputs=[name], run_options={"log_severity_level": 3})
        assert list(picked) == [name]
        with pytest.raises(aioov.InferenceError):
            compiled(x, outputs=["nope"])
