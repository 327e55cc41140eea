"""Writing cache entries off the critical path.

``compile_model`` hands back its session as soon as it exists; the entry is written beside
the compile or after it (``_writer``), from here: one export worker per Core hands each job to
a builder process (``aioov._builder``, which lowers its own priority for background jobs), then
publishes what it wrote. The key's lock stays held until the entry is published: other
processes wait for it rather than compile the same model again.

Exports run at a low priority (``_priority``): they use spare CPU and disk only. Uploads to the
remote tier run beside them, in a worker of the Core's own priority: they need little CPU, and
one starved on a busy host would miss its deadline and have a healthy remote taken for a
failing one. Both workers are started together, by whoever submits first (a thread inherits
its priority from the thread that starts it).

The worker is a daemon thread, so pending exports never keep the interpreter alive: at exit
they get ``EXIT_WAIT`` seconds to finish, then are abandoned (their builders killed, nothing
half-written published; another process writes the entry later).
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from .._concurrency import CancelToken, renew_in_children
from .._priority import lower_this_thread

__all__ = ("Exporter",)

logger = logging.getLogger("aioov.cache")

#: seconds pending exports may still take when the interpreter exits without ``Core.aclose``
EXIT_WAIT = 10.0
#: seconds an abandoned export may take to clean up (kill its builder, remove its files)
ABANDON_WAIT = 5.0

_Item = tuple[concurrent.futures.Future[Any], Callable[[CancelToken], None], CancelToken]


class Exporter:
    def __init__(self) -> None:
        self._renew_in_child()
        renew_in_children(self)
        _LIVE.add(self)

    def _renew_in_child(self) -> None:
        """Fresh workers, nothing pending: the parent's exports are the parent's to finish."""
        # one queue per worker: the low-priority one (``idle``), and the Core's own
        self._queues: dict[bool, queue.SimpleQueue[_Item | None]] = {}
        self._threads: list[threading.Thread] = []
        self._warned = False
        self._lock = threading.Lock()
        self._pending: dict[concurrent.futures.Future[Any], CancelToken] = {}
        self._closed = False

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def submit(self, job: Callable[[CancelToken], None], on_drop: Callable[[], None], *,
               idle: bool = True) -> CancelToken:
        """Run ``job(token)`` in the export worker (``idle``), or in the one of the Core's own
        priority; ``token`` cancels it. ``on_drop`` runs if it never starts."""
        token = CancelToken()
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        token.future = future

        def done(f: concurrent.futures.Future[Any]) -> None:
            with self._lock:
                self._pending.pop(f, None)
            if f.cancelled():
                on_drop()

        with self._lock:
            started = not self._closed and (bool(self._threads) or self._start_workers())
            if started:
                self._pending[future] = token
                self._queues[idle].put((future, job, token))
        if not started:
            on_drop()
            return token
        future.add_done_callback(done)
        return token

    def _start_workers(self) -> bool:
        """Both workers, or neither: False where the process may start no more threads (a
        thread limit: RLIMIT_NPROC, a cgroup's pids.max). Then what is submitted is dropped (the
        model is served, not cached) and the next submit tries again."""
        for lowered, name in ((True, "aioov-export"), (False, "aioov-upload")):
            work: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
            thread = threading.Thread(target=self._work, args=(work, lowered), name=name, daemon=True)
            try:
                thread.start()
            except RuntimeError as exc:
                for other in self._queues.values():
                    other.put(None)
                self._queues, self._threads = {}, []
                if not self._warned:
                    self._warned = True
                    logger.warning("aioov cache: cannot start the export thread (%s); models are compiled "
                                   "but not cached", exc)
                return False
            self._queues[lowered] = work
            self._threads.append(thread)
        return True

    def _work(self, work: queue.SimpleQueue[_Item | None], lowered: bool) -> None:
        if lowered:
            lower_this_thread()  # and the builders it starts, from their first instruction
        while (item := work.get()) is not None:
            future, job, token = item
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while it waited: ``done`` dropped it
            try:
                job(token)
            except BaseException as exc:  # jobs handle their own failures; this is a bug
                logger.exception("aioov cache: an export job failed")
                future.set_exception(exc)
            else:
                future.set_result(None)

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

    def shutdown(self, timeout: float | None = None) -> bool:
        """Refuse new jobs, let the workers finish what they run (up to ``timeout`` seconds) and
        stop; False when one was still busy."""
        with self._lock:
            self._closed = True
            threads = [t for t in self._threads if t is not threading.current_thread()]
            queues = list(self._queues.values())
        self.cancel_all()  # what never started is dropped at once
        for work in queues:
            work.put(None)
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in threads:
            thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in threads)


_LIVE: weakref.WeakSet[Exporter] = weakref.WeakSet()


@atexit.register
def _at_exit() -> None:
    """Exports of Cores never closed: a bounded wait, then abandoned (see the module's docstring)."""
    exporters = [e for e in list(_LIVE) if e.pending]
    deadline = time.monotonic() + EXIT_WAIT
    for exporter in exporters:
        if not exporter.wait(max(0.0, deadline - time.monotonic())):
            logger.warning("aioov cache: the interpreter exits; %d cache exports abandoned", exporter.pending)
        exporter.shutdown(ABANDON_WAIT)
