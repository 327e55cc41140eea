"""The cache never makes a start slower: a model whose hit would not load sooner than its
compile gets a small "not worth caching" record instead of an entry, and every process then
compiles it at once, with no builder, no export and no wait. ``CACHE_ALWAYS`` caches it anyway.

(The rest of the suite runs with ``AIOOV_CACHE_ALWAYS=1``: its models are this small.)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aioov import _worth

from .helpers import aioov_command, child_env, manifests

_COMPILE = """
import json, os, sys, anyio, aioov
def child_builder(p, me):  # a process may end between listdir and open
    try:
        return (b"aioov._builder" in open(f"/proc/{p}/cmdline", "rb").read()
                and open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1] == me)
    except OSError:
        return False
async def main():
    async with aioov.Core(cache_dir=sys.argv[1]) as core:
        compiled = await core.compile_model(sys.argv[2], "CPU", json.loads(sys.argv[3]))
        await core.wait_exports()
        me = str(os.getpid())
        builders = [p for p in os.listdir("/proc") if p.isdigit() and child_builder(p, me)]
        stats = core.cache_stats
    print(json.dumps({"from_cache": compiled.get_property("LOADED_FROM_CACHE"),
                      "reason": compiled.get_property("NOT_CACHED_REASON"),
                      "exports": stats.exports, "compiles": stats.compiles, "builders_left": len(builders)}))
anyio.run(main)
"""


def _compile(cache_dir: Path, model: Path, **config: object) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", _COMPILE, str(cache_dir), str(model), json.dumps(config)],
                          capture_output=True, text=True, timeout=120, env=child_env(AIOOV_CACHE_ALWAYS="0"))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _records(cache_dir: Path) -> list[dict[str, object]]:
    return [m["not_cacheable"] for m in manifests(cache_dir) if "not_cacheable" in m]


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="counts builders through Linux's /proc")
def test_a_model_that_compiles_in_milliseconds_gets_a_record_and_no_builder(cache_dir: Path, mlp_path: Path) -> None:
    first = _compile(cache_dir, mlp_path)
    assert first["from_cache"] is False and first["exports"] == 0
    (record,) = _records(cache_dir)
    assert record["kind"] == "not-worth" and "a hit cannot load it much sooner" in str(record["reason"])
    assert [m for m in manifests(cache_dir) if "build" in m] == []  # no entry was written

    again = _compile(cache_dir, mlp_path)  # another process: compiles at once, no builder, no export
    assert again["from_cache"] is False and again["exports"] == 0 and again["builders_left"] == 0
    assert str(again["reason"]).startswith("not worth caching: ")

    listed = subprocess.run([*aioov_command(), "cache", "ls", "--json", "--cache-dir", str(cache_dir)],
                            capture_output=True, text=True, timeout=60, env=child_env())
    assert listed.returncode == 0, listed.stderr
    assert "not worth caching" in listed.stdout


def test_cache_always_caches_it_anyway(cache_dir: Path, mlp_path: Path) -> None:
    first = _compile(cache_dir, mlp_path, CACHE_ALWAYS=True)
    assert first["exports"] == 1 and _records(cache_dir) == []
    assert _compile(cache_dir, mlp_path, CACHE_ALWAYS=True)["from_cache"] is True


def test_a_record_of_another_aioov_is_decided_again(cache_dir: Path, mlp_path: Path) -> None:
    _compile(cache_dir, mlp_path)
    (manifest,) = cache_dir.rglob("manifest.json")
    data = json.loads(manifest.read_text())
    data["not_cacheable"]["aioov"] = "0.0.1"  # written by an earlier aioov, whose rule may differ
    manifest.write_text(json.dumps(data))
    assert _compile(cache_dir, mlp_path, CACHE_ALWAYS=True)["exports"] == 1  # retired, and cached now
    assert _records(cache_dir) == []
    assert _compile(cache_dir, mlp_path)["from_cache"] is True


@pytest.mark.parametrize(
    "compile_seconds, load_cpu_seconds, worth",
    [
        (0.030, None, False),  # a tiny graph: a hit's fixed cost is about its compile
        (2.0, None, True),  # nothing known but the compile: worth a builder's measurement
        (1.77, 0.30, True),  # BERT-base: a hit in 0.32 s (benchmarks/results/worth.json)
        (0.075, 0.033, False),  # an OCR classifier: its hit saved nothing
        (0.125, 0.030, True),  # magika: saves 53 ms, 43 %
        (0.92, 0.70, True),  # a fifth is not saved, but over 100 ms are
        (0.028, 0.004, False),  # silero VAD v6: saves 3 ms
    ],
)
def test_what_pays(compile_seconds: float, load_cpu_seconds: float | None, worth: bool) -> None:
    """The rule at its seam, on figures measured for real models: what a hit saves against the
    seconds and the share it must save."""
    assert (_worth.not_worth(compile_seconds, load_cpu_seconds) is None) is worth


@pytest.mark.parametrize("cache_always", [False, True])
def test_the_builder_judges_a_blob_by_its_timed_load_before_its_checks(
    tmp_path: Path, mlp_path: Path, monkeypatch: pytest.MonkeyPatch, cache_always: bool
) -> None:
    """After a caller's compile, the builder times a load of the blob and stops there when the
    hit would not save enough of that compile: no reference run, no check at several shapes
    (most of a builder's work for a small model). The blob here is made to compute wrong (the
    builder's fault switch), so only a check could fail it: judged not worth, it never is;
    with ``CACHE_ALWAYS`` nothing is judged, and the check catches it. (The builder's seam, a
    job in and a reply out: no public call makes a compile take a chosen time.)"""
    from aioov._builder import run_job
    from aioov._builds import BuildClock
    from aioov._devices import DeviceSpec
    from aioov._devices.cpu import CPUDevice
    from aioov._properties import CompileConfig
    from aioov._request import CompileRequest, Source
    from aioov._variants import _job, compile_seconds

    monkeypatch.setenv("AIOOV_BUILDER_FAULT", "mismatch:plain")
    cpu = CPUDevice()
    request = CompileRequest(Source(str(mlp_path)), cpu, DeviceSpec("CPU"), cpu.providers(None, {}),
                             CompileConfig(cache_always=cache_always))
    clock = BuildClock()
    clock.compiled()  # a compile of microseconds: no load can save anything of it
    (tmp_path / "entry").mkdir()
    job = _job(request, str(mlp_path), tmp_path / "entry", "k" * 64, "plain", background=True,
               compile_seconds=compile_seconds(request, clock))
    reply = run_job(job)
    assert reply.ok is False
    if cache_always:
        assert job.compile_seconds is None
        assert reply.stage == "check" and "differ" in str(reply.reason)
    else:
        assert job.compile_seconds is not None and job.compile_seconds < 0.01
        assert reply.stage == "not worth" and "a hit would load it in about" in str(reply.reason)
        assert reply.load_cpu_seconds is not None and reply.checked == []
