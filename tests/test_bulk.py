"""Bulk start-up loading: compile_models / compile_all."""

from __future__ import annotations

from contextlib import aclosing
from pathlib import Path

import anyio
import pytest

import aioov
from aioov._devices import AUTO_PRIORITY

from .helpers import HeldCompiles, make_models

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def six_models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return make_models(tmp_path_factory.mktemp("bulk"), 6)


async def test_compile_all_returns_results_in_input_order(six_models: list[Path], cache_dir: Path) -> None:
    async with aioov.Core(cache_dir=cache_dir) as core:
        results = await core.compile_all(six_models, "CPU", max_concurrency=3)
    assert [r.index for r in results] == list(range(6))
    assert [r.model for r in results] == six_models
    assert all(r.ok and r.compiled is not None and not r.from_cache for r in results)
    assert all(r.seconds > 0 for r in results)


async def test_results_stream_as_they_finish_with_progress(six_models: list[Path]) -> None:
    events: list[aioov.BulkProgress] = []
    seen = []
    async with aioov.Core() as core:
        async for result in core.compile_models(six_models, "CPU", progress=events.append):
            seen.append(result.index)
    assert sorted(seen) == list(range(6))
    assert [e.done for e in events] == [1, 2, 3, 4, 5, 6]
    assert all(e.total == 6 for e in events)
    assert [e.current.index for e in events] == seen


async def test_one_failure_does_not_stop_the_others(six_models: list[Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_text("nope")
    models = [six_models[0], bad, six_models[1], tmp_path / "missing.onnx", (six_models[2], "NPU", None)]
    async with aioov.Core() as core:
        results = await core.compile_all(models, "CPU")
    assert [r.ok for r in results] == [True, False, True, False, False]
    assert isinstance(results[1].error, aioov.ModelReadError)
    assert isinstance(results[3].error, aioov.ModelReadError)
    assert isinstance(results[4].error, aioov.DeviceNotFoundError)
    with pytest.raises(aioov.ModelReadError):
        results[1].unwrap()


async def test_fail_fast_raises_and_cancels_the_rest(six_models: list[Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_text("nope")
    async with aioov.Core(max_concurrent_compiles=1) as core:
        with pytest.raises(aioov.ModelReadError):
            await core.compile_all([bad, *six_models], "CPU", max_concurrency=1, fail_fast=True)
        assert len(core._jobs.inflight) == 0


async def test_duplicates_compile_once(six_models: list[Path]) -> None:
    models = [six_models[0], str(six_models[0]), six_models[1], six_models[0]]
    async with aioov.Core() as core:
        results = await core.compile_all(models, "CPU")
        assert core.cache_stats.compiles == 2
    assert [r.index for r in results] == [0, 1, 2, 3]
    assert results[0].compiled is results[1].compiled is results[3].compiled


async def test_tuples_choose_device_and_config(six_models: list[Path]) -> None:
    async with aioov.Core() as core:
        results = await core.compile_all(
            [(six_models[0], "CPU", {"NUM_STREAMS": 2}), (six_models[1], "AUTO")], "CPU"
        )
        auto = next(name for name in AUTO_PRIORITY if name in core.get_available_devices())
    assert results[0].unwrap().get_property("NUM_STREAMS") == 2
    assert results[1].device == "AUTO" and results[1].unwrap().device == auto


async def test_a_mixture_of_hits_and_misses(six_models: list[Path], cache_dir: Path) -> None:
    async with aioov.Core(cache_dir=cache_dir) as core:
        await core.compile_all(six_models[:3], "CPU")
        await core.wait_exports()
        results = await core.compile_all(six_models, "CPU")
    assert [r.from_cache for r in results] == [True, True, True, False, False, False]


async def test_cancelling_a_bulk_load_leaves_no_half_written_entries(
    six_models: list[Path], cache_dir: Path, held_compiles: HeldCompiles
) -> None:
    started, release = held_compiles.started, held_compiles.release
    async with aioov.Core(cache_dir=cache_dir) as core:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def load() -> None:
                    await core.compile_all(six_models, "CPU", max_concurrency=2)

                tg.start_soon(load)
                await anyio.to_thread.run_sync(started.wait)
                scope.cancel()
        assert scope.cancelled_caught
        release.set()
        assert len(core._jobs.inflight) == 0
    assert list((cache_dir / "v1").glob("??/*")) == []
    assert list((cache_dir / "v1" / ".tmp").iterdir()) == []


async def test_breaking_out_early_releases_the_rest(six_models: list[Path]) -> None:
    async with aioov.Core(max_concurrent_compiles=2) as core:
        async with aclosing(core.compile_models(six_models, "CPU", max_concurrency=2)) as results:
            first = await results.__anext__()
        assert first.ok
        assert len(core._jobs.inflight) == 0  # the job still running was released and cancelled


async def test_models_another_process_is_compiling_are_loaded_last(six_models: list[Path], cache_dir: Path) -> None:
    """Bulk loads skip ahead of a model whose lock another process holds, then wait for it."""
    async with aioov.Core(cache_dir=cache_dir, properties={"CACHE_EXPORT": "SYNC"}) as core:
        key = (await core.compile_model(six_models[0], "CPU")).get_property("CACHE_KEY")
    aioov.CacheStore(cache_dir).remove(key)
    other_process = aioov.CacheStore(cache_dir).lock(key)  # a second file description
    assert other_process.try_acquire()
    order: list[int] = []
    async with aioov.Core(cache_dir=cache_dir) as core:

        async def release_once_waited_for() -> None:  # however slow the machine: no timer
            while core.cache_stats.lock_waits == 0:
                await anyio.sleep(0.01)
            other_process.release()

        with anyio.fail_after(120):
            async with anyio.create_task_group() as tg:
                tg.start_soon(release_once_waited_for)
                async for result in core.compile_models(six_models[:4], "CPU", max_concurrency=1):
                    order.append(result.index)
                    assert result.ok
        stats = core.cache_stats
    assert order == [1, 2, 3, 0]
    assert stats.lock_waits == 1
