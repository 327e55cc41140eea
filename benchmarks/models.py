"""Benchmark models, generated with onnx.helper (no torch) and cached outside the repo."""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from aioov.testing import bert_like

#: name -> bert_like() arguments
SIZES: dict[str, dict[str, int]] = {
    "bert-base": dict(layers=12, hidden=768, heads=12, vocab=30522),  # ~435 MB, BERT-base's shape
    "bert-medium": dict(layers=8, hidden=512, heads=8, vocab=30522),  # ~160 MB
    "bert-small": dict(layers=4, hidden=384, heads=6, vocab=8000),  # ~40 MB
}


def model_dir() -> Path:
    root = Path(os.environ.get("AIOOV_BENCH_DIR", Path.home() / ".cache" / "aioov-bench"))
    path = root / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def model(size: str, seed: int = 0) -> Path:
    """The path of a generated model, building it on first use."""
    path = model_dir() / f"{size}-{seed}.onnx"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        onnx.save(bert_like(**SIZES[size], seed=seed), tmp)
        os.replace(tmp, path)
    return path
