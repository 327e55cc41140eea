"""Does a mechanism earn its keep? Two aioov trees, A and B, alternating in fresh processes (#39).

A is aioov with the mechanism, B the same aioov without it (a minimal patch), or one tree run
with two settings (``--a-config``/``--b-config``: compile properties). Each pair runs A and B
once each, in fresh processes, the order swapped every other pair (A first in pairs 1, 3, ...);
the table shows each variant's median and min-max, and the pairs' B/A ratios (their median
and min-max): a mechanism earns its keep where B/A stays above 1 beyond the spread.

    python -m benchmarks.ab --a /tmp/ab/base --b /tmp/ab/no-early --scenario first --key early
    python -m benchmarks.ab --a HEAD --b HEAD~3 --scenario export --repeats 7
    python -m benchmarks.ab --a DIR --b DIR --scenario instant \\
        --a-config '{"CACHE_HIT_MODE": "INSTANT"}' --b-config '{"CACHE_HIT_MODE": "FULL"}'

A tree is a folder holding an ``aioov`` package (a git worktree) or a git revision (its
``aioov`` extracted with ``git archive``). The runs import aioov from the tree (checked: the
child reports ``aioov.__file__``), and their builders too; the harness (``benchmarks.worker``)
is always this checkout's. Scenarios (``--size``: the model, BERT-base-like by default):

- ``first``: a first compile on an empty cache (the previous run's entry deleted and the disk
  synced first): ``compile_model`` alone, and until ``wait_exports()`` returns (the entry
  published); the builder's ``export_seconds``/``check_seconds`` from the manifest and its peak
  RSS (``VmHWM``, sampled every 50 ms);
- ``export``: a cold bulk load (``compile_all``, ``CACHE_ALWAYS``: all exported) of 16 ~40 MB
  models with a cache, each run on a new folder (the last one deleted, the disk synced): all
  compiled, all exported and checked (published), the largest builder's peak RSS (``VmHWM``,
  sampled every 50 ms) and how many builder processes ran;
- ``verify``: a warm hit with ``CACHE_VERIFY=FULL`` of an entry never verified on this host (its
  verification stamps removed before each run): ``compile_model``;
- ``instant``: a warm hit (stamped) in a fresh process, ``compile_model`` and the first inference
  (``CACHE_HIT_MODE`` from the variant's config), and a folder of 12 cached models (11 ~40 MB and
  the ``--size`` one) from ``python`` start to all ready.

Results go to ``benchmarks/results/ab.json`` under ``--key`` (the scenario's name by default),
beside the other keys there: machine, each tree's commit and diff, raw samples.
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
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import ROOT, child_env

RESULTS = ROOT / "benchmarks" / "results" / "ab.json"
SCENARIOS = ("first", "export", "verify", "instant")
TIMEOUT = 900
#: how many ~40 MB models the export scenario loads (as run.py's ``export``), and the folder's
EXPORT_COUNT = 16
FOLDER_SMALL = 11

#: a child: aioov from the tree (first on sys.path: ``-c`` puts the working directory, the tree,
#: first), this checkout's ``benchmarks`` package by its file, then ``child(task, kwargs)``
_BOOT = r"""
import importlib.util, json, sys
root = sys.argv[1]
spec = importlib.util.spec_from_file_location("benchmarks", root + "/benchmarks/__init__.py",
                                              submodule_search_locations=[root + "/benchmarks"])
module = importlib.util.module_from_spec(spec)
sys.modules["benchmarks"] = module
spec.loader.exec_module(module)
from benchmarks.ab import child
print(json.dumps(child(sys.argv[2], json.loads(sys.argv[3]))))
"""


# -- in the child ---------------------------------------------------------------------------


def _watch_builders(stop: threading.Event, peaks: dict[int, float]) -> None:
    """Each builder's peak RSS (``VmHWM``, its own since its ``exec``), every 50 ms until
    ``stop``. Not ``getrusage(RUSAGE_CHILDREN).ru_maxrss``: a child spawned by a process of
    800 MB reports 800 MB there (the kernel counts the spawning process's memory at the exec),
    and a child not yet past its ``exec`` (its command line still this process's) shows this
    process's memory as its own: only children running the builder's boot code count."""
    me = os.getpid()
    while True:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) != me:
                        continue
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    if b"AIOOV_BUILDER_SYS_PATH" not in f.read():
                        continue
                with open(f"/proc/{entry.name}/status") as f:
                    hwm = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
            except (OSError, ValueError, IndexError, StopIteration):
                continue
            peaks[int(entry.name)] = max(peaks.get(int(entry.name), 0.0), hwm)
        if stop.wait(0.05):
            return


def child(task: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """One run, in a fresh process whose aioov is the tree's; ``watch``: the builders' memory."""
    import anyio

    import aioov

    from . import worker

    stop, peaks = threading.Event(), dict[int, float]()
    watcher = threading.Thread(target=_watch_builders, args=(stop, peaks), daemon=True)
    if kwargs.pop("watch", False):
        watcher.start()
    out: dict[str, Any]
    if task == "compile":
        out = anyio.run(lambda: worker.aioov_compile(**kwargs))
        out.pop("stats", None)
    elif task == "export":
        out = anyio.run(lambda: _export_burst(**kwargs))
    elif task == "instant":
        out = anyio.run(lambda: worker.instant_hit(**kwargs))
    elif task == "folder":
        out = worker.folder_start(**kwargs)
    else:
        raise ValueError(f"unknown task {task}")
    if watcher.is_alive():
        stop.set()
        watcher.join()
        out["builders_peak_mb"], out["builders"] = max(peaks.values(), default=0.0), len(peaks)
    out["aioov_file"] = aioov.__file__
    return out


async def _export_burst(models: list[str], cache_dir: str, config: dict[str, Any]) -> dict[str, Any]:
    """``worker.export_burst`` with the kept builder as the tree has it, and ``config``: with
    ``CACHE_ALWAYS`` every model is exported (without it, aioov judges some ~40 MB models not
    worth caching, a different number each run, and ``export_burst`` fails its own check)."""
    import aioov

    async with aioov.Core(cache_dir=cache_dir) as core:
        core.get_available_devices()
        started = time.perf_counter()
        results = await core.compile_all(models, "CPU", config)
        ready = time.perf_counter() - started
        await core.wait_exports()
        done = time.perf_counter() - started
        exports = core.cache_stats.exports
    if not all(r.ok and not r.from_cache for r in results):
        raise RuntimeError(f"not every model compiled afresh: {results}")
    return {"ready": ready, "done": done, "exports": exports}


# -- in the parent --------------------------------------------------------------------------


class Tree:
    """One side: a folder with aioov in it, or a revision extracted into a temporary one."""

    def __init__(self, spec: str, config: dict[str, Any], keep: Path, label: str) -> None:
        from .worth import snapshot

        self.spec, self.config = spec, config
        if (Path(spec) / "aioov" / "__init__.py").exists():
            self.path = Path(spec).resolve()
            self.commit = _git(self.path, "rev-parse", "HEAD")
            self.diff = _git(self.path, "diff", "HEAD", "--", "aioov")
        else:
            self.path = keep / label
            self.path.mkdir()
            self.commit, self.diff = snapshot(spec, self.path), ""
        import compileall  # as run._compile_bytecode: no module compiled again in every fresh process

        compileall.compile_dir(str(self.path / "aioov"), quiet=1)

    def run(self, task: str, **kwargs: Any) -> dict[str, Any]:
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _BOOT, str(ROOT), task, json.dumps(kwargs)],
                              capture_output=True, text=True, timeout=TIMEOUT, cwd=self.path,
                              env=child_env(PYTHONPATH=os.pathsep.join([str(self.path), str(ROOT)])))
        wall = time.perf_counter() - started
        if proc.returncode != 0:
            raise RuntimeError(f"{task} in {self.path} failed:\n{proc.stderr[-3000:]}")
        out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        if not out["aioov_file"].startswith(str(self.path) + os.sep):
            raise RuntimeError(f"the run imported {out['aioov_file']}, not the tree's aioov ({self.path})")
        out["process_wall"] = wall
        return out

    def as_json(self) -> dict[str, Any]:
        return {"spec": self.spec, "path": str(self.path), "commit": self.commit, "config": self.config,
                "diff": self.diff}


def _git(path: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, check=True).stdout.strip()


#: one run of a scenario: (tree, run index, work folder) -> metrics
Runner = Callable[[Tree, int, Path], dict[str, float]]


def _scenario(name: str, size: str, work: Path, a: Tree) -> tuple[Runner, dict[str, str]]:
    """The scenario's runner, and what each metric is; entries the runs share are written
    here, by A, before the pairs."""
    from .models import model

    path = str(model(size))
    if name == "first":
        def first(tree: Tree, index: int, tmp: Path) -> dict[str, float]:
            for old in tmp.glob("first-*"):  # the previous run's entry, gone before this one
                shutil.rmtree(old, ignore_errors=True)
            os.sync()
            cache = tmp / f"first-{index}"
            r = tree.run("compile", model=path, cache_dir=str(cache), wait_export=True, config=tree.config or None,
                         watch=True)
            assert not r["from_cache"], r
            (manifest,) = cache.glob("v1/??/*/manifest.json")
            build = json.loads(manifest.read_text()).get("build") or {}
            return {"compile": r["seconds"], "published": r["export_done"],
                    "builder_export": build.get("export_seconds", float("nan")),
                    "builder_check": build.get("check_seconds", float("nan")),
                    "builder_peak_mb": r["builders_peak_mb"]}

        return first, {"compile": "compile_model (s)", "published": "until wait_exports(): entry published (s)",
                       "builder_export": "builder export_seconds (manifest)",
                       "builder_check": "builder check_seconds (manifest)",
                       "builder_peak_mb": "builder peak RSS, VmHWM (MB)"}
    if name == "export":
        paths = [str(model("bert-small", seed)) for seed in range(EXPORT_COUNT)]

        def export(tree: Tree, index: int, tmp: Path) -> dict[str, float]:
            for old in tmp.glob("export-*"):
                shutil.rmtree(old, ignore_errors=True)
            os.sync()
            r = tree.run("export", models=paths, cache_dir=str(tmp / f"export-{index}"),
                         config={"CACHE_ALWAYS": True, **tree.config}, watch=True)
            if r["exports"] != EXPORT_COUNT:
                raise RuntimeError(f"{r['exports']} exports, not {EXPORT_COUNT}")
            return {"ready": r["ready"], "done": r["done"], "builder_peak_mb": r["builders_peak_mb"],
                    "builders": r["builders"]}

        return export, {"ready": f"all {EXPORT_COUNT} compiled (s)", "done": "all exported and checked (s)",
                        "builder_peak_mb": "largest builder's peak RSS, VmHWM (MB)",
                        "builders": "builder processes started (count)"}
    if name == "verify":
        from .run import _unstamp

        cache = work / "verify-cache"
        a.run("compile", model=path, cache_dir=str(cache), wait_export=True)

        def verify(tree: Tree, index: int, tmp: Path) -> dict[str, float]:
            _unstamp(str(cache))
            r = tree.run("compile", model=path, cache_dir=str(cache),
                         config={"CACHE_VERIFY": "FULL", **tree.config})
            assert r["from_cache"], r
            return {"compile": r["seconds"]}

        return verify, {"compile": "warm hit, CACHE_VERIFY=FULL, unstamped: compile_model (s)"}
    if name == "instant":
        cache = work / "instant-cache"
        folder = [str(model("bert-small", seed)) for seed in range(FOLDER_SMALL)] + [path]
        for item in folder:
            a.run("compile", model=item, cache_dir=str(cache), wait_export=True)
        a.run("folder", models=folder, cache_dir=str(cache), mode="FULL")  # stamps the entries

        def instant(tree: Tree, index: int, tmp: Path) -> dict[str, float]:
            mode = tree.config.get("CACHE_HIT_MODE", "FULL")
            r = tree.run("instant", model=path, cache_dir=str(cache), mode=mode)
            folder_ready = tree.run("folder", models=folder, cache_dir=str(cache), mode=mode)["ready"]
            return {"compile": r["ready"], "first_inference": r["first"], "first_answer": r["ready"] + r["first"],
                    "full_speed_at": r["full_speed_at"], "folder": folder_ready}

        return instant, {"compile": "warm hit: compile_model (s)", "first_inference": "first inference (s)",
                         "first_answer": "compile_model + first inference (s)",
                         "full_speed_at": "full-speed session serving (s)",
                         "folder": f"{FOLDER_SMALL + 1} cached models: python start to all ready (s)"}
    raise ValueError(name)


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def measure(a: Tree, b: Tree, scenario: str, size: str, repeats: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="aioov-ab-") as tmp_name:
        tmp = Path(tmp_name)
        runner, metrics = _scenario(scenario, size, tmp, a)
        pairs: list[dict[str, Any]] = []
        for pair in range(repeats):
            order = ("A", "B") if pair % 2 == 0 else ("B", "A")
            done: dict[str, Any] = {"order": "".join(order)}
            for side in order:
                done[side] = runner(a if side == "A" else b, 2 * pair + len(done) - 1, tmp)
            done["load_average"] = os.getloadavg()
            pairs.append(done)
            print(f"  pair {pair + 1}/{repeats} {done['order']}: "
                  + "  ".join(f"{m} A {done['A'][m]:.4g} B {done['B'][m]:.4g}" for m in metrics), flush=True)
    summary = {}
    for metric, title in metrics.items():
        av, bv = [p["A"][metric] for p in pairs], [p["B"][metric] for p in pairs]
        ratios = [y / x for x, y in zip(av, bv) if x]
        summary[metric] = {"title": title, "A": _stats(av), "B": _stats(bv), "ratio_b_over_a": _stats(ratios),
                           "b_slower_in_pairs": sum(r > 1 for r in ratios)}
    return {"pairs": pairs, "summary": summary}


def print_table(key: str, summary: dict[str, Any]) -> None:
    print(f"\n## {key}: B/A per pair (> 1: B, without the mechanism, is slower)\n")
    print(f"| {'metric':52} | {'A median (min-max)':>26} | {'B median (min-max)':>26} | "
          f"{'B/A median (min-max)':>24} | B>A |")
    print(f"|{'-' * 54}|{'-' * 28}|{'-' * 28}|{'-' * 26}|-----|")

    def cell(s: dict[str, float], digits: int) -> str:
        return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"

    for s in summary.values():
        digits = 1 if "MB" in s["title"] or "count" in s["title"] else 4
        print(f"| {s['title'][:52]:52} | {cell(s['A'], digits):>26} | {cell(s['B'], digits):>26} | "
              f"{cell(s['ratio_b_over_a'], 3):>24} | {s['b_slower_in_pairs']}/{s['A']['n']} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__.split("\n")[0])
    parser.add_argument("--a", required=True, help="with the mechanism: a folder holding aioov, or a git rev")
    parser.add_argument("--b", required=True, help="without it: a folder holding aioov, or a git rev")
    parser.add_argument("--a-config", type=json.loads, default={}, help="compile properties of A's runs (JSON)")
    parser.add_argument("--b-config", type=json.loads, default={}, help="compile properties of B's runs (JSON)")
    parser.add_argument("--scenario", required=True, choices=SCENARIOS)
    parser.add_argument("--key", help="the result's key in ab.json (default: the scenario)")
    parser.add_argument("--repeats", type=int, default=7, help="pairs (default 7)")
    parser.add_argument("--size", default="bert-base", help="the model of first, verify and instant")
    parser.add_argument("--note", default="", help="what B removes, kept with the result")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from .run import _compile_bytecode, machine
    from .worth import _lscpu

    _compile_bytecode()
    key = args.key or args.scenario
    info = {**machine(), "lscpu_model_name": _lscpu(), "load_average_start": os.getloadavg()}
    began = time.time()
    with tempfile.TemporaryDirectory(prefix="aioov-ab-src-") as keep:
        a = Tree(args.a, args.a_config, Path(keep), "a")
        b = Tree(args.b, args.b_config, Path(keep), "b")
        print(f"{key}: scenario {args.scenario}, {args.repeats} pairs; A {a.path} ({a.commit[:10]}"
              f"{', patched' if a.diff else ''}{', ' + json.dumps(a.config) if a.config else ''}), "
              f"B {b.path} ({b.commit[:10]}{', patched' if b.diff else ''}"
              f"{', ' + json.dumps(b.config) if b.config else ''})", flush=True)
        result = measure(a, b, args.scenario, args.size, args.repeats)
        trees = {"A": a.as_json(), "B": b.as_json()}
    info["load_average_end"] = os.getloadavg()
    print_table(key, result["summary"])
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results[key] = {
        "scenario": args.scenario, "size": args.size, "note": args.note, "repeats": args.repeats,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "minutes": round((time.time() - began) / 60, 1), "machine": info, "trees": trees,
        "command": " ".join(["python -m benchmarks.ab", *(argv if argv is not None else sys.argv[1:])]),
        "method": " ".join("""
            benchmarks/ab.py: per pair A and B once each, fresh processes (python -c, aioov imported from the
            tree, .pyc written first), the order AB in odd pairs and BA in even ones; the metrics timed inside
            the process (perf_counter around the work alone, as benchmarks/worker.py does), except the folder's
            (python start to all ready); ratio = B / A of the same pair; medians with min-max""".split()),
        **result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {key} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
