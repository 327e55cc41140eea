"""The names a cache entry and a cache directory reserve, and nothing else.

Dependency-free on purpose: it is the one cache module a device (and its blob format) may
import, so that devices never depend on how the store works.
"""

from __future__ import annotations

__all__ = ("BLOB_MODEL", "BLOB_WEIGHTS", "FORMAT_VERSION", "MANIFEST", "NOT_CACHEABLE", "NOT_WORTH", "STAMP", "TOO_BIG",
           "is_reserved", "marker_reason")

#: bump when the meaning of a key or the entry layout changes (``CACHE_DIR/v<FORMAT_VERSION>``)
FORMAT_VERSION = 1
#: an entry's manifest, written last: key inputs, sizes, checksums
MANIFEST = "manifest.json"
#: the optimized (or copied) ONNX model of an entry, and its external weights
BLOB_MODEL = "model.onnx"
BLOB_WEIGHTS = "weights.bin"
#: the one file of a marker published in place of an entry: this model cannot be cached here
NOT_CACHEABLE = "not-cacheable.json"
#: the ``kind`` of a marker saying that a hit would not load the model sooner than a compile
NOT_WORTH = "not-worth"
#: the ``kind`` of a marker saying that the model's entry is larger than ``CACHE_MAX_SIZE``
TOO_BIG = "too-big"
#: a verification stamp, written into an entry after it was published (``stamps.py``)
STAMP = ".verified"


def is_reserved(name: str) -> bool:
    """Whether a file name in an entry is one the cache itself gives meaning to."""
    return name in (MANIFEST, STAMP, "", ".", "..") or "/" in name or "\\" in name


def marker_reason(marker: object) -> str | None:
    """What a manifest's marker says, for listings: why the model is not cacheable here, or
    "not worth caching: ..."; None when there is no marker."""
    if not isinstance(marker, dict):
        return None
    reason = str(marker.get("reason"))
    return f"not worth caching: {reason}" if marker.get("kind") == NOT_WORTH else reason
