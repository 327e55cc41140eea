"""A second cache tier shared by many hosts: an S3-compatible bucket, plus a Redis lock.

Lookup order: local entry → remote entry (downloaded into the local cache, verified, then
published there with the same atomic rename) → compile, then upload in the background.

Remote layout: each upload writes its files under a prefix of its own,
``s3://BUCKET/PREFIX/v1/<key>/<upload-id>/<file>`` (``manifest.json`` last), and only then
names that upload in ``v1/<key>/HEAD``, written once (``If-None-Match: *``). Objects are never
overwritten, so an entry is never a mix of two uploads — which a single ``v1/<key>/<file>``
set would be when two lock-less hosts upload at once, and would stay for good if one of them
died between its files and its manifest. A host that loses the race for HEAD deletes its
upload; one that dies before writing HEAD leaves objects no HEAD names (for a lifecycle rule
to expire). A store that ignores ``If-None-Match`` lets the last HEAD win: still a complete
upload. Readers verify every file against the manifest anyway.

A remote entry a host rejected (a checksum, MAC or size that does not match, a manifest that
is not one, a file missing) is *repaired* by that host's upload once it has compiled the model:
HEAD is replaced only while it is still the one found bad (``If-Match`` its ETag; a ``file://``
tier compares the manifest's digest), then the bad upload is deleted. Without that, every host
would download, reject and recompile the model for good. An entry signed with a MAC key this
host does not hold is not "bad" (a key rotation): it is left alone, or hosts would take turns
replacing each other's entries. A host given a rotation's keys (``["new", "old"]``) uses an entry
signed with any of them, as its local cache does.

Bounds (#41): a remote manifest is read up to the local cap (1 MiB) and no further; a file
download stops at the first byte past the size its manifest records (at once when the response
says its length); every S3 operation has a total deadline, ``DEADLINE_BASE`` seconds plus
its bytes at ``MIN_RATE`` — per-read socket timeouts alone let a server that sends a byte
every few seconds hold a compile for ever (``Deadline``). A remote or lock service that failed
is left alone for ``BREAKER_COOLDOWN`` seconds (``Breaker``, per URL and process): a silent
endpoint costs one deadline a minute, not one per model.

boto3 was chosen over s3fs/aiobotocore: aioov's cache work already runs in worker threads,
so a synchronous client is the simple fit, and boto3 reads credentials and endpoints the
usual AWS ways (environment, config files, ``AWS_ENDPOINT_URL``) with no code of ours.

The distributed lock is redis-py's lock (``SET NX PX`` with a token): its TTL is the lease,
so a host that dies holding it blocks the others for at most ``CACHE_REMOTE_LOCK_TTL``
seconds. A compile that outlives the TTL loses exclusivity, never correctness: the worst
case is two hosts compiling one model. Without a lock URL, hosts may compile in parallel,
and the first manifest uploaded wins.

Every remote failure (unreachable, denied, missing bucket, too slow) is a warning and a
fall-back to the local path: the remote tier never makes a compile fail.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Protocol
from urllib.parse import unquote, urlparse

from .._errors import EntryError, RemoteError
from . import auth
from .fsutil import load_json, nofollow_opener, read_regular, rmtree
from .layout import MANIFEST
from .store import _MAX_MANIFEST_BYTES as MAX_MANIFEST_BYTES
from .store import CacheStore

__all__ = (
    "BREAKER_COOLDOWN",
    "DEADLINE_BASE",
    "MIN_RATE",
    "Breaker",
    "Deadline",
    "DirectoryRemote",
    "RemoteEntryError",
    "RemoteLock",
    "RemoteStore",
    "RemoteTier",
    "breaker_for",
    "remote_for",
    "transfer_deadline",
)

logger = logging.getLogger("aioov.cache")

#: ``CACHE_HMAC_KEY``'s key, or a rotation's keys (the first signs, any verifies)
MacKeys = bytes | tuple[bytes, ...] | None
#: told a remote entry's manifest, and the bytes of its files, before they are downloaded
Listed = Callable[[dict[str, Any], int], None]

#: seconds an S3 operation may take besides moving its files' bytes: connecting, reading HEAD
#: and the manifest, writing them
DEADLINE_BASE = 10.0
#: bytes per second a transfer must average at least: a fetch or upload of N bytes gets
#: ``DEADLINE_BASE + N / MIN_RATE`` seconds in all (4 MiB/s: 1 GB in about 4 minutes)
MIN_RATE = 4 << 20
#: seconds a remote tier (or lock service) that failed is left alone before one compile tries
#: it again
BREAKER_COOLDOWN = 60.0
_HEAD_LIMIT = 1024  # a HEAD object holds an upload id
_CHUNK = 1 << 20


def transfer_deadline(size: int) -> float:
    """Seconds a fetch or upload of ``size`` bytes may take in all."""
    return DEADLINE_BASE + size / MIN_RATE


class RemoteEntryError(RemoteError):
    """The remote answered, but its entry for a key is unusable (damaged, truncated, too large,
    not a manifest): the endpoint is fine, the entry is not.

    ``bad`` names the entry as it stood (S3: its HEAD's ETag; ``file://``: its manifest's
    digest) so that this host's upload may replace exactly that entry; ``repair`` is False
    where it must not (signed under a MAC key this host does not hold)."""

    def __init__(self, message: str, bad: str | None = None) -> None:
        super().__init__(message)
        self.bad = bad
        self.repair = True


class RemoteTier(Protocol):
    """What the Core needs of a second cache tier. ``s3://`` and ``file://`` implement it."""

    url: str

    def fetch(self, key: str, store: CacheStore, mac_key: MacKeys = None, *, bad: str | None = None,
              listed: Listed | None = None) -> bool:
        """Download entry ``key`` into ``store`` (verified, atomically published); False if absent,
        or when it is still the entry ``bad`` (one this host rejected). ``RemoteEntryError``
        when the entry is unusable, ``RemoteError`` when the tier is. ``mac_key``: the entry
        must be signed with it, or with one of a rotation's keys. ``listed`` hears the entry's
        manifest and its files' bytes before they are downloaded."""
        ...

    def upload(self, key: str, entry: Path, *, replace: str | None = None) -> bool:
        """Share a published local entry, manifest last; False if the tier has one already,
        unless it is still the entry ``replace`` (one this host rejected), which it replaces."""
        ...


HEAD = "HEAD"
_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")


def _listed(key: str, manifest: Any) -> dict[str, int]:
    """The files a remote manifest lists, with their sizes; ``RemoteEntryError`` for names that
    could leave the entry and sizes that are not sizes."""
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not files:
        raise RemoteEntryError(f"remote manifest of {key[:16]} lists no files")
    sizes = {}
    for name, record in files.items():
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", "..", MANIFEST):
            raise RemoteEntryError(f"remote manifest of {key[:16]} has a bad file name {name!r}")
        size = record.get("size") if isinstance(record, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise RemoteEntryError(f"remote manifest of {key[:16]} has no size for {name!r}")
        sizes[name] = size
    return sizes


def _foreign(manifest: Any, mac_key: MacKeys) -> bool:
    """Signed, but under none of this host's keys: another key's entry during a rotation."""
    keys = auth.as_keys(mac_key)
    return (bool(keys) and isinstance(manifest, dict) and auth.signed(manifest)
            and auth.signer(manifest, keys) is None)


def _parse_manifest(key: str, raw: bytes) -> dict[str, Any]:
    if len(raw) > MAX_MANIFEST_BYTES:
        raise RemoteEntryError(f"remote manifest of {key[:16]} is larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        manifest = load_json(raw)
    except ValueError as exc:
        raise RemoteEntryError(f"remote manifest of {key[:16]} is not JSON") from exc
    if not isinstance(manifest, dict):
        raise RemoteEntryError(f"remote manifest of {key[:16]} is not an object")
    return manifest


def _local_manifest(key: str, entry: Path) -> tuple[bytes, dict[str, int]]:
    """A published local entry's manifest and its files' sizes; ``OSError`` when it is not
    readable as one (pruned meanwhile, damaged): a problem of this host's, not the tier's."""
    raw = read_regular(entry / MANIFEST, MAX_MANIFEST_BYTES)
    try:
        return raw, _listed(key, _parse_manifest(key, raw))
    except RemoteEntryError as exc:
        raise OSError(f"local entry {key[:16]}: {exc}") from None


def _too_large(name: str, size: int) -> RemoteEntryError:
    return RemoteEntryError(f"{name} is larger than the {size} bytes its manifest records")


# -- a circuit breaker per remote URL --------------------------------------------------------
class Breaker:
    """One remote tier's (or lock service's) health in this process. After a failure it is
    *open*: skipped for ``BREAKER_COOLDOWN`` seconds; then one caller tries it again (the others
    keep skipping it meanwhile), and a success closes it. Without it a silent endpoint cost
    every cold model its full timeouts, although the warning said it was unusable."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._until = 0.0
        self._failed = False

    def allow(self) -> bool:
        """Whether to use the remote now; after a failure, True once per cooldown (the retry)."""
        with self._lock:
            now = time.monotonic()
            if now < self._until:
                return False
            if self._failed:  # this caller tries again; the others wait for its outcome
                self._until = now + BREAKER_COOLDOWN
            return True

    @property
    def open(self) -> bool:
        with self._lock:
            return time.monotonic() < self._until

    def succeeded(self) -> None:
        with self._lock:
            self._failed, self._until = False, 0.0

    def failed(self) -> None:
        with self._lock:
            self._failed, self._until = True, time.monotonic() + BREAKER_COOLDOWN


_BREAKERS: dict[str, Breaker] = {}


def breaker_for(url: str) -> Breaker:
    """The breaker of a remote or lock URL (one per URL and process)."""
    with _REMOTES_LOCK:
        found = _BREAKERS.get(url)
        if found is None:
            found = _BREAKERS[url] = Breaker()
        return found


# -- total deadlines for S3 operations ---------------------------------------------------------
_CURRENT = threading.local()


class Deadline:
    """A total time limit for one remote operation, however its server answers.

    Socket timeouts bound each read, not an operation: a server that sends a byte every few
    seconds never trips them, and a thread blocked in ``recv`` cannot look at a clock. So a
    watchdog thread shuts the operation's sockets down when its time is up (``shutdown`` wakes
    a blocked ``recv``; ``close`` from another thread would not), and the connections it may
    still open fail at once. Its connections are those botocore's pools hand out in this thread
    while the deadline is current (``_watched_pool``); ones given back to a pool are forgotten,
    as another thread may take them next. Raises ``RemoteError`` when the time ran out.
    """

    def __init__(self, seconds: float, what: str) -> None:
        self.what = what
        self.seconds = seconds
        self.expired = False
        self._at = time.monotonic() + seconds
        self._lock = threading.Lock()
        self._conns: list[Any] = []
        self._done = threading.Event()
        self._outer: Deadline | None = None

    def extend(self, seconds: float) -> None:
        """More time, once the operation knows how many bytes it moves."""
        with self._lock:
            self._at += seconds
            self.seconds += seconds

    def check(self) -> None:
        """``TimeoutError`` when the time is up (between reads, and before each request)."""
        if not self.expired and time.monotonic() >= self._at:
            self.expired = True
        if self.expired:
            raise TimeoutError(f"{self.what}: deadline passed")

    def watch(self, conn: Any) -> None:
        with self._lock:
            self._conns.append(conn)
        if self.expired:
            _shut(conn)

    def forget(self, conn: Any) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._conns.remove(conn)

    def __enter__(self) -> Deadline:
        self._outer = getattr(_CURRENT, "deadline", None)
        _CURRENT.deadline = self
        try:
            threading.Thread(target=self._watchdog, name="aioov-remote-deadline", daemon=True).start()
        except RuntimeError:  # a thread limit: checked between reads only (``check``)
            pass
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._done.set()
        _CURRENT.deadline = self._outer
        if self.expired and (exc is None or isinstance(exc, Exception)):
            raise RemoteError(f"{self.what}: not done within {self.seconds:.0f} s (the remote is too slow)") from exc

    def _watchdog(self) -> None:
        while True:
            with self._lock:
                left = self._at - time.monotonic()
            if left <= 0:
                break
            if self._done.wait(left):
                return
        self.expired = True
        while True:  # again and again: a connection may finish connecting after the first round
            with self._lock:
                conns = list(self._conns)
            for conn in conns:
                _shut(conn)
            if self._done.wait(0.1):
                return


def _current() -> Deadline | None:
    return getattr(_CURRENT, "deadline", None)


def _shut(conn: Any) -> None:
    sock = getattr(conn, "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError, ValueError):
            # socket.socket's own shutdown, also for an SSLSocket (whose override would drop
            # its SSL object under the reading thread's feet)
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


@functools.cache
def _watched_pool(base: type) -> type:
    """``base`` (a urllib3 connection pool class), reporting the connections it hands out in a
    thread to that thread's ``Deadline``."""

    class WatchedPool(base):  # type: ignore[misc]
        def _get_conn(self, timeout: float | None = None) -> Any:
            deadline = _current()
            if deadline is not None:
                deadline.check()
            conn = super()._get_conn(timeout)
            if deadline is not None:
                deadline.watch(conn)
            return conn

        def _put_conn(self, conn: Any) -> None:
            deadline = _current()
            if deadline is not None and conn is not None:
                deadline.forget(conn)
            super()._put_conn(conn)

    WatchedPool.__name__ = WatchedPool.__qualname__ = f"Watched{base.__name__}"
    return WatchedPool


def _watch_pools(client: Any) -> None:
    """Make a boto3 client's connection pools report to the current ``Deadline``. botocore has
    no public hook for it; where its internals differ, deadlines are only checked between
    reads and before each request (the per-read socket timeouts still apply)."""
    try:
        classes = client._endpoint.http_session._pool_classes_by_scheme
        for scheme, pool in list(classes.items()):
            classes[scheme] = _watched_pool(pool)
    except (AttributeError, TypeError) as exc:  # pragma: no cover - another botocore
        logger.debug("aioov cache: cannot watch botocore's connections (%s); deadlines between reads only", exc)


# -- the tiers -----------------------------------------------------------------------------
def _digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def _copy_bounded(source: Path, target: Path, size: int) -> None:
    """Copy a shared entry's file, refusing it (``RemoteEntryError``) when it is not a plain
    file of the size its manifest records, or grows past it while copied."""
    try:
        handle = open(source, "rb", opener=nofollow_opener)
    except FileNotFoundError:
        raise RemoteEntryError(f"{source.name} is missing") from None
    except OSError as exc:
        if exc.errno in (None, errno.ELOOP, errno.ENOTDIR):  # a symlink, FIFO, directory...
            raise RemoteEntryError(f"{source.name} is not a plain file") from None
        raise RemoteError(f"reading {source}: {exc}") from exc
    with handle:
        actual = os.fstat(handle.fileno()).st_size
        if actual != size:
            raise RemoteEntryError(f"{source.name} is {actual} bytes; its manifest records {size}")
        copied = 0
        with open(target, "xb") as out:
            while chunk := handle.read(min(_CHUNK, size + 1 - copied)):
                copied += len(chunk)
                if copied > size:
                    raise _too_large(source.name, size)
                out.write(chunk)


class DirectoryRemote:
    """Entries in a directory shared by hosts (``file:///mnt/shared/aioov``), e.g. over NFS.

    Unlike using that directory as ``CACHE_DIR`` on every host, each host keeps its own local
    cache (and its flock locks, which NFS may not honour) and copies entries across.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.root = Path(unquote(urlparse(url).path)) / "v1"

    def _token(self, entry: Path) -> str:
        """What names the shared entry as it stands: its manifest's digest."""
        try:
            raw = read_regular(entry / MANIFEST, MAX_MANIFEST_BYTES)
        except OSError:
            raw = b""
        return _digest(raw)

    def fetch(self, key: str, store: CacheStore, mac_key: MacKeys = None, *, bad: str | None = None,
              listed: Listed | None = None) -> bool:
        source = self.root / key
        try:
            raw = read_regular(source / MANIFEST, MAX_MANIFEST_BYTES)
        except FileNotFoundError:
            if not os.path.lexists(source):
                return False
            raw = b""  # a directory without its manifest: never published whole, or damaged
        except OSError as exc:
            if exc.errno not in (None, errno.ELOOP, errno.ENOTDIR):
                raise RemoteError(f"remote manifest of {key[:16]}: {exc}") from exc
            raw = b""  # a symlink or FIFO where the manifest belongs
        token = _digest(raw)
        if token == bad:
            return False
        manifest: Any = None
        tmp: Path | None = None
        try:
            if not raw:
                raise RemoteEntryError(f"remote entry {key[:16]} has no readable manifest")
            manifest = _parse_manifest(key, raw)
            sizes = _listed(key, manifest)
            if listed is not None:
                listed(manifest, sum(sizes.values()))
            tmp = store.new_tmp(key)
            for name, size in sizes.items():
                _copy_bounded(source / name, tmp / name, size)
            try:
                return store.adopt(key, tmp, manifest, mac_key=mac_key)
            except EntryError as exc:
                raise RemoteEntryError(str(exc)) from exc
        except RemoteEntryError as exc:
            exc.bad, exc.repair = token, not _foreign(manifest, mac_key)
            raise
        finally:
            if tmp is not None:
                store.discard(tmp)

    def upload(self, key: str, entry: Path, *, replace: str | None = None) -> bool:
        final = self.root / key
        if os.path.lexists(final) and (replace is None or self._token(final) != replace):
            return False
        _, sizes = _local_manifest(key, entry)
        unique = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
        tmp = self.root / f".{key}.{unique}.incomplete"
        aside: Path | None = None
        try:
            tmp.mkdir(parents=True)
            for name in (*sizes, MANIFEST):  # the manifest last
                shutil.copyfile(entry / name, tmp / name)
            if os.path.lexists(final):  # the entry this host rejected: replace it
                if self._token(final) != replace:
                    return False  # replaced by another host meanwhile
                aside = self.root / f".{key}.{unique}.replaced"
                with contextlib.suppress(FileNotFoundError):  # moved by another repairer
                    os.rename(final, aside)
            os.rename(tmp, final)  # atomic: other hosts see all of it or none
            return True
        except OSError as exc:
            if os.path.lexists(final):
                return False
            raise RemoteError(f"uploading {key[:16]}: {exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            if aside is not None:
                rmtree(aside)


class _Head(NamedTuple):
    upload: str | None  # None: HEAD names no upload
    etag: str


class RemoteStore:
    """Entries in an S3-compatible bucket (``s3://bucket/prefix``)."""

    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"CACHE_REMOTE_URL must look like s3://bucket/prefix, got {url!r}")
        self.url = url
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        try:
            import boto3
            from boto3.s3.transfer import TransferConfig
            from botocore.config import Config
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RemoteError("the remote cache needs boto3: pip install 'aioov[remote]'") from exc
        # HEADs, manifests and deletes are small: a server that takes seconds to answer one
        # is failing. File bodies get longer between two reads. Both under a Deadline.
        self._client = boto3.client("s3", config=Config(
            retries={"total_max_attempts": 2}, connect_timeout=2, read_timeout=5))
        self._files = boto3.client("s3", config=Config(
            retries={"total_max_attempts": 2}, connect_timeout=3, read_timeout=20))
        # multipart uploads in the calling thread: the one its Deadline watches
        self._transfer = TransferConfig(use_threads=False)
        _watch_pools(self._client)
        _watch_pools(self._files)

    def _name(self, key: str, *parts: str) -> str:
        return "/".join(part for part in (self.prefix, "v1", key, *parts) if part)

    def _get(self, name: str, limit: int) -> tuple[bytes | None, str] | None:
        """An object's bytes (None when larger than ``limit``: never read) and its ETag; None
        when it does not exist."""
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=name)
        except Exception as exc:
            if _missing(exc):
                return None
            raise RemoteError(str(exc)) from exc
        body = response["Body"]
        etag = str(response.get("ETag", ""))
        try:
            length = response.get("ContentLength")
            if isinstance(length, int) and length > limit:
                return None, etag
            data = body.read(limit + 1)
        except Exception as exc:
            raise RemoteError(str(exc)) from exc
        finally:
            with contextlib.suppress(Exception):
                body.close()
        return (data if len(data) <= limit else None), etag

    def _head(self, key: str) -> _Head | None:
        """What ``v1/<key>/HEAD`` names, and its ETag; None when there is no entry."""
        found = self._get(self._name(key, HEAD), _HEAD_LIMIT)
        if found is None:
            return None
        raw, etag = found
        upload = (raw or b"").decode("ascii", "replace").strip()
        return _Head(upload if _UPLOAD_ID.fullmatch(upload) else None, etag)

    def head(self, key: str) -> str | None:
        """The upload the remote entry ``key`` is made of, or None when there is none."""
        with Deadline(DEADLINE_BASE, f"reading HEAD of {key[:16]}"):
            head = self._head(key)
        if head is None:
            return None
        if head.upload is None:
            raise RemoteEntryError(f"remote HEAD of {key[:16]} names no upload", head.etag)
        return head.upload

    def _manifest(self, key: str, upload: str) -> dict[str, Any]:
        found = self._get(self._name(key, upload, MANIFEST), MAX_MANIFEST_BYTES)
        if found is None:
            raise RemoteEntryError(f"remote upload {upload} of {key[:16]} has no manifest")
        raw = found[0]
        if raw is None:
            raise RemoteEntryError(f"remote manifest of {key[:16]} is larger than {MAX_MANIFEST_BYTES} bytes")
        return _parse_manifest(key, raw)

    def fetch(self, key: str, store: CacheStore, mac_key: MacKeys = None, *, bad: str | None = None,
              listed: Listed | None = None) -> bool:
        """Download the entry into ``store`` (verified, atomically published). False if absent,
        or still the entry ``bad``."""
        head: _Head | None = None
        manifest: Any = None
        tmp: Path | None = None
        try:
            with Deadline(DEADLINE_BASE, f"fetching {key[:16]} from {self.url}") as deadline:
                head = self._head(key)
                if head is None or head.etag == bad:
                    return False
                if head.upload is None:
                    raise RemoteEntryError(f"remote HEAD of {key[:16]} names no upload")
                manifest = self._manifest(key, head.upload)
                sizes = _listed(key, manifest)
                total = sum(sizes.values())
                if listed is not None:
                    listed(manifest, total)
                deadline.extend(total / MIN_RATE)
                tmp = store.new_tmp(key)
                for name, size in sizes.items():
                    self._download(self._name(key, head.upload, name), size, tmp / name, deadline)
            try:
                return store.adopt(key, tmp, manifest, mac_key=mac_key)
            except EntryError as exc:
                raise RemoteEntryError(str(exc)) from exc
        except RemoteEntryError as exc:
            if exc.bad is None and head is not None:
                exc.bad = head.etag
            exc.repair = not _foreign(manifest, mac_key)
            raise
        finally:
            if tmp is not None:
                store.discard(tmp)

    def _download(self, name: str, size: int, target: Path, deadline: Deadline) -> None:
        """One file, streamed to ``target``: refused before its first byte when the response
        says it has another size, stopped at the first byte past ``size`` when it does not."""
        short = name.rsplit("/", 1)[-1]
        try:
            response = self._files.get_object(Bucket=self.bucket, Key=name)
        except Exception as exc:
            if _missing(exc):
                raise RemoteEntryError(f"{short} is missing") from None
            raise RemoteError(f"downloading {short}: {exc}") from exc
        body = response["Body"]
        try:
            length = response.get("ContentLength")
            if isinstance(length, int) and length != size:
                raise RemoteEntryError(f"{short} is {length} bytes; its manifest records {size}")
            got = 0
            with open(target, "xb") as out:
                while True:
                    try:
                        chunk = body.read(min(_CHUNK, size + 1 - got))
                    except Exception as exc:
                        raise RemoteError(f"downloading {short}: {exc}") from exc
                    if not chunk:
                        break
                    got += len(chunk)
                    if got > size:
                        raise _too_large(short, size)
                    out.write(chunk)
                    deadline.check()
        finally:
            with contextlib.suppress(Exception):
                body.close()

    def upload(self, key: str, entry: Path, *, replace: str | None = None) -> bool:
        """Upload a published local entry under an upload id of its own, then name it in HEAD;
        False if the remote has the entry already (or another host named its upload first),
        unless HEAD is still ``replace`` (an entry this host rejected): then HEAD is replaced
        (``If-Match``) and the bad upload deleted."""
        from botocore.exceptions import ClientError

        manifest_bytes, sizes = _local_manifest(key, entry)
        files = list(sizes)
        total = sum(sizes.values())
        upload = uuid.uuid4().hex
        with Deadline(transfer_deadline(total), f"uploading {key[:16]} to {self.url}"):
            head = self._head(key)
            if head is not None and (replace is None or head.etag != replace):
                return False
            condition = {"IfMatch": head.etag} if head is not None else {"IfNoneMatch": "*"}
            try:
                for name in files:
                    self._files.upload_file(str(entry / name), self.bucket, self._name(key, upload, name),
                                            Config=self._transfer)
                self._client.put_object(Bucket=self.bucket, Key=self._name(key, upload, MANIFEST),
                                        Body=manifest_bytes)
                self._client.put_object(Bucket=self.bucket, Key=self._name(key, HEAD), Body=upload.encode(),
                                        **condition)
            except ClientError as exc:
                if _code(exc) not in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey"):
                    raise RemoteError(f"uploading {key[:16]}: {exc}") from exc
                # Another host's upload is the entry (or repaired it first).
                self._delete(key, upload, [*files, MANIFEST])
                return False
            except Exception as exc:
                raise RemoteError(f"uploading {key[:16]}: {exc}") from exc
            if head is not None and head.upload is not None and head.upload != upload:
                self._delete_upload(key, head.upload)  # the bad entry, now named by nothing
        return True

    def _delete(self, key: str, upload: str, names: list[str]) -> None:
        try:
            self._client.delete_objects(Bucket=self.bucket, Delete={
                "Objects": [{"Key": self._name(key, upload, name)} for name in names], "Quiet": True})
        except Exception as exc:  # garbage, not damage: a lifecycle rule can expire it
            logger.info("aioov cache: could not delete the upload %s of %s: %s", upload, key[:16], exc)

    def _delete_upload(self, key: str, upload: str) -> None:
        """Every object of an upload no HEAD names any more (its manifest may not list them)."""
        try:
            listing = self._client.list_objects_v2(Bucket=self.bucket, Prefix=self._name(key, upload) + "/",
                                                   MaxKeys=100)
            names = [obj["Key"].rsplit("/", 1)[-1] for obj in listing.get("Contents", [])]
        except Exception as exc:
            logger.info("aioov cache: could not list the replaced upload %s of %s: %s", upload, key[:16], exc)
            return
        if names:
            self._delete(key, upload, names)


def _code(exc: BaseException) -> str | None:
    response = getattr(exc, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None


def _missing(exc: BaseException) -> bool:
    return _code(exc) in ("NoSuchKey", "404", "NotFound")


class RemoteLock:
    """One key's lock in Redis, with a TTL lease (redis-py's ``Lock``)."""

    def __init__(self, url: str, key: str, ttl: float) -> None:
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RemoteError("the distributed lock needs redis: pip install 'aioov[remote]'") from exc
        with _REMOTES_LOCK:  # one client (and connection pool) per URL and process
            client = _REDIS.get(url)
            if client is None:
                # A lock command is tiny: a Redis that takes seconds to answer one is failing
                # (and its Breaker keeps the next compiles away from it). One retry, at once.
                client = _REDIS[url] = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=3,
                                                            retry=Retry(NoBackoff(), 1))
        self._lock = client.lock(f"aioov:lock:{key}", timeout=ttl, thread_local=False)

    def acquire(self, timeout: float, cancel: threading.Event | None = None) -> bool:
        """Wait up to ``timeout`` seconds (polling, so a cancel is noticed); False on timeout."""
        deadline = time.monotonic() + timeout
        delay = 0.01
        try:
            while not self._lock.acquire(blocking=False):
                if time.monotonic() >= deadline:
                    return False
                if cancel is not None:
                    if cancel.wait(delay):  # a cancel ends the wait at once
                        return False
                else:
                    time.sleep(delay)
                delay = min(delay * 2, 0.2)
        except Exception as exc:
            raise RemoteError(f"redis lock: {exc}") from exc
        return True

    def release(self) -> None:
        try:
            self._lock.release()
        except Exception as exc:  # expired (TTL) or redis gone: nothing to release
            logger.debug("aioov cache: releasing the redis lock: %s", exc)


_REMOTES: dict[str, RemoteTier] = {}
_REDIS: dict[str, Any] = {}
_REMOTES_LOCK = threading.Lock()


def _renew_in_child() -> None:
    """A forked child makes its own clients: sockets and boto3's sessions are not shared across fork."""
    global _REMOTES_LOCK
    _REMOTES.clear()
    _REDIS.clear()
    _BREAKERS.clear()  # their locks may have been held by a parent's thread
    _REMOTES_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_in_child)


def remote_for(url: str) -> RemoteTier:
    """One client per URL and process (boto3 clients are thread-safe)."""
    with _REMOTES_LOCK:
        if url not in _REMOTES:
            _REMOTES[url] = DirectoryRemote(url) if url.startswith("file://") else RemoteStore(url)
        return _REMOTES[url]
