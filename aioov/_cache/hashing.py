"""blake3 hashers for files, on every core, that also work in a forked child.

blake3 hashes large inputs on a thread pool (rayon's) that it starts on first use. A child
forked after that has none of those threads, and a hash there waits for them for ever (a
``Core`` used before ``fork()``: gunicorn ``--preload``, a ``multiprocessing`` pool). Such a
child hashes on one thread, and so does a process that may start no more threads (a thread
limit: RLIMIT_NPROC, a cgroup's pids.max), where blake3 would panic.
"""

from __future__ import annotations

import os

import blake3

__all__ = ("hasher",)

_pool_started = False  # this process has blake3's thread pool
_pool_missing = False  # ...or a parent did, before forking this process, or it could not start
#: bytes enough for blake3 to hash them on its thread pool
_PROBE_SIZE = 1 << 20


def hasher(key: bytes | None = None) -> blake3.blake3:
    """A blake3 hasher (keyed with ``key``) that hashes on as many threads as it can here."""
    threads = blake3.blake3.AUTO if not _pool_missing and (_pool_started or _start_pool()) else 1
    return blake3.blake3(max_threads=threads) if key is None else blake3.blake3(key=key, max_threads=threads)


def _start_pool() -> bool:
    """Have blake3 start its thread pool; False where it cannot (it panics: a BaseException)."""
    global _pool_started, _pool_missing
    try:
        blake3.blake3(bytes(_PROBE_SIZE), max_threads=blake3.blake3.AUTO)
    except BaseException as exc:  # noqa: BLE001 - pyo3's PanicException, and nothing else
        if type(exc).__name__ != "PanicException":
            raise
        _pool_missing = True
        return False
    _pool_started = True
    return True


def _after_fork_in_child() -> None:
    global _pool_missing
    _pool_missing = _pool_missing or _pool_started


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
