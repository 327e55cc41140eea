"""Deterministic inputs for a model, built from its input specs: for warm-up and for checks.

Static dimensions are kept; a dynamic one (a name, ``None`` or ``-1``) takes its size from
``shapes`` (``{"input_ids": [1, 128]}``), else from another input that names the same
dimension, else the batch size for the first axis and ``default_dim`` for the others. Values
are chosen to be valid for what such inputs usually are: floats from a seeded normal
distribution scaled down, integers zero (a valid index, an empty mask, a first token id), and
booleans false; ``values`` gives others (``{"sr": 16000}``: a scalar fills the input, an
array is taken as it is). Tensors of strings, and non-tensor inputs (sequences, maps,
optional), cannot be synthesized: ``Unsynthesizable`` says which input and why.

``check_runs`` gives a cache entry's check its inputs: not one made-up shape but several,
because onnxruntime's kernels (its prepacked ones first) can crash at some shapes and not at
others. Each free dimension is tried small, medium and at the size real inputs of its kind
have (``large_dim``), with a batch above 1, plus the shapes the user named.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from ._errors import first_line

__all__ = (
    "CHECK_BYTES",
    "CHECK_RUN_SECONDS",
    "DEFAULT_DIM",
    "Checks",
    "DIM_LADDER",
    "CheckRun",
    "Unsynthesizable",
    "check_runs",
    "describe",
    "first_run",
    "large_dim",
    "synthesize",
)

#: size of a dynamic dimension nobody gave a size for (not the first axis): small, so a warm-up
#: costs little, and larger than 1, so kernels that special-case 1 are not the ones warmed
DEFAULT_DIM = 8
#: sizes ``first_run`` tries for unnamed dynamic dimensions, in turn: real models constrain
#: them (OCR detectors want multiples of 32 after 5 downsamplings; a VAD's reflect padding wants
#: 512 samples), and a small input that fails costs little
DIM_LADDER = (DEFAULT_DIM, 32, 64, 512)
#: the most bytes the inputs of one made-up shape may take; larger ones are not made up
CHECK_BYTES = 64 << 20
#: seconds one run of the source may take at the check's large shape (judged from the first
#: shape's run and the inputs' sizes): a dimension is halved until it fits
CHECK_RUN_SECONDS = 0.5

R = TypeVar("R")
#: a free dimension's size: a number, or one chosen per input and axis
DimSize = int | Callable[[Any, int], int]


class Unsynthesizable(ValueError):
    """This model's inputs cannot be made up; the message names the input and why."""


def first_run(
    inputs: Sequence[Any], run: Callable[[dict[str, np.ndarray]], R], shapes: Mapping[str, Sequence[int]] | None = None,
    values: Mapping[str, Any] | None = None, max_bytes: int | None = None,
) -> tuple[dict[str, np.ndarray], R]:
    """The first inputs of ``DIM_LADDER``'s sizes that ``run`` accepts, and what it returned;
    raises Unsynthesizable, or what ``run`` raised on the largest."""
    for size in DIM_LADDER[:-1]:
        feed = synthesize(inputs, shapes, default_dim=size, values=values, max_bytes=max_bytes)
        try:
            return feed, run(feed)
        except Exception:
            pass  # maybe too small for this model: try the next size
    feed = synthesize(inputs, shapes, default_dim=DIM_LADDER[-1], values=values, max_bytes=max_bytes)
    return feed, run(feed)


def large_dim(port: Any, axis: int) -> int:
    """The size real inputs give a free dimension of ``port``, guessed from its kind: an
    image's side or a text line's width (a 4-D float input), a second of 16 kHz audio (a 2-D
    float input), a sequence of tokens (integers), anything else."""
    floating = port.dtype is not None and np.issubdtype(port.dtype, np.floating)
    rank = len(port.shape)
    if floating and rank == 4:
        return 320
    if floating and rank == 2:
        return 16000
    if not floating:
        return 512
    return 256


#: one of a check's inputs: a label ("large", "batch 2", a user's shape...), the inputs, and
#: what the reference run returned on them
CheckRun = tuple[str, dict[str, np.ndarray], R]


@dataclass
class Checks:
    """What ``check_runs`` made up and ran: the runs, the shapes left out and why, and the
    first inputs' results run again (outputs that differ between two runs cannot be compared)."""

    runs: list[CheckRun[Any]]
    left_out: list[str]
    again: Any


def check_runs(
    inputs: Sequence[Any], run: Callable[[dict[str, np.ndarray]], R], shapes: Mapping[str, Sequence[int]] | None = None,
    values: Mapping[str, Any] | None = None, extra: Sequence[Mapping[str, Sequence[int]]] = (),
) -> Checks:
    """Inputs of several shapes and ``run``'s results on them, and the shapes left out with
    why (``run`` failed there: the model does not take them; or too large to make up).
    First ``first_run``'s (``shapes``: WARMUP_SHAPES), then each of ``extra`` (CHECK_SHAPES),
    then free dimensions small (1), large (``large_dim``, halved while one run would take
    more than ``CHECK_RUN_SECONDS``) and with a batch of 2. Shapes too large to make up are
    left out, ``shapes`` included (the first run then takes the model's own). Raises what
    ``first_run`` raises: without its inputs there is nothing to compare."""
    left_out: list[str] = []
    try:
        feed, result = first_run(inputs, run, shapes, values, CHECK_BYTES)
    except Unsynthesizable as exc:
        if not shapes:
            raise
        left_out.append(f"WARMUP_SHAPES: {exc}")
        feed, result = first_run(inputs, run, None, values, CHECK_BYTES)
    seconds = []
    for _ in range(2):  # the faster of two: the builder loads the blob beside these runs
        started = time.perf_counter()
        again = run(feed)
        seconds.append(time.perf_counter() - started)
    runs: list[CheckRun[R]] = [(describe(feed), feed, result)]
    medium = max(DEFAULT_DIM, *(_free_sizes(inputs, feed) or [DEFAULT_DIM]))
    candidates: list[tuple[Mapping[str, Sequence[int]] | None, DimSize, int]] = [
        *((given, medium, 1) for given in extra),
        (None, 1, 1),
        (None, _affordable(inputs, feed, max(min(seconds), 1e-4), medium), 1),
        (None, medium, 2),
    ]
    seen = {_signature(feed)}
    for given, size, batch in candidates:
        try:
            candidate = synthesize(inputs, given, default_dim=size, batch=batch, values=values, max_bytes=CHECK_BYTES)
        except Unsynthesizable as exc:
            left_out.append(str(exc))
            continue
        if _signature(candidate) in seen:
            continue
        seen.add(_signature(candidate))
        try:
            runs.append((describe(candidate), candidate, run(candidate)))
        except Exception as exc:  # noqa: BLE001 - the source refuses this shape: nothing to check there
            left_out.append(f"{describe(candidate)}: {first_line(exc, 200)}")
    return Checks(runs, left_out, again)


def _affordable(inputs: Sequence[Any], feed: Mapping[str, np.ndarray], seconds: float, medium: int) -> DimSize:
    """``large_dim``, capped at half, a quarter... (not below ``medium``) while a run at that
    size would take more than ``CHECK_RUN_SECONDS``, judged from ``seconds`` for ``feed`` and
    the inputs' sizes."""
    cap = max((large_dim(port, axis) for port in inputs for axis in range(1, len(port.shape))), default=medium)
    while True:
        def size(port: Any, axis: int, cap: int = cap) -> int:
            return min(large_dim(port, axis), max(cap, medium))

        if cap <= medium:
            return size
        try:
            elements = sum(math.prod(shape) for _, shape in _plan(inputs, {}, {}, size, 1))
        except Unsynthesizable:
            return size  # not made up at all: check_runs says why
        if seconds * elements / max(_elements(feed), 1) <= CHECK_RUN_SECONDS:
            return size
        cap //= 2


def _elements(feed: Mapping[str, np.ndarray]) -> int:
    return sum(int(array.size) for array in feed.values())


def describe(feed: Mapping[str, np.ndarray]) -> str:
    """``input_ids[1,512] attention_mask[1,512]``: a feed's shapes, for manifests and logs."""
    return " ".join(f"{name}[{','.join(str(d) for d in array.shape)}]" for name, array in feed.items())


def synthesize(
    inputs: Sequence[Any], shapes: Mapping[str, Sequence[int]] | None = None, seed: int = 0,
    default_dim: DimSize = DEFAULT_DIM, *, batch: int = 1, values: Mapping[str, Any] | None = None,
    max_bytes: int | None = None,
) -> dict[str, np.ndarray]:
    """Inputs for ``inputs`` (``Port``s: name, dtype, shape), the same for the same seed;
    ``default_dim``: the size of dynamic dimensions nothing else sizes (but the first axis,
    which is ``batch``); ``values``: inputs' values (a scalar fills the input); ``max_bytes``:
    Unsynthesizable when the inputs would take more."""
    shapes = dict(shapes or {})
    given_values = {name: np.asarray(value) for name, value in (values or {}).items()}
    unknown = sorted((set(shapes) | set(given_values)) - {port.name for port in inputs})
    if unknown:
        raise Unsynthesizable(f"shapes or values given for {unknown}, which are not inputs of this model")
    for name, value in given_values.items():
        if value.ndim:
            shapes.setdefault(name, value.shape)  # an array: its own shape
    named = _named(inputs, shapes)
    planned = _plan(inputs, shapes, named, default_dim, batch)
    size = sum(math.prod(shape) * port.dtype.itemsize for port, shape in planned)
    if max_bytes is not None and size > max_bytes:
        shown = " ".join(f"{port.name}{list(shape)}" for port, shape in planned)
        raise Unsynthesizable(f"{shown}: {size >> 20} MB of inputs, more than {max_bytes >> 20} MB")
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    for port, shape in planned:
        given_value = given_values.get(port.name)
        if given_value is not None:
            feed[port.name] = _given(port, given_value, shape)
        elif np.issubdtype(port.dtype, np.floating):
            feed[port.name] = (rng.standard_normal(shape) * 0.1).astype(port.dtype)
        else:
            feed[port.name] = np.zeros(shape, dtype=port.dtype)
    return feed


def _named(inputs: Sequence[Any], shapes: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """Sizes of named dimensions, from the shapes given."""
    named: dict[str, int] = {}
    for port in inputs:
        given = shapes.get(port.name)
        if given is not None and len(given) == len(port.shape):
            for dim, size in zip(port.shape, given):
                if isinstance(dim, str):
                    named.setdefault(dim, int(size))
    return named


def _plan(inputs: Sequence[Any], shapes: Mapping[str, Sequence[int]], named: dict[str, int], default_dim: DimSize,
          batch: int) -> list[tuple[Any, tuple[int, ...]]]:
    """Each input's shape; Unsynthesizable for inputs that cannot be made up."""
    planned = []
    for port in inputs:
        if port.dtype is None:
            raise Unsynthesizable(f"input {port.name!r} is a {port.element_type}, which cannot be made up")
        if port.dtype == np.object_:
            raise Unsynthesizable(f"input {port.name!r} is a tensor of strings, which cannot be made up")
        planned.append((port, _shape(port, shapes.get(port.name), named, default_dim, batch)))
    return planned


def _given(port: Any, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A value given for ``port``, as its type: a scalar fills ``shape``. No silent casts: a
    float for an integer input, or a number its type cannot hold, is refused."""
    try:
        with np.errstate(all="ignore"):
            cast = value.astype(port.dtype, casting="same_kind" if value.dtype.kind != "i" else "unsafe")
    except (TypeError, ValueError, OverflowError) as exc:
        raise Unsynthesizable(f"the value given for input {port.name!r} is not a {port.element_type}: {exc}") from None
    with np.errstate(all="ignore"):
        if not np.array_equal(cast.astype(value.dtype), value) and value.dtype.kind in "iub":
            raise Unsynthesizable(f"the value given for input {port.name!r} does not fit a {port.element_type}")
        if value.dtype.kind == "f" and not np.all(np.isfinite(cast) | ~np.isfinite(value)):
            raise Unsynthesizable(f"the value given for input {port.name!r} does not fit a {port.element_type}")
    if value.ndim and tuple(value.shape) != shape:
        raise Unsynthesizable(f"the value given for input {port.name!r} has shape {list(value.shape)}, "
                              f"the shape asked for is {list(shape)}")
    return np.full(shape, cast) if value.ndim == 0 else cast


def _shape(
    port: Any, given: Sequence[int] | None, named: dict[str, int], default_dim: DimSize, batch: int
) -> tuple[int, ...]:
    if given is not None:
        if len(given) != len(port.shape):
            raise Unsynthesizable(f"input {port.name!r} has rank {len(port.shape)}, the shape given {list(given)}")
        for axis, (dim, size) in enumerate(zip(port.shape, given)):
            if isinstance(dim, int) and dim >= 0 and dim != size:
                raise Unsynthesizable(f"input {port.name!r} dimension {axis} is {dim}, the shape given says {size}")
        return tuple(int(size) for size in given)
    shape = []
    for axis, dim in enumerate(port.shape):
        if isinstance(dim, int) and dim >= 0:
            shape.append(dim)
        elif isinstance(dim, str) and dim in named:
            shape.append(named[dim])
        else:
            size = batch if axis == 0 else default_dim if isinstance(default_dim, int) else default_dim(port, axis)
            if isinstance(dim, str):
                named[dim] = size  # one size per dimension name, across inputs
            shape.append(size)
    return tuple(shape)


def _free_sizes(inputs: Sequence[Any], feed: Mapping[str, np.ndarray]) -> list[int]:
    """The sizes ``feed`` gave the free dimensions of ``inputs`` (but the first axis)."""
    return [int(feed[port.name].shape[axis]) for port in inputs if port.name in feed
            for axis, dim in enumerate(port.shape)
            if axis and not (isinstance(dim, int) and dim >= 0) and axis < feed[port.name].ndim]


def _signature(feed: Mapping[str, np.ndarray]) -> tuple[tuple[int, ...], ...]:
    return tuple(array.shape for array in feed.values())
