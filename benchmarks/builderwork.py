"""What a builder spends on a model not worth caching: judged before its checks, or after them.

For each model of the ``startcpu`` set (``workers.model_folder``), the caller's compile is
timed first (median of three, in this process); the models that the rule (``aioov._worth``)
then finds not worth caching, from a builder's timed load, are kept. For those, in this process,
the builder's ``build`` of the ``plain`` blob runs in turn:

- ``early``: the job carries the caller's compile time: the builder stops after its timed load;
- ``after``: it does not: the builder runs the source and checks the blob at several shapes,
  as it did before #42 (the parent then judged from the reply's load time);

alternating, the order swapped every repeat. The table gives the CPU seconds of all kept
models' builds per mode (median, min-max) and the ratio early / after.

    .venv/bin/python -m benchmarks.builderwork [--repeats 5]

writes ``benchmarks/results/builderwork.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from . import ROOT
from .workers import model_folder


def _compile_seconds(path: Path) -> float:
    import onnxruntime as ort

    times = []
    for _ in range(3):
        started = time.perf_counter()
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "builderwork.json")
    args = parser.parse_args()

    from aioov._builder import build
    from aioov._buildjob import BuildJob

    with tempfile.TemporaryDirectory(prefix="aioov-bench-") as tmp_name:
        tmp = Path(tmp_name)

        def job(path: Path, compile_seconds: float | None) -> BuildJob:
            folder = Path(tempfile.mkdtemp(dir=tmp))
            return BuildJob(model=str(path), tmp=str(folder), key="k" * 64, blob="ort-optimized", variant="plain",
                            providers=[("CPUExecutionProvider", {})], compile_seconds=compile_seconds)

        def cpu_of(j: BuildJob) -> float:
            started = time.process_time()
            build(j)
            spent = time.process_time() - started
            shutil.rmtree(j.tmp, ignore_errors=True)
            return spent

        kept: dict[str, tuple[Path, float]] = {}
        print("| model | compile s | builder's load CPU s | not worth caching |\n|---|---|---|---|")
        for path in sorted(model_folder(tmp).iterdir()):
            seconds = _compile_seconds(path)
            reply = build(job(path, seconds))
            print(f"| {path.name} | {seconds:.3f} | {reply.load_cpu_seconds} | {reply.stage == 'not worth'} |")
            if reply.stage == "not worth":
                kept[path.name] = (path, seconds)
        samples: dict[str, list[float]] = {"early": [], "after": []}
        for repeat in range(args.repeats):
            for mode in ("early", "after") if repeat % 2 == 0 else ("after", "early"):
                samples[mode].append(sum(
                    cpu_of(replace(job(path, seconds), compile_seconds=seconds if mode == "early" else None))
                    for path, seconds in kept.values()))

    med = {mode: statistics.median(v) for mode, v in samples.items()}
    print(f"\n{len(kept)} models not worth caching: {', '.join(kept)}\n")
    print("| builder CPU s, all of them | median | min-max |\n|---|---|---|")
    for mode, values in samples.items():
        print(f"| {mode} | {med[mode]:.2f} | {min(values):.2f}-{max(values):.2f} |")
    print(f"\nearly / after: {med['early'] / med['after']:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "what": __doc__.split("\n")[0], "date": datetime.date.today().isoformat(),
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "models": {name: round(seconds, 4) for name, (_, seconds) in kept.items()},
        "samples": samples, "ratio": med["early"] / med["after"],
    }, indent=1))
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
