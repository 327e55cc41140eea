"""Warm-up: run a compiled model on made-up inputs before anyone waits for it.

The first inference pays one-time costs that no cache keeps: first-touch page faults of
memory-mapped weights, allocator growth, and on a GPU cuDNN's search for convolution
algorithms (1.1-1.2 s for a small detector on an H100, against 2-4 ms afterwards). ``WARMUP=N``
runs N inferences in the compile job, before ``compile_model`` returns, on inputs from
``_inputs.first_run`` (made-up inputs, dynamic dimensions grown until the model accepts
them). A model whose inputs cannot be made up, or that fails on them, is returned unwarmed
with a warning saying why: warm-up never fails a compile. The warning names the inputs it made
up and the properties that fix it (``WARMUP_SHAPES``, ``WARMUP_VALUES``); it is logged once per
model and process (then at DEBUG): N workers compiling the same models log it once each, not
on every compile.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import onnxruntime as ort

from ._cache.cache import ShapeGuard
from ._compiled import Port
from ._errors import ORT_ERRORS, first_line
from ._inputs import DIM_LADDER, Unsynthesizable, first_run, synthesize
from ._properties import CompileConfig
from ._sessions import quiet_run

__all__ = ("WarmupReport", "warm_up")

#: a warm-up that meets one of these is skipped, with a warning: it never fails a compile
_SKIP: tuple[type[BaseException], ...] = (Unsynthesizable, MemoryError, *ORT_ERRORS)
#: the most bytes warm-up inputs may take: a warm-up is not worth more
WARMUP_BYTES = 256 << 20

logger = logging.getLogger("aioov")

#: models whose warm-up failure was logged at WARNING in this process (later ones: DEBUG)
_warned: set[tuple[object, ...]] = set()
_warned_lock = threading.Lock()


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

    ports = [Port.from_node_arg(a) for a in session.get_inputs()]
    try:
        feed, _ = first_run(ports, guarded, config.warmup_shapes, config.warmup_values, max_bytes=WARMUP_BYTES)
        for _ in range(config.warmup - 1):
            session.run(None, feed)
    except _SKIP as exc:
        reason = _why(ports, config, exc)
        model = (describe, *((p.name, p.element_type, p.shape) for p in ports))
        with _warned_lock:
            first = model not in _warned
            _warned.add(model)
        logger.log(logging.WARNING if first else logging.DEBUG, "aioov: %s was not warmed up: %s", describe, reason)
        return WarmupReport(skipped=reason)
    return WarmupReport(config.warmup, time.perf_counter() - started)


def _why(ports: list[Port], config: CompileConfig, exc: BaseException) -> str:
    """Why a warm-up did not run, and what would make it: ``exc``'s first line, the inputs it
    made up (those it failed on), WARMUP_SHAPES and WARMUP_VALUES."""
    if any(port.dtype is None or port.dtype.kind == "O" for port in ports):
        return str(exc)  # "input 'text' is a tensor of strings...": nothing to give instead
    if isinstance(exc, Unsynthesizable):  # the shapes or values given do not fit the model
        return f"{exc}; check WARMUP_SHAPES and WARMUP_VALUES"
    try:  # the inputs of its last try
        feed = synthesize(ports, config.warmup_shapes, default_dim=DIM_LADDER[-1], values=config.warmup_values,
                          max_bytes=WARMUP_BYTES)
    except (Unsynthesizable, MemoryError):
        feed = {}
    made_up = [port.name for port in ports if port.name in feed and port.name not in config.warmup_values]
    shown = ", ".join(_made_up(name, feed[name]) for name in made_up)
    integers = [name for name in made_up if feed[name].dtype.kind != "f"]
    example = f'WARMUP_VALUES={{"{(integers or made_up or ["input"])[0]}": ...}}'
    return (f"it failed on made-up inputs ({shown or 'none'}); give inputs that cannot be made up their values "
            f"in WARMUP_VALUES (a number fills an input, a list is the input: {example}) and the shapes you serve "
            f"in WARMUP_SHAPES. It failed with: {first_line(exc, 600)}")


def _made_up(name: str, value: Any) -> str:
    """``x[1, 512] random``, ``sr = 0``, ``mask[1, 8] all 0``: what warm-up gave an input."""
    if value.dtype.kind == "f":
        return f"{name}{list(value.shape)} random"
    zero = "false" if value.dtype.kind == "b" else "0"
    return f"{name} = {zero}" if value.ndim == 0 else f"{name}{list(value.shape)} all {zero}"
