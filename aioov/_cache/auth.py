"""Optional entry authentication (``CACHE_HMAC_KEY``).

xxh3 checksums catch accidents (bit rot, truncation), not an attacker who can write the
cache directory: xxh3 is not collision-resistant. With a secret key, each entry's
manifest carries keyed blake3 MACs of the manifest itself and of every blob file; an
entry whose MACs do not verify — forged, tampered, or written by a process without the
key — is discarded and recompiled. blake3's keyed mode is a MAC by design and hashes
at memory speed; the key is derived from the user's secret with blake3's KDF mode.

Keys rotate: given several secrets, entries are signed with the first and accepted under
any. An entry whose manifest is signed under none of them is *not mine* (another key, during
a rotation, or a forgery: a MAC cannot tell them apart): it is neither served nor deleted.
"""

from __future__ import annotations

import hmac
import json
from pathlib import Path
from typing import Any

import blake3

from . import hashing

__all__ = ("NOT_MINE", "as_keys", "derive_key", "key_of", "keys_of", "manifest_mac", "file_mac", "sign", "signer",
           "check")

_CONTEXT = "aioov 2026-11 cache entry authentication v1"
#: what ``CacheStore.check`` says of an entry signed under none of the keys
NOT_MINE = "signed with another key (a rotation, or forged)"
#: version 2 binds each file's MAC to its entry and name, and the manifest's MAC to the file MACs:
#: version 1 let a file and its MAC be copied from one signed entry into another
MAC_VERSION = 2


def derive_key(secret: str | bytes) -> bytes:
    material = secret.encode() if isinstance(secret, str) else bytes(secret)
    return blake3.blake3(material, derive_key_context=_CONTEXT).digest()


Secret = str | bytes | tuple[bytes, ...] | None


def keys_of(secret: Secret) -> tuple[bytes, ...]:
    """The MAC keys for ``CACHE_HMAC_KEY``'s secret or secrets (empty without one)."""
    if not secret:
        return ()
    secrets = secret if isinstance(secret, tuple) else (secret,)
    return tuple(derive_key(s) for s in secrets)


def key_of(secret: Secret) -> bytes | None:
    """The key entries are signed with (the first secret's); None without one."""
    keys = keys_of(secret)
    return keys[0] if keys else None


def as_keys(mac_key: bytes | tuple[bytes, ...] | None) -> tuple[bytes, ...]:
    """A key, or a rotation's keys (the first signs), as a tuple: what verification tries."""
    if mac_key is None:
        return ()
    return mac_key if isinstance(mac_key, tuple) else (mac_key,)


def signer(manifest: dict[str, Any], keys: tuple[bytes, ...]) -> bytes | None:
    """The key among ``keys`` whose MAC the manifest carries, or None (unsigned, or not mine)."""
    mac = manifest.get("mac")
    if not isinstance(mac, dict) or mac.get("v") != MAC_VERSION:
        return None
    claimed = str(mac.get("manifest", ""))
    return next((k for k in keys if hmac.compare_digest(claimed, manifest_mac(manifest, k))), None)


def signed(manifest: dict[str, Any]) -> bool:
    """Whether the manifest carries a MAC at all (under some key)."""
    mac = manifest.get("mac")
    return isinstance(mac, dict) and mac.get("v") == MAC_VERSION and isinstance(mac.get("files"), dict)


def _canonical(manifest: dict[str, Any]) -> bytes:
    """The manifest, file MACs included, without the manifest's own MAC."""
    mac = manifest.get("mac")
    body = {k: v for k, v in manifest.items() if k != "mac"}
    if isinstance(mac, dict):
        body["mac"] = {k: v for k, v in mac.items() if k != "manifest"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def manifest_mac(manifest: dict[str, Any], key: bytes) -> str:
    return blake3.blake3(_canonical(manifest), key=key).hexdigest()


def file_mac(path: Path, key: bytes, entry_key: str = "", name: str = "") -> str:
    """Keyed blake3 of (entry key, file name, content): valid for this file of this entry only."""
    hasher = hashing.hasher(key)
    hasher.update(f"{entry_key}\0{name}\0".encode())
    if path.stat().st_size:
        hasher.update_mmap(str(path))
    return hasher.hexdigest()


def sign(manifest: dict[str, Any], directory: Path, key: bytes) -> dict[str, Any]:
    """Return ``manifest`` (which names its entry's ``key``) with its ``mac`` record."""
    entry_key = str(manifest["key"])
    files = {name: file_mac(directory / name, key, entry_key, name) for name in sorted(manifest["files"])}
    signed = {**manifest, "mac": {"v": MAC_VERSION, "files": files}}
    signed["mac"]["manifest"] = manifest_mac(signed, key)
    return signed


def check(manifest: dict[str, Any], directory: Path, key: bytes, names: list[str] | None = None) -> str | None:
    """The problem with an entry's MACs (for ``names``, default all files), or None."""
    mac = manifest.get("mac")
    if not isinstance(mac, dict) or not isinstance(mac.get("files"), dict):
        return "entry is not authenticated (no MAC)"
    if mac.get("v") != MAC_VERSION:
        return "entry is authenticated by an older, weaker MAC format"
    if not hmac.compare_digest(str(mac.get("manifest", "")), manifest_mac(manifest, key)):
        return "manifest MAC does not verify"
    entry_key = str(manifest.get("key", ""))
    for name in names if names is not None else sorted(manifest["files"]):
        expected = mac["files"].get(name)
        try:
            actual = file_mac(directory / name, key, entry_key, name)
        except OSError as exc:
            return f"{name} unreadable: {exc}"
        if not isinstance(expected, str) or not hmac.compare_digest(expected, actual):
            return f"{name} MAC does not verify"
    return None
