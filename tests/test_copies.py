"""A model is cached by its content: a copy under another path (another inode, a container's
new layer) is hashed and hits the entry its original left, external weights included."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import aioov

from .helpers import reference

pytestmark = pytest.mark.anyio


async def test_a_copy_of_a_cached_model_hits(cache_dir: Path, mlp_path: Path, tmp_path: Path) -> None:
    async with aioov.Core(cache_dir=cache_dir) as core:
        await core.compile_model(mlp_path, "CPU")
        assert await core.wait_exports(120)
    copy = tmp_path / "copy.onnx"  # another path and inode: the stat index knows nothing of it
    shutil.copyfile(mlp_path, copy)
    async with aioov.Core(cache_dir=cache_dir) as core:
        compiled = await core.compile_model(copy, "CPU")
        assert core.cache_stats.compiles == 0
    assert compiled.get_property("LOADED_FROM_CACHE") is True


async def test_a_copy_of_a_model_with_external_weights_hits(
    cache_dir: Path, external_path: Path, ids: np.ndarray, tmp_path: Path
) -> None:
    async with aioov.Core(cache_dir=cache_dir) as core:
        assert (await core.compile_model(external_path, "CPU")).get_property("LOADED_FROM_CACHE") is False
        assert await core.wait_exports(120)
    copy = tmp_path / "copy"  # the model and its weights file, both copied
    shutil.copytree(external_path.parent, copy)
    async with aioov.Core(cache_dir=cache_dir) as core:
        compiled = await core.compile_model(copy / external_path.name, "CPU")
    assert compiled.get_property("LOADED_FROM_CACHE") is True
    feed = {"input_ids": ids}
    np.testing.assert_allclose((await compiled.infer(feed))["last_hidden_state"],
                               reference(external_path, feed)[0], rtol=1e-4, atol=1e-4)
