"""The ``aioov`` console script, run for real in subprocesses."""

from __future__ import annotations

import json
import os
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

from .helpers import aioov_command, child_env, reference


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
    # the forger rewrote the checksum in the manifest, which the manifest MAC covers
    assert json.loads(report.stdout)["bad"] == [{"key": victim.name, "problem": "manifest MAC does not verify"}]
