"""A cache directory is shared, so aioov treats what it finds there as untrusted input (#23).

Each test plants what a careless or hostile user of the directory could: symlinks out of the
tree, FIFOs, forged records, nested JSON, stray names. aioov must never touch anything outside
the cache, never block, never serve another model, and never raise anything but AioovError.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

import aioov
from aioov._cache.store import CacheStore
from aioov.testing import mlp

from .helpers import compile_in_a_process, reference, run_python

pytestmark = pytest.mark.anyio

X = np.random.default_rng(3).standard_normal((2, 64), dtype=np.float32)
HOUR_AGO = time.time() - 3600


def _model(path: Path, seed: int) -> Path:
    onnx.save(mlp(64, 64, 4, seed=seed), path)
    return path


def _entries(cache_dir: Path) -> list[Path]:
    return sorted((cache_dir / "v1").glob("??/*"))


def _decoy(tmp_path: Path) -> Path:
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (decoy / "thesis.tex").write_text("years of work")
    os.utime(decoy / "thesis.tex", (HOUR_AGO, HOUR_AGO))
    return decoy


def _cli(*args: str, timeout: float = 60) -> tuple[int, str]:
    code = "import sys; from aioov.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = run_python(code, *args, check=False, timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr




def _compile_in_a_process(cache_dir: Path, model: Path) -> dict[str, object]:
    """In a fresh process with a timeout: a hang fails the test instead of hanging the suite."""
    from_cache, y = compile_in_a_process(cache_dir, model, X)
    np.testing.assert_allclose(y, reference(model, {"x": X})[0], rtol=1e-5)
    return {"from_cache": from_cache}


@pytest.fixture
def cached(tmp_path: Path, cache_dir: Path) -> Path:
    """A model with an entry in ``cache_dir``, compiled by a separate process."""
    model = _model(tmp_path / "a.onnx", seed=1)
    assert _compile_in_a_process(cache_dir, model)["from_cache"] is False
    return model


# -- nothing outside the cache is touched -----------------------------------------------------


@pytest.mark.parametrize("command", [["clear", "--yes"], ["prune", "--max-size", "0"], ["verify"]])
def test_maintenance_never_follows_a_symlinked_tmp_out_of_the_cache(
    command: list[str], cached: Path, cache_dir: Path, tmp_path: Path
) -> None:
    decoy = _decoy(tmp_path)
    tmp = cache_dir / "v1" / ".tmp"
    for leftover in tmp.iterdir():
        leftover.rmdir()
    tmp.rmdir()
    tmp.symlink_to(decoy)
    status, output = _cli("cache", *command, "--cache-dir", str(cache_dir))
    assert (decoy / "thesis.tex").read_text() == "years of work"
    assert status == 1 and "symlink" in output


def test_clear_refuses_a_folder_that_is_not_a_cache(tmp_path: Path) -> None:
    folder = tmp_path / "not-a-cache"
    (folder / "v1" / ".tmp").mkdir(parents=True)
    (folder / "v1" / ".tmp" / "notes.txt").write_text("mine")
    os.utime(folder / "v1" / ".tmp" / "notes.txt", (HOUR_AGO, HOUR_AGO))
    status, output = _cli("cache", "clear", "--yes", "--cache-dir", str(folder))
    assert status == 1 and "not an aioov cache" in output
    assert (folder / "v1" / ".tmp" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("link", ["v1/.locks", "v1/.tmp", "v1/.index"])
async def test_a_symlinked_directory_in_the_tree_disables_the_cache(
    link: str, tmp_path: Path, cache_dir: Path
) -> None:
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (cache_dir / "v1").mkdir(parents=True)
    (cache_dir / "CACHEDIR.TAG").write_text("Signature: 8a477f597d28d172789f06886806bc55\n")
    (cache_dir / link).symlink_to(decoy)
    model = _model(tmp_path / "a.onnx", seed=1)
    async with aioov.Core(cache_dir=cache_dir) as core:
        compiled = await core.compile_model(model, "CPU")
        assert compiled.get_property("LOADED_FROM_CACHE") is False
    assert list(decoy.iterdir()) == []  # no lock file, no temp dir, no index record out there
    assert _entries(cache_dir) == []


async def test_a_symlinked_shard_receives_no_entry(tmp_path: Path, cache_dir: Path) -> None:
    model = _model(tmp_path / "a.onnx", seed=1)
    async with aioov.Core(cache_dir=tmp_path / "elsewhere", properties={"CACHE_EXPORT": "SYNC"}) as core:
        key = (await core.compile_model(model, "CPU")).get_property("CACHE_KEY")
    CacheStore(cache_dir).ensure()
    decoy = tmp_path / "decoy"
    decoy.mkdir()
    (cache_dir / "v1" / key[:2]).symlink_to(decoy)
    async with aioov.Core(cache_dir=cache_dir, properties={"CACHE_EXPORT": "SYNC"}) as core:
        await core.compile_model(model, "CPU")
        again = await core.compile_model(model, "CPU")
    assert again.get_property("LOADED_FROM_CACHE") is False
    assert list(decoy.iterdir()) == []


# -- no hang --------------------------------------------------------------------------------


def test_a_fifo_in_tmp_hangs_neither_a_compile_nor_clear(cached: Path, cache_dir: Path) -> None:
    fifo = cache_dir / "v1" / ".tmp" / "x"
    os.mkfifo(fifo)
    os.utime(fifo, (HOUR_AGO, HOUR_AGO))
    assert _compile_in_a_process(cache_dir, cached)["from_cache"] is True
    status, output = _cli("cache", "clear", "--yes", "--cache-dir", str(cache_dir))
    assert status == 0, output
    assert not os.path.lexists(fifo)


@pytest.mark.parametrize("where", ["manifest", "entry", "index"])
def test_a_fifo_in_place_of_a_cache_file_is_recompiled_not_waited_on(
    where: str, cached: Path, cache_dir: Path
) -> None:
    (entry,) = _entries(cache_dir)
    if where == "manifest":
        (entry / "manifest.json").unlink()
        os.mkfifo(entry / "manifest.json")
    elif where == "entry":
        for file in entry.iterdir():
            file.unlink()
        entry.rmdir()
        os.mkfifo(entry)
    else:
        (record,) = (cache_dir / "v1" / ".index").glob("*.json")
        record.unlink()
        os.mkfifo(record)
    report = _compile_in_a_process(cache_dir, cached)
    assert report["from_cache"] is (where == "index")  # a lost index record only costs a hash
    status, output = _cli("cache", "ls", "--cache-dir", str(cache_dir))
    assert status == 0, output


# -- no wrong model -------------------------------------------------------------------------


async def test_a_forged_stat_index_record_does_not_serve_another_model_under_a_key(
    tmp_path: Path, cache_dir: Path
) -> None:
    a, b = _model(tmp_path / "a.onnx", seed=1), _model(tmp_path / "b.onnx", seed=2)
    props = {"CACHE_HMAC_KEY": "secret"}
    async with aioov.Core(cache_dir=cache_dir, properties=props) as core:
        await core.compile_model(a, "CPU")
        await core.compile_model(b, "CPU")
    records = {json.loads(p.read_text())["files"][0]["path"]: p for p in (cache_dir / "v1" / ".index").glob("*.json")}
    forged = json.loads(records[str(a)].read_text())
    forged["digest"] = json.loads(records[str(b)].read_text())["digest"]  # a's stats → b's model
    records[str(a)].write_text(json.dumps(forged))
    async with aioov.Core(cache_dir=cache_dir, properties=props) as core:
        compiled = await core.compile_model(a, "CPU")
        np.testing.assert_allclose((await compiled.infer({"x": X}))["y"], reference(a, {"x": X})[0], rtol=1e-5)
    records[str(a)].write_text(json.dumps(forged))
    code = "import sys; from aioov.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = run_python(code, "cache", "verify", "--cache-dir", str(cache_dir), check=False,
                      env={"AIOOV_CACHE_HMAC_KEY": "secret"})
    assert proc.returncode == 1 and "stat index record" in proc.stdout
    # signed under none of its keys: another key's (a rotation) or forged, never used, kept (#41.8)
    assert records[str(a)].exists()
    run_python(code, "cache", "verify", "--delete-foreign", "--cache-dir", str(cache_dir), check=False,
               env={"AIOOV_CACHE_HMAC_KEY": "secret"})
    assert not records[str(a)].exists()


def _function_model(folder: Path) -> Path:
    """A model whose only weights are a Constant inside a model-local function, stored in
    ``data.bin`` beside it."""
    from onnx import TensorProto, helper

    folder.mkdir()
    (folder / "data.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    for key, value in {"location": "data.bin", "offset": "0", "length": "16"}.items():
        weight.external_data.add(key=key, value=value)
    function = helper.make_function(
        "local", "AddW", ["x"], ["y"],
        [helper.make_node("Constant", [], ["w"], value=weight), helper.make_node("Add", ["x", "w"], ["y"])],
        [helper.make_opsetid("", 17)],
    )
    graph = helper.make_graph(
        [helper.make_node("AddW", ["x"], ["y"], domain="local")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    model = helper.make_model(graph, functions=[function],
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    path = folder / "f.onnx"
    onnx.save(model, path)
    return path


async def test_external_data_inside_a_local_function_is_part_of_the_key(tmp_path: Path) -> None:
    path = _function_model(tmp_path / "fn")
    async with aioov.Core() as core:
        model = await core.read_model(path)
        assert model.external_data_files == [str(path.parent / "data.bin")]
        before = model.digest()
        (path.parent / "data.bin").write_bytes(np.ones(4, dtype=np.float32).tobytes())
        assert (await core.read_model(path)).digest() != before
        with pytest.raises(aioov.ModelReadError, match="external data"):
            await core.read_model(path.read_bytes())  # bytes may not read files beside anything


# -- robustness ------------------------------------------------------------------------------


def test_deeply_nested_json_is_a_broken_record_not_a_crash(cached: Path, cache_dir: Path) -> None:
    (entry,) = _entries(cache_dir)
    (record,) = (cache_dir / "v1" / ".index").glob("*.json")
    nested = "[" * 200_000 + "]" * 200_000
    (entry / "manifest.json").write_text(nested)
    record.write_text(nested)
    assert _compile_in_a_process(cache_dir, cached)["from_cache"] is False
    assert _compile_in_a_process(cache_dir, cached)["from_cache"] is True  # rebuilt, index too
    for command in (["ls"], ["stats"], ["verify"]):
        status, output = _cli("cache", *command, "--cache-dir", str(cache_dir))
        assert status == 0 and "Traceback" not in output, output


async def test_stray_names_and_odd_manifest_fields_do_not_break_maintenance(
    tmp_path: Path, cache_dir: Path
) -> None:
    model = _model(tmp_path / "a.onnx", seed=1)
    async with aioov.Core(cache_dir=cache_dir, properties={"CACHE_MAX_SIZE": "1G"}) as core:
        key = (await core.compile_model(model, "CPU")).get_property("CACHE_KEY")
        await core.wait_exports()
    (cache_dir / "v1" / key[:2] / ".DS_Store_dir").mkdir()
    (cache_dir / "v1" / "zz-not-a-shard").mkdir()
    entry = cache_dir / "v1" / key[:2] / key
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest.update(created="x", source="x")
    (entry / "manifest.json").write_text(json.dumps(manifest))
    for command in (["ls"], ["stats"], ["verify", "--dry-run"], ["prune", "--max-size", "10G"]):
        status, output = _cli("cache", *command, "--cache-dir", str(cache_dir))
        assert status == 0 and "Traceback" not in output, output
    # and a compile that prunes after publishing still succeeds
    async with aioov.Core(cache_dir=cache_dir, properties={"CACHE_MAX_SIZE": "1"}) as core:
        other = await core.compile_model(_model(tmp_path / "b.onnx", seed=2), "CPU")
        await core.wait_exports()
    np.testing.assert_allclose((await other.infer({"x": X}))["y"], reference(tmp_path / "b.onnx", {"x": X})[0],
                               rtol=1e-5)
    status, output = _cli("cache", "clear", "--yes", "--cache-dir", str(cache_dir))
    assert status == 0, output


async def test_a_cache_directory_deleted_under_a_running_core_is_rebuilt(tmp_path: Path, cache_dir: Path) -> None:
    import shutil

    model = _model(tmp_path / "a.onnx", seed=1)
    async with aioov.Core(cache_dir=cache_dir) as core:
        await core.compile_model(model, "CPU")
        await core.wait_exports()
        shutil.rmtree(cache_dir)
        await core.compile_model(model, "CPU")
        await core.wait_exports()
        assert (await core.compile_model(model, "CPU")).get_property("LOADED_FROM_CACHE") is True


async def test_clearing_the_cache_never_truncates_a_file_a_session_has_mapped(cached: Path, cache_dir: Path) -> None:
    async with aioov.Core(cache_dir=cache_dir) as core:
        compiled = await core.compile_model(cached, "CPU")
        assert compiled.get_property("LOADED_FROM_CACHE") is True
        await compiled.wait_full_speed()  # no load in progress: the entry is free to clear
        (entry,) = _entries(cache_dir)
        with open(entry / "weights.bin", "rb") as held:
            size = os.fstat(held.fileno()).st_size
            assert CacheStore(cache_dir).clear() == 1
            assert os.fstat(held.fileno()).st_size == size  # unlinked, not truncated
        np.testing.assert_allclose((await compiled.infer({"x": X}))["y"], reference(cached, {"x": X})[0], rtol=1e-5)


def test_the_cli_refuses_a_second_cache_dir_in_config_and_a_folder_of_other_files(tmp_path: Path) -> None:
    model = _model(tmp_path / "a.onnx", seed=1)
    status, output = _cli("compile", str(model), "-c", f"CACHE_DIR={tmp_path / 'x'}",
                          "--cache-dir", str(tmp_path / "y"), "-q")
    assert status == 2 and "--cache-dir" in output
    assert not (tmp_path / "x").exists()
    home = tmp_path / "home"
    home.mkdir()
    (home / "photo.jpg").write_bytes(b"\xff\xd8")
    status, output = _cli("compile", str(model), "--cache-dir", str(home), "-q")
    assert status == 2 and "not an aioov cache" in output
    assert sorted(p.name for p in home.iterdir()) == ["photo.jpg"]  # no CACHEDIR.TAG dropped in


@pytest.mark.parametrize("props", [
    {"CACHE_LOCK_TIMEOUT": float("nan")},  # a wait that would never time out
    {"CACHE_REMOTE_LOCK_TTL": "nan"},
    {"INFERENCE_NUM_THREADS": 2**32},  # onnxruntime's TypeError, before
])
def test_values_that_would_hang_or_crash_are_property_errors(props: dict[str, object]) -> None:
    with pytest.raises(aioov.PropertyError):
        aioov.Core(properties=props)


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX ownership and modes")
@pytest.mark.parametrize("setup", ["another user's", "writable by all", "shared by our group", "with a key"])
async def test_a_cache_directory_someone_else_controls_is_not_used(tmp_path: Path, setup: str,
                                                                   caplog_warnings) -> None:
    """Whoever creates the cache directory first (in /tmp, say) would decide what is served:
    like ssh and git's safe.directory, aioov uses only a directory this user (or root) owns,
    or one deliberately shared (setgid, of one of its groups), not writable by all, unless
    entries are authenticated (CACHE_HMAC_KEY)."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    props: dict[str, object] = {}
    if setup in ("another user's", "shared by our group"):
        if os.geteuid() != 0:
            pytest.skip("making a directory another user owns needs root")
        os.chown(cache_dir, 12345, os.getegid())
        if setup == "shared by our group":
            cache_dir.chmod(0o2775)
    elif setup == "writable by all":
        cache_dir.chmod(0o777)
    else:
        cache_dir.chmod(0o777)
        props["CACHE_HMAC_KEY"] = "secret"
    model = _model(tmp_path / "m.onnx", seed=3)
    async with aioov.Core(cache_dir=cache_dir, properties=props) as core:
        compiled = await core.compile_model(model, "CPU")
        np.testing.assert_allclose((await compiled.infer({"x": X}))["y"], reference(model, {"x": X})[0], rtol=1e-5)
        await core.wait_exports()
    used = setup in ("shared by our group", "with a key")
    assert (compiled.get_property("CACHE_KEY") is not None) is used
    assert bool(list(cache_dir.rglob("manifest.json"))) is used
    assert ("not using" in caplog_warnings.text) is not used


_FEW_FILES = """
import resource, sys, anyio, aioov
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[2]), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
async def main():
    async with aioov.Core(cache_dir=sys.argv[1]) as core:
        results = await core.compile_all(sys.argv[3:], "CPU")
        await core.wait_exports()
    print(sum(r.ok for r in results), [str(r.error)[:120] for r in results if not r.ok][:3])
anyio.run(main)
"""


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="counts open files through Linux's /proc")
@pytest.mark.parametrize("limit", [32, 96])
def test_a_low_open_file_limit_never_makes_a_compile_fail(tmp_path: Path, cache_dir: Path, limit: int) -> None:
    """Near ``ulimit -n`` the cache steps aside (each compile through it holds a lock file and a
    builder's pipes): every model compiles, as it does without a cache."""
    paths = [str(_model(tmp_path / f"m{seed}.onnx", seed=seed)) for seed in range(30)]
    proc = run_python(_FEW_FILES, str(cache_dir), str(limit), *paths, timeout=300)
    assert proc.stdout.split()[0] == "30", proc.stdout
