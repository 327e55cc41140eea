"""Compiles begun before the cache has answered: a new model's hash beside its compile.

A cache knows a model only once it has its content digest, and a first compile waited for
blake3 over the whole model before it began (435 MB: ~0.05 s on 2 cores, 6-7 % of BERT-base's
compile). When the cache has never hashed a model of this size (``StatIndex.seen_size``) and
no other process is loading from it now, a miss is all but certain: the compile begins at
once, beside the hash, and the caller gets it as if the hash had been free. If the cache has
the model after all (an entry from an older aioov, which kept no sizes), the compile is
stopped with onnxruntime's load cancellation and the hit is loaded.
"""

from __future__ import annotations

import concurrent.futures
import threading

import onnxruntime as ort

from ._concurrency import CancelToken
from ._errors import Cancelled
from ._request import CompileRequest
from ._sessions import SessionFactory

__all__ = ("EarlyCompile",)

#: seconds between looks at the caller's cancel token while waiting for an early compile
_POLL = 0.05


class EarlyCompile:
    """The session of one compile job: compiled in a thread of its own once ``begin`` is
    called, for a caller that is still hashing, else by ``take`` in the caller's thread; as a
    context, a begun compile is dropped unless taken."""

    def __init__(self, sessions: SessionFactory, request: CompileRequest) -> None:
        self._sessions, self._request = sessions, request
        # Its own token: dropping the compile (a hit after all) must not cancel the caller.
        self._token = CancelToken()
        self._future: concurrent.futures.Future[ort.InferenceSession] | None = None
        self._taken = False

    @property
    def started(self) -> bool:
        return self._future is not None

    def begin(self) -> None:
        self._future = concurrent.futures.Future()
        threading.Thread(target=self._run, args=(self._future,), daemon=True, name="aioov-early-compile").start()

    def _run(self, future: concurrent.futures.Future[ort.InferenceSession]) -> None:
        try:
            future.set_result(self._sessions.compile(self._request, self._token))
        except BaseException as exc:  # noqa: BLE001 - handed to whoever takes the session
            future.set_exception(exc)

    def take(self, token: CancelToken) -> ort.InferenceSession:
        """The session (or the compile's error): the early compile's once done, or compiled now
        when none was begun. Cancelled when ``token`` is cancelled meanwhile, which stops the
        compile too."""
        self._taken = True
        if self._future is None:
            return self._sessions.compile(self._request, token)
        while True:
            if token.cancelled:
                self._token.cancel()
                raise Cancelled()
            try:
                session = self._future.result(timeout=_POLL)
            except concurrent.futures.TimeoutError:
                continue
            if token.cancelled:  # meanwhile: the caller is gone, as if its own compile had been stopped
                raise Cancelled()
            return session

    def drop(self) -> None:
        """Not wanted (the cache had the model, or the job failed): stop the compile."""
        if self._future is not None and not self._taken:
            self._token.cancel()

    def __enter__(self) -> EarlyCompile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.drop()
