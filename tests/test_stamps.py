"""Verification stamps: checksums are verified once per host and file identity, not per process."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anyio
import pytest

import aioov
from aioov._cache import stamps
from aioov._cache import store as store_module

from .test_cache import corrupt_weights, entries, published

pytestmark = pytest.mark.anyio


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The entry files a hit checksums (each name once per verification)."""
    from aioov._cache.fsutil import checksum_matches as real

    seen: list[str] = []

    def counted(path: Path, record: dict[str, object]) -> bool:
        seen.append(path.name)
        return real(path, record)

    # why: nothing public tells which files a hit hashed (a stamp spares it, and the result is the same)
    monkeypatch.setattr(store_module, "checksum_matches", counted)
    return seen


async def settled(model: Path, cache_dir: Path) -> Path:
    """The entry ``published`` makes of ``model``, once its files are ``SETTLE`` seconds old
    (files written more recently are not stamped)."""
    entry, _ = await published(model, cache_dir)
    await anyio.sleep(stamps.SETTLE + 0.1)
    return entry


async def hit(model: Path, cache_dir: Path) -> aioov.CacheStats:
    """A hit in a new Core, as a new process would make it (nothing remembered in memory)."""
    async with aioov.Core(cache_dir=cache_dir) as core:
        compiled = await core.compile_model(model, "CPU")
        assert compiled.get_property("LOADED_FROM_CACHE") or core.cache_stats.corrupt
        return core.cache_stats


async def test_an_entry_verified_once_is_not_hashed_again_while_its_files_are_unchanged(
    bert_path: Path, cache_dir: Path, hashed: list[str]
) -> None:
    entry = await settled(bert_path, cache_dir)
    await hit(bert_path, cache_dir)
    assert sorted(hashed) == ["model.onnx", "weights.bin"] and (entry / stamps.STAMP).is_file()
    hashed.clear()
    await hit(bert_path, cache_dir)
    assert hashed == []


async def test_a_file_rewritten_after_its_stamp_is_verified_again_even_with_its_mtime_put_back(
    bert_path: Path, cache_dir: Path, hashed: list[str]
) -> None:
    entry = await settled(bert_path, cache_dir)
    await hit(bert_path, cache_dir)
    weights = entry / "weights.bin"
    before = weights.stat()
    corrupt_weights(entry)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size and mtime: only ctime tells
    hashed.clear()
    stats = await hit(bert_path, cache_dir)
    assert "weights.bin" in hashed and stats.corrupt == 1  # (and compiled again)


async def test_files_written_moments_ago_are_not_stamped(
    bert_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # why: the real window (SETTLE, 2 s) is outlasted between the publish and the hit on a slow machine
    monkeypatch.setattr(stamps, "SETTLE", 3600.0)  # "moments": however slow this machine is
    entry, _ = await published(bert_path, cache_dir)
    await hit(bert_path, cache_dir)  # verified, but a rewrite inside one timestamp tick could hide
    assert not (entry / stamps.STAMP).exists()


async def test_an_expired_stamp_means_verifying_again_and_renewing_it(
    bert_path: Path, cache_dir: Path, hashed: list[str]
) -> None:
    entry = await settled(bert_path, cache_dir)
    await hit(bert_path, cache_dir)
    stamp_file = entry / stamps.STAMP
    data = json.loads(stamp_file.read_text())
    data["verified_at"] -= stamps.MAX_AGE + 60
    stamp_file.write_text(json.dumps(data))
    hashed.clear()
    await hit(bert_path, cache_dir)
    assert "weights.bin" in hashed
    assert json.loads(stamp_file.read_text())["verified_at"] > data["verified_at"] + stamps.MAX_AGE


@pytest.mark.parametrize("junk", [b"", b"not json", b"[]", b'{"verified_at": "soon", "files": {}}',
                                  b'{"verified_at": 1e300, "files": {}}'])
async def test_a_malformed_stamp_is_ignored(
    bert_path: Path, cache_dir: Path, hashed: list[str], junk: bytes
) -> None:
    entry, _ = await published(bert_path, cache_dir)
    (entry / stamps.STAMP).write_bytes(junk)
    stats = await hit(bert_path, cache_dir)
    assert "weights.bin" in hashed and stats.hits == 1 and stats.corrupt == 0


async def test_cache_verify_reads_no_stamp(bert_path: Path, cache_dir: Path) -> None:
    """Bits a disk flips under an unchanged inode are what a stamp cannot see; ``cache verify``
    (``CacheStore.check``) always hashes."""
    entry = await settled(bert_path, cache_dir)
    await hit(bert_path, cache_dir)
    corrupt_weights(entry)
    await anyio.sleep(stamps.SETTLE + 0.1)  # settled again: the stamp below is written
    key = entry.name
    store = store_module.CacheStore(cache_dir)
    looked_up = store.lookup(key, check_sizes=True)
    assert looked_up is not None
    files = stamps.identities(looked_up)
    assert files is not None
    stamps.stamp(looked_up, files)  # as if nothing had touched the file
    assert store.check(key) == "weights.bin checksum mismatch"


async def test_authenticated_caches_check_macs_on_every_load_and_leave_no_stamp(
    bert_path: Path, cache_dir: Path
) -> None:
    config = {"CACHE_HMAC_KEY": "k" * 32}
    async with aioov.Core(cache_dir=cache_dir) as core:
        await core.compile_model(bert_path, "CPU", config)
        await core.wait_exports()
    (entry,) = entries(cache_dir)
    await anyio.sleep(stamps.SETTLE + 0.1)  # settled: only the MAC keeps a stamp away
    async with aioov.Core(cache_dir=cache_dir) as core:
        compiled = await core.compile_model(bert_path, "CPU", config)
        assert compiled.get_property("LOADED_FROM_CACHE")
    assert not (entry / stamps.STAMP).exists()


async def test_a_manifest_that_lists_the_stamp_as_a_blob_file_is_a_bad_entry(bert_path: Path, cache_dir: Path) -> None:
    """Else writing a stamp would overwrite a file the entry is made of."""
    entry, _ = await published(bert_path, cache_dir)
    (entry / stamps.STAMP).write_bytes(b"{}")
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest["files"][stamps.STAMP] = {"size": 2, "xxh3_128": "0" * 32}
    (entry / "manifest.json").write_text(json.dumps(manifest))
    assert "bad file record" in (store_module.CacheStore(cache_dir).check(entry.name) or "")
