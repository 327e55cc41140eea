"""Is caching a model worth it? An uncached compile against a hit, and what a cold cache adds.

For each model (the corpus of ``tests/corpus.py`` and the BERT-like models of ``models.py``),
in fresh processes, the modes alternating each repeat (their order reversed every other one):

- ``uncached``: ``aioov.Core()`` without a cache, ``await core.compile_model(path, "CPU")``
  timed alone;
- ``hit``: ``Core(cache_dir=D)`` where D holds the model's entry (written once, before the
  repeats, by a compile and ``wait_exports()``); the compile timed alone, and
  ``LOADED_FROM_CACHE`` (``NOT_CACHED_REASON`` where it is not a hit);
- ``first``: a first compile on an empty cache (a new folder each run): the compile, then
  until ``wait_exports()`` returns (the entry published);

and for every run the process's CPU seconds and its children's (the builders) once its Core
is closed. The entry's manifest gives the builder's own ``load_seconds`` (a hit's load, timed
in the builder), ``export_seconds`` and ``check_seconds`` (D's entry and every ``first`` run's).
The table shows medians; what a hit saves of the uncached compile; and a fit of the hit's
compile time on the builder's ``load_seconds``.

    .venv/bin/python -m benchmarks.worth [--repeats 5] [--only NAME ...]

writes ``benchmarks/results/worth.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import ROOT, child_env

#: one run in a fresh process: argv mode, model path, cache folder; prints one JSON line
_RUN = r"""
import asyncio, json, os, resource, sys, time
import aioov

def cpu(who):
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime

async def main():
    mode, path, cache = sys.argv[1:4]
    core = aioov.Core() if mode == "uncached" else aioov.Core(cache_dir=cache)
    # every model cached, also where aioov would decide it is not worth it (once it can)
    from aioov._properties import PROPERTIES
    config = {"CACHE_ALWAYS": True} if mode != "uncached" and "CACHE_ALWAYS" in PROPERTIES else {}
    t = time.perf_counter()
    compiled = await core.compile_model(path, "CPU", config)
    out = {"compile": time.perf_counter() - t}
    if mode != "uncached":
        out["loaded_from_cache"] = compiled.get_property("LOADED_FROM_CACHE")
        out["not_cached_reason"] = compiled.get_property("NOT_CACHED_REASON")
    if mode == "first":
        out["wait_ok"] = await core.wait_exports()
        out["published"] = time.perf_counter() - t
    out["cpu_self_waited"], out["cpu_children_waited"] = cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN)
    await core.aclose()
    out["cpu_self"], out["cpu_children"] = cpu(resource.RUSAGE_SELF), cpu(resource.RUSAGE_CHILDREN)
    print(json.dumps(out))

asyncio.run(main())
"""
MODES = ("uncached", "hit", "first")
TIMEOUT = 900


#: PYTHONPATH ahead of the checkout's: a snapshot of aioov (``--aioov HEAD``), or none
_SNAPSHOT: list[str] = []


def snapshot(rev: str, into: Path) -> str:
    """aioov as committed at ``rev``, extracted into ``into`` with its .pyc files written: the
    runs of a half-hour measurement see one aioov while others edit the checkout."""
    import compileall
    import io
    import tarfile

    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "aioov"], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(into, filter="data")
    compileall.compile_dir(str(into / "aioov"), quiet=1)
    _SNAPSHOT[:] = [str(into)]  # also the runs' working directory: python -c imports from there first
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", rev], capture_output=True, text=True,
                          check=True).stdout.strip()


def _env() -> dict[str, str]:
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([*_SNAPSHOT, env["PYTHONPATH"]])
    return env


def _run(mode: str, path: Path, cache: Path) -> dict[str, Any]:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _RUN, mode, str(path), str(cache)], capture_output=True,
                          text=True, env=_env(), timeout=TIMEOUT, cwd=_SNAPSHOT[0] if _SNAPSHOT else ROOT)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-400:]}", "process_wall": wall}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    return {**json.loads(lines[-1]), "process_wall": wall}


def _manifest(cache: Path) -> dict[str, Any]:
    found = sorted(cache.rglob("manifest.json"))
    if not found:
        return {"missing": "no manifest.json under the cache folder"}
    manifest = json.loads(found[0].read_text())
    build = manifest.get("build") or {}
    keep = ("variant", "check", "load_seconds", "instant_load_seconds", "export_seconds", "check_seconds",
            "prepacked")
    return {**{k: build.get(k) for k in keep if k in build},
            **({"not_cacheable": manifest["not_cacheable"]} if "not_cacheable" in manifest else {}),
            "entry_bytes": sum(int(f.get("size", 0)) for f in (manifest.get("files") or {}).values())}


def model_bytes(path: Path) -> dict[str, int]:
    """The model file's size and its external data files' (each counted once)."""
    import onnx

    sizes = {"model": path.stat().st_size, "external": 0}
    proto = onnx.load(str(path), load_external_data=False)
    locations = set()
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(e.value for e in tensor.external_data if e.key == "location")
    sizes["external"] = sum((path.parent / name).stat().st_size for name in locations
                            if (path.parent / name).exists())
    return sizes


def _stats(values: list[float]) -> dict[str, float] | None:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)} if values else None


def measure(path: Path, work: Path, repeats: int) -> dict[str, Any]:
    entry = work / "entry"
    setup = _run("first", path, entry)  # the hits' entry; the first run warms the page cache too
    samples: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
    builds: list[dict[str, Any]] = []
    for repeat in range(repeats):
        for mode in MODES if repeat % 2 == 0 else MODES[::-1]:
            cache = entry if mode == "hit" else work / f"first-{repeat}"
            sample = _run(mode, path, cache)
            if mode == "first":
                builds.append(_manifest(cache))
                shutil.rmtree(cache, ignore_errors=True)
            samples[mode].append(sample)
    ok = {mode: [s for s in v if "error" not in s] for mode, v in samples.items()}
    stat = {f"{mode}_{field}": _stats([s[field] for s in ok[mode] if field in s])
            for mode in MODES for field in ("compile", "cpu_self", "cpu_children", "process_wall")}
    stat["first_published"] = _stats([s["published"] for s in ok["first"] if "published" in s])
    stat["first_cpu_total"] = _stats([s["cpu_self"] + s["cpu_children"] for s in ok["first"]])
    stat["uncached_cpu_total"] = _stats([s["cpu_self"] + s["cpu_children"] for s in ok["uncached"]])
    stat["hit_cpu_total"] = _stats([s["cpu_self"] + s["cpu_children"] for s in ok["hit"]])
    stat["builder_load_seconds"] = _stats([b["load_seconds"] for b in builds if "load_seconds" in b])
    hits = [s.get("loaded_from_cache") for s in ok["hit"]]
    return {"setup": setup, "entry": _manifest(entry), "samples": samples, "builds": builds, "stats": stat,
            "all_hits": bool(hits) and all(hits),
            "not_cached_reason": next((s.get("not_cached_reason") for s in ok["hit"] if not s.get("loaded_from_cache")),
                                      setup.get("not_cached_reason")),
            "errors": sum(len(v) - len(ok[m]) for m, v in samples.items())}


def models(only: list[str]) -> list[tuple[str, Path]]:
    sys.path.insert(0, str(ROOT))
    from tests.corpus import CORPUS, fetch

    from .models import model

    found = [(f"bench/{size}", model(size)) for size in ("bert-small", "bert-medium", "bert-base")]
    for real in CORPUS:
        try:
            found.append((real.name, fetch(real)))
        except OSError as exc:
            print(f"{real.name}: not measured ({exc})", file=sys.stderr)
    return [(name, path) for name, path in found if not only or any(o in name for o in only)]


def fit(points: list[tuple[float, float]]) -> dict[str, float] | None:
    """Least squares y = a + b x, with r^2."""
    if len(points) < 3:
        return None
    xs, ys = zip(*points)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in points)
    syy = sum((y - my) ** 2 for y in ys)
    b = sxy / sxx if sxx else 0.0
    return {"a": my - b * mx, "b": b, "r2": sxy * sxy / (sxx * syy) if sxx and syy else 0.0, "n": len(points)}


def _lscpu() -> str | None:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), None)


def _m(stat: dict[str, float] | None) -> float:
    return stat["median"] if stat else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", action="append", default=[], help="models whose name contains this")
    parser.add_argument("--aioov", default="HEAD", metavar="REV",
                        help="measure aioov as committed at REV (default HEAD); 'worktree': the checkout as is")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "worth.json")
    args = parser.parse_args()
    from .run import _compile_bytecode, machine

    _compile_bytecode()
    info = {**machine(), "lscpu_model_name": _lscpu(), "load_average_start": os.getloadavg()}
    keep = tempfile.TemporaryDirectory(prefix="aioov-worth-src-")
    if args.aioov != "worktree":
        info["aioov_commit"] = snapshot(args.aioov, Path(keep.name))
        print(f"aioov as committed at {info['aioov_commit'][:10]}", flush=True)
    began = time.time()
    rows: dict[str, Any] = {}
    print(f"{'model':52s} {'MB':>7s} {'uncach':>7s} {'hit':>7s} {'saved':>7s} {'share':>6s} {'b.load':>7s} "
          f"{'first':>7s} {'×unc':>5s} {'cpu1st':>6s} {'cpuUnc':>6s}  hit?")
    for name, path in models(args.only):
        size = model_bytes(path)
        with tempfile.TemporaryDirectory(prefix="aioov-worth-") as tmp:
            row = measure(path, Path(tmp), args.repeats)
        row.update(size_bytes=size, load_average=os.getloadavg())
        s = row["stats"]
        unc, hit = _m(s["uncached_compile"]), _m(s["hit_compile"])
        row["saved_seconds"], row["saved_share"] = unc - hit, (unc - hit) / unc if unc else None
        rows[name] = row
        first = _m(s["first_compile"])
        print(f"{name[:52]:52s} {(size['model'] + size['external']) / 2**20:7.2f} {unc:7.3f} {hit:7.3f} "
              f"{unc - hit:+7.3f} {(unc - hit) / unc:6.0%} {row['entry'].get('load_seconds', float('nan')):7.3f} "
              f"{first:7.3f} {first / unc:5.2f} {_m(s['first_cpu_total']):6.2f} {_m(s['uncached_cpu_total']):6.2f}  "
              f"{'yes' if row['all_hits'] else 'NO: ' + str(row['not_cached_reason'])}"
              f"{'  errors: ' + str(row['errors']) if row['errors'] else ''}", flush=True)
    points = [(r["stats"]["builder_load_seconds"]["median"], r["stats"]["hit_compile"]["median"])
              for r in rows.values() if r["stats"]["builder_load_seconds"] and r["stats"]["hit_compile"]]
    small = [(x, y) for x, y in points if x < 0.1]
    fits = {"hit_on_builder_load": fit(points), "hit_on_builder_load_below_0.1s": fit(small),
            "uncached_on_builder_load": fit([(r["stats"]["builder_load_seconds"]["median"],
                                              r["stats"]["uncached_compile"]["median"]) for r in rows.values()
                                             if r["stats"]["builder_load_seconds"] and r["stats"]["uncached_compile"]])}
    for label, f in fits.items():
        if f:
            print(f"{label}: y = {f['a']:.4f} + {f['b']:.3f} x  (r² {f['r2']:.3f}, n {f['n']})")
    info["load_average_end"] = os.getloadavg()
    result = {
        "machine": info, "onnxruntime": info.get("onnxruntime"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "minutes": round((time.time() - began) / 60, 1), "repeats": args.repeats,
        "method": " ".join("""
            benchmarks/worth.py: aioov as committed at aioov_commit (a snapshot, not the checkout being edited),
            CACHE_ALWAYS where aioov has it; every run a fresh process (python -c, .pyc written first); per repeat
            the modes uncached / hit / first in turn, the order reversed every other repeat; compile = perf_counter
            around `await core.compile_model(path, 'CPU')` alone (defaults: CACHE_VERIFY FULL, CACHE_HIT_MODE FULL,
            CACHE_EXPORT ASYNC); first = an empty cache folder each run, published = compile start until
            wait_exports() returns; cpu_* = getrusage SELF / CHILDREN after the Core is closed (the builder
            processes have exited by then; *_waited: right after wait_exports); the hits' entry written once before
            the repeats; builder_load_seconds = the manifests' build.load_seconds of every first run; medians with
            min-max""".split()),
        "fits": fits, "models": rows,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    keep.cleanup()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
