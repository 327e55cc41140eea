"""``CACHE_HIT_MODE=INSTANT``: a CPU cache hit returns over a session that skips
repacking the weights, and the full-speed session, built from the same entry in the
background, takes over between inferences (#22)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import gc
import threading
import time
import weakref
from contextlib import aclosing
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest

import aioov
from aioov._jobs import CompileJobs

from .helpers import make_models, reference

pytestmark = pytest.mark.anyio

INSTANT = {"CACHE_HIT_MODE": "INSTANT"}


def _prepacking_disabled(session: Any) -> bool:
    """Whether the session was built with ``session.disable_prepacking=1`` (the instant one)."""
    options = session.get_session_options()
    try:
        return bool(options.get_session_config_entry("session.disable_prepacking") == "1")
    except RuntimeError:  # onnxruntime: "does not have configuration with key"
        return False


@pytest.fixture
def held_upgrades(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Full-speed sessions are not built until the test sets the event."""
    release = threading.Event()
    original = CompileJobs.background

    def background(self, work):  # type: ignore[no-untyped-def]
        def held(token: Any) -> Any:
            assert release.wait(30), "the test never released the upgrade"
            return work(token)

        return original(self, held)

    # why: the full-speed load follows the instant one at once; nothing public holds it back
    monkeypatch.setattr(CompileJobs, "background", background)
    return release


async def _cached(core: aioov.Core, path: Path) -> None:
    await core.compile_model(path, "CPU", {"CACHE_HIT_MODE": "FULL"})
    await core.wait_exports()


async def test_a_hit_serves_at_once_then_swaps_in_the_full_speed_session(
    bert_path: Path, cache_dir: Path, ids: np.ndarray, held_upgrades: threading.Event
) -> None:
    expected = reference(bert_path, {"input_ids": ids})[0]
    async with aioov.Core(cache_dir=cache_dir) as core:
        await _cached(core, bert_path)
        compiled = await core.compile_model(bert_path, "CPU", INSTANT)
        assert compiled.get_property("LOADED_FROM_CACHE") is True
        assert compiled.get_property("SESSION") == "INSTANT"
        instant = compiled.session
        assert _prepacking_disabled(instant)
        np.testing.assert_allclose((await compiled.infer({"input_ids": ids}))["last_hidden_state"], expected,
                                   rtol=1e-4, atol=1e-4)
        held_upgrades.set()
        await compiled.wait_full_speed()
        assert compiled.get_property("SESSION") == "FULL"
        full = compiled.session
        assert full is not instant
        assert not _prepacking_disabled(full)
        np.testing.assert_allclose((await compiled.infer({"input_ids": ids}))["last_hidden_state"], expected,
                                   rtol=1e-4, atol=1e-4)
        gone = weakref.ref(instant)
        del instant
        gc.collect()
        assert gone() is None  # the instant session is released once nothing runs on it


async def test_full_mode_the_default_returns_the_full_speed_session(bert_path: Path, cache_dir: Path) -> None:
    async with aioov.Core(cache_dir=cache_dir) as core:
        await _cached(core, bert_path)
        compiled = await core.compile_model(bert_path, "CPU")
        assert compiled.get_property("LOADED_FROM_CACHE") is True and compiled.get_property("SESSION") == "FULL"
        assert not _prepacking_disabled(compiled.session)


async def test_a_compile_that_is_no_hit_is_full_speed_at_once(bert_path: Path, cache_dir: Path) -> None:
    async with aioov.Core(cache_dir=cache_dir) as core:
        compiled = await core.compile_model(bert_path, "CPU", INSTANT)
        assert compiled.get_property("LOADED_FROM_CACHE") is False and compiled.get_property("SESSION") == "FULL"


async def test_closing_the_core_keeps_the_instant_session_serving(
    bert_path: Path, cache_dir: Path, ids: np.ndarray, held_upgrades: threading.Event
) -> None:
    core = aioov.Core(cache_dir=cache_dir)
    await _cached(core, bert_path)
    compiled = await core.compile_model(bert_path, "CPU", INSTANT)
    held_upgrades.set()
    await core.aclose()  # the upgrade is cancelled (or already done): either way the model serves
    await compiled.wait_full_speed()
    outputs = await compiled.infer({"input_ids": ids})
    np.testing.assert_allclose(outputs["last_hidden_state"], reference(bert_path, {"input_ids": ids})[0],
                               rtol=1e-4, atol=1e-4)


async def test_inferences_during_the_swap_all_succeed(bert_path: Path, cache_dir: Path, ids: np.ndarray) -> None:
    import anyio

    expected = reference(bert_path, {"input_ids": ids})[0]
    async with aioov.Core(cache_dir=cache_dir) as core:
        await _cached(core, bert_path)
        compiled = await core.compile_model(bert_path, "CPU", {**INSTANT, "NUM_STREAMS": 2})
        outputs: list[np.ndarray] = []

        async def serve() -> None:
            for _ in range(6):
                outputs.append((await compiled.infer({"input_ids": ids}))["last_hidden_state"])

        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            tg.start_soon(serve)
        await compiled.wait_full_speed()
        assert compiled.get_property("SESSION") == "FULL"
    assert len(outputs) == 12
    for output in outputs:
        np.testing.assert_allclose(output, expected, rtol=1e-4, atol=1e-4)


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Which sessions entries were opened as, in order: "instant" or "full"."""
    from aioov._reader import EntryReader

    order: list[str] = []
    original = EntryReader.open_blob

    def open_blob(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        instant = args[4] if len(args) > 4 else kwargs.get("instant", False)
        order.append("instant" if instant else "full")
        return original(self, *args, **kwargs)

    # why: nothing public records the order of the instant and full-speed loads
    monkeypatch.setattr(EntryReader, "open_blob", open_blob)
    return order


async def _cached_all(cache_dir: Path, paths: list[Path]) -> None:
    async with aioov.Core(cache_dir=cache_dir) as core:
        await core.compile_all(paths, "CPU")
        await core.wait_exports()


async def test_a_bulk_load_makes_every_model_ready_before_any_full_speed_load(
    tmp_path: Path, cache_dir: Path, opened: list[str]
) -> None:
    paths = make_models(tmp_path / "models", 4)
    await _cached_all(cache_dir, paths)
    opened.clear()
    async with aioov.Core(cache_dir=cache_dir) as core:
        results = await core.compile_all(paths, "CPU", INSTANT, max_concurrency=2)
        assert all(r.from_cache for r in results)
        for result in results:
            await result.unwrap().wait_full_speed()
            assert result.unwrap().get_property("SESSION") == "FULL"
    # On a few cores the full-speed loads would otherwise slow the instant hits still to come.
    assert opened == ["instant"] * 4 + ["full"] * 4


async def test_waiting_for_full_speed_inside_a_bulk_load_does_not_wait_for_the_bulk(
    tmp_path: Path, cache_dir: Path
) -> None:
    paths = make_models(tmp_path / "models", 3)
    await _cached_all(cache_dir, paths)
    async with aioov.Core(cache_dir=cache_dir) as core:
        async with aclosing(core.compile_models(paths, "CPU", INSTANT, max_concurrency=1)) as results:
            async for result in results:
                with anyio.fail_after(60):  # it would wait for the end of the loop it is in
                    await result.unwrap().wait_full_speed()
                assert result.unwrap().get_property("SESSION") == "FULL"


class Loads:
    """The entry loads of a test, in order: "instant", "instant done", "full"; an instant load
    can be made to wait until the full-speed one has begun (``instant_waits_for_full``)."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.full_started = threading.Event()
        self.full_tokens: list[Any] = []
        self.instant_waits_for_full = False
        self.instant_fails = False
        self.instant_waits_until: Any = None  # a condition polled before the instant load


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> Loads:
    from onnxruntime.capi.onnxruntime_pybind11_state import InvalidGraph

    from aioov._reader import EntryReader

    seen = Loads()
    original = EntryReader.open_blob

    def open_blob(self, folder, request, token, make_scratch, instant=False, variant="default"):  # type: ignore[no-untyped-def]
        if not instant:
            seen.order.append("full")
            seen.full_tokens.append(token)
            seen.full_started.set()
            return original(self, folder, request, token, make_scratch, instant, variant)
        seen.order.append("instant")
        if seen.instant_waits_until is not None:
            deadline = time.monotonic() + 30
            while not seen.instant_waits_until():
                assert time.monotonic() < deadline, "the condition the instant load waits for never came"
                time.sleep(0.01)
        if seen.instant_waits_for_full:
            assert seen.full_started.wait(30), "the full-speed load did not begin during the instant one"
        if seen.instant_fails:
            raise InvalidGraph("made to fail by the test")
        loaded = original(self, folder, request, token, make_scratch, instant, variant)
        seen.order.append("instant done")
        return loaded

    # why: the interleaving of the instant and full-speed loads (and an instant load that fails)
    # cannot be ordered or caused from outside; nothing public records it either
    monkeypatch.setattr(EntryReader, "open_blob", open_blob)
    return seen


async def test_a_hit_on_files_checked_before_loads_its_full_speed_session_beside_the_instant_one(
    bert_path: Path, cache_dir: Path, loads: Loads
) -> None:
    async with aioov.Core(cache_dir=cache_dir) as core:
        await _cached(core, bert_path)
        loads.order.clear()
        first = await core.compile_model(bert_path, "CPU", INSTANT)
        await first.wait_full_speed()
        # The entry's checksums were still to verify: its full-speed load waited for them.
        assert loads.order == ["instant", "instant done", "full"]

        loads.order.clear()
        loads.full_started.clear()
        loads.instant_waits_for_full = True
        again = await core.compile_model(bert_path, "CPU", INSTANT)
        await again.wait_full_speed()
        assert again.get_property("SESSION") == "FULL"
        assert sorted(loads.order) == ["full", "instant", "instant done"]
        assert loads.order.index("full") < loads.order.index("instant done")  # begun beside it


async def test_a_full_speed_load_begun_beside_an_instant_one_that_fails_is_stopped(
    bert_path: Path, cache_dir: Path, loads: Loads
) -> None:
    async with aioov.Core(cache_dir=cache_dir) as core:
        await _cached(core, bert_path)
        await (await core.compile_model(bert_path, "CPU", INSTANT)).wait_full_speed()  # checks the entry
        loads.order.clear()
        loads.full_started.clear()
        loads.instant_waits_for_full = loads.instant_fails = True
        compiled = await core.compile_model(bert_path, "CPU", INSTANT)
        # The entry that failed to load was set aside and the model compiled; the load begun
        # beside it was stopped (or failed, its files gone, or finished first: they may already
        # have been open) and its session went nowhere.
        assert compiled.get_property("LOADED_FROM_CACHE") is False
        assert compiled.get_property("SESSION") == "FULL"
        early = loads.full_tokens[-1].future
        with contextlib.suppress(concurrent.futures.CancelledError):
            assert early.result(timeout=60) is not compiled.session
        assert sorted(loads.order) == ["full", "instant"]


async def test_callers_sharing_an_instant_hit_share_its_full_speed_session(
    bert_path: Path, cache_dir: Path, loads: Loads
) -> None:
    async with aioov.Core(cache_dir=cache_dir) as core:
        await _cached(core, bert_path)
        loads.order.clear()
        # The hit waits until the second caller has joined it: one job for both.
        loads.instant_waits_until = lambda: core._jobs.inflight.joined >= 1
        compiled: list[aioov.CompiledModel] = []

        async def caller() -> None:
            compiled.append(await core.compile_model(bert_path, "CPU", INSTANT))

        async with anyio.create_task_group() as tg:
            tg.start_soon(caller)
            tg.start_soon(caller)
        for model in compiled:
            await model.wait_full_speed()
        first, second = compiled
        assert first is not second and first.session is second.session
        assert loads.order.count("full") == 1


async def test_a_warmed_up_instant_hit_warms_its_full_speed_session_too(
    bert_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import aioov._pipeline
    import aioov._reader
    from aioov._warmup import warm_up

    warmed: list[bool] = []  # per warm-up: whether it ran on the instant session

    def recording(session: Any, *args: Any) -> Any:
        warmed.append(_prepacking_disabled(session))
        return warm_up(session, *args)

    # why: nothing public tells which session (instant or full-speed) a warm-up ran on
    monkeypatch.setattr(aioov._pipeline, "warm_up", recording)
    # why: as above, for the warm-up of the full-speed session that replaces an instant one
    monkeypatch.setattr(aioov._reader, "warm_up", recording)
    async with aioov.Core(cache_dir=cache_dir) as core:
        await _cached(core, bert_path)
        warmed.clear()
        compiled = await core.compile_model(bert_path, "CPU", {**INSTANT, "WARMUP": 1})
        assert compiled.get_property("WARMED_UP") is True
        await compiled.wait_full_speed()
        assert compiled.get_property("SESSION") == "FULL"
    assert sorted(warmed) == [False, True]  # the instant session, then the full-speed one
