"""A Core used before ``fork()`` works in the child (gunicorn ``--preload``, multiprocessing's
fork start method), and a child never holds on to its parent's cache locks (#40, #41).

Each case runs in a fresh interpreter, so that the fork happens in a process whose threads
are aioov's alone, with an alarm: a hang fails the test instead of hanging the suite.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from aioov._cache.store import CacheStore
from aioov.testing import mlp

from .helpers import child_env, make_models, run_python

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX's")

_PRELOADED = """
import os, signal, sys, anyio, numpy as np, aioov
signal.alarm(60)
cache, first, second = sys.argv[1:4]
core = aioov.Core(cache_dir=cache)

async def preload():
    compiled = await core.compile_model(first, "CPU")
    return compiled  # its export may still be running in the parent's builder

preloaded = anyio.run(preload)
x = np.ones((2, 8), np.float32)
pids = []
for _ in range(2):  # as a pre-forking server starts its workers
    pid = os.fork()
    if pid == 0:
        signal.alarm(30)
        async def worker():
            other = await core.compile_model(second, "CPU")
            a = (await preloaded.infer({"x": x}))["y"]
            b = (await other.infer({"x": x}))["y"]
            await core.aclose()
            return a.shape, b.shape
        print("child", anyio.run(worker), flush=True)
        os._exit(0)
    pids.append(pid)
codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]

async def parent():
    other = await core.compile_model(second, "CPU")
    await core.wait_exports(60)
    await core.aclose()
    return (await other.infer({"x": x}))["y"].shape

print("parent", anyio.run(parent), codes, flush=True)
"""


@pytest.fixture(scope="module")
def second(model_dir: Path) -> Path:
    path = model_dir / "fork_second.onnx"
    onnx.save(mlp(seed=5), path)
    return path


def test_a_core_used_before_fork_compiles_and_infers_in_the_children(
    cache_dir: Path, mlp_path: Path, second: Path
) -> None:
    out = run_python(_PRELOADED, str(cache_dir), str(mlp_path), str(second), timeout=120).stdout.splitlines()
    assert sorted(out) == ["child ((2, 4), (2, 4))", "child ((2, 4), (2, 4))", "parent (2, 4) [0, 0]"]


_HASHED_BEFORE_FORK = """
import os, sys, anyio, aioov
cache, first, second = sys.argv[1:4]
core = aioov.Core(cache_dir=cache)
anyio.run(core.compile_model, first, "CPU")  # hashes a model of a few MB on blake3's threads
pid = os.fork()
if pid == 0:
    anyio.run(core.compile_model, second, "CPU")  # a model the parent has not hashed
    os._exit(0)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status), flush=True)
"""


def test_a_child_hashes_models_after_its_parent_hashed_one(cache_dir: Path, tmp_path: Path) -> None:
    """blake3 hashes large files on a thread pool that it starts in the parent and that a forked
    child does not have: the child's first hash of a model waited for those threads for ever."""
    first, second = make_models(tmp_path / "models", 2)
    assert run_python(_HASHED_BEFORE_FORK, str(cache_dir), str(first), str(second), timeout=120).stdout.strip() == "0"


_MULTIPROCESSING = """
import multiprocessing, sys, anyio, numpy as np, aioov
cache, first, second = sys.argv[1:4]
core = aioov.Core(cache_dir=cache)
preloaded = anyio.run(core.compile_model, first, "CPU")
assert core.pending_exports == 1  # the pool forks with the export in flight (a slow builder)

def work(path):
    async def run():
        compiled = await core.compile_model(path, "CPU")
        return (await compiled.infer({"x": np.ones((1, 8), np.float32)}))["y"].shape
    return anyio.run(run)

if __name__ == "__main__":
    with multiprocessing.get_context("fork").Pool(2) as pool:
        print(pool.map(work, [first, second], chunksize=1), flush=True)
    print(anyio.run(core.wait_exports, 60), flush=True)
"""


def test_multiprocessing_with_the_fork_start_method(cache_dir: Path, mlp_path: Path, second: Path) -> None:
    out = run_python(_MULTIPROCESSING, str(cache_dir), str(mlp_path), str(second), timeout=120,
                     env={"AIOOV_BUILDER_FAULT": "slow:plain"}).stdout
    assert out.strip().splitlines() == ["[(1, 4), (1, 4)]", "True"]


_HOLDS_AND_FORKS = """
import os, sys, time
from aioov._cache.store import CacheStore
lock = CacheStore(sys.argv[1]).lock("ab" * 16)
assert lock.try_acquire()
if os.fork() == 0:  # a pool worker, say: lives on after its parent
    time.sleep(60)
    os._exit(0)
print("holding", flush=True)
time.sleep(60)
"""


def test_a_child_forked_under_a_key_lock_does_not_keep_it_when_the_parent_dies(cache_dir: Path) -> None:
    store = CacheStore(cache_dir)
    store.ensure()
    with subprocess.Popen([sys.executable, "-c", _HOLDS_AND_FORKS, str(cache_dir)], stdout=subprocess.PIPE,
                          text=True, env=child_env(), start_new_session=True) as parent:
        try:
            assert parent.stdout is not None and parent.stdout.readline().strip() == "holding"
            assert not store.lock("ab" * 16).try_acquire()  # the parent holds it
            parent.kill()
            parent.wait()
            deadline = time.monotonic() + 10
            lock = store.lock("ab" * 16)
            while not lock.try_acquire():  # the child lives on, and must not hold it
                assert time.monotonic() < deadline, "the forked child kept its parent's lock"
                time.sleep(0.05)
            lock.release()
        finally:
            os.killpg(parent.pid, signal.SIGKILL)


_FORKED_MID_INFERENCE = """
import os, signal, sys, threading, anyio, numpy as np, aioov
signal.alarm(60)
core = aioov.Core()
compiled = anyio.run(core.compile_model, sys.argv[1], "CPU")
x = np.ones((64, 8), np.float32)
running, stop = threading.Event(), threading.Event()

def serve():  # another thread's event loop, inferring all along
    async def loop():
        while not stop.is_set():
            await compiled.infer({"x": x})
            running.set()
    anyio.run(loop)

thread = threading.Thread(target=serve, daemon=True)
thread.start()
running.wait()
codes = []
for _ in range(5):
    pid = os.fork()
    if pid == 0:
        signal.alarm(20)
        anyio.run(compiled.infer, {"x": x})
        os._exit(0)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
stop.set()
thread.join()
print(codes)
"""


def test_a_model_forked_while_another_thread_runs_it_serves_in_the_child(mlp_path: Path) -> None:
    """The fork lands while a run holds the model's NUM_STREAMS slot: the child, where that run
    never ends, gets slots of its own."""
    out = run_python(_FORKED_MID_INFERENCE, str(mlp_path), timeout=120).stdout
    assert out.strip().splitlines()[-1] == "[0, 0, 0, 0, 0]"  # a hung child dies of its alarm (-14)
