"""aioov benchmarks: ``python -m benchmarks`` (see benchmarks/README.md)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a benchmark's child process: this checkout first on ``PYTHONPATH``,
    ahead of what is there (on the GPU machine aioov's dependencies come that way)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}
