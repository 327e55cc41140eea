"""Running compile jobs: a bounded pool of worker threads, and in-process de-duplication.

``CompileJobs`` is what ``Core`` and bulk loading share: ``submit`` a ``Ticket``, get a
``Job`` whose future the caller awaits, ``leave`` it when done. Identical concurrent
compiles share one job. A job runs in a worker thread, not in any caller's task, so a caller that is
cancelled only stops waiting: the others still get the result. When the last
waiter leaves, the job is cancelled (lock waits and ONNX Runtime loads stop)
and forgotten, so a later caller starts afresh. An error reaches every waiter
and is never remembered.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import threading
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ._concurrency import CancelToken, renew_in_children, wait_future
from ._errors import AioovError, Cancelled
from ._properties import CompileConfig
from ._request import Result, Source

__all__ = ("CompileJobs", "Inflight", "Job", "Ticket")


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

    def _forgetter(self, job: Job) -> Callable[[concurrent.futures.Future[Any]], None]:
        return lambda _future: self._forget(job)

    def _forget(self, job: Job) -> None:
        with self._lock:
            if self._jobs.get(job.key) is job:
                del self._jobs[job.key]

    def cancel_all(self) -> None:
        with self._lock:
            jobs = list(self._jobs.values())  # cancelling a queued job forgets it at once
            self._jobs.clear()
        for job in jobs:
            job.token.cancel()


@dataclass(frozen=True)
class Ticket:
    """One compile as a caller asked for it, before its device is resolved: what a job needs,
    and ``request_id``, under which identical requests share one job."""

    source: Source
    device: str
    config: CompileConfig = field(compare=False)
    max_cache_size: int = field(default=0, compare=False)
    request_id: Hashable = None


#: a pipeline's ``compile_job``: (source, device, config, token, max_cache_size, defer_if_busy) → Result
CompileFn = Callable[[Source, str, CompileConfig, CancelToken, int, bool], Result]


class CompileJobs:
    """Compile jobs for one Core: at most ``workers`` at once, identical ones shared."""

    def __init__(self, compile_job: CompileFn, workers: int) -> None:
        self._compile_job = compile_job
        self._workers = workers
        self._renew_in_child()
        self._closed = False
        renew_in_children(self)

    def _renew_in_child(self) -> None:
        """A fresh pool and nothing in flight: the parent's compiles are the parent's."""
        # A compile must outlive a cancelled caller (others may share it, and it may hold a
        # cache lock), so jobs run in an executor of their own rather than in a caller's task.
        self._pool = concurrent.futures.ThreadPoolExecutor(self._workers, thread_name_prefix="aioov-compile")
        self._inflight = Inflight()
        self._background: set[CancelToken] = set()
        self._background_lock = threading.Lock()
        self._busy = 0  # bulk loads running
        self._deferred: list[tuple[Callable[[CancelToken], Any], CancelToken]] = []  # work for after them

    @property
    def inflight(self) -> Inflight:
        return self._inflight

    def submit(self, ticket: Ticket, *, defer_if_busy: bool = False) -> Job:
        """Start (or join) the job for ``ticket``; pair with ``leave``. With ``defer_if_busy``
        the job raises ``LockBusy`` instead of waiting for another process's compile."""
        if self._closed:
            raise AioovError("this Core is closed")
        try:
            return self._inflight.join(
                (ticket.request_id, defer_if_busy),
                lambda token: self._pool.submit(
                    self._compile_job, ticket.source, ticket.device, ticket.config, token,
                    ticket.max_cache_size, defer_if_busy,
                ),
            )
        except RuntimeError as exc:  # no thread to compile in (a thread limit: RLIMIT_NPROC, pids.max)
            raise AioovError(f"cannot start a compile thread: {exc}") from exc

    def leave(self, job: Job) -> None:
        self._inflight.leave(job)

    async def run(self, ticket: Ticket) -> Result:
        job = self.submit(ticket)
        try:
            with contextlib.suppress(Exception):  # the job's outcome is read below
                await wait_future(job.future)
        finally:
            self.leave(job)
        return self.result(job)

    def result(self, job: Job) -> Result:
        """A finished job's result; a job stopped by ``close`` raises AioovError."""
        try:
            result: Result = job.future.result()
        except (Cancelled, concurrent.futures.CancelledError) as exc:
            raise AioovError("the Core was closed before this compile finished") from exc
        return result

    def background(self, work: Callable[[CancelToken], Any]) -> concurrent.futures.Future[Any] | None:
        """Run ``work(token)`` in the pool, nobody waiting on it yet (an instant hit's full-speed
        session), after any bulk load in progress (``busy``); ``close`` cancels it. None once closed."""
        if self._closed:
            return None
        token = CancelToken()
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        token.future = future
        future.add_done_callback(lambda _: self._forget_background(token))
        with self._background_lock:
            self._background.add(token)
            deferred = bool(self._busy)
            if deferred:
                self._deferred.append((work, token))
        if self._closed:
            token.cancel()  # closed meanwhile: ``close`` may have missed this token
        elif not deferred:
            self._start(work, token)
        return future

    def cancel_background(self, future: concurrent.futures.Future[Any]) -> None:
        """Stop ``background``'s work for ``future`` (an instant hit whose own load failed)."""
        with self._background_lock:
            tokens = [token for token in self._background if token.future is future]
            self._deferred = [item for item in self._deferred if item[1].future is not future]
        for token in tokens:
            token.cancel()

    def _start(self, work: Callable[[CancelToken], Any], token: CancelToken) -> None:
        future = token.future
        assert future is not None

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return  # cancelled while it waited
            try:
                future.set_result(work(token))
            except BaseException as exc:
                future.set_exception(exc)

        try:
            self._pool.submit(run)
        except RuntimeError:  # shut down
            token.cancel()

    def expedite(self, future: concurrent.futures.Future[Any]) -> None:
        """Start ``background``'s work for ``future`` now if it waits for a bulk load (somebody
        waits for it: a ``wait_full_speed`` inside the loop over ``compile_models``)."""
        with self._background_lock:
            found = [item for item in self._deferred if item[1].future is future]
            self._deferred = [item for item in self._deferred if item[1].future is not future]
        for work, token in found:
            self._start(work, token)

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """A bulk load is running: background work waits until it is over (full-speed loads
        started beside instant hits compete with them for the same cores, and the whole folder
        is ready later)."""
        with self._background_lock:
            self._busy += 1
        try:
            yield
        finally:
            ready: list[tuple[Callable[[CancelToken], Any], CancelToken]] = []
            with self._background_lock:
                self._busy -= 1
                if not self._busy:
                    ready, self._deferred = self._deferred, []
            for work, token in ready:
                self._start(work, token)

    def _forget_background(self, token: CancelToken) -> None:
        with self._background_lock:
            self._background.discard(token)

    def close(self) -> None:
        """Refuse new jobs and cancel the running ones (their callers get AioovError)."""
        self._closed = True
        self._inflight.cancel_all()
        with self._background_lock:
            tokens = list(self._background)
        for token in tokens:
            token.cancel()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
