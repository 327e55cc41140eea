"""Export off the critical path: compile_model returns first, the entry appears later."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

import aioov
from aioov.testing import bert_like

pytestmark = pytest.mark.anyio


def entries(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "v1").glob("??/*"))


@pytest.fixture
def slow_builder(monkeypatch: pytest.MonkeyPatch) -> None:
    """Builders take 1.8 s longer to write and check a blob (the builder's fault switch), so an
    export is still running for a good while after the compile that started it returned."""
    monkeypatch.setenv("AIOOV_BUILDER_FAULT", "slow:plain")


async def test_compile_returns_before_the_export_is_published(
    mlp_path: Path, cache_dir: Path, slow_builder: None
) -> None:
    async with aioov.Core(cache_dir=cache_dir) as core:
        compiled = await core.compile_model(mlp_path, "CPU")
        assert compiled.get_property("LOADED_FROM_CACHE") is False
        assert core.pending_exports == 1
        assert entries(cache_dir) == []  # not yet: the export is still running
        assert await core.wait_exports(timeout=30)
        assert core.pending_exports == 0
        (entry,) = entries(cache_dir)
        store = aioov.CacheStore(cache_dir)
        found = store.lookup(entry.name)
        assert found is not None and store.verify(found) is None


async def test_sync_export_publishes_before_returning(mlp_path: Path, cache_dir: Path) -> None:
    async with aioov.Core(cache_dir=cache_dir, properties={"CACHE_EXPORT": "SYNC"}) as core:
        await core.compile_model(mlp_path, "CPU")
        assert core.pending_exports == 0
        assert len(entries(cache_dir)) == 1


async def test_aclose_waits_for_pending_exports(bert_path: Path, cache_dir: Path) -> None:
    core = aioov.Core(cache_dir=cache_dir)
    await core.compile_model(bert_path, "CPU")
    await core.aclose()
    assert len(entries(cache_dir)) == 1
    assert list((cache_dir / "v1" / ".tmp").iterdir()) == []


async def test_abandoned_export_leaves_nothing_half_written(tmp_path: Path, cache_dir: Path) -> None:
    """aclose(abandon=True) stops the export inside ONNX Runtime (load cancellation flag)."""
    path = tmp_path / "big.onnx"
    onnx.save(bert_like(layers=12, hidden=384, heads=6, vocab=8000, seed=9), path)
    core = aioov.Core(cache_dir=cache_dir)
    await core.compile_model(path, "CPU")
    assert core.pending_exports == 1
    await core.aclose(abandon=True)
    assert entries(cache_dir) == []
    assert list((cache_dir / "v1" / ".tmp").iterdir()) == []
    key_locks = list((cache_dir / "v1" / ".locks").iterdir())
    assert key_locks and all(aioov.CacheStore(cache_dir).lock(p.stem).try_acquire() for p in key_locks)


async def test_aclose_timeout_abandons_what_is_left(mlp_path: Path, cache_dir: Path, slow_builder: None) -> None:
    core = aioov.Core(cache_dir=cache_dir)
    await core.compile_model(mlp_path, "CPU")
    await core.aclose(timeout=0.2)  # the export's builder is still at work
    assert entries(cache_dir) == []
    assert list((cache_dir / "v1" / ".tmp").iterdir()) == []


async def test_a_second_core_waits_for_the_first_ones_entry_no_longer_than_its_compile(
    mlp_path: Path, cache_dir: Path, slow_builder: None
) -> None:
    """The key lock is held until the entry is published; another compiler waits for it, but
    no longer than the first one's compile took (the builder writing the entry takes longer):
    then it compiles the model itself, and the entry is still written once."""
    async with aioov.Core(cache_dir=cache_dir) as first, aioov.Core(cache_dir=cache_dir) as second:
        await first.compile_model(mlp_path, "CPU")  # its export's builder is still at work
        compiled = await second.compile_model(mlp_path, "CPU")
        assert compiled.get_property("LOADED_FROM_CACHE") is False
        assert second.cache_stats.lock_waits == 1 and second.cache_stats.lock_timeouts == 0
        assert await first.wait_exports(120) and await second.wait_exports(120)
        assert (first.cache_stats.exports, second.cache_stats.exports) == (1, 0)
    assert len(entries(cache_dir)) == 1
