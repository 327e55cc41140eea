"""``Port``: a model's input or output as aioov describes it (name, type, shape), and the
checks an inference's inputs get against it. No event loop here: the builder process uses it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ._errors import InferenceError

__all__ = ("Port",)

_ORT_TYPES: dict[str, np.dtype[Any]] = {
    f"tensor({name})": np.dtype(dtype)
    for name, dtype in {
        "float": np.float32, "double": np.float64, "float16": np.float16,
        "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
        "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
        "bool": np.bool_, "string": np.object_,
    }.items()
}


@dataclass(frozen=True)
class Port:
    """A model input or output: name, element type and shape (``None``/str = dynamic dim)."""

    name: str
    element_type: str
    dtype: np.dtype[Any] | None
    shape: tuple[int | str | None, ...]

    @classmethod
    def from_node_arg(cls, arg: Any) -> Port:
        shape = tuple(arg.shape) if isinstance(arg.shape, (list, tuple)) else ()
        return cls(arg.name, arg.type, _ORT_TYPES.get(arg.type), shape)

    def check(self, value: Any) -> np.ndarray:
        """Return ``value`` as an array this port accepts, or raise InferenceError."""
        if isinstance(value, np.ndarray):
            if self.dtype is not None and value.dtype != self.dtype:
                raise InferenceError(
                    f"input {self.name!r} expects {self.element_type} ({self.dtype}), "
                    f"got an array of {value.dtype}"
                )
            array = value
        else:
            array = self._convert(value)
        if self.shape:
            if array.ndim != len(self.shape):
                raise InferenceError(
                    f"input {self.name!r} expects rank {len(self.shape)} {list(self.shape)}, "
                    f"got shape {list(array.shape)}"
                )
            for axis, (want, got) in enumerate(zip(self.shape, array.shape)):
                if isinstance(want, int) and want >= 0 and want != got:
                    raise InferenceError(
                        f"input {self.name!r} dimension {axis} must be {want}, got {got} "
                        f"(shape {list(array.shape)}, expected {list(self.shape)})"
                    )
        return array

    def _convert(self, value: Any) -> np.ndarray:
        """A Python number, list or other array-like as this port's dtype, where no value changes
        on the way: ints into an int or float input (within the int type's range), floats into a
        float input, bools into a bool input. ``16000.9`` for an int32 input is refused, not
        truncated; ``300`` for a uint8 input is refused, not wrapped."""
        dtype = self.dtype
        try:  # as its own type first (strings and unknown types: as before, no check to make)
            array = np.asarray(value, dtype=dtype if dtype is None or dtype.kind == "O" else None)
        except (TypeError, ValueError, OverflowError) as exc:
            raise InferenceError(f"input {self.name!r}: cannot convert to {dtype}: {exc}") from None
        if dtype is None or array.dtype == dtype:
            return array
        if array.size == 0:
            return array.astype(dtype)
        have, want = array.dtype.kind, dtype.kind
        if want in "iu" and have in "biu":
            info = np.iinfo(dtype)
            if have == "b" or info.min <= array.min() and array.max() <= info.max:
                return array.astype(dtype)
            raise InferenceError(
                f"input {self.name!r} expects {self.element_type}: values from {array.min()} to {array.max()} "
                f"do not fit in {dtype}"
            )
        if (want == "f" and have in "biuf") or (want == "b" and have == "b"):
            return array.astype(dtype)
        raise InferenceError(
            f"input {self.name!r} expects {self.element_type} ({dtype}), got {_describe(value, array)}: "
            f"cannot convert {array.dtype} to {dtype} without a cast that could change the values (give {dtype} values)"
        )

def _describe(value: Any, array: np.ndarray) -> str:
    """What was given, for an error message: ``16000.9`` or ``a list of float64``."""
    if array.ndim == 0:
        return repr(value)
    return f"{'a list' if isinstance(value, (list, tuple)) else type(value).__name__} of {array.dtype}"
