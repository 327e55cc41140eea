"""The builder process: writes a cache entry's blob and checks it, outside the serving process.

onnxruntime's serializer and the blobs it writes are the riskiest code aioov runs: a blob with
prepacked weights of one real OCR model crashed every process that loaded it (SIGSEGV at its
first inference). So an entry is written here, in a child process at a lower CPU priority
(``python -m aioov._builder``), and checked exactly as a hit will load it before anything is
published: a crash, a hang or a wrong answer here costs one entry, never the application.

One job is one JSON line on stdin; its report is one JSON line on the (private) stdout. The
process serves jobs until its stdin closes, and exits at once when it does: a parent that dies
or gives up leaves no builder behind. For each job:

1. build a session from the source with the blob format's export options (it writes the blob),
2. ``finalize`` the blob (the format's own checks),
3. run the source session on inputs made up from its input specs at several shapes
   (``_inputs.check_runs``: each free dimension small, medium and at the size real inputs of
   its kind have, a batch of 2, the user's ``WARMUP_SHAPES`` and ``CHECK_SHAPES``), the first
   twice (outputs that differ between two runs make comparing pointless: "load only"),
4. load the blob as a hit does (and as an instant hit does, for formats that have one), run it
   on the same inputs, and compare every output within ``TOLERANCE``; the report says how long
   each load took (the parent decides from them whether a faster variant pays).

The serving process fsyncs and checksums the files when it publishes the entry.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ._buildjob import PARENT_ENV, BuildJob, BuildReply
from ._priority import lower_this_thread

__all__ = ("build", "main", "run_job")

#: ``AIOOV_BUILDER_FAULT``: for aioov's own tests only, "crash:VARIANT", "mismatch:VARIANT",
#: "hang:VARIANT" or "crashwide:VARIANT" (comma-separated) makes the builder write or load a bad
#: blob on purpose ("slow:VARIANT": its first session takes 0.3 s more, the rest 1.5 s more);
#: "crashwide": the blob crashes when an input's last dimension is 16 or more
#: (what a real prepacked OCR recognizer did at text-line widths of 15 and above)
FAULT_ENV = "AIOOV_BUILDER_FAULT"
_PR_SET_PDEATHSIG = 1


def _faults(variant: str) -> set[str]:
    spec = os.environ.get(FAULT_ENV, "")
    return {kind for kind, _, v in (item.partition(":") for item in spec.split(",")) if v == variant}


def _options(job: BuildJob, level: str | None) -> Any:
    """Session options as the serving process would make them, on one thread, without its
    ``ORT_SESSION_OPTIONS`` (they change how a session runs, not what a blob holds)."""
    from ._ortoptions import session_options

    options = session_options(level or job.opt_level, job.session_config, custom_ops=job.custom_ops,
                              free_dimensions=job.free_dimensions)
    options.intra_op_num_threads = 1  # writing a blob is serial work: more threads only compete
    options.inter_op_num_threads = 1
    return options


def _session(model: str, options: Any, providers: list[tuple[str, dict[str, str]]]) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(model, options, providers=[name for name, _ in providers],
                                provider_options=[opts for _, opts in providers])




class CheckFailed(Exception):
    """The blob was written, and loading or running it failed: the blob's fault."""


def run_job(job: BuildJob, progress: Callable[[float], None] = lambda _: None) -> BuildReply:
    """``build``'s report, or the failure: ``"stage": "check"`` when the blob itself failed
    (remembered by the parent), ``"export"`` when writing it did (the disk, the source: not)."""
    from ._reference import first_line

    try:
        return build(job, progress)
    except CheckFailed as exc:
        return BuildReply(False, str(exc) or first_line(exc.__cause__ or exc), "check")
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
        reason = f"{type(exc).__name__}: {first_line(exc)}"
        room = _no_room(job)  # onnxruntime's write errors do not say why; the disk may
        return BuildReply(False, f"{room}: {reason}" if room else reason, "export")


def _no_room(job: BuildJob) -> str | None:
    """Why the blob may not have fitted: the disk nearly full, or a file size limit at most a
    few times the model's size (the parent tries again when there is room)."""
    import shutil

    try:
        needed = 2 * os.path.getsize(job.model)
        free = shutil.disk_usage(job.tmp).free
        if free < needed:
            return f"no room on the disk ({free >> 20} MB free)"
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and limit < 4 * needed:
            return f"no room under the file size limit ({limit >> 20} MB)"
    except (OSError, ImportError, KeyError, TypeError):
        pass
    return None


def build(job: BuildJob, progress: Callable[[float], None] = lambda _: None) -> BuildReply:
    """Write the blob of ``job`` into its directory and check it; the report. ``progress`` hears
    when the first session exists (a parent waiting for it times the build from that compile)."""
    from ._devices import blob_format
    from ._errors import ORT_ERRORS, BlobError
    from ._reference import first_line, reference_run
    from ._worth import not_worth

    blob, variant, tmp = blob_format(job.blob), job.variant, Path(job.tmp)
    providers = [(name, dict(opts)) for name, opts in job.providers]
    faults = _faults(variant)
    started = time.perf_counter()
    options = _options(job, blob.export_level(variant))
    export_providers = blob.configure_export(options, providers, tmp, job.key, variant)
    try:
        source = _session(job.model, options, export_providers)
    except ORT_ERRORS as exc:
        if _loads(job, providers):
            raise  # writing the blob failed (the disk, a size limit): worth trying again later
        # The builder's providers cannot load the model at all: a GPU entry's CPU builder and a
        # model with CUDA-only ops (com.microsoft ComplexMul, GroupNorm...). Remembered.
        raise CheckFailed(f"{providers[0][0]} cannot load the model to write its blob: {first_line(exc)}") from exc
    if "slow" in faults:
        time.sleep(0.3)
    progress(time.perf_counter() - started)
    if "slow" in faults:
        time.sleep(1.5)
    try:
        blob.finalize(tmp, [arg.name for arg in source.get_inputs()])
    except BlobError as exc:
        return BuildReply(False, str(exc), "check")
    if "mismatch" in faults:
        _sabotage(tmp / blob.model_file)
    exported = time.perf_counter()
    # Loading the blob needs nothing from the source's run: both at once, unless the model's
    # worth is judged first (from that load: a blob not worth caching is not worth a check).
    with ThreadPoolExecutor(1, thread_name_prefix="aioov-check") as pool:
        hit = pool.submit(_timed, _load_hit, job, blob, providers, faults, instant=False)
        if job.compile_seconds is not None:
            _, (load, load_cpu) = hit.result()
            why = not_worth(job.compile_seconds, load_cpu)
            if why is not None:
                return BuildReply(False, why, "not worth", load_seconds=round(load, 4),
                                  load_cpu_seconds=round(load_cpu, 4), export_seconds=round(exported - started, 3))
        runs, skipped, left_out = reference_run(source, job.shapes, job.values, job.check_shapes)
        del source
        problem, loads = _check(job, blob, providers, faults, runs, hit)
    if problem:
        return BuildReply(False, problem, "check")
    return BuildReply(
        True,
        check="ran and matched" if runs is not None else "load only",
        skipped=skipped,
        checked=[label for label, _, _ in runs or ()],
        left_out=left_out[:20],
        load_seconds=loads.get("load_seconds"),
        load_cpu_seconds=loads.get("load_cpu_seconds"),
        instant_load_seconds=loads.get("instant_load_seconds"),
        instant_load_cpu_seconds=loads.get("instant_load_cpu_seconds"),
        export_seconds=round(exported - started, 3),
        check_seconds=round(time.perf_counter() - exported, 3),
    )


def _check(job: BuildJob, blob: Any, providers: list[tuple[str, dict[str, str]]], faults: set[str],
           runs: Any, hit: Future[Any]) -> tuple[str | None, dict[str, float]]:
    """Run the blob loaded as instant hits will load it (for formats that have them) on the
    first of ``runs``, then ``hit`` (being loaded as hits will load it) on every one, and compare with the
    source's outputs: what went wrong, if anything, and how long each load took. Raises
    CheckFailed when the blob does not load or run. The instant session first: it loads at
    once and runs while ``hit`` still loads."""
    from ._errors import ORT_ERRORS
    from ._reference import compare, first_line

    loads: dict[str, float] = {}
    for instant in [True, False] if blob.instant else [False]:
        if instant:
            session, (seconds, cpu) = _timed(_load_hit, job, blob, providers, faults, instant=True)
        else:
            session, (seconds, cpu) = hit.result()
        name = "instant_load" if instant else "load"
        loads[f"{name}_seconds"] = round(seconds, 4)
        loads[f"{name}_cpu_seconds"] = round(cpu, 4)
        # The instant session runs the first inputs only: it skips prepacking, so its kernels
        # are plain onnxruntime's; the blob's own (prepacked) kernels run in the full session.
        for label, feed, expected in (runs or [])[:1] if instant else runs or ():
            if "crashwide" in faults and any(a.ndim and a.shape[-1] >= 16 for a in feed.values()):
                _crash()
            try:
                outputs = session.run(None, feed)
            except ORT_ERRORS as exc:
                raise CheckFailed(f"the blob failed at {label}: {first_line(exc)}") from exc
            problem = compare(expected, outputs)
            if problem:
                return f"{'an instant' if instant else 'a'} hit's {problem} (inputs {label})", loads
        del session
    return None, loads


def _timed(load: Any, *args: Any, **kwargs: Any) -> tuple[Any, tuple[float, float]]:
    """``load``'s result, its wall time and its CPU time on this thread (a builder's sessions
    run on the thread that builds them): the CPU time is what other processes cannot inflate,
    and a background builder runs only on CPU that nothing else wants."""
    started, cpu = time.perf_counter(), time.thread_time()
    return load(*args, **kwargs), (time.perf_counter() - started, time.thread_time() - cpu)


def _load_hit(job: BuildJob, blob: Any, providers: list[tuple[str, dict[str, str]]], faults: set[str],
              *, instant: bool) -> Any:
    """A session of the blob, loaded as a hit (an instant one) will load it; CheckFailed if it cannot be."""
    from ._errors import ORT_ERRORS

    options = _options(job, None)
    if instant:
        blob.configure_instant(options)
    import_providers = blob.configure_import(options, providers, Path(job.tmp), None, job.variant)
    if "hang" in faults:
        time.sleep(3600)
    try:
        hit = _session(str(Path(job.tmp) / blob.model_file), options, import_providers)
    except ORT_ERRORS as exc:
        raise CheckFailed() from exc
    if "crash" in faults:
        _crash()
    return hit


def _loads(job: BuildJob, providers: list[tuple[str, dict[str, str]]]) -> bool:
    """Whether the source loads on ``providers`` when nothing is written."""
    from ._errors import ORT_ERRORS

    try:
        _session(job.model, _options(job, None), providers)
    except ORT_ERRORS:
        return False
    return True


def _sabotage(path: Path) -> None:
    """Make the blob compute something else: every float output gets 1 added (tests only)."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    for output in graph.output:
        if output.type.tensor_type.elem_type != TensorProto.FLOAT:
            continue
        inner = output.name + "__before_sabotage"
        for node in graph.node:
            node.output[:] = [inner if o == output.name else o for o in node.output]
        one = helper.make_tensor(output.name + "__one", TensorProto.FLOAT, [], [1.0])
        graph.initializer.append(one)
        graph.node.append(helper.make_node("Add", [inner, one.name], [output.name]))
    onnx.save(model, str(path))


def _crash() -> None:
    """Die as a real fault does: in this thread, at once (a signal sent to the process may be
    handled by another thread while this one runs on)."""
    import signal

    signal.pthread_kill(threading.get_ident(), signal.SIGSEGV)


def _no_core_dumps() -> None:
    """A crash here is a blob failing its check, expected and handled: no core file of a
    process holding a model's weights (hundreds of MB, written into the application's working
    directory where ``ulimit -c`` allows it; systemd-coredump honours the limit too)."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    except (ImportError, ValueError, OSError):
        pass  # Windows has no such limit, and writes no core file


def _die_with_parent() -> None:
    """Never outlive the parent, even stopped (SIGSTOP) or hung, where closing stdin cannot
    reach us: the kernel kills us when it dies (Linux). And be what the kernel's OOM killer
    takes first: a builder costs one entry, the application must not be the one killed."""
    parent = os.environ.get(PARENT_ENV)
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if parent and os.getppid() != int(parent):  # it died before we asked
        os._exit(0)
    try:
        with open("/proc/self/oom_score_adj", "w") as f:  # raising it needs no privilege
            f.write("1000")
    except OSError:
        pass


def main() -> None:
    _die_with_parent()
    _no_core_dumps()
    # Replies go to a private copy of stdout; anything a library prints goes to stderr.
    replies = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the application's: it closes our stdin
    jobs: queue.Queue[str] = queue.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            jobs.put(line)
        os._exit(0)  # the parent closed our stdin, or died: stop now, whatever is running

    try:
        threading.Thread(target=read_stdin, daemon=True).start()
    except RuntimeError as exc:  # a thread limit (RLIMIT_NPROC counts the application's threads too)
        print(f"aioov builder: cannot start its stdin reader: {exc}", file=sys.stderr)
        os._exit(1)  # the parent says "not cached this time"
    while True:
        try:
            job = BuildJob.from_line(jobs.get())
        except (ValueError, TypeError) as exc:
            replies.write(BuildReply(False, f"cannot read the job: {exc}", "export").to_line())
            continue
        if job.background:
            lower_this_thread()  # for good: the parent starts another builder for awaited jobs
        reply = run_job(job, lambda seconds: print(BuildReply.progress_line(seconds), end="", file=replies))
        _release_memory()
        replies.write(reply.to_line())


def _release_memory() -> None:
    """Give freed heap back to the system between jobs (glibc keeps it otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    main()
