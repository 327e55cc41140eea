"""blake3 hashers for files, on every core, that also work in a forked child.

blake3 hashes large inputs on a thread pool (rayon's) that it starts on first use. A child
forked after that has none of those threads, and a hash there waits for them for ever (a
``Core`` used before ``fork()``: gunicorn ``--preload``, a ``multiprocessing`` pool). Such a
child hashes on one thread.
"""

from __future__ import annotations

import os

import blake3

__all__ = ("hasher",)

_pool_started = False  # this process asked blake3 for its thread pool
_pool_missing = False  # ...or a parent did, before forking this process


def hasher(key: bytes | None = None) -> blake3.blake3:
    """A blake3 hasher (keyed with ``key``) that hashes on as many threads as it can here."""
    global _pool_started
    if _pool_missing:
        threads = 1
    else:
        _pool_started, threads = True, blake3.blake3.AUTO
    return blake3.blake3(max_threads=threads) if key is None else blake3.blake3(key=key, max_threads=threads)


def _after_fork_in_child() -> None:
    global _pool_missing
    _pool_missing = _pool_missing or _pool_started


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
