"""Quickstart: compile a model twice with a cache directory, then run it.

    python examples/quickstart.py [MODEL.onnx] [--cache-dir DIR]

Without a model, a small BERT-like encoder is generated (no download needed).
The second compile imports the blob that the first one exported.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import anyio
import numpy as np
import onnx

import aioov
from aioov.testing import bert_like


async def main(model: Path, cache_dir: Path) -> None:
    async with aioov.Core(cache_dir=cache_dir) as core:
        print("devices:", core.get_available_devices())
        for attempt in ("first", "second"):
            started = time.perf_counter()
            compiled = await core.compile_model(model, "AUTO")
            elapsed = time.perf_counter() - started
            print(f"{attempt} compile: {elapsed * 1000:7.1f} ms  "
                  f"loaded from cache: {compiled.get_property('LOADED_FROM_CACHE')}")
            await core.wait_exports()  # a server would not wait; here it shows the hit
        inputs = {
            port.name: np.ones([d if isinstance(d, int) else 8 for d in port.shape], port.dtype)
            for port in compiled.inputs
        }
        outputs = await compiled.infer(inputs)
        for name, value in outputs.items():
            print(f"output {name}: shape {value.shape}, mean {value.mean():.4f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", type=Path)
    parser.add_argument("--cache-dir", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = Path(tmp) / "bert_small.onnx"
            onnx.save(bert_like(layers=4, hidden=256, heads=4, vocab=8000), model)
        anyio.run(main, model, args.cache_dir or Path(tmp) / "cache")
