"""In-process de-duplication and cancellation of compiles."""

from __future__ import annotations

import threading
from pathlib import Path

import anyio
import numpy as np
import pytest

import aioov

from .helpers import HeldCompiles

pytestmark = pytest.mark.anyio


@pytest.fixture
def gate(held_compiles: HeldCompiles) -> threading.Event:
    """Hold every compile from the source model until the test opens the gate."""
    return held_compiles.release


async def test_twenty_identical_compiles_compile_once(bert_path: Path, cache_dir: Path) -> None:
    async with aioov.Core(cache_dir=cache_dir) as core:
        results: list[aioov.CompiledModel] = []

        async def one() -> None:
            results.append(await core.compile_model(bert_path, "CPU"))

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(one)
        assert core.cache_stats.compiles == 1
        assert core._jobs.inflight.started == 1 and core._jobs.inflight.joined == 19
    assert len(results) == 20
    assert {r.session for r in results} == {results[0].session}


async def test_identical_compiles_share_one_job_without_a_cache(mlp_path: Path, gate: threading.Event) -> None:
    async with aioov.Core() as core:
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(core.compile_model, mlp_path, "CPU")
            await anyio.wait_all_tasks_blocked()
            gate.set()
        assert core.cache_stats.compiles == 1


async def test_cancelling_one_caller_does_not_cancel_the_others(
    mlp_path: Path, cache_dir: Path, gate: threading.Event
) -> None:
    outcome: dict[str, object] = {}
    async with aioov.Core(cache_dir=cache_dir) as core:

        async def caller(name: str, scopes: dict[str, anyio.CancelScope]) -> None:
            with anyio.CancelScope() as scope:
                scopes[name] = scope
                outcome[name] = await core.compile_model(mlp_path, "CPU")
                return
            outcome[name] = "cancelled"

        scopes: dict[str, anyio.CancelScope] = {}
        async with anyio.create_task_group() as tg:
            for name in ("first", "second", "third"):
                tg.start_soon(caller, name, scopes)
            await anyio.wait_all_tasks_blocked()
            scopes["first"].cancel()
            await anyio.sleep(0.05)
            assert outcome == {"first": "cancelled"}
            gate.set()
        assert isinstance(outcome["second"], aioov.CompiledModel)
        assert isinstance(outcome["third"], aioov.CompiledModel) and outcome["third"] is not outcome["second"]
        assert core.cache_stats.compiles == 1
        y = await outcome["second"].infer(np.ones((1, 8), np.float32))  # type: ignore[union-attr]
        assert y["y"].shape == (1, 4)


async def test_when_every_caller_leaves_the_job_is_cancelled(
    mlp_path: Path, cache_dir: Path, gate: threading.Event
) -> None:
    async with aioov.Core(cache_dir=cache_dir) as core:
        with anyio.move_on_after(0.2):
            await core.compile_model(mlp_path, "CPU")
        assert len(core._jobs.inflight) == 0  # forgotten: a new caller starts afresh
        gate.set()
        compiled = await core.compile_model(mlp_path, "CPU")
        assert compiled.get_property("LOADED_FROM_CACHE") is False
        await core.wait_exports()
    assert len(list((cache_dir / "v1").glob("??/*"))) == 1


async def test_an_error_reaches_every_waiter_and_is_not_remembered(tmp_path: Path, mlp_path: Path) -> None:
    path = tmp_path / "later.onnx"
    path.write_bytes(b"not yet a model")
    errors: list[BaseException] = []
    async with aioov.Core() as core:

        async def one() -> None:
            try:
                await core.compile_model(path, "CPU")
            except aioov.ModelReadError as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(one)
        assert len(errors) == 5
        path.write_bytes(mlp_path.read_bytes())
        compiled = await core.compile_model(path, "CPU")
    assert compiled.inputs[0].name == "x"


async def test_different_keys_never_wait_for_each_other(
    mlp_path: Path, bert_path: Path, cache_dir: Path, caplog_warnings
) -> None:
    async with aioov.Core(cache_dir=cache_dir) as core:
        probe = await core.compile_model(bert_path, "CPU", {"CACHE_EXPORT": "SYNC"})
        key = probe.get_property("CACHE_KEY")
        for entry in (cache_dir / "v1").glob("??/*"):
            import shutil

            shutil.rmtree(entry)
        # Someone else (another file description: as good as another process) compiles bert.
        holder = core._pipeline.cache(str(cache_dir)).store.lock(key)  # type: ignore[union-attr]
        assert holder.try_acquire()
        try:
            other = await core.compile_model(mlp_path, "CPU")  # not blocked by bert's lock
            assert other.get_property("LOADED_FROM_CACHE") is False
            waited = await core.compile_model(bert_path, "CPU", {"CACHE_LOCK_TIMEOUT": 0.3})
        finally:
            holder.release()
        stats = core.cache_stats
    assert waited.get_property("LOADED_FROM_CACHE") is False
    assert stats.lock_waits == 1 and stats.lock_timeouts == 1
    assert "compiling without the cache" in caplog_warnings.text


def test_the_last_waiter_forgets_a_finished_job_before_its_callback_runs() -> None:
    """A worker thread sets a future's result before it runs the done-callbacks: in between,
    the job is done but not yet forgotten. The last waiter to leave forgets it then."""
    import concurrent.futures

    from aioov._jobs import Inflight

    class LateCallbacks(concurrent.futures.Future):  # type: ignore[type-arg]
        def add_done_callback(self, fn):  # type: ignore[no-untyped-def]
            self.pending_callback = fn  # never run: the worker thread has not got there yet

    inflight = Inflight()
    future = LateCallbacks()
    job = inflight.join("model", lambda token: future)
    future.set_result("session")
    assert job.future.done() and len(inflight) == 1
    inflight.leave(job)
    assert len(inflight) == 0
    assert inflight.join("model", lambda token: concurrent.futures.Future()) is not job
