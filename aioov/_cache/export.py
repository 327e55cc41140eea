"""Writing cache entries off the critical path.

``compile_model`` hands back its session as soon as it exists; the entry is written beside
the compile or after it (``_writer``), from here: one export worker per Core hands each job to
a builder process (which writes and checks the blob at nice 10, see ``aioov._builder``), then
publishes what it wrote. The worker runs at a lower CPU priority too (Linux nice values are
per thread, and a builder it starts inherits its value), so that on a small machine the
exports yield to the compiles callers wait for.
The key's lock stays held until the entry is published: other processes wait for it rather
than compile the same model again.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from .._concurrency import CancelToken, renew_in_children

__all__ = ("Exporter",)

logger = logging.getLogger("aioov.cache")

EXPORT_NICE = 10


def _lower_priority() -> None:
    try:
        me = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, me) < EXPORT_NICE:  # never above its parent's (nice 19 stays 19)
            os.setpriority(os.PRIO_PROCESS, me, EXPORT_NICE)
    except (AttributeError, OSError):  # not Linux, or not permitted: run at normal priority
        pass


class Exporter:
    def __init__(self) -> None:
        self._renew_in_child()
        renew_in_children(self)

    def _renew_in_child(self) -> None:
        """A fresh pool, nothing pending: the parent's exports are the parent's to finish."""
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="aioov-export", initializer=_lower_priority
        )
        self._lock = threading.Lock()
        self._pending: dict[concurrent.futures.Future[Any], CancelToken] = {}

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def submit(self, job: Callable[[CancelToken], None], on_drop: Callable[[], None]) -> CancelToken:
        """Run ``job(token)`` in the export worker; ``token`` cancels it. ``on_drop`` runs if it never starts."""
        token = CancelToken()
        try:
            future = self._pool.submit(job, token)
        except RuntimeError:  # shut down
            on_drop()
            return token

        def done(f: concurrent.futures.Future[Any]) -> None:
            with self._lock:
                self._pending.pop(f, None)
            if f.cancelled():
                on_drop()

        token.future = future
        with self._lock:
            self._pending[future] = token
        future.add_done_callback(done)
        return token

    def wait(self, timeout: float | None = None) -> bool:
        """Block until no export is pending; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                futures = list(self._pending)
            if not futures:
                return True
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            _, not_done = concurrent.futures.wait(futures, timeout=remaining)
            if not_done and deadline is not None and time.monotonic() >= deadline:
                return False

    def cancel_all(self) -> None:
        with self._lock:
            tokens = list(self._pending.values())
        for token in tokens:
            token.cancel()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
