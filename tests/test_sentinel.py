"""A cached blob that crashes at a shape no check tried kills at most one process per host.

The crash is real: a serving process that loaded the entry has its session's ``run`` replaced
(through the public ``CompiledModel.session``) by one that sends itself SIGSEGV at text-line
widths of 16 and more, as onnxruntime's prepacked kernels did for a real OCR recognizer.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aioov._cache.sentinel import Sentinels, ShapeGuard

from .helpers import child_env, compile_in_a_process, manifests, reference, run_python

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="tells dead processes by Linux's /proc")

CONFIG = {"CACHE_PREPACK": "ALWAYS", "CACHE_EXPORT": "SYNC"}
#: the order a CPU entry's variants are tried in with ALWAYS; the first may be refused before it
#: runs (prepacked weights onnxruntime saved unaligned, which depends on the CPU's kernels)
ORDER = ("prepacked", "plain", "basic")

_DIES_AT_A_WIDE_LINE = """
import json, signal, sys, threading, anyio, numpy as np, aioov
async def main():
    async with aioov.Core(cache_dir=sys.argv[1]) as core:
        compiled = await core.compile_model(sys.argv[2], "CPU", json.loads(sys.argv[3]))
        print("from cache" if compiled.get_property("LOADED_FROM_CACHE") else "compiled", flush=True)
        session = compiled.session
        run = session.run
        def crashes_when_wide(outputs, feed, *args):
            if feed["x"].shape[-1] >= 16:  # as a real fault: in this thread, at once
                signal.pthread_kill(threading.get_ident(), signal.SIGSEGV)
            return run(outputs, feed, *args)
        session.run = crashes_when_wide
        for width in (8, 8, 320):
            await compiled.infer({"x": np.zeros((1, 3, 48, width), np.float32)})
            print("ran at", width, flush=True)
anyio.run(main)
"""


def _line(width: int) -> np.ndarray:
    return np.random.default_rng(width).standard_normal((1, 3, 48, width)).astype(np.float32)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_python("import sys; from aioov.cli import main; sys.exit(main())", *args, check=False)


def test_a_process_that_dies_in_a_new_shape_gets_the_variant_quarantined(cache_dir: Path, text_line_path: Path) -> None:
    compile_in_a_process(cache_dir, text_line_path, _line(8), **CONFIG)  # publishes the prepacked entry
    (entry,) = manifests(cache_dir)
    first = entry["build"]["variant"]
    assert first in ORDER[:2]

    dies = subprocess.run([sys.executable, "-c", _DIES_AT_A_WIDE_LINE, str(cache_dir), str(text_line_path),
                           json.dumps(CONFIG)], capture_output=True, text=True, timeout=120, env=child_env())
    assert dies.returncode == -signal.SIGSEGV, dies.stderr
    assert dies.stdout.split("\n")[:3] == ["from cache", "ran at 8", "ran at 8"]  # width 8 ran, 320 killed it

    # Before any process loads the entry again, verify sees what happened (and leaves it, dry run)
    found = json.loads(_cli("cache", "verify", "--dry-run", "--json", "--cache-dir", str(cache_dir)).stdout)
    (bad,) = found["bad"]
    assert "a process died running it" in bad["problem"] and "x[1, 3, 48, 320]" in bad["problem"]

    # The next process finds the record, quarantines the prepacked entry, compiles, and answers right
    hit, y = compile_in_a_process(cache_dir, text_line_path, _line(320), **CONFIG)
    assert not hit
    np.testing.assert_allclose(y, reference(text_line_path, {"x": _line(320)})[0], rtol=1e-4, atol=1e-5)
    (entry,) = manifests(cache_dir)
    assert entry["build"]["variant"] == ORDER[ORDER.index(first) + 1]  # the next build skipped the one that crashed
    assert f"died running its {first} blob at inputs x[1, 3, 48, 320]" in entry["build"]["crashed"][first]

    listed = _cli("cache", "ls", "--cache-dir", str(cache_dir)).stdout
    assert f"({first} blob killed a process)" in listed
    # ... and every later process loads the plain blob, which runs at every width
    for width in (8, 320):
        hit, y = compile_in_a_process(cache_dir, text_line_path, _line(width), **CONFIG)
        assert hit
        np.testing.assert_allclose(y, reference(text_line_path, {"x": _line(width)})[0], rtol=1e-4, atol=1e-5)


def test_the_next_process_says_what_happened(cache_dir: Path, text_line_path: Path) -> None:
    compile_in_a_process(cache_dir, text_line_path, _line(8), **CONFIG)
    (entry,) = manifests(cache_dir)
    dies = subprocess.run([sys.executable, "-c", _DIES_AT_A_WIDE_LINE, str(cache_dir), str(text_line_path),
                           json.dumps(CONFIG)], capture_output=True, text=True, timeout=120, env=child_env())
    assert (dies.returncode, dies.stdout.split("\n")[0]) == (-signal.SIGSEGV, "from cache"), dies.stderr
    code = """
import json, logging, sys, anyio, aioov
logging.basicConfig()  # aioov's logger has a NullHandler: an application configures its log
async def main():
    async with aioov.Core(cache_dir=sys.argv[1]) as core:
        compiled = await core.compile_model(sys.argv[2], "CPU", json.loads(sys.argv[3]))
    print(compiled.get_property("LOADED_FROM_CACHE"))
anyio.run(main)
"""
    after = run_python(code, str(cache_dir), str(text_line_path), json.dumps(CONFIG))
    assert after.stdout.strip() == "False"
    assert f"the cached {entry['build']['variant']} blob of" in after.stderr and "killed a process" in after.stderr
    assert "text_line.onnx" in after.stderr


def test_every_variant_that_crashed_leaves_a_marker_not_a_loop(cache_dir: Path, text_line_path: Path) -> None:
    compile_in_a_process(cache_dir, text_line_path, _line(8), **CONFIG)
    (entry,) = manifests(cache_dir)
    for expected in ORDER[ORDER.index(entry["build"]["variant"]):]:
        compile_in_a_process(cache_dir, text_line_path, _line(8), **CONFIG)
        (entry,) = manifests(cache_dir)
        assert entry["build"]["variant"] == expected
        dies = subprocess.run([sys.executable, "-c", _DIES_AT_A_WIDE_LINE, str(cache_dir), str(text_line_path),
                               json.dumps(CONFIG)], capture_output=True, text=True, timeout=120, env=child_env())
        assert (dies.returncode, dies.stdout.split("\n")[0]) == (-signal.SIGSEGV, "from cache"), dies.stderr
    hit, y = compile_in_a_process(cache_dir, text_line_path, _line(320), **CONFIG)
    assert not hit
    (marker,) = manifests(cache_dir)
    assert "basic: process" in marker["not_cacheable"]["reason"]
    np.testing.assert_allclose(y, reference(text_line_path, {"x": _line(320)})[0], rtol=1e-4, atol=1e-5)
    # A process that dies now dies of its own doing: nothing of the cache runs in it
    dies = subprocess.run([sys.executable, "-c", _DIES_AT_A_WIDE_LINE, str(cache_dir), str(text_line_path),
                           json.dumps(CONFIG)], capture_output=True, text=True, timeout=120, env=child_env())
    assert dies.stdout.startswith("compiled")


def _records(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.run")) if folder.is_dir() else []


def test_a_run_that_returns_or_raises_leaves_no_record(tmp_path: Path) -> None:
    sentinels = Sentinels(tmp_path)
    guard = ShapeGuard(sentinels, "ab" * 16, "plain")
    token = guard.begin({"x": np.zeros((1, 4))})
    (record,) = _records(tmp_path / ("ab" * 16))
    assert json.loads(record.read_text())["inputs"] == "x[1, 4]"
    assert sentinels.crashes("ab" * 16) == []  # held by this process: not a crash
    guard.end(token)
    assert _records(tmp_path / ("ab" * 16)) == []
    assert sentinels.crashes("ab" * 16) == []


def test_a_shape_already_run_leaves_no_record(tmp_path: Path) -> None:
    guard = ShapeGuard(Sentinels(tmp_path), "ab" * 16, "plain")
    guard.end(guard.begin({"x": np.zeros((1, 4))}))
    assert guard.begin({"x": np.ones((1, 4))}) is None  # the same shape: nothing written
    in_flight = guard.begin({"x": np.ones((1, 5))})
    guard.reset()  # a new session of the entry (an instant hit's full-speed one): every shape is new again
    guard.end(in_flight)  # ... and a run of the old session that ends after the swap counts for none
    for width in (4, 5):
        token = guard.begin({"x": np.ones((1, width))})
        assert token is not None
        guard.end(token)


def test_a_record_of_a_live_process_is_not_a_crash(tmp_path: Path) -> None:
    """Another process in the middle of its first run: its record stays, nothing is quarantined.
    Its lock, not its pid, says it lives: this holds across pid namespaces (containers)."""
    code = """
import sys, time
from pathlib import Path
from aioov._cache.sentinel import Sentinels
run = Sentinels(Path(sys.argv[1])).begin("ab" * 16, "plain", "x[1, 16]")
print("running", flush=True)
time.sleep(60)
"""
    with subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                          env=child_env()) as running:
        try:
            assert running.stdout is not None and running.stdout.readline().strip() == "running"
            assert Sentinels(tmp_path).crashes("ab" * 16) == []
        finally:
            running.kill()
    (crash,) = Sentinels(tmp_path).crashes("ab" * 16)  # killed in its run: now it is one
    assert crash.pid == running.pid and crash.inputs == "x[1, 16]"
    assert _records(tmp_path / ("ab" * 16)) == []


def test_crashed_variants_are_remembered_one_file_each_and_forgotten_by_clear(
    cache_dir: Path, text_line_path: Path
) -> None:
    compile_in_a_process(cache_dir, text_line_path, _line(8), **CONFIG)
    (key,) = [e["key"] for e in manifests(cache_dir)]
    from aioov._cache.sentinel import Crash
    from aioov._cache.store import CacheStore

    store = CacheStore(cache_dir)
    for variant in ("prepacked", "plain"):  # as two processes would, each its own file: neither is lost
        store.sentinels.remember(Crash(key, variant, "x[1, 3, 48, 320]", 1, "host", 0.0))
    assert set(store.sentinels.crashed(key)) == {"prepacked", "plain"}
    assert _cli("cache", "clear", "--yes", "--cache-dir", str(cache_dir)).returncode == 0
    assert store.sentinels.crashed(key) == {}
    assert list(store.sentinels.root.iterdir()) == []
