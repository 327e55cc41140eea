"""The exception hierarchy. Every error aioov raises is an ``AioovError``::

    AioovError
    ├── ModelReadError          the model file cannot be read as an ONNX model
    │   └── InvalidModelError   it parses, but ONNX Runtime rejects the graph
    ├── CompileError            ONNX Runtime failed to build a session
    ├── DeviceNotFoundError     unknown device, or one whose provider does not load
    ├── PropertyError           unknown property, or a value of the wrong type/range
    ├── InferenceError          the inputs do not match the model, or ONNX Runtime failed while running it
    └── CacheError              a cache operation asked for explicitly failed (CLI, import_model)
        └── LockTimeout         a cache lock was not acquired in time

Cache failures during ``compile_model`` are never raised: the compile goes on
uncached and a warning is logged (see docs/cache.md). ``CacheError`` is for the
operations whose whole purpose is the cache.

Internal signals, raised and caught inside aioov and never seen by a caller
(``tests/test_architecture.py`` checks where each is caught)::

    InternalSignal
    ├── Cancelled     nobody wants a compile's result any more (lock waits, loads stop)
    ├── LockBusy      another process compiles this key; a bulk load defers it
    ├── EntryError    an entry on disk is unusable (quarantined, then recompiled)
    ├── BlobError     a model cannot be cached in its device's format (compiled, not cached)
    └── RemoteError   the remote tier failed (the local cache is used alone)
"""

from __future__ import annotations

from typing import NoReturn

import onnxruntime.capi.onnxruntime_pybind11_state as _ort_state

__all__ = (
    "AioovError",
    "CacheError",
    "CompileError",
    "DeviceNotFoundError",
    "InferenceError",
    "InvalidModelError",
    "LockTimeout",
    "ModelReadError",
    "PropertyError",
)


class AioovError(Exception):
    """Base class of every error raised by aioov."""


class ModelReadError(AioovError):
    """The model cannot be read: missing file, not ONNX, truncated, unsafe external data."""


class InvalidModelError(ModelReadError):
    """The file is ONNX, but ONNX Runtime rejects the graph (dangling edges, bad types...)."""


class CompileError(AioovError):
    """ONNX Runtime failed to create a session for a readable model."""


class DeviceNotFoundError(AioovError):
    """The device name is unknown, or its execution provider does not load here."""


class PropertyError(AioovError):
    """A property name is unknown, read-only, or its value has the wrong type or range."""


class InferenceError(AioovError):
    """The inputs do not match the model (names, shapes, element types, values that would need
    a lossy cast), or ONNX Runtime failed while running it; also asking for an output before
    any inference ran."""


class CacheError(AioovError):
    """An explicit cache operation failed (import of a bad blob, verify, prune)."""


class LockTimeout(CacheError):
    """Waiting for another process's cache lock took longer than ``CACHE_LOCK_TIMEOUT``."""


class InternalSignal(Exception):
    """Base of the exceptions that stay inside aioov: each is caught where it is handled."""


class Cancelled(InternalSignal):
    """The wait was abandoned because nobody wants the result any more."""


class LockBusy(InternalSignal):
    """Another process holds this key's lock; raised instead of waiting when asked to defer."""


class EntryError(InternalSignal):
    """An entry on disk is unusable; the message says why."""


class BlobError(InternalSignal):
    """This model cannot be cached in its device's format (the blob would not reproduce the
    source model, or the entry could not hold it); it is compiled, not cached."""


class RemoteError(InternalSignal):
    """The remote store or lock service failed."""


# ONNX Runtime's error classes, mapped at the boundary to ours (see map_ort_error).
_MODEL_ERRORS: tuple[type[BaseException], ...] = (
    _ort_state.NoSuchFile,
    _ort_state.InvalidProtobuf,
    _ort_state.NoModel,
)
_GRAPH_ERRORS: tuple[type[BaseException], ...] = (_ort_state.InvalidGraph,)
# ORT reports many graph problems as INVALID_ARGUMENT or FAIL; these phrases mark them.
_GRAPH_MARKERS = ("Invalid model", "ShapeInferenceError", "Type Error", "TypeInferenceError")
ORT_ERRORS: tuple[type[BaseException], ...] = tuple(
    getattr(_ort_state, name)
    for name in (
        "DeviceReset", "EPFail", "EngineError", "Fail", "InvalidArgument", "InvalidGraph",
        "InvalidProtobuf", "ModelLoadCanceled", "ModelLoaded", "ModelRequiresCompilation",
        "NoModel", "NoSuchFile", "NotFound", "NotImplemented", "RuntimeException",
    )
    if hasattr(_ort_state, name)
)


def raise_compile_error(exc: BaseException, what: str) -> NoReturn:
    """Re-raise an ONNX Runtime session-creation error as the most specific aioov error."""
    if isinstance(exc, _MODEL_ERRORS):
        raise ModelReadError(f"cannot read {what}: {exc}") from exc
    if isinstance(exc, _GRAPH_ERRORS) or any(marker in str(exc) for marker in _GRAPH_MARKERS):
        raise InvalidModelError(f"ONNX Runtime rejected the graph of {what}: {exc}") from exc
    raise CompileError(f"compiling {what} failed: {exc}") from exc


def raise_infer_error(exc: BaseException) -> NoReturn:
    """Re-raise an ONNX Runtime ``run`` error as an ``InferenceError``: whichever class ONNX
    Runtime picked (INVALID_ARGUMENT for a bad index, FAIL for a bad reshape...), the run of
    these inputs failed."""
    raise InferenceError(f"inference failed: {exc}") from exc


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type's name if it has none), cut to ``limit``."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]
