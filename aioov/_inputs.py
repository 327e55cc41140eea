"""Deterministic inputs for a model, built from its input specs: for warm-up (and checks).

Static dimensions are kept; a dynamic one (a name, ``None`` or ``-1``) takes its size from
``shapes`` (``{"input_ids": [1, 128]}``), else from another input that names the same
dimension, else 1 for the first axis (a batch) and ``DEFAULT_DIM`` for the others. Values are
chosen to be valid for what such inputs usually are: floats from a seeded normal
distribution scaled down, integers zero (a valid index, an empty mask, a first token id), and
booleans false. Tensors of strings, and non-tensor inputs (sequences, maps, optional), cannot
be synthesized: ``Unsynthesizable`` says which input and why.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

__all__ = ("DEFAULT_DIM", "DIM_LADDER", "Unsynthesizable", "first_run", "synthesize")

#: size of a dynamic dimension nobody gave a size for (not the first axis): small, so a warm-up
#: costs little, and larger than 1, so kernels that special-case 1 are not the ones warmed
DEFAULT_DIM = 8
#: sizes ``first_run`` tries for unnamed dynamic dimensions, in turn: real models constrain
#: them (OCR detectors want multiples of 32 after 5 downsamplings; a VAD's reflect padding wants
#: 512 samples), and a small input that fails costs little
DIM_LADDER = (DEFAULT_DIM, 32, 64, 512)


R = TypeVar("R")


class Unsynthesizable(ValueError):
    """This model's inputs cannot be made up; the message names the input and why."""


def first_run(
    inputs: Sequence[Any], run: Callable[[dict[str, np.ndarray]], R], shapes: Mapping[str, Sequence[int]] | None = None
) -> tuple[dict[str, np.ndarray], R]:
    """The first inputs of ``DIM_LADDER``'s sizes that ``run`` accepts, and what it returned;
    raises Unsynthesizable, or what ``run`` raised on the largest."""
    for size in DIM_LADDER[:-1]:
        feed = synthesize(inputs, shapes, default_dim=size)
        try:
            return feed, run(feed)
        except Exception:
            pass  # maybe too small for this model: try the next size
    feed = synthesize(inputs, shapes, default_dim=DIM_LADDER[-1])
    return feed, run(feed)


def synthesize(
    inputs: Sequence[Any], shapes: Mapping[str, Sequence[int]] | None = None, seed: int = 0,
    default_dim: int = DEFAULT_DIM,
) -> dict[str, np.ndarray]:
    """Inputs for ``inputs`` (``Port``s: name, dtype, shape), the same for the same seed;
    ``default_dim``: the size of dynamic dimensions nothing else sizes (but the first axis)."""
    shapes = shapes or {}
    unknown = sorted(set(shapes) - {port.name for port in inputs})
    if unknown:
        raise Unsynthesizable(f"shapes given for {unknown}, which are not inputs of this model")
    named: dict[str, int] = {}
    for port in inputs:  # sizes of named dimensions, from the shapes given
        given = shapes.get(port.name)
        if given is not None and len(given) == len(port.shape):
            for dim, size in zip(port.shape, given):
                if isinstance(dim, str):
                    named.setdefault(dim, int(size))
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    for port in inputs:
        if port.dtype is None:
            raise Unsynthesizable(f"input {port.name!r} is a {port.element_type}, which cannot be made up")
        if port.dtype == np.object_:
            raise Unsynthesizable(f"input {port.name!r} is a tensor of strings, which cannot be made up")
        shape = _shape(port, shapes.get(port.name), named, default_dim)
        if np.issubdtype(port.dtype, np.floating):
            feed[port.name] = (rng.standard_normal(shape) * 0.1).astype(port.dtype)
        else:
            feed[port.name] = np.zeros(shape, dtype=port.dtype)
    return feed


def _shape(port: Any, given: Sequence[int] | None, named: dict[str, int], default_dim: int) -> tuple[int, ...]:
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
            size = 1 if axis == 0 else default_dim
            if isinstance(dim, str):
                named[dim] = size  # one size per dimension name, across inputs
            shape.append(size)
    return tuple(shape)
