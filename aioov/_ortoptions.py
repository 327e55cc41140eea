"""The session options every session of a compile gets, and a quiet ``run`` for made-up
inputs: shared by the serving process and the builder process, which checks a blob exactly
as a hit will load it. Only onnxruntime here: no event loop, no cache."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import onnxruntime as ort

__all__ = ("OPT_LEVELS", "SESSION_DEFAULTS", "quiet_run", "run_options", "session_options")

OPT_LEVELS = {
    "DISABLE_ALL": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "LAYOUT": getattr(
        ort.GraphOptimizationLevel, "ORT_ENABLE_LAYOUT", ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ),
    "ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


#: session config entries aioov sets unless ``ORT_SESSION_CONFIG`` names them; not in the
#: cache key (they change no graph). Measured on 2 cores (docs/performance.md):
#:
#: - Idle intra-op threads stop spinning when a Run ends: two models served in turns by one
#:   process ran 1.2–2× slower with onnxruntime's default (each session's idle threads spun
#:   against the other's run); one session alone ran as fast either way.
#: - An idle thread spins at most 2 ms before it sleeps (onnxruntime's default is 2^20 spins,
#:   ~55 ms here). Every new session's pool threads spin that long as they start, beside the
#:   build: 12 cached models loaded in one process took 1.70 CPU-s instead of 1.01 (the
#:   ``poolstart`` benchmark), which workers starting on the same cores pay for in wall time.
#:   Gaps inside a run are far shorter: inference ran as fast either way.
SESSION_DEFAULTS = {"session.force_spinning_stop": "1", "session.intra_op.spin_duration_us": "2000"}


def session_options(level: str, session_config: Mapping[str, str]) -> ort.SessionOptions:
    """What every session of a compile gets, threads aside: the builder process makes its
    sessions with this too, so that it checks a blob exactly as a hit will load it."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    for name, value in {**SESSION_DEFAULTS, **session_config}.items():
        options.add_session_config_entry(name, value)
    options.graph_optimization_level = OPT_LEVELS[level]
    return options


def run_options() -> ort.RunOptions:
    """The options of every ``run`` aioov makes: onnxruntime logs only fatal errors. A run that
    fails raises, and aioov raises an ``InferenceError`` for it; onnxruntime's own red
    ``[E:onnxruntime ...]`` line on stderr would say it twice. Per run, not
    ``ort.set_default_logger_severity``: the process's own setting stays the user's."""
    options = ort.RunOptions()
    options.log_severity_level = 4
    return options


def quiet_run(session: ort.InferenceSession) -> Callable[[dict[str, Any]], list[Any]]:
    """``session.run`` for made-up inputs: a size the model rejects is expected (the next is
    tried), not an error for onnxruntime to print."""
    options = run_options()
    return lambda feed: session.run(None, feed, options)
