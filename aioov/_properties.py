"""Property names, validation and normalization.

aioov speaks OpenVINO's property names where they mean the same thing
(``CACHE_DIR``, ``PERFORMANCE_HINT``, ``INFERENCE_NUM_THREADS``...) and adds
``ORT_*`` names that pass ONNX Runtime session and provider options through.
Each property says whether it changes the compiled result: only those enter
the cache key, so that e.g. a different thread count still hits the cache.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ._errors import PropertyError

__all__ = (
    "CacheHitMode", "CacheVerify", "CompileConfig", "ExportMode", "PerformanceHint", "PROPERTIES", "normalize",
    "parse_size",
)


class PerformanceHint(str, enum.Enum):
    """OpenVINO's ``PERFORMANCE_HINT``: one fast request, or many concurrent ones."""

    LATENCY = "LATENCY"
    THROUGHPUT = "THROUGHPUT"


class CacheVerify(str, enum.Enum):
    """How much of a cache entry to check before loading it (``CACHE_VERIFY``)."""

    FULL = "FULL"  # sizes and xxh3-128 checksums of every blob file
    SIZE = "SIZE"  # manifest and file sizes only
    OFF = "OFF"  # trust the manifest


class CacheHitMode(str, enum.Enum):
    """How a cache hit loads (``CACHE_HIT_MODE``)."""

    INSTANT = "INSTANT"  # a session without prepacked weights at once, the full-speed one swapped in later
    FULL = "FULL"  # the full-speed session before compile_model returns


class PrepackMode(str, enum.Enum):
    """``CACHE_PREPACK``: whether entries hold weights prepacked for the matrix kernels."""

    AUTO = "AUTO"  # where the builder measured that a hit loads much sooner with them
    ALWAYS = "ALWAYS"  # wherever such a blob passes its check
    NEVER = "NEVER"


def _prepack(value: object) -> PrepackMode:
    """AUTO, ALWAYS or NEVER; a boolean means ALWAYS or NEVER."""
    try:
        return PrepackMode(str(getattr(value, "value", value)).strip().upper())
    except ValueError:
        pass
    try:
        return PrepackMode.ALWAYS if _bool(value) else PrepackMode.NEVER
    except ValueError:
        raise ValueError(f"expected AUTO, ALWAYS or NEVER (or a boolean), got {value!r}") from None


class ExportMode(str, enum.Enum):
    """When a new cache entry is written (``CACHE_EXPORT``)."""

    ASYNC = "ASYNC"  # in the background: compile_model returns as soon as the session exists
    SYNC = "SYNC"  # before compile_model returns


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_SIZE_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
GRAPH_OPTIMIZATION_LEVELS = ("DISABLE_ALL", "BASIC", "EXTENDED", "LAYOUT", "ALL")


def parse_size(value: object) -> int:
    """``10G``, ``512M``, ``1.5GB``, ``1048576`` → bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", str(value), re.IGNORECASE)
    if not match:
        raise ValueError(f"expected a size like 512M or 10G, got {value!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"expected a boolean (YES/NO), got {value!r}")


def _int(minimum: int, maximum: int = 1 << 16) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"expected an integer, got {value!r}")
        number = int(value)
        if not minimum <= number <= maximum:
            raise ValueError(f"must be between {minimum} and {maximum}, got {number}")
        return number

    return parse


#: the longest wait or lease a property may ask for (a year): longer is a mistake, and
#: ``inf`` would turn a lease into no lock at all
MAX_SECONDS = 365 * 24 * 3600.0


def _seconds(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError("expected seconds")
    try:
        number = float(value)  # type: ignore[arg-type,unused-ignore]
    except OverflowError:
        number = math.inf
    if math.isnan(number) or not 0 <= number <= MAX_SECONDS:
        raise ValueError(f"must be a number of seconds from 0 to {MAX_SECONDS:.0f} (a year), got {str(value)[:40]}")
    return number


def _enum(cls: type[enum.Enum]) -> Callable[[object], Any]:
    def parse(value: object) -> Any:
        try:
            return cls(str(getattr(value, "value", value)).upper())
        except ValueError:
            choices = ", ".join(str(m.value) for m in cls)
            raise ValueError(f"expected one of {choices}, got {value!r}") from None

    return parse


def _cache_dir(value: object) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"expected a path, got {value!r}")
    return os.path.abspath(os.path.expanduser(os.fspath(value)))


def _secret(value: object) -> bytes | tuple[bytes, ...] | None:
    """A secret (str or bytes), or several: a list, or its JSON (``'["new", "old"]'``), while
    the key is rotated: entries are signed with the first and accepted under any."""
    if value is None or value == "" or value == b"":
        return None
    if isinstance(value, str) and value.lstrip().startswith("["):
        value = _from_json(value, "a secret or a JSON list of secrets")
    if isinstance(value, (list, tuple)):
        secrets = tuple(s for s in (_secret(item) for item in value) if s is not None)
        if not secrets or any(isinstance(s, tuple) for s in secrets):
            raise ValueError("expected a list of str or bytes secrets")
        return secrets if len(secrets) > 1 else secrets[0]  # type: ignore[return-value]
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise ValueError("expected a str or bytes secret, or a list of them")


def _remote_url(*schemes: str) -> Callable[[object], str | None]:
    def parse(value: object) -> str | None:
        if value is None or value == "":
            return None
        text = str(value)
        if text.split("://", 1)[0] not in schemes or "://" not in text:
            raise ValueError(f"expected a {'/'.join(s + '://' for s in schemes)} URL, got {value!r}")
        return text

    return parse


def _from_json(value: object, expected: str) -> object:
    """``value``, or what it says when it is a JSON string (properties set from a CLI or env)."""
    if not isinstance(value, str):
        return value
    import json

    try:
        return json.loads(value)
    except ValueError:
        raise ValueError(f"expected {expected}, got {value!r}") from None


def _shapes(value: object) -> dict[str, tuple[int, ...]]:
    """``{"input_ids": [1, 128]}`` (or its JSON) → ``{"input_ids": (1, 128)}``."""
    value = _from_json(value, "a mapping of input names to shapes")
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a mapping of input names to shapes, got {type(value).__name__}")
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in sorted(value.items()):
        if not isinstance(shape, (list, tuple)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 1 << 20 for d in shape
        ):
            raise ValueError(f"the shape of {name!r} must be a list of sizes, got {shape!r}")
        out[str(name)] = tuple(shape)
    return out


def _shape_list(value: object) -> tuple[dict[str, tuple[int, ...]], ...]:
    """``[{"x": [1, 3, 48, 320]}, ...]`` (or its JSON): shapes, by input name, to check at."""
    value = _from_json(value, "a list of mappings of input names to shapes")
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, (list, tuple)) or len(value) > MAX_CHECK_SHAPES:
        raise ValueError(f"expected a list of at most {MAX_CHECK_SHAPES} mappings of input names to shapes")
    return tuple(_shapes(item) for item in value)


def _values(value: object) -> dict[str, Any]:
    """``{"sr": 16000}``: an input's value, a number (filling the input) or nested lists."""
    value = _from_json(value, "a mapping of input names to values")
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a mapping of input names to values, got {type(value).__name__}")
    import numpy as np

    out: dict[str, Any] = {}
    for name, item in sorted(value.items()):
        try:
            array = np.asarray(item)
        except ValueError as exc:
            raise ValueError(f"the value of {name!r} is not a number or an array: {exc}") from None
        if array.dtype.kind not in "biuf" or array.size > 1 << 20:
            raise ValueError(f"the value of {name!r} must be a number or an array of at most 2**20 numbers")
        out[str(name)] = item if array.ndim == 0 else array.tolist()
    return out


#: CHECK_SHAPES holds at most this many shapes (each costs a run of the source and the blob)
MAX_CHECK_SHAPES = 16


def _opt_level(value: object) -> str:
    text = str(value).upper().removeprefix("ORT_").removeprefix("ENABLE_")
    if text not in GRAPH_OPTIMIZATION_LEVELS:
        raise ValueError(f"expected one of {', '.join(GRAPH_OPTIMIZATION_LEVELS)}, got {value!r}")
    return text


def _str_map(value: object) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a mapping of strings, got {type(value).__name__}")
    return {str(k): str(v) for k, v in sorted(value.items())}


def _session_config(value: object) -> dict[str, str]:
    """Entries onnxruntime accepts (it limits the lengths of keys and values; ask it)."""
    import onnxruntime as ort

    entries = _str_map(value)
    options = ort.SessionOptions()
    for key, item in entries.items():
        try:
            options.add_session_config_entry(key, item)
        except Exception as exc:  # onnxruntime says RuntimeError, or its own Fail
            raise ValueError(f"onnxruntime refuses the entry {key[:40]!r}: {exc}") from None
    return entries


def _session_options(value: object) -> dict[str, bool | int | str]:
    """``{"execution_mode": "PARALLEL", "enable_profiling": True}`` (or its JSON): attributes of
    ``onnxruntime.SessionOptions`` that aioov does not model, each checked by setting it on a
    ``SessionOptions`` (enums are kept by name, ``ORT_PARALLEL``)."""
    import onnxruntime as ort

    from ._ortoptions import MODELLED_ATTRIBUTES, session_attributes

    value = _from_json(value, "a mapping of SessionOptions attribute names to values")
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a mapping of SessionOptions attribute names to values, got {type(value).__name__}")
    known = session_attributes()
    options = ort.SessionOptions()
    out: dict[str, bool | int | str] = {}
    for name, item in sorted(value.items()):
        if name in MODELLED_ATTRIBUTES:
            raise ValueError(f"{name} is set by aioov's {MODELLED_ATTRIBUTES[name]}")
        if name not in known:
            raise ValueError(f"SessionOptions has no attribute {name!r}; it has {', '.join(sorted(known))}")
        default = getattr(options, name)
        members = getattr(type(default), "__members__", None)
        parsed: bool | int | str
        if members is not None:  # an onnxruntime enum: ExecutionMode, ExecutionOrder
            text = str(getattr(item, "name", item)).upper()
            match = [m for m in (text, f"ORT_{text}") if m in members]
            if not match:
                raise ValueError(f"{name} must be one of {', '.join(members)}, got {item!r}")
            parsed = match[0]
            item = members[parsed]
        elif isinstance(default, bool):
            try:
                parsed = item = _bool(item)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
        elif isinstance(default, int):
            if isinstance(item, bool) or not re.fullmatch(r"\s*-?\d+\s*", str(item)):
                raise ValueError(f"{name} must be an integer, got {item!r}")
            parsed = item = int(item)
        else:
            parsed = item = str(item)
        try:
            setattr(options, name, item)
        except Exception as exc:  # onnxruntime says TypeError, or its own Fail
            raise ValueError(f"onnxruntime refuses {name}={item!r}: {exc}") from None
        out[str(name)] = parsed
    return out


def _free_dimensions(value: object) -> dict[str, int]:
    """``{"batch": 1}`` (or its JSON): free dimensions fixed by name, as
    ``SessionOptions.add_free_dimension_override_by_name`` does."""
    value = _from_json(value, "a mapping of dimension names to sizes")
    if not isinstance(value, Mapping):
        raise ValueError(f"expected a mapping of dimension names to sizes, got {type(value).__name__}")
    size = _int(1, 1 << 31)
    out: dict[str, int] = {}
    for name, item in sorted(value.items()):
        if not isinstance(name, str) or not name:
            raise ValueError(f"a dimension name must be a non-empty string, got {name!r}")
        try:
            out[name] = size(item)
        except ValueError as exc:
            raise ValueError(f"the size of {name!r} {exc}") from None
    return out


def _libraries(value: object) -> tuple[str, ...]:
    """Custom-op shared libraries (a path, or a list of them, or its JSON), each loaded into
    onnxruntime here (for the process's life), so that one that does not load is a
    PropertyError now."""
    from ._ortoptions import load_custom_ops

    if isinstance(value, str) and value.lstrip().startswith("["):
        value = _from_json(value, "a path or a JSON list of paths")
    if isinstance(value, (str, os.PathLike)):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, os.PathLike)) for v in value):
        raise ValueError("expected a path to a custom-op library, or a list of them")
    paths = tuple(os.path.abspath(os.path.expanduser(os.fspath(v))) for v in value)
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"no custom-op library at {path}")
        try:
            load_custom_ops(path)
        except Exception as exc:  # onnxruntime's Fail
            raise ValueError(f"onnxruntime cannot load the custom-op library {path}: {exc}") from None
    return tuple(dict.fromkeys(paths))


_LIBRARY_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def library_digests(paths: tuple[str, ...]) -> list[str] | None:
    """How custom-op libraries enter the cache key: by content (blake3), so that another build
    of a library makes another key and a copy of it at another path the same; None for none."""
    if not paths:
        return None
    import blake3

    digests = []
    for path in paths:
        try:
            st = os.stat(path)
            stamp = (path, st.st_size, st.st_mtime_ns, st.st_ino)
            if stamp not in _LIBRARY_DIGESTS:
                with open(path, "rb") as f:
                    _LIBRARY_DIGESTS[stamp] = blake3.blake3(f.read()).hexdigest()
            digests.append(_LIBRARY_DIGESTS[stamp])
        except OSError:  # gone since it was set: the compile fails to register it, uncached
            digests.append(f"unreadable:{path}")
    return digests


def _providers(value: object) -> tuple[tuple[str, dict[str, str]], ...]:
    """``["DmlExecutionProvider", ["CPUExecutionProvider", {...}]]`` (or its JSON): execution
    providers by name, each with its options, all of them in this onnxruntime build."""
    import onnxruntime as ort

    if isinstance(value, str) and value.lstrip().startswith("["):
        value = _from_json(value, "a JSON list of execution providers")
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"expected a list of execution provider names or (name, options) pairs, got {value!r}")
    available = ort.get_available_providers()
    out: list[tuple[str, dict[str, str]]] = []
    for item in value:
        name, options = (item, {}) if not isinstance(item, (list, tuple)) or len(item) != 2 else item
        if not isinstance(name, str) or not isinstance(options, Mapping):
            raise ValueError(f"expected an execution provider name or a (name, options) pair, got {item!r}")
        if name not in available:
            raise ValueError(f"execution provider {name!r} is not in this onnxruntime build; "
                             f"available: {', '.join(available)}")
        if any(name == seen for seen, _ in out):
            raise ValueError(f"execution provider {name!r} is listed twice")
        out.append((name, _str_map(options)))
    return tuple(out)


@dataclass(frozen=True)
class Property:
    name: str
    parse: Callable[[object], Any]
    scope: str  # "core": Core-wide only; "compile": Core default or per compile; "ro": read-only
    in_key: bool = False
    doc: str = ""
    #: how an ``in_key`` value enters the key (default: as shown); None from it: left out
    key: Callable[[Any], Any] | None = None


PROPERTIES: dict[str, Property] = {
    p.name: p
    for p in (
        Property("CACHE_DIR", _cache_dir, "compile", doc="enables the model cache in this directory"),
        Property("CACHE_VERIFY", _enum(CacheVerify), "compile", doc="FULL, SIZE or OFF"),
        Property("CACHE_EXPORT", _enum(ExportMode), "compile", doc="ASYNC or SYNC"),
        Property("CACHE_LOCK_TIMEOUT", _seconds, "compile", doc="seconds to wait for another process"),
        Property("CACHE_MAX_SIZE", parse_size, "core", doc="prune LRU entries above this size"),
        Property("CACHE_HMAC_KEY", _secret, "compile",
                 doc="secret that authenticates entries; unauthenticated ones are recompiled"),
        Property("CACHE_REMOTE_URL", _remote_url("s3", "file"), "compile",
                 doc="s3://bucket/prefix or file:///shared/dir: a cache tier shared by many hosts"),
        Property("CACHE_REMOTE_LOCK_URL", _remote_url("redis", "rediss", "unix"), "compile",
                 doc="redis://host:port/db: a lock so that N hosts compile a model once"),
        Property("CACHE_REMOTE_LOCK_TTL", _seconds, "compile", doc="lease of the hosts' lock, in seconds"),
        Property("CACHE_HIT_MODE", _enum(CacheHitMode), "compile",
                 doc="INSTANT: a hit returns at once, full speed follows; FULL: a hit returns at full speed"),
        Property("CACHE_ALWAYS", _bool, "compile",
                 doc="cache every model, also one whose hit would not load sooner than compiling it"),
        Property("CACHE_PREPACK", _prepack, "compile", in_key=True,
                 doc="AUTO: store prepacked weights where a hit loads much sooner with them (~1.8x disk); "
                     "ALWAYS; NEVER"),
        Property("PERFORMANCE_HINT", _enum(PerformanceHint), "compile"),
        Property("INFERENCE_NUM_THREADS", _int(0, 1024), "compile", doc="intra-op threads, 0 = ORT default"),
        Property("NUM_STREAMS", _int(1), "compile", doc="concurrent infer requests allowed"),
        Property("ORT_GRAPH_OPTIMIZATION_LEVEL", _opt_level, "compile", in_key=True),
        Property("ORT_SHARED_THREAD_POOL", _bool, "compile",
                 doc="sessions share onnxruntime's process-wide thread pool (faster bulk loads)"),
        Property("ORT_SESSION_CONFIG", _session_config, "compile", in_key=True,
                 doc="entries for SessionOptions.add_session_config_entry"),
        Property("ORT_PROVIDER_OPTIONS", _str_map, "compile", in_key=True,
                 doc="options of the device's execution provider"),
        Property("ORT_PROVIDERS", _providers, "compile",
                 doc="execution providers by name, or (name, options) pairs, instead of the device's"),
        Property("ORT_SESSION_OPTIONS", _session_options, "compile",
                 doc="SessionOptions attributes aioov does not model (execution_mode, enable_profiling...)"),
        Property("ORT_FREE_DIMENSION_OVERRIDES", _free_dimensions, "compile", in_key=True,
                 key=lambda dims: dims or None, doc="free dimensions fixed by name ({'batch': 1})"),
        Property("ORT_CUSTOM_OPS_LIBRARIES", _libraries, "compile", in_key=True, key=library_digests,
                 doc="custom-op shared libraries registered on every session (onnxruntime-extensions...)"),
        Property("WARMUP", _int(0, 1000), "compile",
                 doc="inferences run on made-up inputs before compile_model returns (0 = none)"),
        Property("WARMUP_SHAPES", _shapes, "compile", doc="shapes of the warm-up inputs, by input name"),
        Property("WARMUP_VALUES", _values, "compile",
                 doc="values of inputs that cannot be made up, by input name ({'sr': 16000}): warm-up and checks"),
        Property("CHECK_SHAPES", _shape_list, "compile",
                 doc="more input shapes a cache entry is checked at before it is published"),
        Property("WARMED_UP", str, "ro"),
        Property("SESSION", str, "ro"),
        Property("OPTIMIZATION_CAPABILITIES", str, "ro"),
        Property("SUPPORTED_PROPERTIES", str, "ro"),
        Property("FULL_DEVICE_NAME", str, "ro"),
        Property("AVAILABLE_DEVICES", str, "ro"),
        Property("LOADED_FROM_CACHE", str, "ro"),
        Property("EXECUTION_DEVICES", str, "ro"),
        Property("EXECUTION_PROVIDERS", str, "ro"),
        Property("OPTIMAL_NUMBER_OF_INFER_REQUESTS", str, "ro"),
        Property("CACHE_KEY", str, "ro"),
        Property("NOT_CACHED_REASON", str, "ro"),
    )
}

DEFAULTS: dict[str, Any] = {
    "CACHE_DIR": None,
    "CACHE_VERIFY": CacheVerify.FULL,
    "CACHE_EXPORT": ExportMode.ASYNC,
    "CACHE_LOCK_TIMEOUT": 600.0,
    "CACHE_MAX_SIZE": 0,
    "CACHE_HMAC_KEY": None,
    "CACHE_REMOTE_URL": None,
    "CACHE_REMOTE_LOCK_URL": None,
    "CACHE_REMOTE_LOCK_TTL": 300.0,
    "CACHE_PREPACK": PrepackMode.AUTO,
    "CACHE_ALWAYS": False,
    # FULL by measurement: on few cores an instant session's first inferences wait behind the
    # full-speed load (docs/performance.md#instant-hits-cache_hit_mode)
    "CACHE_HIT_MODE": CacheHitMode.FULL,
    "PERFORMANCE_HINT": PerformanceHint.LATENCY,
    "INFERENCE_NUM_THREADS": 0,
    "NUM_STREAMS": 1,
    "ORT_GRAPH_OPTIMIZATION_LEVEL": "ALL",
    "ORT_SHARED_THREAD_POOL": False,
    "ORT_SESSION_CONFIG": {},
    "ORT_PROVIDER_OPTIONS": {},
    "ORT_PROVIDERS": (),
    "ORT_SESSION_OPTIONS": {},
    "ORT_FREE_DIMENSION_OVERRIDES": {},
    "ORT_CUSTOM_OPS_LIBRARIES": (),
    "WARMUP": 0,
    "WARMUP_SHAPES": {},
    "WARMUP_VALUES": {},
    "CHECK_SHAPES": (),
}


@dataclass(frozen=True)
class CompileConfig:
    """The properties of one compile, parsed and typed: what the compile path reads.

    Field names are the property names in lower case; ``from_props`` builds one from the
    merged ``{NAME: value}`` mapping (Core, device, AUTO, then the call's config)."""

    cache_dir: str | None = DEFAULTS["CACHE_DIR"]
    cache_verify: CacheVerify = DEFAULTS["CACHE_VERIFY"]
    cache_export: ExportMode = DEFAULTS["CACHE_EXPORT"]
    cache_lock_timeout: float = DEFAULTS["CACHE_LOCK_TIMEOUT"]
    cache_hmac_key: bytes | tuple[bytes, ...] | None = DEFAULTS["CACHE_HMAC_KEY"]
    cache_remote_url: str | None = DEFAULTS["CACHE_REMOTE_URL"]
    cache_remote_lock_url: str | None = DEFAULTS["CACHE_REMOTE_LOCK_URL"]
    cache_remote_lock_ttl: float = DEFAULTS["CACHE_REMOTE_LOCK_TTL"]
    cache_prepack: PrepackMode = DEFAULTS["CACHE_PREPACK"]
    cache_always: bool = DEFAULTS["CACHE_ALWAYS"]
    cache_hit_mode: CacheHitMode = DEFAULTS["CACHE_HIT_MODE"]
    performance_hint: PerformanceHint = DEFAULTS["PERFORMANCE_HINT"]
    inference_num_threads: int = DEFAULTS["INFERENCE_NUM_THREADS"]
    num_streams: int = DEFAULTS["NUM_STREAMS"]
    ort_graph_optimization_level: str = DEFAULTS["ORT_GRAPH_OPTIMIZATION_LEVEL"]
    ort_shared_thread_pool: bool = DEFAULTS["ORT_SHARED_THREAD_POOL"]
    ort_session_config: Mapping[str, str] = dataclasses.field(default_factory=dict)
    ort_provider_options: Mapping[str, str] = dataclasses.field(default_factory=dict)
    ort_providers: tuple[tuple[str, Mapping[str, str]], ...] = ()
    ort_session_options: Mapping[str, bool | int | str] = dataclasses.field(default_factory=dict)
    ort_free_dimension_overrides: Mapping[str, int] = dataclasses.field(default_factory=dict)
    ort_custom_ops_libraries: tuple[str, ...] = ()
    warmup: int = DEFAULTS["WARMUP"]
    warmup_shapes: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    warmup_values: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    check_shapes: tuple[Mapping[str, tuple[int, ...]], ...] = ()

    @classmethod
    def from_props(cls, props: Mapping[str, Any]) -> CompileConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{name.lower(): value for name, value in props.items() if name.lower() in names})

    def as_props(self) -> dict[str, Any]:
        """``{NAME: value}``, as ``CompiledModel.get_property`` shows them."""
        return {f.name.upper(): getattr(self, f.name) for f in dataclasses.fields(self)}

    def key_props(self) -> dict[str, Any]:
        """The properties that shape the compiled blob (``in_key``), in readable form. Those
        with a ``key`` of their own enter the key only when set: the keys of compiles that do
        not use them stay what they were before they existed."""
        out = {}
        for name, p in PROPERTIES.items():
            if p.in_key:
                value = public_value(getattr(self, name.lower()))
                value = p.key(value) if p.key is not None else value
                if value is not None:
                    out[name] = value
        return out

    def with_hints(self) -> CompileConfig:
        """``PERFORMANCE_HINT=THROUGHPUT``: many single-threaded requests in parallel."""
        if self.performance_hint is not PerformanceHint.THROUGHPUT:
            return self
        return dataclasses.replace(
            self,
            inference_num_threads=self.inference_num_threads or 1,
            num_streams=(os.cpu_count() or 1) if self.num_streams == 1 else self.num_streams,
        )


def normalize(props: Mapping[str, object], *, allow_core: bool = True) -> dict[str, Any]:
    """Validate user-given properties; return them parsed to canonical values."""
    if not isinstance(props, Mapping):
        raise PropertyError(f"properties must be a mapping, got {type(props).__name__}")
    out: dict[str, Any] = {}
    for name, value in props.items():
        spec = PROPERTIES.get(str(name).upper()) if isinstance(name, str) else None
        if spec is None:
            known = ", ".join(n for n, p in PROPERTIES.items() if p.scope != "ro")
            raise PropertyError(f"unknown property {name!r}; settable properties: {known}")
        if spec.scope == "ro":
            raise PropertyError(f"property {spec.name} is read-only")
        if spec.scope == "core" and not allow_core:
            raise PropertyError(f"property {spec.name} can only be set on the Core")
        try:
            out[spec.name] = spec.parse(value)
        except (TypeError, ValueError, OverflowError) as exc:
            raise PropertyError(f"bad value for {spec.name}: {exc}") from None
    return out


def public_value(value: Any) -> Any:
    """How a property value is shown to users: enums as their names, secrets masked."""
    if isinstance(value, bytes):
        return "***"
    return value.value if isinstance(value, enum.Enum) else value
