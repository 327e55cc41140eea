"""Many workers, one cold start: what a process does when others load from the same cache.

The first compile of a model costs what an uncached one does, whoever else is loading: the
entry is written afterwards, in the background. A worker that needs a model another process
is caching waits for its entry no longer than that process's compile took, and compiles it
itself after: a cold cache never makes a start slower than no cache. A model not worth
caching is recorded as such before ``compile_model`` returns, so that nobody waits for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import onnx
import pytest

import aioov
from aioov import _builds
from aioov._cache.peers import Presence
from aioov._cache.store import CacheStore
from aioov.testing import mlp

from .helpers import child_env, manifests, reference

pytestmark = pytest.mark.anyio

#: a process that marks itself as loading from a cache (as a Core with compiles in flight does)
PEER = """
import sys, time
from pathlib import Path
from aioov._cache.store import CacheStore
from aioov._cache.peers import Presence
store = CacheStore(sys.argv[1])
store.ensure()
Presence(store.locks / "peers").enter()
print("ready", flush=True)
time.sleep(600)
"""


def _x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)


async def _compile_awaited(cache_dir: Path, path: Path) -> aioov.CompiledModel:
    """A compile whose entry is awaited (``SYNC``): published, or given up, when it returns."""
    async with aioov.Core(cache_dir=cache_dir) as core:
        return await core.compile_model(path, "CPU", {"CACHE_EXPORT": "SYNC"})


async def _computes_the_source(compiled: aioov.CompiledModel, path: Path) -> None:
    np.testing.assert_allclose((await compiled.infer({"x": _x()}))["y"], reference(path, {"x": _x()})[0],
                               rtol=1e-5, atol=1e-6)


@pytest.fixture
def peer(cache_dir: Path) -> Any:
    """Another process loading from ``cache_dir`` for as long as the test runs."""
    proc = subprocess.Popen([sys.executable, "-c", PEER, str(cache_dir)], stdout=subprocess.PIPE, text=True,
                            env=child_env())
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    yield proc
    proc.kill()
    proc.wait()
    proc.stdout.close()


def _presence(cache_dir: Path) -> Presence:
    store = CacheStore(cache_dir)
    store.ensure()
    return Presence(store.locks / "peers")


def test_a_process_is_seen_loading_until_it_dies(cache_dir: Path, peer: subprocess.Popen[str]) -> None:
    mine = _presence(cache_dir)
    mine.enter()
    assert mine.others()
    peer.send_signal(signal.SIGKILL)  # no chance to tidy up: the kernel drops its flock
    peer.wait()
    assert not mine.others()
    assert [p.name for p in mine.directory.iterdir()] == [mine._name]  # its mark was removed
    mine.leave()
    assert list(mine.directory.iterdir()) == []


def test_a_process_does_not_count_itself(cache_dir: Path) -> None:
    mine = _presence(cache_dir)
    mine.enter()
    mine.enter()  # two compiles in flight
    mine.leave()
    assert not mine.others()
    other_core = _presence(cache_dir)  # another Core of this process is another user of the cache
    other_core.enter()
    assert mine.others()
    other_core.leave()
    mine.leave()


def test_marks_are_never_read_or_removed_through_a_symlink(cache_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "1-abc.peer").write_text("a user's file that looks like a dead mark")
    store = CacheStore(cache_dir)
    store.ensure()
    (store.locks / "peers").symlink_to(outside)
    mine = Presence(store.locks / "peers")
    mine.enter()
    assert not mine.others()
    mine.leave()
    assert sorted(p.name for p in outside.iterdir()) == ["1-abc.peer"]  # untouched, nothing added


async def test_alone_the_entry_is_written_after_compile_model_returns(cache_dir: Path, mlp_path: Path) -> None:
    async with aioov.Core(cache_dir=cache_dir) as core:
        compiled = await core.compile_model(mlp_path, "CPU")
        assert core.pending_exports == 1  # the first compile did not wait for the export
        assert await core.wait_exports(120)
    assert compiled.session._model_path == str(mlp_path)  # compiled here, from the source


async def test_with_others_loading_the_caller_compiles_and_the_entry_follows(
    cache_dir: Path, mlp_path: Path, peer: subprocess.Popen[str]
) -> None:
    async with aioov.Core(cache_dir=cache_dir) as core:
        compiled = await core.compile_model(mlp_path, "CPU")
        assert core.pending_exports == 1  # nobody waits for a builder: it comes after
        assert compiled.session._model_path == str(mlp_path)  # compiled here, from the source
        assert await core.wait_exports(120)
    (manifest,) = manifests(cache_dir)
    assert manifest["build"]["check"] == "ran and matched"
    await _computes_the_source(compiled, mlp_path)


async def test_with_others_loading_a_model_not_worth_caching_is_recorded_at_once(
    cache_dir: Path, mlp_path: Path, peer: subprocess.Popen[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AIOOV_CACHE_ALWAYS")  # the rule on: a tiny MLP compiles in milliseconds
    async with aioov.Core(cache_dir=cache_dir) as core:
        compiled = await core.compile_model(mlp_path, "CPU")
        assert core.pending_exports == 0
        (marker,) = manifests(cache_dir)  # there already: the others compile it without waiting
        assert marker["not_cacheable"]["kind"] == "not-worth"
    await _computes_the_source(compiled, mlp_path)


def _key_of(model: Path, tmp_path: Path) -> str:
    """The cache key a compile of ``model`` on CPU uses (keys name content, not the cache)."""
    import anyio

    async def compile_once() -> None:
        async with aioov.Core(cache_dir=tmp_path / "keys") as core:
            await core.compile_model(model, "CPU")

    anyio.run(compile_once)
    (key,) = CacheStore(tmp_path / "keys").keys()
    return key


@pytest.mark.parametrize("said", [True, False])
def test_a_waiter_compiles_by_itself_once_it_has_waited_as_long_as_the_holders_compile(
    cache_dir: Path, tmp_path: Path, mlp_path: Path, said: bool
) -> None:
    """Another process holds the model's lock and shows progress (its builder is writing the
    entry). Once it has said how long its own compile took, a worker waits no longer than
    that: it compiles the model itself, long before the lock's timeout. Until then it waits."""
    from aioov._cache import heartbeat

    key = _key_of(mlp_path, tmp_path)
    store = CacheStore(cache_dir)
    store.ensure()
    holder = store.lock(key)
    assert holder.try_acquire()
    beats = heartbeat.Heartbeats()
    beats.set(holder, holder.path, lambda: True)  # alive and working, all along
    if said:
        heartbeat.compiled(holder, 0.2)
    code = """
import json, sys, anyio, aioov
async def main():
    async with aioov.Core(cache_dir=sys.argv[1]) as core:
        compiled = await core.compile_model(sys.argv[2], "CPU", {"CACHE_LOCK_TIMEOUT": float(sys.argv[3])})
        stats = core.cache_stats
        print(json.dumps([compiled.get_property("LOADED_FROM_CACHE"), stats.lock_waits, stats.lock_timeouts]))
anyio.run(main)
"""
    try:
        timeout = 90 if said else 3  # said: it never comes to the timeout
        proc = subprocess.run([sys.executable, "-c", code, str(cache_dir), str(mlp_path), str(timeout)],
                              capture_output=True, text=True, timeout=120, env=child_env())
        assert proc.returncode == 0, proc.stderr
        from_cache, waits, timeouts = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        beats.set(holder, holder.path, None)
        holder.release()
    assert (from_cache, waits) == (False, 1)
    assert timeouts == (0 if said else 1)


async def test_when_no_variant_passes_the_caller_compiles_and_the_marker_is_published(
    cache_dir: Path, mlp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIOOV_BUILDER_FAULT", "mismatch:plain,crash:basic")
    compiled = await _compile_awaited(cache_dir, mlp_path)
    (marker,) = manifests(cache_dir)
    assert marker["not_cacheable"]["reason"].startswith("plain: an instant hit's output 0 differs")
    assert "basic: the builder was killed by SIGSEGV" in marker["not_cacheable"]["reason"]
    assert compiled.get_property("NOT_CACHED_REASON").startswith("not cacheable here: plain:")
    assert compiled.session._model_path == str(mlp_path)
    await _computes_the_source(compiled, mlp_path)


async def test_a_builder_that_cannot_run_leaves_the_caller_a_compile(
    cache_dir: Path, mlp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIOOV_BUILDER_PYTHON", "/nonexistent/python")
    compiled = await _compile_awaited(cache_dir, mlp_path)
    assert manifests(cache_dir) == []  # nothing learnt about the blob: no marker either
    assert compiled.get_property("NOT_CACHED_REASON") is None
    await _computes_the_source(compiled, mlp_path)


async def test_largest_models_are_compiled_first(tmp_path: Path, mlp_path: Path, bert_path: Path) -> None:
    small = tmp_path / "a-small.onnx"
    onnx.save(mlp(), small)
    order: list[str] = []
    async with aioov.Core() as core:
        await core.compile_all([small, bert_path, mlp_path], "CPU", max_concurrency=1,
                               progress=lambda p: order.append(Path(str(p.current.model)).name))
    # The biggest first (the longest compile, the one other workers wait longest for), then
    # in the order given among equals.
    assert order == [bert_path.name, small.name, mlp_path.name]


async def test_awaited_checks_queue_for_one_kept_builder_which_closes_when_idle(
    cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Measured: builders side by side slowed the entry everybody waited for (the largest
    model's) more than queueing cost the small ones; so one, kept, as a budget."""
    # why: a queued job gives up on the kept builder after KEPT_WAIT (5 s) and starts another;
    # this busy machine can keep it waiting that long, and no property sets the wait
    monkeypatch.setattr(_builds, "KEPT_WAIT", 120.0)  # however slow this machine
    log = tmp_path / "builders.log"
    python = tmp_path / "python"  # the builders' interpreter: notes each start, then is Python
    python.write_text(f"#!/bin/sh\necho $$ >> '{log}'\nexec '{sys.executable}' \"$@\"\n")
    python.chmod(0o755)
    monkeypatch.setenv("AIOOV_BUILDER_PYTHON", str(python))

    def started() -> list[int]:
        return [int(line) for line in log.read_text().split()] if log.exists() else []

    paths = []
    for seed in range(3):
        path = tmp_path / f"m{seed}.onnx"
        onnx.save(mlp(seed=seed), path)
        paths.append(path)
    async with aioov.Core(cache_dir=cache_dir, max_concurrent_compiles=3) as core:
        results = await core.compile_all(paths, "CPU", {"CACHE_EXPORT": "SYNC"})
        assert all(r.ok for r in results)
        assert len(started()) == 1  # one builder checked all three, one after the other
        assert _gone(started()[0], 30)  # and went away once idle (IDLE_CLOSE: 2 s)
    assert len(manifests(cache_dir)) == 3


def test_an_awaited_check_runs_at_the_callers_priority(tmp_path: Path, mlp_path: Path) -> None:
    """Background builders run at nice 10; a builder somebody waits for must not."""
    code = """
import json, os, sys, anyio, aioov
from aioov import _builds
seen = []
real = _builds._Process.run
def run(self, job, timeout, token):
    report = real(self, job, timeout, token)
    seen.append((job.background, os.getpriority(os.PRIO_PROCESS, self.popen.pid)))
    return report
_builds._Process.run = run
async def main():
    async with aioov.Core(cache_dir=sys.argv[1]) as core:
        await core.compile_model(sys.argv[2], "CPU", {"CACHE_EXPORT": sys.argv[3]})
        await core.wait_exports(120)
    print(json.dumps([seen, os.getpriority(os.PRIO_PROCESS, 0)]))
anyio.run(main)
"""
    results = {}
    for mode in ("SYNC", "ASYNC"):
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / mode), str(mlp_path), mode],
                              capture_output=True, text=True, timeout=120, env=child_env())
        assert proc.returncode == 0, proc.stderr
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    (sync_job,), parent = results["SYNC"]
    assert sync_job == [False, parent]
    (async_job,), parent = results["ASYNC"]
    assert async_job == [True, max(parent, 10)]


def _gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    return False


async def test_a_model_being_hashed_elsewhere_is_deferred_in_a_bulk_load(
    cache_dir: Path, tmp_path: Path, bert_path: Path, mlp_path: Path
) -> None:
    """Workers starting together would all read the largest model at once: one hashes it
    (holding its hash lock), the others load something else meanwhile."""
    store = CacheStore(cache_dir)
    store.ensure()
    elsewhere = store.hash_lock(str(bert_path))
    assert elsewhere.try_acquire()  # another worker is hashing BERT
    order: list[str] = []

    def progress(p: aioov.BulkProgress) -> None:
        order.append(Path(str(p.current.model)).name)
        elsewhere.release()  # that worker is done

    async with aioov.Core(cache_dir=cache_dir) as core:
        results = await core.compile_all([bert_path, mlp_path], "CPU", max_concurrency=1, progress=progress)
    assert all(r.ok for r in results)
    assert order == [mlp_path.name, bert_path.name]  # largest first, unless someone is on it


async def test_a_compile_waiting_for_a_hash_reads_the_record_instead_of_hashing(
    cache_dir: Path, mlp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aioov._cache import cache as _face
    from aioov._cache.key import FileStat, digest_files

    hashed: list[str] = []

    def counting(paths: Any) -> str:
        hashed.extend(map(str, paths))
        return digest_files(paths)

    # why: nothing public tells whether a compile hashed the model or read a record instead
    monkeypatch.setattr(_face, "digest_files", counting)
    store = CacheStore(cache_dir)
    store.ensure()
    elsewhere = store.hash_lock(str(mlp_path))
    assert elsewhere.try_acquire()
    async with aioov.Core(cache_dir=cache_dir) as core:
        async with anyio.create_task_group() as tg:
            tg.start_soon(core.compile_model, mlp_path, "CPU")
            await anyio.sleep(0.2)  # it waits for the lock
            store.index.store([FileStat.of(str(mlp_path))], digest_files([str(mlp_path)]), None)
            elsewhere.release()
        assert hashed == []
        # ... and lets the hash lock go: a third process waiting on it would wait for this one to exit
        again = store.hash_lock(str(mlp_path))
        assert again.try_acquire()
        again.release()


_HOLDS_A_STALLED_BUILD = """
import sys, time, anyio, aioov
async def main():
    core = aioov.Core(cache_dir=sys.argv[1])
    await core.compile_model(sys.argv[2], "CPU")
    print("compiled", flush=True)
    time.sleep(120)  # alive, holding the key's lock while its builder does nothing
anyio.run(main)
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes through Linux's /proc")
@pytest.mark.parametrize("how", ["hung", "stopped"])
def test_a_worker_waiting_on_a_stalled_builder_compiles_by_itself(cache_dir: Path, mlp_path: Path, how: str) -> None:
    """Another process holds the model's lock while its builder makes no progress (hung, or
    stopped with SIGSTOP): a worker needing the model compiles it after a few seconds without
    a sign of progress, instead of waiting for the lock's timeout (600 s)."""
    from .helpers import builders_of, compile_in_a_process

    holder = subprocess.Popen([sys.executable, "-c", _HOLDS_A_STALLED_BUILD, str(cache_dir), str(mlp_path)],
                              stdout=subprocess.PIPE, text=True, env=child_env(AIOOV_BUILDER_FAULT="hang:plain"))
    builders: list[int] = []
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "compiled"
        deadline = time.monotonic() + 60
        while not (builders := builders_of(holder.pid)):
            assert time.monotonic() < deadline, "no builder started"
            time.sleep(0.05)
        if how == "stopped":
            for pid in builders:
                os.kill(pid, signal.SIGSTOP)
        x = np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)
        started = time.monotonic()
        from_cache, y = compile_in_a_process(cache_dir, mlp_path, x, CACHE_LOCK_TIMEOUT=600)
        assert time.monotonic() - started < 60  # not the lock's 600 s
        assert from_cache is False
        np.testing.assert_allclose(y, reference(mlp_path, {"x": x})[0], rtol=1e-5, atol=1e-6)
        assert manifests(cache_dir) == []  # the holder's key: nothing published meanwhile
    finally:
        holder.kill()
        holder.wait()
        if holder.stdout is not None:
            holder.stdout.close()
        for pid in builders:  # one stopped before it asked to die with its parent would stay
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
