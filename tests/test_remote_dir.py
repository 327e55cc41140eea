"""The ``file://`` remote tier: a directory shared by hosts (NFS, a mounted volume)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import aioov

from .helpers import make_models, manifests, reference

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_models(tmp_path_factory.mktemp("dir_remote"), 1)[0]


async def test_hosts_share_entries_through_a_directory(model: Path, tmp_path: Path) -> None:
    shared = {"CACHE_REMOTE_URL": (tmp_path / "shared").as_uri()}
    async with aioov.Core(cache_dir=tmp_path / "host-a", properties=shared) as core:
        await core.compile_model(model, "CPU")
        await core.wait_exports()
        assert core.cache_stats.uploads == 1
    (entry,) = list((tmp_path / "shared" / "v1").iterdir())
    assert sorted(p.name for p in entry.iterdir()) == ["manifest.json", "model.onnx", "weights.bin"]
    async with aioov.Core(cache_dir=tmp_path / "host-b", properties=shared) as core:
        compiled = await core.compile_model(model, "CPU")
        assert (core.cache_stats.remote_hits, core.cache_stats.compiles) == (1, 0)
        ids = np.arange(6, dtype=np.int64).reshape(1, 6)
        got = (await compiled.infer(ids))["last_hidden_state"]
    np.testing.assert_allclose(got, reference(model, {"input_ids": ids})[0], rtol=1e-4, atol=1e-4)


async def test_a_damaged_shared_entry_is_not_served(model: Path, tmp_path: Path, caplog_warnings) -> None:
    shared = {"CACHE_REMOTE_URL": (tmp_path / "shared").as_uri()}
    async with aioov.Core(cache_dir=tmp_path / "a", properties=shared) as core:
        await core.compile_model(model, "CPU")
    (entry,) = list((tmp_path / "shared" / "v1").iterdir())
    weights = entry / "weights.bin"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 3] ^= 0x01
    weights.write_bytes(bytes(raw))
    async with aioov.Core(cache_dir=tmp_path / "b", properties=shared) as core:
        compiled = await core.compile_model(model, "CPU")
    assert compiled.get_property("LOADED_FROM_CACHE") is False
    assert "checksum mismatch" in caplog_warnings.text


async def test_a_manifest_naming_files_outside_the_entry_is_refused(model: Path, tmp_path: Path,
                                                                    caplog_warnings) -> None:
    shared = {"CACHE_REMOTE_URL": (tmp_path / "shared").as_uri()}
    async with aioov.Core(cache_dir=tmp_path / "a", properties=shared) as core:
        await core.compile_model(model, "CPU")
    (entry,) = list((tmp_path / "shared" / "v1").iterdir())
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest["files"]["../../../etc/passwd"] = {"size": 1, "xxh3_128": "0"}
    (entry / "manifest.json").write_text(json.dumps(manifest))
    async with aioov.Core(cache_dir=tmp_path / "b", properties=shared) as core:
        compiled = await core.compile_model(model, "CPU")
    assert compiled.get_property("LOADED_FROM_CACHE") is False
    assert "bad file name" in caplog_warnings.text


async def test_an_upload_never_holds_up_the_compile(model: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Even an entry published on the caller's path (``CACHE_EXPORT=SYNC``) is uploaded after."""
    import threading

    from aioov._cache.remote import remote_for  # the one client of this URL: the only way to make its upload slow

    shared = (tmp_path / "shared").as_uri()
    remote = remote_for(shared)
    real, release, uploaded = remote.upload, threading.Event(), threading.Event()

    def slow_upload(key: str, entry: Path) -> bool:
        release.wait(60)  # a slow link: until the test has seen the compile return
        done = real(key, entry)
        uploaded.set()
        return done

    # why: a slow link to a directory remote cannot be made here; only the upload is held back
    monkeypatch.setattr(remote, "upload", slow_upload)
    async with aioov.Core(cache_dir=tmp_path / "host", properties={"CACHE_REMOTE_URL": shared}) as core:
        await core.compile_model(model, "CPU", {"CACHE_EXPORT": "SYNC"})
        assert len(manifests(tmp_path / "host")) == 1  # published on its path...
        assert not uploaded.is_set()  # ...and not uploaded yet: the caller did not wait for it
        assert core.pending_exports == 1
        release.set()
        assert await core.wait_exports(60)
        assert uploaded.is_set() and core.cache_stats.uploads == 1


# -- #41.3: shared entries are bounded and repaired -----------------------------------------
async def test_a_damaged_shared_entry_is_replaced_by_the_host_that_rejected_it(model: Path, tmp_path: Path,
                                                                               caplog_warnings) -> None:
    shared = {"CACHE_REMOTE_URL": (tmp_path / "shared").as_uri()}
    async with aioov.Core(cache_dir=tmp_path / "a", properties=shared) as core:
        await core.compile_model(model, "CPU")
        await core.wait_exports()
    (entry,) = list((tmp_path / "shared" / "v1").iterdir())
    weights = entry / "weights.bin"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 3] ^= 0x01
    weights.write_bytes(bytes(raw))
    async with aioov.Core(cache_dir=tmp_path / "b", properties=shared) as core:
        assert (await core.compile_model(model, "CPU")).get_property("LOADED_FROM_CACHE") is False
        await core.wait_exports()
        assert core.cache_stats.uploads == 1  # it did not find "an entry there already"
    assert "checksum mismatch" in caplog_warnings.text
    assert [p.name for p in (tmp_path / "shared" / "v1").iterdir()] == [entry.name]  # nothing left aside
    async with aioov.Core(cache_dir=tmp_path / "c", properties=shared) as core:
        compiled = await core.compile_model(model, "CPU")
        assert (core.cache_stats.remote_hits, core.cache_stats.compiles) == (1, 0)
    assert compiled.get_property("LOADED_FROM_CACHE") is True


@pytest.mark.parametrize("name", ["manifest.json", "weights.bin"])
async def test_a_shared_file_larger_than_its_bound_is_not_copied(name: str, model: Path, tmp_path: Path) -> None:
    """A manifest past the local 1 MiB cap, a file past the size its manifest records: refused
    before they are read (they were read, or copied, whole)."""
    from aioov._cache.remote import DirectoryRemote, RemoteError

    shared = (tmp_path / "shared").as_uri()
    async with aioov.Core(cache_dir=tmp_path / "a", properties={"CACHE_REMOTE_URL": shared}) as core:
        await core.compile_model(model, "CPU")
        await core.wait_exports()
    (entry,) = list((tmp_path / "shared" / "v1").iterdir())
    if name == "manifest.json":
        manifest = json.loads((entry / name).read_text())
        (entry / name).write_text(json.dumps({**manifest, "padding": " " * (2 << 20)}))  # valid, but 2 MiB
    else:
        with open(entry / name, "ab") as f:
            f.truncate(64 << 20)
    store = aioov.CacheStore(tmp_path / "fresh")
    store.ensure()
    with pytest.raises(RemoteError, match="larger than|its manifest records"):
        DirectoryRemote(shared).fetch(entry.name, store)
    assert store.lookup(entry.name) is None and not list(store.tmp.iterdir())


# -- #41.8: a key rotation across hosts ------------------------------------------------------
async def test_a_host_rotating_keys_uses_entries_signed_with_its_old_key(model: Path, tmp_path: Path,
                                                                         caplog_warnings) -> None:
    """A host given ``["new", "old"]`` downloads and serves a shared entry signed with "old"
    (it rejected it, "manifest MAC does not verify", and recompiled); a host holding neither
    key neither serves nor replaces it: not damaged, only not its own."""
    shared = (tmp_path / "shared").as_uri()
    async with aioov.Core(cache_dir=tmp_path / "old", properties={"CACHE_REMOTE_URL": shared,
                                                                   "CACHE_HMAC_KEY": "old"}) as core:
        await core.compile_model(model, "CPU")
        await core.wait_exports()
        assert core.cache_stats.uploads == 1
    (entry,) = list((tmp_path / "shared" / "v1").iterdir())
    before = {p.name: p.read_bytes() for p in entry.iterdir()}
    async with aioov.Core(cache_dir=tmp_path / "stranger", properties={"CACHE_REMOTE_URL": shared,
                                                                        "CACHE_HMAC_KEY": "other"}) as core:
        assert (await core.compile_model(model, "CPU")).get_property("LOADED_FROM_CACHE") is False
        await core.wait_exports()
        assert core.cache_stats.uploads == 0  # not repaired: another key's entry
    assert {p.name: p.read_bytes() for p in entry.iterdir()} == before
    caplog_warnings.clear()
    async with aioov.Core(cache_dir=tmp_path / "rotating", properties={"CACHE_REMOTE_URL": shared,
                                                                        "CACHE_HMAC_KEY": ["new", "old"]}) as core:
        compiled = await core.compile_model(model, "CPU")
        await core.wait_exports()
        stats = core.cache_stats
        ids = np.arange(6, dtype=np.int64).reshape(1, 6)
        got = (await compiled.infer(ids))["last_hidden_state"]
    assert compiled.get_property("LOADED_FROM_CACHE") is True
    assert (stats.remote_hits, stats.compiles, stats.uploads) == (1, 0, 0)
    assert "MAC" not in caplog_warnings.text
    assert {p.name: p.read_bytes() for p in entry.iterdir()} == before
    np.testing.assert_allclose(got, reference(model, {"input_ids": ids})[0], rtol=1e-4, atol=1e-4)
