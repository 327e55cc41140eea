"""Whether a model is worth caching: what its hit would save against what its compile costs.

Decided twice: on the caller's compile (a compile too short for any hit to save enough gets no
builder), and in the builder once it has timed a load of the blob, before its checks run (a
model whose hit would not load much sooner is not checked, and gets a "not worth caching"
record instead of an entry). Both sides of the builder's pipe import this module.
"""

from __future__ import annotations

__all__ = ("not_worth",)

#: a model is cached where a hit saves at least WORTH_SECONDS of its compile, and a fifth of it
#: or WORTH_ANYWAY seconds (``benchmarks/worth.py`` measures which models of the corpus pass)
WORTH_SECONDS = 0.02
WORTH_SHARE = 0.2
WORTH_ANYWAY = 0.1
#: a hit's cost, as the builder's timed load predicts it: a fixed part (the manifest, checksums,
#: locks, the session's setup) and the CPU time of the load the builder timed (its wall time is
#: no measure: a background builder runs only on CPU nothing else wants, and beside its checks)
HIT_FLOOR = 0.035
LOAD_SHARE = 1.0


def not_worth(compile_seconds: float | None, load_seconds: object) -> str | None:
    """Why a model is not worth caching, or None. Before any blob exists (``load_seconds``
    None) only a compile too short for any hit to save enough is; afterwards the builder's
    timed load of the hit decides."""
    if compile_seconds is None:
        return None
    load = float(load_seconds) if isinstance(load_seconds, (int, float)) else 0.0
    hit = HIT_FLOOR + LOAD_SHARE * load
    saved = compile_seconds - hit
    if saved >= WORTH_SECONDS and (saved >= WORTH_SHARE * compile_seconds or saved >= WORTH_ANYWAY):
        return None
    if load_seconds is None:
        return f"its compile takes {compile_seconds:.3f} s: a hit cannot load it much sooner"
    return f"a hit would load it in about {hit:.3f} s, its compile takes {compile_seconds:.3f} s"
