"""Reliability and security: authentication, fuzzed models, crashes at random points, stress.

The long versions run with ``-m slow`` (e.g. ``AIOOV_TRIALS=100 pytest -m slow``); CI runs
short ones.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aioov
from aioov._onnx_scan import ScanError, scan_bytes
from aioov.testing import bert_like, mlp

from .helpers import aioov_command, child_env, make_models, reference, run_python

TRIALS = int(os.environ.get("AIOOV_TRIALS", "100"))


def entries(cache_dir: Path) -> list[Path]:
    return sorted(p for p in (cache_dir / "v1").glob("??/*") if p.is_dir())


def every_entry_verifies(cache_dir: Path) -> None:
    store = aioov.CacheStore(cache_dir)
    for key in store.keys():
        entry = store.lookup(key)
        assert entry is not None, f"entry {key} is visible but incomplete"
        assert store.verify(entry) is None, f"entry {key} is corrupt"


# -- authentication ------------------------------------------------------------------------


def tamper_and_fix_checksums(entry: Path) -> None:
    """An attacker who can write the cache changes weights and updates the xxh3 checksums."""
    from aioov._cache.fsutil import checksum_record

    weights = entry / "weights.bin"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 8] = b"\x00\x00\x80\x7f" * 2  # +inf
    weights.write_bytes(bytes(raw))
    manifest = json.loads((entry / "manifest.json").read_text())
    manifest["files"]["weights.bin"] = checksum_record(weights)
    (entry / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.anyio
async def test_hmac_rejects_a_tampered_entry_that_checksums_miss(bert_path: Path, cache_dir: Path,
                                                                 ids: np.ndarray) -> None:
    secret = {"CACHE_HMAC_KEY": "s3cret"}
    async with aioov.Core(cache_dir=cache_dir, properties=secret) as core:
        await core.compile_model(bert_path, "CPU")
        await core.wait_exports()
        (entry,) = entries(cache_dir)
        assert "mac" in json.loads((entry / "manifest.json").read_text())
        tamper_and_fix_checksums(entry)
        compiled = await core.compile_model(bert_path, "CPU")
        assert compiled.get_property("LOADED_FROM_CACHE") is False
        # A manifest whose MAC does not verify may be another key's (a rotation): not served,
        # not deleted (``aioov cache verify --delete-foreign`` removes it)
        assert "signed with a CACHE_HMAC_KEY" in str(compiled.get_property("NOT_CACHED_REASON"))
        got = (await compiled.infer(ids))["last_hidden_state"]
    np.testing.assert_allclose(got, reference(bert_path, {"input_ids": ids})[0], rtol=1e-4, atol=1e-4)
    assert aioov.Core().get_property("CACHE_HMAC_KEY") is None
    core2 = aioov.Core(properties=secret)
    assert core2.get_property("CACHE_HMAC_KEY") == "***"  # never shown


@pytest.mark.anyio
async def test_without_a_key_such_tampering_would_be_served(bert_path: Path, cache_dir: Path) -> None:
    """Why the key exists: checksums catch accidents, not attackers."""
    async with aioov.Core(cache_dir=cache_dir) as core:
        await core.compile_model(bert_path, "CPU")
        await core.wait_exports()
        tamper_and_fix_checksums(entries(cache_dir)[0])
        compiled = await core.compile_model(bert_path, "CPU")
    assert compiled.get_property("LOADED_FROM_CACHE") is True


@pytest.mark.anyio
async def test_unsigned_entries_are_recompiled_and_replaced(mlp_path: Path, cache_dir: Path) -> None:
    async with aioov.Core(cache_dir=cache_dir) as core:  # written before the key was set
        await core.compile_model(mlp_path, "CPU")
    async with aioov.Core(cache_dir=cache_dir, properties={"CACHE_HMAC_KEY": "k"}) as core:
        compiled = await core.compile_model(mlp_path, "CPU")
        assert compiled.get_property("LOADED_FROM_CACHE") is False
        await core.wait_exports()
        again = await core.compile_model(mlp_path, "CPU")
    assert again.get_property("LOADED_FROM_CACHE") is True


async def _compiled(cache_dir: Path, model: Path, key: object) -> aioov.CompiledModel:
    async with aioov.Core(cache_dir=cache_dir, properties={"CACHE_HMAC_KEY": key}) as core:
        compiled = await core.compile_model(model, "CPU")
        await core.wait_exports()
    return compiled


@pytest.mark.anyio
async def test_a_key_rotation_neither_deletes_nor_serves_the_other_keys_entries(
    mlp_path: Path, tmp_path: Path, cache_dir: Path
) -> None:
    """Old and new processes share the cache during a rotation: the new ones sign with the
    new key and accept both; an entry signed under none of a process's keys is not its own,
    so it is neither served nor deleted (a MAC cannot tell another key from a forgery)."""
    other = tmp_path / "other.onnx"
    onnx.save(mlp(seed=9), other)
    await _compiled(cache_dir, mlp_path, "old")  # before the rotation
    assert (await _compiled(cache_dir, mlp_path, ["new", "old"])).get_property("LOADED_FROM_CACHE") is True
    await _compiled(cache_dir, other, ["new", "old"])  # a new entry, signed with "new"
    stranger = await _compiled(cache_dir, other, "old")  # an old process: not its entry
    assert stranger.get_property("LOADED_FROM_CACHE") is False
    assert "signed with a CACHE_HMAC_KEY" in str(stranger.get_property("NOT_CACHED_REASON"))
    assert (await _compiled(cache_dir, other, "new")).get_property("LOADED_FROM_CACHE") is True  # still there
    assert (await _compiled(cache_dir, mlp_path, "old")).get_property("LOADED_FROM_CACHE") is True

    def verify(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*aioov_command(), "cache", "verify", "--cache-dir", str(cache_dir), *extra],
                              capture_output=True, text=True, timeout=120,
                              env=child_env(AIOOV_CACHE_HMAC_KEY="new"))

    during = subprocess.run([*aioov_command(), "cache", "verify", "--cache-dir", str(cache_dir)],
                            capture_output=True, text=True, timeout=120,
                            env=child_env(AIOOV_CACHE_HMAC_KEY='["new", "old"]'))
    assert during.returncode == 0, during.stdout  # under both keys, everything verifies
    kept = verify()  # the rotation is over: "old" entries are reported, not removed
    assert kept.returncode == 1 and "1 entry signed with another key" in kept.stdout
    assert len(list(cache_dir.rglob("manifest.json"))) == 2
    verify("--delete-foreign")
    assert len(list(cache_dir.rglob("manifest.json"))) == 1


@pytest.mark.anyio
async def test_a_key_rotation_keeps_the_stat_index_records_of_either_key(
    mlp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stat index record signed with the old key is read by a process holding ``["new", "old"]``
    and left as it is: rewriting it with the new key made the old processes hash the model again,
    and rewrite it back, at every start during a rolling rotation."""
    from aioov._cache import cache as _face
    from aioov._cache.key import digest_files

    await _compiled(cache_dir, mlp_path, "old")
    (record,) = (cache_dir / "v1" / ".index").glob("*.json")
    written = record.read_bytes()
    hashed: list[str] = []

    def counting(paths: Any) -> str:
        hashed.extend(map(str, paths))
        return digest_files(paths)

    # why: nothing public tells whether a compile hashed the model or read its stat index record
    monkeypatch.setattr(_face, "digest_files", counting)
    assert (await _compiled(cache_dir, mlp_path, ["new", "old"])).get_property("LOADED_FROM_CACHE") is True
    assert hashed == [] and record.read_bytes() == written
    assert (await _compiled(cache_dir, mlp_path, "old")).get_property("LOADED_FROM_CACHE") is True
    assert hashed == []
    await _compiled(cache_dir, mlp_path, "other")  # a record signed under none of its keys: hashed
    assert hashed == [str(mlp_path)]


def test_verify_reports_but_keeps_index_records_signed_with_another_key(tmp_path: Path, cache_dir: Path) -> None:
    """Like entries: a stat index record signed under none of ``cache verify``'s keys is another
    key's (a rotation) or forged: reported (exit 1) and kept unless ``--delete-foreign``. An
    unsigned or malformed one is bad, and removed."""
    from aioov._cache.auth import derive_key
    from aioov._cache.key import FileStat, digest_files, path_digest

    store = aioov.CacheStore(cache_dir)
    store.ensure()
    models = []
    for name in ("old", "unsigned", "new"):
        model = tmp_path / f"{name}.onnx"
        model.write_bytes(name.encode())
        models.append(model)
        key = derive_key(name) if name != "unsigned" else None
        store.index.store([FileStat.of(str(model))], digest_files([str(model)]), key)
    (store.index.root / "0123456789abcdef0123456789abcdef.json").write_text("[not a record")
    old, unsigned, new = (store.index.root / f"{path_digest(str(m))}.json" for m in models)

    def verify(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*aioov_command(), "cache", "verify", "--cache-dir", str(cache_dir), *extra],
                              capture_output=True, text=True, timeout=120,
                              env=child_env(AIOOV_CACHE_HMAC_KEY="new"))

    kept = verify("--json")
    assert kept.returncode == 1, kept.stderr
    report = json.loads(kept.stdout)
    assert report["foreign"] == [f"index/{old.name}"]
    assert sorted(item["key"] for item in report["bad"]) == sorted(
        ["index/0123456789abcdef0123456789abcdef.json", f"index/{unsigned.name}"])
    assert sorted(p.name for p in store.index.records()) == sorted([old.name, new.name])
    assert "1 stat index record signed with another key" in verify().stdout
    assert old.exists()
    rotating = subprocess.run([*aioov_command(), "cache", "verify", "--cache-dir", str(cache_dir)],
                              capture_output=True, text=True, timeout=120,
                              env=child_env(AIOOV_CACHE_HMAC_KEY='["new", "old"]'))
    assert rotating.returncode == 0, rotating.stdout
    verify("--delete-foreign")
    assert [p.name for p in store.index.records()] == [new.name]


# -- bad models: fuzzing -------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_scanner_never_fails_but_with_scan_error(data: bytes) -> None:
    try:
        scan_bytes(data)
    except ScanError:
        pass


VALID = mlp().SerializeToString()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(1, len(VALID)))
def test_mutated_models_are_read_or_refused_clearly(flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(VALID[:cut])
    for offset, value in flips:
        if offset < len(data):
            data[offset] = value
    try:
        aioov.Model.from_bytes(bytes(data))
    except aioov.ModelReadError:
        pass


FUZZ_COMPILER = """
import sys, json, pathlib, anyio, aioov
async def main():
    progress = pathlib.Path(sys.argv[1])
    outcomes = {}
    async with aioov.Core() as core:
        for path in sorted(pathlib.Path(sys.argv[2]).glob("*.onnx")):
            progress.write_text(str(path))  # the input being tried, kept if onnxruntime crashes
            try:
                await core.compile_model(path, "CPU")
                outcomes["ok"] = outcomes.get("ok", 0) + 1
            except (aioov.ModelReadError, aioov.CompileError) as exc:
                outcomes[type(exc).__name__] = outcomes.get(type(exc).__name__, 0) + 1
    print(json.dumps(outcomes))
anyio.run(main)
"""


def fuzz_inputs(folder: Path, count: int, seed: int) -> None:
    rng = random.Random(seed)
    good = bert_like(2, 32, 2, vocab=50, seed=seed)
    raw = good.SerializeToString()
    for index in range(count):
        kind = index % 5
        if kind == 0:  # random bytes
            data = rng.randbytes(rng.randint(0, 4096))
        elif kind == 1:  # truncated protobuf
            data = raw[: rng.randint(1, len(raw) - 1)]
        elif kind == 2:  # flipped bytes
            buf = bytearray(raw)
            for _ in range(rng.randint(1, 20)):
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            data = bytes(buf)
        elif kind == 3:  # dangling edge
            model = onnx.ModelProto()
            model.CopyFrom(good)
            node = model.graph.node[rng.randrange(len(model.graph.node))]
            node.input[0] = f"nowhere_{index}"
            data = model.SerializeToString()
        else:  # huge declared dims
            model = onnx.ModelProto()
            model.CopyFrom(good)
            dims = model.graph.input[0].type.tensor_type.shape.dim
            dims[0].Clear()
            dims[0].dim_value = 2**62
            data = model.SerializeToString()
        (folder / f"{index:04d}.onnx").write_bytes(data)


def test_fuzzed_models_compile_or_fail_cleanly_in_a_subprocess(tmp_path: Path) -> None:
    """A crash inside onnxruntime would kill the subprocess: the test then names the input."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    count = int(os.environ.get("AIOOV_FUZZ", "60"))
    fuzz_inputs(folder, count, seed=1234)
    progress = tmp_path / "progress"
    proc = run_python(FUZZ_COMPILER, str(progress), str(folder), check=False, timeout=600)
    assert proc.returncode == 0, f"crashed ({proc.returncode}) on {progress.read_text()}:\n{proc.stderr[-2000:]}"
    outcomes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sum(outcomes.values()) == count
    assert outcomes.get("ModelReadError", 0) + outcomes.get("InvalidModelError", 0) > 0


# -- crashes at random points --------------------------------------------------------------

COMPILER = """
import sys, anyio, aioov
async def main():
    print("start", flush=True)  # imports done: from here on, every moment is in the cache code
    async with aioov.Core(cache_dir=sys.argv[1]) as core:
        await core.compile_model(sys.argv[2], "CPU")
anyio.run(main)
"""

CHECKER = """
import sys, json, anyio, numpy as np, onnxruntime as ort, aioov
async def main():
    async with aioov.Core(cache_dir=sys.argv[1]) as core:
        compiled = await core.compile_model(sys.argv[2], "CPU")
        ids = np.arange(16, dtype=np.int64).reshape(1, 16)
        got = (await compiled.infer(ids))["last_hidden_state"]
        want = ort.InferenceSession(sys.argv[2]).run(None, {"input_ids": ids})[0]
        print(json.dumps({"from_cache": compiled.get_property("LOADED_FROM_CACHE"),
                          "correct": bool(np.allclose(got, want, rtol=1e-4, atol=1e-4)),
                          "corrupt": core.cache_stats.corrupt}))
anyio.run(main)
"""


def start_compiler(cache_dir: Path, model: Path) -> subprocess.Popen[str]:
    """A compiling process, returned once it has finished importing (it prints "start")."""
    proc = subprocess.Popen([sys.executable, "-c", COMPILER, str(cache_dir), str(model)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=child_env())
    assert proc.stdout is not None and proc.stdout.readline().strip() == "start"
    return proc


def kill_trials(model: Path, cache_dir: Path, trials: int, seed: int) -> dict[str, int]:
    """Kill a compiling/exporting process at random moments; after each kill, every entry
    that is visible must verify, and a checker must get correct outputs."""
    probe = start_compiler(cache_dir / "probe", model)
    started = time.perf_counter()
    probe.communicate()
    duration = time.perf_counter() - started  # compile + background export + exit
    rng = random.Random(seed)
    stats = {"trials": 0, "killed": 0, "finished": 0, "served_corrupt": 0}
    for _ in range(trials):
        proc = start_compiler(cache_dir, model)
        time.sleep(rng.uniform(0.0, duration))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            stats["killed"] += 1
        else:
            stats["finished"] += 1
        proc.communicate()
        stats["trials"] += 1
        every_entry_verifies(cache_dir)
        if entries(cache_dir):
            for entry in entries(cache_dir):  # start over: the next trial compiles again
                aioov.CacheStore(cache_dir).remove(entry.name)
    report = json.loads(run_python(CHECKER, str(cache_dir), str(model)).stdout)
    assert report["correct"]
    stats["served_corrupt"] += report["corrupt"]
    return stats


@pytest.fixture(scope="module")
def crash_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("crash") / "m.onnx"
    onnx.save(bert_like(layers=4, hidden=256, heads=4, vocab=4000, seed=7), path)
    return path


def test_sigkill_at_random_points_never_leaves_a_bad_entry(crash_model: Path, tmp_path: Path) -> None:
    stats = kill_trials(crash_model, tmp_path / "cache", trials=6, seed=1)
    assert stats["trials"] == 6 and stats["served_corrupt"] == 0


@pytest.mark.slow
def test_sigkill_stress(crash_model: Path, tmp_path: Path) -> None:
    stats = kill_trials(crash_model, tmp_path / "cache", trials=TRIALS, seed=2)
    print(f"\ncrash trials: {stats}")
    assert stats["served_corrupt"] == 0


def start_prune(cache_dir: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([*aioov_command(), "cache", "prune", "--max-size", "0", "--cache-dir", str(cache_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env())


def removals(cache_dir: Path, count: int, prune: subprocess.Popen[bytes], *, until: int | None = None) -> list[float]:
    """When each entry of the ``count`` in the cache left it, spinning (a removal takes a
    millisecond; the command takes most of a second to start), until ``until`` (default: all)
    are gone or ``prune`` exits."""
    times: list[float] = []
    while len(times) < (until or count) and prune.poll() is None:
        left = len(entries(cache_dir))
        times.extend([time.perf_counter()] * (count - left - len(times)))
    return times


def test_sigkill_during_prune_leaves_only_whole_entries(tmp_path: Path) -> None:
    """``aioov cache prune`` killed at a random moment after it removed its first entry (not
    before it started: starting the command takes longer than pruning) leaves only entries
    that verify. Each trial prunes a copy of one warmed-up cache; trials go on until several
    kills landed mid-prune (some entries removed, not all), and at least one must have."""
    pristine = tmp_path / "pristine"
    paths = [str(p) for p in make_models(tmp_path / "models", 16, prefix="p")]
    subprocess.run([*aioov_command(), "warmup", *paths, "-q", "--cache-dir", str(pristine)],
                   check=True, capture_output=True, env=child_env())
    count = len(entries(pristine))
    assert count == len(paths)
    probe_dir = tmp_path / "probe"
    shutil.copytree(pristine, probe_dir)
    probe = start_prune(probe_dir)
    times = removals(probe_dir, count, probe)
    assert probe.wait() == 0 and len(times) == count
    span = times[-1] - times[0]  # first removal to last, on this machine now
    rng = random.Random(3)
    removed: list[int] = []
    for trial in range(20):
        cache_dir = tmp_path / f"cache{trial}"
        shutil.copytree(pristine, cache_dir)
        prune = start_prune(cache_dir)
        try:
            removals(cache_dir, count, prune, until=1)
            time.sleep(rng.uniform(0.0, span))
            prune.send_signal(signal.SIGKILL)
        finally:
            prune.kill()
            prune.wait()
        removed.append(count - len(entries(cache_dir)))
        every_entry_verifies(cache_dir)
        if trial >= 3 and sum(0 < n < count for n in removed) >= 3:
            break
    print(f"\nentries removed before each kill, of {count}: {removed}")
    assert any(0 < n < count for n in removed), f"no kill landed mid-prune: entries removed {removed} of {count}"


# -- stress: many processes, compile + verify + prune ---------------------------------------

STRESS = """
import sys, json, random, anyio, numpy as np, aioov
async def main():
    cache_dir, rounds, seed, *paths = sys.argv[1:]
    rng = random.Random(int(seed))
    errors, loads = 0, 0
    for _ in range(int(rounds)):
        async with aioov.Core(cache_dir=cache_dir) as core:
            for path in rng.sample(paths, len(paths)):
                try:
                    compiled = await core.compile_model(path, "CPU")
                    out = await compiled.infer(np.ones((1, 4), np.int64))
                    loads += out["last_hidden_state"].shape == (1, 4, 64)
                except Exception as exc:
                    errors += 1
                    print(repr(exc), file=sys.stderr)
            if rng.random() < 0.3:
                aioov.CacheStore(cache_dir).prune(max_size=0)
    print(json.dumps({"errors": errors, "loads": loads}))
anyio.run(main)
"""


def stress(tmp_path: Path, processes: int, rounds: int) -> list[dict[str, int]]:
    cache_dir = tmp_path / "cache"
    paths = [str(p) for p in make_models(tmp_path, 3, prefix="s")]
    procs = [subprocess.Popen([sys.executable, "-c", STRESS, str(cache_dir), str(rounds), str(i), *paths],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=child_env()) for i in range(processes)]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)  # no deadlock: every process ends in time
        assert proc.returncode == 0, err
        reports.append(json.loads(out))
    every_entry_verifies(cache_dir)
    assert all(r["errors"] == 0 and r["loads"] == rounds * 3 for r in reports), reports
    return reports


def test_concurrency_stress_short(tmp_path: Path) -> None:
    stress(tmp_path, processes=4, rounds=3)


@pytest.mark.slow
def test_concurrency_stress(tmp_path: Path) -> None:
    stress(tmp_path, processes=8, rounds=int(os.environ.get("AIOOV_ROUNDS", "20")))


@pytest.mark.anyio
async def test_missing_cache_dir_is_created(mlp_path: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "a" / "b" / "c"
    async with aioov.Core(cache_dir=cache_dir) as core:
        await core.compile_model(mlp_path, "CPU")
    assert len(entries(cache_dir)) == 1
