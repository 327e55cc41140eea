"""Every error a caller sees is an ``AioovError`` (or its own cancellation).

aioov raises a few internal signals (``Cancelled``, ``LockBusy``, ``EntryError``, ``BlobError``,
``RemoteError``) and is handed others by its thread pools; these tests close a Core under
running compiles, where such exceptions used to leak, and check what the callers get.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

import aioov
from aioov.testing import mlp

from .helpers import HeldCompiles

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
