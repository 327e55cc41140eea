"""What a cache entry's blob must compute: its source's outputs on made-up inputs.

The builder (``_builder``) runs the source session on inputs made up from its input specs, at
several shapes (``_inputs.check_runs``: the shape the model first accepts, each free dimension
small and at real inputs' size, a batch of 2, the user's shapes), and compares a blob's outputs
with these, within ``TOLERANCE``, before an entry is published.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._errors import ORT_ERRORS, first_line
from ._inputs import CheckRun, Unsynthesizable, check_runs
from ._ortoptions import quiet_run
from ._port import Port

__all__ = ("TOLERANCE", "Reference", "compare", "first_line", "reference_run")

#: (rtol, atol relative to the largest reference value) by output element size: a blob may
#: compute in another order (fused kernels, packed weights), never another result
TOLERANCE = {2: (1e-2, 1e-2), 4: (1e-3, 1e-4), 8: (1e-6, 1e-8)}


def compare(expected: list[Any], actual: list[Any]) -> str | None:
    """Why ``actual`` is not ``expected`` (a list of outputs), or None when they match."""
    if len(expected) != len(actual):
        return f"{len(actual)} outputs instead of {len(expected)}"
    for index, (want, got) in enumerate(zip(expected, actual)):
        want, got = np.asarray(want), np.asarray(got)
        if want.shape != got.shape or want.dtype != got.dtype:
            return f"output {index} is {got.dtype}{list(got.shape)} instead of {want.dtype}{list(want.shape)}"
        if np.issubdtype(want.dtype, np.floating) or np.issubdtype(want.dtype, np.complexfloating):
            rtol, atol = TOLERANCE.get(want.dtype.itemsize, TOLERANCE[4])
            finite = want[np.isfinite(want)]
            scale = max(1.0, float(np.max(np.abs(finite)))) if finite.size else 1.0
            if not np.allclose(got, want, rtol=rtol, atol=atol * scale, equal_nan=True):
                diff = np.nanmax(np.abs(got.astype(np.float64) - want.astype(np.float64)))
                return (f"output {index} differs by up to {diff:.3g} "
                        f"(allowed {rtol} relative, {atol * scale:.3g} absolute)")
        elif not np.array_equal(want, got):
            return f"output {index} differs"
    return None


#: the check's runs (label, inputs, the source's outputs on them; None: load only), why there
#: are none, and the shapes left out (the source refused them, or too large to make up)
Reference = tuple["list[CheckRun[list[Any]]] | None", "str | None", list[str]]


def reference_run(session: Any, shapes: Mapping[str, Sequence[int]] | None, values: Mapping[str, Any] | None = None,
                  extra: Sequence[Mapping[str, Sequence[int]]] = ()) -> Reference:
    """Run a source session on made-up inputs of several shapes (``_inputs.check_runs``): what a
    blob must compute. Outputs that differ between two runs on the same inputs make comparing
    pointless (load only)."""
    run = quiet_run(session)
    try:
        ports = [Port.from_node_arg(a) for a in session.get_inputs()]
        checks = check_runs(ports, run, shapes, values, extra)
        if compare(checks.runs[0][2], checks.again) is not None:
            return None, "its outputs differ from run to run", []
    except Unsynthesizable as exc:
        return None, str(exc), []
    except ORT_ERRORS as exc:
        return None, f"the source model failed on made-up inputs: {first_line(exc)}", []
    return checks.runs, None, checks.left_out
