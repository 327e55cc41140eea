"""``Model``: an ONNX model read from a file or from memory, checked but not compiled."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from ._cache.key import FileStat, digest_bytes, digest_files
from ._errors import ModelReadError
from ._onnx_scan import ModelScan, ScanError, scan_bytes, scan_file

if TYPE_CHECKING:
    import onnx

__all__ = ("Model", "check_model_file", "pinned_path", "read_any", "resolve_external")


class Model:
    """A model that ``Core.read_model`` has checked: an ONNX file (with its
    external-data files) or serialized bytes.

    Reading validates the container cheaply (no full protobuf parse; see
    ``_onnx_scan``) and finds the external-data files; the graph itself is
    validated by ONNX Runtime when the model is compiled.
    """

    def __init__(
        self,
        *,
        path: str | None = None,
        data: bytes | None = None,
        scan: ModelScan,
        external_files: list[str] | None = None,
    ) -> None:
        if (path is None) == (data is None):
            raise ValueError("a Model has either a path or bytes")
        self._path = path
        self._data = data
        self._scan = scan
        self._external_files = external_files or []
        self._digest: str | None = None
        self._digest_stats: list[FileStat] | None = None  # the files as they were hashed
        self._digest_lock = threading.Lock()

    @property
    def path(self) -> str | None:
        """The model file's absolute path, or None for a model read from bytes."""
        return self._path

    @property
    def data(self) -> bytes | None:
        """The serialized model, for a model read from bytes."""
        return self._data

    @property
    def input_names(self) -> list[str]:
        return list(self._scan.inputs)

    @property
    def output_names(self) -> list[str]:
        return list(self._scan.outputs)

    @property
    def external_data_files(self) -> list[str]:
        """Absolute paths of the external-data files this model references."""
        return list(self._external_files)

    @property
    def ir_version(self) -> int:
        return self._scan.ir_version

    def file_stats(self) -> list[FileStat]:
        assert self._path is not None
        return [FileStat.of(p) for p in (self._path, *self._external_files)]

    def digest(self) -> str:
        """blake3 of the model and its external data (blocking; see ``identity``)."""
        return self.identity()[1]

    def identity(self) -> tuple[list[FileStat] | None, str]:
        """(file stats, content digest) of the model as it is now: hashed once, and again
        whenever its files changed since (a compile of a read file compiles what is on disk,
        so its key must describe that, not what ``read_model`` saw). Blocking."""
        with self._digest_lock:
            if self._data is not None:
                if self._digest is None:
                    self._digest = digest_bytes(self._data)
                return None, self._digest
            now = self.file_stats()
            if self._digest is None or now != self._digest_stats or not all(s.settled for s in now):
                assert self._path is not None
                digest = digest_files([self._path, *self._external_files])
                if self.file_stats() != now:
                    raise ModelReadError(f"{self._path} changed while it was being hashed")
                self._digest, self._digest_stats = digest, now
            assert self._digest is not None
            return list(now), self._digest

    def describe(self) -> str:
        return self._path or f"<model from {len(self._data or b'')} bytes>"

    def __repr__(self) -> str:
        return f"<Model {self.describe()} inputs={self.input_names} outputs={self.output_names}>"

    # -- construction (blocking; Core calls these in worker threads) -------------
    @classmethod
    def from_path(cls, path: str | os.PathLike[str]) -> Model:
        pinned = pinned_path(path)
        scan, external = check_model_file(pinned)
        return cls(path=pinned, scan=scan, external_files=external)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Model:
        data = bytes(data)
        try:
            scan = scan_bytes(data)
        except ScanError as exc:
            raise ModelReadError(f"cannot read model from bytes: {exc}") from None
        if scan.external:
            raise ModelReadError(
                "a model given as bytes cannot reference external data "
                f"({scan.external_locations[0]!r}); read it from its file instead"
            )
        return cls(data=data, scan=scan)

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto) -> Model:
        try:
            data = proto.SerializeToString()
        except ValueError as exc:  # > 2 GB
            raise ModelReadError(f"cannot serialize the ModelProto: {exc}; save it to a file") from exc
        return cls.from_bytes(data)


def read_any(model: object) -> Model:
    """A ``Model`` from a Model, a path, serialized bytes or an ``onnx.ModelProto`` (blocking)."""
    if isinstance(model, Model):
        return model
    if isinstance(model, (str, os.PathLike)):
        return Model.from_path(model)
    if isinstance(model, (bytes, bytearray, memoryview)):
        return Model.from_bytes(model)
    if hasattr(model, "SerializeToString"):
        return Model.from_proto(model)  # type: ignore[arg-type]
    raise ModelReadError(f"cannot read a model from {type(model).__name__}; give a path, bytes or a ModelProto")


def pinned_path(path: str | os.PathLike[str]) -> str:
    """The model file's absolute path through its directory's real path. A compile hashes the
    model and its external data, then reads them again to compile: through a directory link
    that is re-pointed meanwhile (a ``current`` release link, a Kubernetes volume's ``..data``)
    it would hash one release and compile another. The file itself stays as named: a link to a
    blob elsewhere (a Hugging Face snapshot) still finds its external data beside the link."""
    head, tail = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(os.path.realpath(head), tail)


def check_model_file(path: str) -> tuple[ModelScan, list[str]]:
    """Scan an ONNX file and resolve its external data; raise ModelReadError naming the problem."""
    if not os.path.exists(path):
        raise ModelReadError(f"no such model file: {path}")
    if not os.path.isfile(path):
        raise ModelReadError(f"not a file: {path}")
    try:
        scan = scan_file(path)
    except ScanError as exc:
        raise ModelReadError(f"{path} is not a valid ONNX model: {exc}") from None
    except OSError as exc:
        raise ModelReadError(f"cannot read {path}: {exc}") from exc
    return scan, resolve_external(path, scan)


def resolve_external(path: str, scan: ModelScan) -> list[str]:
    """Absolute paths of external-data files, refusing any outside the model's directory."""
    base = Path(path).parent.resolve()
    # A link may lead to the folder the model file itself is a link into: a Hugging Face
    # snapshot links each file to a blob in one folder elsewhere. No further.
    roots = (base, Path(path).resolve().parent)
    files: list[str] = []
    sizes: dict[str, int] = {}
    for ref in scan.external:
        location = ref.location
        if os.path.isabs(location) or ".." in Path(location).parts or location.startswith(("/", "\\")):
            raise ModelReadError(
                f"{path}: external data {location!r} of tensor {ref.tensor!r} "
                "points outside the model's directory"
            )
        target = (base / location).resolve()
        if not any(root in target.parents for root in roots):
            raise ModelReadError(
                f"{path}: external data {location!r} resolves outside the model's directory"
            )
        if str(target) not in sizes:
            if not target.is_file():
                raise ModelReadError(f"{path}: external data file {location!r} is missing")
            sizes[str(target)] = target.stat().st_size
            files.append(str(base / location))
        if ref.length is not None and ref.offset + ref.length > sizes[str(target)]:
            raise ModelReadError(
                f"{path}: external data file {location!r} is truncated "
                f"(tensor {ref.tensor!r} needs bytes up to {ref.offset + ref.length})"
            )
    return files
