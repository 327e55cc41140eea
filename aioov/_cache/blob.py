"""Blob formats: what a cache entry holds for a device, and how sessions write and read it.

Each format only configures ONNX Runtime (session options and provider options); the
Core builds the sessions. That keeps the provider-specific knowledge here, testable on a
machine without the provider.

``OrtOptimizedBlob`` (CPU): ONNX Runtime's optimized model (``model.onnx``) with its weights,
prepacked where ``CACHE_PREPACK`` is on, in ``weights.bin``; loaded with graph
optimizations off. It can be produced by a second session after the caller's, in the
background. ``finalize`` repairs one quirk before an entry is published: for IR < 4 models,
ONNX Runtime keeps graph inputs for initializers that constant folding removed, so the
saved model would demand hundreds of extra inputs (seen with the DenseNet-121 shipped in
the onnx wheel). Such dangling inputs are dropped; a blob whose inputs still differ from
the source session's is not published.

``TensorRTContextBlob`` (TENSORRT): the EP-context model TensorRT dumps while it builds its
engine (``model_ctx.onnx``, engine embedded), written by the compile itself. The engine
cache prefix is the aioov key, so two models of one structure can never share an engine
(onnxruntime's own cache keys hash names, not weights: upstream #6455), and every path
points inside the entry being written: the same locks, atomic publish and checksums apply.

``OpenVINOCacheBlob`` (OPENVINO): OpenVINO's own model cache, with the provider's ``cache_dir``
pointing at the entry being written, next to a copy of the source model (the provider needs
an ONNX model to load; OpenVINO then finds its compiled blob by hashing it). OpenVINO names
blobs by a hash of the model's content, not its path, so the copy in the entry finds the blob
written while compiling the source. The provider rewrites its blob on every load, hit or not
(seen with onnxruntime-openvino 1.24.1: the file changes size each time), and without a lock:
pointed at a published entry it would break the entry's checksums under its readers. Imports
therefore point ``cache_dir`` at a scratch copy of the blob, and a blob name the entry does not
have afterwards means OpenVINO missed and compiled again.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import onnx

from .store import MANIFEST

__all__ = (
    "BLOB_MODEL",
    "BLOB_WEIGHTS",
    "BlobError",
    "BlobFormat",
    "OpenVINOCacheBlob",
    "OrtOptimizedBlob",
    "TensorRTContextBlob",
)

BLOB_MODEL = "model.onnx"
BLOB_WEIGHTS = "weights.bin"

ProviderList = list[tuple[str, dict[str, str]]]


class BlobError(Exception):
    """This model cannot be cached in this format (the blob would not reproduce the source
    model, or the entry could not hold it); it is compiled, not cached."""


class BlobFormat:
    kind: ClassVar[str]
    #: the file ONNX Runtime loads when the entry is imported (checked before it is parsed)
    model_file: ClassVar[str]
    #: True: a second session can write the blob after the caller got theirs
    background: ClassVar[bool]
    #: True: the entry holds a copy of the source model (as ``model_file``) beside the blob
    keeps_source: ClassVar[bool] = False
    #: True: the provider writes into its cache even on a hit; imports get a scratch directory
    import_scratch: ClassVar[bool] = False

    def configure_export(
        self, options: Any, providers: ProviderList, tmp: Path, key: str, props: Mapping[str, Any]
    ) -> ProviderList:
        """Make a compile from source also write the blob into ``tmp``."""
        raise NotImplementedError

    def configure_import(
        self, options: Any, providers: ProviderList, entry: Path, scratch: Path | None = None
    ) -> ProviderList:
        """Make a session load the blob in ``entry`` (``scratch``: a directory to write in,
        given when ``import_scratch`` is set)."""
        raise NotImplementedError

    def stage_source(self, tmp: Path, model: bytes | tuple[str, list[str]]) -> None:
        """Copy the source (its bytes, or its file and external-data files) into ``tmp``,
        for formats that ``keeps_source``; BlobError when the entry cannot hold it."""
        raise NotImplementedError

    def finalize(self, tmp: Path, input_names: list[str]) -> None:
        """Check (and tidy) what the export wrote, before it is published."""

    def after_import(self, entry: Path, scratch: Path | None) -> str | None:
        """After a session was built from ``entry``: why the entry was not really used
        (the provider compiled again), or None."""
        return None


class OrtOptimizedBlob(BlobFormat):
    kind = "ort-optimized"
    model_file = BLOB_MODEL
    background = True

    def configure_export(
        self, options: Any, providers: ProviderList, tmp: Path, key: str, props: Mapping[str, Any]
    ) -> ProviderList:
        options.optimized_model_filepath = str(tmp / BLOB_MODEL)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", BLOB_WEIGHTS)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        if props["CACHE_PREPACK"]:
            options.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
        return providers

    def configure_import(
        self, options: Any, providers: ProviderList, entry: Path, scratch: Path | None = None
    ) -> ProviderList:
        import onnxruntime as ort

        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return providers

    def finalize(self, tmp: Path, input_names: list[str]) -> None:
        path = tmp / BLOB_MODEL
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


class TensorRTContextBlob(BlobFormat):
    kind = "trt-ep-context"
    model_file = "model_ctx.onnx"
    background = False  # the engine build is the compile: it writes the blob as it goes

    def configure_export(
        self, options: Any, providers: ProviderList, tmp: Path, key: str, props: Mapping[str, Any]
    ) -> ProviderList:
        return _with_first(
            providers,
            trt_engine_cache_enable="True",
            trt_engine_cache_path=str(tmp),
            trt_engine_cache_prefix=f"aioov_{key[:32]}",
            trt_timing_cache_enable="True",
            trt_timing_cache_path=str(tmp),
            trt_dump_ep_context_model="True",
            trt_ep_context_file_path=str(tmp / self.model_file),
            trt_ep_context_embed_mode="1",  # the engine inside the context model: one self-contained file
        )

    def configure_import(
        self, options: Any, providers: ProviderList, entry: Path, scratch: Path | None = None
    ) -> ProviderList:
        # The engine is embedded in the context model; no cache paths, so that ONNX Runtime
        # never writes into a published entry.
        (name, first), *rest = providers
        first = {k: v for k, v in first.items() if not k.startswith(("trt_engine_cache", "trt_timing_cache"))}
        return [(name, first), *rest]

    def finalize(self, tmp: Path, input_names: list[str]) -> None:
        if not (tmp / self.model_file).is_file():
            raise BlobError("TensorRT wrote no EP-context model (no node ran on TensorRT?)")
        for file in tmp.iterdir():  # engines and timing caches are inside the context model now
            if file.name != self.model_file:
                file.unlink()


class OpenVINOCacheBlob(BlobFormat):
    kind = "ov-cache-dir"
    model_file = BLOB_MODEL  # the source model, copied
    background = False  # OpenVINO exports its blob inside the compile
    keeps_source = True
    import_scratch = True

    def configure_export(
        self, options: Any, providers: ProviderList, tmp: Path, key: str, props: Mapping[str, Any]
    ) -> ProviderList:
        return _with_first(providers, cache_dir=str(tmp))

    def configure_import(
        self, options: Any, providers: ProviderList, entry: Path, scratch: Path | None = None
    ) -> ProviderList:
        assert scratch is not None
        for blob in _blobs(entry):
            shutil.copyfile(blob, scratch / blob.name)  # copy_file_range: a reflink where the filesystem can
        return _with_first(providers, cache_dir=str(scratch))

    def stage_source(self, tmp: Path, model: bytes | tuple[str, list[str]]) -> None:
        if isinstance(model, bytes):
            (tmp / self.model_file).write_bytes(model)
            return
        path, external = model
        names = [os.path.relpath(file, os.path.dirname(path)) for file in external]
        for name in names:  # an entry is one flat directory, and these names are taken
            if os.path.dirname(name) or name in (self.model_file, MANIFEST) or name.endswith(".blob"):
                raise BlobError(f"its external data {name!r} cannot sit beside the model in a cache entry")
        shutil.copyfile(path, tmp / self.model_file)
        for file, name in zip(external, names):
            shutil.copyfile(file, tmp / name)

    def finalize(self, tmp: Path, input_names: list[str]) -> None:
        if not _blobs(tmp):
            raise BlobError("OpenVINO wrote no compiled blob (did no node run on OpenVINO?)")

    def after_import(self, entry: Path, scratch: Path | None) -> str | None:
        assert scratch is not None
        new = {blob.name for blob in _blobs(scratch)} - {blob.name for blob in _blobs(entry)}
        if new:
            return f"OpenVINO did not find its blob in the entry and compiled again (wrote {min(new)})"
        return None


def _blobs(folder: Path) -> list[Path]:
    return [file for file in folder.iterdir() if file.suffix == ".blob"]


def _with_first(providers: ProviderList, **options: str) -> ProviderList:
    """``providers`` with ``options`` added to the first provider's."""
    (name, first), *rest = providers
    return [(name, {**first, **options}), *rest]
