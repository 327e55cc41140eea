"""Bridges between worker threads and the event loop (asyncio or trio, via anyio)."""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel

__all__ = ("CancelToken", "wait_future")

T = TypeVar("T")


async def wait_future(future: concurrent.futures.Future[T]) -> T:
    """Await a ``concurrent.futures.Future`` without a thread blocked on it.

    Cancelling the caller stops the wait, not the work: the future's job may
    be shared with other callers (see ``_cache.inflight``).
    """
    if not future.done():
        event = anyio.Event()
        token = anyio.lowlevel.current_token()
        loop_thread = threading.get_ident()

        def wake(_: concurrent.futures.Future[T]) -> None:
            if threading.get_ident() == loop_thread:
                event.set()
                return
            try:
                anyio.from_thread.run_sync(event.set, token=token)
            except Exception:  # the loop is gone; nobody is waiting any more
                pass

        future.add_done_callback(wake)
        await event.wait()
    return future.result()


class CancelToken:
    """Cancels blocking work in a thread: lock waits poll ``event``, and ONNX Runtime
    session loads registered here are stopped with ``set_load_cancellation_flag``."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._lock = threading.Lock()
        self._options: list[Any] = []
        self.future: concurrent.futures.Future[Any] | None = None

    @property
    def cancelled(self) -> bool:
        return self.event.is_set()

    def register(self, session_options: Any) -> None:
        with self._lock:
            self._options.append(session_options)
            if self.event.is_set():
                session_options.set_load_cancellation_flag(True)

    def cancel(self) -> None:
        with self._lock:
            self.event.set()
            for options in self._options:
                try:
                    options.set_load_cancellation_flag(True)
                except Exception:
                    pass
        if self.future is not None:
            self.future.cancel()


async def wait_first(futures: list[concurrent.futures.Future[Any]]) -> None:
    """Return once at least one of ``futures`` is done."""
    first: concurrent.futures.Future[None] = concurrent.futures.Future()

    def done(_: concurrent.futures.Future[Any]) -> None:
        try:
            first.set_result(None)
        except concurrent.futures.InvalidStateError:
            pass

    for future in futures:
        future.add_done_callback(done)
    await wait_future(first)
