"""The CPU blob: ONNX Runtime's optimized model (``model.onnx``) with its weights,
prepacked where ``CACHE_PREPACK`` is on, in ``weights.bin``.

ONNX Runtime writes it while building a session with ``optimized_model_filepath``;
loading it later with graph optimizations off skips the expensive work.
``finalize`` repairs one quirk before an entry is published: for IR < 4 models,
ONNX Runtime keeps graph inputs for initializers that constant folding removed,
so the saved model would demand hundreds of extra inputs (seen with the
DenseNet-121 shipped in the onnx wheel). Such dangling inputs are dropped; a
blob whose inputs still differ from the source session's is not published.
"""

from __future__ import annotations

from pathlib import Path

import onnx

__all__ = ("BLOB_MODEL", "BLOB_WEIGHTS", "BlobError", "finalize")

BLOB_MODEL = "model.onnx"
BLOB_WEIGHTS = "weights.bin"


class BlobError(Exception):
    """The exported blob does not reproduce the source model's interface."""


def finalize(entry_dir: Path, input_names: list[str]) -> None:
    path = entry_dir / BLOB_MODEL
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    wanted = set(input_names)
    used = {name for node in graph.node for name in node.input}
    dangling = [i for i in graph.input if i.name not in wanted and i.name not in initializers]
    if dangling:
        if any(i.name in used for i in dangling):
            raise BlobError("the optimized model needs inputs that the source model does not have")
        keep = [i for i in graph.input if i.name in wanted or i.name in initializers]
        del graph.input[:]
        graph.input.extend(keep)
        onnx.save(model, str(path))
    exposed = [i.name for i in graph.input if i.name not in initializers or i.name in wanted]
    if sorted(exposed) != sorted(input_names):
        raise BlobError(f"blob inputs {exposed} differ from the model's {input_names}")
