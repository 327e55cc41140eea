"""A cache of many entries (#45): what a hit, a publish and each ``aioov cache`` command cost at
1,000, 10,000 (and 100,000) entries, and which bookkeeping files are left behind.

The cache is built for real: the first ``--real`` entries (1,000 by default) are tiny models
(``aioov.testing.mlp``, each its own weights) compiled by ``aioov warmup`` in two processes at
once, with ``CACHE_ALWAYS`` (aioov would not cache models this small otherwise); the entries
beyond are copies of those, published with ``CacheStore.publish`` (fsync, manifest, rename,
journal line) under their key lock by four processes, each with a stat index record of a
model path of its own, as a compile leaves: compiling 100,000 models would take hours here.

Measured at each size, every figure in fresh processes:

- ``hit``: ``compile_model`` of 40 random cached models in one process (median, ms);
- ``publish``: 50 new entries each published with ``CacheStore.publish`` followed by what the
  writer runs after a publish (``claim_upkeep`` and, when it says so, ``upkeep``, here in line
  so that its cost is counted): without a limit, with ``CACHE_MAX_SIZE=10G`` (not reached),
  and with a limit the cache has reached (it prunes to 90 % once, then publishes freely);
  and as aioov did before #45: ``prune(max_size=10G)`` after each publish (5 publishes);
- ``aioov cache stats``/``ls`` (from the summary), ``stats --scan``/``ls --scan`` (reading
  every entry, as they did before), ``verify``, ``prune --max-size <half the bytes>`` and
  ``clear --yes``: seconds of the command (``main()``) and of the whole process, its peak RSS;
- the bookkeeping files (key locks, hash locks, index records, size markers, run folders,
  temp dirs, and what else is under ``v1/``) before and after ``prune`` and ``clear``;
- at the largest size: four processes loading random models (compile + infer, outputs compared
  with onnxruntime's) while ``prune`` removes half the cache: errors, wrong outputs, hangs.

    .venv/bin/python -m benchmarks.cachescale [--sizes 1000 10000] [--real 1000]

writes ``benchmarks/results/cachescale.json`` and prints a table.
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
from .run import machine

RESULTS = Path(__file__).resolve().parent / "results"
ENV = child_env(AIOOV_CACHE_ALWAYS="1")

_MODELS = r"""
import sys, onnx
from aioov.testing import mlp
folder, start, stop = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for seed in range(start, stop):
    onnx.save(mlp(seed=seed), f"{folder}/m{seed:06d}.onnx")
"""

#: publish copies of the cache's real entries under new keys: argv cache, count, seed
_CLONE = r"""
import json, os, random, shutil, sys, time, uuid
from pathlib import Path
from aioov._cache.key import FileStat
from aioov._cache.store import CacheStore
cache, count, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
store = CacheStore(cache)
templates = []
for key in store.keys():
    manifest = json.loads((store.entry_path(key) / "manifest.json").read_text())
    if manifest.get("build") and manifest.get("source"):
        templates.append((store.entry_path(key), manifest))
    if len(templates) == 50:
        break
for n in range(count):
    folder, manifest = rng.choice(templates)
    key = uuid.UUID(int=rng.getrandbits(128)).hex * 2
    model = uuid.UUID(int=rng.getrandbits(128)).hex * 2
    path = f"/models/clone-{seed}-{n}.onnx"
    lock = store.lock(key)
    lock.acquire(60)
    try:
        tmp = store.new_tmp(key)
        for name in manifest["files"]:
            shutil.copyfile(folder / name, tmp / name)
        inputs = {**manifest["key_inputs"], "model": model}
        body = {k: v for k, v in manifest.items() if k not in ("files", "key", "format")}
        body.update(key_inputs=inputs, source={"path": path}, created=time.time())
        store.publish(key, tmp, body, records=manifest["files"])
    finally:
        lock.release()
    size = (folder / "model.onnx").stat().st_size
    store.index.store([FileStat(path, size, 0, 0, n, seed)], model)  # as hashing the model leaves it
print(count)
"""

#: hits in one process: argv cache, models..., prints JSON
_HITS = r"""
import json, sys, time, anyio, aioov
async def main():
    cache, *paths = sys.argv[1:]
    times, hits = [], 0
    async with aioov.Core(cache_dir=cache) as core:
        for path in paths:
            t = time.perf_counter()
            compiled = await core.compile_model(path, "CPU")
            times.append(time.perf_counter() - t)
            hits += compiled.get_property("LOADED_FROM_CACHE")
    print(json.dumps({"times": times, "hits": hits}))
anyio.run(main)
"""

#: publishes in one process: argv cache, count, mode, limit; prints JSON of per-publish seconds
_PUBLISH = r"""
import json, random, sys, time, uuid
from aioov._cache.store import CacheStore
cache, count = sys.argv[1], int(sys.argv[2])
modes = [(name, int(limit) or None) for name, limit in (m.rsplit("=", 1) for m in sys.argv[3:])]
store = CacheStore(cache)
store.ensure()
key0 = next(k for k in store.keys() if (store.entry_path(k) / "model.onnx").exists())
folder = store.entry_path(key0)
manifest = json.loads((folder / "manifest.json").read_text())
blobs = {name: (folder / name).read_bytes() for name in manifest["files"]}  # pruning may take the entry
rng = random.Random(cache)
found = {name: {"publish": [], "limit": [], "upkeeps": 0} for name, _ in modes}
for n in range(count):
    for name, limit in modes:  # in turn: each mode's publishes see the same disk and machine
        key = uuid.UUID(int=rng.getrandbits(128)).hex * 2
        lock = store.lock(key)
        lock.acquire(60)
        tmp = store.new_tmp(key)
        for file, blob in blobs.items():
            (tmp / file).write_bytes(blob)
        body = {k: v for k, v in manifest.items() if k not in ("files", "key", "format")}
        body["source"] = {"path": f"/models/publish-{name}-{n}.onnx"}
        t = time.perf_counter()
        store.publish(key, tmp, body, records=manifest["files"])
        lock.release()
        t1 = time.perf_counter()
        if name == "before":  # aioov before #45 (run on its own code): a full prune after each publish
            store.prune(max_size=limit)
        elif store.claim_upkeep(limit):  # what the writer asks after a publish (O(1))
            found[name]["upkeeps"] += 1
            store.upkeep(limit)  # in the export worker in a Core: counted here all the same
        found[name]["publish"].append(t1 - t)
        found[name]["limit"].append(time.perf_counter() - t1)
print(json.dumps(found))
"""

#: one command of the command line, timed in its process: argv the command; prints JSON last
_CLI = r"""
import contextlib, io, json, resource, sys, time
t0 = time.perf_counter()
from aioov.cli import main
t1 = time.perf_counter()
out = io.StringIO()
with contextlib.redirect_stdout(out):
    rc = main(sys.argv[1:])
t2 = time.perf_counter()
print(json.dumps({"rc": rc, "import": t1 - t0, "seconds": t2 - t1, "lines": out.getvalue().count("\n"),
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "out": out.getvalue()[-2000:]}))
"""

#: loads random models until a file appears: argv cache, stop file, expected outputs JSON, models...
_LOADER = r"""
import json, random, sys, time, anyio, numpy as np, aioov
from pathlib import Path
async def main():
    cache, stop, expected, *paths = sys.argv[1:]
    want = json.loads(Path(expected).read_text())
    loads = errors = wrong = 0
    rng = random.Random()
    async with aioov.Core(cache_dir=cache) as core:
        while not Path(stop).exists():
            path = rng.choice(paths)
            try:
                compiled = await core.compile_model(path, "CPU")
                y = (await compiled.infer({"x": np.ones((1, 8), np.float32)}))["y"]
                wrong += not np.allclose(y, np.array(want[path], np.float32), rtol=1e-4, atol=1e-5)
                loads += 1
            except Exception as exc:
                errors += 1
                print(repr(exc), file=sys.stderr)
        await core.wait_exports()
    print(json.dumps({"loads": loads, "errors": errors, "wrong": wrong}))
anyio.run(main)
"""


def python(code: str, *args: str, timeout: float = 3600, tree: Path = ROOT) -> str:
    """Run ``code`` in a fresh interpreter on the aioov of ``tree`` (this checkout, or the code
    before #45); its last line of output."""
    env = ENV if tree == ROOT else {**ENV, "PYTHONPATH": str(tree)}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=tree, env=env,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"failed:\n{proc.stderr[-3000:]}")
    return (proc.stdout.strip().splitlines() or [""])[-1]


def cli(*args: str, tree: Path = ROOT) -> dict[str, Any]:
    start = time.perf_counter()
    result: dict[str, Any] = json.loads(python(_CLI, *args, tree=tree))
    result["process"] = time.perf_counter() - start
    return result


def bookkeeping(cache: Path) -> dict[str, int]:
    """Files under ``v1`` by kind (a listing, whatever the summary says)."""
    base = cache / "v1"
    counts = {"entries": 0, "key_locks": 0, "hash_locks": 0, "index_records": 0, "size_markers": 0,
              "run_folders": 0, "temp_dirs": 0, "usage_files": 0, "other": 0}
    for shard in base.iterdir():
        if len(shard.name) == 2 and shard.is_dir():
            counts["entries"] += sum(1 for _ in shard.iterdir())
    for entry in (base / ".locks").iterdir() if (base / ".locks").is_dir() else ():
        if entry.name.startswith("hash-"):
            counts["hash_locks"] += 1
        elif entry.name.endswith(".lock"):
            counts["key_locks"] += 1
        elif entry.name != "peers" or any(entry.iterdir()):
            counts["other"] += 1
    kinds = {".json": "index_records", ".size": "size_markers"}
    for entry in (base / ".index").iterdir() if (base / ".index").is_dir() else ():
        counts[kinds.get(entry.suffix, "other")] += 1
    for name, key in ((".runs", "run_folders"), (".tmp", "temp_dirs"), (".usage", "usage_files")):
        folder = base / name
        counts[key] = sum(1 for _ in folder.iterdir()) if folder.is_dir() else 0
    return counts


def files_left(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if not p.is_dir())


class Build:
    """The master cache, grown from one size to the next."""

    def __init__(self, tmp: Path, real: int) -> None:
        self.cache, self.models, self.real = tmp / "cache", tmp / "models", real
        self.size = 0
        self.seconds: dict[str, float] = {}

    def grow(self, size: int) -> None:
        compiled = min(size, self.real) - min(self.size, self.real)
        if compiled > 0:
            start = time.perf_counter()
            halves = [(self.size + i * compiled // 2, self.size + (i + 1) * compiled // 2) for i in range(2)]
            procs = []
            for index, (first, stop) in enumerate(halves):
                folder = self.models / f"batch-{first}-{index}"
                folder.mkdir(parents=True)
                python(_MODELS, str(folder), str(first), str(stop))
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "aioov", "warmup", str(folder), "-q", "--cache-dir", str(self.cache)],
                    cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
            for proc in procs:
                _out, err = proc.communicate(timeout=7200)
                if proc.returncode != 0:
                    raise RuntimeError(f"warmup failed:\n{err[-3000:]}")
            self.seconds[f"compiled {compiled} (2 processes)"] = time.perf_counter() - start
        cloned = size - max(self.size, self.real)
        if cloned > 0:
            start = time.perf_counter()
            shares = [cloned // 4 + (i < cloned % 4) for i in range(4)]
            procs = [subprocess.Popen([sys.executable, "-c", _CLONE, str(self.cache), str(share), str(size * 10 + i)],
                                      cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                     for i, share in enumerate(shares)]
            for proc in procs:
                _out, err = proc.communicate(timeout=7200)
                if proc.returncode != 0:
                    raise RuntimeError(f"clone failed:\n{err[-3000:]}")
            self.seconds[f"cloned {cloned} (4 processes)"] = time.perf_counter() - start
        self.size = size

    def real_models(self) -> list[str]:
        return sorted(str(p) for p in self.models.rglob("*.onnx"))


def timed(result: dict[str, Any]) -> dict[str, Any]:
    return {k: result[k] for k in ("seconds", "process", "peak_mb", "rc")}


def publishes(cache: str, rounds: int, modes: dict[str, int], tree: Path = ROOT) -> dict[str, Any]:
    """Publishes of each mode in turn (``modes``: name → size limit, 0 for none)."""
    found = json.loads(python(_PUBLISH, cache, str(rounds), *(f"{name}={limit}" for name, limit in modes.items()),
                              tree=tree))
    return {name: {"publish_ms": statistics.median(r["publish"]) * 1e3,
                   "limit_ms": statistics.median(r["limit"]) * 1e3,
                   "total_mean_ms": statistics.fmean(p + q for p, q in zip(r["publish"], r["limit"])) * 1e3,
                   "limit_max_ms": max(r["limit"]) * 1e3, "n": len(r["publish"]), "upkeeps": r["upkeeps"]}
            for name, r in found.items()}


def hits(cache: str, paths: list[str], tree: Path = ROOT) -> dict[str, float]:
    found = json.loads(python(_HITS, cache, *paths, tree=tree))
    return {"median": statistics.median(found["times"][1:]) * 1e3, "first": found["times"][0] * 1e3,
            "max": max(found["times"][1:]) * 1e3, "hits": found["hits"], "n": len(found["times"])}


def copy_of(cache: str, work: Path) -> Path:
    """A copy to change, whose stat index records and size markers are an hour old, as in a
    cache in use (younger ones are kept for a compile that may be under way)."""
    if work.exists():
        shutil.rmtree(work)
    subprocess.run(["cp", "-a", cache, str(work)], check=True)
    hour_ago = time.time() - 3600
    for record in (work / "v1" / ".index").iterdir():
        os.utime(record, (hour_ago, hour_ago))
    return work


def measure(build: Build, work: Path, *, largest: bool, before: Path | None) -> dict[str, Any]:
    import random

    import numpy as np

    out: dict[str, Any] = {"build_seconds": dict(build.seconds)}
    cache = str(build.cache)
    models = build.real_models()
    rng = random.Random(len(models))
    sample = rng.sample(models, min(40, len(models)))
    out["hit_ms"] = {"now": hits(cache, sample)}
    if before is not None:
        out["hit_ms"]["before #45"] = hits(cache, sample, before)
    out["publish"] = publishes(cache, 60, {"no limit": 0, "CACHE_MAX_SIZE=10G": 10 << 30})
    if before is not None:
        out["publish"].update(publishes(cache, 5, {"before": 10 << 30}, before))
    commands: dict[str, Any] = {}
    for name, args in (("stats", ("stats",)), ("ls", ("ls",)), ("stats --scan", ("stats", "--scan")),
                       ("ls --scan", ("ls", "--scan"))):
        commands[name] = timed(cli("cache", *args, "--cache-dir", cache))
    if before is not None:
        for name in ("stats", "ls"):
            commands[f"{name}, before #45"] = timed(cli("cache", name, "--cache-dir", cache, tree=before))
    # the rest changes the cache: on copies of it
    copy = copy_of(cache, work)
    counts: dict[str, Any] = {"before": bookkeeping(copy)}
    commands["verify"] = timed(cli("cache", "verify", "--cache-dir", str(copy)))
    half = json.loads(cli("cache", "stats", "--json", "--cache-dir", str(copy))["out"])["bytes"] // 2
    loaders: list[subprocess.Popen[str]] = []
    stop = work.parent / "stop"
    if largest:  # four processes loading random models while prune runs
        import onnxruntime as ort

        expected = work.parent / "expected.json"
        chosen = rng.sample(models, min(60, len(models)))
        expected.write_text(json.dumps({
            path: ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(
                None, {"x": np.ones((1, 8), np.float32)})[0].tolist() for path in chosen}))
        stop.unlink(missing_ok=True)
        loaders = [subprocess.Popen([sys.executable, "-c", _LOADER, str(copy), str(stop), str(expected), *chosen],
                                    cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                   for _ in range(4)]
        time.sleep(5)  # all four loading
    commands["prune half" + (" (4 loaders beside)" if loaders else "")] = timed(
        cli("cache", "prune", "--max-size", str(half), "--cache-dir", str(copy)))
    if loaders:
        stop.touch()
        reports = []
        for proc in loaders:
            try:
                stdout, _stderr = proc.communicate(timeout=300)
                reports.append({**json.loads(stdout.strip().splitlines()[-1]), "rc": proc.returncode})
            except subprocess.TimeoutExpired:
                proc.kill()
                reports.append({"hung": 1})
        out["loaders_during_prune"] = reports
    counts["after prune"] = bookkeeping(copy)
    # publishing into a cache at its limit (half, reached): the first publish prunes it to 90 %,
    # the next tenth of the limit's worth publish freely; beside them in turn, publishes with no limit
    out["publish"].update(publishes(str(copy), 50, {"no limit (cache pruned)": 0, "limit reached": half}))
    commands["clear"] = timed(cli("cache", "clear", "--yes", "--cache-dir", str(copy)))
    counts["after clear"] = bookkeeping(copy)
    out["left_after_clear"] = files_left(copy)
    if before is not None:  # the same on aioov before #45
        copy = copy_of(cache, work)
        commands["verify, before #45"] = timed(cli("cache", "verify", "--cache-dir", str(copy), tree=before))
        commands["prune half, before #45"] = timed(
            cli("cache", "prune", "--max-size", str(half), "--cache-dir", str(copy), tree=before))
        counts["after prune, before #45"] = bookkeeping(copy)
        commands["clear, before #45"] = timed(cli("cache", "clear", "--yes", "--cache-dir", str(copy), tree=before))
        counts["after clear, before #45"] = bookkeeping(copy)
    out["commands"], out["bookkeeping"] = commands, counts
    shutil.rmtree(work)
    return out


def table(results: dict[str, dict[str, Any]]) -> None:
    sizes = list(results)
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, get: Any, fmt: str = "{:.2f}") -> None:
        cells = []
        for size in sizes:
            try:
                value = get(results[size])
                cells.append(fmt.format(value) if isinstance(value, (int, float)) else str(value))
            except (KeyError, TypeError):
                cells.append("-")
        if any(cell != "-" for cell in cells):
            rows.append((label, cells))

    for who in ("now", "before #45"):
        row(f"hit, median (ms), {who}", lambda r, w=who: r["hit_ms"][w]["median"])
    for mode in ("no limit", "CACHE_MAX_SIZE=10G", "no limit (cache pruned)", "limit reached"):
        row(f"publish, {mode}: publish (ms, median)", lambda r, m=mode: r["publish"][m]["publish_ms"])
        row(f"publish, {mode}: then the limit (ms, median)", lambda r, m=mode: r["publish"][m]["limit_ms"])
        row(f"publish, {mode}: both, mean (ms)", lambda r, m=mode: r["publish"][m]["total_mean_ms"])
    row("publish, limit reached: upkeeps / publishes",
        lambda r: "{upkeeps} / {n}".format(**r["publish"]["limit reached"]))
    row("publish, limit reached: the upkeep (ms)", lambda r: r["publish"]["limit reached"]["limit_max_ms"])
    row("publish, before #45 (10G): then the limit (ms, median)", lambda r: r["publish"]["before"]["limit_ms"])
    for name in ("stats", "stats, before #45", "ls", "ls, before #45", "stats --scan", "ls --scan", "verify",
                 "verify, before #45", "prune half", "prune half (4 loaders beside)", "prune half, before #45", "clear",
                 "clear, before #45"):
        row(f"{name}: command (s)", lambda r, n=name: r["commands"][n]["seconds"])
        row(f"{name}: whole process (s)", lambda r, n=name: r["commands"][n]["process"])
        row(f"{name}: peak RSS (MB)", lambda r, n=name: r["commands"][n]["peak_mb"], "{:.0f}")
    kinds = ("entries", "key_locks", "hash_locks", "index_records", "size_markers", "temp_dirs", "usage_files", "other")
    for when in ("before", "after prune", "after prune, before #45", "after clear", "after clear, before #45"):
        row(f"{when}: files (" + ", ".join(kinds) + ")",
            lambda r, w=when: " ".join(str(r["bookkeeping"][w][k]) for k in kinds), "{}")
    row("files left after clear", lambda r: len(r["left_after_clear"]), "{}")
    row("loaders during prune: loads", lambda r: sum(x.get("loads", 0) for x in r["loaders_during_prune"]), "{}")
    row("loaders during prune: errors, wrong, hung", lambda r: "{}, {}, {}".format(
        *(sum(x.get(k, 0) for x in r["loaders_during_prune"]) for k in ("errors", "wrong", "hung"))))
    width = max(len(label) for label, _ in rows)
    cell = max(10, *(len(c) for _, cells in rows for c in cells))
    print(f"| {'':{width}} | " + " | ".join(f"{s:>{cell}}" for s in sizes) + " |")
    print(f"|{'-' * (width + 2)}|" + "|".join("-" * (cell + 2) for _ in sizes) + "|")
    for label, cells in rows:
        print(f"| {label:{width}} | " + " | ".join(f"{c:>{cell}}" for c in cells) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.cachescale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--real", type=int, default=1000, help="entries compiled for real (the rest: copies)")
    parser.add_argument("--before", metavar="REV",
                        help="also run aioov as it was at this git revision (before #45), on the same caches")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="aioov-cachescale-") as tmp_name:
        tmp = Path(tmp_name)
        before = None
        if args.before:
            before = tmp / "before"
            before.mkdir()
            archive = subprocess.run(["git", "archive", args.before, "aioov"], cwd=ROOT, check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", str(before)], input=archive, check=True)
        build = Build(tmp, args.real)
        for size in sorted(args.sizes):
            build.grow(size)
            print(f"{size} entries built: {build.seconds}", file=sys.stderr, flush=True)
            results[str(size)] = measure(build, tmp / "work", largest=size == max(args.sizes), before=before)
            print(json.dumps(results[str(size)]["commands"]), file=sys.stderr, flush=True)
            save(args.out, args, results)  # each size as it is done: a long run may be cut short
    table(results)
    print(f"\nresults: {save(args.out, args, results)}")
    return 0


def save(folder: Path, args: argparse.Namespace, results: dict[str, dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "cachescale.json"
    out.write_text(json.dumps({"machine": machine(), "when": datetime.datetime.now().isoformat(timespec="seconds"),
                               "real": args.real, "before": args.before, "sizes": results}, indent=1))
    return out


if __name__ == "__main__":
    sys.exit(main())
