"""N worker processes start together on one empty cache: each model is compiled once.

    python examples/shared_cache_workers.py [--workers 4] [--models 3] [--export ASYNC]

Each worker compiles every model; the per-key locks make one process write each model's
entry. With ``CACHE_EXPORT=SYNC`` (here the default) that process's builder compiles and
publishes it while the others wait and import it: one compile per model in all. With
``ASYNC`` (aioov's default) no worker waits longer than its own compile would take, so on a
cold start workers compile models whose entries are still being written, and start sooner.
The summary counts compiles across all workers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx

from aioov.testing import bert_like

WORKER = """
import json, sys, time, anyio, aioov
async def main():
    cache_dir, export, start_at, *paths = sys.argv[1:]
    time.sleep(max(0.0, float(start_at) - time.time()))
    async with aioov.Core(cache_dir=cache_dir) as core:
        results = await core.compile_all(paths, "CPU", {"CACHE_EXPORT": export})
        print(json.dumps({"compiles": core.cache_stats.compiles,
                          "from_cache": sum(r.from_cache for r in results), "ok": all(r.ok for r in results)}))
anyio.run(main)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--models", type=int, default=3)
    parser.add_argument("--export", choices=["SYNC", "ASYNC"], default="SYNC", help="CACHE_EXPORT")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for seed in range(args.models):
            path = Path(tmp) / f"model{seed}.onnx"
            onnx.save(bert_like(layers=3, hidden=128, heads=4, vocab=1000, seed=seed), path)
            paths.append(str(path))
        start_at = str(time.time() + 2)
        procs = [subprocess.Popen([sys.executable, "-c", WORKER, f"{tmp}/cache", args.export, start_at, *paths],
                                  stdout=subprocess.PIPE, text=True) for _ in range(args.workers)]
        reports = [json.loads(p.communicate()[0]) for p in procs]
    for index, report in enumerate(reports):
        print(f"worker {index}: compiled {report['compiles']}, loaded {report['from_cache']} from the cache")
    total = sum(r["compiles"] for r in reports)
    print(f"{args.workers} workers x {args.models} models: {total} compiles in total")
    once = total == args.models or args.export == "ASYNC"
    return 0 if once and all(r["ok"] for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
