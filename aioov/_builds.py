"""Running builder processes (``aioov._builder``) from the serving process.

One builder is kept for a burst of exports (measured: starting one costs 0.4-0.6 s of
imports here, once per burst instead of once per model; a lone compile's export starts it
beside that compile, ``_writer`` says why) and closed after ``IDLE_CLOSE`` seconds without a
job, so an idle application holds no builder and none of its memory. A background job finding
the kept one busy gets a one-off process; a job somebody waits for waits for it a little first
(``KEPT_WAIT``). Background jobs run at nice 10; a job somebody waits for
(``CACHE_EXPORT=SYNC``, other processes waiting for the entry) runs at the caller's priority,
in a builder that was never lowered (a process cannot raise its priority again). A builder
that crashes, hangs past its time limit or is cancelled is killed, and the next job starts a
new one.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO, Any

from ._buildjob import PARENT_ENV, BuildJob, BuildReply
from ._concurrency import CancelToken, renew_in_children
from ._errors import Cancelled

__all__ = ("BUILD_TIMEOUT", "BuildClock", "BuildReport", "Builders", "Timeout")

#: seconds a builder may take for one variant, at least (30x the compile's time where longer)
BUILD_TIMEOUT = 300.0


class BuildClock:
    """A build's time limit: ``max(BUILD_TIMEOUT, 30 x a compile's time)``; while the builder's
    own compile runs, 30 x the CPU time it used so far. The compile is the caller's, beside a background build
    (``compiled()`` is called when it ends), or, for a build somebody waits for
    (``follows_builder``), the builder's own first session, which the builder reports: a model
    whose build needs longer than ``BUILD_TIMEOUT`` is cached either way."""

    def __init__(self, *, follows_builder: bool = False) -> None:
        self.follows_builder = follows_builder
        self._started = time.perf_counter()
        self._seconds: float | None = None
        self._pid: int | None = None  # the builder at work on it now
        self._cpu: float | None = None

    def working(self, pid: int | None) -> None:
        """A builder (``pid``) works on this build now; None: none does."""
        if pid != self._pid:
            self._pid, self._cpu = pid, None

    def progressed(self) -> bool:
        """Whether the build moved on since the last look: its builder used CPU (a stopped, hung
        or starved one does not), or no builder is at work and the exporting thread is (it
        stages the source, publishes). True where a builder's CPU time cannot be read."""
        pid = self._pid
        if pid is None:
            return True
        cpu = cpu_seconds(pid)
        if cpu is None:
            return True
        moved = self._cpu is None or cpu > self._cpu
        self._cpu = cpu
        return moved

    def compiled(self) -> None:
        if self._seconds is None:
            self._seconds = time.perf_counter() - self._started

    @property
    def seconds(self) -> float | None:
        """The compile's time, once it is done."""
        return self._seconds

    def limit(self) -> float:
        if self._seconds is not None:
            return max(BUILD_TIMEOUT, 30 * self._seconds)
        # The compile runs still (the builder's own, not reported yet): 30 x the CPU time its
        # builder used so far. A builder that never started, or hangs, uses none: the floor.
        cpu = cpu_seconds(self._pid) if self._pid is not None else None
        return max(BUILD_TIMEOUT, 30 * (cpu or 0.0))


#: seconds a job may take: a number, or a clock
Timeout = float | BuildClock

#: seconds between looks at a cancel token while waiting for a builder
_POLL = 0.05
#: seconds a kept builder may stay idle before it is closed
IDLE_CLOSE = 2.0
#: seconds an awaited job waits for the kept builder before it starts a one-off: starting one
#: costs an interpreter's and onnxruntime's imports in CPU, which the compiles of other
#: processes need on a cold start
KEPT_WAIT = 5.0
#: the interpreter that runs builders, where ``sys.executable`` is not a Python (embedded
#: interpreters such as uWSGI's report their own binary)
PYTHON_ENV = "AIOOV_BUILDER_PYTHON"
#: a builder's numpy on one thread. Its sessions run on one thread already, and numpy only
#: makes up and compares small arrays; OpenBLAS's pool (numpy's wheels) spins its threads
#: at import, on CPU that the compiles of a cold start need
ONE_THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


@dataclass(frozen=True)
class BuildReport:
    """What a builder said about one job, or what became of it."""

    ok: bool
    reason: str | None = None
    #: the failure says nothing about the blob (writing it failed, a time limit, a kill from
    #: outside, e.g. for memory): worth trying again later, not remembering as "not cacheable"
    transient: bool = False
    #: give up this export (a time limit or a kill: the next variant would meet the same)
    stop: bool = False
    #: the builder's own reply (None: it gave none)
    reply: BuildReply | None = None


#: how a builder starts: isolated (``-I``: no working directory, no ``PYTHON*`` variables, no
#: user site), then with the import paths ``_import_paths`` gives it
_BOOT = """
import json, os, sys
paths = json.loads(os.environ.pop("AIOOV_BUILDER_SYS_PATH"))
sys.path[:] = paths["path"] if paths["replace"] else sys.path + [p for p in paths["path"] if p not in sys.path]
from aioov._builder import main
main()
"""


def _import_paths(own_interpreter: bool) -> dict[str, Any]:
    """The application's import paths, less its working directory and its script's folder
    (a ``json.py`` there must not run in the builder; they are found by value, wherever the
    application's start or its own code put them), unless the modules a builder needs were
    imported from there, and with aioov's own folder last. Another interpreter
    (``AIOOV_BUILDER_PYTHON``) keeps its own paths and gets aioov's folder only."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not own_interpreter:
        return {"replace": False, "path": [package_parent]}
    foreign = {_real(os.curdir)}
    main = getattr(sys.modules.get("__main__"), "__file__", None)
    if main:
        foreign.add(_real(os.path.dirname(main)))
    needed = {_real(root) for root in _builder_roots()}
    paths = [p for p in sys.path if p not in ("", ".") and (_real(p) not in foreign - needed)]
    if package_parent not in paths:
        paths.append(package_parent)
    return {"replace": True, "path": paths}


def _real(path: str) -> str:
    try:
        return os.path.realpath(path)
    except (OSError, ValueError):
        return path


def _builder_roots() -> list[str]:
    """The import paths this process found the third-party packages a builder imports in."""
    roots = []
    for name in ("aioov", "onnxruntime", "numpy", "onnx"):
        file = getattr(sys.modules.get(name), "__file__", None)
        if file:  # a package's __init__.py: its root is the folder above the package's
            roots.append(os.path.dirname(os.path.dirname(file)))
    return roots


_OUTSIDE_SIGNALS = {int(getattr(signal, name)) for name in ("SIGKILL", "SIGTERM", "SIGHUP", "SIGINT")
                    if hasattr(signal, name)}


class _Process:
    def __init__(self) -> None:
        env = dict(os.environ)
        other = os.environ.get(PYTHON_ENV)
        env["AIOOV_BUILDER_SYS_PATH"] = json.dumps(_import_paths(own_interpreter=not other))
        env[PARENT_ENV] = str(os.getpid())
        env.update(ONE_THREAD_ENV)
        flags = ["-I"] + (["-S"] if sys.flags.no_site else [])
        self.popen = subprocess.Popen(
            [other or sys.executable, *flags, "-c", _BOOT],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
            encoding="utf-8",
            bufsize=1,
        )
        self.replies: queue.Queue[str | None] = queue.Queue()
        self.niced = False  # it ran a background job, and lowered its priority for good
        assert self.popen.stdout is not None
        try:
            threading.Thread(target=self._read, args=(self.popen.stdout,), daemon=True,
                             name="aioov-builder-reader").start()
        except RuntimeError as exc:  # a thread limit (RLIMIT_NPROC, a cgroup's pids.max)
            self.kill()
            self.popen.stdout.close()  # (what its reader would have done)
            raise OSError(errno.EAGAIN, f"cannot start its reader thread: {exc}") from exc

    def _read(self, stream: IO[str]) -> None:
        with stream:
            for line in stream:
                self.replies.put(line)
        self.replies.put(None)

    def run(self, job: BuildJob, timeout: Timeout, token: CancelToken | None) -> BuildReport:
        assert self.popen.stdin is not None
        self.niced = self.niced or job.background
        try:
            self.popen.stdin.write(job.to_line())
            self.popen.stdin.flush()
        except OSError:
            return self._died()
        clock = timeout if isinstance(timeout, BuildClock) else None
        if clock is not None:
            clock.working(self.popen.pid)
        try:
            return self._wait(timeout, token)
        finally:
            if clock is not None:
                clock.working(None)

    def _wait(self, timeout: Timeout, token: CancelToken | None) -> BuildReport:
        limit = timeout.limit if isinstance(timeout, BuildClock) else (lambda: timeout)
        started = time.monotonic()
        while True:
            if token is not None and token.cancelled:
                self.kill()
                raise Cancelled()
            try:
                line = self.replies.get(timeout=_POLL)
            except queue.Empty:
                if time.monotonic() - started > limit():
                    self.kill()
                    return BuildReport(False, f"the builder did not finish within {limit():.0f} s",
                                       transient=True, stop=True)
                continue
            if line is None:
                return self._died()
            reply = BuildReply.from_line(line)
            if reply is None:  # the builder's first session exists
                if isinstance(timeout, BuildClock) and timeout.follows_builder:
                    timeout.compiled()
                continue
            # An exception while writing the blob (a full disk, a source it cannot save)
            # says nothing about the blob: try the next variant, but remember nothing.
            return BuildReport(reply.ok, reply.reason, transient=reply.stage == "export", reply=reply)

    def _died(self) -> BuildReport:
        self.close()
        code = self.popen.wait()
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            # These come from outside (the kernel's OOM killer, an operator, a service manager
            # stopping the service): not the blob's fault. A crash is SIGSEGV, SIGBUS, SIGABRT...
            killed = -code in _OUTSIDE_SIGNALS
            return BuildReport(False, f"the builder was killed by {name}", transient=killed, stop=killed)
        # It reports every exception; exiting without a report means it could not run at all
        # (a wrong interpreter, a broken install): nothing to learn about the blob.
        return BuildReport(False, f"the builder exited with status {code} without a report",
                           transient=True, stop=True)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def forget(self) -> None:
        """In a forked child: close its copies of the pipes, never wait for or signal the process."""
        for stream in (self.popen.stdin, self.popen.stdout):
            try:
                if stream is not None:
                    os.close(stream.fileno())
            except (OSError, ValueError):
                pass

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.close()

    def close(self) -> None:
        """Close its stdin (it exits at once), wait a little, kill if it does not."""
        try:
            if self.popen.stdin is not None:
                self.popen.stdin.close()
        except OSError:
            pass
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()


class Builders:
    """The builder processes of one Core."""

    def __init__(self) -> None:
        self._kept: _Process | None = None
        self._lock = threading.Lock()
        self._idle: threading.Timer | None = None
        renew_in_children(self)

    def _renew_in_child(self) -> None:
        """The kept builder is the parent's: close this process's ends of its pipes (it sees
        no EOF while the parent holds its own) and start afresh."""
        kept, self._kept = self._kept, None
        if kept is not None:
            kept.forget()
        self._lock = threading.Lock()
        self._idle = None

    def build(self, job: BuildJob, timeout: Timeout, token: CancelToken | None) -> BuildReport:
        """Run ``job`` in a builder; raises Cancelled when ``token`` is cancelled meanwhile."""
        try:
            return self._build(job, timeout, token)
        except OSError as exc:  # no interpreter to start, no processes left, ...
            return BuildReport(False, f"cannot start a builder process: {exc}", transient=True, stop=True)

    def _build(self, job: BuildJob, timeout: Timeout, token: CancelToken | None) -> BuildReport:
        if not self._take(KEPT_WAIT if not job.background else 0.0, token):
            process = _Process()  # the kept one is busy: a one-off
            try:
                return process.run(job, timeout, token)
            finally:
                process.close()
        try:
            if self._idle is not None:
                self._idle.cancel()
            if self._kept is not None and self._kept.niced and not job.background:
                self._kept.close()  # lowered for good: this job is awaited
                self._kept = None
            if self._kept is None or not self._kept.alive():
                self._kept = _Process()
            process = self._kept
            try:
                report = process.run(job, timeout, token)
            except BaseException:
                self._kept = None
                raise
            if not process.alive():
                self._kept = None
            else:
                self._idle = threading.Timer(IDLE_CLOSE, self.close)
                self._idle.name, self._idle.daemon = "aioov-builder-idle", True
                try:
                    self._idle.start()
                except RuntimeError:  # a thread limit: nothing would close it when idle, so it is not kept
                    self._idle, self._kept = None, None
                    process.close()
            return report
        finally:
            self._lock.release()

    def _take(self, wait: float, token: CancelToken | None) -> bool:
        """The kept builder's lock, waiting up to ``wait`` seconds for it."""
        deadline = time.monotonic() + wait
        while not self._lock.acquire(timeout=min(_POLL, max(0.0, deadline - time.monotonic()))):
            if token is not None and token.cancelled:
                raise Cancelled()
            if time.monotonic() >= deadline:
                return False
        return True

    def close(self) -> None:
        """Close the kept builder (when no job is using it)."""
        if self._idle is not None:
            self._idle.cancel()
        if self._lock.acquire(blocking=False):
            try:
                if self._kept is not None:
                    self._kept.close()
                    self._kept = None
            finally:
                self._lock.release()


def cpu_seconds(pid: int) -> float | None:
    """CPU seconds a process has used (Linux's /proc); None where it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
