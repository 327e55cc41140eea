"""One onnxruntime distribution per environment, checked when aioov is imported.

``onnxruntime``, ``onnxruntime-gpu``, ``onnxruntime-openvino`` and the others all install the
same ``onnxruntime`` module: pip lets two of them sit side by side (``pip install onnxruntime``
then ``pip install aioov``), and the module is then a mix of both, of the version installed
last; uninstalling one of them deletes files the other needs. aioov says so, naming the fix,
instead of failing later on a missing extension module or running a build nobody chose.
"""

from __future__ import annotations

import importlib.metadata
import warnings
from collections.abc import Iterable

__all__ = ("DISTRIBUTIONS", "check_onnxruntime", "installed")

#: the distributions that install the ``onnxruntime`` module
DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml",
                 "onnxruntime-qnn", "onnxruntime-rocm", "onnxruntime-silicon", "onnxruntime-training")


def installed(path: Iterable[str] | None = None) -> dict[str, str]:
    """The onnxruntime distributions installed (on ``path``, default ``sys.path``): name → version.
    Looked up by name (a few ms), not by listing every distribution (tens of ms)."""
    found: dict[str, str] = {}
    for name in DISTRIBUTIONS:
        dists = (importlib.metadata.distributions(name=name, path=list(path)) if path is not None
                 else importlib.metadata.distributions(name=name))
        dist = next(iter(dists), None)
        if dist is not None:
            found[name] = dist.version
    return found


def check_onnxruntime() -> None:
    """Warn when several onnxruntime distributions share this environment; raise ImportError,
    with the fix, when the ``onnxruntime`` module is broken (one of two was uninstalled)."""
    found = installed()
    keep = "onnxruntime-gpu" if "onnxruntime-gpu" in found else "onnxruntime"
    fix = f"pip uninstall -y {' '.join(sorted(found)) or 'onnxruntime'} && pip install {keep}"
    if len(found) > 1:
        listed = ", ".join(f"{name} {version}" for name, version in sorted(found.items()))
        warnings.warn(f"several onnxruntime distributions are installed ({listed}); they all install the same "
                      f"onnxruntime module, now a mix of them. Keep one: {fix}", RuntimeWarning, stacklevel=2)
    try:
        import onnxruntime.capi.onnxruntime_pybind11_state  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"onnxruntime cannot be imported ({exc}): its files belong to a distribution "
                          f"that is gone or damaged. Reinstall one distribution: {fix}") from exc


check_onnxruntime()  # at import: ``aioov/__init__`` imports this module first
