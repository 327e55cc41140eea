"""``OPENVINO``: Intel's OpenVINO execution provider, and OpenVINO's own cache as a blob format.

``OpenVINOCacheBlob``: OpenVINO's model cache, with the provider's ``cache_dir`` pointing at
the entry being written, next to a copy of the source model (the provider needs an ONNX model
to load; OpenVINO then finds its compiled blob by hashing it). OpenVINO names blobs by a hash
of the model's content, not its path, so the copy in the entry finds the blob written while
compiling the source. The provider rewrites its blob on every load, hit or not (seen with
onnxruntime-openvino 1.24.1: the file changes size each time), and without a lock: pointed at
a published entry it would break the entry's checksums under its readers. Imports therefore
point ``cache_dir`` at a scratch copy of the blob, and a blob name the entry does not have
afterwards means OpenVINO missed and compiled again.

Cached only on OpenVINO's GPU and NPU: on a CPU the provider's cache makes a session slower
(docs/devices.md); there it compiles normally, with no error, and writes nothing.
"""

from __future__ import annotations

import glob
import os
import shutil
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

from .._cache.layout import BLOB_MODEL, is_reserved
from .._errors import BlobError
from .base import CPU_FALLBACK, BlobFormat, Device, ProviderList, cpu_fingerprint, with_first

__all__ = ("OpenVINOCacheBlob", "OpenVINODevice")


@cache
def openvino_version() -> str:
    """The OpenVINO runtime the provider uses: onnxruntime-openvino bundles its own
    ``libopenvino.so.<version>`` beside the provider library."""
    import onnxruntime

    capi = os.path.join(os.path.dirname(onnxruntime.__file__), "capi")
    bundled = sorted(glob.glob(os.path.join(capi, "libopenvino.so.*.*.*")))
    if bundled:
        return os.path.basename(bundled[-1]).removeprefix("libopenvino.so.")
    try:
        import openvino

        return str(openvino.__version__)
    except ImportError:
        return "unknown"


class OpenVINOCacheBlob(BlobFormat):
    kind = "ov-cache-dir"
    model_file = BLOB_MODEL  # the source model, copied
    background = False  # OpenVINO exports its blob inside the compile
    keeps_source = True
    import_scratch = True

    def configure_export(
        self, options: Any, providers: ProviderList, tmp: Path, key: str, variant: str = "default"
    ) -> ProviderList:
        return with_first(providers, cache_dir=str(tmp))

    def configure_import(
        self, options: Any, providers: ProviderList, entry: Path, scratch: Path | None = None,
        variant: str = "default",
    ) -> ProviderList:
        assert scratch is not None
        for blob in _blobs(entry):
            shutil.copyfile(blob, scratch / blob.name)  # copy_file_range: a reflink where the filesystem can
        return with_first(providers, cache_dir=str(scratch))

    def stage_source(self, tmp: Path, model: bytes | tuple[str, list[str]]) -> None:
        if isinstance(model, bytes):
            (tmp / self.model_file).write_bytes(model)
            return
        path, external = model
        names = [os.path.relpath(file, os.path.dirname(path)) for file in external]
        for name in names:  # an entry is one flat directory, and these names are taken
            if os.path.dirname(name) or name == self.model_file or is_reserved(name) or name.endswith(".blob"):
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


class OpenVINODevice(Device):
    family = "OPENVINO"
    provider = "OpenVINOExecutionProvider"
    blob = OpenVINOCacheBlob()
    #: OpenVINO device types whose compile a cached blob skips. Not CPU: there the provider's
    #: session time is onnxruntime's and the ONNX conversion, and a hit is slower than a compile
    #: (benchmarks, scenario ovep; docs/devices.md)
    cached_device_types: ClassVar[tuple[str, ...]] = ("GPU", "NPU")

    def caches(self, options: Mapping[str, str]) -> bool:
        device_type = options.get("device_type", "CPU").upper()  # e.g. GPU.1, HETERO:GPU,CPU
        return super().caches(options) and any(kind in device_type for kind in self.cached_device_types)

    def fingerprint(self, index: int | None) -> dict[str, Any]:
        """OpenVINO's blobs are specific to its version (it refuses others) and the CPU's ISA."""
        return {**cpu_fingerprint(), "openvino": openvino_version()}

    def providers(self, index: int | None, options: Mapping[str, str]) -> ProviderList:
        return [(self.provider, {"device_type": "CPU", **options}), CPU_FALLBACK]

    def full_name(self) -> str:
        return "Intel OpenVINO execution provider"
