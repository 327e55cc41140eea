"""Property names as constants, for editors and type checkers: a typo is an attribute error
before it is a ``PropertyError`` at run time::

    from aioov import props

    core = aioov.Core(properties={props.CACHE_DIR: "~/.cache/aioov", props.CACHE_VERIFY: "SIZE"})
    compiled = await core.compile_model(path, "CPU", {props.NUM_STREAMS: 2})
    compiled.get_property(props.LOADED_FROM_CACHE)

Each constant is its own name (``props.CACHE_DIR == "CACHE_DIR"``), so strings keep working
alongside; docs/properties.md says what each property does. ``tests/test_properties.py``
checks that every property aioov knows has its constant here, and nothing else.
"""

from __future__ import annotations

from typing import Final

__all__ = (
    "AVAILABLE_DEVICES",
    "CACHE_ALWAYS",
    "CACHE_DIR",
    "CACHE_EXPORT",
    "CACHE_HIT_MODE",
    "CACHE_HMAC_KEY",
    "CACHE_KEY",
    "CACHE_LOCK_TIMEOUT",
    "CACHE_MAX_SIZE",
    "CACHE_PREPACK",
    "CACHE_REMOTE_LOCK_TTL",
    "CACHE_REMOTE_LOCK_URL",
    "CACHE_REMOTE_URL",
    "CACHE_VERIFY",
    "CHECK_SHAPES",
    "EXECUTION_DEVICES",
    "EXECUTION_PROVIDERS",
    "FULL_DEVICE_NAME",
    "INFERENCE_NUM_THREADS",
    "LOADED_FROM_CACHE",
    "NOT_CACHED_REASON",
    "NUM_STREAMS",
    "OPTIMAL_NUMBER_OF_INFER_REQUESTS",
    "OPTIMIZATION_CAPABILITIES",
    "ORT_GRAPH_OPTIMIZATION_LEVEL",
    "ORT_PROVIDER_OPTIONS",
    "ORT_SESSION_CONFIG",
    "ORT_SHARED_THREAD_POOL",
    "PERFORMANCE_HINT",
    "SESSION",
    "SUPPORTED_PROPERTIES",
    "WARMED_UP",
    "WARMUP",
    "WARMUP_SHAPES",
    "WARMUP_VALUES",
)

# settable: on the Core, per device, or per compile (CACHE_MAX_SIZE: on the Core only)
CACHE_ALWAYS: Final = "CACHE_ALWAYS"
CACHE_DIR: Final = "CACHE_DIR"
CACHE_VERIFY: Final = "CACHE_VERIFY"
CACHE_EXPORT: Final = "CACHE_EXPORT"
CACHE_LOCK_TIMEOUT: Final = "CACHE_LOCK_TIMEOUT"
CACHE_MAX_SIZE: Final = "CACHE_MAX_SIZE"
CACHE_HMAC_KEY: Final = "CACHE_HMAC_KEY"
CACHE_REMOTE_URL: Final = "CACHE_REMOTE_URL"
CACHE_REMOTE_LOCK_URL: Final = "CACHE_REMOTE_LOCK_URL"
CACHE_REMOTE_LOCK_TTL: Final = "CACHE_REMOTE_LOCK_TTL"
CACHE_HIT_MODE: Final = "CACHE_HIT_MODE"
CACHE_PREPACK: Final = "CACHE_PREPACK"
PERFORMANCE_HINT: Final = "PERFORMANCE_HINT"
INFERENCE_NUM_THREADS: Final = "INFERENCE_NUM_THREADS"
NUM_STREAMS: Final = "NUM_STREAMS"
ORT_GRAPH_OPTIMIZATION_LEVEL: Final = "ORT_GRAPH_OPTIMIZATION_LEVEL"
ORT_SHARED_THREAD_POOL: Final = "ORT_SHARED_THREAD_POOL"
ORT_SESSION_CONFIG: Final = "ORT_SESSION_CONFIG"
ORT_PROVIDER_OPTIONS: Final = "ORT_PROVIDER_OPTIONS"
WARMUP: Final = "WARMUP"
WARMUP_SHAPES: Final = "WARMUP_SHAPES"
WARMUP_VALUES: Final = "WARMUP_VALUES"
CHECK_SHAPES: Final = "CHECK_SHAPES"

# read-only: core.get_property / compiled.get_property
WARMED_UP: Final = "WARMED_UP"
SESSION: Final = "SESSION"
OPTIMIZATION_CAPABILITIES: Final = "OPTIMIZATION_CAPABILITIES"
SUPPORTED_PROPERTIES: Final = "SUPPORTED_PROPERTIES"
FULL_DEVICE_NAME: Final = "FULL_DEVICE_NAME"
AVAILABLE_DEVICES: Final = "AVAILABLE_DEVICES"
LOADED_FROM_CACHE: Final = "LOADED_FROM_CACHE"
EXECUTION_DEVICES: Final = "EXECUTION_DEVICES"
EXECUTION_PROVIDERS: Final = "EXECUTION_PROVIDERS"
OPTIMAL_NUMBER_OF_INFER_REQUESTS: Final = "OPTIMAL_NUMBER_OF_INFER_REQUESTS"
CACHE_KEY: Final = "CACHE_KEY"
NOT_CACHED_REASON: Final = "NOT_CACHED_REASON"
