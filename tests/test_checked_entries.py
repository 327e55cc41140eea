"""A cache hit is always the same model: entries are written and checked in a builder process.

The builder's fault switch (``AIOOV_BUILDER_FAULT``) makes it write blobs that crash the process
loading them (a real SIGSEGV) or that compute something else (a real extra node in the graph),
as onnxruntime's serializer once did with a real OCR model; the serving process must live, and
later processes must load only a blob that was checked.
"""

from __future__ import annotations

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
from onnx import TensorProto, helper

import aioov
from aioov import _builds
from aioov._cache.store import CacheStore
from aioov._reference import compare
from aioov.testing import bert_like

from .helpers import builders_of as _builders_of
from .helpers import child_env, compile_in_a_process, manifests, reference, run_python
from .helpers import gone as _gone
from .helpers import wait_for_builders as _wait_for_builders

pytestmark = pytest.mark.anyio


def _x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)


async def _compile_and_export(cache_dir: Path, model: Path | bytes, **config: Any) -> aioov.CompiledModel:
    async with aioov.Core(cache_dir=cache_dir) as core:
        compiled = await core.compile_model(model, "CPU", config)
        assert await core.wait_exports(120)
    return compiled


async def test_an_entry_says_how_its_blob_was_checked(cache_dir: Path, mlp_path: Path) -> None:
    await _compile_and_export(cache_dir, mlp_path)
    (manifest,) = manifests(cache_dir)
    record = manifest["build"]
    assert record["check"] == "ran and matched"
    assert record["checked"][0] == "x[1,8]" and "x[2,8]" in record["checked"]  # a batch above 1 too
    assert record["load_seconds"] > 0 and record["instant_load_seconds"] > 0
    # A two-layer perceptron has nothing worth prepacking: the plain blob, and why
    if record["variant"] == "plain":
        assert record["prepacked"].startswith(("not tried", "not worth it"))


async def test_a_free_dimension_is_checked_small_large_and_batched(cache_dir: Path, text_line_path: Path) -> None:
    await _compile_and_export(cache_dir, text_line_path, CHECK_SHAPES=[{"x": [1, 3, 48, 100]}])
    (manifest,) = manifests(cache_dir)
    checked = manifest["build"]["checked"]
    assert checked[0] == "x[1,3,48,8]"  # the shape first made up, then the user's, then the rest
    assert checked[1:3] == ["x[1,3,48,100]", "x[1,3,48,1]"] and checked[4] == "x[2,3,48,8]"
    # a text line's real width, or half of it (and so on) where one run would take too long
    assert checked[3] in {"x[1,3,48,320]", "x[1,3,48,160]", "x[1,3,48,80]", "x[1,3,48,40]"}


@pytest.mark.parametrize("prepack", ["NEVER", "NO", False])
async def test_without_prepacked_weights_the_plain_blob_is_written(
    cache_dir: Path, mlp_path: Path, prepack: object
) -> None:
    await _compile_and_export(cache_dir, mlp_path, CACHE_PREPACK=prepack)
    (manifest,) = manifests(cache_dir)
    assert manifest["build"]["variant"] == "plain"
    assert "prepacked" not in manifest["build"]


async def test_always_prepacked_weights_are_published_where_they_pass(cache_dir: Path, mlp_path: Path) -> None:
    await _compile_and_export(cache_dir, mlp_path, CACHE_PREPACK="ALWAYS")
    (manifest,) = manifests(cache_dir)
    # prepacked, unless onnxruntime saved its packed weights unaligned here (they depend on the CPU)
    assert manifest["build"]["variant"] == "prepacked" or "not aligned" in manifest["build"]["failed"][0]
    hit, y = compile_in_a_process(cache_dir, mlp_path, _x(), CACHE_PREPACK="ALWAYS")
    assert hit
    np.testing.assert_allclose(y, reference(mlp_path, {"x": _x()})[0], rtol=1e-5, atol=1e-6)


async def test_a_blob_that_crashes_at_a_real_input_width_is_not_published(
    cache_dir: Path, text_line_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The crash that made checks run at several shapes: a prepacked OCR recognizer ran at a
    width of 8 and crashed every process from 15 on."""
    monkeypatch.setenv("AIOOV_BUILDER_FAULT", "crashwide:prepacked")
    await _compile_and_export(cache_dir, text_line_path, CACHE_PREPACK="ALWAYS")
    (manifest,) = manifests(cache_dir)
    assert manifest["build"]["variant"] == "plain"
    (failed,) = manifest["build"]["failed"]  # killed at width 320 (or refused as unaligned before it ran)
    assert failed == "prepacked: the builder was killed by SIGSEGV" or "not aligned" in failed
    monkeypatch.delenv("AIOOV_BUILDER_FAULT")
    x = np.random.default_rng(1).standard_normal((1, 3, 48, 320)).astype(np.float32)
    hit, y = compile_in_a_process(cache_dir, text_line_path, x, CACHE_PREPACK="ALWAYS")
    assert hit
    np.testing.assert_allclose(y, reference(text_line_path, {"x": x})[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("fault", "prepack", "variant"), [
    ("crash:prepacked", "ALWAYS", "plain"), ("mismatch:prepacked", "ALWAYS", "plain"),
    ("crash:prepacked,mismatch:plain", "ALWAYS", "basic"), ("crash:plain", "AUTO", "basic"),
])
@pytest.mark.parametrize("export", ["ASYNC", "SYNC"])  # SYNC: this process then loads the entry
async def test_a_bad_blob_falls_back_to_the_next_variant(
    cache_dir: Path, mlp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: str, prepack: str, variant: str,
    export: str,
) -> None:
    monkeypatch.setenv("AIOOV_BUILDER_FAULT", fault)
    compiled = await _compile_and_export(cache_dir, mlp_path, CACHE_EXPORT=export, CACHE_PREPACK=prepack)
    assert not compiled.get_property("LOADED_FROM_CACHE")  # and this process is alive to say so
    (manifest,) = manifests(cache_dir)
    assert manifest["build"]["variant"] == variant
    y = (await compiled.infer({"x": _x()}))["y"]
    np.testing.assert_allclose(y, reference(mlp_path, {"x": _x()})[0], rtol=1e-5, atol=1e-6)
    assert [f.split(":")[0] for f in manifest["build"]["failed"]] == [f.split(":")[1] for f in fault.split(",")]
    monkeypatch.delenv("AIOOV_BUILDER_FAULT")
    # A second process loads the checked blob and computes what onnxruntime does.
    hit, y = compile_in_a_process(cache_dir, mlp_path, _x(), CACHE_PREPACK=prepack)
    assert hit
    np.testing.assert_allclose(y, reference(mlp_path, {"x": _x()})[0], rtol=1e-5, atol=1e-6)


async def test_when_no_variant_passes_a_marker_stops_retries(
    cache_dir: Path, mlp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIOOV_BUILDER_FAULT", "mismatch:plain,crash:basic")
    await _compile_and_export(cache_dir, mlp_path)
    (marker,) = manifests(cache_dir)
    reason = marker["not_cacheable"]["reason"]
    assert "plain: an instant hit's output" in reason  # checked first: it loads at once
    assert "basic: the builder was killed by SIGSEGV" in reason
    assert marker["not_cacheable"]["onnxruntime"]

    async with aioov.Core(cache_dir=cache_dir) as core:
        compiled = await core.compile_model(mlp_path, "CPU")
        assert core.pending_exports == 0  # nothing to export: the marker says it is pointless
        stats = core.cache_stats
    assert not compiled.get_property("LOADED_FROM_CACHE")
    assert compiled.get_property("NOT_CACHED_REASON").startswith("not cacheable here: plain:")
    assert stats.exports == 0
    out = await compiled.infer({"x": _x()})
    np.testing.assert_allclose(out["y"], reference(mlp_path, {"x": _x()})[0], rtol=1e-5, atol=1e-6)

    listed = json.loads(run_python("from aioov.cli import main; main()", "cache", "ls", "--json",
                                   "--cache-dir", str(cache_dir)).stdout)
    assert [e["not_cacheable"] for e in listed] == [reason]
    run_python("from aioov.cli import main; main()", "cache", "clear", "--yes", "--cache-dir", str(cache_dir))
    assert manifests(cache_dir) == []


async def test_a_builder_past_its_time_limit_is_killed_and_nothing_is_remembered(
    cache_dir: Path, mlp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIOOV_BUILDER_FAULT", "hang:plain")
    monkeypatch.setattr(_builds, "BUILD_TIMEOUT", 2.0)
    await _compile_and_export(cache_dir, mlp_path)
    assert manifests(cache_dir) == []  # no entry, and no marker: a slow machine is not a bad blob
    monkeypatch.delenv("AIOOV_BUILDER_FAULT")
    await _compile_and_export(cache_dir, mlp_path, CACHE_PREPACK="NEVER")  # one variant, whatever timings say
    assert [m["build"]["variant"] for m in manifests(cache_dir)] == ["plain"]


async def test_an_awaited_build_gets_thirty_times_its_own_compile(
    cache_dir: Path, mlp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The limit is max(BUILD_TIMEOUT, 30 x the compile) for awaited builds too, the compile
    being the builder's own: a model whose build outlasts the floor is still cached."""
    monkeypatch.setenv("AIOOV_BUILDER_FAULT", "slow:plain")  # compile 0.3 s longer, the rest 1.5 s
    monkeypatch.setattr(_builds, "BUILD_TIMEOUT", 1.0)  # the floor (300 s) cannot be outlasted in a test
    async with aioov.Core(cache_dir=cache_dir) as core:
        await core.compile_model(mlp_path, "CPU", {"CACHE_EXPORT": "SYNC", "CACHE_PREPACK": "NEVER"})
    assert [m["build"]["variant"] for m in manifests(cache_dir)] == ["plain"]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads a builder's CPU time in Linux's /proc")
async def test_an_awaited_build_whose_builder_never_starts_ends_at_the_floor(
    cache_dir: Path, mlp_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Until the builder says its compile is done, the limit grows with the CPU time it uses,
    not with the time passing: a builder that never starts is given up at the floor, and the
    caller compiles the model itself."""
    python = tmp_path / "python"  # a builder's interpreter that never starts
    python.write_text("#!/bin/sh\nexec sleep 3600\n")
    python.chmod(0o755)
    monkeypatch.setenv("AIOOV_BUILDER_PYTHON", str(python))
    monkeypatch.setattr(_builds, "BUILD_TIMEOUT", 2.0)  # the floor (300 s) cannot be waited for in a test
    async with aioov.Core(cache_dir=cache_dir) as core:
        with anyio.fail_after(60):  # it used to wait for ever
            compiled = await core.compile_model(mlp_path, "CPU", {"CACHE_EXPORT": "SYNC", "CACHE_PREPACK": "NEVER"})
    assert compiled.get_property("LOADED_FROM_CACHE") is False
    assert manifests(cache_dir) == []  # nothing learnt about the model: tried again next time


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes through Linux's /proc")
async def test_aclose_abandoning_an_export_leaves_no_builder_and_no_entry(
    cache_dir: Path, mlp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIOOV_BUILDER_FAULT", "hang:plain")
    core = aioov.Core(cache_dir=cache_dir)
    await core.compile_model(mlp_path, "CPU")
    builders = _wait_for_builders()
    assert builders
    await core.aclose(abandon=True)
    assert all(_gone(pid, 10) for pid in builders)
    assert manifests(cache_dir) == []
    assert list(CacheStore(cache_dir).tmp.iterdir()) == []


_DIES_WHILE_EXPORTING = """
import os, sys, time, anyio, aioov
def child_builder(p):  # a process may end between listdir and open
    try:
        return (b"aioov._builder" in open(f"/proc/{p}/cmdline", "rb").read()
                and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1] == str(os.getpid()))
    except OSError:
        return False
async def main():
    core = aioov.Core(cache_dir=sys.argv[1])
    await core.compile_model(sys.argv[2], "CPU")
    while core.pending_exports:
        await anyio.sleep(0.05)
        if any(p.isdigit() and child_builder(p) for p in os.listdir("/proc")):
            break
    print("exporting", flush=True)
    time.sleep(60)
anyio.run(main)
"""


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes through Linux's /proc")
def test_a_killed_application_leaves_no_builder_behind(cache_dir: Path, mlp_path: Path) -> None:
    env = child_env(AIOOV_BUILDER_FAULT="hang:plain")
    app = subprocess.Popen([sys.executable, "-c", _DIES_WHILE_EXPORTING, str(cache_dir), str(mlp_path)],
                           stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert app.stdout is not None and app.stdout.readline().strip() == "exporting"
        builders = _builders_of(app.pid)
        assert builders
        app.send_signal(signal.SIGKILL)
        app.wait(30)
        assert all(_gone(pid, 10) for pid in builders)  # it saw its stdin close, and exited
    finally:
        app.kill()
        app.wait()
        if app.stdout is not None:
            app.stdout.close()
    assert manifests(cache_dir) == []


async def test_an_entry_written_without_a_check_is_replaced(cache_dir: Path, mlp_path: Path) -> None:
    await _compile_and_export(cache_dir, mlp_path)
    store = CacheStore(cache_dir)
    (key,) = store.keys()
    manifest_path = store.entry_path(key) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["build"]  # as entries were before they were checked
    manifest_path.write_text(json.dumps(manifest))
    async with aioov.Core(cache_dir=cache_dir) as core:
        compiled = await core.compile_model(mlp_path, "CPU")
        assert await core.wait_exports(120)
    assert not compiled.get_property("LOADED_FROM_CACHE")
    assert [m["build"]["check"] for m in manifests(cache_dir)] == ["ran and matched"]


async def test_a_model_given_as_bytes_is_checked_too(cache_dir: Path, mlp_path: Path) -> None:
    await _compile_and_export(cache_dir, mlp_path.read_bytes())
    assert [m["build"]["check"] for m in manifests(cache_dir)] == ["ran and matched"]


async def test_sync_export_publishes_the_checked_entry_before_returning(cache_dir: Path, mlp_path: Path) -> None:
    async with aioov.Core(cache_dir=cache_dir) as core:
        await core.compile_model(mlp_path, "CPU", {"CACHE_EXPORT": "SYNC", "CACHE_PREPACK": "NEVER"})
        assert core.pending_exports == 0
        assert [m["build"]["variant"] for m in manifests(cache_dir)] == ["plain"]


def _random_model() -> onnx.ModelProto:
    """y = x + noise: outputs that differ from run to run."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    nodes = [helper.make_node("RandomNormalLike", ["x"], ["r"]), helper.make_node("Add", ["x", "r"], ["y"])]
    return helper.make_model(helper.make_graph(nodes, "random", [x], [y]), ir_version=8,
                             opset_imports=[helper.make_opsetid("", 17)])


def _string_model() -> onnx.ModelProto:
    """Strings in, their count out: inputs that cannot be made up."""
    s = helper.make_tensor_value_info("s", TensorProto.STRING, ["n"])
    n = helper.make_tensor_value_info("n", TensorProto.INT64, [1])
    nodes = [helper.make_node("Shape", ["s"], ["n"])]
    return helper.make_model(helper.make_graph(nodes, "strings", [s], [n]), ir_version=8,
                             opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("model", "why"), [(_random_model, "differ from run to run"),
                                            (_string_model, "tensor of strings")])
async def test_a_model_that_cannot_be_compared_is_cached_after_a_load_check(
    cache_dir: Path, tmp_path: Path, model: Any, why: str
) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(model(), path)
    await _compile_and_export(cache_dir, path)
    (manifest,) = manifests(cache_dir)
    assert manifest["build"]["check"] == "load only"
    assert why in manifest["build"]["skipped"]


def test_outputs_are_compared_within_a_tolerance_that_follows_their_type() -> None:
    y = np.linspace(-100, 100, 50, dtype=np.float32)
    assert compare([y], [y * (1 + 1e-6)]) is None
    assert "differs by up to" in (compare([y], [y + 1]) or "")
    assert compare([np.array([np.nan, 1.0])], [np.array([np.nan, 1.0])]) is None
    assert "instead of float32[50]" in (compare([y], [y[:10]]) or "")
    assert "instead of float32" in (compare([y], [y.astype(np.float64)]) or "")
    assert compare([np.arange(4)], [np.arange(4)]) is None
    assert compare([np.arange(4)], [np.arange(4) + 1]) == "output 0 differs"
    assert "2 outputs instead of 1" in (compare([y], [y, y]) or "")
    half = np.linspace(-1, 1, 8, dtype=np.float16)
    assert compare([half], [half + np.float16(0.001)]) is None  # fp16 arithmetic: a looser bound


@pytest.mark.parametrize("python", ["/bin/false", "/nonexistent/python"])
async def test_a_builder_that_cannot_run_leaves_no_marker(
    cache_dir: Path, mlp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog_warnings: Any, python: str
) -> None:
    monkeypatch.setenv("AIOOV_BUILDER_PYTHON", python)  # e.g. uWSGI's sys.executable
    compiled = await _compile_and_export(cache_dir, mlp_path)
    assert not compiled.get_property("LOADED_FROM_CACHE")
    assert manifests(cache_dir) == []  # not "not cacheable": the blob was never tried
    assert "not cached this time" in caplog_warnings.text
    monkeypatch.delenv("AIOOV_BUILDER_PYTHON")
    await _compile_and_export(cache_dir, mlp_path)
    assert [m["build"]["check"] for m in manifests(cache_dir)] == ["ran and matched"]


_CRASHES_A_BUILDER = """
import resource, sys, anyio, aioov
hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))  # an application that allows core files

async def main():
    async with aioov.Core(cache_dir=sys.argv[1]) as core:
        await core.compile_model(sys.argv[2], "CPU")
        await core.wait_exports(120)

anyio.run(main)
"""


@pytest.mark.skipif(not Path("/proc/sys/kernel/core_pattern").exists(), reason="Linux's core files")
def test_a_builder_that_crashes_leaves_no_core_file(cache_dir: Path, mlp_path: Path, tmp_path: Path) -> None:
    import resource

    if resource.getrlimit(resource.RLIMIT_CORE)[1] == 0:
        pytest.skip("core files are off for good here (hard limit 0): nothing to turn off")
    pattern = Path("/proc/sys/kernel/core_pattern").read_text().strip()
    app_dir = tmp_path / "app"
    app_dir.mkdir()
    env = child_env(AIOOV_BUILDER_FAULT="crash:plain")
    run_python(_CRASHES_A_BUILDER, str(cache_dir), str(mlp_path), env=env, cwd=app_dir)
    (manifest,) = manifests(cache_dir)
    assert manifest["build"]["variant"] == "basic"  # the plain blob crashed its builder
    if not pattern.startswith("|"):  # core files are written by the kernel into the crashing process's directory
        assert [p.name for p in app_dir.iterdir() if p.name.startswith("core")] == []


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="reads a process's limits in Linux's /proc")
def test_a_builder_turns_core_files_off(tmp_path: Path) -> None:
    import resource

    from aioov._buildjob import BuildJob, BuildReply

    if resource.getrlimit(resource.RLIMIT_CORE)[1] == 0:
        pytest.skip("core files are off for good here (hard limit 0): nothing to turn off")
    # started as the serving process would, by one that allows core files
    allow_then_exec = ("import os, resource, sys; r = resource.RLIMIT_CORE; h = resource.getrlimit(r)[1]; "
                       "resource.setrlimit(r, (h, h)); "
                       "os.execv(sys.executable, [sys.executable, '-m', 'aioov._builder'])")
    builder = subprocess.Popen([sys.executable, "-c", allow_then_exec], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env=child_env())
    assert builder.stdin is not None and builder.stdout is not None
    try:
        # a job for a model that does not exist: its reply says the builder is serving jobs
        job = BuildJob(model=str(tmp_path / "missing.onnx"), tmp=str(tmp_path), key="k", blob="ort-optimized",
                       variant="plain", providers=[("CPUExecutionProvider", {})])
        builder.stdin.write(job.to_line())
        builder.stdin.flush()
        reply = BuildReply.from_line(builder.stdout.readline())
        assert reply is not None and reply.ok is False
        (line,) = [line for line in Path(f"/proc/{builder.pid}/limits").read_text().splitlines()
                   if line.startswith("Max core file size")]
        assert line.split()[4] == "0"  # the soft limit; the hard one is left as it was
    finally:
        builder.stdin.close()  # a builder exits when its stdin closes
        builder.wait(30)
        builder.stdout.close()


def _builder_environ(pid: int) -> list[bytes]:
    """A builder's environment, once it is its own: between fork and exec /proc shows the
    parent's, or nothing at all."""
    deadline = time.monotonic() + 30
    while True:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if any(item.startswith(b"AIOOV_BUILDER_PARENT=") for item in environ) or time.monotonic() > deadline:
            return environ
        time.sleep(0.01)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads a process's environment in Linux's /proc")
def test_a_builder_keeps_numpy_on_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    from aioov._builds import _Process

    # an application tuned for its own numpy work; a builder's numpy only makes up small inputs
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "8")
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    builder = _Process()
    try:
        environ = _builder_environ(builder.popen.pid)
    finally:
        builder.close()
    for name in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
        assert f"{name}=1".encode() in environ
    assert os.environ["OPENBLAS_NUM_THREADS"] == "8"  # the application's own is left alone


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds processes through Linux's /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
async def test_a_builder_stopped_from_outside_is_not_blamed_on_the_model(
    cache_dir: Path, mlp_path: Path, monkeypatch: pytest.MonkeyPatch, sig: signal.Signals
) -> None:
    """A service manager stopping the service signals every process of it, builders included:
    that says nothing about the blob. Nothing is remembered, and the next compile caches it."""
    if signal.getsignal(sig) is signal.SIG_IGN:
        pytest.skip(f"this process ignores {sig.name} (nohup does that to SIGHUP), and so do its builders")
    monkeypatch.setenv("AIOOV_BUILDER_FAULT", "hang:plain")
    async with aioov.Core(cache_dir=cache_dir) as core:
        await core.compile_model(mlp_path, "CPU", {"CACHE_PREPACK": "NEVER"})
        builders = await anyio.to_thread.run_sync(_wait_for_builders)
        assert builders
        for pid in builders:
            os.kill(pid, sig)
        assert await core.wait_exports(60)
    assert manifests(cache_dir) == []  # no not-cacheable marker
    monkeypatch.delenv("AIOOV_BUILDER_FAULT")
    await _compile_and_export(cache_dir, mlp_path, CACHE_PREPACK="NEVER")
    assert [m["build"]["variant"] for m in manifests(cache_dir)] == ["plain"]


_FILE_SIZE_LIMIT = """
import resource, sys, anyio, aioov
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[3]), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
async def main():
    async with aioov.Core(cache_dir=sys.argv[1]) as core:
        await core.compile_model(sys.argv[2], "CPU", {"CACHE_PREPACK": "ALWAYS"})
        assert await core.wait_exports(120)
anyio.run(main)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="a file size limit (RLIMIT_FSIZE) stands for a full disk")
def test_a_variant_that_did_not_fit_is_tried_again_when_there_is_room(cache_dir: Path, tmp_path: Path) -> None:
    """No room for the prepacked blob (here a file size limit between the two blobs' sizes;
    a full disk or a quota says the same): the plain one is published. A day later, with room
    on the disk, pruning removes that entry, and the next compile publishes the better one."""
    model = tmp_path / "bert.onnx"
    onnx.save(bert_like(layers=2, hidden=128, heads=4, vocab=1000), model)
    run_python(_FILE_SIZE_LIMIT, str(cache_dir), str(model), str(3 << 20))  # plain: 2.1 MB, prepacked: 3.7 MB
    (manifest,) = manifests(cache_dir)
    assert manifest["build"]["variant"] == "plain"
    assert any("no room under the file size limit" in f for f in manifest["build"]["failed"]), manifest["build"]
    store = CacheStore(cache_dir)
    (entry,) = store.scan().entries
    assert entry.short_of_room is not None
    assert store.prune() == []  # written just now: kept
    manifest_path = entry.path / "manifest.json"
    data = json.loads(manifest_path.read_text())
    data["created"] -= 25 * 3600  # as a day passes
    manifest_path.write_text(json.dumps(data))
    assert [e.key for e in store.prune()] == [entry.key]
    run_python(_FILE_SIZE_LIMIT, str(cache_dir), str(model), str(1 << 30))  # room again
    assert [m["build"]["variant"] for m in manifests(cache_dir)] == ["prepacked"]
