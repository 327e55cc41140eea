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

boto3 was chosen over s3fs/aiobotocore: aioov's cache work already runs in worker threads,
so a synchronous client is the simple fit, and boto3 reads credentials and endpoints the
usual AWS ways (environment, config files, ``AWS_ENDPOINT_URL``) with no code of ours.

The distributed lock is redis-py's lock (``SET NX PX`` with a token): its TTL is the lease,
so a host that dies holding it blocks the others for at most ``CACHE_REMOTE_LOCK_TTL``
seconds. A compile that outlives the TTL loses exclusivity, never correctness: the worst
case is two hosts compiling one model. Without a lock URL, hosts may compile in parallel,
and the first manifest uploaded wins.

Every remote failure (unreachable, denied, missing bucket) is a warning and a fall-back to
the local path: the remote tier never makes a compile fail.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from .._errors import RemoteError
from .fsutil import load_json, read_regular
from .layout import MANIFEST
from .store import CacheStore

__all__ = ("DirectoryRemote", "RemoteLock", "RemoteStore", "RemoteTier", "remote_for")

logger = logging.getLogger("aioov.cache")


class RemoteTier(Protocol):
    """What the Core needs of a second cache tier. ``s3://`` and ``file://`` implement it."""

    url: str

    def fetch(self, key: str, store: CacheStore, mac_key: bytes | None = None) -> bool:
        """Download entry ``key`` into ``store`` (verified, atomically published); False if absent."""
        ...

    def upload(self, key: str, entry: Path) -> bool:
        """Share a published local entry, manifest last; False if the tier has one already."""
        ...


HEAD = "HEAD"
_UPLOAD_ID = re.compile(r"[0-9a-f]{32}")


def _safe_names(key: str, manifest: dict[str, Any]) -> list[str]:
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise RemoteError(f"remote manifest of {key[:16]} lists no files")
    for name in files:
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", "..", MANIFEST):
            raise RemoteError(f"remote manifest of {key[:16]} has a bad file name {name!r}")
    return list(files)


class DirectoryRemote:
    """Entries in a directory shared by hosts (``file:///mnt/shared/aioov``), e.g. over NFS.

    Unlike using that directory as ``CACHE_DIR`` on every host, each host keeps its own local
    cache (and its flock locks, which NFS may not honour) and copies entries across.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.root = Path(unquote(urlparse(url).path)) / "v1"

    def fetch(self, key: str, store: CacheStore, mac_key: bytes | None = None) -> bool:
        source = self.root / key
        try:
            manifest = load_json(read_regular(source / MANIFEST, 1 << 20))
        except FileNotFoundError:
            return False
        except (OSError, ValueError) as exc:
            raise RemoteError(f"remote manifest of {key[:16]}: {exc}") from exc
        tmp = store.new_tmp(key)
        try:
            for name in _safe_names(key, manifest):
                shutil.copyfile(source / name, tmp / name, follow_symlinks=False)
            return store.adopt(key, tmp, manifest, mac_key=mac_key)
        finally:
            store.discard(tmp)

    def upload(self, key: str, entry: Path) -> bool:
        final = self.root / key
        if final.exists():
            return False
        tmp = self.root / f".{key}.{os.getpid()}.{uuid.uuid4().hex[:8]}.incomplete"
        try:
            tmp.mkdir(parents=True)
            manifest = json.loads((entry / MANIFEST).read_bytes())
            for name in (*_safe_names(key, manifest), MANIFEST):  # the manifest last
                shutil.copyfile(entry / name, tmp / name)
            os.rename(tmp, final)  # atomic: other hosts see all of it or none
            return True
        except OSError as exc:
            if final.exists():
                return False
            raise RemoteError(f"uploading {key[:16]}: {exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


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
            from botocore.config import Config
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RemoteError("the remote cache needs boto3: pip install 'aioov[remote]'") from exc
        self._client = boto3.client(
            "s3", config=Config(retries={"max_attempts": 2}, connect_timeout=3, read_timeout=30)
        )

    def _name(self, key: str, *parts: str) -> str:
        return "/".join(part for part in (self.prefix, "v1", key, *parts) if part)

    def _get(self, name: str) -> bytes | None:
        """An object's bytes; None when it does not exist."""
        from botocore.exceptions import ClientError

        try:
            return self._client.get_object(Bucket=self.bucket, Key=name)["Body"].read()  # type: ignore[no-any-return]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise RemoteError(str(exc)) from exc
        except Exception as exc:
            raise RemoteError(str(exc)) from exc

    def head(self, key: str) -> str | None:
        """The upload the remote entry ``key`` is made of, or None when there is none."""
        raw = self._get(self._name(key, HEAD))
        if raw is None:
            return None
        upload = raw.decode("ascii", "replace").strip()
        if not _UPLOAD_ID.fullmatch(upload):
            raise RemoteError(f"remote HEAD of {key[:16]} names no upload")
        return upload

    def manifest(self, key: str) -> tuple[str, dict[str, Any]] | None:
        """(upload, manifest) of the remote entry, or None when there is none."""
        upload = self.head(key)
        if upload is None:
            return None
        body = self._get(self._name(key, upload, MANIFEST))
        if body is None:
            raise RemoteError(f"remote upload {upload} of {key[:16]} has no manifest")
        try:
            manifest = load_json(body)
        except ValueError as exc:
            raise RemoteError(f"remote manifest of {key[:16]} is not JSON") from exc
        if not isinstance(manifest, dict):
            raise RemoteError(f"remote manifest of {key[:16]} is not an object")
        return upload, manifest

    def fetch(self, key: str, store: CacheStore, mac_key: bytes | None = None) -> bool:
        """Download the entry into ``store`` (verified, atomically published). False if absent."""
        found = self.manifest(key)
        if found is None:
            return False
        upload, manifest = found
        names = _safe_names(key, manifest)
        tmp = store.new_tmp(key)
        try:
            for name in names:
                try:
                    self._client.download_file(self.bucket, self._name(key, upload, name), str(tmp / name))
                except Exception as exc:
                    raise RemoteError(f"downloading {name} of {key[:16]}: {exc}") from exc
            return store.adopt(key, tmp, manifest, mac_key=mac_key)
        finally:
            store.discard(tmp)

    def upload(self, key: str, entry: Path) -> bool:
        """Upload a published local entry under an upload id of its own, then name it in HEAD;
        False if the remote has the entry already (or another host named its upload first)."""
        from botocore.exceptions import ClientError

        if self.head(key) is not None:
            return False
        upload = uuid.uuid4().hex
        manifest_bytes = (entry / MANIFEST).read_bytes()
        files = list(json.loads(manifest_bytes)["files"])
        try:
            for name in files:
                self._client.upload_file(str(entry / name), self.bucket, self._name(key, upload, name))
            self._client.put_object(Bucket=self.bucket, Key=self._name(key, upload, MANIFEST), Body=manifest_bytes)
            self._client.put_object(Bucket=self.bucket, Key=self._name(key, HEAD), Body=upload.encode(),
                                    IfNoneMatch="*")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise RemoteError(f"uploading {key[:16]}: {exc}") from exc
            self._delete(key, upload, [*files, MANIFEST])  # another host's upload is the entry
            return False
        except Exception as exc:
            raise RemoteError(f"uploading {key[:16]}: {exc}") from exc
        return True

    def _delete(self, key: str, upload: str, names: list[str]) -> None:
        try:
            self._client.delete_objects(Bucket=self.bucket, Delete={
                "Objects": [{"Key": self._name(key, upload, name)} for name in names], "Quiet": True})
        except Exception as exc:  # garbage, not damage: a lifecycle rule can expire it
            logger.info("aioov cache: could not delete the losing upload %s of %s: %s", upload, key[:16], exc)


class RemoteLock:
    """One key's lock in Redis, with a TTL lease (redis-py's ``Lock``)."""

    def __init__(self, url: str, key: str, ttl: float) -> None:
        try:
            import redis
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RemoteError("the distributed lock needs redis: pip install 'aioov[remote]'") from exc
        with _REMOTES_LOCK:  # one client (and connection pool) per URL and process
            client = _REDIS.get(url)
            if client is None:
                client = _REDIS[url] = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=10)
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
    _REMOTES_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_in_child)


def remote_for(url: str) -> RemoteTier:
    """One client per URL and process (boto3 clients are thread-safe)."""
    with _REMOTES_LOCK:
        if url not in _REMOTES:
            _REMOTES[url] = DirectoryRemote(url) if url.startswith("file://") else RemoteStore(url)
        return _REMOTES[url]
