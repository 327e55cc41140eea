"""The session options every session of a compile gets, and a quiet ``run`` for made-up
inputs: shared by the serving process and the builder process, which checks a blob exactly
as a hit will load it. Only onnxruntime here: no event loop, no cache."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from typing import Any

import onnxruntime as ort

__all__ = (
    "MODELLED_ATTRIBUTES", "OPT_LEVELS", "RUN_ATTRIBUTES", "SESSION_DEFAULTS", "configure_run", "load_custom_ops",
    "quiet_run", "run_options", "session_attributes", "session_options",
)

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
#: cache key (they change no graph). The ``spinning`` and ``poolstart`` benchmarks measure both:
#:
#: - Idle intra-op threads stop spinning when a Run ends: with onnxruntime's default, each
#:   session's idle threads spin against the other sessions' runs in the same process.
#: - An idle thread spins at most 2 ms before it sleeps (onnxruntime's default is 2^20 spins,
#:   far longer). Every new session's pool threads spin that long as they start, on CPU that
#:   workers starting together need. Gaps inside a run are far shorter: inference is as fast.
SESSION_DEFAULTS = {"session.force_spinning_stop": "1", "session.intra_op.spin_duration_us": "2000"}


#: ``SessionOptions`` attributes that aioov sets from properties of its own (or, for the
#: optimized model's path, for its cache): ``ORT_SESSION_OPTIONS`` may not name them
MODELLED_ATTRIBUTES = {
    "graph_optimization_level": "ORT_GRAPH_OPTIMIZATION_LEVEL",
    "intra_op_num_threads": "INFERENCE_NUM_THREADS",
    "use_per_session_threads": "ORT_SHARED_THREAD_POOL",
    "optimized_model_filepath": "CACHE_DIR (the cache writes optimized models itself)",
}


#: custom-op libraries, each registered once on a ``SessionOptions`` kept for the process's
#: life: onnxruntime unloads a library with the last ``SessionOptions`` that registered it, and
#: onnxruntime-extensions loaded again after that crashed the process (SIGSEGV, measured)
_LIBRARIES: dict[str, ort.SessionOptions] = {}
_libraries_lock = threading.Lock()


def _renew_lock() -> None:
    """In a forked child: a lock another thread of the parent held would stay held for ever."""
    global _libraries_lock
    _libraries_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_lock)


def load_custom_ops(path: str) -> None:
    """Load the custom-op library ``path`` for the rest of the process (at most once); raises
    onnxruntime's error when it does not load."""
    with _libraries_lock:
        if path not in _LIBRARIES:
            options = ort.SessionOptions()
            options.register_custom_ops_library(path)
            _LIBRARIES[path] = options


@cache
def session_attributes() -> frozenset[str]:
    """The settable attributes of this onnxruntime's ``SessionOptions``."""
    return frozenset(name for name, attr in vars(ort.SessionOptions).items()
                     if isinstance(attr, property) and attr.fset is not None and not name.startswith("_"))


def session_options(
    level: str,
    session_config: Mapping[str, str],
    *,
    custom_ops: Sequence[str] = (),
    free_dimensions: Mapping[str, int] | None = None,
    attributes: Mapping[str, bool | int | str] | None = None,
) -> ort.SessionOptions:
    """What every session of a compile gets, threads aside: the builder process makes its
    sessions with this too, so that it checks a blob exactly as a hit will load it.

    ``custom_ops`` (libraries to register) and ``free_dimensions`` (dimensions fixed by name)
    shape the graph: the builder gets them too. ``attributes`` (``ORT_SESSION_OPTIONS``:
    profiling, execution mode, logging...) only change how sessions run: the builder does
    without them (it would write profiles of its own checks)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    for name, value in {**SESSION_DEFAULTS, **session_config}.items():
        options.add_session_config_entry(name, value)
    for library in custom_ops:
        load_custom_ops(library)  # never unloaded: this session's options may go before it
        options.register_custom_ops_library(library)
    for dimension, size in (free_dimensions or {}).items():
        options.add_free_dimension_override_by_name(dimension, size)
    for attribute, setting in (attributes or {}).items():
        enum = getattr(type(getattr(options, attribute)), "__members__", None)  # kept by name: ORT_PARALLEL
        setattr(options, attribute, enum[setting] if enum is not None else setting)
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


#: ``RunOptions`` attributes a mapping given as ``infer(run_options=...)`` may set
RUN_ATTRIBUTES = ("log_severity_level", "log_verbosity_level", "logid", "only_execute_path_to_fetches")


def configure_run(options: ort.RunOptions, settings: Mapping[str, Any]) -> None:
    """Apply ``settings``: ``RunOptions`` attributes by name, and run config entries by their
    dotted keys (``add_run_config_entry``). ValueError or TypeError for what does not fit;
    ``terminate`` is aioov's (a cancelled ``infer`` sets it)."""
    if not isinstance(settings, Mapping):
        raise TypeError(f"expected an onnxruntime.RunOptions or a mapping, got {type(settings).__name__}")
    for name, value in settings.items():
        if not isinstance(name, str):
            raise TypeError(f"a run option's name must be a string, got {name!r}")
        if "." in name:
            options.add_run_config_entry(name, str(value))
        elif name in RUN_ATTRIBUTES:
            expected = type(getattr(options, name))
            if type(value) is not expected:  # noqa: E721 - pybind11 refuses a bool for an int, and the reverse
                raise TypeError(f"{name} must be a {expected.__name__}, got {value!r}")
            setattr(options, name, value)
        else:
            raise ValueError(f"RunOptions has no setting {name!r}; it has {', '.join(RUN_ATTRIBUTES)} and run "
                             "config entries by their dotted keys")


def quiet_run(session: ort.InferenceSession) -> Callable[[dict[str, Any]], list[Any]]:
    """``session.run`` for made-up inputs: a size the model rejects is expected (the next is
    tried), not an error for onnxruntime to print."""
    options = run_options()
    return lambda feed: session.run(None, feed, options)
