"""The compile pipeline: what one compile job does in its worker thread.

Data flows one way::

    resolve device → content key (stat index, or blake3 of the files)
    → local entry? ── hit: import the blob (checksums verified alongside the load)
    └ miss: key lock → look again → remote entry? (download, verify, publish locally)
            → hosts' lock → compile → export (background, or by the compile itself)
            → publish → upload → release the locks

Everything here blocks; ``Core`` runs it in worker threads and only awaits. Cache failures
never escape: they are counted, logged once, and the model is compiled without the cache.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime as ort

from . import _ortenv
from ._cache import auth
from ._cache.blob import BlobError
from ._cache.export import Exporter
from ._cache.key import FileStat, cache_key, digest_files
from ._cache.locks import Cancelled, KeyLock, LockBusy
from ._cache.remote import RemoteError, RemoteLock, RemoteTier, remote_for
from ._cache.store import CacheStore, Entry, EntryError
from ._concurrency import CancelToken
from ._devices import Device, DeviceRegistry, DeviceSpec, ProviderList
from ._errors import ORT_ERRORS, CacheError, LockTimeout, ModelReadError, raise_compile_error
from ._model import Model, check_model_file, read_any
from ._properties import PROPERTIES, CacheVerify, ExportMode, PerformanceHint, public_value
from ._version import __version__

__all__ = ("CacheStats", "Pipeline", "Result", "Source")

logger = logging.getLogger("aioov")

_OPT_LEVELS = {
    "DISABLE_ALL": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "LAYOUT": getattr(
        ort.GraphOptimizationLevel, "ORT_ENABLE_LAYOUT", ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ),
    "ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@dataclass
class Held:
    """The locks a compiling job holds for one key, released together once it is published
    (or given up): the local flock, and the hosts' Redis lock when a remote tier is used."""

    local: KeyLock
    remote_lock: RemoteLock | None = None
    remote: RemoteTier | None = None  # set when this host must upload what it compiles

    def release(self) -> None:
        if self.remote_lock is not None:
            self.remote_lock.release()
            self.remote_lock = None
        self.local.release()


@dataclass
class CacheStats:
    """Counters of this process's cache activity (``Core.cache_stats``)."""

    hits: int = 0  # compiles answered from the cache
    misses: int = 0  # cacheable compiles that found no entry
    compiles: int = 0  # sessions built from the source model (cached or not)
    exports: int = 0  # entries published
    corrupt: int = 0  # entries found broken and discarded
    lock_waits: int = 0  # misses that found another process compiling and waited
    lock_timeouts: int = 0  # waits that gave up and compiled uncached
    errors: int = 0  # cache operations that failed (disk full, read-only...) and were skipped
    remote_hits: int = 0  # entries downloaded from the remote tier
    uploads: int = 0  # entries uploaded to the remote tier

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class Result:
    session: ort.InferenceSession
    device: str
    props: dict[str, Any]
    loaded_from_cache: bool
    key: str | None


@dataclass(frozen=True)
class Source:
    """A model to compile: a path (not yet read) or a read ``Model``."""

    path: str | None
    model: Model | None = field(default=None, hash=False, compare=False)
    model_id: int = 0  # identity of ``model`` (or ``raw``): two reads of one file are two models
    raw: Any = field(default=None, hash=False, compare=False)  # bytes or a ModelProto, read in the job

    def read(self) -> Source:
        """This source with ``raw`` read into a ``Model`` (blocking: serializes, scans)."""
        if self.raw is None:
            return self
        return Source(None, read_any(self.raw), self.model_id)

    @property
    def ort_input(self) -> str | bytes:
        if self.model is not None and self.model.data is not None:
            return self.model.data
        assert self.path is not None
        return self.path

    def describe(self) -> str:
        return self.path or (self.model.describe() if self.model else "?")

    def files(self) -> bytes | tuple[str, list[str]]:
        """The serialized model, or its file and its external-data files (blocking)."""
        if self.model is not None and self.model.data is not None:
            return self.model.data
        if self.model is not None:
            assert self.model.path is not None
            return self.model.path, self.model.external_data_files
        assert self.path is not None
        return self.path, check_model_file(self.path)[1]


class Pipeline:
    """The blocking half of a ``Core``: stores, sessions, import, export, remote tier."""

    def __init__(self, devices: DeviceRegistry, props: Mapping[str, Any]) -> None:
        self._devices = devices
        self._props = props  # the Core's own properties (read for CACHE_MAX_SIZE)
        self._io_pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="aioov-io")
        self._exporter = Exporter()
        self._stats = CacheStats()
        self._stats_lock = threading.Lock()
        self._stores: dict[str, CacheStore | None] = {}
        self._stores_lock = threading.Lock()
        self._device_locks = {family: threading.Lock() for family in devices.families()}
        self._warned: set[str] = set()
        self._verified: dict[Path, tuple[tuple[int, ...], ...] | None] = {}  # entries checksummed here

    @property
    def exporter(self) -> Exporter:
        return self._exporter

    def stats(self) -> CacheStats:
        with self._stats_lock:
            return CacheStats(**self._stats.as_dict())

    def shutdown(self) -> None:
        self._exporter.shutdown()
        self._io_pool.shutdown(wait=True)

    def _count(self, **increments: int) -> None:
        with self._stats_lock:
            for name, value in increments.items():
                setattr(self._stats, name, getattr(self._stats, name) + value)

    def _warn_once(self, topic: str, message: str, *args: object) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            logger.warning(message, *args)
        else:
            logger.debug(message, *args)

    def compile_job(
        self,
        source: Source,
        device_name: str,
        props: dict[str, Any],
        token: CancelToken,
        defer_if_busy: bool = False,
    ) -> Result:
        device, spec = self._devices.resolve(device_name)
        source = source.read()
        providers = device.providers(spec.index, props["ORT_PROVIDER_OPTIONS"])
        props = _apply_hints(props)
        store = self.store(props["CACHE_DIR"]) if device.caches(providers[0][1]) else None
        if store is None:
            if source.path is not None and source.model is None:
                check_model_file(source.path)
            session = self.create_session(source, device, providers, props, token)
            return Result(session, str(spec), props, False, None)

        try:
            stats, digest = self._identify(source, store)
        except OSError as exc:
            raise ModelReadError(f"cannot read {source.describe()}: {exc}") from exc
        key_inputs = _key_inputs(digest, device, spec, providers, props)
        key = cache_key(key_inputs)

        session = self._try_import(store, key, device, providers, props, token)
        if session is not None:
            self._count(hits=1)
            return Result(session, str(spec), props, True, key)

        lock = store.lock(key)
        try:
            if not lock.try_acquire():
                if defer_if_busy:
                    raise LockBusy(key)
                self._count(lock_waits=1)
                lock.acquire(props["CACHE_LOCK_TIMEOUT"], cancel=token.event)
        except Cancelled:
            raise
        except (LockTimeout, OSError) as exc:
            self._count(misses=1, lock_timeouts=1 if isinstance(exc, LockTimeout) else 0, errors=1)
            self._warn_once(f"lock:{store.root}", "aioov cache: %s; compiling without the cache", exc)
            session = self.create_session(source, device, providers, props, token)
            return Result(session, str(spec), props, False, key)

        held = Held(lock)
        handed_over = False
        try:
            # Another process may have published while we waited for its lock.
            session = self._try_import(store, key, device, providers, props, token, locked=True)
            if session is None and props["CACHE_REMOTE_URL"]:
                session = self._try_remote(held, store, key, device, providers, props, token)
            if session is not None:
                self._count(hits=1)
                return Result(session, str(spec), props, True, key)
            self._count(misses=1)
            manifest = _manifest(key_inputs, source, spec)
            assert device.blob is not None
            if props["CACHE_EXPORT"] is ExportMode.SYNC or not device.blob.background:
                session = self._compile_and_export(held, store, key, source, device, providers, props, token, manifest)
            else:
                session = self.create_session(source, device, providers, props, token)
                job = self._export_job(store, key, held, source, stats, device, providers, props, manifest)
                self._exporter.submit(job, on_drop=held.release)
                handed_over = True
            return Result(session, str(spec), props, False, key)
        finally:
            if not handed_over:
                held.release()

    def _try_remote(
        self,
        held: Held,
        store: CacheStore,
        key: str,
        device: Device,
        providers: ProviderList,
        props: Mapping[str, Any],
        token: CancelToken,
    ) -> ort.InferenceSession | None:
        """Second tier: fetch the entry from the shared bucket, or take the hosts' lock so that
        this host compiles it for all (``held.remote`` is then set, for the upload)."""
        url = props["CACHE_REMOTE_URL"]
        try:
            remote = remote_for(url)
            if self._fetch(remote, store, key, props):
                return self._try_import(store, key, device, providers, props, token, locked=True)
        except (RemoteError, ValueError, EntryError, OSError) as exc:
            self._remote_failed(url, exc)
            return None
        held.remote = remote  # whatever happens with the lock, what this host compiles is shared
        lock_url = props["CACHE_REMOTE_LOCK_URL"]
        if lock_url:
            try:
                rlock = RemoteLock(lock_url, key, props["CACHE_REMOTE_LOCK_TTL"])
                if rlock.acquire(props["CACHE_LOCK_TIMEOUT"], cancel=token.event):
                    held.remote_lock = rlock
                    # Another host may have uploaded while we waited for its lock.
                    if self._fetch(remote, store, key, props):
                        return self._try_import(store, key, device, providers, props, token, locked=True)
                elif token.cancelled:
                    raise Cancelled()
            except (RemoteError, EntryError, OSError) as exc:
                self._remote_failed(lock_url, exc)
        return None

    def _remote_failed(self, url: str, exc: Exception) -> None:
        self._count(errors=1)
        self._warn_once(f"remote:{url}", "aioov cache: remote %s unusable (%s); using the local cache only", url, exc)

    def _fetch(self, remote: RemoteTier, store: CacheStore, key: str, props: Mapping[str, Any]) -> bool:
        if remote.fetch(key, store, mac_key=_mac_key(props)):
            self._count(remote_hits=1)
            return True
        return False

    def _upload(self, held: Held, store: CacheStore, key: str) -> None:
        if held.remote is None:
            return
        try:
            if held.remote.upload(key, store.entry_path(key)):
                self._count(uploads=1)
        except (RemoteError, OSError) as exc:
            self._count(errors=1)
            self._warn_once(f"upload:{held.remote.url}", "aioov cache: upload to %s failed: %s",
                            held.remote.url, exc)

    def store(self, cache_dir: str | None) -> CacheStore | None:
        """The store for ``cache_dir``, created and tidied on first use; None if unusable."""
        if cache_dir is None:
            return None
        with self._stores_lock:
            if cache_dir not in self._stores:
                store = CacheStore(cache_dir)
                store.on_discard = lambda key, reason: self._count(corrupt=1)
                usable: CacheStore | None = store
                try:
                    store.ensure()
                    store.clean_tmp()
                except OSError as exc:
                    self._count(errors=1)
                    self._warn_once(f"dir:{cache_dir}", "aioov cache: cannot use %s (%s); "
                                    "compiling without the cache", cache_dir, exc)
                    # A read-only cache (e.g. baked into an image) can still serve hits.
                    usable = store if store.base.is_dir() else None
                self._stores[cache_dir] = usable
            return self._stores[cache_dir]

    def _identify(self, source: Source, store: CacheStore) -> tuple[list[FileStat] | None, str]:
        """(file stats, content digest) of the model, from the stat index when it can."""
        if source.model is not None:
            if source.model.path is None:
                return None, source.model.digest()
            stats = source.model.file_stats()
            digest = source.model.digest()
        else:
            assert source.path is not None
            hit = store.index.lookup(source.path)
            if hit is not None:
                digest, stats = hit  # just compared with the files on disk
                return stats, digest
            _, external = check_model_file(source.path)
            stats = [FileStat.of(p) for p in (source.path, *external)]
            digest = digest_files([source.path, *external])
            if [FileStat.of(s.path) for s in stats] != stats:
                raise ModelReadError(f"{source.path} changed while it was being hashed")
        try:
            store.index.store(stats, digest)
        except OSError:
            pass
        return stats, digest

    # -- sessions -------------------------------------------------------------------
    def _session_options(self, props: Mapping[str, Any]) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if props["ORT_SHARED_THREAD_POOL"]:
            _ortenv.enable_shared_pool(props["INFERENCE_NUM_THREADS"])
        _ortenv.apply(options, props["INFERENCE_NUM_THREADS"])
        for name, value in props["ORT_SESSION_CONFIG"].items():
            options.add_session_config_entry(name, value)
        options.graph_optimization_level = _OPT_LEVELS[props["ORT_GRAPH_OPTIMIZATION_LEVEL"]]
        return options

    def _new_session(
        self,
        model: str | bytes,
        options: ort.SessionOptions,
        device: Device,
        providers: ProviderList,
        token: CancelToken | None,
    ) -> ort.InferenceSession:
        if token is not None:
            token.register(options)
        names = [name for name, _ in providers]
        provider_options = [opts for _, opts in providers]
        if device.serialize_compiles:
            with self._device_locks[device.family]:
                return ort.InferenceSession(model, options, providers=names, provider_options=provider_options)
        return ort.InferenceSession(model, options, providers=names, provider_options=provider_options)

    def create_session(
        self,
        source: Source,
        device: Device,
        providers: ProviderList,
        props: Mapping[str, Any],
        token: CancelToken | None,
        export: tuple[Path, str] | None = None,
    ) -> ort.InferenceSession:
        """A session compiled from the source; with ``export=(tmp, key)`` it also writes the blob."""
        options = self._session_options(props)
        if export is not None:
            assert device.blob is not None
            providers = device.blob.configure_export(options, providers, export[0], export[1], props)
        try:
            session = self._new_session(source.ort_input, options, device, providers, token)
        except ORT_ERRORS as exc:
            if token is not None and token.cancelled:
                raise Cancelled() from exc
            raise_compile_error(exc, source.describe())
        self._count(compiles=1)
        return session

    def _try_import(
        self,
        store: CacheStore,
        key: str,
        device: Device,
        providers: ProviderList,
        props: Mapping[str, Any],
        token: CancelToken | None,
        *,
        locked: bool = False,
    ) -> ort.InferenceSession | None:
        """Load the entry for ``key`` if present and intact; None means compile."""
        verify = props["CACHE_VERIFY"]
        if not os.path.lexists(store.entry_path(key)):
            return None  # the common miss: no lock file is created, no manifest read
        reader = store.lock(key)
        if not locked:
            try:
                # Shared: prune skips entries being read. Held only until the session exists.
                reader.acquire(min(5.0, props["CACHE_LOCK_TIMEOUT"]), shared=True)
            except (LockTimeout, OSError):
                pass  # read-only dir, or a long prune: read without the lock
        try:
            entry = store.lookup(key, check_sizes=verify is not CacheVerify.OFF)
        except OSError:
            entry = None
        if entry is None:
            reader.release()
            return None
        try:
            return self._load_entry(store, entry, device, providers, props, token)
        finally:
            reader.release()

    def _load_entry(
        self,
        store: CacheStore,
        entry: Entry,
        device: Device,
        providers: ProviderList,
        props: Mapping[str, Any],
        token: CancelToken | None,
    ) -> ort.InferenceSession | None:
        assert device.blob is not None
        graph = device.blob.model_file
        check: concurrent.futures.Future[str | None] | None = None
        rest = [name for name in entry.files if name != graph]
        mac_key = auth.derive_key(props["CACHE_HMAC_KEY"]) if props["CACHE_HMAC_KEY"] else None
        if mac_key is not None:
            # Authenticated entries: keyed blake3 MACs instead of checksums, whatever CACHE_VERIFY.
            problem = auth.check(entry.manifest, entry.path, mac_key, [graph])
            if problem:
                self._discard(store, entry.key, problem)
                return None
            check = self._io_pool.submit(auth.check, entry.manifest, entry.path, mac_key, rest)
        elif props["CACHE_VERIFY"] is CacheVerify.FULL and (
            entry.path not in self._verified or self._verified[entry.path] != _identity(entry)
        ):
            # Checksum the weights while ONNX Runtime maps them: flipped bytes would not make
            # ORT fail, they would silently change the outputs. The small graph file is checked
            # first, so ORT never parses a corrupt one. Once per entry and process: later loads
            # only check that the files are the same ones (size, mtime, inode).
            problem = store.verify(entry, [graph])
            if problem:
                self._discard(store, entry.key, problem)
                return None
            check = self._io_pool.submit(store.verify, entry, rest)
        try:
            session, problem = self._open_blob(entry.path, device, providers, props, token,
                                               lambda: _scratch(store, entry.key))
        except ORT_ERRORS as exc:
            if check is not None:
                check.result()
            if token is not None and token.cancelled:
                raise Cancelled() from exc
            self._discard(store, entry.key, f"onnxruntime could not load it: {exc}")
            return None
        except OSError as exc:  # copying into the scratch directory: the entry is fine, the disk is not
            if check is not None:
                check.result()
            self._cache_write_failed(store, exc)
            return None
        if check is not None:
            problem = check.result() or problem
        if problem:
            del session
            self._discard(store, entry.key, problem)
            return None
        if check is not None:
            self._verified[entry.path] = _identity(entry)
        store.touch(entry.key)
        return session

    def _open_blob(
        self,
        folder: Path,
        device: Device,
        providers: ProviderList,
        props: Mapping[str, Any],
        token: CancelToken | None,
        make_scratch: Callable[[], Path],
    ) -> tuple[ort.InferenceSession, str | None]:
        """A session on the blob in ``folder`` (an entry, or an ``export_model`` directory), and
        why the blob was not really used (None when it was). Formats that write into their
        cache even on a hit get a scratch directory from ``make_scratch``, removed after."""
        assert device.blob is not None
        options = self._session_options(props)
        scratch = make_scratch() if device.blob.import_scratch else None
        try:
            providers = device.blob.configure_import(options, providers, folder, scratch)
            session = self._new_session(str(folder / device.blob.model_file), options, device, providers, token)
            return session, device.blob.after_import(folder, scratch)
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)

    def _discard(self, store: CacheStore, key: str, reason: str) -> None:
        store.quarantine(key, reason)  # counted by the store's on_discard hook

    # -- export -----------------------------------------------------------------------
    def _compile_and_export(
        self,
        held: Held,
        store: CacheStore,
        key: str,
        source: Source,
        device: Device,
        providers: ProviderList,
        props: Mapping[str, Any],
        token: CancelToken,
        manifest: dict[str, Any],
    ) -> ort.InferenceSession:
        """CACHE_EXPORT=SYNC: one session that also saves the blob, published before returning."""
        try:
            tmp = store.new_tmp(key)
        except OSError as exc:
            self._cache_write_failed(store, exc)
            return self.create_session(source, device, providers, props, token)
        try:
            try:
                _stage_source(source, device, tmp)
            except OSError as exc:
                self._cache_write_failed(store, exc)
                return self.create_session(source, device, providers, props, token)
            except BlobError as exc:
                self._uncacheable(source, exc)
                return self.create_session(source, device, providers, props, token)
            session = self.create_session(source, device, providers, props, token, export=(tmp, key))
            inputs = [i.name for i in session.get_inputs()]
            self._publish(held, store, key, tmp, manifest, device, inputs, props, source)
            return session
        finally:
            store.discard(tmp)

    def _publish(
        self,
        held: Held,
        store: CacheStore,
        key: str,
        tmp: Path,
        manifest: dict[str, Any],
        device: Device,
        input_names: list[str],
        props: Mapping[str, Any],
        source: Source,
        abort: Callable[[], bool] | None = None,
    ) -> None:
        """Check the blob written in ``tmp``, publish it, share it. Failing only means "not cached"."""
        assert device.blob is not None
        try:
            device.blob.finalize(tmp, input_names)
            if store.publish(key, tmp, manifest, abort=abort, mac_key=_mac_key(props)):
                self._count(exports=1)
                self._upload(held, store, key)
                self._prune_if_needed(store)
        except OSError as exc:
            self._cache_write_failed(store, exc)
        except BlobError as exc:
            self._uncacheable(source, exc)

    def _export_job(
        self,
        store: CacheStore,
        key: str,
        held: Held,
        source: Source,
        stats: list[FileStat] | None,
        device: Device,
        providers: ProviderList,
        props: Mapping[str, Any],
        manifest: dict[str, Any],
    ) -> Callable[[CancelToken], None]:
        def export(token: CancelToken) -> None:
            tmp: Path | None = None
            try:
                tmp = store.new_tmp(key)
                _stage_source(source, device, tmp)
                assert device.blob is not None
                options = self._session_options(props)
                if options.use_per_session_threads:
                    options.intra_op_num_threads = 1
                    options.inter_op_num_threads = 1
                writing = device.blob.configure_export(options, providers, tmp, key, props)
                session = self._new_session(source.ort_input, options, device, writing, token)
                inputs = [i.name for i in session.get_inputs()]
                del session
                if stats is not None and [FileStat.of(s.path) for s in stats] != stats:
                    logger.warning("aioov cache: %s changed during export; not cached", source.describe())
                    return
                self._publish(held, store, key, tmp, manifest, device, inputs, props, source,
                              abort=lambda: token.cancelled)
            except OSError as exc:
                self._cache_write_failed(store, exc)
            except BlobError as exc:
                self._uncacheable(source, exc)
            except ORT_ERRORS as exc:
                if not token.cancelled:
                    self._count(errors=1)
                    logger.warning("aioov cache: exporting %s failed: %s", source.describe(), exc)
            except Exception:  # an export must never take the process down
                self._count(errors=1)
                logger.exception("aioov cache: exporting %s failed", source.describe())
            finally:
                if tmp is not None:
                    store.discard(tmp)
                held.release()

        return export

    def _uncacheable(self, source: Source, exc: BlobError) -> None:
        self._count(errors=1)
        logger.warning("aioov cache: %s cannot be cached: %s", source.describe(), exc)

    def _cache_write_failed(self, store: CacheStore, exc: OSError) -> None:
        self._count(errors=1)
        self._warn_once(f"write:{store.root}", "aioov cache: cannot write to %s (%s); "
                        "the model is compiled but not cached", store.root, exc)

    def _prune_if_needed(self, store: CacheStore) -> None:
        limit = self._props.get("CACHE_MAX_SIZE") or 0
        if limit:
            removed = store.prune(max_size=limit)
            if removed:
                logger.info("aioov cache: pruned %d entries to stay under %d bytes", len(removed), limit)

    def export_to_dir(self, source: Source, device_name: str, props: dict[str, Any], dest: Path) -> Path:
        device, spec = self._devices.resolve(device_name)
        providers = device.providers(spec.index, props["ORT_PROVIDER_OPTIONS"])
        if device.blob is None or not device.caches(providers[0][1]):
            raise CacheError(f"device {spec} cannot export a compiled model")
        if os.path.lexists(dest):
            raise CacheError(f"{dest} already exists")
        dest = dest.absolute()
        source = source.read()
        digest = (source.model or read_any(source.path)).digest()
        key_inputs = _key_inputs(digest, device, spec, providers, props)
        key = cache_key(key_inputs)
        store = CacheStore(dest.parent / f".{dest.name}.aioov-export")
        try:
            store.ensure()
            tmp = store.new_tmp(key)
            _stage_source(source, device, tmp)
            session = self.create_session(source, device, providers, props, None, export=(tmp, key))
            device.blob.finalize(tmp, [i.name for i in session.get_inputs()])
            store.publish(key, tmp, _manifest(key_inputs, source, spec))
            os.rename(store.entry_path(key), dest)
        except (OSError, BlobError) as exc:
            raise CacheError(f"cannot write {dest}: {exc}") from exc
        finally:
            shutil.rmtree(store.root, ignore_errors=True)
        return dest

    def import_dir(self, path: Path, device_name: str, props: dict[str, Any]) -> Result:
        device, spec = self._devices.resolve(device_name)
        providers = device.providers(spec.index, props["ORT_PROVIDER_OPTIONS"])
        props = _apply_hints(props)
        if device.blob is None or not device.caches(providers[0][1]):
            raise CacheError(f"device {spec} cannot import compiled models")
        store = CacheStore(path.parent)
        try:
            entry = store.read_blob(path)
        except EntryError as exc:
            raise CacheError(f"{path} is not an aioov blob: {exc}") from exc
        inputs = entry.manifest.get("key_inputs")
        model = inputs.get("model") if isinstance(inputs, dict) else None
        want = _key_inputs(model, device, spec, providers, props) if isinstance(model, str) else None
        if want is None or inputs != json.loads(json.dumps(want)):
            raise CacheError(f"{path} was compiled for another device, configuration or machine")
        problem = store.verify(entry)
        if problem:
            raise CacheError(f"{path} is damaged: {problem}")
        try:
            session, problem = self._open_blob(path, device, providers, props, None,
                                               lambda: Path(tempfile.mkdtemp(prefix="aioov-import-")))
        except ORT_ERRORS as exc:
            raise CacheError(f"onnxruntime cannot load {path}: {exc}") from exc
        except OSError as exc:
            raise CacheError(f"cannot import {path}: {exc}") from exc
        if problem:
            raise CacheError(f"{path} could not be imported: {problem}")
        return Result(session, str(spec), props, True, entry.key)


def _scratch(store: CacheStore, key: str) -> Path:
    """A directory to write in while importing: in the cache (same filesystem, swept after a
    crash like any temporary), or the system's where the cache is read-only."""
    try:
        return store.new_tmp(key)
    except OSError:
        return Path(tempfile.mkdtemp(prefix="aioov-import-"))


def _stage_source(source: Source, device: Device, tmp: Path) -> None:
    """Put a copy of the source in an entry being written, where its format keeps one."""
    assert device.blob is not None
    if device.blob.keeps_source:
        device.blob.stage_source(tmp, source.files())


def _identity(entry: Entry) -> tuple[tuple[int, ...], ...] | None:
    """Which files an entry is made of: any rewrite changes the mtime (and usually more)."""
    try:
        stats = [os.stat(entry.file(name)) for name in sorted(entry.files)]
    except OSError:
        return None
    return tuple((st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev) for st in stats)


def _mac_key(props: Mapping[str, Any]) -> bytes | None:
    secret = props.get("CACHE_HMAC_KEY")
    return auth.derive_key(secret) if secret else None


def _apply_hints(props: dict[str, Any]) -> dict[str, Any]:
    """PERFORMANCE_HINT=THROUGHPUT: many single-threaded requests in parallel."""
    props = dict(props)
    if props["PERFORMANCE_HINT"] is PerformanceHint.THROUGHPUT:
        cores = os.cpu_count() or 1
        if not props["INFERENCE_NUM_THREADS"]:
            props["INFERENCE_NUM_THREADS"] = 1
        if props["NUM_STREAMS"] == 1:
            props["NUM_STREAMS"] = cores
    return props


def _key_inputs(
    digest: str, device: Device, spec: DeviceSpec, providers: ProviderList, props: Mapping[str, Any]
) -> dict[str, Any]:
    """Everything that shapes the compiled blob, in readable form (also saved in the manifest)."""
    return {
        "model": digest,
        "device": device.family,
        "blob": device.blob.kind if device.blob is not None else None,
        "providers": [[name, dict(sorted(opts.items()))] for name, opts in providers],
        "hardware": device.fingerprint(spec.index),
        "onnxruntime": ort.__version__,
        **{name: public_value(props[name]) for name, p in PROPERTIES.items() if p.in_key},
    }


def _manifest(key_inputs: dict[str, Any], source: Source, spec: DeviceSpec) -> dict[str, Any]:
    return {
        "created": time.time(),
        "aioov": __version__,
        "onnxruntime": ort.__version__,
        "device": str(spec),
        "source": {"path": source.path},
        "key_inputs": key_inputs,
    }
