"""Helpers shared by tests: reference inference and subprocess runners."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class HeldCompiles:
    """What the ``held_compiles`` fixture hands a test."""

    started: threading.Event = field(default_factory=threading.Event)  # a compile is waiting
    release: threading.Event = field(default_factory=threading.Event)  # let them all go


def manifests(cache_dir: Path) -> list[dict[str, Any]]:
    """The manifests of a cache's entries (and not-cacheable markers), as JSON."""
    import json

    from aioov._cache.store import CacheStore

    store = CacheStore(cache_dir)
    return [json.loads((store.entry_path(k) / "manifest.json").read_text()) for k in store.keys()]


def reference(path: Path | str, feed: dict[str, Any]) -> list[np.ndarray]:
    """Plain onnxruntime on the same inputs: what aioov must reproduce."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feed)  # type: ignore[no-any-return]


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child Python: this checkout first on ``PYTHONPATH``, ahead of
    what is there already (on the GPU machine aioov's dependencies come that way)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, **extra}


def aioov_command() -> list[str]:
    """The ``aioov`` command: the installed script, or ``python -m aioov`` where aioov is only
    on ``PYTHONPATH`` (the GPU machine has no script; run it with :func:`child_env`)."""
    script = Path(sys.executable).parent / "aioov"
    return [str(script)] if script.exists() else [sys.executable, "-m", "aioov"]


def run_python(code: str, *args: str, timeout: float = 120, env: dict[str, str] | None = None,
               check: bool = True, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (a real second process)."""
    full_env = child_env(**(env or {}))
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True, text=True, timeout=timeout, env=full_env, **kwargs,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_models(folder: Path, count: int, *, prefix: str = "m", layers: int = 2, hidden: int = 64,
                vocab: int = 300) -> list[Path]:
    """``count`` small transformer models that differ in their weights (seed = index)."""
    import onnx

    from aioov.testing import bert_like

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(count):
        path = folder / f"{prefix}{seed}.onnx"
        onnx.save(bert_like(layers=layers, hidden=hidden, heads=4, vocab=vocab, seed=seed), path)
        paths.append(path)
    return paths


_COMPILE_AND_INFER = """
import sys, json, anyio, numpy as np, aioov
async def main():
    async with aioov.Core(cache_dir=sys.argv[1]) as core:
        compiled = await core.compile_model(sys.argv[2], "CPU", json.loads(sys.argv[4]))
        y = (await compiled.infer({"x": np.load(sys.argv[3])}))["y"]
    print(json.dumps({"from_cache": compiled.get_property("LOADED_FROM_CACHE"), "y": y.tolist()}))
anyio.run(main)
"""


def builders_of(pid: int) -> list[int]:
    """Builder processes whose parent is ``pid`` (Linux's /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == pid and b"aioov._builder" in cmdline:
            found.append(int(entry.name))
    return found


def wait_for_builders(within: float = 60) -> list[int]:
    """This process's builders, once there are any (or none after ``within`` seconds)."""
    deadline = time.monotonic() + within
    while not (builders := builders_of(os.getpid())) and time.monotonic() < deadline:
        time.sleep(0.02)
    return builders


def gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True  # exited, waiting to be reaped by init
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.05)
    return False


def compile_in_a_process(cache_dir: Path, model: Path, x: np.ndarray, **config: object) -> tuple[bool, np.ndarray]:
    """(LOADED_FROM_CACHE, outputs ``y`` for input ``x``) of a compile with ``config`` in a
    fresh process, with a timeout: a hang fails the test instead of hanging the suite."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.npy"
        np.save(path, x)
        report = json.loads(run_python(_COMPILE_AND_INFER, str(cache_dir), str(model), str(path), json.dumps(config),
                                       timeout=60).stdout)
    return bool(report["from_cache"]), np.array(report["y"], dtype=np.float32)
