"""Bridges between worker threads and the event loop (asyncio or trio, via anyio)."""

from __future__ import annotations

import concurrent.futures
import os
import threading
import weakref
from typing import Any, Protocol, TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel

__all__ = ("CancelToken", "on_event_loop", "renew_in_children", "wait_future")


class Renewable(Protocol):
    def _renew_in_child(self) -> None: ...


_RENEW: weakref.WeakSet[Any] = weakref.WeakSet()


def renew_in_children(obj: Renewable) -> None:
    """Have ``obj._renew_in_child()`` run in every child forked from this process (gunicorn
    ``--preload``, multiprocessing's fork start method): the threads of its pools did not come
    along, locks they held would stay held for ever, and lock files it holds are the parent's
    (closed in the child, never unlocked: the parent keeps them)."""
    _RENEW.add(obj)


def _renew_all() -> None:
    for obj in list(_RENEW):
        obj._renew_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_all)

T = TypeVar("T")


def on_event_loop() -> bool:
    """Whether the caller runs on an event loop's thread (asyncio or trio), where blocking stalls it."""
    try:
        anyio.lowlevel.current_token()
    except Exception:
        return False
    return True


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
