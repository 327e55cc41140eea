"""aioov under trio: the same API, since aioov is written on anyio.

    python examples/trio_usage.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import trio

import aioov
from aioov.testing import mlp


async def main(folder: Path) -> None:
    path = folder / "mlp.onnx"
    onnx.save(mlp(), path)
    async with aioov.Core(cache_dir=folder / "cache") as core:
        async with trio.open_nursery() as nursery:  # identical compiles in flight share one job
            for _ in range(4):
                nursery.start_soon(core.compile_model, path, "CPU")
        await core.wait_exports()  # the entry, written in the background
        compiled = await core.compile_model(path, "CPU")
        outputs = await compiled.infer({"x": np.ones((2, 8), np.float32)})
        print("from cache:", compiled.get_property("LOADED_FROM_CACHE"), "output shape:", outputs["y"].shape)


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        trio.run(main, Path(tmp))
