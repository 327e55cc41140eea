"""Shutdown is bounded, whatever a builder does; background work never outranks serving.

A server's worker gets SIGTERM and some seconds to leave (Kubernetes: 30). Leaving a Core
gives pending cache exports ``CLOSE_TIMEOUT`` (10 s) and then abandons them; cancelling the
close abandons at once; an interpreter that exits without closing its Core is not held up
for longer. Nothing half-written is left, no builder outlives its application, and the next
process gets a correct model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import numpy as np
import onnx
import pytest

import aioov
from aioov.testing import mlp

from .helpers import builders_of, child_env, compile_in_a_process, gone, manifests, reference

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes through Linux's /proc")

#: the documented bounds (docs/deployment.md, "Graceful shutdown"), and slack for a busy machine
CLOSE_TIMEOUT = 10.0
ABANDON_WAIT = 5.0
SLACK = 10.0

_SERVER = """
import signal, sys, anyio, aioov
async def main():
    async with aioov.Core(cache_dir=sys.argv[1]) as core:
        with anyio.open_signal_receiver(signal.SIGTERM) as signals:
            await core.compile_model(sys.argv[2], "CPU")
            print("compiled", flush=True)
            async for _ in signals:  # a graceful stop: leave the Core as usual
                break
anyio.run(main)
"""

_CANCELLED_SERVER = """
import signal, sys, anyio, aioov
async def stop_on_sigterm(scope):
    with anyio.open_signal_receiver(signal.SIGTERM) as signals:
        async for _ in signals:
            scope.cancel()  # everything, the Core's close included
async def main():
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_on_sigterm, scope)
            async with aioov.Core(cache_dir=sys.argv[1]) as core:
                await core.compile_model(sys.argv[2], "CPU")
                print("compiled", flush=True)
                await anyio.sleep_forever()
anyio.run(main)
"""

_NEVER_CLOSED = """
import sys, anyio, aioov
async def main():
    core = aioov.Core(cache_dir=sys.argv[1])
    await core.compile_model(sys.argv[2], "CPU")
    print("compiled", flush=True)
anyio.run(main)
"""


def _start(code: str, cache_dir: Path, model: Path, **env: str) -> subprocess.Popen[str]:
    app = subprocess.Popen([sys.executable, "-c", code, str(cache_dir), str(model)], stdout=subprocess.PIPE,
                           text=True, env=child_env(**env))
    assert app.stdout is not None and app.stdout.readline().strip() == "compiled"
    return app


def _stop_its_builder(app: subprocess.Popen[str], cache_dir: Path) -> list[int]:
    """Stop (SIGSTOP) the builder writing the app's entry, once it writes: it can no longer
    notice anything."""
    deadline = time.monotonic() + 60
    while not (builders := builders_of(app.pid)) or not _writing(cache_dir):
        if time.monotonic() > deadline:
            app.kill()  # not left to be collected (and warned of) during a later test
            app.communicate()
            pytest.fail("no builder started writing")
        time.sleep(0.02)
    for pid in builders:
        os.kill(pid, signal.SIGSTOP)
    return builders


def _writing(cache_dir: Path) -> bool:
    return any(any(p.iterdir()) for p in cache_dir.rglob("*.incomplete") if p.is_dir())


def _nothing_half_written(cache_dir: Path) -> None:
    assert [p for p in cache_dir.rglob("*") if p.name.endswith(".incomplete")] == []
    assert manifests(cache_dir) == []


def _next_process_is_served_correctly(cache_dir: Path, model: Path) -> None:
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)
    for expect_hit in (False, True):  # the entry published before the first returns, on a busy machine too
        from_cache, y = compile_in_a_process(cache_dir, model, x, CACHE_ALWAYS=True, CACHE_EXPORT="SYNC")
        assert from_cache is expect_hit
        np.testing.assert_allclose(y, reference(model, {"x": x})[0], rtol=1e-5, atol=1e-6)


def _finish(app: subprocess.Popen[str], within: float) -> float:
    started = time.monotonic()
    try:
        assert app.wait(within + SLACK) == 0
    finally:
        app.kill()
        app.wait()
        assert app.stdout is not None
        app.stdout.close()
    return time.monotonic() - started


def test_a_sigtermed_worker_with_a_stopped_builder_exits_within_the_close_timeout(
    cache_dir: Path, mlp_path: Path
) -> None:
    app = _start(_SERVER, cache_dir, mlp_path, AIOOV_BUILDER_FAULT="hang:plain")
    builders = _stop_its_builder(app, cache_dir)
    app.send_signal(signal.SIGTERM)
    assert _finish(app, CLOSE_TIMEOUT + ABANDON_WAIT) < CLOSE_TIMEOUT + ABANDON_WAIT + SLACK
    assert all(gone(pid, 10) for pid in builders)
    _nothing_half_written(cache_dir)
    _next_process_is_served_correctly(cache_dir, mlp_path)


def test_a_cancelled_close_abandons_at_once(cache_dir: Path, mlp_path: Path) -> None:
    app = _start(_CANCELLED_SERVER, cache_dir, mlp_path, AIOOV_BUILDER_FAULT="hang:plain")
    builders = _stop_its_builder(app, cache_dir)
    app.send_signal(signal.SIGTERM)
    assert _finish(app, ABANDON_WAIT) < ABANDON_WAIT + SLACK
    assert all(gone(pid, 10) for pid in builders)
    _nothing_half_written(cache_dir)


#: CPython 3.12.0-3.12.2 refuse to start a thread while the interpreter exits (gh-113964): the
#: export a Core never closed leaves at exit cannot start its builder's reader there
_NO_THREADS_AT_EXIT = pytest.mark.skipif((3, 12) <= sys.version_info[:3] < (3, 12, 3),
                                         reason="CPython 3.12.0-3.12.2 start no thread at exit (gh-113964)")


@_NO_THREADS_AT_EXIT
def test_a_core_never_closed_does_not_keep_the_interpreter_alive(cache_dir: Path, mlp_path: Path) -> None:
    app = _start(_NEVER_CLOSED, cache_dir, mlp_path, AIOOV_BUILDER_FAULT="hang:plain")
    builders = _stop_its_builder(app, cache_dir)
    assert _finish(app, CLOSE_TIMEOUT + ABANDON_WAIT) < CLOSE_TIMEOUT + ABANDON_WAIT + SLACK
    assert all(gone(pid, 10) for pid in builders)
    _nothing_half_written(cache_dir)


@_NO_THREADS_AT_EXIT
def test_a_core_never_closed_still_publishes_what_it_exports(cache_dir: Path, mlp_path: Path) -> None:
    """The bound is for exports that cannot finish: a script that compiles and ends gets its entry."""
    app = _start(_NEVER_CLOSED, cache_dir, mlp_path)
    _finish(app, CLOSE_TIMEOUT)
    assert [m["build"]["check"] for m in manifests(cache_dir)] == ["ran and matched"]


def test_a_killed_application_takes_its_stopped_builder_along(cache_dir: Path, mlp_path: Path) -> None:
    """A stopped builder cannot see its stdin close: the kernel kills it with its parent."""
    app = _start(_SERVER, cache_dir, mlp_path, AIOOV_BUILDER_FAULT="hang:plain")
    builders = _stop_its_builder(app, cache_dir)
    app.kill()
    app.wait()
    assert app.stdout is not None
    app.stdout.close()
    assert all(gone(pid, 10) for pid in builders)


@pytest.mark.anyio
async def test_waiting_for_exports_can_be_cancelled(
    cache_dir: Path, mlp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIOOV_BUILDER_FAULT", "hang:plain")
    async with aioov.Core(cache_dir=cache_dir) as core:
        await core.compile_model(mlp_path, "CPU")
        started = time.monotonic()
        with anyio.move_on_after(0.3):
            await core.wait_exports()
        assert time.monotonic() - started < 5
        assert core.pending_exports == 1  # the wait stopped, not the export
        await core.aclose(abandon=True)
    assert manifests(cache_dir) == []


_PRIORITIES = """
import json, os, sys, threading, time, anyio, aioov
from aioov._priority import priority_of
async def main():
    async with aioov.Core(cache_dir=sys.argv[1]) as core:
        await core.compile_model(sys.argv[2], "CPU")
        me = os.getpid()

        def builder(p):  # a process may end between listdir and open
            try:
                return (b"aioov._builder" in open(f"/proc/{p}/cmdline", "rb").read()
                        and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1] == str(me))
            except OSError:
                return False

        for _ in range(600):
            builders = [int(p) for p in os.listdir("/proc") if p.isdigit() and builder(p)]
            if builders:
                break
            await anyio.sleep(0.05)
        builder = builders[0]

        def oom():
            return int(open(f"/proc/{builder}/oom_score_adj").read())

        # Its first act in main(); an idle-class builder beside a busy loop may take a while to get there.
        for _ in range(600):
            if oom() == 1000:
                break
            time.sleep(0.1)
        threads = {t.name: priority_of(t.native_id) for t in threading.enumerate() if t.native_id}
        tasks = [priority_of(int(t)) for t in os.listdir(f"/proc/{me}/task")]
        report = {"export": threads["aioov-export"], "upload": threads["aioov-upload"],
                  "builder": priority_of(builder),
                  "oom": oom(),
                  "lowest_nice": min(nice for nice, _ in tasks), "me": priority_of(me)}
        print(json.dumps(report), flush=True)
        await core.aclose(abandon=True)
anyio.run(main)
"""


@pytest.mark.parametrize("nice", [0, 19])
def test_background_work_runs_idle_and_never_above_its_parent(cache_dir: Path, mlp_path: Path, nice: int) -> None:
    proc = subprocess.run([sys.executable, "-c", _PRIORITIES, str(cache_dir), str(mlp_path)],
                          capture_output=True, text=True, timeout=120, preexec_fn=lambda: os.nice(nice),
                          env=child_env(AIOOV_BUILDER_FAULT="hang:plain"))
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    parent_nice = report["me"][0]
    assert parent_nice == max(nice, os.getpriority(os.PRIO_PROCESS, 0))
    expected = max(parent_nice, 10)
    idle = "SCHED_IDLE" if hasattr(os, "SCHED_IDLE") else report["me"][1]
    assert report["export"] == [expected, idle]
    assert report["builder"] == [expected, idle]
    assert report["upload"] == report["me"]  # uploads need little CPU, and must not be starved of it
    assert report["lowest_nice"] >= parent_nice  # no thread of the application raised itself
    assert report["oom"] == 1000  # the kernel's OOM killer takes the builder, not the application


#: a module planted in the working directory: it notes which process imported it, then hands
#: over to the real module (so that an application that imports it too still works)
_IMPORTS_FROM_CWD = """
import importlib, os, pathlib, sys
here = pathlib.Path(__file__)
here.with_name(f"{here.stem}.{os.getpid()}.ran").write_text("imported")
sys.path[:] = [p for p in sys.path if pathlib.Path(p or ".").resolve() != here.parent.resolve()]
del sys.modules[__name__]
sys.modules[__name__] = importlib.import_module(__name__)
"""

_APP = """
import os, sys, anyio, aioov
sys.path.insert(0, os.getcwd())  # what gunicorn does (--chdir)
sys.path.insert(0, sys.argv[3])  # and what applications do: their own folder first
async def main():
    async with aioov.Core(cache_dir=sys.argv[1]) as core:
        await core.compile_model(sys.argv[2], "CPU")
        assert await core.wait_exports(120)
    print(os.getpid())
anyio.run(main)
"""


@pytest.mark.parametrize("start", ["script", "module"])
def test_the_builder_imports_nothing_from_the_working_directory(cache_dir: Path, mlp_path: Path,
                                                                tmp_path: Path, start: str) -> None:
    """Started as ``python app.py`` or ``python -m app``, with the working directory on the
    application's path (as gunicorn puts it) behind what the application put first, the
    builder never runs a ``json.py`` planted in the working directory."""
    work = tmp_path / "work"
    work.mkdir()
    for name in ("json", "numpy", "onnxruntime", "sitecustomize"):
        (work / f"{name}.py").write_text(_IMPORTS_FROM_CWD)
    app = (tmp_path / "app" / "app.py") if start == "script" else work / "app.py"
    app.parent.mkdir(exist_ok=True)
    app.write_text(_APP)
    command = [str(app)] if start == "script" else ["-m", "app"]
    extra = tmp_path / "extra"
    proc = subprocess.run([sys.executable, *command, str(cache_dir), str(mlp_path), str(extra)], cwd=work,
                          capture_output=True, text=True, timeout=120, env=child_env())
    assert proc.returncode == 0, proc.stderr
    parent = proc.stdout.strip().splitlines()[-1]
    importers = {p.name.split(".")[1] for p in work.glob("*.ran")}
    assert importers <= {parent}  # the application's own imports, where it put the folder on its path
    assert [m["build"]["check"] for m in manifests(cache_dir)] == ["ran and matched"]


@pytest.mark.anyio
async def test_a_closed_core_leaves_no_thread_behind(tmp_path: Path) -> None:
    """Servers that make a Core per request, or per test, must not pile up threads: each closed
    Core once left its cache's heartbeat thread running for good (one more thread per Core,
    each counted against the process's thread limit)."""
    def ours() -> list[str]:
        return sorted(t.name for t in threading.enumerate() if t.name.startswith("aioov-"))

    before = ours()
    for seed in range(5):
        path = tmp_path / f"m{seed}.onnx"
        onnx.save(mlp(seed=seed), path)
        async with aioov.Core(cache_dir=tmp_path / "cache") as core:
            await core.compile_model(path, "CPU", {"CACHE_ALWAYS": True})
            assert await core.wait_exports(120)
            assert core.cache_stats.exports == 1
    for _ in range(100):  # a heartbeat thread notices within one beat that it has nothing to do
        if ours() == before:
            break
        await anyio.sleep(0.1)
    assert ours() == before
