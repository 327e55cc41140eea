"""The ``aioov`` console script, run for real in subprocesses."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

import aioov
from aioov.testing import bert_like

from .helpers import aioov_command, child_env, make_models, reference


def aioov_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*aioov_command(), *args], capture_output=True, text=True, timeout=timeout,
        env=child_env(**(env or {})),
    )


def as_json(proc: subprocess.CompletedProcess[str]) -> object:
    assert proc.returncode in (0, 1), proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("cli_models")
    for seed in range(3):
        onnx.save(bert_like(layers=2, hidden=64, heads=4, vocab=300 + 100 * seed, seed=seed), base / f"m{seed}.onnx")
    return base


def test_version() -> None:
    proc = aioov_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"aioov {aioov.__version__}"


def test_compile_then_warm_hit(models: Path, cache_dir: Path) -> None:
    model = str(models / "m0.onnx")
    first = as_json(aioov_cli("compile", model, "--cache-dir", str(cache_dir), "--json"))
    second = as_json(aioov_cli("compile", model, "--cache-dir", str(cache_dir), "--json"))
    assert (first["compiles"], first["hits"], first["exports"]) == (1, 0, 1)  # type: ignore[index]
    assert (second["compiles"], second["hits"]) == (0, 1)  # type: ignore[index]


def test_warmup_a_folder_with_a_summary(models: Path, tmp_path: Path, cache_dir: Path) -> None:
    folder = tmp_path / "repo"
    shutil.copytree(models, folder)
    (folder / "broken.onnx").write_text("not a model")
    proc = aioov_cli("warmup", str(folder), "--cache-dir", str(cache_dir))
    assert proc.returncode == 1  # one model failed
    assert "4 models: 0 from cache, 3 compiled, 1 failed" in proc.stdout
    assert "broken.onnx" in proc.stderr
    (folder / "broken.onnx").unlink()
    summary = as_json(aioov_cli("warmup", str(folder), "--cache-dir", str(cache_dir), "--json"))
    assert (summary["hits"], summary["compiles"], summary["failures"]) == (3, 0, 0)  # type: ignore[index]


def test_ls_and_stats(models: Path, cache_dir: Path) -> None:
    aioov_cli("warmup", str(models), "--cache-dir", str(cache_dir), "-q")
    entries = as_json(aioov_cli("cache", "ls", "--cache-dir", str(cache_dir), "--json"))
    assert sorted(Path(e["source"]).name for e in entries) == ["m0.onnx", "m1.onnx", "m2.onnx"]  # type: ignore[union-attr,index]
    assert all(e["device"] == "CPU" and e["size"] > 0 and e["problem"] is None for e in entries)  # type: ignore[union-attr,index]
    stats = as_json(aioov_cli("cache", "stats", "--cache-dir", str(cache_dir), "--json"))
    assert stats["entries"] == 3 and stats["bytes"] == sum(e["size"] for e in entries)  # type: ignore[index,union-attr]
    text = aioov_cli("cache", "ls", "--cache-dir", str(cache_dir)).stdout
    assert "m1.onnx" in text and text.splitlines()[0].split()[:3] == ["key", "device", "size"]


def test_verify_catches_a_corrupted_entry(models: Path, cache_dir: Path) -> None:
    aioov_cli("warmup", str(models), "--cache-dir", str(cache_dir), "-q")
    victim = sorted((cache_dir / "v1").glob("??/*"))[1]
    weights = victim / "weights.bin"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0x55
    weights.write_bytes(bytes(raw))
    dry = aioov_cli("cache", "verify", "--cache-dir", str(cache_dir), "--dry-run")
    assert dry.returncode == 1 and "1 bad" in dry.stdout and victim.exists()
    report = aioov_cli("cache", "verify", "--cache-dir", str(cache_dir), "--json")
    assert report.returncode == 1
    assert json.loads(report.stdout)["bad"] == [{"key": victim.name, "problem": "weights.bin checksum mismatch"}]
    assert not victim.exists()
    assert aioov_cli("cache", "verify", "--cache-dir", str(cache_dir)).returncode == 0


def test_prune_to_a_size_limit_removes_least_recently_used(models: Path, cache_dir: Path) -> None:
    aioov_cli("warmup", str(models), "--cache-dir", str(cache_dir), "-q")
    entries = {Path(e["source"]).name: e for e in as_json(  # type: ignore[union-attr,index]
        aioov_cli("cache", "ls", "--cache-dir", str(cache_dir), "--json"))}
    now = time.time()
    for age, name in ((300, "m1.onnx"), (200, "m0.onnx"), (100, "m2.onnx")):  # m1 is the least recent
        path = Path(aioov.CacheStore(cache_dir).entry_path(entries[name]["key"]))
        os.utime(path, (now - age, now - age))
    keep_two = entries["m0.onnx"]["size"] + entries["m2.onnx"]["size"]
    dry = as_json(aioov_cli("cache", "prune", "--max-size", str(keep_two), "--dry-run",
                            "--cache-dir", str(cache_dir), "--json"))
    assert [Path(e["source"]).name for e in dry["removed"]] == ["m1.onnx"]  # type: ignore[index]
    assert len(list((cache_dir / "v1").glob("??/*"))) == 3
    aioov_cli("cache", "prune", "--max-size", str(keep_two), "--cache-dir", str(cache_dir))
    left = as_json(aioov_cli("cache", "ls", "--cache-dir", str(cache_dir), "--json"))
    assert sorted(Path(e["source"]).name for e in left) == ["m0.onnx", "m2.onnx"]  # type: ignore[union-attr,index]
    aioov_cli("cache", "prune", "--older-than", "150s", "--cache-dir", str(cache_dir))
    left = as_json(aioov_cli("cache", "ls", "--cache-dir", str(cache_dir), "--json"))
    assert [Path(e["source"]).name for e in left] == ["m2.onnx"]  # type: ignore[union-attr,index]


def test_prune_and_clear_report_the_entries_they_could_not_remove(models: Path, cache_dir: Path) -> None:
    """An entry that cannot be removed (here its lock path is a directory, which stops root
    too) gets one line on stderr, is listed in ``--json``'s ``failed``, and fails the command."""
    aioov_cli("warmup", str(models / "m0.onnx"), str(models / "m1.onnx"), "--cache-dir", str(cache_dir), "-q")
    keys = {Path(e["source"]).name: e["key"] for e in as_json(  # type: ignore[union-attr,index]
        aioov_cli("cache", "ls", "--cache-dir", str(cache_dir), "--json"))}
    stuck = keys["m0.onnx"]
    entry = aioov.CacheStore(cache_dir).entry_path(stuck)
    lock = entry.parent.parent / ".locks" / f"{stuck}.lock"
    lock.unlink(missing_ok=True)
    lock.mkdir()

    pruned = aioov_cli("cache", "prune", "--max-size", "0", "--cache-dir", str(cache_dir))
    assert pruned.returncode == 1, pruned.stderr
    assert "removed 1 entry" in pruned.stdout and "1 entry could not be removed" in pruned.stdout
    (line,) = pruned.stderr.splitlines()  # one line, not the store's warning as well
    assert line.startswith(f"aioov cache prune: cannot remove entry {stuck[:16]}") and "m0.onnx" in line
    assert entry.is_dir() and not aioov.CacheStore(cache_dir).entry_path(keys["m1.onnx"]).exists()

    report = aioov_cli("cache", "prune", "--max-size", "0", "--cache-dir", str(cache_dir), "--json")
    assert report.returncode == 1
    (failed,) = json.loads(report.stdout)["failed"]
    assert failed["key"] == stuck and failed["error"].startswith(f"cannot remove entry {stuck[:16]}")

    cleared = aioov_cli("cache", "clear", "--yes", "--cache-dir", str(cache_dir), "--json")
    assert cleared.returncode == 1 and json.loads(cleared.stdout)["removed"] == 0
    assert [item["key"] for item in json.loads(cleared.stdout)["failed"]] == [stuck]
    (line,) = cleared.stderr.splitlines()
    assert line.startswith(f"aioov cache clear: cannot remove entry {stuck[:16]}")

    lock.rmdir()  # removable again
    again = aioov_cli("cache", "clear", "--yes", "--cache-dir", str(cache_dir))
    assert again.returncode == 0 and again.stdout.strip() == "removed 1 entry" and not again.stderr
    assert not entry.exists()


LOADER = """
import sys, pathlib, anyio, aioov, numpy as np
async def main():
    ok = rounds = 0
    stop = pathlib.Path(sys.argv[2])
    async with aioov.Core(cache_dir=sys.argv[1]) as core:
        while not stop.exists():  # until the test has pruned often enough, however slow this machine
            rounds += 1
            for path in sys.argv[3:]:
                compiled = await core.compile_model(path, "CPU")
                out = await compiled.infer(np.ones((1, 4), np.int64))
                ok += out["last_hidden_state"].shape == (1, 4, 64)
        await core.wait_exports()
    print(ok, rounds * len(sys.argv[3:]))
anyio.run(main)
"""


def test_concurrent_prune_while_another_process_loads(models: Path, cache_dir: Path, tmp_path: Path) -> None:
    paths = [str(p) for p in sorted(models.glob("*.onnx"))]
    stop = tmp_path / "stop"
    loader = subprocess.Popen(
        [sys.executable, "-c", LOADER, str(cache_dir), str(stop), *paths], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=child_env(),
    )
    prunes = 0
    while prunes < 3 and loader.poll() is None:
        if (cache_dir / "v1").exists():
            proc = aioov_cli("cache", "prune", "--max-size", "0", "--cache-dir", str(cache_dir))
            assert proc.returncode == 0, proc.stderr
            prunes += 1
    stop.touch()
    out, err = loader.communicate(timeout=300)
    assert loader.returncode == 0, err
    ok, loads = map(int, out.split())
    assert ok == loads > 0  # every load worked, pruned or not
    assert prunes == 3
    assert "Traceback" not in err


def test_compile_output_blob_and_import_model(models: Path, tmp_path: Path) -> None:
    blob = tmp_path / "m0.blob"
    proc = aioov_cli("compile", str(models / "m0.onnx"), "-o", str(blob))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in blob.iterdir()) == ["manifest.json", "model.onnx", "weights.bin"]

    import anyio

    async def load() -> dict[str, np.ndarray]:
        async with aioov.Core() as core:
            compiled = await core.import_model(blob, "CPU")
            assert compiled.get_property("LOADED_FROM_CACHE") is True
            return await compiled.infer(np.ones((1, 5), np.int64))

    got = anyio.run(load)
    want = reference(models / "m0.onnx", {"input_ids": np.ones((1, 5), np.int64)})[0]
    np.testing.assert_allclose(got["last_hidden_state"], want, rtol=1e-4, atol=1e-4)
    assert aioov_cli("compile", str(models / "m0.onnx"), "-o", str(blob)).returncode == 1  # exists


def test_devices_json() -> None:
    devices = as_json(aioov_cli("devices", "--json"))
    cpu = next(d for d in devices if d["device"] == "CPU")  # type: ignore[union-attr,index]
    assert cpu["available"] is True and "EXPORT_IMPORT" in cpu["capabilities"]
    gpu = next(d for d in devices if d["device"] == "GPU")  # type: ignore[union-attr,index]
    from aioov._devices.nvidia import CUDADevice

    here = CUDADevice()
    assert gpu["available"] is here.available()
    assert gpu["reason"] == (None if here.available() else here.unavailable_reason)  # the probe's, word for word


def test_default_cache_dir_from_the_environment(models: Path, tmp_path: Path) -> None:
    target = tmp_path / "env-cache"
    proc = aioov_cli("compile", str(models / "m1.onnx"), "-q", env={"AIOOV_CACHE_DIR": str(target)})
    assert proc.returncode == 0, proc.stderr
    assert len(list((target / "v1").glob("??/*"))) == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["cache", "prune"], "give --max-size and/or --older-than"),
        (["cache", "prune", "--older-than", "soon"], "expected a duration"),
        (["cache", "prune", "--max-size", "lots"], "expected a size"),
        (["compile", "x.onnx", "--config", "NOEQUALS"], "KEY=VALUE"),
        (["compile", "x.onnx", "--config", "NOT_A_PROPERTY=1"], "unknown property"),
        (["cache", "clear"], "--yes"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(args: list[str], message: str, cache_dir: Path) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    proc = aioov_cli(*args, "--cache-dir", str(cache_dir)) if args[0] != "frobnicate" else aioov_cli(*args)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_missing_model_exits_1(tmp_path: Path) -> None:
    proc = aioov_cli("compile", str(tmp_path / "nope.onnx"), "--cache-dir", str(tmp_path / "c"))
    assert proc.returncode == 1 and "no such model file" in proc.stderr


def test_verify_with_the_hmac_key_catches_what_checksums_miss(models: Path, cache_dir: Path) -> None:
    from .test_reliability import tamper_and_fix_checksums

    secret = {"AIOOV_CACHE_HMAC_KEY": "s3cret"}
    assert aioov_cli("warmup", str(models), "--cache-dir", str(cache_dir), "-q", env=secret).returncode == 0
    victim = sorted((cache_dir / "v1").glob("??/*"))[0]
    tamper_and_fix_checksums(victim)
    assert aioov_cli("cache", "verify", "--dry-run", "--cache-dir", str(cache_dir)).returncode == 0  # fooled
    report = aioov_cli("cache", "verify", "--cache-dir", str(cache_dir), "--json", env=secret)
    assert report.returncode == 1
    # the forger rewrote the checksum in the manifest, which the manifest MAC covers: to the key,
    # the entry is signed under another key (a rotation looks the same), left unless asked
    assert json.loads(report.stdout)["foreign"] == [victim.name]
    assert victim.exists()
    aioov_cli("cache", "verify", "--delete-foreign", "--cache-dir", str(cache_dir), env=secret)
    assert not victim.exists()


# -- #43.8: the command line itself -----------------------------------------------------------


def test_help_says_warmup_is_compile_without_output_and_explains_every_option() -> None:
    top = aioov_cli("--help").stdout
    assert "the same as compile without -o" in " ".join(top.split())
    warmup = " ".join(aioov_cli("warmup", "--help").stdout.split())
    assert "The same as 'compile' without -o" in warmup and "runs no inference unless --warmup N" in warmup
    # Python 3.13's argparse names an option's value once: "--device, -d DEVICE"
    assert re.search(r"--device( DEVICE)?, -d DEVICE device to compile for", warmup), warmup
    assert re.search(r"--max-concurrency( N)?, -j N compile at most N models at once", warmup), warmup
    compile_help = " ".join(aioov_cli("compile", "--help").stdout.split())
    assert "Without -o this is 'warmup'" in compile_help


def test_an_unknown_device_is_refused_before_any_work(models: Path, cache_dir: Path) -> None:
    proc = aioov_cli("warmup", str(models), "--device", "NPU", "--cache-dir", str(cache_dir))
    assert proc.returncode == 2, proc.stderr
    assert "argument --device/-d: unknown device 'NPU'; known: AUTO, CPU, GPU, TENSORRT, OPENVINO" in proc.stderr
    assert proc.stdout == "" and not cache_dir.exists()
    assert aioov_cli("compile", str(models / "m0.onnx"), "-d", "gpu.x", "-o", str(cache_dir)).returncode == 2


def test_ctrl_c_during_warmup_prints_one_line_and_exits_130(tmp_path: Path, cache_dir: Path) -> None:
    import select
    import signal

    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        pytest.skip("this process ignores SIGINT (a background job of a shell without job control), "
                    "and so would the aioov it starts")
    paths = make_models(tmp_path / "many", 8, hidden=128)
    # Its own process group, which the test signals as a terminal's Ctrl-C would: builders too.
    # Slow builders keep it busy however fast this machine compiles the models.
    proc = subprocess.Popen([*aioov_command(), "warmup", *map(str, paths), "-j", "1", "--cache-dir", str(cache_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=child_env(AIOOV_BUILDER_FAULT="slow:plain", AIOOV_CACHE_ALWAYS="1"),
                            start_new_session=True)
    try:
        ready, _, _ = select.select([proc.stderr], [], [], 120)
        assert ready, "warmup printed no progress in 120 s"
        first = proc.stderr.readline()  # type: ignore[union-attr]
        assert proc.poll() is None, first  # still compiling the others
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.strip().splitlines()[-1] == "aioov: interrupted"


def test_counts_are_pluralized_and_stats_stay_aligned(models: Path, cache_dir: Path) -> None:
    one = aioov_cli("warmup", str(models / "m0.onnx"), "--cache-dir", str(cache_dir))
    assert one.returncode == 0, one.stderr
    assert "\n1 model: 0 from cache, 1 compiled, 0 failed" in one.stdout
    lines = aioov_cli("cache", "stats", "--cache-dir", str(cache_dir)).stdout.splitlines()
    assert "not cacheable" in lines[3] and "0 models (markers)" in lines[3]
    columns = {len(line) - len(line.split(":", 1)[1].lstrip()) for line in lines}
    assert len(columns) == 1, lines  # every value starts in the same column
    assert aioov_cli("cache", "verify", "--cache-dir", str(cache_dir)).stdout.strip() == "verified 1 entry: 0 bad"
    assert aioov_cli("cache", "clear", "--yes", "--cache-dir", str(cache_dir)).stdout.strip() == "removed 1 entry"


def test_the_table_names_each_model_by_its_path_below_the_folder(models: Path, tmp_path: Path,
                                                                  cache_dir: Path) -> None:
    repo = tmp_path / "repo"
    for package in ("magika", "other"):  # two packages, each with its model.onnx
        (repo / package / "models").mkdir(parents=True)
        shutil.copy(models / f"m{len(package) % 3}.onnx", repo / package / "models" / "model.onnx")
    proc = aioov_cli("warmup", str(repo), "--cache-dir", str(cache_dir))
    assert proc.returncode == 0, proc.stderr
    rows = [line.split()[0] for line in proc.stdout.splitlines()[1:3]]
    assert rows == ["magika/models/model.onnx", "other/models/model.onnx"]
    assert "compiled magika/models/model.onnx" in proc.stderr  # the progress lines too
    # the same relative path under two folders given: each by its path as given
    twice = aioov_cli("warmup", str(repo / "magika"), str(repo / "other"), "--cache-dir", str(cache_dir))
    assert [line.split()[0] for line in twice.stdout.splitlines()[1:3]] == [
        str(repo / "magika" / "models" / "model.onnx"), str(repo / "other" / "models" / "model.onnx")]


def test_no_models_found_names_the_folder(tmp_path: Path, cache_dir: Path) -> None:
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    proc = aioov_cli("warmup", str(empty), "--cache-dir", str(cache_dir))
    assert proc.returncode == 2
    assert f"no models found in {empty}" in proc.stderr


def test_common_options_go_before_or_after_the_command(models: Path, cache_dir: Path) -> None:
    proc = aioov_cli("--cache-dir", str(cache_dir), "--json", "warmup", str(models / "m1.onnx"))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["compiles"] == 1
    listed = aioov_cli("--cache-dir", str(cache_dir), "cache", "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [Path(e["source"]).name for e in json.loads(listed.stdout)] == ["m1.onnx"]
    between = aioov_cli("cache", "--cache-dir", str(cache_dir), "--json", "stats")
    assert json.loads(between.stdout)["entries"] == 1
    # after the command, an option wins over the same one before it
    after = aioov_cli("--cache-dir", str(cache_dir / "elsewhere"), "cache", "stats", "--cache-dir", str(cache_dir))
    assert after.returncode == 0 and str(cache_dir) in after.stdout.splitlines()[0]


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


@pytest.mark.parametrize(("args", "level"), [
    ([], "WARNING"), (["-v"], "INFO"), (["-vv"], "DEBUG"), (["--log-level", "error"], "ERROR"),
])
@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_and_log_level_set_the_aioov_log(args: list[str], level: str, where: str, cache_dir: Path,
                                                 aioov_logger, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    import logging

    from aioov.cli import main

    cache_dir.mkdir()
    command = ["cache", "stats", "--cache-dir", str(cache_dir)]
    assert main([*args, *command] if where == "before" else [*command, *args]) == 0
    assert logging.getLevelName(aioov_logger.level) == level
    logging.getLogger("aioov.test").error("a path with \x1b[2J in it")
    assert "error: a path with \\x1b[2J in it" in capsys.readouterr().err  # on stderr, escaped


def test_minus_v_counts_before_and_after_the_command(cache_dir: Path, aioov_logger) -> None:  # type: ignore[no-untyped-def]
    import logging

    from aioov.cli import main

    cache_dir.mkdir()
    assert main(["-v", "cache", "-v", "stats", "--cache-dir", str(cache_dir)]) == 0
    assert aioov_logger.level == logging.DEBUG


# -- #41.5: a warm-up that leaves no entry fails ----------------------------------------------


def test_warmup_fails_where_models_compiled_but_left_no_entry(models: Path, cache_dir: Path) -> None:
    no_builder = {"AIOOV_BUILDER_PYTHON": "/bin/false"}  # the builder cannot start: nothing is written
    proc = aioov_cli("warmup", str(models), "--cache-dir", str(cache_dir), env=no_builder)
    assert proc.returncode == 1, proc.stderr
    assert "3 models: 0 from cache, 3 compiled, 0 failed, 3 not cached" in proc.stdout
    assert [line.split()[1:3] for line in proc.stdout.splitlines()[1:4]] == [["NOT", "CACHED"]] * 3
    for name in ("m0.onnx", "m1.onnx", "m2.onnx"):
        line = next(line for line in proc.stderr.splitlines() if line.startswith(f"error: {models / name}:"))
        assert "compiled, but left no cache entry: not cached this time: plain: the builder exited" in line
    assert "--allow-uncached" in proc.stderr
    assert aioov.CacheStore(cache_dir).scan().entries == []
    report = as_json(aioov_cli("warmup", str(models), "--cache-dir", str(cache_dir), "--json", env=no_builder))
    assert report["uncached"] == 3  # type: ignore[index]
    assert all(not r["cached"] and "builder" in r["not_cached"] for r in report["results"])  # type: ignore[index]
    allowed = aioov_cli("warmup", str(models), "--cache-dir", str(cache_dir), "--allow-uncached", "--log-level",
                        "error", env=no_builder)
    assert allowed.returncode == 0, allowed.stderr
    assert "warning: aioov cache:" not in allowed.stderr  # the log's warnings are off...
    assert f"warning: {models / 'm0.onnx'}: compiled, but left no cache entry" in allowed.stderr  # ...not the report
    # with a builder, the same command fills the cache and succeeds
    assert aioov_cli("warmup", str(models), "--cache-dir", str(cache_dir), "-q").returncode == 0
    assert len(aioov.CacheStore(cache_dir).scan().entries) == 3


def test_a_model_that_is_not_cacheable_is_reported_but_no_failure(mlp_path: Path, cache_dir: Path) -> None:
    fault = {"AIOOV_BUILDER_FAULT": "mismatch:plain,crash:basic"}  # every variant fails its check: a marker
    for _run in range(2):  # the run that writes the marker, and one that finds it
        proc = aioov_cli("warmup", str(mlp_path), "--cache-dir", str(cache_dir), env=fault)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.splitlines()[1].split()[1:3] == ["not", "cacheable"]
        assert "1 model: 0 from cache, 1 compiled, 0 failed, 1 not cacheable" in proc.stdout
        assert f"note: {mlp_path}: not cacheable: plain: an instant hit's output" in proc.stderr


# -- #41.12: no terminal escapes from file names --------------------------------------------------

EVIL = "evil\n\x1b]0;pwned\x07.onnx"


def test_file_names_cannot_write_escapes_or_rows_to_the_terminal(models: Path, tmp_path: Path,
                                                                  cache_dir: Path) -> None:
    folder = tmp_path / "uploads"
    folder.mkdir()
    shutil.copy(models / "m2.onnx", folder / EVIL)
    warm = aioov_cli("warmup", str(folder), "--cache-dir", str(cache_dir))
    listed = aioov_cli("cache", "ls", "--cache-dir", str(cache_dir))
    pruned = aioov_cli("cache", "prune", "--max-size", "0", "--dry-run", "--cache-dir", str(cache_dir))
    for proc in (warm, listed, pruned):
        assert proc.returncode == 0, proc.stderr
        assert not set("\x1b\x07") & set(proc.stdout + proc.stderr)
    escaped = "evil\\n\\x1b]0;pwned\\x07.onnx"
    assert warm.stdout.splitlines()[1].split()[:2] == [escaped, "compiled"]
    assert f"compiled {escaped}" in warm.stderr
    assert len(listed.stdout.splitlines()) == 2  # the header and one entry: no forged row
    assert listed.stdout.splitlines()[1].endswith(f"{folder}/{escaped}")
    assert escaped in pruned.stdout
    assert json.loads(aioov_cli("cache", "ls", "--json", "--cache-dir", str(cache_dir)).stdout)[0]["source"] == str(
        folder / EVIL)  # JSON keeps the name, in JSON's escapes


def test_printable_escapes_what_a_terminal_would_act_on() -> None:
    from aioov.cli import printable

    assert printable("a\tb\nc\rd\x1b[31m\x07\x7f\x9b") == "a\\tb\\nc\\rd\\x1b[31m\\x07\\x7f\\x9b"
    assert printable("r\u202egnp.onnx") == "r\\u202egnp.onnx"  # a bidi override
    assert printable("bad\udcff.onnx") == "bad\\xff.onnx"  # an undecodable byte of a file name
    assert printable("modèle ünïcode.onnx") == "modèle ünïcode.onnx"


# -- #43.7: the progress bar and the log share the terminal -------------------------------------


def on_a_terminal(*args: str, timeout: float = 180) -> tuple[int, str]:
    """Run ``aioov`` with its stdout and stderr on a pseudo-terminal, as from a user's shell:
    its exit code, and all it wrote (the terminal's ``\\r\\n`` line ends)."""
    import pty
    import select

    master, slave = pty.openpty()
    proc = subprocess.Popen([*aioov_command(), *args], stdin=slave, stdout=slave, stderr=slave, env=child_env())
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every process writing to it is gone
                    break
                if not data:
                    break
                out += data
            elif proc.poll() is not None:
                break  # exited, and all it wrote has been read
        return proc.wait(timeout=10), out.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)


def screen(output: str) -> list[str]:
    """The lines a terminal shows for ``output``: a ``\\r`` goes back to the line's start, and
    what follows writes over what was there."""
    lines = []
    for line in output.replace("\r\n", "\n").split("\n"):
        shown = ""
        for part in line.split("\r"):
            shown = part + shown[len(part):]
        lines.append(shown.rstrip())
    return lines


def test_a_warning_during_warmup_clears_the_progress_bar_first(tmp_path: Path, cache_dir: Path) -> None:
    """A warning logged while the bar is on the screen used to be written after the bar's
    text, on its line (``[#####-----] 1/2 compiled a.onnx   warning: aioov: ...``). It gets a
    line of its own, and the bar is drawn again below it."""
    from onnx import TensorProto, helper

    from aioov.testing import mlp

    folder = tmp_path / "models"
    folder.mkdir()
    onnx.save(mlp(), folder / "a.onnx")
    strings = helper.make_graph(  # no input of strings can be made up: warming it up logs a warning
        [helper.make_node("Identity", ["text"], ["same"])], "strings",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["n"])],
        [helper.make_tensor_value_info("same", TensorProto.STRING, ["n"])],
    )
    onnx.save(helper.make_model(strings, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              folder / "b.onnx")
    code, output = on_a_terminal("warmup", str(folder), "--warmup", "1", "-j", "1", "--cache-dir", str(cache_dir))
    assert code == 0, output
    lines = screen(output)
    # (an older onnxruntime, onnxruntime-openvino's, adds a warning of its own about the GIL)
    warnings = [line for line in lines if "warning: aioov" in line and "not warmed up" in line]
    assert len(warnings) == 1, output
    assert warnings[0].startswith("warning: aioov: ") and "'text' is a tensor of strings" in warnings[0], output
    below = lines[lines.index(warnings[0]) + 1]
    assert below.startswith("[") and "2/2 compiled b.onnx" in below, output  # the bar, drawn again
    assert not any("1/2" in line for line in lines), output  # its line before the warning: cleared
