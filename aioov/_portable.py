"""Blobs the user manages: ``Core.export_model`` writes one into a directory of its own,
``Core.import_model`` loads one, refusing blobs made for another device, configuration or
machine. The directory is an entry's layout (manifest included), written with the same
atomic publish as the cache, and checked as strictly as a cache entry before it is loaded.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ._cache.cache import Cache, cache_key
from ._cache.store import CacheStore
from ._errors import ORT_ERRORS, BlobError, CacheError
from ._model import read_any
from ._pipeline import Pipeline
from ._request import CompileRequest, Result

__all__ = ("export_to_dir", "import_dir")


def export_to_dir(pipeline: Pipeline, request: CompileRequest, dest: Path) -> Path:
    """Compile ``request`` and write its blob into the new directory ``dest`` (blocking)."""
    if not _portable(request):
        raise CacheError(f"device {request.spec} cannot export a compiled model")
    if os.path.lexists(dest):
        raise CacheError(f"{dest} already exists")
    dest = dest.absolute()
    source = request.source
    digest = (source.model or read_any(source.path)).digest()
    key_inputs = request.key_inputs(digest)
    key = cache_key(key_inputs)
    store = CacheStore(dest.parent / f".{dest.name}.aioov-export")
    try:
        store.ensure()
        pipeline.writer.export_to(Cache(store, pipeline.events), key, request, request.manifest(key_inputs))
        os.rename(store.entry_path(key), dest)
    except (OSError, BlobError) as exc:
        raise CacheError(f"cannot write {dest}: {exc}") from exc
    finally:
        shutil.rmtree(store.root, ignore_errors=True)
    return dest


def import_dir(pipeline: Pipeline, request: CompileRequest, path: Path) -> Result:
    """Load a blob written by ``export_to_dir``; CacheError when it is damaged or foreign."""
    if not _portable(request):
        raise CacheError(f"device {request.spec} cannot import compiled models")
    store = CacheStore(path.parent)
    entry = store.read_blob(path)  # CacheError when it is not one
    inputs = entry.manifest.get("key_inputs")
    model = inputs.get("model") if isinstance(inputs, dict) else None
    want = request.key_inputs(model) if isinstance(model, str) else None
    if want is None or inputs != json.loads(json.dumps(want)):
        raise CacheError(f"{path} was compiled for another device, configuration or machine")
    problem = store.verify(entry)
    if problem:
        raise CacheError(f"{path} is damaged: {problem}")
    record = entry.manifest.get("build")
    if not isinstance(record, dict) or not isinstance(record.get("variant"), str):
        raise CacheError(f"{path} was written without a check of its blob (by an older aioov): export it again")
    try:
        session, problem = pipeline.reader.open_blob(
            path, request, None, lambda: Path(tempfile.mkdtemp(prefix="aioov-import-")), variant=record["variant"]
        )
    except ORT_ERRORS as exc:
        raise CacheError(f"onnxruntime cannot load {path}: {exc}") from exc
    except OSError as exc:
        raise CacheError(f"cannot import {path}: {exc}") from exc
    if problem:
        raise CacheError(f"{path} could not be imported: {problem}")
    return Result(session, str(request.spec), request.config, True, entry.key)


def _portable(request: CompileRequest) -> bool:
    return (request.device.blob is not None and request.own_providers
            and request.device.caches(request.providers[0][1]))
