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
            try:
                array = np.asarray(value, dtype=self.dtype)
            except (TypeError, ValueError) as exc:
                raise InferenceError(f"input {self.name!r}: cannot convert to {self.dtype}: {exc}") from None
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
