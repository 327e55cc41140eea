"""The model cache: hits and misses, what enters the key, integrity, and failures that
must never break a compile."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

import aioov
from aioov.testing import bert_like, mlp

from .helpers import manifests, reference, run_python

pytestmark = pytest.mark.anyio


def entries(cache_dir: Path) -> list[Path]:
    return sorted(p for p in (cache_dir / "v1").glob("??/*") if p.is_dir())


async def compile_twice(
    path: Path, cache_dir: Path, config: dict[str, object] | None = None
) -> tuple[aioov.CompiledModel, aioov.CompiledModel, aioov.CacheStats]:
    async with aioov.Core(cache_dir=cache_dir) as core:
        first = await core.compile_model(path, "CPU", config)
        await core.wait_exports()
        second = await core.compile_model(path, "CPU", config)
        return first, second, core.cache_stats


async def test_without_cache_dir_nothing_is_written(mlp_path: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    async with aioov.Core() as core:
        compiled = await core.compile_model(mlp_path, "CPU")
    assert compiled.get_property("CACHE_KEY") is None
    assert list(tmp_path.iterdir()) == []


async def test_second_compile_is_loaded_from_cache(bert_path: Path, cache_dir: Path, ids: np.ndarray) -> None:
    first, second, stats = await compile_twice(bert_path, cache_dir)
    assert first.get_property("LOADED_FROM_CACHE") is False
    assert second.get_property("LOADED_FROM_CACHE") is True
    assert (stats.misses, stats.hits, stats.compiles, stats.exports) == (1, 1, 1, 1)
    (entry,) = entries(cache_dir)
    assert sorted(p.name for p in entry.iterdir()) == ["manifest.json", "model.onnx", "weights.bin"]
    assert (cache_dir / "CACHEDIR.TAG").read_text().startswith("Signature: 8a477f597d28d172789f06886806bc55")
    expected = reference(bert_path, {"input_ids": ids})[0]
    for compiled in (first, second):
        got = (await compiled.infer({"input_ids": ids}))["last_hidden_state"]
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


async def test_cached_real_cnn_gives_the_same_outputs(pypi_model_path: Path, cache_dir: Path) -> None:
    """DenseNet's convolutions are rewritten to CPU-specific layouts in the blob."""
    x = np.random.default_rng(5).standard_normal((1, 3, 224, 224), dtype=np.float32)
    first, second, _ = await compile_twice(pypi_model_path, cache_dir)
    assert second.get_property("LOADED_FROM_CACHE")
    a = await first.infer([x])
    b = await second.infer([x])
    np.testing.assert_allclose(list(b.values())[0], list(a.values())[0], rtol=1e-5, atol=1e-6)


async def test_a_second_process_hits_the_cache(bert_path: Path, cache_dir: Path) -> None:
    code = """
import sys, anyio, aioov
async def main():
    async with aioov.Core(cache_dir=sys.argv[1]) as core:
        compiled = await core.compile_model(sys.argv[2], "CPU")
        print(compiled.get_property("LOADED_FROM_CACHE"))
anyio.run(main)
"""
    outputs = [run_python(code, str(cache_dir), str(bert_path)).stdout.strip() for _ in range(2)]
    assert outputs == ["False", "True"]


async def test_external_data_models_are_cached(external_path: Path, cache_dir: Path, ids: np.ndarray) -> None:
    first, second, _ = await compile_twice(external_path, cache_dir)
    assert second.get_property("LOADED_FROM_CACHE")
    np.testing.assert_allclose(
        (await second.infer(ids))["last_hidden_state"],
        reference(external_path, {"input_ids": ids})[0], rtol=1e-4, atol=1e-4,
    )


async def test_changing_the_model_file_misses(tmp_path: Path, cache_dir: Path) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(mlp(seed=1), path)
    x = np.ones((1, 8), np.float32)
    async with aioov.Core(cache_dir=cache_dir) as core:
        await core.compile_model(path, "CPU")
        await core.wait_exports()
        onnx.save(mlp(seed=2), path)  # same structure and size, other weights
        changed = await core.compile_model(path, "CPU")
        assert changed.get_property("LOADED_FROM_CACHE") is False
        np.testing.assert_array_equal((await changed.infer(x))["y"], reference(path, {"x": x})[0])
        await core.wait_exports()
        assert len(entries(cache_dir)) == 2


async def test_changing_external_data_misses(tmp_path: Path, cache_dir: Path) -> None:
    from aioov.testing import save_with_external_data

    path = save_with_external_data(bert_like(2, 64, 4, vocab=300, seed=1), tmp_path / "e.onnx")
    async with aioov.Core(cache_dir=cache_dir) as core:
        first = await core.compile_model(path, "CPU")
        await core.wait_exports()
        data = tmp_path / "e.onnx.data"
        raw = bytearray(data.read_bytes())
        raw[100:104] = b"\x00\x00\x80\x3f"
        data.write_bytes(bytes(raw))
        second = await core.compile_model(path, "CPU")
    assert second.get_property("LOADED_FROM_CACHE") is False
    assert second.get_property("CACHE_KEY") != first.get_property("CACHE_KEY")


async def test_touching_the_file_rehashes_and_still_hits(mlp_path: Path, tmp_path: Path, cache_dir: Path) -> None:
    path = tmp_path / "m.onnx"
    shutil.copy(mlp_path, path)
    async with aioov.Core(cache_dir=cache_dir) as core:
        first = await core.compile_model(path, "CPU")
        await core.wait_exports()
        os.utime(path, ns=(1, 1))  # a new stat, same content
        second = await core.compile_model(path, "CPU")
    assert second.get_property("LOADED_FROM_CACHE")
    assert second.get_property("CACHE_KEY") == first.get_property("CACHE_KEY")


async def test_a_warm_hit_does_not_read_the_model(mlp_path: Path, tmp_path: Path, cache_dir: Path) -> None:
    """The stat index answers; the model file's bytes are not opened (checked by making
    them unreadable to the scanner: a hit must not need them)."""
    path = tmp_path / "m.onnx"
    shutil.copy(mlp_path, path)
    async with aioov.Core(cache_dir=cache_dir) as core:
        await core.compile_model(path, "CPU")
        await core.wait_exports()
    import aioov._pipeline as core_module

    def boom(*args: object) -> None:
        raise AssertionError("the model file was read on a warm hit")

    original = core_module.check_model_file
    core_module.check_model_file = boom  # type: ignore[assignment]
    try:
        async with aioov.Core(cache_dir=cache_dir) as core:
            compiled = await core.compile_model(path, "CPU")
    finally:
        core_module.check_model_file = original
    assert compiled.get_property("LOADED_FROM_CACHE")


@pytest.mark.parametrize(
    "config",
    [{"ORT_GRAPH_OPTIMIZATION_LEVEL": "BASIC"}, {"CACHE_PREPACK": False},
     {"ORT_SESSION_CONFIG": {"session.disable_aot_function_inlining": "1"}}],
    ids=["optimization-level", "prepack", "session-config"],
)
async def test_config_that_changes_the_blob_changes_the_key(mlp_path: Path, cache_dir: Path, config) -> None:
    async with aioov.Core(cache_dir=cache_dir) as core:
        a = await core.compile_model(mlp_path, "CPU")
        await core.wait_exports()
        b = await core.compile_model(mlp_path, "CPU", config)
    assert a.get_property("CACHE_KEY") != b.get_property("CACHE_KEY")
    assert b.get_property("LOADED_FROM_CACHE") is False


@pytest.mark.parametrize(
    "config",
    [{"INFERENCE_NUM_THREADS": 1}, {"PERFORMANCE_HINT": "THROUGHPUT"}, {"NUM_STREAMS": 3},
     {"CACHE_VERIFY": "SIZE"}],
)
async def test_config_that_does_not_change_the_blob_keeps_the_key(mlp_path: Path, cache_dir: Path, config) -> None:
    async with aioov.Core(cache_dir=cache_dir) as core:
        a = await core.compile_model(mlp_path, "CPU")
        await core.wait_exports()
        b = await core.compile_model(mlp_path, "CPU", config)
    assert a.get_property("CACHE_KEY") == b.get_property("CACHE_KEY")
    assert b.get_property("LOADED_FROM_CACHE") is True


async def test_set_property_cache_dir_like_openvino(mlp_path: Path, cache_dir: Path) -> None:
    core = aioov.Core()
    core.set_property({"CACHE_DIR": str(cache_dir)})
    assert core.get_property("CACHE_DIR") == str(cache_dir)
    await core.compile_model(mlp_path, "CPU")
    await core.aclose()  # waits for the export
    assert len(entries(cache_dir)) == 1


async def test_per_compile_cache_dir(mlp_path: Path, cache_dir: Path) -> None:
    async with aioov.Core() as core:
        await core.compile_model(mlp_path, "CPU", {"CACHE_DIR": cache_dir})
    assert len(entries(cache_dir)) == 1


# -- integrity ----------------------------------------------------------------------------


def corrupt_weights(entry: Path) -> None:
    weights = entry / "weights.bin"
    raw = bytearray(weights.read_bytes())
    for offset in range(len(raw) // 3, len(raw) // 3 + 64):
        raw[offset] ^= 0xFF
    weights.write_bytes(bytes(raw))


def truncate_weights(entry: Path) -> None:
    weights = entry / "weights.bin"
    weights.write_bytes(weights.read_bytes()[:-100])


def bad_json_manifest(entry: Path) -> None:
    (entry / "manifest.json").write_text("{not json")


def wrong_types_manifest(entry: Path) -> None:
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest["files"]["weights.bin"]["size"] = "big"
    (entry / "manifest.json").write_text(json.dumps(manifest))


def other_onnxruntime(entry: Path) -> None:
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest["onnxruntime"] = "0.0.1"
    (entry / "manifest.json").write_text(json.dumps(manifest))


def missing_manifest(entry: Path) -> None:
    (entry / "manifest.json").unlink()


def corrupt_graph(entry: Path) -> None:
    model = entry / "model.onnx"
    model.write_bytes(model.read_bytes()[:-10] + b"\xff" * 10)


def symlinked_weights(entry: Path) -> None:
    weights = entry / "weights.bin"
    outside = entry.parent.parent.parent.parent / "outside.bin"
    weights.rename(outside)
    weights.symlink_to(outside)


@pytest.mark.parametrize(
    "damage",
    [corrupt_weights, truncate_weights, bad_json_manifest, wrong_types_manifest, other_onnxruntime,
     missing_manifest, corrupt_graph, symlinked_weights],
)
async def test_a_damaged_entry_is_discarded_and_recompiled(
    bert_path: Path, cache_dir: Path, ids: np.ndarray, damage, caplog_warnings
) -> None:
    async with aioov.Core(cache_dir=cache_dir) as core:
        await core.compile_model(bert_path, "CPU")
        await core.wait_exports()
        (entry,) = entries(cache_dir)
        damage(entry)
        compiled = await core.compile_model(bert_path, "CPU")
        assert compiled.get_property("LOADED_FROM_CACHE") is False
        assert core.cache_stats.corrupt == 1
        got = (await compiled.infer(ids))["last_hidden_state"]
        await core.wait_exports()
        again = await core.compile_model(bert_path, "CPU")
    assert again.get_property("LOADED_FROM_CACHE") is True  # re-exported, good this time
    np.testing.assert_allclose(got, reference(bert_path, {"input_ids": ids})[0], rtol=1e-4, atol=1e-4)
    assert "discarding entry" in caplog_warnings.text


async def test_verify_size_trades_checksums_for_speed(bert_path: Path, cache_dir: Path) -> None:
    """CACHE_VERIFY=SIZE does not read the weights: flipped bytes go unnoticed (documented)."""
    async with aioov.Core(cache_dir=cache_dir) as core:
        await core.compile_model(bert_path, "CPU")
        await core.wait_exports()
        corrupt_weights(entries(cache_dir)[0])
        compiled = await core.compile_model(bert_path, "CPU", {"CACHE_VERIFY": "SIZE"})
        assert compiled.get_property("LOADED_FROM_CACHE") is True
        truncate_weights(entries(cache_dir)[0])
        compiled = await core.compile_model(bert_path, "CPU", {"CACHE_VERIFY": "SIZE"})
        assert compiled.get_property("LOADED_FROM_CACHE") is False


# -- failures never break a compile ----------------------------------------------------------


async def test_cache_dir_that_cannot_be_created(mlp_path: Path, tmp_path: Path, caplog_warnings) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache dir should be")
    async with aioov.Core(cache_dir=blocker / "cache") as core:
        compiled = await core.compile_model(mlp_path, "CPU")
        again = await core.compile_model(mlp_path, "CPU")
        stats = core.cache_stats
    assert not compiled.get_property("LOADED_FROM_CACHE") and not again.get_property("LOADED_FROM_CACHE")
    assert stats.errors >= 1
    assert caplog_warnings.text.count("compiling without the cache") == 1  # warned once


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs: a real small disk. Needs root and mount permission."""
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


async def test_disk_full_compiles_uncached_and_leaves_nothing(bert_path: Path, tmpfs: Path, caplog_warnings) -> None:
    assert bert_path.stat().st_size > 4 * 1024 * 1024  # bigger than the disk
    async with aioov.Core(cache_dir=tmpfs) as core:
        compiled = await core.compile_model(bert_path, "CPU")
        await core.wait_exports()
        stats = core.cache_stats
    assert compiled.get_property("LOADED_FROM_CACHE") is False
    assert stats.exports == 0 and stats.errors >= 1
    assert entries(tmpfs) == []
    assert list((tmpfs / "v1" / ".tmp").iterdir()) == []


async def test_read_only_cache_dir_still_compiles(mlp_path: Path, tmpfs: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    async with aioov.Core(cache_dir=tmpfs / "cache") as core:
        compiled = await core.compile_model(mlp_path, "CPU")
        assert (await compiled.infer(np.ones((1, 8), np.float32)))["y"].shape == (1, 4)


async def test_read_only_prebuilt_cache_serves_hits(mlp_path: Path, tmpfs: Path) -> None:
    """A cache baked into an image and mounted read-only still answers."""
    async with aioov.Core(cache_dir=tmpfs) as core:
        await core.compile_model(mlp_path, "CPU")
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    async with aioov.Core(cache_dir=tmpfs) as core:
        compiled = await core.compile_model(mlp_path, "CPU")
    assert compiled.get_property("LOADED_FROM_CACHE") is True


def test_file_size_limit_in_a_subprocess(bert_path: Path, cache_dir: Path) -> None:
    """RLIMIT_FSIZE makes every large write fail with EFBIG: no privileges needed."""
    code = """
import resource, signal, sys, anyio, aioov, logging
logging.basicConfig(level=logging.WARNING)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))
async def main():
    async with aioov.Core(cache_dir=sys.argv[1]) as core:
        compiled = await core.compile_model(sys.argv[2], "CPU")
        await core.wait_exports()
        print(compiled.get_property("LOADED_FROM_CACHE"), core.cache_stats.exports, core.cache_stats.errors)
anyio.run(main)
"""
    proc = run_python(code, str(cache_dir), str(bert_path))
    assert proc.stdout.split() == ["False", "0", "1"]
    assert "not cached" in proc.stderr or "failed" in proc.stderr
    assert entries(cache_dir) == []
    assert list((cache_dir / "v1" / ".tmp").iterdir()) == []


async def test_symlinked_entry_dir_is_not_followed(mlp_path: Path, cache_dir: Path, tmp_path: Path) -> None:
    async with aioov.Core(cache_dir=cache_dir) as core:
        await core.compile_model(mlp_path, "CPU")
        await core.wait_exports()
        (entry,) = entries(cache_dir)
        elsewhere = tmp_path / "elsewhere"
        entry.rename(elsewhere)
        entry.symlink_to(elsewhere, target_is_directory=True)
        compiled = await core.compile_model(mlp_path, "CPU")
    assert compiled.get_property("LOADED_FROM_CACHE") is False
    assert elsewhere.is_dir()  # the link was removed, not what it pointed to


async def test_cache_max_size_prunes_least_recently_used_after_publishing(
    tmp_path: Path, cache_dir: Path
) -> None:
    paths = []
    for seed in range(3):
        path = tmp_path / f"m{seed}.onnx"
        onnx.save(bert_like(2, 64, 4, vocab=300, seed=seed), path)
        paths.append(path)
    async with aioov.Core(cache_dir=cache_dir) as core:
        await core.compile_model(paths[0], "CPU")
        await core.wait_exports()
        one_entry = aioov.CacheStore(cache_dir).scan().size
        core.set_property({"CACHE_MAX_SIZE": int(one_entry * 2.5)})
        for path in paths[1:]:
            await core.compile_model(path, "CPU")
            await core.wait_exports()
    sources = [Path(e.source or "").name for e in aioov.CacheStore(cache_dir).scan().entries]
    assert sorted(sources) == ["m1.onnx", "m2.onnx"]  # m0, used least recently, was pruned


async def test_locks_that_cannot_be_taken_compile_uncached_and_hits_still_work(
    mlp_path: Path, bert_path: Path, cache_dir: Path, caplog_warnings
) -> None:
    async with aioov.Core(cache_dir=cache_dir) as core:
        await core.compile_model(mlp_path, "CPU")
    locks = cache_dir / "v1" / ".locks"
    shutil.rmtree(locks)
    locks.write_text("a file where the lock directory should be: every lock open fails")
    async with aioov.Core(cache_dir=cache_dir) as core:
        hit = await core.compile_model(mlp_path, "CPU")  # readers go on without the shared lock
        miss = await core.compile_model(bert_path, "CPU")
        stats = core.cache_stats
    assert hit.get_property("LOADED_FROM_CACHE") is True
    assert miss.get_property("LOADED_FROM_CACHE") is False
    assert stats.errors >= 1
    assert "compiling without the cache" in caplog_warnings.text


async def test_checksums_run_once_per_entry_and_core_while_the_files_are_unchanged(
    bert_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aioov._cache.store import CacheStore

    checked: list[list[str] | None] = []
    original = CacheStore.verify

    def counting(self, entry, names=None):  # type: ignore[no-untyped-def]
        checked.append(names)
        return original(self, entry, names)

    # why: nothing public counts checksum runs (a hit is a hit, checked or not)
    monkeypatch.setattr(CacheStore, "verify", counting)
    async with aioov.Core(cache_dir=cache_dir) as core:
        await core.compile_model(bert_path, "CPU")
        await core.wait_exports()
        for _ in range(3):
            assert (await core.compile_model(bert_path, "CPU")).get_property("LOADED_FROM_CACHE")
        assert len(checked) == 2  # graph, then weights: on the first load only
        corrupt_weights(entries(cache_dir)[0])  # a rewrite: new mtime
        again = await core.compile_model(bert_path, "CPU")
        assert again.get_property("LOADED_FROM_CACHE") is False and core.cache_stats.corrupt == 1


async def test_export_and_import_a_model_given_as_a_proto(tmp_path: Path) -> None:
    """Bytes and ModelProtos are serialized and scanned in the job's thread, not on the loop."""
    proto = mlp(seed=4)
    x = np.ones((3, 8), np.float32)
    async with aioov.Core() as core:
        compiled = await core.compile_model(proto, "CPU")
        with pytest.raises(aioov.PropertyError, match="does not keep"):  # it does not hold the proto
            await compiled.export_model(tmp_path / "blob")
        await core.export_model(proto, tmp_path / "blob", "CPU")
        imported = await core.import_model(tmp_path / "blob", "CPU")
        np.testing.assert_allclose((await imported.infer(x))["y"], (await compiled.infer(x))["y"], rtol=1e-6)
        with pytest.raises(aioov.CacheError, match="already exists"):
            await core.export_model(proto.SerializeToString(), tmp_path / "blob")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda blob: (blob / "manifest.json").write_text("[]"), "not an aioov blob"),
        (lambda blob: (blob / "manifest.json").unlink(), "not an aioov blob"),
        (lambda blob: (blob / "manifest.json").write_text(
            json.dumps({**json.loads((blob / "manifest.json").read_text()), "key_inputs": "x"})),
         "another device, configuration or machine"),
        (corrupt_graph, "damaged: model.onnx checksum mismatch"),
    ],
    ids=["not-an-object", "no-manifest", "bad-key-inputs", "flipped-bytes"],
)
async def test_import_model_refuses_bad_blobs_with_cache_error(tmp_path: Path, damage, message: str) -> None:
    blob = tmp_path / "blob"
    async with aioov.Core() as core:
        await core.export_model(mlp(), blob, "CPU")
        damage(blob)
        with pytest.raises(aioov.CacheError, match=message):
            await core.import_model(blob, "CPU")


async def test_import_model_on_a_device_that_cannot_import(tmp_path: Path) -> None:
    from aioov._devices import DeviceRegistry
    from aioov._devices.cpu import CPUDevice

    class NoExportCPU(CPUDevice):
        blob = None

    async with aioov.Core() as core:
        await core.export_model(mlp(), tmp_path / "blob", "CPU")
    async with aioov.Core(devices=DeviceRegistry([NoExportCPU()])) as core:
        with pytest.raises(aioov.CacheError, match="cannot import"):
            await core.import_model(tmp_path / "blob", "CPU")


# -- checksums ------------------------------------------------------------------------------


async def published(model: Path, cache_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The one entry a compile of ``model`` publishes, and its manifest."""
    async with aioov.Core(cache_dir=cache_dir) as core:
        await core.compile_model(model, "CPU")
        await core.wait_exports()
    (entry,) = entries(cache_dir)
    return entry, json.loads((entry / "manifest.json").read_text())


async def test_every_file_of_an_entry_has_its_checksum_and_a_flip_is_caught(
    bert_path: Path, cache_dir: Path
) -> None:
    from aioov._cache.fsutil import checksum_record
    from aioov._cache.store import CacheStore

    entry, manifest = await published(bert_path, cache_dir)
    assert manifest["files"] == {f.name: checksum_record(f) for f in entry.iterdir() if f.name != "manifest.json"}
    store = CacheStore(cache_dir)
    assert store.check(entry.name) is None
    corrupt_weights(entry)
    assert store.check(entry.name) == "weights.bin checksum mismatch"


async def test_a_manifest_from_a_version_that_also_recorded_parts_is_still_read(
    bert_path: Path, cache_dir: Path
) -> None:
    """aioov before #39 recorded the digests of 64 MiB parts beside the whole file's: ignored."""
    entry, manifest = await published(bert_path, cache_dir)
    manifest["files"]["weights.bin"]["xxh3_128_parts"] = {"part": 64 << 20, "digests": ["0" * 32]}
    (entry / "manifest.json").write_text(json.dumps(manifest))
    async with aioov.Core(cache_dir=cache_dir) as core:
        again = await core.compile_model(bert_path, "CPU")
    assert again.get_property("LOADED_FROM_CACHE") is True


def test_a_writer_record_is_taken_only_when_it_fits_the_file(tmp_path: Path) -> None:
    from aioov._cache.fsutil import checksum_record, reusable_record

    small = tmp_path / "small"
    small.write_bytes(b"x" * 1000)
    assert reusable_record(small, checksum_record(small)) == checksum_record(small)
    assert reusable_record(small, {**checksum_record(small), "size": 999}) is None  # another file
    for junk in (None, "abc", {"size": 1000}, {"size": 1000, "xxh3_128": 5}):
        assert reusable_record(small, junk) is None


async def test_a_compiled_model_does_not_keep_its_core_alive(mlp_path: Path, tmp_path: Path) -> None:
    """A model outlives the Core that compiled it without holding the Core's threads and caches;
    ``export_model`` then says what happened."""
    import gc
    import weakref

    core = aioov.Core()
    compiled = await core.compile_model(mlp_path, "CPU")
    await compiled.export_model(tmp_path / "blob")  # the Core is alive: it exports
    await core.aclose()
    gone = weakref.ref(core)
    del core
    gc.collect()
    assert gone() is None
    x = np.ones((2, 8), np.float32)
    assert (await compiled.infer(x))["y"].shape[0] == 2  # the model still serves
    with pytest.raises(aioov.AioovError, match="is gone"):
        await compiled.export_model(tmp_path / "again")


async def test_an_entry_larger_than_the_size_limit_is_never_written_again(mlp_path: Path, cache_dir: Path) -> None:
    """It would be pruned at once and written again by every start: a record says so instead,
    and is made again once the limit grows."""
    async def compile(limit: str | None) -> tuple[aioov.CompiledModel, aioov.CacheStats]:
        props = {"CACHE_MAX_SIZE": limit} if limit else {}
        async with aioov.Core(cache_dir=cache_dir, properties=props) as core:
            compiled = await core.compile_model(mlp_path, "CPU")
            await core.wait_exports()
        return compiled, core.cache_stats

    await compile("1K")  # smaller than the entry
    (manifest,) = manifests(cache_dir)
    assert manifest["not_cacheable"]["kind"] == "too-big"
    again, stats = await compile("1K")
    assert "larger than CACHE_MAX_SIZE" in str(again.get_property("NOT_CACHED_REASON")) and stats.exports == 0
    await compile(None)  # no limit now: decided again, and cached
    assert [m["build"]["variant"] for m in manifests(cache_dir)] == ["plain"]
    assert (await compile(None))[0].get_property("LOADED_FROM_CACHE") is True
