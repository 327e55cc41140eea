"""aioov: asyncio/trio model loading and OpenVINO-style model caching for ONNX Runtime.

    core = aioov.Core(cache_dir="~/.cache/aioov")
    compiled = await core.compile_model("model.onnx", "CPU")
    outputs = await compiled.infer({"input": array})

Code that is not async uses ``aioov.SyncCore``, whose methods block.
"""

import logging as _logging

# _install first: it checks the onnxruntime install before anything imports onnxruntime
from . import _install, props  # noqa: F401
from ._bulk import BulkProgress, CompileResult
from ._cache.stats import CacheStats
from ._cache.store import CacheInfo, CacheStore, EntryInfo
from ._compiled import CompiledModel, InferInputs, InferRequest, InferResults, ModelMetadata, Port
from ._core import Core, ModelSource
from ._errors import (
    AioovError,
    CacheError,
    CompileError,
    DeviceNotFoundError,
    InferenceError,
    InvalidModelError,
    LockTimeout,
    ModelReadError,
    PropertyError,
)
from ._model import Model
from ._properties import CacheHitMode, CacheVerify, ExportMode, PerformanceHint
from ._sync import SyncCompiledModel, SyncCompileResult, SyncCore, SyncInferRequest
from ._version import __version__

__all__ = (
    "AioovError",
    "BulkProgress",
    "CacheError",
    "CacheHitMode",
    "CacheInfo",
    "CacheStats",
    "CacheStore",
    "CacheVerify",
    "CompileError",
    "CompileResult",
    "CompiledModel",
    "Core",
    "DeviceNotFoundError",
    "EntryInfo",
    "ExportMode",
    "InferInputs",
    "InferRequest",
    "InferResults",
    "InferenceError",
    "InvalidModelError",
    "LockTimeout",
    "Model",
    "ModelMetadata",
    "ModelReadError",
    "ModelSource",
    "PerformanceHint",
    "Port",
    "PropertyError",
    "SyncCompileResult",
    "SyncCompiledModel",
    "SyncCore",
    "SyncInferRequest",
    "__version__",
    "props",
)

for _name in __all__:
    _obj = globals()[_name]
    if hasattr(_obj, "__module__") and not isinstance(_obj, str):
        try:
            _obj.__module__ = "aioov"
        except (AttributeError, TypeError):
            pass
del _name, _obj

# A library's logger has a handler that drops records, so that an application that configured no
# logging gets no bare lines from Python's last-resort handler (under uvicorn, or over a progress
# bar); configure logging (``logging.basicConfig()``, a server's log config) to see aioov's.
_logging.getLogger("aioov").addHandler(_logging.NullHandler())
