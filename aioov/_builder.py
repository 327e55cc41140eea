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
3. run the source session on inputs made up from its input specs (``_inputs.synthesize``),
   twice (outputs that differ between two runs make comparing pointless: "load only"),
4. load the blob as a hit does (and as an instant hit does, for formats that have one), run it
   on the same inputs, and compare every output within ``TOLERANCE``.

Beside steps 3 and 4, threads fsync the blob's files and checksum them for the manifest
(``_Settle``): the disk writes back hundreds of MB while the check runs instead of after it.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ("build", "main", "run_job")

#: ``AIOOV_BUILDER_FAULT``: for aioov's own tests only, "crash:VARIANT", "mismatch:VARIANT" or
#: "hang:VARIANT" (comma-separated) makes the builder write or load a bad blob on purpose
FAULT_ENV = "AIOOV_BUILDER_FAULT"


def _faults(variant: str) -> set[str]:
    spec = os.environ.get(FAULT_ENV, "")
    return {kind for kind, _, v in (item.partition(":") for item in spec.split(",")) if v == variant}


def _options(job: dict[str, Any], level: str | None) -> Any:
    """Session options as the serving process would make them, on one thread."""
    from ._sessions import session_options

    options = session_options(level or job["opt_level"], job["session_config"])
    options.intra_op_num_threads = 1  # measured: 2 threads wrote BERT-base's blob no sooner
    options.inter_op_num_threads = 1
    return options


def _session(model: str, options: Any, providers: list[tuple[str, dict[str, str]]]) -> Any:
    import onnxruntime as ort

    return ort.InferenceSession(model, options, providers=[name for name, _ in providers],
                                provider_options=[opts for _, opts in providers])


#: the priority of background jobs: below the compiles that callers wait for
NICE = 10


class CheckFailed(Exception):
    """The blob was written, and loading or running it failed: the blob's fault."""


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """``build``'s report, or the failure: ``"stage": "check"`` when the blob itself failed
    (remembered by the parent), ``"export"`` when writing it did (the disk, the source: not)."""
    from ._reference import first_line

    try:
        return build(job)
    except CheckFailed as exc:
        return {"ok": False, "stage": "check", "reason": str(exc) or first_line(exc.__cause__ or exc)}
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which decides
        return {"ok": False, "stage": "export", "reason": f"{type(exc).__name__}: {first_line(exc)}"}


def build(job: dict[str, Any]) -> dict[str, Any]:
    """Write the blob of ``job`` into its directory and check it; the report."""
    from ._devices import blob_format
    from ._errors import ORT_ERRORS, BlobError
    from ._reference import first_line, reference_run

    blob, variant, tmp = blob_format(job["blob"]), job["variant"], Path(job["tmp"])
    providers = [(name, dict(opts)) for name, opts in job["providers"]]
    faults = _faults(variant)
    started = time.perf_counter()
    options = _options(job, blob.export_level(variant))
    export_providers = blob.configure_export(options, providers, tmp, job["key"], variant)
    try:
        source = _session(job["model"], options, export_providers)
    except ORT_ERRORS as exc:
        if _loads(job, providers):
            raise  # writing the blob failed (the disk, a size limit): worth trying again later
        # The builder's providers cannot load the model at all: a GPU entry's CPU builder and a
        # model with CUDA-only ops (com.microsoft ComplexMul, GroupNorm...). Remembered.
        raise CheckFailed(f"{providers[0][0]} cannot load the model to write its blob: {first_line(exc)}") from exc
    try:
        blob.finalize(tmp, [arg.name for arg in source.get_inputs()])
    except BlobError as exc:
        return {"ok": False, "stage": "check", "reason": str(exc)}
    if "mismatch" in faults:
        _sabotage(tmp / blob.model_file)
    exported = time.perf_counter()
    with _Settle(tmp) as settled:
        feed, expected, skipped = reference_run(source, job.get("shapes"))
        del source
        problem = _check(job, blob, providers, faults, feed, expected)
    if problem:
        return {"ok": False, "stage": "check", "reason": problem}
    return {
        "ok": True,
        "check": "ran and matched" if feed is not None else "load only",
        "skipped": skipped,
        "export_seconds": round(exported - started, 3),
        "check_seconds": round(time.perf_counter() - exported, 3),
        "files": settled.records,
    }


def _check(job: dict[str, Any], blob: Any, providers: list[tuple[str, dict[str, str]]], faults: set[str],
           feed: Any, expected: Any) -> str | None:
    """Load the blob as hits will, run it on ``feed`` and compare with ``expected``: what went
    wrong, if anything. Raises CheckFailed when it does not load or run."""
    from ._errors import ORT_ERRORS
    from ._reference import compare

    tmp, variant = Path(job["tmp"]), job["variant"]

    loads = [False, True] if blob.instant else [False]
    for instant in loads:
        options = _options(job, None)
        if instant:
            blob.configure_instant(options)
        import_providers = blob.configure_import(options, providers, tmp, None, variant)
        if "hang" in faults:
            time.sleep(3600)
        try:
            hit = _session(str(tmp / blob.model_file), options, import_providers)
            if "crash" in faults:
                _crash()
            outputs = hit.run(None, feed) if feed is not None else None
        except ORT_ERRORS as exc:
            raise CheckFailed() from exc
        if outputs is not None and expected is not None:
            problem = compare(expected, outputs)
            if problem:
                return f"{'an instant' if instant else 'a'} hit's {problem}"
        del hit
    return None


class _Settle:
    """Make a written blob durable and checksum it for the manifest, in two threads, while
    the check runs: 738 MB of BERT-base's entry took ~1 s to fsync here after the check, and the
    parent then read it all again for the checksums. ``records``: a manifest's ``files``."""

    def __init__(self, tmp: Path) -> None:
        from ._cache.fsutil import checksum_record, fsync_file

        files = sorted(tmp.iterdir())
        self.records: dict[str, dict[str, Any]] = {}  # missing files: the parent checksums them

        def sync() -> None:
            for file in files:
                with contextlib.suppress(OSError):
                    fsync_file(file)

        def checksum() -> None:
            for file in files:
                with contextlib.suppress(OSError):
                    self.records[file.name] = checksum_record(file)

        self._threads = [threading.Thread(target=work, daemon=True) for work in (sync, checksum)]

    def __enter__(self) -> _Settle:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        for thread in self._threads:
            thread.join()


def _loads(job: dict[str, Any], providers: list[tuple[str, dict[str, str]]]) -> bool:
    """Whether the source loads on ``providers`` when nothing is written."""
    from ._errors import ORT_ERRORS

    try:
        _session(job["model"], _options(job, None), providers)
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
    import signal

    os.kill(os.getpid(), signal.SIGSEGV)


def _lower_priority() -> None:
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) < NICE:
            os.setpriority(os.PRIO_PROCESS, 0, NICE)
    except (AttributeError, OSError):
        pass


def main() -> None:
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

    threading.Thread(target=read_stdin, daemon=True).start()
    while True:
        job = json.loads(jobs.get())
        if job.get("background"):
            _lower_priority()  # for good: the parent starts another builder for awaited jobs
        report = run_job(job)
        _release_memory()
        replies.write(json.dumps(report) + "\n")


def _release_memory() -> None:
    """Give freed heap back to the system between jobs (glibc keeps it otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    main()
