"""Background work that yields to serving: a lower CPU and I/O priority, never a higher one.

Used by the export thread (so that the builders it starts begin low, imports included) and by
a builder given a background job. On Linux a thread gets nice ``NICE`` (unless its own is
higher already), the idle CPU scheduling class (``SCHED_IDLE``: it runs only on CPU nothing
else wants) and the idle I/O class; threads and processes it starts later inherit all three.
Each is skipped where the system does not have it or refuses it. An awaited build is never
lowered: somebody waits for it.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading

__all__ = ("NICE", "lower_this_thread", "priority_of")

#: the nice value of background work, at least (never lowered from a higher one)
NICE = 10

# ioprio_set(2) has no wrapper in Python or glibc: its number per architecture
_IOPRIO_SET = {"x86_64": 251, "amd64": 251, "aarch64": 30, "arm64": 30, "riscv64": 30, "i686": 289,
               "i386": 289, "armv7l": 314, "ppc64le": 273, "s390x": 282}
_IOPRIO_WHO_PROCESS = 1  # with who=0: the calling thread
_IOPRIO_CLASS_IDLE = 3


def lower_this_thread() -> None:
    """Lower the calling thread's CPU and I/O priority for good (see the module's docstring)."""
    tid = threading.get_native_id()
    try:
        if os.getpriority(os.PRIO_PROCESS, tid) < NICE:
            os.setpriority(os.PRIO_PROCESS, tid, NICE)
    except (AttributeError, OSError):
        pass
    if hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
        except OSError:
            pass
    number = _IOPRIO_SET.get(platform.machine().lower())
    if number is not None and platform.system() == "Linux":
        try:
            ctypes.CDLL(None, use_errno=True).syscall(number, _IOPRIO_WHO_PROCESS, 0, _IOPRIO_CLASS_IDLE << 13)
        except (OSError, AttributeError):
            pass


def priority_of(tid: int) -> tuple[int, str]:
    """(nice value, scheduling class name) of a thread or process, for tests and ``cache`` tools."""
    nice = os.getpriority(os.PRIO_PROCESS, tid)
    policy = os.sched_getscheduler(tid) if hasattr(os, "sched_getscheduler") else None
    names = {getattr(os, n): n for n in ("SCHED_OTHER", "SCHED_BATCH", "SCHED_IDLE", "SCHED_FIFO", "SCHED_RR")
             if hasattr(os, n)}
    return nice, names.get(policy, str(policy)) if policy is not None else "unknown"
