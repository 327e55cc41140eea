"""onnxruntime's process-wide state: its shared thread pool (``ORT_SHARED_THREAD_POOL``),
and whether this build lets other threads run while it builds a session.

Sessions that use it skip creating (and spinning) pool threads of their own: on 2 cores,
16 sessions built two at a time finished 1.7-1.8x sooner than one by one (1.0-1.3x with
per-session pools), and inference on several sessions contended less. It is onnxruntime's
*environment*, so it is the whole process's: its size is fixed by the first use, and from
then on onnxruntime refuses sessions that ask for pools of their own
("use_per_session_threads must be false when using a global thread pool") — which is why
every session aioov builds goes through ``apply`` and why the property is opt-in.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import onnxruntime as ort

__all__ = ("apply", "enable_shared_pool", "shared_pool_active", "warn_if_session_builds_hold_the_gil")

logger = logging.getLogger("aioov")

_lock = threading.Lock()
_threads: int | None = None  # None: never asked; 0: unavailable; n: active with n threads


def enable_shared_pool(threads: int) -> bool:
    """Create the shared pool once (``threads`` or one per core); False where unavailable."""
    global _threads
    with _lock:
        if _threads is None:
            size = threads or (os.cpu_count() or 1)
            try:
                ort.set_global_thread_pool_sizes(size, 1)
                _threads = size
            except Exception as exc:  # a build without global thread pools
                logger.warning("aioov: onnxruntime's shared thread pool is unavailable (%s)", exc)
                _threads = 0
        return _threads > 0


def shared_pool_active() -> bool:
    return bool(_threads)


def apply(options: Any, threads: int = 0) -> None:
    """Thread settings for a new session: the shared pool once it exists, else ``threads``."""
    if shared_pool_active():
        options.use_per_session_threads = False
    elif threads:
        options.intra_op_num_threads = threads


#: The first onnxruntime whose ``InferenceSession`` releases the GIL while it builds: before
#: it, every other Python thread (the event loop's too) stalls for the length of each build.
RELEASES_GIL_FROM = (1, 31)
_warned = False


def builds_hold_the_gil(version: str | None = None) -> bool:
    parts = (version or ort.__version__).split(".")[:2]
    try:
        return (int(parts[0]), int(parts[1])) < RELEASES_GIL_FROM
    except (ValueError, IndexError):
        return False  # a development build: assume current behaviour


def warn_if_session_builds_hold_the_gil() -> None:
    """Say once per process when compiles will stall the event loop: worker threads
    cannot help while onnxruntime holds the GIL for a whole session build."""
    global _warned
    if not _warned and builds_hold_the_gil():
        _warned = True
        logger.warning(
            "aioov: onnxruntime %s holds the GIL while it builds a session, so the event loop "
            "stalls for the length of each compile; onnxruntime >= %d.%d releases it",
            ort.__version__, *RELEASES_GIL_FROM,
        )
