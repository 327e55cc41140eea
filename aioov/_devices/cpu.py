"""``CPU``: ONNX Runtime's CPUExecutionProvider, present in every build, and its blob format.

``OrtOptimizedBlob``: ONNX Runtime's optimized model (``model.onnx``) with its weights in
``weights.bin``. Variants, tried in this order by the builder until one loads and computes
what the source does: ``plain`` (optimized, not prepacked; loaded with graph optimizations
off) and ``basic`` (only basic-level optimizations saved; a hit runs the compile's remaining
optimizations). With ``CACHE_PREPACK=AUTO``, once ``plain`` passed, ``prepacked`` (weights also
saved prepacked for the matrix kernels) is written and published instead only where its hit
loads much sooner: prepacked blobs are the ones onnxruntime's bugs crash (PP-OCR recognizers
at some input widths, an FSMN voice-activity model), and for most models they save nothing.
With ``ALWAYS``, ``prepacked`` is tried first.
It can be produced by a second session after the caller's, in the background.

``finalize`` repairs one quirk before an entry is published: for IR < 4 models, ONNX
Runtime keeps graph inputs for initializers that constant folding removed, so the saved
model would demand hundreds of extra inputs (seen with the DenseNet-121 shipped in the onnx
wheel). Such dangling inputs are dropped; a blob whose inputs still differ from the source
session's is not published.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .._cache.layout import BLOB_MODEL, BLOB_WEIGHTS
from .._errors import BlobError
from .._onnx_scan import ScanError, scan_file
from .base import BlobFormat, Device, ProviderList

__all__ = ("CPUDevice", "OrtOptimizedBlob")


#: the alignment a prepacked buffer needs in ``weights.bin`` (AVX-512's vector loads)
PREPACK_ALIGNMENT = 64


class OrtOptimizedBlob(BlobFormat):
    kind = "ort-optimized"
    model_file = BLOB_MODEL
    background = True
    instant = True

    def variants(self, prepack: bool) -> tuple[str, ...]:
        return ("prepacked", "plain", "basic") if prepack else ("plain", "basic")

    def faster_variant(self, prepack: bool) -> str | None:
        return "prepacked"

    def export_level(self, variant: str) -> str | None:
        return "BASIC" if variant == "basic" else None

    def configure_export(
        self, options: Any, providers: ProviderList, tmp: Path, key: str, variant: str = "prepacked"
    ) -> ProviderList:
        options.optimized_model_filepath = str(tmp / BLOB_MODEL)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", BLOB_WEIGHTS)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        if variant == "prepacked":
            options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        return providers

    def configure_import(
        self, options: Any, providers: ProviderList, entry: Path, scratch: Path | None = None,
        variant: str = "prepacked",
    ) -> ProviderList:
        import onnxruntime as ort

        if variant != "basic":  # a basic-level graph gets the compile's other optimizations
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return providers

    def configure_instant(self, options: Any) -> None:
        # The weights as saved, without repacking them for the matrix kernels: most of a
        # transformer's load is that repacking; inference is slower until the full session
        # (same file, prepacked) replaces it.
        options.add_session_config_entry("session.disable_prepacking", "1")

    def finalize(self, tmp: Path, input_names: list[str]) -> None:
        path = tmp / BLOB_MODEL
        try:
            scan = scan_file(path)  # the graph's inputs without importing onnx (a large part of a builder's start)
        except ScanError as exc:
            raise BlobError(f"onnxruntime wrote an optimized model that does not read back: {exc}") from exc
        initializers, wanted = set(scan.initializers), set(input_names)
        dangling = {name for name in scan.inputs if name not in wanted and name not in initializers}
        if dangling:
            _drop_inputs(path, dangling)
        exposed = [name for name in scan.inputs
                   if name not in dangling and (name not in initializers or name in wanted)]
        if sorted(exposed) != sorted(input_names):
            raise BlobError(f"blob inputs {exposed} differ from the model's {input_names}")
        unaligned = [ref.tensor for ref in scan.external for offset, _ in ref.prepacked if offset % PREPACK_ALIGNMENT]
        if unaligned:
            # Memory-mapped as they are, such buffers crash the kernels' aligned vector loads
            # (SIGSEGV), but only at shapes that take those kernels: PP-OCRv3's recognizer ran
            # at text-line widths up to 12 and crashed from 15.
            raise BlobError(f"onnxruntime saved the prepacked weights of {unaligned[:3]} (of {len(unaligned)}) "
                            f"at offsets not aligned to {PREPACK_ALIGNMENT} bytes")


def _drop_inputs(path: Path, names: set[str]) -> None:
    """Rewrite the graph at ``path`` without the inputs ``names``, which no node may use."""
    import onnx  # only where a graph must be rewritten: neither a hit nor the usual export needs it

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    if any(name in names for node in graph.node for name in node.input):
        raise BlobError("the optimized model needs inputs that the source model does not have")
    keep = [i for i in graph.input if i.name not in names]
    del graph.input[:]
    graph.input.extend(keep)
    onnx.save(model, str(path))


class CPUDevice(Device):
    family = "CPU"
    provider = "CPUExecutionProvider"
    blob = OrtOptimizedBlob()

    def available(self) -> bool:
        return True

    @property
    def probed(self) -> bool:
        return True  # nothing to probe: the CPU provider is in every build

    def prepare(self) -> None:
        """Nothing to probe: the CPU provider is in every build."""

    def full_name(self) -> str:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    if line.startswith("model name"):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return platform.processor() or platform.machine() or "CPU"

    def capabilities(self, options: Mapping[str, str] | None = None) -> list[str]:
        return ["FP32", "INT8", *super().capabilities(options)[1:]]
