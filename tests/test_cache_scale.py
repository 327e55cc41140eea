"""A cache of many entries (#45): the size limit from a summary, not a scan after each publish;
bookkeeping (lock files, stat index records) that goes with its entry; ``stats``/``ls`` from
the summary. Real processes, real files, real locks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import onnx
import pytest

import aioov
from aioov._cache import locks, usage
from aioov._cache.locks import KeyLock
from aioov._cache.store import CacheStore, measure
from aioov.testing import mlp

from .helpers import aioov_command, child_env, reference

HOUR_AGO = time.time() - 3600


def entries(store: CacheStore) -> dict[str, int]:
    """What a walk of the directories finds: key → bytes (what the summary must say)."""
    return {key: measure(store.entry_path(key))[0] for key in store.keys()}


def assert_summary_is_exact(store: CacheStore) -> None:
    found = entries(store)
    totals = store.totals()
    assert (totals.entries, totals.bytes) == (len(found), sum(found.values()))
    assert {e.key: e.size for e in store.listing()} == found


def age_bookkeeping(store: CacheStore) -> None:
    """Stat index records and size markers past the grace a compile under way gets."""
    for path in store.index.root.iterdir():
        os.utime(path, (HOUR_AGO, HOUR_AGO))


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir())


@pytest.fixture
def mlps(tmp_path: Path) -> list[Path]:
    folder = tmp_path / "models"
    folder.mkdir()
    paths = []
    for seed in range(4):
        path = folder / f"mlp{seed}.onnx"
        onnx.save(mlp(seed=seed), path)
        paths.append(path)
    return paths


async def compile_all(cache_dir: Path, paths: list[Path], **config: object) -> aioov.CacheStats:
    async with aioov.Core(cache_dir=cache_dir, properties=config) as core:
        for path in paths:
            await core.compile_model(path, "CPU")
            await core.wait_exports()
        return core.cache_stats


# -- lock files: the protocol that lets them be removed ---------------------------------------


def test_a_lock_taken_on_a_removed_file_is_taken_again_on_the_file_at_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A waiter that opened the lock file before its holder removed it gets a lock on a file
    nobody else will open: it must see that, and lock the file at the path instead."""
    path = tmp_path / "key.lock"
    holder = KeyLock(path)
    assert holder.try_acquire()
    stale = os.open(path, os.O_RDWR)  # what the waiter opened before the unlink
    holder.release(discard=True)
    assert not path.exists()
    real_open, opened = os.open, []

    def opening(name: object, flags: int, mode: int = 0o777) -> int:
        opened.append(name)
        return stale if len(opened) == 1 else real_open(name, flags, mode)  # type: ignore[arg-type]

    # why: the waiter's open landing between the holder's open and unlink is a race no test can time
    monkeypatch.setattr(locks.os, "open", opening)
    waiter = KeyLock(path)
    assert waiter.try_acquire()
    monkeypatch.undo()
    assert len(opened) == 2  # the stale file, then the path again
    assert not KeyLock(path).try_acquire()  # a third process is excluded: the waiter holds the file at the path
    waiter.release()


def test_a_shared_holder_never_removes_the_lock_file(tmp_path: Path) -> None:
    reader = KeyLock(tmp_path / "key.lock")
    assert reader.try_acquire(shared=True)
    reader.release(discard=True)
    assert (tmp_path / "key.lock").exists()


EXCLUSION = r"""
import os, sys, time, random
from pathlib import Path
from aioov._cache.locks import KeyLock
path, inside, seconds = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
role, seed = sys.argv[4], int(sys.argv[5])
rng = random.Random(seed)
end, rounds, bad = time.monotonic() + seconds, 0, 0
while time.monotonic() < end:
    lock = KeyLock(path)
    if role == "writer":
        lock.acquire(30)
        try:
            fd = os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # nobody else may be inside
            os.close(fd)
        except FileExistsError:
            bad += 1
        time.sleep(rng.random() * 0.002)
        os.unlink(inside)
        lock.release(discard=rng.random() < 0.7)
    elif role == "reader":
        lock.acquire(30, shared=True)
        bad += inside.exists()  # no writer inside while a reader holds the lock
        time.sleep(rng.random() * 0.001)
        lock.release(discard=True)  # shared: never removes it
    else:  # the collector: prune's way with a lock of no entry
        if lock.try_acquire():
            lock.release(discard=True)
        time.sleep(rng.random() * 0.001)
    rounds += 1
print(rounds, bad)
"""


def exclusion_run(tmp_path: Path, seconds: float) -> list[tuple[int, int]]:
    path, inside = tmp_path / "k.lock", tmp_path / "inside"
    roles = ["writer", "writer", "writer", "reader", "reader", "collector"]
    procs = [subprocess.Popen([sys.executable, "-c", EXCLUSION, str(path), str(inside), str(seconds), role, str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
             for i, role in enumerate(roles)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120 + seconds)
        assert proc.returncode == 0, err
        rounds, bad = map(int, out.split())
        results.append((rounds, bad))
    return results


def test_exclusion_holds_while_lock_files_are_removed(tmp_path: Path) -> None:
    """Three writers, two readers and a collector on one key for two seconds, lock files
    removed all the while: never two writers inside, never a writer beside a reader."""
    results = exclusion_run(tmp_path, 2.0)
    assert all(bad == 0 for _rounds, bad in results), results
    assert all(rounds > 0 for rounds, _bad in results), results


# -- bookkeeping removed with its entry ----------------------------------------------------


@pytest.mark.anyio
async def test_lock_files_and_index_records_go_with_their_entry(mlps: list[Path], cache_dir: Path) -> None:
    await compile_all(cache_dir, mlps)
    store = CacheStore(cache_dir)
    kept = store.bookkeeping()
    assert (kept.key_locks, kept.hash_locks, kept.index_records) == (4, 0, 4)  # hash locks go once hashed
    (store.index.root / "4096.size").touch()  # a size marker, as earlier aioov versions left them
    age_bookkeeping(store)
    pruned = store.prune(max_size=0)
    assert len(pruned) == 4
    assert (pruned.collected.index_records, pruned.collected.size_markers) == (4, 1)
    assert store.bookkeeping().files == 0
    assert_summary_is_exact(store)


@pytest.mark.anyio
async def test_index_records_of_deleted_or_changed_model_files_go_at_the_next_collection(
    tmp_path: Path, cache_dir: Path
) -> None:
    """#41.13: a service started from fresh temporary copies of a model, deleted after, left a
    stat index record per copy for as long as the model had an entry (``prune``, ``collect``:
    the digest is in use). A record whose files are gone or changed goes at the next
    collection, young or not (no lookup can use it); the record of a file still there,
    unchanged, stays, and so does one whose path a process is hashing now."""
    kept = tmp_path / "kept.onnx"
    onnx.save(mlp(seed=1), kept)
    copies = [tmp_path / f"start{n}" / "model.onnx" for n in range(12)]
    async with aioov.Core(cache_dir=cache_dir) as core:
        for path in [kept, *copies]:
            path.parent.mkdir(exist_ok=True)
            onnx.save(mlp(seed=1), path)  # the same model: one entry, a record per path
            await core.compile_model(path, "CPU")
        await core.wait_exports()
    store = CacheStore(cache_dir)
    assert (store.totals().entries, store.bookkeeping().index_records) == (1, 13)
    for path in copies[:9]:
        path.unlink()
    os.utime(copies[9], (HOUR_AGO, HOUR_AGO))  # still there, but not the file its record describes
    hashing = store.hash_lock(str(copies[10]))  # a process hashing this path now writes its record
    assert hashing.try_acquire()
    copies[10].unlink()

    proc = subprocess.run([*aioov_command(), "cache", "prune", "--older-than", "30d", "--cache-dir", str(cache_dir)],
                          capture_output=True, text=True, env=child_env())
    assert proc.returncode == 0, proc.stderr
    assert "removed 0 entries" in proc.stdout
    stats = json.loads(subprocess.run([*aioov_command(), "cache", "stats", "--json", "--cache-dir", str(cache_dir)],
                                      capture_output=True, text=True, env=child_env(), check=True).stdout)
    assert stats["bookkeeping"]["index_records"] == 3  # kept.onnx, the copy being hashed, the last copy

    hashing.release()
    copies[11].unlink()
    assert store.collect().index_records == 2
    assert store.bookkeeping().index_records == 1
    assert store.index.lookup(str(kept)) is not None  # the file still there: its record serves on
    assert store.totals().entries == 1


@pytest.mark.anyio
async def test_rewrites_of_one_path_and_copies_under_many_paths_leave_nothing_after_prune(
    tmp_path: Path, cache_dir: Path
) -> None:
    """The issue's 300 rewrites of one model path (a key lock each) and one model compiled from
    300 paths (an index record and a hash lock each), at 12."""
    path, copies = tmp_path / "rewritten.onnx", []
    async with aioov.Core(cache_dir=cache_dir) as core:
        for seed in range(12):
            onnx.save(mlp(seed=seed), path)
            await core.compile_model(path, "CPU")
            await core.wait_exports()
        for n in range(12):
            copy = tmp_path / f"copy{n}.onnx"
            onnx.save(mlp(seed=99), copy)
            copies.append(copy)
            await core.compile_model(copy, "CPU")
        await core.wait_exports()
    store = CacheStore(cache_dir)
    kept = store.bookkeeping()
    assert (kept.key_locks, kept.hash_locks, kept.index_records) == (13, 0, 13)
    age_bookkeeping(store)
    store.prune(older_than=-1)  # everything
    assert store.bookkeeping().files == 0
    assert store.totals().entries == 0


@pytest.mark.anyio
async def test_after_clear_only_the_skeleton_is_left(mlps: list[Path], cache_dir: Path) -> None:
    await compile_all(cache_dir, mlps)
    store = CacheStore(cache_dir)
    (store.tmp / f"{'a' * 64}.1.x.incomplete").mkdir()  # a crashed writer's leftover
    proc = subprocess.run([*aioov_command(), "cache", "clear", "--yes", "--cache-dir", str(cache_dir)],
                          capture_output=True, text=True, env=child_env())
    assert proc.returncode == 0, proc.stderr
    left = files_under(cache_dir)
    assert [name for name in left if not name.startswith("v1/.usage/")] == ["CACHEDIR.TAG"]
    assert sorted(name.split("/")[-1].split(".")[0] for name in left[1:]) == [  # the summary's own files
        "catalog", "journal", "lock", "rebuild", "summary"]
    assert sorted(p.name for p in (cache_dir / "v1").iterdir()) == [".index", ".locks", ".tmp", ".usage"]
    stats = json.loads(subprocess.run([*aioov_command(), "cache", "stats", "--json", "--cache-dir", str(cache_dir)],
                                      capture_output=True, text=True, env=child_env(), check=True).stdout)
    assert (stats["entries"], stats["bytes"], sum(stats["bookkeeping"].values())) == (0, 0, 0)
    await compile_all(cache_dir, mlps[:1])  # and the cache works on
    assert_summary_is_exact(store)


# -- a process waiting on a lock while its entry is pruned ---------------------------------------

WAITER = r"""
import sys, json, anyio, numpy as np
from pathlib import Path
import aioov
from aioov._cache import locks
model, cache_dir, key, waiting = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
real = locks.KeyLock.try_acquire
def noting(self, *, shared=False):  # says when it found the key's lock held (the test then prunes)
    got = real(self, shared=shared)
    if not got and self.path.name == key + ".lock":
        waiting.touch()
    return got
locks.KeyLock.try_acquire = noting
async def main():
    async with aioov.Core(cache_dir=cache_dir) as core:
        compiled = await core.compile_model(model, "CPU")
        y = (await compiled.infer({"x": np.ones((2, 8), np.float32)}))["y"]
        await core.wait_exports()
    print(json.dumps({"from_cache": compiled.get_property("LOADED_FROM_CACHE"), "y": y.tolist(),
                      "errors": core.cache_stats.errors}))
anyio.run(main)
"""


@pytest.mark.anyio
async def test_a_process_waiting_on_the_lock_of_an_entry_being_pruned_compiles_it_right(
    mlps: list[Path], cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await compile_all(cache_dir, mlps[:1])
    store = CacheStore(cache_dir)
    (key,) = store.keys()
    waiting, holding = tmp_path / "waiting", threading.Event()
    real_delete = CacheStore._delete

    def delete_once_the_other_waits(self: CacheStore, *args: object, **kwargs: object) -> bool:
        holding.set()  # prune holds the key's lock now; the other process comes and waits
        deadline = time.monotonic() + 60
        while not waiting.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return real_delete(self, *args, **kwargs)  # type: ignore[arg-type]

    # why: prune holds the key's lock for moments only; the other process must come inside them
    monkeypatch.setattr(CacheStore, "_delete", delete_once_the_other_waits)
    removed: list[bool] = []
    pruner = threading.Thread(target=lambda: removed.append(store.remove(key)))
    pruner.start()
    assert holding.wait(30)
    waiter = subprocess.run([sys.executable, "-c", WAITER, str(mlps[0]), str(cache_dir), key, str(waiting)],
                            capture_output=True, text=True, env=child_env(), timeout=300)
    pruner.join(30)
    assert waiter.returncode == 0, waiter.stderr
    assert waiting.exists() and removed == [True]
    result = json.loads(waiter.stdout)
    assert result["from_cache"] is False and result["errors"] == 0  # it compiled: the entry it waited for was gone
    want = reference(mlps[0], {"x": np.ones((2, 8), np.float32)})[0]
    np.testing.assert_allclose(np.array(result["y"], np.float32), want, rtol=1e-5, atol=1e-5)
    assert list(store.keys()) == [key]  # published again by the waiter
    assert [p.name for p in store.locks.glob("*.lock")] == [f"{key}.lock"]
    assert_summary_is_exact(store)


# -- the size summary --------------------------------------------------------------------------

CHURN = r"""
import os, sys, json, random, time, uuid
from pathlib import Path
from aioov._cache.store import CacheStore
cache_dir, role, seed, count, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
rng = random.Random(seed)
store = CacheStore(cache_dir)
store.ensure()
done = n = 0
while (n < count) if role == "publisher" else not stop.exists():  # the others: while publishers publish
    n += 1
    if role == "publisher":
        key = uuid.UUID(int=rng.getrandbits(128)).hex * 2
        lock = store.lock(key)
        lock.acquire(30)
        try:
            tmp = store.new_tmp(key)
            (tmp / "model.onnx").write_bytes(os.urandom(rng.randrange(1, 3000)))
            done += store.publish(key, tmp, {"device": "CPU", "source": {"path": f"/m/{seed}/{n}.onnx"}})
        finally:
            lock.release()
    elif role == "upkeep":
        pruned = store.upkeep(rng.randrange(10_000, 80_000))
        done += len(pruned or ())
    elif role == "prune":
        done += len(store.prune(max_size=rng.randrange(10_000, 80_000)))
    elif role == "remover":
        keys = list(store.keys())
        if keys:
            store.quarantine(rng.choice(keys), "a test removes it")
            done += 1
    time.sleep(rng.random() * (0.01 if role == "publisher" else 0.1))
print(done)
"""


def churn(cache_dir: Path, roles: list[tuple[str, int]]) -> list[int]:
    """Processes in ``roles`` at once: publishers publish their count of entries; the others
    do their work again and again until the publishers are done. What each did, counted."""
    stop = cache_dir.parent / f"stop-{uuid.uuid4().hex[:8]}"
    procs = [subprocess.Popen([sys.executable, "-c", CHURN, str(cache_dir), role, str(seed), str(count), str(stop)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
             for seed, (role, count) in enumerate(roles)]
    outcomes = []
    for proc, (role, _count) in zip(procs, roles):
        if role != "publisher":
            stop.touch()  # every publisher has finished
        outcomes.append(proc.communicate(timeout=600))
        assert proc.returncode == 0, outcomes[-1][1]
        assert "Traceback" not in outcomes[-1][1], outcomes[-1][1]
    return [int(out) for out, _err in outcomes]


def test_the_size_summary_stays_right_under_concurrent_publishes_and_prunes(cache_dir: Path) -> None:
    """Three processes publish, while others prune for a size limit (walking the cache and
    rebuilding the summary as they go), prune from a full scan, and remove entries one by one:
    afterwards the summary says what a walk of the directories finds."""
    done = churn(cache_dir, [("publisher", 60), ("publisher", 60), ("publisher", 60), ("upkeep", 0),
                             ("upkeep", 0), ("prune", 0), ("remover", 0)])
    assert done[:3] == [60, 60, 60]
    store = CacheStore(cache_dir)
    assert_summary_is_exact(store)
    assert sum(done[3:6]) > 0  # something was pruned for its size, so rebuilds ran during the publishes


def test_a_change_nobody_recorded_is_found_by_the_next_rebuild(cache_dir: Path) -> None:
    """A process killed between its rename and its journal line: the summary is wrong until the
    next rebuild (prune, verify, an upkeep), never for good."""
    churn(cache_dir, [("publisher", 5)])
    store = CacheStore(cache_dir)
    key = uuid.uuid4().hex * 2
    tmp = store.new_tmp(key)
    (tmp / "model.onnx").write_bytes(b"x" * 100)
    (tmp / "manifest.json").write_text("{}")
    store.entry_path(key).parent.mkdir(exist_ok=True)
    os.rename(tmp, store.entry_path(key))  # as a publisher would, then killed before its line
    gone = next(k for k in store.keys() if k != key)
    os.rename(store.entry_path(gone), store.tmp / "removed by hand")
    assert store.totals().entries == 5  # it does not know yet
    store.refresh()
    assert_summary_is_exact(store)
    assert store.totals().entries == 5 and key in {e.key for e in store.listing()}


# -- CACHE_MAX_SIZE: no scan below the limit -----------------------------------------------


@pytest.mark.anyio
async def test_cache_max_size_walks_the_cache_only_once_it_passes_the_limit(
    tmp_path: Path, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    walks: list[str] = []
    for name in ("scan", "_walk"):
        real = getattr(CacheStore, name)
        # why: nothing public counts walks of the cache (the outcome is the same, only slower)
        monkeypatch.setattr(CacheStore, name, lambda self, *a, _real=real, _name=name, **k: (
            walks.append(_name), _real(self, *a, **k))[1])
    paths = []
    for seed in range(12):
        path = tmp_path / f"m{seed}.onnx"
        onnx.save(mlp(seed=seed), path)
        paths.append(path)
    stats = await compile_all(cache_dir, paths[:6], CACHE_MAX_SIZE="10G")
    assert walks == [] and stats.pruned == 0  # six publishes, no walk
    one = CacheStore(cache_dir).totals().bytes / 6
    stats = await compile_all(cache_dir, paths[6:], CACHE_MAX_SIZE=int(one * 10.5))
    assert walks == ["_walk"]  # passed the limit once (the 11th entry): one walk, pruned to 90 % of it
    assert stats.pruned == 2
    store = CacheStore(cache_dir)
    assert store.totals().bytes <= one * 10.5
    assert_summary_is_exact(store)
    survivors = {Path(e.source or "").name for e in store.listing()}
    assert survivors == {f"m{seed}.onnx" for seed in range(2, 12)}  # the least recently used went


@pytest.mark.anyio
async def test_a_cache_written_without_a_summary_gets_one(mlps: list[Path], cache_dir: Path) -> None:
    """A cache an earlier aioov wrote has no ``.usage``: stats makes its summary once, and a
    publish with a size limit has it made in the background."""
    await compile_all(cache_dir, mlps[:2])
    store = CacheStore(cache_dir)
    want = entries(store)
    for path in store.usage.root.iterdir():
        path.unlink()
    store.usage.root.rmdir()
    assert store.usage.totals() is None
    assert (store.totals().entries, store.totals().bytes) == (2, sum(want.values()))
    for path in store.usage.root.iterdir():
        path.unlink()
    await compile_all(cache_dir, mlps[2:], CACHE_MAX_SIZE="1G")
    assert_summary_is_exact(store)


# -- the command line ------------------------------------------------------------------------


@pytest.fixture
def aioov_logger():  # type: ignore[no-untyped-def]
    """The ``aioov`` logger as the test found it, once main() has configured it."""
    import logging

    from aioov import cli

    logger = logging.getLogger("aioov")
    level, handlers = logger.level, list(logger.handlers)
    yield logger
    logger.setLevel(level)
    for handler in logger.handlers:
        if handler not in handlers:
            logger.removeHandler(handler)
    cli._log_handler = None


@pytest.mark.anyio
async def test_stats_and_ls_answer_from_the_summary(mlps: list[Path], cache_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch, aioov_logger) -> None:  # type: ignore[no-untyped-def]
    await compile_all(cache_dir, mlps)
    from aioov.cli import main

    def aioov_json(*args: str) -> object:
        out = subprocess.run([*aioov_command(), "cache", *args, "--json", "--cache-dir", str(cache_dir)],
                             capture_output=True, text=True, env=child_env(), check=True).stdout
        return json.loads(out)

    fast, full = aioov_json("ls"), aioov_json("ls", "--scan")
    assert fast == full and len(fast) == 4  # type: ignore[arg-type]
    stats = aioov_json("stats")
    kept = stats["bookkeeping"]  # type: ignore[index]
    assert (stats["entries"], kept["key_locks"], kept["index_records"]) == (4, 4, 4)  # type: ignore[index]
    assert aioov_json("stats", "--scan")["bytes"] == stats["bytes"]  # type: ignore[index]
    # why: stats and ls print the same whether they read the summary or each entry
    monkeypatch.setattr(CacheStore, "info", lambda self, key: pytest.fail("stats read an entry"))
    assert main(["cache", "stats", "--cache-dir", str(cache_dir)]) == 0
    assert main(["cache", "ls", "--cache-dir", str(cache_dir)]) == 0


@pytest.mark.anyio
async def test_verify_and_prune_report_progress_on_long_runs(mlps: list[Path], cache_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str],
                                                            aioov_logger) -> None:  # type: ignore[no-untyped-def]
    await compile_all(cache_dir, mlps)
    from aioov import cli
    from aioov._cache import store as store_module

    # why: a run long enough for progress lines (seconds of entries) is too big to make here
    monkeypatch.setattr(cli, "PROGRESS_SECONDS", 0.0)  # every step is "long"
    # why: as above: progress is reported every so many entries, more than a test makes
    monkeypatch.setattr(store_module, "PROGRESS_EVERY", 1)
    assert cli.main(["cache", "verify", "--cache-dir", str(cache_dir)]) == 0
    assert "aioov cache verify: 4 of 4 entries checked (100%)" in capsys.readouterr().err
    assert cli.main(["cache", "prune", "--max-size", "0", "--cache-dir", str(cache_dir)]) == 0
    assert "aioov cache prune: 2 of 4 entries read (50%)" in capsys.readouterr().err


@pytest.mark.anyio
async def test_prune_and_clear_report_progress_as_they_remove(mlps: list[Path], cache_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str],
                                                             aioov_logger) -> None:  # type: ignore[no-untyped-def]
    """Removing 100,000 entries takes minutes: ``prune`` reports it as it did its reading, and
    ``clear`` too, rather than going silent."""
    await compile_all(cache_dir, mlps)
    from aioov import cli
    from aioov._cache import store as store_module

    # why: a run long enough for progress lines (seconds of entries) is too big to make here
    monkeypatch.setattr(cli, "PROGRESS_SECONDS", 0.0)  # every step is "long"
    # why: as above: progress is reported every so many entries, more than a test makes
    monkeypatch.setattr(store_module, "PROGRESS_EVERY", 1)
    assert cli.main(["cache", "prune", "--max-size", "0", "--cache-dir", str(cache_dir)]) == 0
    err = capsys.readouterr().err
    assert "aioov cache prune: 4 of 4 entries read (100%)" in err
    assert "aioov cache prune: 2 of 4 entries removed (50%)" in err
    await compile_all(cache_dir, mlps[:2])
    assert cli.main(["cache", "clear", "--yes", "--cache-dir", str(cache_dir)]) == 0
    assert "aioov cache clear: 1 of 2 entries removed (50%)" in capsys.readouterr().err


def test_a_journal_line_is_one_short_write() -> None:
    """Lines stay well under a page, so that O_APPEND writes of many processes never mix."""
    row = usage.Row(size=1, source="/" + "x" * 100_000, not_cacheable="y" * 100_000, model="z" * 64)
    assert len(json.dumps(row.dump())) < 2 * usage.TEXT_MAX + 200
