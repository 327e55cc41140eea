"""Load every model of a folder at start-up, concurrently, with a progress line.

    python examples/bulk_startup.py [MODELS_DIR] [--cache-dir DIR]

Without a folder, eight small generated models are used. Run it twice with the same
--cache-dir: the second start loads everything from the cache.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import anyio
import onnx

import aioov
from aioov.testing import bert_like


def show(progress: aioov.BulkProgress) -> None:
    result = progress.current
    state = "cached" if result.from_cache else ("FAILED" if result.error else "compiled")
    print(f"[{progress.done:>2}/{progress.total}] {state:8} {Path(str(result.model)).name} "
          f"({result.seconds:.2f}s)", file=sys.stderr)


async def main(folder: Path, cache_dir: Path) -> int:
    paths = sorted(folder.glob("*.onnx"))
    started = time.perf_counter()
    async with aioov.Core(cache_dir=cache_dir) as core:
        results = await core.compile_all(paths, "AUTO", progress=show)
        ready = time.perf_counter() - started
        models = {Path(str(r.model)).stem: r.compiled for r in results if r.ok}
        print(f"{len(models)}/{len(paths)} models ready in {ready:.2f}s "
              f"({sum(r.from_cache for r in results)} from cache)")
    return 0 if len(models) == len(paths) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", type=Path)
    parser.add_argument("--cache-dir", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder
        if folder is None:
            folder = Path(tmp) / "models"
            folder.mkdir()
            for seed in range(8):
                onnx.save(bert_like(layers=2, hidden=128, heads=4, vocab=2000, seed=seed), folder / f"m{seed}.onnx")
        sys.exit(anyio.run(main, folder, args.cache_dir or Path(tmp) / "cache"))
