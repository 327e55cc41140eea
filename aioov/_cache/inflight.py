"""In-process de-duplication: identical concurrent compiles share one job.

A job runs in a worker thread, not in any caller's task, so a caller that is
cancelled only stops waiting: the others still get the result. When the last
waiter leaves, the job is cancelled (lock waits and ONNX Runtime loads stop)
and forgotten, so a later caller starts afresh. An error reaches every waiter
and is never remembered.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable, Hashable
from typing import Any

from .._concurrency import CancelToken, wait_future

__all__ = ("Inflight", "Job")


class Job:
    __slots__ = ("key", "future", "token", "waiters")

    def __init__(self, key: Hashable, future: concurrent.futures.Future[Any], token: CancelToken) -> None:
        self.key = key
        self.future = future
        self.token = token
        self.waiters = 0


class Inflight:
    def __init__(self) -> None:
        self._jobs: dict[Hashable, Job] = {}
        # Re-entrant: a future that is already done runs its callback (_forget) at once.
        self._lock = threading.RLock()
        self.started = 0  # jobs started (for stats and tests)
        self.joined = 0  # callers that joined a running job

    def __len__(self) -> int:
        return len(self._jobs)

    def join(self, key: Hashable, start: Callable[[CancelToken], concurrent.futures.Future[Any]]) -> Job:
        """Join the running job for ``key``, or start one with ``start(token)``.
        Every ``join`` must be paired with a ``leave``."""
        with self._lock:
            job = self._jobs.get(key)
            if job is None or job.future.done():
                token = CancelToken()
                job = Job(key, start(token), token)
                token.future = job.future
                self._jobs[key] = job
                self.started += 1
                job.future.add_done_callback(self._forgetter(job))
            else:
                self.joined += 1
            job.waiters += 1
            return job

    def leave(self, job: Job) -> None:
        """A waiter is done with ``job``; the last one to leave early cancels it."""
        with self._lock:
            job.waiters -= 1
            if job.waiters == 0:
                if not job.future.done():
                    job.token.cancel()
                # Forget it now even if it is done: its done-callback (``_forget``) may not
                # have run yet in the worker thread that finished it.
                if self._jobs.get(job.key) is job:
                    del self._jobs[job.key]

    async def run(self, key: Hashable, start: Callable[[CancelToken], concurrent.futures.Future[Any]]) -> Any:
        job = self.join(key, start)
        try:
            return await wait_future(job.future)
        finally:
            self.leave(job)

    def _forgetter(self, job: Job) -> Callable[[concurrent.futures.Future[Any]], None]:
        return lambda _future: self._forget(job)

    def _forget(self, job: Job) -> None:
        with self._lock:
            if self._jobs.get(job.key) is job:
                del self._jobs[job.key]

    def cancel_all(self) -> None:
        with self._lock:
            for job in self._jobs.values():
                job.token.cancel()
            self._jobs.clear()
