"""Warm-up: run a compiled model on made-up inputs before anyone waits for it.

The first inference pays one-time costs that no cache keeps: first-touch page faults of
memory-mapped weights, allocator growth, and on a GPU cuDNN's search for convolution
algorithms (1.1-1.2 s for a small detector on an H100, against 2-4 ms afterwards). ``WARMUP=N``
runs N inferences in the compile job, before ``compile_model`` returns, on inputs from
``_inputs.first_run`` (made-up inputs, dynamic dimensions grown until the model accepts
them). A model whose inputs cannot be made up, or that fails on them, is returned unwarmed
with a warning saying why: warm-up never fails a compile.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import onnxruntime as ort

from ._cache.sentinel import ShapeGuard
from ._compiled import Port
from ._errors import ORT_ERRORS
from ._inputs import Unsynthesizable, first_run
from ._properties import CompileConfig
from ._sessions import quiet_run

__all__ = ("WarmupReport", "warm_up")

#: a warm-up that meets one of these is skipped, with a warning: it never fails a compile
_SKIP: tuple[type[BaseException], ...] = (Unsynthesizable, MemoryError, *ORT_ERRORS)
#: the most bytes warm-up inputs may take: a warm-up is not worth more
WARMUP_BYTES = 256 << 20

logger = logging.getLogger("aioov")


@dataclass(frozen=True)
class WarmupReport:
    runs: int = 0
    seconds: float = 0.0
    skipped: str | None = None  # why it did not run (None: it ran, or was not asked for)


def warm_up(session: ort.InferenceSession, config: CompileConfig, describe: str,
            guard: ShapeGuard | None = None) -> WarmupReport:
    """Run ``config.warmup`` inferences on ``session`` (blocking); ``guard``: a session loaded
    from the cache, whose runs at new shapes leave a crash sentinel as any inference does."""
    if not config.warmup:
        return WarmupReport()
    started = time.perf_counter()
    run = quiet_run(session)

    def guarded(feed: dict[str, Any]) -> Any:
        token = guard.begin(feed) if guard is not None else None
        try:
            return run(feed)
        finally:
            if guard is not None:
                guard.end(token)

    try:
        ports = [Port.from_node_arg(a) for a in session.get_inputs()]
        feed, _ = first_run(ports, guarded, config.warmup_shapes, config.warmup_values, max_bytes=WARMUP_BYTES)
        for _ in range(config.warmup - 1):
            session.run(None, feed)
    except _SKIP as exc:
        logger.warning("aioov: %s was not warmed up: %s", describe, exc)
        return WarmupReport(skipped=str(exc))
    return WarmupReport(config.warmup, time.perf_counter() - started)
