"""A new model's compile begins while it is hashed: a first compile with a cache costs what an
uncached one does, not that plus blake3 over the whole model.

The hash comes first wherever a miss is not all but certain: a model of this size was hashed
for this cache before (a copy, a container's new inodes), other processes are loading from
it (workers compile each model once), or the builder compiles for the caller (``SYNC``).
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import aioov
from aioov._cache import cache as _face  # where the model is hashed: patched to watch it
from aioov._cache.locks import KeyLock
from aioov._cache.peers import Presence
from aioov._sessions import SessionFactory

from .helpers import manifests, reference

pytestmark = pytest.mark.anyio


def _x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)


class _HashWatch:
    """Records, when the model is hashed, whether its compile had begun; ``wait`` makes the
    hash wait for a compile to begin (up to 30 s) instead of only looking."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, wait: bool = False) -> None:
        self.began = threading.Event()
        self.compiling_while_hashed: list[bool] = []
        real_compile, real_digest = SessionFactory.compile, _face.digest_files

        def compile(factory: SessionFactory, *args: Any, **kwargs: Any) -> Any:
            self.began.set()
            return real_compile(factory, *args, **kwargs)

        def digest(paths: Any) -> str:
            self.compiling_while_hashed.append(self.began.wait(30) if wait else self.began.is_set())
            return real_digest(paths)

        monkeypatch.setattr(SessionFactory, "compile", compile)
        monkeypatch.setattr(_face, "digest_files", digest)


async def test_a_new_model_begins_compiling_while_it_is_hashed(
    cache_dir: Path, mlp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    watch = _HashWatch(monkeypatch, wait=True)  # without the early compile, this hash waits 30 s for nothing
    async with aioov.Core(cache_dir=cache_dir) as core:
        compiled = await core.compile_model(mlp_path, "CPU")
        assert await core.wait_exports(120)
        assert core.cache_stats.compiles == 1
    assert watch.compiling_while_hashed == [True]
    assert compiled.get_property("LOADED_FROM_CACHE") is False
    np.testing.assert_allclose((await compiled.infer({"x": _x()}))["y"], reference(mlp_path, {"x": _x()})[0],
                               rtol=1e-5)
    (manifest,) = manifests(cache_dir)  # and its entry is written and checked as usual
    assert manifest["build"]["check"] == "ran and matched"
    async with aioov.Core(cache_dir=cache_dir) as core:
        assert (await core.compile_model(mlp_path, "CPU")).get_property("LOADED_FROM_CACHE") is True


async def test_a_copy_of_a_cached_model_is_hashed_first_and_hits(
    cache_dir: Path, mlp_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with aioov.Core(cache_dir=cache_dir) as core:
        await core.compile_model(mlp_path, "CPU")
        assert await core.wait_exports(120)
    copy = tmp_path / "copy.onnx"  # another path and inode: the stat index knows nothing of it
    shutil.copyfile(mlp_path, copy)
    watch = _HashWatch(monkeypatch)
    async with aioov.Core(cache_dir=cache_dir) as core:
        compiled = await core.compile_model(copy, "CPU")
        assert core.cache_stats.compiles == 0
    assert watch.compiling_while_hashed == [False]
    assert compiled.get_property("LOADED_FROM_CACHE") is True


async def test_a_hit_found_after_an_early_start_is_still_a_hit(
    cache_dir: Path, bert_path: Path, ids: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with aioov.Core(cache_dir=cache_dir) as core:
        await core.compile_model(bert_path, "CPU")
        assert await core.wait_exports(120)
    for marker in (cache_dir / "v1" / ".index").glob("*.size"):
        marker.unlink()  # a cache written by an aioov that kept no sizes
    copy = tmp_path / "copy.onnx"
    shutil.copyfile(bert_path, copy)
    watch = _HashWatch(monkeypatch, wait=True)
    async with aioov.Core(cache_dir=cache_dir) as core:
        compiled = await core.compile_model(copy, "CPU")
    assert watch.compiling_while_hashed == [True]
    assert compiled.get_property("LOADED_FROM_CACHE") is True  # the early compile was dropped
    feed = {"input_ids": ids}
    np.testing.assert_allclose((await compiled.infer(feed))["last_hidden_state"], reference(bert_path, feed)[0],
                               rtol=1e-4, atol=1e-4)
    assert list((cache_dir / "v1" / ".index").glob("*.size")) != []  # hashed again: remembered now


@pytest.mark.parametrize("why", ["another process loads from the cache", "SYNC export", "a second tier", "a bulk load"])
async def test_the_hash_comes_first_where_others_wait_for_the_entry_or_may_have_it(
    cache_dir: Path, mlp_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, why: str
) -> None:
    watch = _HashWatch(monkeypatch)
    other = Presence(cache_dir / "v1" / ".locks" / "peers")  # as another worker's mark
    config: dict[str, object] = {
        "SYNC export": {"CACHE_EXPORT": "SYNC"},
        "a second tier": {"CACHE_REMOTE_URL": (tmp_path / "shared").as_uri()},  # other hosts' entries
    }.get(why, {})
    async with aioov.Core(cache_dir=cache_dir) as core:
        if why == "another process loads from the cache":
            (cache_dir / "v1" / ".locks").mkdir(parents=True, exist_ok=True)
            other.enter()
        try:
            if why == "a bulk load":
                (result,) = await core.compile_all([mlp_path], "CPU")
                assert result.compiled is not None
                compiled = result.compiled
            else:
                compiled = await core.compile_model(mlp_path, "CPU", config)
        finally:
            if why == "another process loads from the cache":
                other.leave()
        assert await core.wait_exports(120)
    assert watch.compiling_while_hashed == [False]
    assert compiled.get_property("LOADED_FROM_CACHE") is False
    assert len(manifests(cache_dir)) == 1


async def test_an_early_compile_does_not_wait_for_another_process_lock(
    cache_dir: Path, mlp_path: Path, tmp_path: Path
) -> None:
    async with aioov.Core(cache_dir=tmp_path / "elsewhere") as core:  # the key, learnt in another cache
        key = (await core.compile_model(mlp_path, "CPU")).get_property("CACHE_KEY")
    (cache_dir / "v1" / ".locks").mkdir(parents=True)
    held = KeyLock(cache_dir / "v1" / ".locks" / f"{key}.lock")  # as another process compiling it
    assert held.try_acquire()
    try:
        async with aioov.Core(cache_dir=cache_dir) as core:  # waiting, it would give up after 20 s
            compiled = await core.compile_model(mlp_path, "CPU", {"CACHE_LOCK_TIMEOUT": 20})
            assert await core.wait_exports(120)
            stats = core.cache_stats
    finally:
        held.release()
    # its own compile was under way: used at once, and the holder publishes the entry
    assert compiled.get_property("LOADED_FROM_CACHE") is False
    assert (stats.lock_waits, stats.compiles, stats.exports) == (0, 1, 0)
    assert manifests(cache_dir) == []


async def test_others_arriving_while_it_is_hashed_get_the_entry_at_once(
    cache_dir: Path, mlp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = Presence(cache_dir / "v1" / ".locks" / "peers")
    real_digest = _face.digest_files

    def digest(paths: Any) -> str:
        other.enter()  # another worker starts loading from the cache: it will wait for this model
        return real_digest(paths)

    monkeypatch.setattr(_face, "digest_files", digest)
    watch = _HashWatch(monkeypatch)
    try:
        async with aioov.Core(cache_dir=cache_dir) as core:
            await core.compile_model(mlp_path, "CPU")
            # published before the compile returned (a builder wrote it at once), not in the background
            assert [m["build"]["check"] for m in manifests(cache_dir)] == ["ran and matched"]
    finally:
        other.leave()
    assert watch.compiling_while_hashed == [True]  # it had begun early, and was dropped


async def test_a_model_with_external_weights_begins_early_and_its_copy_hits(
    cache_dir: Path, external_path: Path, ids: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    watch = _HashWatch(monkeypatch, wait=True)
    async with aioov.Core(cache_dir=cache_dir) as core:
        assert (await core.compile_model(external_path, "CPU")).get_property("LOADED_FROM_CACHE") is False
        assert await core.wait_exports(120)
    assert watch.compiling_while_hashed == [True]
    # the size that counts is the model's and its weights' together: a copy of both is known
    copy = tmp_path / "copy"
    shutil.copytree(external_path.parent, copy)
    monkeypatch.undo()
    watch = _HashWatch(monkeypatch)
    async with aioov.Core(cache_dir=cache_dir) as core:
        compiled = await core.compile_model(copy / external_path.name, "CPU")
    assert watch.compiling_while_hashed == [False]
    assert compiled.get_property("LOADED_FROM_CACHE") is True
    feed = {"input_ids": ids}
    np.testing.assert_allclose((await compiled.infer(feed))["last_hidden_state"],
                               reference(external_path, feed)[0], rtol=1e-4, atol=1e-4)
