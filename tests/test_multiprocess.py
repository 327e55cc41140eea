"""Many processes, one cache: real subprocesses, real flock locks, real SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .helpers import child_env, make_models, run_python

WORKER = """
import json, sys, time, anyio, numpy as np, onnxruntime as ort, aioov
cache_dir, start_at, *paths = sys.argv[1:]
async def main():
    time.sleep(max(0.0, float(start_at) - time.time()))  # start together
    async with aioov.Core(cache_dir=cache_dir) as core:
        results = await core.compile_all(paths, "CPU")
        ids = np.arange(32, dtype=np.int64).reshape(2, 16)
        correct = []
        for r in results:
            got = (await r.unwrap().infer(ids))["last_hidden_state"]
            want = ort.InferenceSession(r.model).run(None, {"input_ids": ids})[0]
            correct.append(bool(np.allclose(got, want, rtol=1e-4, atol=1e-4)))
        await core.wait_exports()
        print(json.dumps({"compiles": core.cache_stats.compiles, "exports": core.cache_stats.exports,
                          "from_cache": [r.from_cache for r in results], "correct": correct}))
anyio.run(main)
"""


@pytest.fixture(scope="module")
def three_models(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return [str(p) for p in make_models(tmp_path_factory.mktemp("mp_models"), 3, layers=3, hidden=128, vocab=1000)]


def start(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=child_env(),
    )


def test_four_processes_three_models_write_each_entry_once(three_models: list[str], tmp_path: Path) -> None:
    """Workers starting together: one process writes each model's entry; the others load it
    or, rather than wait longer than compiling it takes, compile it themselves."""
    cache_dir = tmp_path / "cache"
    start_at = str(time.time() + 2.0)
    procs = [start(WORKER, str(cache_dir), start_at, *three_models) for _ in range(4)]
    reports = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        reports.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(r["exports"] for r in reports) == 3
    assert 3 <= sum(r["compiles"] for r in reports) <= 12
    for model in range(3):  # compiled by the process that wrote its entry, at least
        assert False in [r["from_cache"][model] for r in reports]
    assert all(all(r["correct"]) for r in reports)
    assert len(list((cache_dir / "v1").glob("??/*"))) == 3


STUCK_EXPORTER = """
import sys, time, anyio, aioov
from aioov._cache import store as store_module
def hang(*args, **kwargs):  # the export is written but never published: then SIGKILL
    print("exporting", flush=True)
    time.sleep(3600)
store_module.CacheStore.publish = hang
async def main():
    core = aioov.Core(cache_dir=sys.argv[1])
    await core.compile_model(sys.argv[2], "CPU")
    await core.wait_exports()
anyio.run(main)
"""

ONE_COMPILE = """
import sys, json, anyio, aioov
async def main():
    async with aioov.Core(cache_dir=sys.argv[1]) as core:
        compiled = await core.compile_model(sys.argv[2], "CPU")
        await core.wait_exports()
    print(json.dumps({"from_cache": compiled.get_property("LOADED_FROM_CACHE"),
                      "compiles": core.cache_stats.compiles, "lock_waits": core.cache_stats.lock_waits}))
anyio.run(main)
"""

#: prefix for ONE_COMPILE: say on stderr when the process starts waiting for a key's lock
SAYS_WHEN_IT_WAITS = """
import sys
from aioov._cache.locks import KeyLock
_acquire = KeyLock.acquire
def acquire(self, *args, **kwargs):
    print("waiting for the lock", file=sys.stderr, flush=True)
    return _acquire(self, *args, **kwargs)
KeyLock.acquire = acquire
"""


def test_sigkill_of_the_lock_holder_releases_the_others(three_models: list[str], tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    model = three_models[0]
    holder = start(STUCK_EXPORTER, str(cache_dir), model)
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "exporting"  # lock held, blob half-way
    waiter = start(SAYS_WHEN_IT_WAITS + ONE_COMPILE, str(cache_dir), model)
    assert waiter.stderr is not None
    lines = iter(waiter.stderr.readline, "")  # other lines first, e.g. an old onnxruntime's warning
    assert "waiting for the lock" in (line.strip() for line in lines)  # however slow its start was
    os.kill(holder.pid, signal.SIGKILL)
    holder.communicate(timeout=30)
    out, err = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, err
    report = json.loads(out)
    assert report == {"from_cache": False, "compiles": 1, "lock_waits": 1}
    # The waiter published a complete entry; the killed writer left only a temp dir.
    (entry,) = list((cache_dir / "v1").glob("??/*"))
    assert (entry / "manifest.json").exists()
    leftovers = list((cache_dir / "v1" / ".tmp").iterdir())
    assert all(p.name.endswith(".incomplete") for p in leftovers)
    # ...which a later run removes once no writer holds its lock.
    from aioov import CacheStore

    removed = CacheStore(cache_dir).clean_tmp(min_age=0)
    assert sorted(removed) == sorted(leftovers)
    proc = run_python(ONE_COMPILE, str(cache_dir), model)
    assert json.loads(proc.stdout)["from_cache"] is True


def test_killed_before_publishing_means_the_next_run_recompiles(three_models: list[str], tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    holder = start(STUCK_EXPORTER, str(cache_dir), three_models[1])
    assert holder.stdout is not None and holder.stdout.readline().strip() == "exporting"
    os.kill(holder.pid, signal.SIGKILL)
    holder.communicate(timeout=30)
    assert list((cache_dir / "v1").glob("??/*")) == []  # nothing partial is visible
    report = json.loads(run_python(ONE_COMPILE, str(cache_dir), three_models[1]).stdout)
    assert report["from_cache"] is False and report["compiles"] == 1


# -- the locks themselves ------------------------------------------------------------------


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX; Windows locks through portalocker")
def test_locks_are_flock_and_agree_with_portalocker(tmp_path: Path) -> None:
    """On POSIX the locks are made with fcntl.flock here; portalocker (the Windows path)
    takes the same kernel lock, so each sees the other's."""
    from aioov._cache.locks import _portalocker_lock, lock_fd, unlock_fd

    path = tmp_path / "k.lock"
    ours, theirs = (os.open(path, os.O_RDWR | os.O_CREAT) for _ in range(2))
    try:
        assert lock_fd(ours, shared=False)
        assert not _portalocker_lock(theirs, shared=True)
        unlock_fd(ours)
        assert _portalocker_lock(theirs, shared=True)
        assert lock_fd(ours, shared=True)  # shared beside shared
        third = os.open(path, os.O_RDWR)
        try:
            assert not lock_fd(third, shared=False)  # exclusive refused while others share it
        finally:
            os.close(third)
    finally:
        os.close(ours)
        os.close(theirs)


@pytest.mark.skipif(sys.platform == "win32", reason="Windows locks through portalocker")
def test_a_warm_start_does_not_import_portalocker(three_models: list[str], tmp_path: Path) -> None:
    """Importing portalocker took 0.11-0.18 s of every fresh process's first lock."""
    code = """
import sys, anyio, aioov
async def main():
    async with aioov.Core(cache_dir=sys.argv[1]) as core:
        compiled = await core.compile_model(sys.argv[2], "CPU")
        await core.wait_exports()
    print(compiled.get_property("LOADED_FROM_CACHE"), "portalocker" in sys.modules)
anyio.run(main)
"""
    cache = str(tmp_path / "cache")
    assert run_python(code, cache, three_models[0]).stdout.split() == ["False", "False"]
    assert run_python(code, cache, three_models[0]).stdout.split() == ["True", "False"]
